// The supervisor's page: live figures pushed every second or so; today's charts from
// callroute's own records, refreshed every minute.
"use strict";
(async () => {
  const {t, el} = CR;
  const SVG = "http://www.w3.org/2000/svg";
  const OUTCOMES = ["answered", "voicemail", "missed", "abandoned", "rejected", "busy", "failed"];
  let live = null, today = null;
  const me = (await CR.api("/ui/api/me")).body;
  CR.init(me.language);
  CR.header(me);
  const day = new URLSearchParams(location.search).get("day") || "";
  const dayQuery = /^\d{4}-\d{2}-\d{2}$/.test(day) ? `?day=${day}` : "";
  const csv = document.getElementById("csv");
  csv.href = "/ui/api/today.csv" + dayQuery;
  if (!me.can.customers) csv.hidden = true;

  function table(headers, rows) {
    const thead = el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {scope: "col", text: h}))));
    const tbody = el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {text: c === null || c === undefined ? t("none") : String(c)})))));
    return el("table", {}, thead, tbody);
  }
  function tile(label, value, cls) {
    return el("div", {class: "tile" + (cls ? " " + cls : "")}, el("span", {class: "label", text: label}), el("span", {class: "value", text: value}));
  }
  function svg(tag, attrs, ...children) {
    const n = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    for (const c of children) n.append(c);
    return n;
  }
  function bars(groups, series, max, fmt, labelEvery) {
    // groups: [{label, values: {series: number}}]; stacked bars, one per group.
    const w = 420, h = 180, base = 150, left = 46, right = 6;
    const chart = svg("svg", {viewBox: `0 0 ${w} ${h}`, role: "img", class: "chart"});
    const top = max || Math.max(1, ...groups.map((g) => series.reduce((s, k) => s + (g.values[k] || 0), 0)));
    chart.append(svg("line", {x1: left, y1: base, x2: w - right, y2: base, class: "axis"}));
    chart.append(svg("text", {x: left - 4, y: 14, class: "tick", "text-anchor": "end"}, document.createTextNode(fmt ? fmt(top) : String(top))));
    chart.append(svg("text", {x: left - 4, y: base, class: "tick", "text-anchor": "end"}, document.createTextNode("0")));
    const slot = (w - left - right) / Math.max(groups.length, 1);
    const bw = Math.max(4, Math.min(56, slot - 6));
    groups.forEach((g, i) => {
      let y = base;
      const x = left + i * slot + (slot - bw) / 2;
      for (const k of series) {
        const v = g.values[k] || 0;
        if (!v) continue;
        const bh = (v / top) * (base - 14);
        y -= bh;
        const r = svg("rect", {x, y, width: bw, height: bh, class: "s-" + k});
        const name = OUTCOMES.includes(k) ? t("outcome_" + k) : "";
        r.append(svg("title", {}, document.createTextNode(`${g.label}${name ? " · " + name : ""}: ${fmt ? fmt(v) : v}`)));
        chart.append(r);
      }
      if (!labelEvery || i % labelEvery === 0) {
        chart.append(svg("text", {x: x + bw / 2, y: base + 16, class: "tick", "text-anchor": "middle"}, document.createTextNode(g.label)));
      }
    });
    return chart;
  }
  function legend(series) {
    return el("p", {class: "legend"}, ...series.map((k) => el("span", {class: "key s-" + k, text: t("outcome_" + k)})));
  }

  function renderLive() {
    if (!live) return;
    const alerts = document.getElementById("alerts");
    alerts.replaceChildren(...live.alerts.map((a) => {
      const vars = a.code === "sync_rate" ? {value: CR.percent(a.value), limit: CR.percent(a.limit)}
        : a.code === "oldest" ? {value: CR.duration(a.value), limit: CR.duration(a.limit)} : {};
      return el("p", {class: "alert", text: t("alert_" + a.code, vars)});
    }));
    const ob = live.outbox || {};
    const sync = live.sync || {};
    document.getElementById("tiles").replaceChildren(
      tile(t("waiting"), String(live.waiting), live.waiting ? "warn" : ""),
      tile(t("talking_n"), String(live.talking)),
      tile(t("longest_wait"), CR.duration(live.longest_wait_s), live.longest_wait_s > 60 ? "bad" : ""),
      tile(t("owner_rate"), CR.percent(live.owner_hour.rate)),
      tile(t("sync_rate"), CR.percent(sync.success_rate), live.alerts.some((a) => a.code === "sync_rate") ? "bad" : ""),
      tile(t("depth"), ob.depth === undefined ? t("none") : String(ob.depth), ob.depth ? "warn" : ""));
    const qs = Object.entries(live.queues).map(([q, v]) => [q === "-" ? t("direct") : q, v.waiting, v.talking, CR.duration(v.longest_wait_s)]);
    document.getElementById("queues").replaceChildren(table([t("queue"), t("waiting"), t("talking_n"), t("longest_wait")], qs));
    const calls = live.calls.map((c) => [me.can.customers ? (c.customer || c.customer_id || t(c.anonymous ? "withheld" : "unknown_caller")) : t("customers_hidden"),
      c.tier || t("tier_none"), t(c.state === "talking" ? "talking" : c.state === "waiting" ? "waiting" : "ringing"),
      c.queue || t("direct"), c.agent, c.wait_s !== null ? CR.duration(c.wait_s) : CR.duration(c.since_s), c.rule,
      c.degraded ? `⚠ ${c.degraded}` : ""]);
    document.getElementById("calls").replaceChildren(table([t("customer"), t("tier"), t("state"), t("queue"), t("agent_id"), t("longest_wait"), t("rule"), t("degraded")], calls));
    document.getElementById("agents").replaceChildren(table([t("agent_id"), "", t("presence"), t("on_call"), t("page")],
      live.agents.map((a) => [a.id, a.name, a.presence ? t("dev_" + a.presence) : null,
        a.call ? t(a.call) : "", a.page ? "●" : ""])));
    document.getElementById("rules").replaceChildren(table([t("rule"), t("reason"), t("calls")],
      live.rules_hour.map((r) => [r.rule, r.reason, r.calls])));
    const lk = live.lookups || {};
    const ms = (x) => (x === null || x === undefined ? t("none") : `${x.toFixed(0)} ms`);
    document.getElementById("health").replaceChildren(table(["", ""], [
      [t("breaker"), t("state_" + (lk.breaker || "closed"))],
      [t("latency"), `${ms(lk.crm_p50_ms)} / ${ms(lk.crm_p95_ms)}`],
      [t("outbox") + " · " + t("depth"), ob.depth],
      [t("oldest"), ob.oldest_age_s !== undefined ? CR.duration(ob.oldest_age_s) : null],
      [t("dead"), ob.dead],
      [t("sync_rate"), `${CR.percent(sync.success_rate)} (${sync.attempts || 0})`],
    ]));
  }

  function renderToday() {
    if (!today) return;
    document.getElementById("day").textContent = today.day;
    const hours = [];
    for (let h = 0; h < 24; h++) {
      const key = String(h).padStart(2, "0");
      hours.push({label: key, values: today.hours[key] || {}});
    }
    const any = Object.keys(today.hours).length > 0;
    const hb = document.getElementById("chart-hours");
    const flags = today.flags || {};
    hb.replaceChildren(any ? bars(hours, OUTCOMES, null, null, 3) : el("p", {class: "muted", text: t("no_data")}), legend(OUTCOMES),
      el("p", {class: "muted", id: "flags", text: t("flags_today", {anonymous: flags.anonymous || 0, degraded: flags.degraded || 0})}));
    const tiers = Object.entries(today.wait_by_tier).map(([k, v]) => ({label: k === "none" ? t("tier_none") : k, values: {avg: v.avg_s || 0}}));
    document.getElementById("chart-wait").replaceChildren(tiers.length ? bars(tiers, ["avg"], null, (x) => `${x.toFixed(0)}s`) : el("p", {class: "muted", text: t("no_data")}));
    const queues = Object.entries(today.answer_by_queue).map(([k, v]) => ({label: k, values: {rate: (v.rate || 0) * 100}}));
    document.getElementById("chart-queues").replaceChildren(queues.length ? bars(queues, ["rate"], 100, (x) => `${x.toFixed(0)}%`) : el("p", {class: "muted", text: t("no_data")}));
  }

  async function loadToday() {
    const {status, body} = await CR.api("/ui/api/today" + dayQuery);
    if (status === 200) { today = body; renderToday(); }
  }
  // The audit trail (supervisors and admins): who read or changed what, newest first.
  const auditPanel = document.getElementById("audit-panel");
  let audit = null;
  function renderAudit() {
    if (!audit) return;
    const box = document.getElementById("audit");
    if (audit.error) { box.replaceChildren(el("p", {class: "message", text: t("audit_unavailable")})); return; }
    if (!audit.entries.length) { box.replaceChildren(el("p", {class: "muted", text: t("audit_none")})); return; }
    const rows = [...audit.entries].reverse().map((e) => [
      new Date(e.at * 1000).toLocaleString(CR.locale()),
      e.who, e.role, e.action, e.target, e.source, e.outcome]);
    box.replaceChildren(table([t("audit_time"), t("audit_who"), t("audit_role"), t("audit_action"),
      t("audit_target"), t("audit_source"), t("audit_outcome")], rows));
  }
  async function loadAudit() {
    const since = document.getElementById("audit-since").value;
    const q = new URLSearchParams({limit: "200"});
    if (since) q.set("since", new Date(since).toISOString());
    const who = document.getElementById("audit-who").value.trim();
    if (who) q.set("who", who);
    const action = document.getElementById("audit-action").value;
    if (action) q.set("action", action);
    const {status, body} = await CR.api("/api/audit?" + q.toString());
    audit = status === 200 && Array.isArray(body) ? {entries: body} : {error: status};
    renderAudit();
  }
  if (me.can.audit) {
    auditPanel.hidden = false;
    const start = new Date(Date.now() - 24 * 3600 * 1000);
    start.setMinutes(start.getMinutes() - start.getTimezoneOffset());
    document.getElementById("audit-since").value = start.toISOString().slice(0, 16);
    document.getElementById("audit-form").addEventListener("submit", (ev) => { ev.preventDefault(); loadAudit(); });
    loadAudit();
  }

  loadToday();
  setInterval(loadToday, 60000);
  document.addEventListener("cr-lang", () => { renderLive(); renderToday(); renderAudit(); });
  CR.socket("/ui/ws/live", (msg) => { if (msg.type === "live") { live = msg.live; renderLive(); } });
})();
