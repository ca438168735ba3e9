"use strict";
// flux-edge console: plain JS, no framework. State from /api/v1, live by Server-Sent Events.
const $ = (s) => document.querySelector(s);
let csrf = "", role = "", es = null, devices = [], status = null;
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const fmt = (v) => typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(2)) : String(v);
const ago = (s) => s == null ? "–" : s < 90 ? `${s.toFixed(0)} s` : s < 5400 ? `${(s / 60).toFixed(0)} min` : `${(s / 3600).toFixed(1)} h`;
const key = (d, n) => `${d}\u0000${n}`;

async function api(path, body) {
  const opt = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(body)};
  const r = await fetch("/api/v1/" + path, {credentials: "same-origin", ...opt});
  let data = {};
  try { data = await r.json(); } catch (e) { data = {error: r.statusText}; }
  return {status: r.status, ok: r.ok, data};
}

function spark(points) {
  if (!points || points.length < 2) return "";
  const ys = points.map((p) => p[1]), lo = Math.min(...ys), hi = Math.max(...ys), t0 = points[0][0], t1 = points[points.length - 1][0];
  const pts = points.map((p) => `${((p[0] - t0) / ((t1 - t0) || 1) * 88 + 1).toFixed(1)},${(21 - (p[1] - lo) / ((hi - lo) || 1) * 20).toFixed(1)}`).join(" ");
  return `<svg class="spark" viewBox="0 0 90 22"><polyline points="${pts}"/></svg>`;
}

function stateClass(s) { return s === "online" || s === "armed" || s === "on" ? "ok" : s === "failing" || s === "back-off" || s === "error" || s === "firing" ? "bad" : "warn"; }

function renderValues() {
  $("#values").innerHTML = devices.map((d) => `<div class="card"><h3>${esc(d.device)} <span class="pill ${stateClass(d.state)}" data-state="${esc(d.device)}">${esc(d.state)}</span>
    <span class="muted">${esc(d.source)} · ${d.polls} polls · ${d.errors} errors · last ok ${ago(d.last_success_age_s)}</span></h3>
    ${d.last_error && d.state !== "online" ? `<p class="err">${esc(d.last_error)}</p>` : ""}
    <table>${d.values.map((v) => `<tr><td>${esc(v.name)}</td><td class="v" data-value="${esc(key(d.device, v.name))}">${esc(fmt(v.value))} ${esc(v.unit)}</td>
    <td><span class="pill ${v.quality === "good" ? "ok" : "bad"}">${esc(v.quality)}</span></td><td class="muted" data-age="${esc(key(d.device, v.name))}">${ago(v.age_s)}</td><td class="hide-s">${spark(v.trend)}</td></tr>`).join("")}</table></div>`).join("") || "<p>No devices.</p>";
}

function onValues(list) {
  for (const m of list) {
    const dev = devices.find((d) => d.device === m.device);
    if (dev) {
      let v = dev.values.find((x) => x.name === m.name);
      if (!v) { v = {name: m.name, trend: []}; dev.values.push(v); }
      Object.assign(v, {value: m.value, unit: m.unit, quality: m.quality, age_s: m.age_s});
      const t = v.trend || (v.trend = []);
      if (typeof m.value !== "string" && (!t.length || m.ts - t[t.length - 1][0] >= 5)) { t.push([m.ts, Number(m.value)]); if (t.length > 120) t.shift(); }
    }
    const cell = document.querySelector(`[data-value="${CSS.escape(key(m.device, m.name))}"]`);
    if (cell) { cell.textContent = `${fmt(m.value)} ${m.unit || ""}`; const a = document.querySelector(`[data-age="${CSS.escape(key(m.device, m.name))}"]`); if (a) a.textContent = ago(m.age_s); }
    else renderValues();
  }
}

function renderStatus() {
  const s = status.summary;
  $("#gw").textContent = s.gateway;
  const h = $("#health"); h.textContent = s.healthy ? "healthy" : "STUCK: " + s.problems.join("; "); h.className = "pill " + (s.healthy ? "ok" : "bad");
  for (const d of status.devices) {
    const el = document.querySelector(`[data-state="${CSS.escape(d.device)}"]`); if (el) { el.textContent = d.state; el.className = "pill " + stateClass(d.state); }
  }
  $("#rules").innerHTML = status.rules.map((r) => `<div class="card"><h3>${esc(r.name)} <span class="pill ${stateClass(r.state)}">${esc(r.state)}</span></h3>
    <code>${esc(r.when)}</code><p class="muted">${esc(r.mode)}${r.for_s ? ` · for ${r.for_s} s` : ""}${r.cooldown_s ? ` · cooldown ${r.cooldown_s} s` : ""} · fired ${r.firings}× · last ${r.last_fired_ts ? new Date(r.last_fired_ts * 1000).toLocaleTimeString() : "never"} · errors ${r.errors}</p>
    ${r.devices.filter((x) => x.pending_left_s != null || x.cooldown_left_s != null).map((x) => `<p>${esc(x.device)}: ${x.pending_left_s != null ? `fires in ${x.pending_left_s} s if it holds` : `cooldown ${x.cooldown_left_s} s`}</p>`).join("")}
    ${r.last_error ? `<p class="err">${esc(r.last_error)}</p>` : ""}</div>`).join("") || "<p>No rules.</p>";
  renderActuators();
  $("#plugins").innerHTML = status.plugins.map((p) => `<div class="card"><h3>${esc(p.name)} <span class="muted">${esc(p.version)}</span> <span class="pill ${p.quarantined ? "bad" : "ok"}">${p.quarantined ? "quarantined" : "ok"}</span></h3>
    <p class="muted">${p.calls} calls · ${p.messages} messages · ${p.errors} errors · ${p.mean_call_ms ?? "–"} ms/call · ${p.quarantines} quarantines</p>
    ${p.last_failure ? `<p class="err">${esc(p.last_failure)}</p>` : ""}
    ${p.quarantined && role === "operator" ? `<button data-retry="${esc(p.name)}">Acknowledge and retry</button>` : ""}</div>`).join("") || "<p>No plugins.</p>";
  const u = s.uplink;
  $("#uplink").innerHTML = u ? `<div class="card"><h3>${esc(u.host)} <span class="pill ${u.connected ? "ok" : "bad"}">${u.connected ? "connected" : "down"}</span></h3>
    <table><tr><td>outbox</td><td class="v">${u.outbox}</td></tr><tr><td>oldest</td><td>${ago(u.oldest_age_s)}</td></tr><tr><td>dropped</td><td>${u.dropped}</td></tr><tr><td>published / acked</td><td>${u.published} / ${u.acked}</td></tr></table>
    ${u.last_error ? `<p class="err">${esc(u.last_error)}</p>` : ""}</div>` : "<p>No uplink configured.</p>";
}

const pending = {};
function renderActuators() {
  const el = $("#act-list");
  if (el.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return; // typing a reason
  el.innerHTML = status.actuators.map((a) => `<div class="card" id="act-${esc(a.name)}"><h3>${esc(a.name)} <span class="pill ${a.state === "on" ? "ok" : "warn"}" data-act-state="${esc(a.name)}">${esc(a.state ?? "unknown")}</span>
    ${a.override ? `<span class="pill warn">held ${esc(a.override.state)} by ${esc(a.override.user)}</span>` : ""}</h3>
    <p class="muted">safe: ${esc(a.safe)} · min on ${a.min_on_s} s · min off ${a.min_off_s} s · ${a.switches} switches · ${a.blocked} blocked</p>
    ${a.last_block_reason ? `<p class="muted">last block: ${esc(a.last_block_reason)}</p>` : ""}
    ${role === "operator" ? `<div class="acts"><input placeholder="reason" data-reason="${esc(a.name)}"><button data-ovr="${esc(a.name)}" data-state="on">On</button><button data-ovr="${esc(a.name)}" data-state="off">Off</button>${a.override ? `<button class="sec" data-rel="${esc(a.name)}">Release</button>` : ""}</div>` : ""}
    <div class="result" id="res-${esc(a.name)}">${pending[a.name] || ""}</div></div>`).join("") || "<p>No actuators.</p>";
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button"); if (!b) return;
  if (b.dataset.ovr || b.dataset.rel) {
    const name = b.dataset.ovr || b.dataset.rel, reason = document.querySelector(`[data-reason="${CSS.escape(name)}"]`).value;
    const r = b.dataset.ovr ? await api(`actuators/${encodeURIComponent(name)}/override`, {state: b.dataset.state, reason}) : await api(`actuators/${encodeURIComponent(name)}/release`, {reason});
    pending[name] = r.ok ? `<span class="ok pill">${r.data.state ? `switched ${esc(r.data.state)}, read back ${esc(JSON.stringify(r.data.verified))} (verified)` : "released"}</span>` : `<span class="err">${esc(r.data.error)}</span>`;
    const res = $(`#res-${CSS.escape(name)}`); if (res) res.innerHTML = pending[name];
    refresh(); loadAudit();
  } else if (b.dataset.retry) {
    const r = await api(`plugins/${encodeURIComponent(b.dataset.retry)}/retry`, {reason: "acknowledged in the console"});
    if (!r.ok) alert(r.data.error); refresh();
  }
});

async function loadAudit() {
  const r = await api("audit?limit=30"); if (!r.ok) return;
  $("#audit").innerHTML = r.data.map((a) => `<tr><td class="muted">${esc(a.ts.slice(11, 19))}</td><td>${esc(a.rule)}</td><td>${esc(a.action)}</td>
    <td><span class="pill ${a.decision === "allowed" ? (a.outcome && !a.outcome.ok ? "bad" : "ok") : "bad"}">${esc(a.decision)}</span></td>
    <td class="muted">${esc(a.reason || (a.params && a.params.reason) || (a.outcome && a.outcome.error) || "")}</td></tr>`).join("");
}

async function refresh() { const r = await api("status"); if (r.ok) { status = r.data; renderStatus(); } }

function show(tab) {
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.getAttribute("href") === "#" + tab);
  for (const s of document.querySelectorAll("main section")) s.hidden = s.id !== tab;
  if (tab === "config") api("config").then((r) => { $("#cfg-running").textContent = JSON.stringify(r.data.config, null, 1); });
  if (tab === "actuators") loadAudit();
  if (tab === "log") api("logs").then((r) => { $("#log-lines").textContent = ""; (r.data || []).forEach(addLog); });
}
window.addEventListener("hashchange", () => show(location.hash.slice(1) || "values"));
function addLog(r) { const pre = $("#log-lines"); pre.textContent = `${new Date(r.ts * 1000).toLocaleTimeString()} ${r.level} ${r.logger}: ${r.message}\n` + pre.textContent.slice(0, 100000); }

function problems(list) { $("#cfg-problems").innerHTML = list.map((p) => `<li class="${p.severity === "error" ? "err" : ""}">line ${p.line}${p.column ? ":" + p.column : ""} ${esc(p.path)}: ${esc(p.message)}</li>`).join("") || "<li>No problems.</li>"; }
$("#cfg-load").onclick = async () => { const r = await api("config/file"); if (r.ok) $("#cfg-text").value = r.data.text; else problems([{line: 0, path: "", message: r.data.error, severity: "error"}]); };
$("#cfg-check").onclick = async () => { const r = await api("config/check", {text: $("#cfg-text").value}); problems(r.data.problems || []); };
$("#cfg-apply").onclick = async () => { const r = await api("config/apply", {text: $("#cfg-text").value, reason: $("#cfg-reason").value}); problems(r.data.problems || [{line: 0, path: "", message: r.data.error || "applied", severity: r.ok ? "info" : "error"}]); if (r.ok) problems([{line: 0, path: "", message: "applied and reloaded", severity: "info"}]); };

async function start() {
  const s = await api("session");
  if (!s.ok) { $("#login").hidden = false; $("#app").hidden = true; return; }
  csrf = s.data.csrf; role = s.data.role;
  $("#who").textContent = `${s.data.user} (${role})`; $("#logout").hidden = false;
  $("#login").hidden = true; $("#app").hidden = false;
  const d = await api("devices"); devices = d.data || []; renderValues();
  await refresh(); show(location.hash.slice(1) || "values");
  es = new EventSource("/api/v1/events");
  es.addEventListener("values", (e) => onValues(JSON.parse(e.data)));
  es.addEventListener("status", (e) => { status = JSON.parse(e.data); renderStatus(); });
  es.addEventListener("log", (e) => addLog(JSON.parse(e.data)));
}
$("#login").onsubmit = async (ev) => {
  ev.preventDefault();
  const r = await api("login", {user: $("#user").value, password: $("#password").value});
  if (r.ok) { $("#password").value = ""; $("#login-error").textContent = ""; start(); } else $("#login-error").textContent = r.data.error;
};
$("#logout").onclick = async () => { await api("logout", {}); if (es) es.close(); location.reload(); };
start();
