// The API keys and the user's own id: entered once, kept in this tab's sessionStorage (gone when
// the tab closes), never put in the URL. Views listen for "change" to reload what they show.
import {$} from "./dom.js";

const STORAGE = {app: "emoloop.appKey", admin: "emoloop.adminKey", user: "emoloop.userId"};

export const keys = new EventTarget();

function read(name) {
  return sessionStorage.getItem(STORAGE[name]) || "";
}

function write(name, value) {
  if (value) sessionStorage.setItem(STORAGE[name], value);
  else sessionStorage.removeItem(STORAGE[name]);
}

/** The key to send for a kind of call: "app" calls may use the admin key when no app key was
 * given (any valid key may predict); "admin" calls only the admin key. */
export function keyFor(kind) {
  return kind === "admin" ? read("admin") : read("app") || read("admin");
}

export function hasAdminKey() {
  return Boolean(read("admin"));
}

export function userId() {
  return read("user");
}

export function initKeysDialog() {
  const dialog = $("#keys-dialog");
  const form = $("#keys-form");
  const fields = {app: $("#app-key"), admin: $("#admin-key"), user: $("#speaker-id")};
  const error = $("#keys-error");

  function open() {
    for (const [name, input] of Object.entries(fields)) input.value = read(name);
    error.textContent = "";
    dialog.showModal();
    fields.app.focus();
  }

  form.addEventListener("submit", (event) => {
    const values = Object.fromEntries(
      Object.entries(fields).map(([name, input]) => [name, input.value.trim()]));
    if (!values.app && !values.admin) {
      event.preventDefault();
      error.textContent = "Enter an app key, an admin key, or both.";
      fields.app.focus();
      return;
    }
    for (const [name, value] of Object.entries(values)) write(name, value);
    keys.dispatchEvent(new Event("change"));
  });
  $("#keys-cancel").addEventListener("click", () => dialog.close());
  $("#keys-forget").addEventListener("click", () => {
    for (const name of Object.keys(STORAGE)) write(name, "");
    for (const input of Object.values(fields)) input.value = "";
    keys.dispatchEvent(new Event("change"));
    fields.app.focus();
  });
  $("#open-keys").addEventListener("click", open);
  if (!keyFor("app")) open();
}
