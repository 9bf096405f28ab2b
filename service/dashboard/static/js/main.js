// The dashboard's entry point: wire the views and switch between them on the URL's #fragment
// (the fragment names a view, nothing else: keys never appear in the address).
import {getLabels} from "./api.js";
import {initCorrectionsCounter} from "./corrections.js";
import {initKeysDialog, keys} from "./keys.js";
import {initLive} from "./live.js";
import {initModels} from "./models.js";
import {initRecordings} from "./recordings.js";
import {followServing} from "./serving.js";
import {initUpload} from "./upload.js";
import {initUsers} from "./users.js";

const VIEWS = ["live", "upload", "recordings", "models", "users"];

function currentView() {
  const name = location.hash.slice(1);
  return VIEWS.includes(name) ? name : "live";
}

function start() {
  const loaders = {models: initModels(), users: initUsers()};
  initLive();
  initUpload();
  initRecordings();
  initCorrectionsCounter();

  function show() {
    const name = currentView();
    for (const panel of document.querySelectorAll("[data-panel]")) {
      panel.hidden = panel.dataset.panel !== name;
    }
    for (const link of document.querySelectorAll(".tabs a")) {
      if (link.dataset.view === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = `${name[0].toUpperCase()}${name.slice(1)} · emoloop`;
    loaders[name]?.load();
  }

  window.addEventListener("hashchange", show);
  keys.addEventListener("change", () => {
    getLabels({refresh: true}).catch(() => {});
    show();
  });
  show();
  followServing();
  initKeysDialog();
  document.body.dataset.ready = "true"; // the browser tests wait for this
}

start(); // a module script runs after the document is parsed
