"""The dashboard's one page: it polls ``/status.json`` every second and redraws.

Everything from the status goes through ``esc`` (or ``textContent``) before it reaches the
page: unit names, hosts and errors are whatever a projector, a host or an exception said.
Times are shown in UTC to the second, and say so.

Actions ask for the action token in a form the first time, and keep it in the tab's
sessionStorage (never in a URL or a cookie: a cookie would go with every request, cross-site
ones too); a refused token is forgotten and asked for again.
"""

from typing import Final

PAGE: Final = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>eventcore-trio dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2330; }
  h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
  h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
  table { border-collapse: collapse; }
  th, td { padding: .25rem .6rem; border-bottom: 1px solid #dde1e8; text-align: left; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; }
  .state-running { color: #12753a; font-weight: 600; }
  .state-failed { color: #b3261e; font-weight: 600; }
  .state-standby, .state-stopped, .state-superseded { color: #6b7280; }
  .serving { color: #12753a; font-size: .85rem; }
  .state-awaiting-split, .state-repartitioning, .state-resetting, .state-replaying {
    color: #8a5a00; }
  .unrunnable { color: #b3261e; font-weight: 600; }
  .lacking { color: #6b7280; font-size: .85rem; }
  #stale { color: #b3261e; }
  .error { color: #b3261e; font-size: .85rem; white-space: pre-wrap; max-width: 40rem; }
  .error.past { color: #6b7280; }
  .bar { display: inline-block; height: .8rem; background: #3b6fd8; margin-right: .4rem; }
  button, input { font: inherit; }
  #actions { margin: .6rem 0; }
  #action-message.refused { color: #b3261e; font-weight: 600; }
</style>
</head>
<body>
<h1>eventcore-trio</h1>
<div id="source">loading…</div>
<div id="meta"></div> <div id="stale"></div>
<div id="actions" hidden>
<form id="token-form" hidden>
<label>Action token <input id="token" type="password" autocomplete="off" required></label>
<button type="submit">use it in this tab</button>
<span class="lacking">the secret the dashboard was started with</span>
</form>
<div id="action-message" role="status"></div>
</div>
<h2>Units</h2>
<table id="units"><thead><tr><th>unit</th><th>state</th><th>leader</th><th>checkpoint</th>
<th>lag events</th><th>lag s</th><th>standbys</th><th>dead letters</th><th></th></tr></thead>
<tbody></tbody></table>
<div id="versions" hidden><h2>Versions</h2><ul></ul>
<p class="lacking">A new version of a projection rebuilds beside the serving one and takes
over once caught up; a superseded version stops (its read model stays until retired). Rates
and ETAs are estimates from the last minute of reads.</p></div>
<h2>Hosts</h2><div id="hosts"></div>
<h2>Lag (events, last minutes)</h2><svg id="chart" width="720" height="160"></svg>
<div id="legend"></div>
<h2>Holding readers back</h2><div id="held">nothing</div>
<div id="foreign" hidden><h2>Locks taken from outside the store</h2><ul></ul>
<p class="lacking">Any role that may connect to the database can take the store's advisory
locks: end these sessions (pg_terminate_backend) and keep untrusted roles out of its
database.</p></div>
<h2>Recent failovers</h2>
<p class="lacking">A unit's leader was gone (died, or lost its database session) and another
process took over.</p><ul id="failovers"></ul>
<h2>Recent hand-offs</h2>
<p class="lacking">Planned moves: a live leader stopped after its batch and another host took
the unit over (balancing).</p><ul id="handoffs"></ul>
<script>
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;",
  ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
// An ISO time from the status as "2024-05-01 12:00:00 UTC" (fractions of seconds dropped).
function when(iso) {
  if (!iso) return "-";
  const t = new Date(String(iso).replace(/\.\d+/, ""));
  return isNaN(t) ? String(iso) : t.toISOString().slice(0, 19).replace("T", " ") + " UTC";
}
// Which database and schema the store reads, as the server reports the connection.
function source(s) {
  if (!s) return "database: not reached yet";
  if (s.backend) return "store: " + s.backend + " (this process)";
  const where = s.host ? s.host + ":" + s.port : "a Unix socket";
  return "database " + s.database + " on " + where + ", schema " + s.schema;
}
// The action token lives in this tab's sessionStorage only: never in a URL or a cookie.
const TOKEN = "eventcore-action-token";
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token");
let pending = null;  // the confirmed action waiting for a token
function say(text, refused) {
  const message = document.getElementById("action-message");
  message.textContent = text;
  message.className = refused ? "refused" : "";
}
function askToken(then, why, refused) {
  pending = then;
  say(why, refused);
  tokenForm.hidden = false;
  tokenInput.focus();
}
tokenForm.onsubmit = (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN, tokenInput.value.trim());
  tokenInput.value = "";
  tokenForm.hidden = true;
  const then = pending;
  pending = null;
  if (then) then();
};
async function act(path, name, done) {
  const token = sessionStorage.getItem(TOKEN);
  const again = () => act(path, name, done);
  if (!token) {
    askToken(again, "enter the action token to continue (" + path + " " + name + ")", false);
    return;
  }
  let r, body;
  try {
    r = await fetch(path, {method: "POST", headers: {"content-type": "application/json",
      "x-eventcore-action": "1", "authorization": "Bearer " + token},
      body: JSON.stringify({projection: name, confirm: name})});
    body = await r.json();
  } catch (e) {
    say("the action failed: " + e, true);
    return;
  }
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN);
    askToken(again, "refused: " + body.error, true);
    return;
  }
  say(body.error ? "refused: " + body.error : done(body), Boolean(body.error));
}
async function replay(name) {
  if (!confirm("Replay the dead letters of " + name + "? Its hosts must be stopped.")) return;
  await act("/actions/replay", name,
    (body) => name + ": " + body.replayed + " replayed, " + body.failed + " failed again");
}
async function reset(name) {
  if (!confirm("Reset " + name + "? Its checkpoint and dead letters are forgotten and it " +
               "rebuilds from the start. Its hosts must be stopped.")) return;
  await act("/actions/reset", name, () => "reset " + name);
}
const hostList = (hosts) => hosts.map((h) => esc(h.host) + " pid " + esc(h.pid)).join(", ");
// A unit no live host can run, naming the hosts that lack it; quieter when some can.
const runnable = (u) => u.state === "superseded" ? "" : u.runnable_by === 0 ?
  `<div class="unrunnable">no live host runs it (lacking: ${hostList(u.lacking_hosts)})</div>` :
  (u.lacking_hosts.length ? `<div class="lacking">not on ${hostList(u.lacking_hosts)}</div>` :
  "");
const resetButton = (name) => `<button data-reset="${esc(name)}">reset</button>`;
const replayButton = (name) => `<button data-replay="${esc(name)}">replay</button>`;
// A unit's last error: red while it is failed, grey once it runs again.
const lastError = (u) => u.last_error ? `<div class="error${u.state === "failed" ? "" :
  " past"}">${u.state === "failed" ? "" : "last error: "}${esc(u.last_error)}</div>` : "";
// A live process: a balancing host (idle ones too, with since when) or another leader.
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
const hostLine = (h) => `<div class="host"><span class="bar" style="width:${12 * h.units}px">` +
  `</span>${esc(h.host)} pid ${esc(h.pid)}: ` +
  (h.units ? `leads ${plural(h.units, "unit")}` : "leads nothing") +
  (h.standing_by ? `, stands by for ${plural(h.standing_by, "unit")}` :
  (h.units || h.host_id === null ? "" : " (idle)")) +
  (h.host_id === null ? ` <span class="lacking">(not balancing)</span>` :
  ` <span class="lacking">since ${esc(when(h.joined_at))}</span>`) +
  (h.lacks.length ? ` <span class="lacking">(cannot run ${h.lacks.map(esc).join(", ")})` +
  `</span>` : "") + `</div>`;
const moves = (list) => list.map((f) =>
  `<li>${esc(when(f.at))}: ${esc(f.unit)} from pid ${esc(f.from.pid)} to pid ` +
  `${esc(f.to.pid)} ` + (f.from.host === f.to.host ? `on ${esc(f.to.host)}` :
  `(from ${esc(f.from.host)} to ${esc(f.to.host)})`) + `</li>`).join("") ||
  "<li>none seen</li>";
// A lag as counted, or "~" before an estimate (above 10,000 events on PostgreSQL).
const lag = (n, estimated) => (estimated ? "~" : "") + Number(n).toLocaleString("en");
// Seconds as an ETA: "45 s", "12 min", "3 h 20 min".
function duration(t) {
  if (t < 90) return Math.max(1, Math.round(t)) + " s";
  const m = Math.round(t / 60);
  return m < 90 ? m + " min" : Math.floor(m / 60) + " h " + (m % 60) + " min";
}
// One version of a projection: its role, and while it builds how far it got.
const versionLine = (v) => `<li data-version="${esc(v.name)}@${esc(v.version)}">` +
  `${esc(v.name)} version ${esc(v.version)}: <span class="state-${esc(v.role)}">` +
  `${esc(v.role)}</span>` + (v.role === "building" ?
  ` · ${(100 * (v.progress || 0)).toFixed(1)}% of the event log applied, ` +
  `${lag(v.lag_events, v.lag_estimated)} events to go` +
  (v.events_per_second ? `, about ${Math.round(v.events_per_second)} events/s, ETA ` +
  `~${duration(v.eta_seconds)} (estimate)` : ", rate not known yet") : "") +
  (v.role === "superseded" || v.role === "withdrawn" ? ` <span class="lacking">(stopped ` +
  `on purpose; retire it with eventcore-trio retire ${esc(v.name)} ${esc(v.version)})` +
  `</span>` : "") + `</li>`;
function draw(s) {
  const versioned = new Set(s.versions.map((v) => v.name));
  document.getElementById("source").textContent = source(s.source);
  document.getElementById("meta").textContent = "status at " + when(s.generated_at) +
    (s.actions ? " · actions allowed" : " · read-only");
  document.getElementById("stale").textContent = s.error ? "stale: " + s.error : "";
  document.getElementById("actions").hidden = !s.actions;
  document.querySelector("#units tbody").innerHTML = s.units.map((u) =>
    `<tr data-unit="${esc(u.unit)}"><td>${esc(u.unit)}` +
    `${versioned.has(u.name) && u.serving ? ' <span class="serving">serving</span>' : ""}</td>` +
    `<td class="state-${esc(u.state)}">${esc(u.state)}${runnable(u)}${lastError(u)}</td>` +
    `<td>${u.leader ? esc(u.leader.host) + " pid " + esc(u.leader.pid) : "-"}</td>` +
    `<td>${esc(u.checkpoint || "-")}</td>` +
    `<td class="n">${lag(u.lag_events, u.lag_estimated)}</td>` +
    `<td class="n">${u.lag_seconds.toFixed(2)}</td><td class="n">${u.standbys}</td>` +
    `<td class="n">${u.dead_letters}</td>` +
    `<td>${s.actions && u.partition === null ? resetButton(u.name) : ""}` +
    `${s.replayable.includes(u.name) && u.dead_letters ? replayButton(u.name) : ""}</td></tr>`
  ).join("");
  for (const button of document.querySelectorAll("button[data-reset]")) {
    button.onclick = () => reset(button.dataset.reset);
  }
  for (const button of document.querySelectorAll("button[data-replay]")) {
    button.onclick = () => replay(button.dataset.replay);
  }
  const versions = document.getElementById("versions");
  versions.hidden = !s.versions.length;
  versions.querySelector("ul").innerHTML = s.versions.map(versionLine).join("");
  document.getElementById("hosts").innerHTML = s.hosts.map(hostLine).join("") || "no live host";
  const held = s.held_back_by;
  document.getElementById("held").textContent = held ? `pid ${held.pid} ` +
    `(${held.application_name || "?"}), ${held.state}, since ${when(held.started_at)}: ` +
    held.query : "nothing";
  const foreign = document.getElementById("foreign");
  foreign.hidden = !s.foreign_locks.length;
  foreign.querySelector("ul").innerHTML = s.foreign_locks.map((f) =>
    `<li class="unrunnable">${esc(f.description)}</li>`).join("");
  document.getElementById("failovers").innerHTML = moves(s.failovers);
  document.getElementById("handoffs").innerHTML = moves(s.handoffs);
  const h = s.lag_history, svg = document.getElementById("chart");
  const units = [...new Set(h.flatMap((p) => Object.keys(p.lag)))];
  const top = Math.max(1, ...h.flatMap((p) => Object.values(p.lag)));
  const colors = ["#3b6fd8", "#d8663b", "#12753a", "#8a3bd8", "#b3261e", "#6b7280"];
  svg.innerHTML = units.map((unit, i) => `<polyline fill="none" stroke="${colors[i % 6]}"` +
    ` points="${h.map((p, x) => `${x * 720 / Math.max(1, h.length - 1)},` +
    `${150 - 140 * (p.lag[unit] || 0) / top}`).join(" ")}"><title>${esc(unit)}</title>` +
    `</polyline>`).join("");
  document.getElementById("legend").innerHTML = units.map((unit, i) =>
    `<span style="color:${colors[i % 6]}">&#9632; ${esc(unit)}</span>`).join(" &nbsp; ") +
    (units.length ? ` &nbsp; (top of the chart: ${top} events)` : "");
}
async function tick() {
  try { draw(await (await fetch("/status.json", {cache: "no-store"})).json()); }
  catch (e) { document.getElementById("stale").textContent = "dashboard unreachable"; }
  setTimeout(tick, 1000);
}
tick();
</script>
</body>
</html>
"""
