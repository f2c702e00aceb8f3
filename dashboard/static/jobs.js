/* Jobs page: rows update from the live SSE feed (no timers). The page shows one page of the
   list (its filters and offset in the table's data-api-query); a job not on it shows up when
   the page is read again, if it belongs there. */
"use strict";

(function () {
  const body = document.getElementById("jobs-body");
  const template = document.getElementById("job-row-template");
  const empty = document.getElementById("jobs-empty");
  const status = document.querySelector('[data-testid="live-status"]');
  const count = document.querySelector('[data-testid="jobs-count"]');
  const query = document.querySelector('[data-testid="jobs-table"]').dataset.apiQuery || "";
  const jobUrl = (id) => `/jobs/${encodeURIComponent(id)}`;
  const apiUrl = (id) => `/api/v1/jobs/${encodeURIComponent(id)}`;

  // The newest training progress seen on the feed per job: a record fetched a moment later
  // may not have caught up with it yet, and must not move a row backwards.
  const live = new Map();

  function withLive(job) {
    const p = live.get(job.id);
    if (!p || (LF.num(job.step) || 0) > p.step) return job;
    return Object.assign({}, job, p);
  }

  function rowFor(id) {
    return body.querySelector(`tr[data-job-id="${CSS.escape(id)}"]`);
  }

  function cell(tr, col) {
    return tr.querySelector(`[data-col="${col}"]`);
  }

  function fill(tr, job) {
    tr.dataset.jobId = job.id;
    const name = cell(tr, "name").querySelector("a");
    name.href = jobUrl(job.id);
    if (job.name !== undefined) name.textContent = job.name || "(unnamed)";
    const id = cell(tr, "id").querySelector("a");
    id.href = jobUrl(job.id);
    id.textContent = job.id;
    if (job.state) LF.setBadge(cell(tr, "state").querySelector(".badge"), job.state);
    if (job.owner !== undefined) cell(tr, "owner").textContent = job.owner;
    if (job.step !== undefined || job.total_steps !== undefined) {
      progress(tr, job.step, job.total_steps);
    }
    if (job.loss !== undefined) cell(tr, "loss").textContent = LF.fmtLoss(job.loss);
    if (job.kind !== undefined) kindAndResult(tr, job);
    const state = job.state || cell(tr, "state").querySelector(".badge").dataset.state;
    if (job.eta_s !== undefined || job.state) {
      cell(tr, "eta").textContent = state === "running" ? LF.fmtDuration(job.eta_s) : "";
    }
    if (job.position !== undefined) {
      // Only queued and retrying jobs have a place in the queue (GET /api/v1/jobs).
      cell(tr, "position").textContent = job.position ? `#${job.position}` : "";
      cell(tr, "start").textContent = !job.position ? "" : job.estimated_start_s === null
        ? "no card fits" : `~${LF.fmtDuration(job.estimated_start_s)}`;
    }
    if (job.worker !== undefined) cell(tr, "worker").textContent = job.worker || "";
    if (job.created !== undefined) {
      const c = cell(tr, "created");
      c.dataset.ts = job.created;
      c.textContent = LF.fmtTime(job.created);
    }
  }

  // Issue 11, points 7 and 20: evaluation and generation jobs have no steps, so they show
  // no bar but their result; every job shows how long it ran.
  function kindAndResult(tr, job) {
    cell(tr, "kind").textContent = job.kind;
    cell(tr, "progress").querySelector(".progress").hidden = job.kind !== "train";
    const res = cell(tr, "result");
    const text = job.outcome || "";
    if (text.startsWith("answered")) {
      const a = document.createElement("a");
      a.href = `${jobUrl(job.id)}#job-result`;
      a.textContent = text;
      res.replaceChildren(a);
    } else {
      res.textContent = text;
    }
    cell(tr, "duration").textContent = LF.fmtDuration(job.duration_s);
  }

  function progress(tr, step, total) {
    const p = cell(tr, "progress");
    p.querySelector(".bar").style.width = `${LF.pct(step, total).toFixed(1)}%`;
    const t = LF.num(total);
    p.querySelector(".progress-text").textContent = t ? `${LF.num(step) || 0} / ${t}` : "";
  }

  async function refreshRow(id) {
    const res = await LF.api(apiUrl(id));
    if (!res.ok) return;
    const tr = rowFor(id);
    if (tr) fill(tr, withLive(res.body));
  }

  async function refreshAll() {
    // Read this page again (after reconnecting, or when jobs came, went or changed state):
    // one fetch, no timer. Rows keep their elements; the order is the server's.
    const res = await LF.api(`/api/v1/jobs?${query}`);
    if (!res.ok) return;
    const rows = res.body.jobs.map((job) => {
      const tr = rowFor(job.id) || template.content.firstElementChild.cloneNode(true);
      fill(tr, withLive(job));
      return tr;
    });
    body.replaceChildren(...rows);
    empty.hidden = rows.length > 0;
    if (count && res.body.total !== undefined && res.body.total !== LF.num(count.dataset.total)) {
      const offset = Number(new URLSearchParams(query).get("offset")) || 0;
      const total = res.body.total;
      const jobs = `${total} job${total === 1 ? "" : "s"}`;
      count.dataset.total = total;
      count.querySelector(".range").textContent = rows.length
        ? `${offset + 1}–${offset + rows.length} of ${jobs}` : jobs;
      count.querySelector(".pages").textContent =
        Math.max(1, Math.ceil(total / Number(count.dataset.perPage)));
    }
  }

  // A state or priority change moves every queued job's place: re-read the list, at most
  // once per burst of events.
  let refreshTimer = null;
  function refreshSoon() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; refreshAll(); }, 300);
  }

  function onEvent(payload) {
    const ev = payload.event || {};
    const tr = rowFor(payload.job);
    if (!tr) {
      if (ev.type === "state" || ev.type === "priority") refreshSoon();
      return;
    }
    if (ev.type === "state" || ev.type === "priority") {
      refreshRow(payload.job);
      refreshSoon();
      return;
    }
    if (ev.type === "train") {
      const step = LF.num(ev.step) || 0;
      const seen = live.get(payload.job);
      if (seen && seen.step > step) return;
      live.set(payload.job, { step: step, total_steps: ev.total_steps, loss: ev.loss,
                              eta_s: ev.eta_s });
      fill(tr, { id: payload.job, step: ev.step, total_steps: ev.total_steps, loss: ev.loss,
                 eta_s: ev.eta_s });
    }
  }

  // Times from the server are rendered in its zone; show them in the browser's.
  body.querySelectorAll('[data-col="created"]').forEach((c) => {
    if (c.dataset.ts) c.textContent = LF.fmtTime(c.dataset.ts);
  });
  let opened = false;
  LF.liveFeed("/api/v1/live?types=state,train,priority", status, onEvent, () => {
    if (opened) refreshAll();
    opened = true;
  });
})();
