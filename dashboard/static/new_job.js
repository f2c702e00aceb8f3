/* New job form: posts the spec as JSON to the API, shows field errors inline, opens the job. */
"use strict";

(function () {
  const form = document.getElementById("new-job-form");
  const formError = document.getElementById("form-error");
  const status = document.getElementById("submit-status");
  const button = form.querySelector('button[type="submit"]');
  // Not form.dataset: the form has a control named "dataset", which shadows that property.
  const apiUrl = form.getAttribute("data-api");
  const jobUrl = form.getAttribute("data-job-url");

  function collect() {
    const spec = {};
    form.querySelectorAll(".field[data-field]").forEach((f) => {
      const name = f.dataset.field;
      if (name === "priority") return;
      const type = f.dataset.type;
      if (type === "list[str]") {
        spec[name] = Array.from(f.querySelectorAll(`input[name="${name}"]:checked`)).map((i) => i.value);
      } else if (type === "bool") {
        spec[name] = f.querySelector(`input[name="${name}"]`).checked;
      } else {
        const el = f.querySelector(`[name="${name}"]`);
        // Numbers go as typed: the server validates and names the field if one is wrong.
        spec[name] = el.value;
      }
    });
    return spec;
  }

  function clearErrors() {
    formError.hidden = true;
    formError.textContent = "";
    form.querySelectorAll(".field-error").forEach((e) => { e.hidden = true; e.textContent = ""; });
    form.querySelectorAll(".field.invalid").forEach((e) => e.classList.remove("invalid"));
  }

  function showErrors(message, errors) {
    const unplaced = [];
    let first = null;
    (errors || []).forEach((err) => {
      const field = form.querySelector(`.field[data-field="${CSS.escape(err.field)}"]`);
      if (!field) { unplaced.push(`${err.field}: ${err.message}`); return; }
      field.classList.add("invalid");
      const box = field.querySelector(".field-error");
      box.textContent = box.textContent ? `${box.textContent}; ${err.message}` : err.message;
      box.hidden = false;
      if (!first) first = field;
    });
    formError.textContent = [message].concat(unplaced).filter(Boolean).join(" — ");
    formError.hidden = false;
    (first || formError).scrollIntoView({ block: "center", behavior: "smooth" });
  }

  // "Preview samples": the data this form would train on, through the same preview API as the
  // Datasets page. Fields are looked up by name (form.dataset is the "dataset" select).
  const PREVIEW_FIELDS = ["dataset", "format", "raw_text_file", "cutoff_len", "overlap_len",
    "newline_favor_len", "hard_cut_string", "train_only_after", "min_chars"];
  const previewButton = document.getElementById("preview-samples");
  const previewBox = document.getElementById("job-preview");
  const previewApi = form.getAttribute("data-preview-api");

  function fieldValue(name) {
    const el = form.querySelector(`[name="${name}"]`);
    if (!el) return "";
    return el.type === "checkbox" ? el.checked : el.value;
  }

  previewButton.addEventListener("click", () => {
    const values = { model: fieldValue("base_model") };
    PREVIEW_FIELDS.forEach((n) => { values[n] = fieldValue(n); });
    values.add_eos_token = Boolean(fieldValue("add_eos_token"));
    LFPreview.run(previewApi, values, previewBox, status, previewButton)
      .then(() => previewBox.scrollIntoView({ block: "start", behavior: "smooth" }));
  });

  // The card memory the job would need (the dispatcher's estimate), refreshed on each change.
  const estimateLine = document.getElementById("memory-estimate");
  let estimateTimer = null;
  async function showEstimate() {
    const res = await LF.api(estimateLine.getAttribute("data-api"), {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ kind: "train", spec: collect() }),
    });
    const mb = res.ok ? res.body.gpu_memory_mb : null;
    estimateLine.dataset.mb = mb === null ? "" : String(mb);
    estimateLine.textContent = !res.ok ? `GPU memory: ${(res.body && res.body.error) || "—"}`
      : !mb ? "GPU memory: pick a base model to see an estimate"
      : res.body.source === "user" ? `GPU memory: waits for a card with ${mb} MB free (your minimum)`
      : `GPU memory: about ${mb} MB (an estimate on the high side); the job waits for a card with that much free`;
  }
  form.addEventListener("change", () => {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(showEstimate, 150);
  });
  showEstimate();

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors();
    button.disabled = true;
    status.textContent = "submitting…";
    const payload = {
      kind: "train",
      spec: collect(),
      priority: form.querySelector('[name="priority"]').value,
    };
    let res;
    try {
      res = await LF.api(apiUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(payload),
      });
    } catch (err) {
      res = { ok: false, status: 0, body: { error: "cannot reach the dashboard" } };
    }
    button.disabled = false;
    if (res.ok && res.body && res.body.id) {
      status.textContent = "queued";
      window.location.assign(jobUrl.replace("JOB_ID", encodeURIComponent(res.body.id)));
      return;
    }
    status.textContent = "";
    showErrors((res.body && res.body.error) || `HTTP ${res.status}`, res.body && res.body.errors);
  });
})();
