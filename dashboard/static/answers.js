/* Answers of generation jobs (the prompt, then the base model's and the LoRA's answers side by
   side) and the "Try it" forms that queue one and follow it on the page until its answers
   arrive: the job page's Try it box and the Try a LoRA page. Needs spec_form.js. */
"use strict";

window.LF = window.LF || {};

LF.el = function (tag, attrs, text) {
  const e = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
  if (text !== undefined) e.textContent = text;
  return e;
};

function answerBox(title, answer, testid) {
  const box = LF.el("div", { class: "answer", "data-testid": testid });
  box.appendChild(LF.el("h3", {}, title));
  box.appendChild(LF.el("pre", { class: "answer-text" }, answer ? answer.text : ""));
  if (answer) {
    box.appendChild(LF.el("p", { class: "muted" },
      `${answer.tokens} tokens in ${Number(answer.seconds).toFixed(1)} s`));
  }
  return box;
}

/* A generation result: the prompt as sent, then the two answers side by side. */
LF.answersView = function (r, loraName) {
  const cols = LF.el("div", { class: "answers" });
  cols.appendChild(answerBox("Base model", r.base, "answer-base"));
  if (r.lora) cols.appendChild(answerBox(`Base + ${loraName}`, r.lora, "answer-lora"));
  return [LF.el("h3", {}, "Prompt"),
          LF.el("pre", { class: "answer-text", "data-testid": "prompt-text" }, r.prompt_text || ""),
          cols];
};

/* A Try it form: each Generate queues a generation job and adds an entry at the top of
   `list` (an <ol>) that follows the job until its answers arrive. The form keeps its values
   for the next prompt; the earlier prompts and answers stay listed below. The form's
   data-job-url and data-events-url hold JOB_ID, replaced by the new job's id. */
LF.tryForm = function (form, list) {
  const status = form.querySelector(".submit-status");
  const url = (attr, id) => form.getAttribute(attr).replace("JOB_ID", encodeURIComponent(id));
  LF.specForm(form, "generate", (id) => {
    const loraInput = form.querySelector('[name="lora"]');
    const loraName = loraInput ? loraInput.value : "";
    const item = LF.el("li", { "data-testid": "try-entry", "data-job-id": id });
    const line = LF.el("p", { class: "muted" });
    const stateText = LF.el("span", { "data-testid": "try-state" }, "queued");
    line.append(LF.el("a", { href: url("data-job-url", id), "data-testid": "try-job-link" },
                      `generation job ${id}`), " · ", stateText);
    item.appendChild(line);
    list.prepend(item);
    status.textContent = "queued: the answers appear below";
    const feed = new EventSource(url("data-events-url", id));
    feed.addEventListener("message", (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      if (ev.type === "state") {
        stateText.textContent = ev.state + (ev.state === "failed" && ev.reason ? `: ${ev.reason}` : "");
        item.dataset.state = ev.state;
      } else if (ev.type === "result") {
        item.replaceChildren(line, ...LF.answersView(ev, loraName));
      }
    });
    feed.addEventListener("end", () => { feed.close(); status.textContent = ""; });
  });
};
