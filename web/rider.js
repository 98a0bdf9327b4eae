import { CityMap } from "./map.js";
import { Connection } from "./session.js";
import { $, log, showError, identify, fmtPosition } from "./page.js";

const map = new CityMap($("map"));
let pickup = null;
let current = null; // the request in flight: { id, vehicles }
let counter = 0;

const conn = new Connection("rider", {
  onState: (text) => {
    $("conn").textContent = text;
    updateButtons();
  },
  onOpen: () => {
    // The engine cancels a rider's requests when its connection closes.
    if (current) {
      status("the connection dropped: the request was cancelled");
      current = null;
    }
    updateButtons();
  },
  onMessage: handle,
});

function updateButtons() {
  const open = $("conn").textContent === "connected";
  $("request").disabled = !open || !pickup || current !== null;
  $("cancel").disabled = !open || current === null;
}

function status(text) {
  $("status").textContent = text;
}

function setPickup(at) {
  pickup = at;
  $("pickup").textContent = fmtPosition(at);
  map.mark("pickup", at, { colour: "#c33", label: "pickup", size: 7 });
  updateButtons();
}

map.onClick = setPickup;

$("locate").addEventListener("click", () => {
  if (!navigator.geolocation) {
    $("error").textContent = "this browser can't tell where you are";
    return;
  }
  navigator.geolocation.getCurrentPosition(
    (p) => {
      const at = { lat: p.coords.latitude, lon: p.coords.longitude };
      // The map follows the rider.
      map.centre = at;
      setPickup(at);
    },
    (e) => {
      $("error").textContent = `no location: ${e.message}`;
    },
  );
});

$("request").addEventListener("click", () => {
  counter += 1;
  const vehicles = Number($("vehicles").value);
  current = { id: `ride-${Date.now().toString(36)}-${counter}`, vehicles, pickup };
  showError(null);
  $("match").textContent = "";
  map.setLines([]);
  for (const key of [...map.markers.keys()]) if (key.startsWith("driver:")) map.mark(key, null);
  conn.send({ type: "request_ride", request_id: current.id, pickup, vehicles });
  status("asking…");
  updateButtons();
});

$("cancel").addEventListener("click", () => {
  if (current) conn.send({ type: "cancel", request_id: current.id });
});

function handle(m) {
  log(m.type + (m.request_id ? ` ${m.request_id}` : ""));
  const ours = current && m.request_id === current.id;
  switch (m.type) {
    case "searching":
      if (ours) status(current.vehicles > 1 ? `searching for ${current.vehicles} vehicles` : "searching");
      break;
    case "group_progress":
      if (ours) status(`searching: ${m.accepted} of ${m.group_size} drivers accepted`);
      break;
    case "matched": {
      if (!ours) break;
      const drivers = m.drivers && m.drivers.length ? m.drivers : [m];
      status("matched");
      $("match").textContent = drivers
        .map((d) => `${d.driver_id} is ${Math.round(d.distance_m)} m away (trip ${d.trip_id})`)
        .join("; ");
      for (const d of drivers) {
        map.mark(`driver:${d.driver_id}`, d.driver_location, { colour: "#27a", label: d.driver_id });
      }
      map.setLines(drivers.map((d) => [d.driver_location, current.pickup]));
      current = null;
      break;
    }
    case "no_driver":
      if (ours) {
        status(m.reason === "locks_unavailable" ? "no driver: the engine could not lock drivers" : "no driver found");
        current = null;
      }
      break;
    case "cancelled":
      if (ours) {
        status("cancelled");
        current = null;
      }
      break;
    case "error":
      showError(m);
      if (ours) {
        status("refused");
        current = null;
      }
      break;
  }
  updateButtons();
}

identify("rider", "rider-1", (who) => conn.start(who));
