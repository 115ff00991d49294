// The owner's page: plain JavaScript, no library, nothing fetched from outside the gateway.
"use strict";
const $ = (sel) => document.querySelector(sel);
const devices = new Map();
let me = null, stream = null;

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, { credentials: "same-origin", ...init });
  const data = await res.json().catch(() => ({ ok: false, error: res.statusText }));
  if (!res.ok) throw Object.assign(new Error(data.error || res.statusText), { status: res.status });
  return data;
}

function cell(tr, label, text, cls) {
  const td = tr.insertCell();
  td.dataset.label = label;
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function button(td, label, action, id, cls) {
  const b = document.createElement("button");
  b.textContent = label;
  b.dataset.action = action;
  b.dataset.device = id;
  if (cls) b.className = cls;
  td.append(b);
}

function render() {
  const body = $("#devices tbody");
  body.replaceChildren();
  const rows = [...devices.values()].sort((a, b) => a.device_id.localeCompare(b.device_id));
  for (const d of rows) {
    const tr = body.insertRow();
    tr.id = "device-" + d.device_id;
    tr.dataset.state = d.state;
    const name = cell(tr, "Device", d.device_id);
    if (d.model) { const s = document.createElement("span"); s.className = "sub"; s.textContent = d.model; name.append(s); }
    cell(tr, "Type", d.type);
    cell(tr, "State", d.state + (d.error ? " – " + d.error : ""), "state " + d.state);
    cell(tr, "Address", d.address || "–", "address");
    cell(tr, "Last result", d.result || "–");
    cell(tr, "Online", d.online ? "yes" : "no", "online " + (d.online ? "yes" : "no"));
    const act = tr.insertCell();
    act.className = "act";
    if (d.state === "pending") {
      button(act, "Approve", "approve", d.device_id, "primary");
      button(act, "Reject", "reject", d.device_id, "danger");
    }
    button(act, "Refresh", "refresh", d.device_id);
    button(act, "Forget", "forget", d.device_id, "danger");
  }
  $("#count").textContent = rows.length ? `(${rows.length})` : "";
  $("#empty").hidden = rows.length > 0;
}

function addEvent(e) {
  const li = document.createElement("li");
  li.className = e.severity;
  li.textContent = `${e.time} ${e.event}${e.device_id ? " " + e.device_id : ""}${e.reason ? ": " + e.reason : ""}`;
  const list = $("#events");
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

function connect() {
  if (stream) stream.close();
  stream = new EventSource("/api/events");
  stream.onopen = () => $("#live").classList.add("on");
  stream.onerror = () => $("#live").classList.remove("on");  // EventSource reconnects by itself
  stream.addEventListener("devices", (m) => { devices.clear(); for (const d of JSON.parse(m.data)) devices.set(d.device_id, d); render(); });
  stream.addEventListener("device", (m) => { const d = JSON.parse(m.data); devices.set(d.device_id, d); render(); });
  stream.addEventListener("forgotten", (m) => { devices.delete(JSON.parse(m.data).device_id); render(); });
  stream.addEventListener("event", (m) => addEvent(JSON.parse(m.data)));
  stream.addEventListener("resync", () => connect());
}

function show(user) {
  me = user;
  $("#login").hidden = !!user;
  $("#home").hidden = !user;
  $("#logout").hidden = !user;
  $("#who").textContent = user ? `${user.name}${user.may_act ? "" : " (read-only)"}` : "";
  document.body.classList.toggle("readonly", !!user && !user.may_act);
  if (user) connect(); else if (stream) { stream.close(); stream = null; }
}

async function act(path, body, what) {
  $("#error").textContent = "";
  try { await api(path, body); }
  catch (err) { $("#error").textContent = `${what}: ${err.message}`; }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    $("#login-error").textContent = "";
    try { show(await api("/api/login", { name: f.get("name"), password: f.get("password") })); }
    catch (err) { $("#login-error").textContent = err.message; }
  });
  $("#logout").addEventListener("click", async () => { await api("/api/logout", {}).catch(() => {}); show(null); });
  $("#pair").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const code = new FormData(ev.target).get("code");
    await act("/api/pair", { code }, "pair " + code);
    ev.target.reset();
  });
  $("#devices").addEventListener("click", async (ev) => {
    const b = ev.target.closest("button[data-action]");
    if (!b) return;
    const { action, device } = b.dataset;
    if (action === "forget" && !confirm(`Forget ${device}? Everything set for it on the gateway is removed.`)) return;
    b.disabled = true;
    await act(`/api/devices/${encodeURIComponent(device)}/${action}`, {}, `${action} ${device}`);
    b.disabled = false;
  });
  api("/api/me").then(show, () => show(null));
});
