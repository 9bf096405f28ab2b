// Corrections sent from this tab: each one is POSTed at once, and the header counts those the
// service acknowledged (201), so the count is what the learner will really see.
import {sendFeedback, sendSegmentFeedback} from "./api.js";
import {$} from "./dom.js";
import {userId} from "./keys.js";

const STORAGE = "emoloop.correctionsSent";

function count() {
  return Number(sessionStorage.getItem(STORAGE) || 0);
}

function show() {
  $("#corrections-count").textContent = String(count());
}

export function initCorrectionsCounter() {
  show();
}

/** Count a correction the service acknowledged some other way (a live stream's). */
export function counted(feedbackId) {
  sessionStorage.setItem(STORAGE, String(count() + 1));
  show();
  return feedbackId;
}

/** Send one correction (or confirmation); resolves to the feedback id once it is stored. */
export async function sendCorrection(predictionId, label) {
  return counted((await sendFeedback(predictionId, label, userId())).feedback_id);
}

/** The same for a segment of a long recording. */
export async function sendSegmentCorrection(recordingId, index, label) {
  return counted((await sendSegmentFeedback(recordingId, index, label, userId())).feedback_id);
}
