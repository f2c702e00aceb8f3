/* Evaluations and Generate pages: their job forms, and comments saved as they are edited. */
"use strict";

(function () {
  const evalForm = document.getElementById("eval-form");
  if (evalForm) LF.specForm(evalForm, "evaluate");
  const genForm = document.getElementById("generate-form");
  // Answered on this page (answers.js), the form kept filled for the next prompt.
  if (genForm) LF.tryForm(genForm, document.getElementById("try-history"));

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
