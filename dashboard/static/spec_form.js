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

/* Refusals shown next to the fields they name, and a banner ("N problems") above the form.
   Shared by the job forms and the New sweep form. A field's message goes as soon as the
   field is edited, and the banner counts what is left (it goes with the last one), so a
   fixed form does not go on saying "is required" until the next submit.
   `locate(err)` gives {box, holder} for an error (holder: the element whose edits clear it,
   marked .invalid meanwhile), or null for one shown only in the banner. */
LF.errorDisplay = function (form, banner, locate) {
  const shown = new Map();  // holder -> {box, count}
  let headline = "", unplaced = [];

  function clearOne(holder) {
    const entry = shown.get(holder);
    entry.box.hidden = true;
    entry.box.textContent = "";
    holder.classList.remove("invalid");
    shown.delete(holder);
  }

  function drawBanner() {
    let n = unplaced.length;
    shown.forEach((e) => { n += e.count; });
    if (!n) { banner.hidden = true; banner.textContent = ""; return; }
    // The server's headline counts the problems of the request: count what is left.
    const head = headline.replace(/\b\d+ problems?\b/, `${n} problem${n === 1 ? "" : "s"}`);
    banner.textContent = [head].concat(unplaced).filter(Boolean).join(" — ");
    banner.hidden = false;
  }

  function clear() {
    Array.from(shown.keys()).forEach(clearOne);
    headline = "";
    unplaced = [];
    banner.hidden = true;
    banner.textContent = "";
  }

  function show(message, errs) {
    clear();
    headline = message || "";
    let first = null;
    (errs || []).forEach((err) => {
      const at = locate(err);
      if (!at || !at.box) { unplaced.push(`${err.field}: ${err.message}`); return; }
      const holder = at.holder || at.box.parentElement;
      const text = at.text || err.message;
      at.box.textContent = at.box.textContent ? `${at.box.textContent}; ${text}` : text;
      at.box.hidden = false;
      holder.classList.add("invalid");
      const entry = shown.get(holder) || { box: at.box, count: 0 };
      entry.count += 1;
      shown.set(holder, entry);
      if (!first) first = holder;
    });
    if (!headline && !unplaced.length && !shown.size) return;
    drawBanner();
    if (!banner.textContent) { banner.textContent = headline; banner.hidden = false; }
    (first || banner).scrollIntoView({ block: "center", behavior: "smooth" });
  }

  function edited(e) {
    const fixed = Array.from(shown.keys()).filter((h) => h.contains(e.target));
    if (!fixed.length) return;
    fixed.forEach(clearOne);
    drawBanner();
  }
  form.addEventListener("input", edited);
  form.addEventListener("change", edited);
  return { clear: clear, show: show };
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

  const errors = LF.errorDisplay(form, formError, (err) => {
    const field = form.querySelector(`.field[data-field="${CSS.escape(err.field)}"]`);
    return field ? { box: field.querySelector(".field-error"), holder: field } : null;
  });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    errors.clear();
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
    errors.show((res.body && res.body.error) || `HTTP ${res.status}`, res.body && res.body.errors);
  });
  return { collect: collect };
};
