/* New sweep form: base parameters (the spec fields), the parameters to vary, method, cap, early
   stopping and perplexity; Preview asks the API for the trial list (?dry_run=1), Queue creates
   the sweep and opens its page. Refusals are shown next to the field they name. */
"use strict";

(function () {
  const form = document.getElementById("sweep-form");
  const rows = document.getElementById("vary-rows");
  const tmpl = document.getElementById("vary-row-template");
  const formError = document.getElementById("form-error");
  const status = document.getElementById("submit-status");
  const previewBox = document.getElementById("sweep-preview-result");
  const apiUrl = form.getAttribute("data-api");
  const sweepUrl = form.getAttribute("data-sweep-url");
  const baseJob = form.getAttribute("data-base-job");

  // ---- parameters to vary ------------------------------------------------------------------
  function showKind(row) {
    const kind = row.querySelector(".vary-kind").value;
    row.querySelector(".vary-values").hidden = kind !== "list";
    row.querySelector(".vary-min").hidden = kind === "list";
    row.querySelector(".vary-max").hidden = kind === "list";
    row.querySelector(".vary-step").hidden = kind !== "range";
    row.querySelector(".vary-count").hidden = kind !== "log";
  }

  function addRow(param) {
    const row = tmpl.content.firstElementChild.cloneNode(true);
    if (param) row.querySelector(".vary-param").value = param;
    row.querySelector(".vary-kind").addEventListener("change", () => showKind(row));
    row.querySelector(".vary-remove").addEventListener("click", () => row.remove());
    showKind(row);
    rows.appendChild(row);
    return row;
  }
  document.getElementById("add-vary").addEventListener("click", () => { addRow(); markSwept(); });

  // A base field that a parameter row varies is marked "swept": its own value is not used.
  function markSwept() {
    const varied = new Set(Array.from(rows.querySelectorAll(".vary-param")).map((s) => s.value));
    form.querySelectorAll("#base-fields .field[data-field]").forEach((field) => {
      const swept = varied.has(field.dataset.field);
      field.classList.toggle("swept", swept);
      let mark = field.querySelector(".swept-mark");
      if (swept && !mark) {
        mark = document.createElement("span");
        mark.className = "swept-mark";
        mark.dataset.testid = "swept-mark";
        mark.title = "varied by the sweep: each trial takes its value from the parameter row";
        mark.textContent = "swept";
        (field.querySelector("label, .label") || field).append(" ", mark);
      } else if (!swept && mark) {
        mark.remove();
      }
    });
  }
  rows.addEventListener("change", markSwept);
  rows.addEventListener("click", (e) => {
    if (e.target.closest(".vary-remove")) markSwept();  // the row is gone by now
  });
  addRow("lora_rank");
  markSwept();

  // Each sweep setting only where it applies: trials and seed for a random search,
  // reduction_factor for ASHA, min_trials for median, rungs for either policy, pack_size
  // with packs on.
  const APPLIES = {
    trials: (m) => m === "random",
    seed: (m) => m === "random",
    "early_stopping.rungs": (m, p) => p !== "none",
    "early_stopping.reduction_factor": (m, p) => p === "asha",
    "early_stopping.min_trials": (m, p) => p === "median",
    pack_size: (m, p, pack) => pack === "auto",
  };
  function showApplicable() {
    const method = setting("method"), policy = setting("policy"), pack = setting("pack");
    Object.entries(APPLIES).forEach(([name, applies]) => {
      form.querySelector(`.field[data-setting="${name}"]`).hidden = !applies(method, policy, pack);
    });
  }
  ["s-method", "s-policy", "s-pack"].forEach((n) => {
    form.querySelector(`[name="${n}"]`).addEventListener("change", showApplicable);
  });

  function scalar(text) {
    const t = text.trim();
    if (t === "true" || t === "false") return t === "true";
    // Numbers go as numbers, except learning_rate-like text such as 1e-4, which the server
    // reads either way; anything else stays text (optimizer names, datasets, ...).
    return t !== "" && Number.isFinite(Number(t)) ? Number(t) : t;
  }

  function rowValue(row) {
    const param = row.querySelector(".vary-param").value;
    const kind = row.querySelector(".vary-kind").value;
    const get = (cls) => row.querySelector(cls).value.trim();
    if (kind === "list") {
      const text = get(".vary-values");
      if (param === "target_modules") {
        return text.split(";").map((g) => g.split(/[,\s]+/).filter(Boolean)).filter((g) => g.length);
      }
      if (param === "learning_rate") return text.split(/[,\s]+/).filter(Boolean);
      return text.split(",").map((v) => v.trim()).filter((v) => v !== "").map(scalar);
    }
    const out = { min: scalar(get(".vary-min")), max: scalar(get(".vary-max")) };
    if (kind === "range") out.step = scalar(get(".vary-step"));
    else {
      out.log = true;
      if (get(".vary-count")) out.count = Number(get(".vary-count"));
    }
    return out;
  }

  // ---- the definition ------------------------------------------------------------------------
  function setting(name) {
    const el = form.querySelector(`[name="s-${name}"]`);
    return el ? el.value.trim() : "";
  }

  showApplicable();

  function collectBase() {
    return LF.collectFields(form.querySelector("#base-fields"));
  }

  function definition() {
    const params = {};
    rows.querySelectorAll(".vary-row").forEach((row) => {
      params[row.querySelector(".vary-param").value] = rowValue(row);
    });
    const method = setting("method");
    const def = {
      base: collectBase(), parameters: params, method: method,
      max_concurrent: Number(setting("max_concurrent") || 0), priority: setting("priority"),
    };
    // pack_size only with packs on (a hidden field must not be refused unseen); what is typed
    // goes as typed when it is not a number, so the API's refusal names it.
    def.pack = setting("pack");
    if (def.pack === "auto") def.pack_size = scalar(setting("pack_size") || "0");
    if (baseJob) def.base_job = baseJob;
    if (setting("name")) def.name = setting("name");
    if (method === "random") {
      def.trials = Number(setting("trials"));
      def.seed = Number(setting("seed") || 0);
    }
    if (setting("policy") !== "none") {
      // Only the settings of the chosen policy: a hidden field must not be refused unseen.
      const policy = setting("policy");
      def.early_stopping = { policy: policy, rungs: setting("rungs") };
      if (policy === "asha") def.early_stopping.reduction_factor = Number(setting("reduction_factor"));
      if (policy === "median") def.early_stopping.min_trials = Number(setting("min_trials"));
    }
    if (setting("text_file")) {
      def.evaluate = { text_file: setting("text_file"), stride: Number(setting("stride")),
                       max_length: Number(setting("max_length") || 0) };
    }
    return def;
  }

  // ---- errors (shown and cleared as the job forms do: spec_form.js) ------------------------
  const errors = LF.errorDisplay(form, formError, (err) => {
    const f = err.field || "";
    if (f.startsWith("base.")) {
      const field = form.querySelector(`#base-fields .field[data-field="${CSS.escape(f.slice(5))}"]`);
      return field ? { box: field.querySelector(".field-error"), holder: field } : null;
    }
    if (f.startsWith("parameters.")) {
      const param = f.split(".")[1];
      const row = Array.from(rows.querySelectorAll(".vary-row"))
        .find((r) => r.querySelector(".vary-param").value === param);
      return row ? { box: row.querySelector(".vary-error"), holder: row,
                     text: `${f.slice(11)}: ${err.message}` } : null;
    }
    if (f === "parameters") {
      return { box: form.querySelector('[data-testid="error-parameters"]'), holder: rows.closest("fieldset") };
    }
    const box = form.querySelector(`[data-testid="error-${CSS.escape(f)}"]`);
    return box ? { box: box, holder: box.closest(".field") } : null;
  });

  // ---- preview and submit --------------------------------------------------------------------
  async function send(dryRun) {
    errors.clear();
    status.textContent = dryRun ? "working out the trials…" : "submitting…";
    let res;
    try {
      res = await LF.api(apiUrl + (dryRun ? "?dry_run=1" : ""), {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(definition()),
      });
    } catch (e) {
      res = { ok: false, status: 0, body: { error: "cannot reach the dashboard" } };
    }
    status.textContent = "";
    if (!res.ok) {
      previewBox.hidden = true;
      errors.show((res.body && res.body.error) || `HTTP ${res.status}`, res.body && res.body.errors);
      return null;
    }
    return res.body;
  }

  function showPreview(body) {
    const h = document.createElement("h2");
    const count = document.createElement("span");
    count.dataset.testid = "preview-count";
    count.textContent = String(body.count);
    h.append(count, ` trial${body.count === 1 ? "" : "s"} will be queued`);
    const list = document.createElement("ol");
    list.className = "preview-list";
    body.trials.forEach((t) => {
      const li = document.createElement("li");
      li.dataset.testid = "preview-trial";
      li.textContent = t.name;
      list.appendChild(li);
    });
    previewBox.replaceChildren(h, list);
    if (body.skipped && body.skipped.length) {
      const p = document.createElement("p");
      p.className = "muted";
      p.dataset.testid = "preview-skipped";
      p.textContent = `${body.skipped.length} duplicate${body.skipped.length === 1 ? "" : "s"} skipped: ` +
        body.skipped.map((s) => `${s.name} (same as ${s.same_as})`).join(", ");
      previewBox.appendChild(p);
    }
    previewBox.hidden = false;
    previewBox.scrollIntoView({ block: "start", behavior: "smooth" });
  }

  document.getElementById("preview-sweep").addEventListener("click", async () => {
    const body = await send(true);
    if (body) showPreview(body);
  });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const button = form.querySelector('button[type="submit"]');
    button.disabled = true;
    const body = await send(false);
    button.disabled = false;
    if (body && body.id) {
      status.textContent = "queued";
      window.location.assign(sweepUrl.replace("SWEEP_ID", encodeURIComponent(body.id)));
    }
  });
})();
