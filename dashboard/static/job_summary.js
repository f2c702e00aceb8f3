/* Job page summary (issue 11, point 8): duration, finished time, final and best evaluation
   loss, kept in step with the record job.js fetches ("lf:job-record"); and Resume, which
   queues the job again from its LoRA's last checkpoint through the submit API (same spec,
   `resume_from_checkpoint: latest`, same owner), then opens the new job. */
"use strict";

(function () {
  const box = document.getElementById("job-summary");
  if (!box) return;
  const job = JSON.parse(document.getElementById("job-data").textContent);
  const $ = (testid) => box.querySelector(`[data-testid="${testid}"]`);
  const resume = document.getElementById("resume-button");
  const dash = (text) => text || "—";

  function fill(sm) {
    $("summary-duration").textContent = dash(LF.fmtDuration(sm.duration_s));
    $("summary-finished").textContent = dash(sm.finished ? LF.fmtTime(sm.finished) : "");
    const set = (id, v) => { const el = $(id); if (el) el.textContent = dash(LF.fmtLoss(v)); };
    set("summary-final-loss", sm.final_loss);
    set("summary-final-eval", sm.final_eval_loss);
    set("summary-best-eval", sm.best_eval_loss);
    if (resume) {
      resume.hidden = sm.resume_step === null || sm.resume_step === undefined;
      resume.querySelector(".resume-step").textContent = sm.resume_step ?? "";
    }
  }

  const finished = $("summary-finished");
  if (finished.dataset.ts) finished.textContent = LF.fmtTime(finished.dataset.ts);
  document.addEventListener("lf:job-record", (e) => { if (e.detail.summary) fill(e.detail.summary); });

  if (resume) {
    resume.addEventListener("click", async () => {
      const err = document.getElementById("action-error");
      err.hidden = true;
      resume.disabled = true;
      const spec = Object.assign({}, job.spec, { resume_from_checkpoint: "latest" });
      const res = await LF.api(resume.dataset.api, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ kind: "train", spec: spec, owner: job.owner,
                               priority: job.priority || "normal" }),
      });
      if (!res.ok) {
        resume.disabled = false;
        const b = res.body || {};
        const details = (b.errors || []).map((p) => `${p.field}: ${p.message}`).join("; ");
        err.textContent = (b.error || `HTTP ${res.status}`) + (details ? ` (${details})` : "");
        err.hidden = false;
        return;
      }
      window.location.assign(`/jobs/${encodeURIComponent(res.body.id)}`);
    });
  }
})();
