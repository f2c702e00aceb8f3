/* Sample previews, shared by the Datasets page and the New job form: ask the preview API and
   show each sample's text with the trained part in <mark>, its token counts, and the totals. */
"use strict";

window.LFPreview = (function () {
  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function stat(key, value, testid) {
    const box = el("div", "stat");
    box.append(el("span", "k", key), el("span", "v", value));
    if (testid) box.dataset.testid = testid;
    return box;
  }

  function renderStats(st) {
    const box = el("div", "stats preview-stats");
    box.setAttribute("data-testid", "preview-stats");
    box.dataset.samples = st.samples;
    box.dataset.tokens = st.tokens;
    box.dataset.truncated = st.truncated;
    box.append(
      stat("samples", st.samples),
      stat("tokens", st.tokens),
      stat("trained tokens", st.trained_tokens),
      stat(`cut at ${st.cutoff_len}`, st.truncated),
      stat("nothing trained", st.untrained),
      stat("longest", st.longest),
    );
    return box;
  }

  function renderSample(s, index) {
    const card = el("div", "preview-sample");
    card.setAttribute("data-testid", "preview-sample");
    card.dataset.tokens = s.tokens;
    card.dataset.trainedTokens = s.trained_tokens;
    card.dataset.truncated = s.truncated ? "1" : "0";
    const head = el("div", "sample-head");
    head.append(el("span", "sample-index", `#${index}`),
                el("span", "sample-tokens", `${s.tokens} tokens`),
                el("span", "sample-trained", `${s.trained_tokens} trained`));
    if (s.truncated) head.append(el("span", "badge state-retrying", "cut at cutoff_len"));
    if (!s.trained_tokens) head.append(el("span", "badge state-failed", "nothing trained"));
    const text = el("pre", "sample-text");
    // textContent only: dataset text is shown, never interpreted as HTML.
    if (s.prompt_text) text.append(el("span", "sample-prompt", s.prompt_text));
    if (s.trained_text) text.append(el("mark", "sample-trained-text", s.trained_text));
    card.append(head, text);
    return card;
  }

  function render(container, body) {
    container.replaceChildren();
    const st = body.stats || {};
    container.append(renderStats(st));
    const samples = body.samples || [];
    if (samples.length < (st.samples || 0)) {
      container.append(el("p", "muted", `showing the first ${samples.length} of ${st.samples} samples`));
    }
    if (!samples.length) container.append(el("p", "empty", "no samples: the data gives nothing to train on"));
    samples.forEach((s, i) => container.append(renderSample(s, i)));
    container.hidden = false;
  }

  function showError(container, message, errors) {
    container.replaceChildren();
    const box = el("div", "form-error", message);
    box.setAttribute("data-testid", "preview-error");
    box.setAttribute("role", "alert");
    const details = (errors || []).filter((e) => e.message && !message.includes(e.message));
    if (details.length) {
      const list = el("ul");
      details.forEach((e) => list.append(el("li", "", `${e.field}: ${e.message}`)));
      box.append(list);
    }
    container.append(box);
    container.hidden = false;
  }

  /* values: {name: string|boolean}; empty strings are left out, so the server's defaults apply. */
  async function run(url, values, container, statusEl, button) {
    const q = new URLSearchParams();
    Object.entries(values).forEach(([k, v]) => {
      if (typeof v === "boolean") { if (v) q.set(k, "1"); return; }
      if (v !== null && v !== undefined && (v !== "" || k === "hard_cut_string")) q.set(k, v);
    });
    if (button) button.disabled = true;
    if (statusEl) statusEl.textContent = "tokenizing…";
    container.setAttribute("aria-busy", "true");
    let res;
    try {
      res = await LF.api(`${url}?${q.toString()}`);
    } catch (err) {
      res = { ok: false, status: 0, body: { error: "cannot reach the dashboard" } };
    }
    if (button) button.disabled = false;
    container.removeAttribute("aria-busy");
    if (statusEl) statusEl.textContent = "";
    if (res.ok) render(container, res.body);
    else showError(container, (res.body && res.body.error) || `HTTP ${res.status}`, res.body && res.body.errors);
    return res;
  }

  return { render, run, showError };
})();
