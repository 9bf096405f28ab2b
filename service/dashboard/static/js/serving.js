// The header's "serving vN" pill: which global version answers predictions right now.
import {servingVersion} from "./api.js";
import {$} from "./dom.js";

const POLL_MS = 5000;

export async function refreshServing() {
  const pill = $("#serving");
  try {
    const version = await servingVersion();
    pill.dataset.state = version === null ? "loading" : "ready";
    $("#serving-text").textContent = version === null ? "model loading" : `serving v${version}`;
    return version;
  } catch {
    pill.dataset.state = "down";
    $("#serving-text").textContent = "service unreachable";
    return null;
  }
}

export function followServing() {
  refreshServing();
  setInterval(() => {
    if (document.visibilityState === "visible") refreshServing();
  }, POLL_MS);
}
