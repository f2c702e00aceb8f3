/* Datasets page: upload a file (checked by the server before it is saved), list the data
   folder's files, view a format file's templates or copy it to a user format, preview the
   samples a dataset + format or a raw text gives. */
"use strict";

(function () {
  const uploadForm = document.getElementById("upload-form");
  const uploadError = document.getElementById("upload-error");
  const uploadStatus = document.getElementById("upload-status");
  const uploadButton = uploadForm.querySelector('button[type="submit"]');
  const fileInput = document.getElementById("upload-file");
  const listApi = uploadForm.getAttribute("data-list-api");
  const maxBytes = Number(uploadForm.getAttribute("data-max-bytes"));
  const maxLabel = uploadForm.getAttribute("data-max-label");

  const previewForm = document.getElementById("preview-form");
  const previewResults = document.getElementById("preview-results");
  const previewStatus = document.getElementById("preview-status");
  const previewButton = previewForm.querySelector('button[type="submit"]');
  const previewApi = previewForm.getAttribute("data-api");

  const formatsTable = document.querySelector("[data-testid='formats-table']");
  const formatApi = formatsTable.getAttribute("data-format-api");
  const copyApi = formatsTable.getAttribute("data-copy-api");
  const formatError = document.getElementById("format-error");
  const formatStatus = document.getElementById("format-status");
  const formatView = document.getElementById("format-view");

  function humanSize(n) {
    let size = Number(n);
    for (const unit of ["B", "KB", "MB", "GB"]) {
      if (size < 1024 || unit === "GB") {
        return unit === "B" || size >= 10 ? `${Math.round(size)} ${unit}` : `${size.toFixed(1)} ${unit}`;
      }
      size /= 1024;
    }
    return `${n} B`;
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text === null || text === undefined ? "" : String(text);
    return td;
  }

  function codeCell(text) {
    const td = document.createElement("td");
    const code = document.createElement("code");
    code.textContent = text;
    td.append(code);
    return td;
  }

  function rowButton(label, action, testid) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.setAttribute("data-action", action);
    b.setAttribute("data-testid", testid);
    return b;
  }

  // Who made the file ("—": put in the data folder by hand, or shipped: no one's).
  function ownerCell(item) {
    const td = cell(item.owner || "—", "owner");
    td.setAttribute("data-testid", "owner");
    return td;
  }

  function fillTable(bodyId, emptyId, items, rowFor) {
    const body = document.getElementById(bodyId);
    body.replaceChildren(...items.map(rowFor));
    if (emptyId) document.getElementById(emptyId).hidden = items.length > 0;
  }

  function renderListing(listing) {
    fillTable("datasets-body", "datasets-empty", listing.datasets, (d) => {
      const tr = document.createElement("tr");
      tr.setAttribute("data-testid", "dataset-row");
      tr.setAttribute("data-name", d.name);
      tr.append(codeCell(d.name), cell(d.rows, "num"), cell(humanSize(d.size), "num"),
                cell(LF.fmtTime(d.modified)), ownerCell(d),
                cell(d.error || "", d.error ? "problem" : ""));
      return tr;
    });
    fillTable("formats-body", null, listing.formats, (f) => {
      const tr = document.createElement("tr");
      tr.setAttribute("data-testid", "format-row");
      tr.setAttribute("data-name", f.name);
      tr.setAttribute("data-source", f.source);
      let source = f.source;
      if (f.hidden_by_user_file) source += " (hidden by a file in formats/)";
      const actions = cell("", "row-actions");
      actions.append(rowButton("View", "view", "format-view-button"),
                     rowButton("Copy…", "copy", "format-copy-button"));
      tr.append(codeCell(f.name), cell(source), ownerCell(f),
                cell(f.error || f.key_sets.map((k) => `{${k}}`).join("  "), f.error ? "problem" : "mono"),
                actions);
      return tr;
    });
    fillTable("raw-texts-body", "raw-texts-empty", listing.raw_texts, (r) => {
      const tr = document.createElement("tr");
      tr.setAttribute("data-testid", "raw-text-row");
      tr.setAttribute("data-name", r.name);
      tr.append(codeCell(r.name), cell(r.files, "num"), cell(humanSize(r.size), "num"),
                cell(LF.fmtTime(r.modified)), ownerCell(r));
      return tr;
    });
    // Keep the preview's dropdowns in step with the tables, keeping what is selected.
    const names = {
      datasets: listing.datasets.map((d) => d.name),
      formats: Array.from(new Set(listing.formats.map((f) => f.name))).sort(),
      raw_texts: listing.raw_texts.map((r) => r.name),
    };
    previewForm.querySelectorAll("select[data-choice]").forEach((sel) => {
      const keep = sel.value;
      const first = sel.options[0];
      sel.replaceChildren(first, ...names[sel.getAttribute("data-choice")].map((n) => new Option(n, n)));
      sel.value = keep;
    });
  }

  async function refreshListing() {
    const res = await LF.api(listApi);
    if (res.ok) renderListing(res.body);
  }

  function showUploadError(message, errors) {
    const parts = [message];
    (errors || []).forEach((e) => { if (e.message && !parts.includes(e.message)) parts.push(e.message); });
    uploadError.textContent = parts.join(" — ");
    uploadError.hidden = false;
  }

  // Format files: View shows the templates under the table; Copy… makes a user format of one.
  function showFormatMessage(error, status) {
    formatError.textContent = error || "";
    formatError.hidden = !error;
    formatStatus.textContent = status || "";
  }

  async function viewFormat(name, source) {
    showFormatMessage();
    const res = await LF.api(`${formatApi}${encodeURIComponent(name)}?source=${encodeURIComponent(source)}`);
    if (!res.ok) {
      formatView.hidden = true;
      showFormatMessage((res.body && res.body.error) || `HTTP ${res.status}`);
      return;
    }
    const f = res.body;
    document.getElementById("format-view-title").textContent =
      `${f.name} — ${f.source === "user" ? `your file formats/${f.file}` : "shipped"}`;
    // key_sets are in the file's order (the first matching entry is the one a row gets).
    document.getElementById("format-view-body").replaceChildren(...f.key_sets.map((keys) => {
      const tr = document.createElement("tr");
      tr.setAttribute("data-testid", "format-template");
      tr.setAttribute("data-keys", keys);
      const td = document.createElement("td");
      const pre = document.createElement("pre");
      pre.className = "sample-text";
      pre.textContent = f.templates[keys];
      td.append(pre);
      tr.append(codeCell(keys), td);
      return tr;
    }));
    formatView.setAttribute("data-name", f.name);
    formatView.setAttribute("data-source", f.source);
    formatView.hidden = false;
  }

  async function copyFormat(name, source) {
    showFormatMessage();
    const newName = window.prompt(`Copy the ${source} format ${name} to formats/ as:`, `${name}-copy`);
    if (newName === null) return;  // cancelled
    let res;
    try {
      res = await LF.api(copyApi, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ from: name, source: source, name: newName.trim(), overwrite: false }),
      });
    } catch (err) {
      res = { ok: false, status: 0, body: { error: "cannot reach the dashboard" } };
    }
    if (!res.ok) {
      showFormatMessage((res.body && res.body.error) || `HTTP ${res.status}`);
      return;
    }
    await refreshListing();
    showFormatMessage("", `copied ${name} to formats/${res.body.file}`);
  }

  document.getElementById("formats-body").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-action]");
    if (!button) return;
    const row = button.closest("tr");
    const name = row.getAttribute("data-name");
    const source = row.getAttribute("data-source");
    if (button.getAttribute("data-action") === "view") viewFormat(name, source);
    else copyFormat(name, source);
  });

  uploadForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    uploadError.hidden = true;
    uploadError.textContent = "";
    uploadStatus.textContent = "";
    const file = fileInput.files[0];
    if (!file) { showUploadError("choose a file to upload"); return; }
    if (file.size > maxBytes) {
      showUploadError(`${file.name} is larger than the upload limit of ${maxLabel}`);
      return;
    }
    uploadButton.disabled = true;
    uploadStatus.textContent = "checking and uploading…";
    let res;
    try {
      res = await LF.api(uploadForm.getAttribute("action"), { method: "POST", body: new FormData(uploadForm) });
    } catch (err) {
      res = { ok: false, status: 0, body: { error: "cannot reach the dashboard" } };
    }
    uploadButton.disabled = false;
    uploadStatus.textContent = "";
    if (!res.ok) {
      showUploadError((res.body && res.body.error) || `HTTP ${res.status}`, res.body && res.body.errors);
      return;
    }
    const b = res.body;
    const what = b.kind === "dataset" ? `${b.rows} rows` : b.kind === "format"
      ? `${b.key_sets.length} key sets` : humanSize(b.size);
    uploadStatus.textContent = `${b.replaced ? "replaced" : "saved"} ${b.path} (${what})`;
    uploadForm.reset();
    await refreshListing();
  });

  // A preview takes a dataset with its format, or a raw text: picking one clears the other.
  // The raw-text settings (chunking) are shown, and sent, only while a raw text is chosen.
  const dsSelect = previewForm.querySelector('select[name="dataset"]');
  const rawSelect = previewForm.querySelector('select[name="raw_text_file"]');
  const RAW_FIELDS = ["overlap_len", "newline_favor_len", "hard_cut_string", "min_chars"];
  function showRawFields() {
    previewForm.querySelectorAll("[data-raw-only]").forEach((f) => { f.hidden = !rawSelect.value; });
  }
  dsSelect.addEventListener("change", () => { if (dsSelect.value) rawSelect.value = ""; showRawFields(); });
  rawSelect.addEventListener("change", () => { if (rawSelect.value) dsSelect.value = ""; showRawFields(); });

  previewForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const values = {};
    const names = ["model", "dataset", "format", "raw_text_file", "cutoff_len", "train_only_after",
                   "limit"];
    if (rawSelect.value) names.push(...RAW_FIELDS);
    names.forEach((n) => { values[n] = previewForm.querySelector(`[name="${n}"]`).value; });
    if (!values.dataset) values.format = "";
    values.add_eos_token = previewForm.querySelector('[name="add_eos_token"]').checked;
    LFPreview.run(previewApi, values, previewResults, previewStatus, previewButton);
  });

  renderListing(JSON.parse(document.getElementById("datasets-listing").textContent));
  showRawFields();  // a reload may bring back a chosen raw text
})();
