// Corrections sent from this tab: each one is POSTed at once, and the header counts those the
// service acknowledged (201), so the count is what the learner will really see.
import {sendFeedback} from "./api.js";
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

/** Send one correction (or confirmation); resolves to the feedback id once it is stored. */
export async function sendCorrection(predictionId, label) {
  const {feedback_id: feedbackId} = await sendFeedback(predictionId, label, userId());
  sessionStorage.setItem(STORAGE, String(count() + 1));
  show();
  return feedbackId;
}
