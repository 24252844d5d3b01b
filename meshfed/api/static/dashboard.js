// The meshfed node's live dashboard: one server-sent events stream (/events), drawn with the
// DOM and SVG. Everything from the node is set as text (textContent), never parsed as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const state = { curves: {}, snapshot: null, job: null };
let source = null;

function $(id) { return document.getElementById(id); }

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function short(id) { return id && id.length > 14 ? id.slice(0, 6) + "…" + id.slice(-6) : id; }
function fixed(value, digits) { return value === null || value === undefined ? "–" : Number(value).toFixed(digits); }

function fill(tableId, rows) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) tr.append(el("td", {}, cell));
    return tr;
  }));
}

// -- the mesh ------------------------------------------------------------------------------

function drawMesh(self, peers) {
  const svg = $("mesh");
  const items = [];
  const placed = peers.map((peer, i) => {
    const angle = (2 * Math.PI * i) / Math.max(peers.length, 1) - Math.PI / 2;
    return [peer, 80 * Math.cos(angle), 80 * Math.sin(angle)];
  });
  for (const [, x, y] of placed) items.push(el("svg:line", { x1: 0, y1: 0, x2: x, y2: y }));
  items.push(el("svg:circle", { cx: 0, cy: 0, r: 9, class: "self" }));
  for (const [peer, x, y] of placed) {
    const dot = el("svg:circle", { cx: x, cy: y, r: 7, class: "peer " + peer.state });
    dot.append(el("svg:title", {}, peer.peer_id + " (" + peer.state + ")"));
    items.push(dot, el("svg:text", { x: x + 9, y: y + 3 }, short(peer.peer_id)));
  }
  items.push(el("svg:text", { x: -20, y: 22 }, "this node"));
  svg.replaceChildren(...items);
}

// -- the curves ----------------------------------------------------------------------------

function drawCurve() {
  const svg = $("accuracy");
  const points = state.curves[state.job] || [];
  const [w, h, left, bottom] = [400, 200, 30, 20];
  const rounds = points.map((p) => p.round);
  const minRound = rounds.length ? Math.min(...rounds) : 0;
  const maxRound = Math.max(...rounds, minRound + 1);
  const losses = points.map((p) => p.loss).filter((v) => v !== null);
  const maxLoss = Math.max(...losses, 1e-9);
  const x = (r) => left + ((r - minRound) / (maxRound - minRound)) * (w - left - 10);
  const y = (v) => h - bottom - v * (h - bottom - 10);
  const items = [
    el("svg:line", { x1: left, y1: y(0), x2: w - 10, y2: y(0), class: "axis" }),
    el("svg:line", { x1: left, y1: y(0), x2: left, y2: y(1), class: "axis" }),
    el("svg:text", { x: 2, y: y(1) + 4 }, "1.0"),
    el("svg:text", { x: 2, y: y(0) + 4 }, "0"),
    el("svg:text", { x: w - 60, y: h - 4 }, points.length ? "round " + maxRound : "no rounds yet"),
  ];
  const accuracy = points.filter((p) => p.accuracy !== null);
  if (accuracy.length > 1) {
    items.push(el("svg:polyline", {
      class: "acc", points: accuracy.map((p) => x(p.round) + "," + y(p.accuracy)).join(" "),
    }));
  }
  const loss = points.filter((p) => p.loss !== null);
  if (loss.length > 1) {
    items.push(el("svg:polyline", {
      class: "loss", points: loss.map((p) => x(p.round) + "," + y(p.loss / maxLoss)).join(" "),
    }));
  }
  for (const p of accuracy) {
    const dot = el("svg:circle", { cx: x(p.round), cy: y(p.accuracy), r: 2.5, class: "point" });
    dot.append(el("svg:title", {}, "round " + p.round + ": " + fixed(p.accuracy, 3)));
    items.push(dot);
  }
  svg.replaceChildren(...items);
}

function chooseJobs() {
  const select = $("job-choice");
  const jobs = Object.keys(state.curves);
  if (state.job === null || !(state.job in state.curves)) state.job = jobs[jobs.length - 1] ?? null;
  const shown = Array.from(select.options).map((o) => o.value).join("\n");
  if (shown !== jobs.join("\n")) {
    select.replaceChildren(...jobs.map((job) => el("option", { value: job }, job)));
  }
  if (state.job !== null) select.value = state.job;
}

function addPoint(point) {
  const curve = state.curves[point.job] || (state.curves[point.job] = []);
  const last = curve[curve.length - 1];
  if (!last || last.round !== point.round) curve.push(point);
  chooseJobs();
  drawCurve();
}

// -- the snapshot --------------------------------------------------------------------------

function drawAlerts(alerts) {
  const items = alerts.map((a) => el("li", { class: "firing " + a.severity },
    a.name + (a.subject ? " [" + a.subject + "]" : "") + ": " + a.summary));
  $("alerts").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "none")]));
}

function drawBudgets(budgets) {
  const box = $("budgets");
  if (!budgets.length) { box.replaceChildren(el("p", { class: "muted" }, "no private job")); return; }
  box.replaceChildren(...budgets.map((b) => {
    const share = b.budget_epsilon > 0 ? b.spent_epsilon / b.budget_epsilon : 0;
    const row = el("div");
    row.append(el("p", {}, b.job_id + ": ε " + fixed(b.spent_epsilon, 2) + " of " + fixed(b.budget_epsilon, 2)));
    const bar = el("div", { class: share > 0.9 ? "bar near" : "bar" });
    bar.append(el("span", { style: "width:" + Math.min(100, share * 100).toFixed(1) + "%" }));
    row.append(bar);
    return row;
  }));
}

function drawSnapshot(s) {
  state.snapshot = s;
  const node = s.node;
  $("peer-id").textContent = short(node.peer_id);
  $("peer-id").title = node.peer_id;
  const device = node.device || {};
  $("summary").textContent = "up " + Math.round(node.uptime_s) + " s · " + node.connected
    + " connected · " + s.peers.length + " peers known · battery " + fixed(device.battery_pct, 0)
    + (device.charging ? " (charging)" : "") + " · " + fixed(device.temperature_c, 0) + " °C"
    + (device.allows_work === false ? " · paused by device policy" : "");
  drawMesh(node, s.peers);
  fill("peers", s.peers.map((p) => [short(p.peer_id), p.state, p.roles.join(" "),
    fixed(p.rtt_ms, 1), p.battery_pct === null ? "–" : p.battery_pct + "%", fixed(p.temperature_c, 0)]));
  fill("jobs", s.jobs.map((j) => [j.job_id, j.role, j.state,
    j.rounds ? j.round + "/" + j.rounds : j.round, fixed(j.accuracy, 3)]));
  drawBudgets(s.budgets);
  const asks = {};
  for (const a of s.market.asks) (asks[a.kind + " " + a.tier] ||= []).push(a.price);
  fill("asks", Object.entries(asks).map(([what, prices]) => [what, prices.length,
    Math.min(...prices), Math.max(...prices)]));
  fill("awards", s.market.awards.map((a) => [a.job_id, short(a.peer_id), a.price]));
  fill("accounts", Object.entries(s.market.accounts));
  fill("accepted", Object.entries(s.stats.accepted));
  fill("rejected", Object.entries(s.stats.rejected));
  drawAlerts(s.alerts);
}

// -- the stream ----------------------------------------------------------------------------

function token() { return sessionStorage.getItem("meshfed-token"); }

async function streamUrl() {
  if (token() === null) return "/events";
  const answer = await fetch("/events/ticket", {
    method: "POST", headers: { Authorization: "Bearer " + token() },
  });
  if (answer.status === 401 || answer.status === 403) {
    sessionStorage.removeItem("meshfed-token");
    throw new Error("the token is wrong");
  }
  if (!answer.ok) throw new Error("no ticket: " + answer.status);
  return "/events?ticket=" + encodeURIComponent((await answer.json()).ticket);
}

function showLogin(message) {
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("connection").textContent = "a token is needed";
}

function retry() { setTimeout(connect, 2000); }

async function connect() {
  let url;
  try {
    if (token() === null && (await fetch("/status")).status === 401) { showLogin(); return; }
    url = await streamUrl();
  } catch (error) {  // the node is away (a TypeError from fetch), or the token is refused
    if (error instanceof TypeError) { retry(); } else { showLogin(error.message); }
    return;
  }
  source = new EventSource(url);
  source.onopen = () => { $("connection").textContent = "live"; $("connection").className = "ok"; };
  source.addEventListener("curves", (event) => {
    state.curves = JSON.parse(event.data);
    chooseJobs();
    drawCurve();
  });
  source.addEventListener("round", (event) => addPoint(JSON.parse(event.data)));
  source.addEventListener("snapshot", (event) => drawSnapshot(JSON.parse(event.data)));
  source.addEventListener("alert", (event) => {
    const alert = JSON.parse(event.data);
    console.info("alert", alert.firing ? "firing" : "cleared", alert.name, alert.summary);
  });
  source.onerror = () => {  // a ticket is good once: reconnect with a new one
    source.close();
    $("connection").textContent = "reconnecting…";
    $("connection").className = "muted";
    retry();
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("job-choice").addEventListener("change", (event) => { state.job = event.target.value; drawCurve(); });
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("meshfed-token", $("token").value.trim());
    $("login").hidden = true;
    connect();
  });
  connect();
});
