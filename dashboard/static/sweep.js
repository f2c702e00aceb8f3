/* Sweep page: the trials table (sortable, best trial marked, cancel per trial), the packs its
   trials trained in, every loss curve on one uPlot chart (a hovered curve or table row is
   highlighted), a scatter of a parameter against a result, and Cancel sweep. Re-reads the
   sweep's API when the live feed says one of its trials moved. */
"use strict";

(function () {
  const page = document.querySelector('[data-testid="sweep-page"]');
  const $ = (testid) => page.querySelector(`[data-testid="${testid}"]`);
  const mine = page.dataset.mine === "yes";  // may this user cancel the sweep and its trials?
  const api = page.getAttribute("data-api");
  const jobUrl = page.getAttribute("data-job-url");
  let sweep = JSON.parse(document.getElementById("sweep-data").textContent);
  const varied = sweep.varied;  // in the sweep's order (the keys of `parameters` are sorted)
  // The pack column is there when the sweep packs (or did): sweep.html decides.
  const packColumn = Boolean(page.querySelector('th[data-sort="pack"]'));
  let sort = { key: null, dir: 1 };
  let plot = null, plotIds = [], plotRows = [];
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
      if (packColumn) {
        const pack = cell(r.pack || "", "num");
        pack.dataset.testid = "trial-pack";
        tr.appendChild(pack);
      }
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

  // ---- packs --------------------------------------------------------------------------------
  // "pack 2: 4 trials on gpu0 — a, b, c, d" (pack_head in dashboard/sweeps.py says the same).
  function packHead(p) {
    const n = p.trials.length;
    return `pack ${p.pack}: ${n} trial${n === 1 ? "" : "s"}` + (p.worker ? ` on ${p.worker}` : "");
  }

  function drawPacks() {
    const packs = sweep.packs || [];
    $("sweep-packs").hidden = !packs.length;
    $("pack-list").replaceChildren(...packs.map((p) => {
      const li = document.createElement("li");
      li.dataset.testid = "sweep-pack";
      li.dataset.pack = p.pack;
      li.dataset.running = p.running ? "yes" : "no";
      li.append(`${packHead(p)} — `);
      p.trials.forEach((name, i) => {
        const a = document.createElement("a");
        a.href = jobUrl.replace("JOB_ID", encodeURIComponent(p.jobs[i]));
        a.textContent = name;
        li.append(...(i ? [", ", a] : [a]));
      });
      if (p.running) {
        const note = document.createElement("span");
        note.className = "muted";
        note.textContent = "(training)";
        li.append(" ", note);
      }
      return li;
    }));
  }

  // ---- loss curves ---------------------------------------------------------------------------
  function chartWidth(el) { return Math.max(300, el.clientWidth || 600); }

  // The curves show the sweep's own metric (the one early stopping and the ★ best use: the
  // evaluation loss when every trial has an evaluation set) until the user picks another.
  const curveSelect = $("curve-metric");
  let curveChosen = false;
  const ownMetric = () => (sweep.metric === "eval_loss" ? "eval_loss" : "loss");
  const curveMetric = () => (curveChosen ? curveSelect.value : ownMetric());
  curveSelect.value = ownMetric();
  curveSelect.addEventListener("change", () => { curveChosen = true; drawChart(); });

  function drawChart() {
    const el = $("sweep-chart");
    const metric = curveMetric();
    const key = metric === "eval_loss" ? "eval_curve" : "curve";
    const rows = sweep.rows.filter((r) => r[key] && r[key].length);
    el.dataset.series = String(rows.length);
    el.dataset.metric = metric;
    if (typeof uPlot === "undefined" || !rows.length) {
      if (plot && !rows.length) { plot.destroy(); plot = null; plotIds = []; }
      return;
    }
    const steps = Array.from(new Set(rows.flatMap((r) => r[key].map((p) => p[0])))).sort((a, b) => a - b);
    const index = new Map(steps.map((s, i) => [s, i]));
    const data = [steps];
    rows.forEach((r) => {
      const ys = new Array(steps.length).fill(null);
      r[key].forEach(([s, v]) => { ys[index.get(s)] = v; });
      data.push(ys);
    });
    const ids = rows.map((r) => r.id);
    const plotKey = metric + ":" + ids.join();
    if (plot && plotKey === plotIds.join()) { LF.charts.update(plot, data); return; }
    if (plot) plot.destroy();
    plotIds = [plotKey];
    plotRows = ids;
    plot = new uPlot({
      width: chartWidth(el), height: 280,
      focus: { alpha: 0.25 },
      cursor: { focus: { prox: 24 } },
      legend: { show: rows.length <= 12 },
      scales: { x: LF.charts.stepScale(), y: { range: LF.charts.valueRange(false) } },
      axes: [LF.charts.stepAxis(), { label: metric === "eval_loss" ? "evaluation loss" : "training loss" }],
      hooks: LF.charts.zoomHooks(el),
      // Evaluation losses are a few points each: they are marked.
      series: [{ label: "step" }].concat(rows.map((r, i) => Object.assign({
        label: r.name, stroke: COLORS[i % COLORS.length], spanGaps: true,
        width: r.id === sweep.best ? 2.5 : 1.2,
      }, metric === "eval_loss" ? { points: { show: true } } : {}))),
    }, data, el);
  }

  function focusTrial(id) {
    page.querySelectorAll('[data-testid="trial-row"]').forEach((tr) =>
      tr.classList.toggle("hover", tr.dataset.jobId === id));
    if (!plot) return;
    const i = plotRows.indexOf(id);
    plot.setSeries(i >= 0 ? i + 1 : null, { focus: i >= 0 });
  }

  // ---- scatter -------------------------------------------------------------------------------
  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
    return e;
  }

  /* About `n` round tick values covering lo..hi (1, 2 or 5 times a power of ten apart). */
  function niceTicks(lo, hi, n) {
    const raw = (hi - lo) / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((x) => x >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function text(x, y, label, attrs) {
    const t = svg("text", Object.assign({ x: x, y: y, "font-size": 11, fill: "#6b7280" }, attrs || {}));
    t.textContent = label;
    return t;
  }

  // The scatter starts on the sweep's own metric, as the curves do.
  $("scatter-metric").value = sweep.metric === "eval_loss" ? "best_eval_loss" : "final_loss";

  function drawScatter() {
    const box = $("scatter");
    const param = $("scatter-param").value;
    const metricSel = $("scatter-metric");
    const metric = metricSel.value;
    const metricLabel = metricSel.options[metricSel.selectedIndex].textContent;
    const pts = sweep.rows.map((r) => ({ r: r, x: r.params[param], y: LF.num(r[metric]) }))
      .filter((p) => p.y !== null && p.x !== undefined);
    // Room for the tick labels and the axis titles inside the picture (nothing is clipped);
    // points keep PAD pixels from the plot's edges, so their labels fit too.
    const W = 560, H = 280, L = 78, B = 52, T = 12, R = 28, PAD = 14;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, "data-points": String(pts.length) });
    root.appendChild(text(L + (W - L - R) / 2, H - 8, param,
      { "text-anchor": "middle", "font-size": 12, fill: "#374151", "data-testid": "scatter-x-title" }));
    root.appendChild(text(14, T + (H - T - B) / 2, metricLabel,
      { "text-anchor": "middle", "font-size": 12, fill: "#374151", "data-testid": "scatter-y-title",
        transform: `rotate(-90 14 ${T + (H - T - B) / 2})` }));
    root.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d1d5db" }));
    root.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d1d5db" }));
    if (!pts.length) {
      root.appendChild(text((L + W - R) / 2, (T + H - B) / 2, "no results yet", { "text-anchor": "middle" }));
      box.replaceChildren(root);
      return;
    }
    const x0 = L + PAD, x1 = W - R - PAD;
    const numeric = pts.every((p) => LF.num(p.x) !== null);
    let xs, xpos;
    if (numeric) {
      const vals = pts.map((p) => LF.num(p.x));
      const lo = Math.min(...vals), hi = Math.max(...vals);
      const log = lo > 0 && hi / lo >= 10;
      const f = log ? Math.log10 : (v) => v;
      const a = f(lo), b = f(hi);
      xpos = (v) => x0 + (b === a ? 0.5 : (f(LF.num(v)) - a) / (b - a)) * (x1 - x0);
      xs = Array.from(new Set(vals)).sort((p, q) => p - q);
    } else {
      xs = Array.from(new Set(pts.map((p) => fmt.param(p.x)))).sort();
      xpos = (v) => x0 + ((xs.indexOf(fmt.param(v)) + 0.5) / xs.length) * (x1 - x0);
    }
    const ys = pts.map((p) => p.y);
    let ylo = Math.min(...ys), yhi = Math.max(...ys);
    if (ylo === yhi) { const a = Math.abs(ylo) / 2 || 1; ylo -= a; yhi += a; }
    const span = yhi - ylo;
    ylo -= span * 0.08; yhi += span * 0.08;
    const ypos = (v) => T + (1 - (v - ylo) / (yhi - ylo)) * (H - T - B);
    xs.forEach((v) => {
      const x = xpos(v);
      root.appendChild(svg("line", { x1: x, y1: H - B, x2: x, y2: H - B + 4, stroke: "#9ca3af" }));
      root.appendChild(text(x, H - B + 17, fmt.param(v), { "text-anchor": "middle", "data-testid": "scatter-x-tick" }));
    });
    const yticks = niceTicks(ylo, yhi, 4);
    const digits = Math.max(0, Math.min(6, -Math.floor(Math.log10((yticks[1] - yticks[0]) || 1))));
    yticks.forEach((v) => {
      const y = ypos(v);
      root.appendChild(svg("line", { x1: L - 4, y1: y, x2: W - R, y2: y, stroke: "#f3f4f6" }));
      root.appendChild(text(L - 7, y + 4, v.toFixed(metric === "tokens_per_s" ? 0 : digits),
        { "text-anchor": "end", "data-testid": "scatter-y-tick" }));
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
    drawPacks();
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
  // The sweep's own changes (cancelled, finished: dispatcher/schedule/sweeps/store.py SweepStore.announce)
  // come as events of type "sweep": no job event follows a sweep's end.
  LF.liveFeed("/api/v1/live?types=state,train,eval,sweep", $("live-status"), (payload) => {
    if (payload.sweep === sweep.id) { refreshSoon(); return; }
    if (sweep.finished) return;
    // A state change may be a perplexity job this page does not know yet: re-read on every one.
    if (payload.event && payload.event.type === "state" || ours(payload.job)) refreshSoon();
  }, refresh);
  window.addEventListener("resize", () => {
    if (plot) plot.setSize({ width: chartWidth($("sweep-chart")), height: 280 });
  });
})();
