/* Users page (admins): add, remove, change a role, make or revoke API tokens, through the API. */
"use strict";

(function () {
  const table = document.querySelector('[data-testid="users-table"]');
  const api = table.getAttribute("data-api");
  const errorBox = document.getElementById("users-error");
  const tokenBox = document.getElementById("new-token");
  const form = document.getElementById("add-user");

  function showError(message) {
    errorBox.textContent = message || "";
    errorBox.hidden = !message;
  }

  async function call(url, body) {
    showError("");
    const res = await LF.api(url, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    if (!res.ok) showError((res.body && res.body.error) || `HTTP ${res.status}`);
    return res;
  }

  const userUrl = (name, tail) => `${api}/${encodeURIComponent(name)}/${tail}`;

  table.querySelectorAll('[data-testid="user-row"]').forEach((row) => {
    const name = row.dataset.user;
    row.querySelector(".user-role").addEventListener("change", async (e) => {
      const res = await call(userUrl(name, "role"), { role: e.target.value });
      if (res.ok) window.location.reload();
    });
    row.querySelector(".user-token").addEventListener("click", async () => {
      const res = await call(userUrl(name, "token"));
      if (!res.ok) return;
      // Shown once: only its digest is kept.
      tokenBox.replaceChildren(
        `New API token for ${name} (copy it now, it is not shown again): `,
        Object.assign(document.createElement("code"), { textContent: res.body.token }));
      tokenBox.hidden = false;
    });
    row.querySelector(".user-revoke").addEventListener("click", async () => {
      const res = await call(userUrl(name, "token/revoke"));
      if (res.ok) window.location.reload();
    });
    row.querySelector(".user-remove").addEventListener("click", async () => {
      if (!window.confirm(`Remove ${name}? Their jobs stay.`)) return;
      const res = await call(userUrl(name, "remove"));
      if (res.ok) window.location.reload();
    });
  });

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = Object.fromEntries(new FormData(form).entries());
    if (data.password !== data.password2) { showError("the two passwords differ"); return; }
    const res = await call(api, { name: data.name, role: data.role, password: data.password });
    if (res.ok) window.location.reload();
  });
})();
