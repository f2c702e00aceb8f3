/* Evaluations and Generate pages: their job forms, and comments saved as they are edited. */
"use strict";

(function () {
  const evalForm = document.getElementById("eval-form");
  if (evalForm) LF.specForm(evalForm, "evaluate");
  const genForm = document.getElementById("generate-form");
  // Answered on this page (answers.js), the form kept filled for the next prompt.
  if (genForm) LF.tryForm(genForm, document.getElementById("try-history"));

  // "Measure the base": a perplexity job of the base model alone on the row's text and
  // settings, queued through the jobs API; the cell then links to it.
  const evalApi = evalForm ? evalForm.getAttribute("data-api") : null;
  const jobUrl = evalForm ? evalForm.getAttribute("data-job-url") : null;
  document.querySelectorAll('button[data-testid="measure-base"]').forEach((button) => {
    button.addEventListener("click", async () => {
      button.disabled = true;
      const res = await LF.api(evalApi, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ kind: "evaluate", spec: JSON.parse(button.dataset.spec) }),
      });
      const cell = button.parentElement;
      if (res.ok) {
        const a = document.createElement("a");
        a.href = jobUrl.replace("JOB_ID", encodeURIComponent(res.body.id));
        a.dataset.testid = "vs-base-job";
        a.textContent = "being measured";
        cell.replaceChildren(a);
      } else {
        button.disabled = false;
        const err = document.createElement("span");
        err.className = "field-error";
        err.dataset.testid = "measure-base-error";
        err.textContent = (res.body && res.body.error) || `HTTP ${res.status}`;
        cell.appendChild(err);
      }
    });
  });

  document.querySelectorAll("input.comment[data-url]").forEach((input) => {
    input.addEventListener("change", async () => {
      const saved = input.parentElement.querySelector(".saved");
      const res = await LF.api(input.dataset.url, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ comment: input.value }),
      });
      saved.textContent = res.ok ? "saved" : (res.body && res.body.error) || "not saved";
      saved.hidden = false;
    });
  });
})();
