// The agent's page: the customer's card, pushed when the phone rings; after the call,
// the disposition and note that go onto the call record. The agent's calls still
// awaiting a disposition (pushed by the server, kept there: they survive "Later" and a
// reload) are listed below the cards, each opening the same form.
"use strict";
(async () => {
  const {t, el} = CR;
  const cards = new Map();       // call id -> card (as last pushed)
  const drafts = new Map();      // call id -> {code, note} typed so far
  const messages = new Map();    // call id -> message to show on the card or list entry
  let pending = [];              // my calls awaiting a disposition (the server's list)
  let pendingOn = false;         // this page gets that list (an agent's own page)
  let openCall = null;           // the list entry whose form is open
  let me = null;

  const meResp = await CR.api("/ui/api/me");
  me = meResp.body;
  CR.init(me.language);
  CR.header(me);
  const params = new URLSearchParams(location.search);
  const agent = params.get("agent") || me.agent || "";
  function binding() {
    document.getElementById("binding").textContent =
      `${t("agent_id")} ${agent}${me.agent_name ? " · " + me.agent_name : ""}` +
      `${me.device ? " · " + t("device") + " " + me.device : ""}`;
  }
  binding();

  function row(label, value, cls) {
    return el("div", {class: "row" + (cls ? " " + cls : "")},
      el("dt", {text: label}), el("dd", {text: value === null || value === undefined || value === "" ? t("none") : String(value)}));
  }

  function whyText(card) {
    const w = card.why || {};
    if (card.via === "queue") return `${t("via_queue")} ${card.queue || w.queue || ""}`;
    return w.owner ? t("via_dial_owner") : t("via_dial");
  }

  function degradedText(code) {
    const key = "degraded_" + code;
    return t(key) !== key ? t(key) : t("degraded_other", {reason: code});
  }

  function canDispose() {
    return (me.wrapup_s > 0 || me.late_s > 0) && me.role === "agent";
  }

  function renderCard(card) {
    const c = card.customer || {};
    const name = c.name || card.caller_name || t(card.anonymous ? "withheld" : "unknown_caller");
    const phone = card.anonymous ? t("withheld") : card.caller;
    const stateText = {ringing: t("ringing"), talking: t("talking"), ended: t("ended")}[card.state];
    const timer = el("span", {class: "timer", "data-call": card.call});
    const head = el("div", {class: "card-head"},
      el("span", {class: "state " + card.state, text: stateText}),
      el("h2", {text: name}),
      c.tier ? el("span", {class: "tier tier-" + c.tier, text: c.tier}) : null,
      timer);
    const known = !!card.customer;
    const facts = !known ? el("dl", {class: "facts"}, row("☎", phone),
                              row(t("customer"), t("not_in_crm"))) : el("dl", {class: "facts"},
      row(t("customer"), c.id),
      row(t("tier"), c.tier),
      row(t("value"), c.value !== undefined && c.value !== null ? CR.money(c.value) : null),
      row(t("owner"), c.owner ? (c.owner === card.agent ? `${c.owner} (${t("you")})` : c.owner) : null),
      row(t("tags"), (c.tags || []).join(", ")),
      row(t("open_tickets"), c.open_tickets, c.open_tickets > 0 ? "warn" : ""),
      row(t("language"), c.language),
      row("☎", phone));
    const w = card.why || {};
    const why = el("div", {class: "why"},
      el("h3", {text: t("why")}),
      el("p", {class: "via", text: whyText(card)}),
      el("p", {text: `${t("rule")}: ${w.rule || t("none")}${w.description ? " — " + w.description : ""}`}),
      el("p", {text: `${t("reason")}: ${w.reason || t("none")}${w.note ? " · " + w.note : ""}`}),
      card.degraded ? el("p", {class: "degraded", role: "note", text: degradedText(card.degraded)}) : null);
    const last = el("div", {class: "last"}, el("h3", {text: t("last_calls")}));
    if (card.last_calls && card.last_calls.length) {
      const list = el("ul");
      for (const call of card.last_calls) {
        const when = call.start ? new Date(call.start).toLocaleString(CR.locale()) : "";
        list.append(el("li", {text: `${when} · ${t("outcome_" + (call.outcome || "unknown"))}` +
          `${call.agent ? " · " + call.agent : ""}${call.disposition ? " · " + call.disposition : ""}` +
          `${call.talk_s ? " · " + CR.duration(call.talk_s) : ""}`}));
      }
      last.append(list);
    } else {
      // [] read and empty; an error said so; null only while they are being read (the
      // server always ends it with one of the other two)
      last.append(card.last_calls_error
        ? el("p", {class: "muted last-error", role: "status", text: t("last_calls_error")})
        : el("p", {class: "muted", text: card.last_calls ? t("no_last_calls") : t("loading")}));
    }
    const links = el("div", {class: "links"},
      card.crm_link ? el("a", {href: card.crm_link, target: "_blank", rel: "noopener noreferrer",
                               text: t("open_in_crm")}) : null);
    const node = el("article", {class: "card " + card.state, id: "card-" + card.call,
                                tabindex: "-1", "aria-label": `${t("incoming")}: ${name}`},
      head, el("div", {class: "card-body"}, facts, why, last), links);
    if (card.state === "ended" && canDispose()) node.append(wrapForm(card, "card"));
    const msg = messages.get(card.call);
    if (msg) node.append(el("p", {class: "message", role: "status", text: msg}));
    return node;
  }

  // The disposition form of a call, on its ended card ("card") or its list entry ("list").
  function wrapForm(card, where) {
    const draft = drafts.get(card.call) || {code: "", note: ""};
    drafts.set(card.call, draft);
    const options = el("div", {class: "codes", role: "radiogroup", "aria-label": t("disposition")});
    me.dispositions.forEach((d, i) => {
      const id = `code-${card.call}-${d.code}`;
      const input = el("input", {type: "radio", name: "code-" + card.call, id, value: d.code,
                                 checked: draft.code === d.code,
                                 onchange: () => { draft.code = d.code; }});
      options.append(el("label", {for: id, class: "code"}, input,
        el("kbd", {text: String(i + 1)}), document.createTextNode(" " + (d[CR.lang] || d.en))));
    });
    const note = el("textarea", {id: "note-" + card.call, rows: "2", maxlength: "2000",
                                 oninput: (e) => { draft.note = e.target.value; }});
    note.value = draft.note;
    const left = el("p", {class: "muted wrapup-left", "data-until": card.wrapup_until || ""});
    const form = el("form", {class: "wrapup", "data-call": card.call, "data-where": where,
                             onsubmit: (e) => { e.preventDefault(); save(card.call); }},
      el("fieldset", {}, el("legend", {text: t("disposition")}), options),
      el("label", {for: "note-" + card.call, text: t("note")}), note,
      el("div", {class: "actions"},
        el("button", {type: "submit", class: "primary", text: t("save")}),
        el("button", {type: "button", class: "link", text: t("skip"),
                      onclick: () => later(card.call, where)})),
      left);
    return form;
  }

  async function save(call) {
    const draft = drafts.get(call) || {};
    if (!draft.code) { messages.set(call, t("unknown_code")); render(); return; }
    const {status, body} = await CR.api(`/ui/api/calls/${encodeURIComponent(call)}/disposition`, {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({code: draft.code, note: draft.note || ""}),
    });
    if (status === 200) {
      drafts.delete(call); cards.delete(call); messages.delete(call);
      pending = pending.filter((p) => p.call !== call);
      if (openCall === call) openCall = null;
      flash(t(body.updated ? "saved_update" : "saved"));
    } else {
      messages.set(call, t(body.error || "not_available"));
    }
    render();
  }

  // "Later": the card goes (the call stays in the list); a list entry's form closes.
  function later(call, where) {
    if (where === "card") {
      cards.delete(call);
    } else if (openCall === call) {
      openCall = null;
    }
    render();
    const entry = document.getElementById("pending-" + call);
    if (entry) entry.focus();
  }

  function toggle(call) {
    openCall = openCall === call ? null : call;
    render();
    const form = document.querySelector(`form.wrapup[data-call="${CSS.escape(call)}"]`);
    const first = form && (form.querySelector("input[type=radio]:checked") || form.querySelector("input[type=radio]"));
    if (first) first.focus();
  }

  function when(row) {
    const at = row.start ? new Date(row.start) : new Date(row.ended_at * 1000);
    return at.toLocaleString(CR.locale(),
      {month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit"});
  }

  function visiblePending() {
    const now = Date.now() / 1000;
    return pending.filter((p) => !cards.has(p.call) && (!p.until || p.until > now));
  }

  function pendingItem(p) {
    const name = p.name || t(p.anonymous ? "withheld" : "unknown_caller");
    const open = openCall === p.call;
    const button = el("button", {type: "button", class: "pending-call", id: "pending-" + p.call,
                                 "data-call": p.call, "aria-expanded": open ? "true" : "false",
                                 title: t("pending_open"), onclick: () => toggle(p.call)},
      el("span", {class: "when", text: when(p)}),
      el("span", {class: "who", text: name}),
      el("span", {class: "number", text: p.anonymous ? t("withheld") : (p.number || "")}),
      el("span", {class: "outcome", text: t("outcome_" + (p.outcome || "unknown"))}),
      p.tier ? el("span", {class: "tier tier-" + p.tier, text: p.tier}) : null,
      p.talk_s ? el("span", {class: "talk", text: `${t("talk_time")} ${CR.duration(p.talk_s)}`}) : null,
      el("span", {class: "state-note pending-state", "data-held-until": p.held && p.wrapup_until ? p.wrapup_until : ""}));
    const item = el("li", {}, button);
    if (open) item.append(wrapForm({call: p.call, wrapup_until: p.held ? p.wrapup_until : null}, "list"));
    const msg = messages.get(p.call);
    if (msg) item.append(el("p", {class: "message", role: "status", text: msg}));
    return item;
  }

  function renderPending() {
    document.getElementById("pending").hidden = !pendingOn;
    if (!pendingOn) return;
    const rows = visiblePending();
    if (openCall && !rows.some((p) => p.call === openCall)) openCall = null;
    document.getElementById("pending-none").hidden = rows.length > 0;
    document.getElementById("pending-list").replaceChildren(...rows.map(pendingItem));
  }

  function flash(text) {
    const n = document.getElementById("announce");
    n.textContent = text;
    const f = el("p", {class: "flash", role: "status", text});
    document.getElementById("main").prepend(f);
    setTimeout(() => f.remove(), 4000);
  }

  // Drawing replaces the nodes: the focus, and the caret in a note being typed, are put
  // back; while an input method composes (Chinese), drawing waits for it to end.
  let composing = false, deferred = false;
  document.addEventListener("compositionstart", () => { composing = true; });
  document.addEventListener("compositionend", () => {
    composing = false;
    if (deferred) { deferred = false; render(); }
  });
  function keepingFocus(draw) {
    if (composing) { deferred = true; return; }
    const active = document.activeElement;
    const caret = active && active.tagName === "TEXTAREA" ? [active.selectionStart, active.selectionEnd] : null;
    draw();
    const again = active && active.id ? document.getElementById(active.id) : null;
    if (!again || again === active) return;
    again.focus();
    if (caret) again.setSelectionRange(caret[0], caret[1]);
  }

  function render() {
    keepingFocus(() => {
      const box = document.getElementById("cards");
      box.replaceChildren(...[...cards.values()].sort((a, b) => a.rang_at - b.rang_at).map(renderCard));
      document.getElementById("empty").hidden = cards.size > 0;
      renderPending();
    });
    tick();
  }

  function tick() {
    const now = Date.now() / 1000;
    for (const card of cards.values()) {
      const node = document.querySelector(`.timer[data-call="${CSS.escape(card.call)}"]`);
      if (!node) continue;
      if (card.state === "talking") node.textContent = `${t("talk_time")} ${CR.duration(now - card.answered_at)}`;
      else if (card.state === "ringing") node.textContent = `${t("ring_time")} ${CR.duration(now - card.rang_at)}`;
      else node.textContent = `${t("talk_time")} ${CR.duration(card.ended_at - card.answered_at)}`;
    }
    document.querySelectorAll(".wrapup-left").forEach((n) => {
      const until = parseFloat(n.dataset.until);
      if (!until) n.textContent = "";
      else if (until > now) n.textContent = `${t("wrapup_left")} ${CR.duration(until - now)}`;
      else n.textContent = me.late_s > 0 ? t("wrapup_late") : t("already_sent");
    });
    document.querySelectorAll(".pending-state").forEach((n) => {
      const until = parseFloat(n.dataset.heldUntil);
      n.textContent = until && until > now ? t("pending_held", {left: CR.duration(until - now)})
        : t("pending_late");
    });
    if (pendingOn && document.querySelectorAll(".pending-call").length !== visiblePending().length) keepingFocus(renderPending);
  }
  setInterval(tick, 1000);

  function onMessage(msg) {
    if (msg.type === "hello") {
      // After a reconnect, a call whose ended card was open comes back on the list (the
      // server lists ended calls there): its form stays open there, with what was typed.
      const wasOpen = [...cards.values()].filter((c) => c.state === "ended").map((c) => c.call);
      cards.clear();
      for (const c of msg.cards) cards.set(c.call, c);
      pendingOn = Array.isArray(msg.pending);
      pending = msg.pending || [];
      const moved = wasOpen.find((call) => !cards.has(call) && pending.some((p) => p.call === call));
      if (!openCall && moved) openCall = moved;
    } else if (msg.type === "pending") {
      pendingOn = true;
      pending = msg.calls;
    } else if (msg.type === "card") {
      const isNew = !cards.has(msg.card.call);
      cards.set(msg.card.call, msg.card);
      if (isNew && msg.card.state === "ringing") {
        const c = msg.card.customer || {};
        document.getElementById("announce").textContent =
          `${t("incoming")}: ${c.name || msg.card.caller_name || t(msg.card.anonymous ? "withheld" : "unknown_caller")}`;
      }
    } else if (msg.type === "close") {
      cards.delete(msg.call);
      drafts.delete(msg.call);
    }
    render();
    if (msg.type === "card" && msg.card.state === "ended") {
      const first = document.querySelector(`#card-${CSS.escape(msg.card.call)} input[type=radio]`);
      if (first && !document.activeElement.closest(".wrapup")) first.focus();
    }
  }

  // The form the keys act on: the one holding the focus, else the first ended card's,
  // else the list entry's that is open.
  function activeForm() {
    const focused = document.activeElement;
    const form = focused && focused.closest ? focused.closest("form.wrapup") : null;
    if (form) return {call: form.dataset.call, where: form.dataset.where};
    const ended = [...cards.values()].filter((c) => c.state === "ended");
    if (ended.length) return {call: ended[0].call, where: "card"};
    if (openCall) return {call: openCall, where: "list"};
    return null;
  }

  function moveInList(ev) {
    const buttons = [...document.querySelectorAll(".pending-call")];
    if (!buttons.length) return false;
    if (ev.altKey && (ev.key === "l" || ev.key === "L")) { buttons[0].focus(); return true; }
    const at = buttons.indexOf(document.activeElement);
    if (at < 0 || (ev.key !== "ArrowDown" && ev.key !== "ArrowUp")) return false;
    buttons[(at + (ev.key === "ArrowDown" ? 1 : buttons.length - 1)) % buttons.length].focus();
    return true;
  }

  document.addEventListener("keydown", (ev) => {
    if (!canDispose()) return;
    if (moveInList(ev)) { ev.preventDefault(); return; }
    const active = activeForm();
    if (!active) return;
    const call = active.call;
    const inNote = ev.target && ev.target.tagName === "TEXTAREA";
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); save(call); return; }
    if (ev.key === "Escape") { later(call, active.where); return; }
    if (!inNote && /^[1-9]$/.test(ev.key)) {
      const d = me.dispositions[parseInt(ev.key, 10) - 1];
      if (!d) return;
      const draft = drafts.get(call) || {code: "", note: ""};
      draft.code = d.code; drafts.set(call, draft);
      render();
      const input = document.getElementById(`code-${call}-${d.code}`);
      if (input) input.focus();
    }
  });
  document.addEventListener("cr-lang", () => { binding(); render(); });

  const query = params.get("agent") ? `?agent=${encodeURIComponent(agent)}` : "";
  CR.socket(`/ui/ws/agent${query}`, onMessage);
})();
