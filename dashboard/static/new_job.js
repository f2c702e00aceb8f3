/* New job form: posts the spec as JSON to the API, shows field errors inline, opens the job. */
"use strict";

(function () {
  const form = document.getElementById("new-job-form");
  const status = document.getElementById("submit-status");
  // Collecting, submitting and showing refusals are shared with the other job forms.
  const collect = LF.specForm(form, "train").collect;

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

  // What the lora_name holds, said before anything is queued: an existing LoRA is continued
  // (text-generation-webui's rule), someone else's name is refused. Asked as the name is typed.
  const loraField = form.querySelector('.field[data-field="lora_name"]');
  const loraInput = loraField.querySelector('[name="lora_name"]');
  const overrideInput = form.querySelector('[name="always_override"]');
  const loraApi = form.getAttribute("data-lora-api");
  const loraNotice = document.createElement("p");
  loraNotice.className = "lora-notice";
  loraNotice.dataset.testid = "lora-notice";
  loraNotice.setAttribute("aria-live", "polite");
  loraNotice.hidden = true;
  loraField.querySelector(".help").after(loraNotice);
  let loraTimer = null, loraAsked = 0;
  async function showLoraNotice() {
    const name = loraInput.value.trim();
    const asked = ++loraAsked;
    if (!name) { loraNotice.hidden = true; return; }
    const url = loraApi.replace("LORA_NAME", encodeURIComponent(name)) +
      `?always_override=${overrideInput && overrideInput.checked ? 1 : 0}`;
    let res;
    try { res = await LF.api(url); } catch (e) { return; }
    if (asked !== loraAsked) return;  // a later keystroke asked again
    // A bad name is the spec's to report on submit, next to the field.
    const line = res.ok ? res.body.notice : "";
    loraNotice.textContent = line;
    loraNotice.classList.toggle("refused", Boolean(res.ok && res.body.refused));
    loraNotice.dataset.exists = res.ok && res.body.exists ? "yes" : "no";
    loraNotice.hidden = !line;
  }
  function askSoon() {
    clearTimeout(loraTimer);
    loraTimer = setTimeout(showLoraNotice, 200);
  }
  loraInput.addEventListener("input", askSoon);
  if (overrideInput) overrideInput.addEventListener("change", askSoon);
  showLoraNotice();

})();
