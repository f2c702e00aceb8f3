/* Job page: replays and follows the job's event stream (SSE), draws the charts with uPlot,
   keeps the stats, the log tail and the Stop / Download controls in step with the job. */
"use strict";

(function () {
  const page = document.querySelector('[data-testid="job-page"]');
  const job = JSON.parse(document.getElementById("job-data").textContent);
  const $ = (testid) => page.querySelector(`[data-testid="${testid}"]`);
  const LOG_LINES = 200;
  const mine = page.dataset.mine === "yes";  // may this user stop or re-prioritise the job?

  const train = new Map();  // step -> {loss, lr}
  const evals = new Map();  // step -> eval loss
  const logLines = [];
  let state = job.state;
  let lossPlot = null, lrPlot = null;
  let flushPending = false, logDirty = false;

  // ---- state and controls ----------------------------------------------------------------
  function setState(newState, reason) {
    state = newState;
    page.dataset.state = newState;
    LF.setBadge($("job-state"), newState);
    const stop = $("stop-button");
    const terminal = LF.TERMINAL.includes(newState);
    stop.hidden = terminal || !mine;
    if (!terminal && !stop.dataset.stopping) {
      stop.textContent = (newState === "queued" || newState === "retrying") ? "Cancel" : "Stop";
      stop.disabled = false;
    }
    if (terminal) {
      $("stop-requested").hidden = true;
      const eta = $("stat-eta");  // training jobs only
      if (eta) eta.textContent = "—";
    }
    const r = $("job-reason");
    if (reason !== undefined) r.textContent = reason || "";
    r.className = `reason state-${newState}`;
    r.hidden = !r.textContent || !["failed", "cancelled", "retrying"].includes(newState);
  }

  function drawHistory(history) {
    const body = $("state-history").querySelector("tbody");
    body.replaceChildren(...history.map((h) => {
      const tr = document.createElement("tr");
      const when = document.createElement("td");
      when.textContent = LF.fmtTime(h.time);
      const st = document.createElement("td");
      const badge = document.createElement("span");
      badge.setAttribute("data-testid", "history-state");
      LF.setBadge(badge, h.state);
      st.appendChild(badge);
      const why = document.createElement("td");
      why.textContent = h.reason || "";
      tr.append(when, st, why);
      return tr;
    }));
  }

  // A sweep's trial in a pack: " · pack 2: trained together with a, b, c" (as job.html).
  function drawPack(rec) {
    const box = $("job-pack");
    if (!box || !Array.isArray(rec.pack_mates)) return;
    const jobUrl = $("job-sweep").dataset.jobUrl;
    box.replaceChildren();
    box.hidden = !rec.pack_mates.length;
    if (!rec.pack_mates.length) return;
    box.append(` · pack ${rec.pack}: trained together with `);
    rec.pack_mates.forEach((m, i) => {
      const a = document.createElement("a");
      a.href = jobUrl.replace("JOB_ID", encodeURIComponent(m.id));
      a.textContent = m.name;
      box.append(...(i ? [", ", a] : [a]));
    });
  }

  function applyRecord(rec) {
    $("job-worker").textContent = rec.worker || "—";
    $("job-owner").textContent = rec.owner || "";
    setState(rec.state, rec.reason);
    $("download-lora").hidden = !rec.lora_available;
    const tryIt = $("try-it");
    if (tryIt) tryIt.hidden = !(rec.lora_available && ["succeeded", "cancelled"].includes(rec.state));
    if (rec.stop_requested && !LF.TERMINAL.includes(rec.state)) showStopping();
    if (Array.isArray(rec.history)) drawHistory(rec.history);
    drawPack(rec);
    const sel = $("priority-select");
    if (rec.priority) sel.value = rec.priority;
    sel.disabled = !mine || !["queued", "retrying"].includes(rec.state);
    if (rec.position !== undefined) {
      $("queue-position").textContent = rec.position ? `· #${rec.position} in the queue` : "";
    }
    document.dispatchEvent(new CustomEvent("lf:job-record", { detail: rec }));  // job_summary.js
  }

  $("priority-select").addEventListener("change", async (e) => {
    const err = $("action-error");
    err.hidden = true;
    const res = await LF.api(e.target.dataset.url, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ priority: e.target.value }),
    });
    if (!res.ok) {
      err.textContent = (res.body && res.body.error) || `HTTP ${res.status}`;
      err.hidden = false;
    }
    refreshRecord();
  });

  let recordTimer = null;
  function scheduleRecordRefresh() {
    // A replay brings several state events at once; fetch the record once after them.
    clearTimeout(recordTimer);
    recordTimer = setTimeout(refreshRecord, 150);
  }

  async function refreshRecord() {
    const res = await LF.api(page.dataset.jobApi);
    if (res.ok) applyRecord(res.body);
  }

  function showStopping() {
    const stop = $("stop-button");
    stop.dataset.stopping = "1";
    stop.disabled = true;
    stop.textContent = "Stopping…";
    $("stop-requested").hidden = false;
  }

  $("stop-button").addEventListener("click", async () => {
    const stop = $("stop-button");
    const err = $("action-error");
    err.hidden = true;
    stop.disabled = true;
    const res = await LF.api(page.dataset.cancelUrl, { method: "POST" });
    if (!res.ok) {
      stop.disabled = false;
      err.textContent = (res.body && res.body.error) || `HTTP ${res.status}`;
      err.hidden = false;
      return;
    }
    if (res.body.stop_requested) showStopping();
    applyRecord(Object.assign({ lora_available: false }, res.body));
  });

  // ---- stats -------------------------------------------------------------------------------
  function setStats(ev) {
    const total = LF.num(ev.total_steps);
    if (LF.num(ev.step) !== null) {
      $("stat-step").textContent = total ? `${ev.step} / ${total}` : String(ev.step);
      $("job-progress").style.width = `${LF.pct(ev.step, total).toFixed(1)}%`;
    }
    if (LF.num(ev.epoch) !== null) $("stat-epoch").textContent = LF.num(ev.epoch).toFixed(2);
    if (LF.num(ev.loss) !== null) $("stat-loss").textContent = LF.fmtLoss(ev.loss);
    if (LF.num(ev.tokens_per_s) !== null) {
      $("stat-tokens").textContent = Math.round(LF.num(ev.tokens_per_s)).toLocaleString();
    }
    if (ev.eta_s !== undefined) $("stat-eta").textContent = LF.fmtDuration(ev.eta_s) || "—";
    if (LF.num(ev.gpu_mem_mb) !== null) $("stat-gpu-mem").textContent = LF.fmtMB(ev.gpu_mem_mb);
  }

  // ---- charts ------------------------------------------------------------------------------
  function chartWidth(el) {
    return Math.max(280, el.clientWidth || el.parentElement.clientWidth - 32 || 600);
  }

  // Loss chart controls: EMA smoothing (0 = none), log scale (the plot is rebuilt for it).
  const smoothInput = $("loss-smoothing"), logInput = $("loss-log");
  const smoothing = () => (smoothInput ? Number(smoothInput.value) || 0 : 0);
  const logScale = () => Boolean(logInput && logInput.checked);

  // Series: 1 raw training loss (faint), 2 eval loss (dots), 3 smoothed training loss.
  function lossData() {
    const steps = Array.from(new Set([...train.keys(), ...evals.keys()])).sort((a, b) => a - b);
    // A log scale cannot show 0 or less: such values are left out rather than break the axis.
    const y = (v) => (v === null || v === undefined || (logScale() && v <= 0) ? null : v);
    const raw = steps.map((s) => y(train.has(s) ? train.get(s).loss : null));
    return [steps, raw, steps.map((s) => y(evals.has(s) ? evals.get(s) : null)),
            LF.charts.ema(raw, smoothing())];
  }

  function lrData() {
    const steps = Array.from(train.keys()).filter((s) => train.get(s).lr !== null).sort((a, b) => a - b);
    return [steps, steps.map((s) => train.get(s).lr)];
  }

  function makeLossPlot(el) {
    const log = logScale();
    el.dataset.scale = log ? "log" : "linear";
    return new uPlot({
      width: chartWidth(el), height: 260,
      scales: { x: LF.charts.stepScale(), y: { distr: log ? 3 : 1, range: LF.charts.valueRange(log) } },
      axes: [LF.charts.stepAxis(), { label: log ? "loss (log scale)" : "loss", size: 60,
                                     values: LF.charts.recordTicks("yTicks", (t) => String(Number(t.toPrecision(4)))) }],
      cursor: { drag: { x: true, y: false, setScale: true } },  // drag to zoom, double-click resets
      hooks: LF.charts.zoomHooks(el),
      series: [
        { label: "step" },
        { label: "loss", stroke: "rgba(37, 99, 235, 0.25)", width: 1, spanGaps: true },
        { label: "eval loss", stroke: "#dc2626", width: 0, paths: () => null,
          points: { show: true, size: 8, stroke: "#dc2626", fill: "#fca5a5" } },
        { label: "smoothed", stroke: "#2563eb", width: 1.5, spanGaps: true },
      ],
    }, lossData(), el);
  }

  function makeLrPlot(el) {
    return new uPlot({
      width: chartWidth(el), height: 200,
      scales: { x: LF.charts.stepScale(), y: { range: LF.charts.valueRange(false) } },
      axes: [LF.charts.stepAxis(), { label: "learning rate", size: 70,
                                  values: LF.charts.recordTicks("yTicks", (t) => t.toExponential(1)) }],
      hooks: LF.charts.zoomHooks(el),
      series: [{ label: "step" }, { label: "lr", stroke: "#059669", width: 1.5 }],
    }, lrData(), el);
  }

  if (smoothInput) {
    smoothInput.addEventListener("input", () => {
      $("loss-smoothing-value").textContent = smoothing().toFixed(2);
      drawCharts();
    });
  }
  if (logInput) {
    logInput.addEventListener("change", () => {
      if (lossPlot) { lossPlot.destroy(); lossPlot = null; }
      drawCharts();
    });
  }

  // The number of non-empty values of series `i` that a plot holds (0 without a plot).
  function drawnPoints(plot, i) {
    return plot ? plot.data[i].filter((v) => v !== null && v !== undefined).length : 0;
  }

  function drawCharts() {
    const lossEl = $("loss-chart"), lrEl = $("lr-chart");
    if (!lossEl) return;  // evaluation and generation jobs have no training charts
    const ld = lossData(), rd = lrData();
    // Without uPlot (its script failed to load) nothing is drawn, and the counts stay at 0.
    if (ld[0].length && typeof uPlot !== "undefined") {
      if (!lossPlot) lossPlot = makeLossPlot(lossEl); else LF.charts.update(lossPlot, ld);
    }
    if (rd[0].length && typeof uPlot !== "undefined") {
      if (!lrPlot) lrPlot = makeLrPlot(lrEl); else LF.charts.update(lrPlot, rd);
    }
    document.getElementById("loss-empty").hidden = ld[0].length > 0;
    document.getElementById("lr-empty").hidden = rd[0].length > 0;
    // What the charts hold, not what arrived: the page's own record of points drawn.
    lossEl.dataset.points = String(drawnPoints(lossPlot, 1));
    lossEl.dataset.evalPoints = String(drawnPoints(lossPlot, 2));
    const smoothed = lossPlot ? lossPlot.data[3].filter((v) => v !== null) : [];
    lossEl.dataset.smoothedLast = smoothed.length ? String(smoothed[smoothed.length - 1]) : "";
    lrEl.dataset.points = String(drawnPoints(lrPlot, 1));
  }

  window.addEventListener("resize", () => {
    if (lossPlot) lossPlot.setSize({ width: chartWidth($("loss-chart")), height: 260 });
    if (lrPlot) lrPlot.setSize({ width: chartWidth($("lr-chart")), height: 200 });
  });

  // ---- log tail ----------------------------------------------------------------------------
  function addLog(ev, text, cls) {
    logLines.push({ text: `${LF.fmtTime(ev.time)}  ${text}`, cls: cls || "" });
    if (logLines.length > LOG_LINES) logLines.splice(0, logLines.length - LOG_LINES);
    logDirty = true;
  }

  function drawLog() {
    const box = $("log-tail");
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 30;
    const frag = document.createDocumentFragment();
    logLines.forEach((l) => {
      const div = document.createElement("div");
      div.className = `line ${l.cls}`;
      div.textContent = l.text;
      frag.appendChild(div);
    });
    box.replaceChildren(frag);
    box.dataset.lines = String(logLines.length);
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  function addWarning(message) {
    const list = $("job-warnings");
    const li = document.createElement("li");
    li.textContent = message;
    list.appendChild(li);
    list.hidden = false;
  }

  // ---- results of evaluation and generation jobs --------------------------------------------
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function showResult(r) {
    const body = $("result-body");
    if (!body || !r) return;
    const out = [];
    if (job.kind === "evaluate") {
      const bar = $("eval-progress");
      if (bar && !r.stopped) bar.style.width = "100%";
      const ppl = LF.num(r.perplexity);
      out.push(el("p", { class: "big", "data-testid": "perplexity" }, ppl === null ? "—" : ppl.toFixed(4)));
      if (r.skipped) out.push(el("p", { class: "notice" }, r.reason || "skipped"));
      else {
        out.push(el("p", { class: "muted" },
          `${r.tokens} tokens scored in ${r.windows} windows (max_length ${r.max_length}, ` +
          `stride ${r.stride})${r.stopped ? " — stopped early: partial value" : ""}`));
      }
      const link = el("a", { href: "/evaluations" }, "All evaluations");
      out.push(link);
    } else {
      out.push(...LF.answersView(r, job.spec.lora));
    }
    body.replaceChildren(...out);
  }
  if (job.result) showResult(job.result);

  // ---- Try it: a generation job with this LoRA, followed here until its answers arrive -----
  const tryForm = $("try-form");
  if (tryForm) LF.tryForm(tryForm, $("try-result"));

  // A training job that continues an existing LoRA says so (the engine's "continues" event).
  function showContinues(c) {
    const box = $("job-continues");
    if (!box || !c || !c.lora) return;
    const from = LF.num(c.step) === null ? "from its saved weights" : `from step ${c.step}`;
    box.textContent = `continues LoRA ${c.lora} ${from}`;
    box.hidden = false;
  }

  // ---- events ------------------------------------------------------------------------------
  function scheduleFlush() {
    // Many events arrive at once on a replay: draw once per burst, not once per event.
    if (flushPending) return;
    flushPending = true;
    setTimeout(() => {
      flushPending = false;
      drawCharts();
      if (logDirty) { logDirty = false; drawLog(); }
    }, 30);
  }

  function handle(ev) {
    switch (ev.type) {
      case "train": {
        const step = LF.num(ev.step);
        if (step === null) break;
        train.set(step, { loss: LF.num(ev.loss), lr: LF.num(ev.learning_rate) });
        setStats(ev);
        break;
      }
      case "eval": {
        const step = LF.num(ev.step), loss = LF.num(ev.eval_loss);
        if (step !== null && loss !== null) evals.set(step, loss);
        // Not logged here: the trainer's own log line says it once ("Step N: eval loss").
        break;
      }
      case "state":
        setState(ev.state, ev.reason);
        addLog(ev, `state → ${ev.state}${ev.reason ? ` (${ev.reason})` : ""}`, "state");
        scheduleRecordRefresh();
        break;
      case "log":
        addLog(ev, String(ev.line === undefined ? "" : ev.line));
        break;
      case "priority":
        scheduleRecordRefresh();
        break;
      case "continues":
        showContinues(ev);
        break;
      case "warning":
        addLog(ev, `warning: ${ev.message}`, "warn");
        addWarning(ev.message);
        break;
      case "result":
        addLog(ev, `result: ${JSON.stringify(Object.assign({}, ev, { type: undefined, time: undefined, id: undefined }))}`);
        showResult(ev);
        break;
      case "eval_progress": {
        const bar = $("eval-progress");
        if (bar) bar.style.width = `${LF.pct(ev.window, ev.windows).toFixed(1)}%`;
        break;
      }
      default:
        break;
    }
    scheduleFlush();
  }

  const statusEl = $("stream-status");
  const es = new EventSource(page.dataset.eventsUrl);
  es.addEventListener("open", () => {
    page.dataset.stream = "live";
    LF.setLiveStatus(statusEl, "live", "live");
  });
  es.addEventListener("message", (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    handle(ev);
  });
  es.addEventListener("end", () => {
    es.close();
    page.dataset.stream = "ended";
    LF.setLiveStatus(statusEl, "ended", "finished");
    scheduleFlush();
    refreshRecord();
  });
  es.addEventListener("error", () => {
    if (page.dataset.stream === "ended") return;
    if (es.readyState === EventSource.CLOSED) {  // refused (429 past the live-view caps)
      page.dataset.stream = "refused";
      LF.setLiveStatus(statusEl, "refused", LF.refusedText);
      return;
    }
    page.dataset.stream = "reconnecting";
    LF.setLiveStatus(statusEl, "reconnecting", "reconnecting…");
  });
})();
