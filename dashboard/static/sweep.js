/* Sweep page: the trials table (sortable, best trial marked, cancel per trial), every loss curve
   on one uPlot chart (a hovered curve or table row is highlighted), a scatter of a parameter
   against a result, and Cancel sweep. Polls the sweep's API while it is not finished. */
"use strict";

(function () {
  const page = document.querySelector('[data-testid="sweep-page"]');
  const $ = (testid) => page.querySelector(`[data-testid="${testid}"]`);
  const mine = page.dataset.mine === "yes";  // may this user cancel the sweep and its trials?
  const api = page.getAttribute("data-api");
  const jobUrl = page.getAttribute("data-job-url");
  let sweep = JSON.parse(document.getElementById("sweep-data").textContent);
  const varied = sweep.varied;  // in the sweep's order (the keys of `parameters` are sorted)
  let sort = { key: null, dir: 1 };
  let plot = null, plotIds = [];
  const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2",
                  "#65a30d", "#9333ea", "#ea580c", "#0f766e", "#4f46e5"];

  const fmt = {
    num: (v, d) => (LF.num(v) === null ? "" : LF.num(v).toFixed(d)),
    param: (v) => (Array.isArray(v) ? v.join(",") : String(v)),
  };

  function sortValue(row, key) {
    if (key.startsWith("param:")) return row.params[key.slice(6)];
    return row[key];
  }

  function sortedRows() {
    const rows = sweep.rows.slice();
    if (!sort.key) return rows;
    return rows.sort((a, b) => {
      let x = sortValue(a, sort.key), y = sortValue(b, sort.key);
      const nx = LF.num(x), ny = LF.num(y);
      if (x === null || x === undefined || x === "") return 1;  // empty cells last
      if (y === null || y === undefined || y === "") return -1;
      if (nx !== null && ny !== null) { x = nx; y = ny; } else { x = String(x); y = String(y); }
      return (x < y ? -1 : x > y ? 1 : 0) * sort.dir;
    });
  }

  // ---- table ---------------------------------------------------------------------------------
  function cell(text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text;
    return td;
  }

  function drawTable() {
    const body = $("trials-table").querySelector("tbody");
    body.replaceChildren(...sortedRows().map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.testid = "trial-row";
      tr.dataset.jobId = r.id;
      tr.dataset.state = r.display_state;
      const best = r.id === sweep.best;
      if (best) { tr.classList.add("best"); tr.dataset.best = "1"; }
      const name = document.createElement("td");
      if (best) {
        const star = document.createElement("span");
        star.className = "best-mark";
        star.dataset.testid = "best-mark";
        star.title = "best trial";
        star.textContent = "★";
        name.appendChild(star);
      }
      const a = document.createElement("a");
      a.href = jobUrl.replace("JOB_ID", encodeURIComponent(r.id));
      a.textContent = r.name;
      name.appendChild(a);
      tr.appendChild(name);
      varied.forEach((p) => tr.appendChild(cell(fmt.param(r.params[p]), "mono")));
      const st = document.createElement("td");
      const badge = document.createElement("span");
      badge.className = `badge state-${r.display_state.replace(" ", "-")}`;
      badge.dataset.testid = "trial-state";
      badge.textContent = r.display_state;
      st.appendChild(badge);
      if (r.reason && ["failed", "cancelled"].includes(r.state)) {
        const why = document.createElement("span");
        why.className = "trial-reason";
        why.dataset.testid = "trial-reason";
        why.textContent = r.reason;
        st.appendChild(why);
      }
      tr.appendChild(st);
      tr.appendChild(cell(fmt.num(r.final_loss, 4), "num"));
      tr.appendChild(cell(fmt.num(r.best_eval_loss, 4), "num"));
      const ppl = cell(fmt.num(r.perplexity, 3), "num");
      ppl.dataset.testid = "trial-perplexity";
      tr.appendChild(ppl);
      tr.appendChild(cell(fmt.num(r.tokens_per_s, 0), "num"));
      tr.appendChild(cell(LF.fmtDuration(r.gpu_time_s), "num"));
      const act = document.createElement("td");
      if (mine && !LF.TERMINAL.includes(r.state)) {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "danger";
        b.dataset.testid = "cancel-trial";
        b.textContent = ["queued", "retrying"].includes(r.state) ? "Cancel" : "Stop";
        b.addEventListener("click", () => cancelTrial(r.id, b));
        act.appendChild(b);
      }
      tr.appendChild(act);
      tr.addEventListener("mouseenter", () => focusTrial(r.id));
      tr.addEventListener("mouseleave", () => focusTrial(null));
      return tr;
    }));
    page.querySelectorAll("th[data-sort]").forEach((th) => {
      th.classList.toggle("sorted-asc", th.dataset.sort === sort.key && sort.dir === 1);
      th.classList.toggle("sorted-desc", th.dataset.sort === sort.key && sort.dir === -1);
    });
  }

  page.querySelectorAll("th[data-sort]").forEach((th) => {
    th.addEventListener("click", () => {
      const key = th.dataset.sort;
      sort = { key: key, dir: sort.key === key ? -sort.dir : 1 };
      drawTable();
    });
  });

  function drawSummary() {
    const s = sweep.summary;
    const badge = $("sweep-state");
    badge.textContent = s.state;
    badge.className = `badge sweep-${s.state}`;
    $("sweep-summary").textContent =
      `${s.trials} trials: ${s.succeeded} succeeded, ${s.failed} failed, ` +
      `${s.stopped_early} stopped early, ${s.cancelled} cancelled, ${s.running} running, ${s.queued} queued`;
    $("cancel-sweep").hidden = !mine || Boolean(sweep.finished) || Boolean(sweep.cancelled);
  }

  // ---- loss curves ---------------------------------------------------------------------------
  function chartWidth(el) { return Math.max(300, el.clientWidth || 600); }

  function drawChart() {
    const el = $("sweep-chart");
    const rows = sweep.rows.filter((r) => r.curve && r.curve.length);
    el.dataset.series = String(rows.length);
    if (typeof uPlot === "undefined" || !rows.length) return;
    const steps = Array.from(new Set(rows.flatMap((r) => r.curve.map((p) => p[0])))).sort((a, b) => a - b);
    const index = new Map(steps.map((s, i) => [s, i]));
    const data = [steps];
    rows.forEach((r) => {
      const ys = new Array(steps.length).fill(null);
      r.curve.forEach(([s, v]) => { ys[index.get(s)] = v; });
      data.push(ys);
    });
    const ids = rows.map((r) => r.id);
    if (plot && ids.join() === plotIds.join()) { plot.setData(data); return; }
    if (plot) plot.destroy();
    plotIds = ids;
    plot = new uPlot({
      width: chartWidth(el), height: 280,
      focus: { alpha: 0.25 },
      cursor: { focus: { prox: 24 } },
      legend: { show: rows.length <= 12 },
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: "training loss" }],
      series: [{ label: "step" }].concat(rows.map((r, i) => ({
        label: r.name, stroke: COLORS[i % COLORS.length], spanGaps: true,
        width: r.id === sweep.best ? 2.5 : 1.2,
      }))),
    }, data, el);
  }

  function focusTrial(id) {
    page.querySelectorAll('[data-testid="trial-row"]').forEach((tr) =>
      tr.classList.toggle("hover", tr.dataset.jobId === id));
    if (!plot) return;
    const i = plotIds.indexOf(id);
    plot.setSeries(i >= 0 ? i + 1 : null, { focus: i >= 0 });
  }

  // ---- scatter -------------------------------------------------------------------------------
  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
    return e;
  }

  function drawScatter() {
    const box = $("scatter");
    const param = $("scatter-param").value;
    const metric = $("scatter-metric").value;
    const pts = sweep.rows.map((r) => ({ r: r, x: r.params[param], y: LF.num(r[metric]) }))
      .filter((p) => p.y !== null && p.x !== undefined);
    const W = 560, H = 260, L = 56, B = 36, T = 10, R = 12;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, "data-points": String(pts.length) });
    if (!pts.length) {
      const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#6b7280" });
      t.textContent = "no results yet";
      root.appendChild(t);
      box.replaceChildren(root);
      return;
    }
    const numeric = pts.every((p) => LF.num(p.x) !== null);
    let xs, xpos;
    if (numeric) {
      const vals = pts.map((p) => LF.num(p.x));
      const lo = Math.min(...vals), hi = Math.max(...vals);
      const log = lo > 0 && hi / lo >= 10;
      const f = log ? Math.log10 : (v) => v;
      const a = f(lo), b = f(hi);
      xpos = (v) => L + (b === a ? 0.5 : (f(LF.num(v)) - a) / (b - a)) * (W - L - R);
      xs = Array.from(new Set(vals)).sort((p, q) => p - q);
    } else {
      xs = Array.from(new Set(pts.map((p) => fmt.param(p.x)))).sort();
      xpos = (v) => L + ((xs.indexOf(fmt.param(v)) + 0.5) / xs.length) * (W - L - R);
    }
    const ys = pts.map((p) => p.y);
    const ylo = Math.min(...ys), yhi = Math.max(...ys);
    const ypos = (v) => T + (yhi === ylo ? 0.5 : 1 - (v - ylo) / (yhi - ylo)) * (H - T - B);
    root.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d1d5db" }));
    root.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d1d5db" }));
    xs.forEach((v) => {
      const t = svg("text", { x: xpos(v), y: H - B + 16, "text-anchor": "middle", "font-size": 11, fill: "#6b7280" });
      t.textContent = fmt.param(v);
      root.appendChild(t);
    });
    [ylo, yhi].forEach((v) => {
      const t = svg("text", { x: L - 6, y: ypos(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#6b7280" });
      t.textContent = v.toFixed(metric === "tokens_per_s" ? 0 : 3);
      root.appendChild(t);
    });
    pts.forEach((p) => {
      const c = svg("circle", { cx: xpos(p.x), cy: ypos(p.y), r: 5, fill: "#2563eb", "fill-opacity": 0.75,
                                "data-testid": "scatter-point" });
      if (p.r.id === sweep.best) c.setAttribute("class", "best");
      const title = svg("title", {});
      title.textContent = `${p.r.name}: ${p.y}`;
      c.appendChild(title);
      c.addEventListener("mouseenter", () => focusTrial(p.r.id));
      c.addEventListener("mouseleave", () => focusTrial(null));
      root.appendChild(c);
    });
    box.replaceChildren(root);
  }
  $("scatter-param").addEventListener("change", drawScatter);
  $("scatter-metric").addEventListener("change", drawScatter);

  // ---- actions -------------------------------------------------------------------------------
  function showError(message) {
    const e = $("action-error");
    e.textContent = message;
    e.hidden = !message;
  }

  async function cancelTrial(id, button) {
    button.disabled = true;
    const res = await LF.api(`/api/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    showError(res.ok ? "" : (res.body && res.body.error) || `HTTP ${res.status}`);
    refresh();
  }

  $("cancel-sweep").addEventListener("click", async (e) => {
    e.target.disabled = true;
    const res = await LF.api(`${api}/cancel`, { method: "POST" });
    showError(res.ok ? "" : (res.body && res.body.error) || `HTTP ${res.status}`);
    e.target.disabled = false;
    refresh();
  });

  // ---- data ----------------------------------------------------------------------------------
  function drawAll() {
    drawSummary();
    drawTable();
    drawChart();
    drawScatter();
    page.dataset.state = sweep.summary.state;
  }

  // Live: the feed of every job's events (SSE) says when one of this sweep's trials (or its
  // perplexity jobs) moved; the sweep is then re-read, at most once a second.
  let timer = null, last = 0;
  async function refresh() {
    clearTimeout(timer);
    timer = null;
    last = Date.now();
    const res = await LF.api(`${api}?curves=1`);
    if (res.ok) {
      sweep = res.body;
      drawAll();
    }
  }
  function refreshSoon() {
    if (timer) return;
    timer = setTimeout(refresh, Math.max(0, 1000 - (Date.now() - last)));
  }
  function ours(jobId) {
    return (sweep.rows || []).some((r) => r.id === jobId || r.eval_job === jobId);
  }
  drawAll();
  refresh();
  LF.liveFeed("/api/v1/live?types=state,train,eval", $("live-status"), (payload) => {
    if (sweep.finished) return;
    // A state change may be a perplexity job this page does not know yet: re-read on every one.
    if (payload.event && payload.event.type === "state" || ours(payload.job)) refreshSoon();
  }, refresh);
  window.addEventListener("resize", () => {
    if (plot) plot.setSize({ width: chartWidth($("sweep-chart")), height: 280 });
  });
})();
