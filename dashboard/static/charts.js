/* Chart helpers shared by the Job and Sweep pages (uPlot): step axes with whole-number ticks,
   value ranges that stay sane with a single point, TensorBoard's debiased exponential moving
   average, and drag-to-zoom that survives live updates. */
"use strict";

window.LF = window.LF || {};

LF.charts = (function () {
  // Steps are whole numbers: ticks only every 1, 2, 5, 10, 20, 50, ... steps (no 0.2, 1.5).
  const STEP_INCRS = [];
  for (let e = 0; e <= 9; e++) [1, 2, 5].forEach((m) => STEP_INCRS.push(m * 10 ** e));

  /* An axis `values` function that also records the labels it drew on the chart's element
     (data-x-ticks, data-y-ticks): the canvas itself cannot be read back as text. */
  function recordTicks(attr, format) {
    return (u, ticks) => {
      // uPlot passes null for a tick it leaves unlabelled (a log scale's crowded ones).
      const labels = ticks.map((t) => (t === null || t === undefined ? null : format(t)));
      const el = u.root.parentElement;
      if (el) el.dataset[attr] = labels.filter((l) => l !== null).join(" ");
      return labels;
    };
  }

  function stepAxis() {
    return { label: "step", incrs: STEP_INCRS, values: recordTicks("xTicks", (t) => String(Math.round(t))) };
  }

  /* The x scale of steps: the data's own extent; one step alone gets a step either side. */
  function stepScale() {
    return { time: false,
             range: (u, min, max) => (min === max ? [Math.max(0, min - 1), max + 1] : [min, max]) };
  }

  /* A y range: uPlot's own with padding, but one value (or a flat line) gets a range around
     it rather than 0-100; `log`: for a log-scale axis. */
  function valueRange(log) {
    return (u, min, max) => {
      if (min === null || max === null || !Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
      if (min === max) {
        if (min === 0) return [0, 1];
        const a = Math.abs(min);
        return log ? [min / 2, min * 2] : [min - a / 2, min + a / 2];
      }
      return log ? uPlot.rangeLog(min, max, 10, true) : uPlot.rangeNum(min, max, 0.1, true);
    };
  }

  /* TensorBoard's smoothing: an exponential moving average debiased for its zero start (so the
     first points are not pulled toward 0). weight 0 = the raw values; empty values stay empty. */
  function ema(values, weight) {
    if (!(weight > 0)) return values.slice();
    let last = 0, n = 0;
    return values.map((v) => {
      if (v === null || v === undefined || !Number.isFinite(v)) return null;
      last = last * weight + (1 - weight) * v;
      n += 1;
      return last / (weight === 1 ? 1 : 1 - Math.pow(weight, n));
    });
  }

  /* Drag-to-zoom (uPlot's cursor drag on x; a double-click resets it) that a live update does
     not undo: `zoomed(u)` says whether the x scale shows less than all the data. The element
     records the visible range in data-x-min / data-x-max and data-zoomed. */
  function zoomHooks(el) {
    return {
      setScale: [(u, key) => {
        if (key !== "x") return;
        el.dataset.xMin = String(u.scales.x.min);
        el.dataset.xMax = String(u.scales.x.max);
        el.dataset.zoomed = zoomed(u) ? "1" : "0";
      }],
    };
  }

  function zoomed(u) {
    const xs = u.data[0];
    if (!xs || !xs.length || u.scales.x.min === null || u.scales.x.min === undefined) return false;
    return u.scales.x.min > xs[0] || u.scales.x.max < xs[xs.length - 1];
  }

  /* New data for a plot, keeping the user's zoom (uPlot re-ranges the scales otherwise). */
  function update(u, data) {
    u.setData(data, !zoomed(u));
  }

  return { STEP_INCRS, recordTicks, stepAxis, stepScale, valueRange, ema, zoomHooks, zoomed, update };
})();
