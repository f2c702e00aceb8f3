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

  // The load column (as load_text in dashboard/pages.py): a card's utilisation and
  // temperature, a CPU worker's CPU use and load average, else a dash and the reason.
  function loadCell(w) {
    const parts = [];
    const cpu = w.device === "cpu";
    if (LF.num(w.util_pct) !== null) parts.push(`${LF.num(w.util_pct)} %${cpu ? " CPU" : ""}`);
    if (LF.num(w.load_avg) !== null) parts.push(`load ${LF.num(w.load_avg)}`);
    if (LF.num(w.temp_c) !== null) parts.push(`${LF.num(w.temp_c)} °C`);
    const cell = td("load", parts.length ? parts.join(" · ") : "—");
    cell.setAttribute("data-testid", "worker-load");
    if (!parts.length) {
      const note = document.createElement("span");
      note.className = "muted";
      note.setAttribute("data-testid", "worker-load-note");
      note.textContent = ` (${w.load_note || "no figures in the heartbeat"})`;
      cell.appendChild(note);
    }
    return cell;
  }

  function link(href, text) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  }

  // A card that trains a pack (as fleet.html words it): "pack 2 of sweep S: 4 trials (a, b, ...)".
  function packCell(w) {
    const span = document.createElement("span");
    span.setAttribute("data-testid", "worker-pack");
    const n = w.pack_trials.length;
    span.append(`pack ${w.pack_number} of sweep `,
      link(`/sweeps/${encodeURIComponent(w.pack_sweep)}`, w.pack_sweep),
      `: ${n} trial${n === 1 ? "" : "s"} (`);
    w.pack_trials.forEach((t, i) => {
      if (i) span.append(", ");
      span.appendChild(link(`/jobs/${encodeURIComponent(t.id)}`, t.name));
    });
    span.append(")");
    return span;
  }

  function row(w) {
    const tr = document.createElement("tr");
    tr.setAttribute("data-testid", "worker-row");
    tr.dataset.worker = w.name;
    tr.appendChild(td("name", w.name));
    tr.appendChild(td("host", w.host || ""));
    tr.appendChild(td("card", w.card || w.device || ""));
    const mem = td("memory", LF.num(w.mem_total_mb)
      ? `${LF.fmtMB(w.mem_free_mb)} / ${LF.fmtMB(w.mem_total_mb)}` : "");
    if (LF.num(w.mem_limit_mb)) {
      const cap = document.createElement("span");
      cap.className = "muted";
      cap.setAttribute("data-testid", "worker-cap");
      cap.textContent = ` (capped at ${Math.round(w.mem_limit_mb)} MB)`;
      mem.appendChild(cap);
    }
    if (LF.num(w.outside_mb)) {
      // Card memory held by processes that are not this worker's (gpuworker/telemetry.py).
      const pids = String(w.outside_pids || "").split(",").filter(Boolean);
      const who = !pids.length ? "pid unknown"
        : `${pids.length === 1 ? "pid" : "pids"} ${pids.join(", ")}`;
      const out = document.createElement("span");
      out.className = "outside";
      out.setAttribute("data-testid", "worker-outside");
      out.textContent = `in use outside lorafleet (${Math.round(w.outside_mb)} MB, ${who})`;
      mem.appendChild(out);
    }
    tr.appendChild(mem);
    tr.appendChild(loadCell(w));
    const st = td("state");
    const badge = document.createElement("span");
    badge.setAttribute("data-testid", "worker-state");
    LF.setBadge(badge, w.state || "unknown");
    st.appendChild(badge);
    tr.appendChild(st);
    const job = td("job");
    if (w.pack_trials && w.pack_trials.length) {
      job.appendChild(packCell(w));
    } else if (w.job) {
      const a = document.createElement("a");
      a.href = `/jobs/${encodeURIComponent(w.job)}`;
      a.textContent = w.job_name || w.job;
      job.appendChild(a);
    }
    tr.appendChild(job);
    const owner = td("owner", w.job_owner || "");
    owner.setAttribute("data-testid", "worker-job-owner");
    tr.appendChild(owner);
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
  // Memory, load and temperature change between jobs too: re-read the heartbeats every few
  // seconds while the page is visible.
  setInterval(() => { if (!document.hidden) reload(); }, 5000);
})();
