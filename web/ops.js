// The operations map: this node's drivers coloured by state, open requests,
// recent matches and the key counts, from /ws/ops (a snapshot, then batches
// a few times a second). Everything is drawn on one canvas: 20,000 drivers
// are five filled paths, one per state, redrawn at most once a frame.

import { CityMap } from "./map.js";
import { Connection, credentials, remember } from "./session.js";
import { $ } from "./page.js";

const COLOURS = ["#2a9d4b", "#e8a317", "#2b6cb0", "#8a8a8a", "#cfcfcf"];
// Drawn bottom to top: offline under everything, offers on top.
const DRAW_ORDER = [4, 3, 0, 2, 1];
const MATCH_SHOWN_MS = 10_000;
const STAGE_COLOURS = { waiting: "#c0392b", searching: "#e74c3c", offered: "#e8a317" };

const map = new CityMap($("map"), { interactive: true, widthM: 20_000 });
// How long the last frame's drawing and the last message's handling took,
// in ms, on the page's body (bench/ops reads them at 20k drivers).
const draw = map.draw.bind(map);
map.draw = () => {
  const started = performance.now();
  draw();
  document.body.dataset.drawMs = (performance.now() - started).toFixed(1);
};
let states = [];
let seq = 0;
const drivers = new Map(); // id -> [id, lat, lon, state, pickup_lat, pickup_lon]
const requests = new Map(); // rider \u001f request -> [rider, request, lat, lon, stage, vehicles, age_ms]
let matches = []; // { row, since } with `since` on the page's clock
let fitted = false;
let opened = false;

map.layers.push(drawMatches, drawDrivers, drawRequests, drawFound);

// One pass over the drivers into one path per state, with the projection
// as plain numbers (no object per driver): the frame's cost at 20,000
// drivers is that loop and five fills.
function drawDrivers(g, m) {
  const w = m.canvas.clientWidth;
  const h = m.canvas.clientHeight;
  const size = m.widthM > 30_000 ? 2 : m.widthM > 8000 ? 3 : 6;
  const half = size / 2;
  const { lon0, lat0, ax, ay, x0, y0 } = m.projection();
  const paths = COLOURS.map(() => new Path2D());
  for (const row of drivers.values()) {
    if (row[1] === null) continue;
    const x = (row[2] - lon0) * ax + x0;
    const y = (row[1] - lat0) * ay + y0;
    if (x < -4 || y < -4 || x > w + 4 || y > h + 4) continue;
    paths[row[3]].rect(x - half, y - half, size, size);
  }
  for (const state of DRAW_ORDER) {
    g.fillStyle = COLOURS[state];
    g.fill(paths[state]);
  }
}

function drawRequests(g, m) {
  g.lineWidth = 2;
  for (const row of requests.values()) {
    const { x, y } = m.toXY({ lat: row[2], lon: row[3] });
    g.strokeStyle = STAGE_COLOURS[row[4]] || "#c0392b";
    g.beginPath();
    g.arc(x, y, 4 + row[5], 0, 2 * Math.PI);
    g.stroke();
  }
}

function drawMatches(g, m) {
  const now = performance.now();
  matches = matches.filter((x) => now - x.since < MATCH_SHOWN_MS);
  g.lineWidth = 1.5;
  for (const { row, since } of matches) {
    const fade = 1 - (now - since) / MATCH_SHOWN_MS;
    g.strokeStyle = `rgba(43, 108, 176, ${fade.toFixed(2)})`;
    const p = m.toXY({ lat: row[1], lon: row[2] });
    const q = m.toXY({ lat: row[3], lon: row[4] });
    g.beginPath();
    g.moveTo(p.x, p.y);
    g.lineTo(q.x, q.y);
    g.stroke();
  }
}

function drawFound(g, m) {
  const row = drivers.get($("find").value.trim());
  if (!row || row[1] === null) return;
  const { x, y } = m.toXY({ lat: row[1], lon: row[2] });
  g.strokeStyle = "#111";
  g.lineWidth = 2;
  g.beginPath();
  g.arc(x, y, 9, 0, 2 * Math.PI);
  g.stroke();
}

function apply(message) {
  const now = performance.now();
  handle(message, now);
  document.body.dataset.applyMs = (performance.now() - now).toFixed(1);
}

function handle(message, now) {
  if (message.type === "snapshot") {
    states = message.states;
    seq = message.seq;
    drivers.clear();
    requests.clear();
    matches = [];
    for (const row of message.drivers) drivers.set(row[0], row);
    for (const row of message.requests) requests.set(`${row[0]}\u001f${row[1]}`, row);
    for (const row of message.matches) matches.push({ row, since: now - row[5] });
  } else if (message.type === "changes") {
    // Batches the snapshot already holds are skipped by the engine; one out
    // of order would be a bug worth seeing.
    if (message.seq !== seq + 1) console.warn(`ops feed: batch ${message.seq} after ${seq}`);
    seq = message.seq;
    for (const row of message.drivers) drivers.set(row[0], row);
    for (const id of message.gone) drivers.delete(id);
    for (const row of message.requests) requests.set(`${row[0]}\u001f${row[1]}`, row);
    for (const [rider, request] of message.ended) requests.delete(`${rider}\u001f${request}`);
    for (const row of message.matches) matches.push({ row, since: now - row[5] });
    // Pruned here too, not only when drawn: a hidden tab draws nothing
    // and would keep every match it is sent.
    matches = matches.filter((x) => now - x.since < MATCH_SHOWN_MS);
  } else {
    return;
  }
  counters(message.counters);
  showFound();
  document.body.dataset.seq = String(seq);
  document.body.dataset.drivers = String(drivers.size);
  if (!fitted) {
    const placed = [...drivers.values()].filter((r) => r[1] !== null).map((r) => ({ lat: r[1], lon: r[2] }));
    const pickups = [...requests.values()].map((r) => ({ lat: r[2], lon: r[3] }));
    if (placed.length + pickups.length > 0) {
      fitted = true;
      map.fit(placed.concat(pickups));
    }
  }
  map.redraw();
}

function counters(c) {
  for (const name of states) $(`n-${name}`).textContent = String(c.drivers[name] ?? 0);
  $("n-requests").textContent = String(c.requests);
  $("n-waiting").textContent = String(c.waiting);
  $("n-minute").textContent = String(c.matched_last_minute);
  $("n-total").textContent = String(c.matched_total);
}

function showFound() {
  const id = $("find").value.trim();
  if (!id) {
    $("found").textContent = "";
    return;
  }
  const row = drivers.get(id);
  if (!row) {
    $("found").textContent = `${id}: not on this node`;
    return;
  }
  const where = row[1] === null ? "no position yet" : `at ${row[1].toFixed(5)}, ${row[2].toFixed(5)}`;
  const pickup = row[4] === null ? "" : `, pickup ${row[4].toFixed(5)}, ${row[5].toFixed(5)}`;
  $("found").textContent = `${id}: ${states[row[3]].replace("_", " ")} ${where}${pickup}`;
}

$("find").addEventListener("input", () => {
  showFound();
  map.redraw();
});

// Lines fade: redraw while any is shown.
setInterval(() => {
  if (matches.length) map.redraw();
}, 250);

const conn = new Connection("ops", {
  onState: (text) => {
    $("conn").textContent = text;
    if (!opened && text.startsWith("disconnected")) {
      $("error").textContent = "the engine refused the feed: with --auth-secret-file it takes an ops token (ridelock token --role ops …)";
    }
  },
  onOpen: () => {
    opened = true;
    $("error").textContent = "";
  },
  onMessage: apply,
});

const who = credentials("ops");
$("token").value = who.token;
$("connect").addEventListener("click", () => {
  const token = $("token").value.trim();
  remember("ops", { token, id: "" });
  conn.wanted = false;
  if (conn.ws) conn.ws.close();
  conn.ws = null;
  opened = false;
  conn.start({ token, id: "" });
});
// In open mode the feed needs nothing; with a token in the address, it is used.
conn.start({ token: who.token, id: "" });
