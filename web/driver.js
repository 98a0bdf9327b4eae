import { CityMap, distanceM } from "./map.js";
import { Connection } from "./session.js";
import { $, log, showError, identify, fmtPosition } from "./page.js";

const map = new CityMap($("map"));
const STREET_SPEED_MPS = 8.3; // ~30 km/h
let position = null;
let wantsWork = false;
let offer = null; // { offer_id, fencing_token, deadline, pickup, request_id, group_size }
let trip = null;
let heading = null; // where the page drives to

const conn = new Connection("driver", {
  onState: (text) => {
    $("conn").textContent = text;
    buttons();
  },
  onOpen: () => {
    // A new connection starts offline: say where we are, and that we want
    // work if we did. What the engine still holds for us (an offer, a
    // place in a group, a trip) it sends again; anything else ended with
    // the old connection.
    offer = null;
    trip = null;
    $("offer").hidden = true;
    $("trip").hidden = true;
    $("countdown").textContent = "";
    if (position) conn.send({ type: "location", ...position });
    if (wantsWork) conn.send({ type: "available" });
  },
  onMessage: handle,
});

function buttons() {
  const open = $("conn").textContent === "connected";
  $("available").disabled = !open || !position || wantsWork;
  $("unavailable").disabled = !open || !wantsWork;
  $("state").textContent = trip
    ? "on a trip"
    : offer
      ? offer.held ? "accepted: waiting for the group" : "offered"
      : wantsWork ? "available" : "offline";
}

function moveTo(at) {
  position = at;
  $("position").textContent = fmtPosition(at);
  map.mark("me", at, { colour: "#27a", label: "you", size: 7 });
  conn.send({ type: "location", lat: at.lat, lon: at.lon });
  buttons();
}

map.onClick = (at) => moveTo(at);

$("available").addEventListener("click", () => {
  wantsWork = true;
  conn.send({ type: "available" });
  buttons();
});

$("unavailable").addEventListener("click", () => {
  wantsWork = false;
  conn.send({ type: "unavailable" });
  buttons();
});

$("accept").addEventListener("click", () => {
  if (offer) conn.send({ type: "accept", offer_id: offer.offer_id, fencing_token: offer.fencing_token });
});

$("decline").addEventListener("click", () => {
  // A decline is answered by nothing but the next offer: the offer is over.
  if (offer && conn.send({ type: "decline", offer_id: offer.offer_id })) {
    log(`declined ${offer.offer_id}`);
    endOffer();
    buttons();
  }
});

$("complete").addEventListener("click", () => {
  if (!trip) return;
  conn.send({ type: "trip_completed", trip_id: trip.trip_id });
  trip = null;
  $("trip").hidden = true;
  map.mark("pickup", null);
  map.setLines([]);
  buttons();
});

function showOffer() {
  $("offer").hidden = !offer;
  if (!offer) return;
  tickCountdown();
  const group = offer.group_size > 1 ? `, one of ${offer.group_size} vehicles` : "";
  $("offer-text").textContent = offer.held
    ? `Accepted: ${offer.accepted} of ${offer.group_size} drivers so far. Waiting for the group.`
    : `Rider ${offer.rider_id} at ${Math.round(offer.distance_m)} m${group}.`;
  $("accept").hidden = offer.held;
  $("decline").hidden = offer.held;
  map.mark("pickup", offer.pickup, { colour: "#c33", label: "pickup", size: 7 });
  if (position) map.setLines([[position, offer.pickup]]);
}

function endOffer() {
  offer = null;
  $("offer").hidden = true;
  $("countdown").textContent = "";
  if (!trip) {
    map.mark("pickup", null);
    map.setLines([]);
  }
}

function handle(m) {
  log(m.type + (m.offer_id ? ` ${m.offer_id}` : "") + (m.reason ? ` (${m.reason})` : ""));
  switch (m.type) {
    case "offer":
      offer = { ...m, deadline: Date.now() + m.expires_in_ms, held: false };
      showError(null);
      showOffer();
      break;
    case "waiting_for_group":
      if (!offer || offer.offer_id !== m.offer_id) {
        offer = { offer_id: m.offer_id, request_id: m.request_id, group_size: m.group_size, pickup: null };
      }
      offer.held = true;
      offer.accepted = m.accepted;
      offer.group_size = m.group_size;
      $("countdown").textContent = "";
      if (offer.pickup) showOffer();
      else {
        $("offer").hidden = false;
        $("offer-text").textContent = `Accepted: ${m.accepted} of ${m.group_size} drivers so far. Waiting for the group.`;
        $("accept").hidden = true;
        $("decline").hidden = true;
      }
      break;
    case "offer_revoked": {
      const why = {
        expired: "it expired",
        rider_cancelled: "the rider cancelled",
        group_incomplete: "the group could not be completed",
        preempted: "an earlier group request took you",
      }[m.reason] || m.reason;
      if (offer && offer.offer_id === m.offer_id) endOffer();
      $("error").textContent = `Offer ${m.offer_id} ended: ${why}.`;
      break;
    }
    case "trip_assigned":
      endOffer();
      trip = m;
      $("trip").hidden = false;
      $("trip-text").textContent =
        `Trip ${m.trip_id}: pick up ${m.rider_id}` + (m.group_size > 1 ? ` (one of ${m.group_size} vehicles)` : "") + ".";
      map.mark("pickup", m.pickup, { colour: "#c33", label: "pickup", size: 7 });
      if (position) map.setLines([[position, m.pickup]]);
      break;
    case "error":
      showError(m);
      break;
  }
  buttons();
}

// The countdown, and driving: a step every half second towards a point,
// then a new point.
function tickCountdown() {
  if (offer && !offer.held && offer.deadline) {
    const left = Math.max(0, offer.deadline - Date.now());
    $("countdown").textContent = `${(left / 1000).toFixed(1)} s`;
  }
}

setInterval(tickCountdown, 100);

// A driver standing still still says where it is: the engine stops
// offering a driver whose last location is older than a minute.
setInterval(() => {
  if (position) conn.send({ type: "location", lat: position.lat, lon: position.lon });
}, 20_000);

setInterval(() => {
  if (!$("drive").checked || !position) return;
  if (!heading || distanceM(position, heading) < 20) {
    heading = map.toLatLon(Math.random() * map.canvas.clientWidth, Math.random() * map.canvas.clientHeight);
  }
  const d = distanceM(position, heading);
  const f = Math.min(1, (STREET_SPEED_MPS * 0.5) / d);
  moveTo({
    lat: Math.round((position.lat + (heading.lat - position.lat) * f) * 1e6) / 1e6,
    lon: Math.round((position.lon + (heading.lon - position.lon) * f) * 1e6) / 1e6,
  });
}, 500);

identify("driver", "driver-1", (who) => conn.start(who));
