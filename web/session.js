// Who the page is, and its WebSocket to the engine, reconnecting with
// backoff. With a token (from the URL fragment, `#token=…`, or pasted), the
// engine takes the id from it; in open mode the page asks for an id.

// Kept per role: the rider page must not pick up the driver's token (the
// engine would refuse it) or, in open mode, its id.
export function credentials(role) {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token") || sessionStorage.getItem(`ridelock-${role}-token`) || "";
  const id = fragment.get("id") || sessionStorage.getItem(`ridelock-${role}-id`) || "";
  return { token, id };
}

export function remember(role, { token, id }) {
  if (token) sessionStorage.setItem(`ridelock-${role}-token`, token);
  if (id) sessionStorage.setItem(`ridelock-${role}-id`, id);
}

/** Describes an engine `error` in words. */
export function describeError(message) {
  const words = {
    invalid_field: "a field was not accepted",
    invalid_coordinates: "that position is not on the map",
    unknown_offer: "that offer is unknown",
    offer_expired: "that offer has ended",
    already_accepted: "you accepted already: waiting for the rest of the group",
    unknown_trip: "that trip is not yours",
    unknown_request: "that request is not in flight",
    request_in_flight: "that request is already in flight",
    too_many_requests: "too many requests in flight",
    rate_limited: "slow down: too many messages",
    overloaded: "the engine is busy: try again in a moment",
    outside_service_area: "the pickup is outside the area served",
  };
  const what = words[message.code] || message.code;
  return `${what} (${message.message})`;
}

/**
 * Keeps a connection to `/ws/<role>` open. `onMessage(msg)` gets every
 * message, `onState(text)` the connection's state; `onOpen()` runs on every
 * (re)connection.
 */
export class Connection {
  constructor(role, { onMessage, onState, onOpen }) {
    this.role = role;
    this.onMessage = onMessage;
    this.onState = onState;
    this.onOpen = onOpen || (() => {});
    this.backoffMs = 250;
    this.ws = null;
    this.wanted = false;
    this.opens = 0;
  }

  start({ token, id }) {
    this.wanted = true;
    this.who = { token, id };
    this.open();
  }

  open() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // The ops feed names nobody: in open mode it goes without either.
    const query = this.who.token
      ? `?token=${encodeURIComponent(this.who.token)}`
      : this.who.id ? `?id=${encodeURIComponent(this.who.id)}` : "";
    const ws = new WebSocket(`${scheme}://${location.host}/ws/${this.role}${query}`);
    this.ws = ws;
    this.onState("connecting…");
    let openedAt = 0;
    ws.onopen = () => {
      openedAt = Date.now();
      this.opens += 1;
      document.body.dataset.opens = String(this.opens);
      this.onState("connected");
      this.onOpen();
    };
    ws.onmessage = (e) => this.onMessage(JSON.parse(e.data));
    ws.onclose = (e) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (!this.wanted) return;
      // The wait grows until a connection has lasted a while: two pages
      // with the same id replace each other ever more slowly, not in a
      // tight loop.
      if (openedAt && Date.now() - openedAt > 10_000) this.backoffMs = 250;
      const wait = this.backoffMs;
      this.backoffMs = Math.min(this.backoffMs * 2, 8000);
      const why = e.reason ? `: ${e.reason}` : "";
      this.onState(`disconnected (${e.code || "no code"}${why}); reconnecting in ${(wait / 1000).toFixed(1)} s`);
      setTimeout(() => this.wanted && !this.ws && this.open(), wait);
    };
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
      return true;
    }
    return false;
  }
}
