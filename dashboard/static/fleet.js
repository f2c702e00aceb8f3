/* Fleet page: the workers table refreshes when a job changes state (live feed) or on Refresh. */
"use strict";

(function () {
  const body = document.getElementById("workers-body");
  const empty = document.getElementById("workers-empty");
  const refresh = document.getElementById("refresh-workers");
  const status = document.querySelector('[data-testid="live-status"]');

  function td(col, text) {
    const el = document.createElement("td");
    el.dataset.col = col;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function row(w) {
    const tr = document.createElement("tr");
    tr.setAttribute("data-testid", "worker-row");
    tr.dataset.worker = w.name;
    tr.appendChild(td("name", w.name));
    tr.appendChild(td("host", w.host || ""));
    tr.appendChild(td("card", w.card || w.device || ""));
    tr.appendChild(td("memory", LF.num(w.mem_total_mb)
      ? `${LF.fmtMB(w.mem_free_mb)} / ${LF.fmtMB(w.mem_total_mb)}` : ""));
    const st = td("state");
    const badge = document.createElement("span");
    badge.setAttribute("data-testid", "worker-state");
    LF.setBadge(badge, w.state || "unknown");
    st.appendChild(badge);
    tr.appendChild(st);
    const job = td("job");
    if (w.job) {
      const a = document.createElement("a");
      a.href = `/jobs/${encodeURIComponent(w.job)}`;
      a.textContent = w.job;
      job.appendChild(a);
    }
    tr.appendChild(job);
    const seen = td("seen", LF.fmtTime(w.seen));
    seen.dataset.ts = w.seen;
    tr.appendChild(seen);
    return tr;
  }

  async function reload() {
    const res = await LF.api(refresh.dataset.api);
    if (!res.ok) return;
    body.replaceChildren(...res.body.workers.map(row));
    empty.hidden = res.body.workers.length > 0;
  }

  refresh.addEventListener("click", (e) => {
    e.preventDefault();
    reload();
  });
  body.querySelectorAll('[data-col="seen"]').forEach((c) => {
    if (c.dataset.ts) c.textContent = LF.fmtTime(c.dataset.ts);
  });
  let timer = null;
  LF.liveFeed("/api/v1/live?types=state", status, () => {
    // Workers pick up and finish jobs on state changes; let their heartbeat land first.
    clearTimeout(timer);
    timer = setTimeout(reload, 500);
  });
})();
