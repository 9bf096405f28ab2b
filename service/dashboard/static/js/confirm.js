// The confirmation asked before anything that changes which model serves. A native <dialog>:
// focus moves into it, Escape cancels, and focus returns to the button that opened it.
import {$} from "./dom.js";

/** Resolves to {reason} when confirmed, null when cancelled. */
export function confirmAction({title, message, confirmLabel, askReason = true}) {
  const dialog = $("#confirm-dialog");
  $("#confirm-title").textContent = title;
  $("#confirm-message").textContent = message;
  $("#confirm-ok").textContent = confirmLabel;
  $("#confirm-reason-field").hidden = !askReason;
  const reason = $("#confirm-reason");
  reason.value = "";
  dialog.returnValue = "";
  const opener = document.activeElement;
  $("#confirm-cancel").onclick = () => dialog.close("cancel");
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      opener?.focus?.();
      resolve(dialog.returnValue === "confirm" ? {reason: reason.value.trim() || null} : null);
    }, {once: true});
    dialog.showModal();
    (askReason ? reason : $("#confirm-cancel")).focus();
  });
}
