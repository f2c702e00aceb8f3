/* Helpers shared by the dashboard's pages (no framework; formats match dashboard/filters.py). */
"use strict";

window.LF = (function () {
  const TERMINAL = ["succeeded", "failed", "cancelled"];

  function num(v) {
    if (v === null || v === undefined || v === "") return null;
    const n = Number(v);
    return Number.isFinite(n) ? n : null;
  }

  function fmtDuration(seconds) {
    const n = num(seconds);
    if (n === null || n < 0) return "";
    const s = Math.round(n);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    const pad = (x) => String(x).padStart(2, "0");
    return h ? `${h}:${pad(m)}:${pad(sec)}` : `${m}:${pad(sec)}`;
  }

  function fmtTime(ts) {
    const n = num(ts);
    if (n === null) return "";
    const d = new Date(n * 1000);
    const pad = (x) => String(x).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function fmtLoss(v) {
    const n = num(v);
    return n === null ? "" : n.toFixed(4);
  }

  function fmtMB(v) {
    const n = num(v);
    if (n === null) return "";
    return n >= 1024 ? `${(n / 1024).toFixed(1)} GiB` : `${Math.round(n)} MiB`;
  }

  function pct(step, total) {
    const s = num(step), t = num(total);
    if (s === null || t === null || t <= 0) return 0;
    return Math.max(0, Math.min(100, (100 * s) / t));
  }

  function setBadge(el, state) {
    if (!el) return;
    el.className = `badge state-${state}`;
    el.dataset.state = state;
    el.textContent = state;
  }

  // Every request that changes something carries the session's CSRF token (dashboard/auth.py).
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const CSRF = csrfMeta ? csrfMeta.content : "";

  async function api(url, options) {
    const opts = Object.assign({}, options || {});
    const headers = Object.assign({ Accept: "application/json" }, opts.headers || {});
    if (opts.method && opts.method.toUpperCase() !== "GET") headers["X-CSRF-Token"] = CSRF;
    opts.headers = headers;
    const resp = await fetch(url, opts);
    let body = null;
    try { body = await resp.json(); } catch (e) { body = { error: `HTTP ${resp.status}` }; }
    return { ok: resp.ok, status: resp.status, body: body };
  }

  function setLiveStatus(el, state, text) {
    if (!el) return;
    el.dataset.state = state;
    el.textContent = text;
  }

  const refusedText = "live updates refused (too many live views open? close some tabs, " +
    "then reload)";

  /* An EventSource on the live feed that reports its connection state in `statusEl`. */
  function liveFeed(url, statusEl, onJobEvent, onOpen) {
    const es = new EventSource(url);
    es.addEventListener("open", () => {
      setLiveStatus(statusEl, "live", "live");
      if (onOpen) onOpen();
    });
    es.addEventListener("error", () => {
      // A refused stream (429: too many live views open, or 401/503) is closed for good by
      // the browser; a dropped one reconnects by itself.
      if (es.readyState === EventSource.CLOSED) {
        setLiveStatus(statusEl, "refused", refusedText);
      } else {
        setLiveStatus(statusEl, "reconnecting", "reconnecting…");
      }
    });
    es.addEventListener("job", (m) => {
      let payload;
      try { payload = JSON.parse(m.data); } catch (e) { return; }
      onJobEvent(payload);
    });
    return es;
  }

  return { TERMINAL, num, fmtDuration, fmtTime, fmtLoss, fmtMB, pct, setBadge, api,
           setLiveStatus, liveFeed, refusedText };
})();

// Server-rendered progress: the width comes as data-pct, since the Content-Security-Policy
// refuses style="" attributes (a style set from a script is allowed).
document.querySelectorAll(".bar[data-pct]").forEach((b) => {
  b.style.width = `${b.dataset.pct}%`;
});
