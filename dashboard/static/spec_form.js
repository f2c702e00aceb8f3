/* A job form generated from a spec class: collects the fields, posts {kind, spec} to the API,
   shows each refusal next to its field, and on success opens the job page (or, with
   `onQueued`, hands the new job's id to it instead). */
"use strict";

window.LF = window.LF || {};

/* The values of the generated spec fields (`.field[data-field]`) under `root`, typed as the
   spec wants them: checkbox lists as lists, checkboxes as booleans, the rest as typed (the
   server validates and names the field if one is wrong). */
LF.collectFields = function (root, skip) {
  const spec = {};
  root.querySelectorAll(".field[data-field]").forEach((f) => {
    const name = f.dataset.field;
    if ((skip || []).includes(name)) return;
    const type = f.dataset.type;
    if (type === "list[str]") {
      spec[name] = Array.from(f.querySelectorAll(`input[name="${name}"]:checked`)).map((i) => i.value);
    } else if (type === "bool") {
      spec[name] = f.querySelector(`input[name="${name}"]`).checked;
    } else {
      spec[name] = f.querySelector(`[name="${name}"]`).value;
    }
  });
  return spec;
};

LF.specForm = function (form, kind, onQueued) {
  const formError = form.querySelector(".form-error");
  const status = form.querySelector(".submit-status");
  const button = form.querySelector('button[type="submit"]');
  // getAttribute, not form.dataset: a control named "dataset" would shadow that property.
  const apiUrl = form.getAttribute("data-api");
  const jobUrl = form.getAttribute("data-job-url");

  function collect() {
    return LF.collectFields(form, ["priority"]);
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

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors();
    button.disabled = true;
    status.textContent = "submitting…";
    const priority = form.querySelector('[name="priority"]');
    const payload = { kind: kind, spec: collect(), priority: priority ? priority.value : "normal" };
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
      if (onQueued) { onQueued(res.body.id); return; }
      window.location.assign(jobUrl.replace("JOB_ID", encodeURIComponent(res.body.id)));
      return;
    }
    status.textContent = "";
    showErrors((res.body && res.body.error) || `HTTP ${res.status}`, res.body && res.body.errors);
  });
  return { collect: collect };
};
