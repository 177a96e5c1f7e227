"use strict";
CR.init("zh");
document.getElementById("lang").addEventListener("click", CR.toggleLang);
document.getElementById("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const error = document.getElementById("error");
  error.textContent = "";
  const token = document.getElementById("token").value;
  const resp = await fetch("/ui/login", {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify({token}),
  });
  const body = await resp.json().catch(() => ({}));
  if (resp.ok) { location.href = body.home; return; }
  error.textContent = CR.t(body.error || "bad_token");
});
