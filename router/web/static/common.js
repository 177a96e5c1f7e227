// Shared by the pages: strings, language, fetch, the push socket, small formatters.
// Data is only ever put into the page with textContent (never as HTML).
"use strict";
const CR = (() => {
  const S = window.CR_STRINGS;
  let lang = localStorage.getItem("cr-lang") || "";

  function setLang(value) {
    lang = S[value] ? value : "en";
    document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
    document.querySelectorAll("[data-t]").forEach((el) => { el.textContent = t(el.dataset.t); });
  }
  function t(key, vars) {
    let text = (S[lang] && S[lang][key]) || S.en[key] || key;
    if (vars) for (const [k, v] of Object.entries(vars)) text = text.replace(`{${k}}`, () => String(v));
    return text;
  }
  function toggleLang() {
    setLang(lang === "zh" ? "en" : "zh");
    localStorage.setItem("cr-lang", lang);
    showLive();
    document.dispatchEvent(new Event("cr-lang"));
  }
  // Dates and numbers in the page's language.
  function locale() { return lang === "zh" ? "zh-CN" : "en-GB"; }
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  async function api(path, options) {
    const resp = await fetch(path, Object.assign({credentials: "same-origin"}, options || {}));
    if (resp.status === 401) { location.href = "/ui/login"; throw new Error("unauthorized"); }
    const body = await resp.json().catch(() => ({}));
    return {status: resp.status, body};
  }
  // The push socket, opened again (backing off) whenever it closes; the page's #status
  // says whether it is live. A socket refused at once may mean the sign-in expired: the
  // API is asked, which goes to the sign-in page if so.
  let live = false;
  function showLive() {
    const s = document.getElementById("status");
    if (!s) return;
    s.textContent = live ? t("connected") : t("reconnecting");
    s.className = "status " + (live ? "on" : "off");
  }
  function socket(path, onMessage) {
    let delay = 500;
    let ws;
    function open() {
      let opened = false;
      ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`);
      ws.onopen = () => { opened = true; delay = 500; live = true; showLive(); };
      ws.onmessage = (ev) => { try { onMessage(JSON.parse(ev.data)); } catch (e) { console.error(e); } };
      ws.onclose = () => {
        live = false; showLive();
        if (!opened) api("/ui/api/me").catch(() => {});
        setTimeout(open, delay); delay = Math.min(delay * 2, 10000);
      };
    }
    open();
    return () => ws;
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined || isNaN(seconds)) return t("none");
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const mm = String(m).padStart(2, "0"), ss = String(r).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }
  function percent(x) { return x === null || x === undefined ? t("none") : `${(x * 100).toFixed(1)} %`; }
  function money(x) {
    if (x === null || x === undefined) return t("none");
    return new Intl.NumberFormat(locale()).format(x);
  }
  async function header(me) {
    const who = document.getElementById("who");
    if (who) who.textContent = `${me.user} · ${me.role}${me.agent ? " · " + me.agent : ""}`;
    const out = document.getElementById("sign-out");
    if (out) out.addEventListener("click", async () => {
      await fetch("/ui/logout", {method: "POST", credentials: "same-origin"});
      location.href = "/ui/login";
    });
    const sw = document.getElementById("lang");
    if (sw) sw.addEventListener("click", toggleLang);
  }
  function init(defaultLang) {
    setLang(lang || defaultLang || "zh");
  }
  return {t, el, api, socket, duration, percent, money, header, init, toggleLang, locale,
          get lang() { return lang; }};
})();
