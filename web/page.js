// What the rider and driver pages share: who they are, the message log,
// errors shown in words.

import { credentials, remember, describeError } from "./session.js";

export const $ = (id) => document.getElementById(id);

export function log(text) {
  const li = document.createElement("li");
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("log").prepend(li);
  while ($("log").children.length > 50) $("log").lastChild.remove();
}

export function showError(message) {
  $("error").textContent = message ? describeError(message) : "";
}

/** Fills the id and token boxes; calls `start(who)` on Connect (at once if
 * the address carried a token or an id). */
export function identify(role, defaultId, start) {
  const who = credentials(role);
  $("token").value = who.token;
  $("id").value = who.id || defaultId;
  const go = () => {
    const chosen = { token: $("token").value.trim(), id: $("id").value.trim() };
    if (!chosen.token && !chosen.id) {
      $("error").textContent = "give an id (open mode) or paste a token";
      return;
    }
    remember(role, chosen);
    $("connect").disabled = true;
    start(chosen);
  };
  $("connect").addEventListener("click", go);
  if (who.token || who.id) go();
}

export function fmtPosition(at) {
  return `${at.lat.toFixed(5)}, ${at.lon.toFixed(5)}`;
}
