// The users view: which model answers a user (GET /v1/users/{user_id}/model), how far they are
// from a personal one and, with an admin key, their personal versions and gate reports.
// A service without personal models says so instead.
import {api, hasEndpoint} from "./api.js";
import {$, capitalize, formatTime, h, replaceChildren} from "./dom.js";
import {gateReport} from "./gate-chart.js";
import {hasAdminKey, userId} from "./keys.js";

const PATH = "/v1/users/{user_id}/model";
const VERSIONS_PATH = "/v1/admin/users/{user_id}/models";
const NOT_AVAILABLE = "Not available: this version of the service has no personal models yet.";
const STATUS = {
  active: "A personal version answers this user.",
  collecting: "Collecting corrections until there are enough for a personal round.",
  due: "Enough corrections: the next personal round builds a personal version.",
  rejected: "The last personal round's candidate did not pass the gate; more corrections " +
            "will try again.",
  disabled: "Personal models are switched off in this service.",
};

export function initUsers() {
  const input = $("#user-lookup");
  $("#user-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookUp(input.value.trim());
  });
  return {
    async load() {
      if (!input.value && userId()) input.value = userId();
      if (!(await hasEndpoint("get", PATH))) {
        replaceChildren($("#user-result"), h("p", {class: "empty"}, NOT_AVAILABLE));
      }
    },
  };
}

async function lookUp(user) {
  const host = $("#user-result");
  if (!user) return;
  if (!(await hasEndpoint("get", PATH))) {
    replaceChildren(host, h("p", {class: "empty"}, NOT_AVAILABLE));
    return;
  }
  replaceChildren(host, h("p", {class: "empty"}, "Looking up…"));
  // An admin key sees every user; an app key only the users it made predictions for.
  const key = hasAdminKey() ? "admin" : "app";
  const path = (template) => template.replace("{user_id}", encodeURIComponent(user));
  try {
    const model = await api(path(PATH), {key});
    const versions = key === "admin" && await hasEndpoint("get", VERSIONS_PATH)
      ? await api(path(VERSIONS_PATH), {key}) : null;
    replaceChildren(host, personalCard(model), versions ? versionList(versions) : null);
  } catch (err) {
    const message = err.status === 404
      ? `No predictions for ${user} ${key === "admin" ? "yet" : "from this app key"}.`
      : `Could not look up ${user}: ${err.message}`;
    replaceChildren(host, h("p", {class: err.status === 404 ? "empty" : "error-box"}, message));
  }
}

function personalCard(model) {
  const have = model.feedback_count ?? 0;
  const need = model.min_feedback ?? 0;
  const progress = need ? Math.min(1, have / need) : 1;
  return h("div", {class: "personal", dataset: {personal: String(Boolean(model.personal)),
                                                status: model.status}},
    h("p", {class: "personal-head"},
      h("strong", {}, model.user_id),
      h("span", {class: `badge ${model.personal ? "badge-personal" : "badge-candidate"}`},
        model.personal ? `personal v${model.version}` : "global model"),
      h("span", {class: "badge"}, model.status)),
    h("p", {}, model.personal
      ? `Predictions for ${model.user_id} come from personal version ${model.version}, built on ` +
        `global version ${model.built_on_version}.`
      : `${model.user_id} is answered by the global model.`),
    h("p", {class: "muted"}, STATUS[model.status] ?? capitalize(String(model.status))),
    h("div", {class: "progress-row"},
      h("label", {for: "personal-progress"},
        `Corrections: ${have} of ${need} for a personal round`),
      h("progress", {id: "personal-progress", max: 1, value: progress.toFixed(3)},
        `${Math.round(progress * 100)}%`)));
}

function versionList(versions) {
  if (!versions.length) return h("p", {class: "empty"}, "No personal versions yet.");
  return h("section", {class: "personal-versions", "aria-labelledby": "personal-versions-title"},
    h("h2", {id: "personal-versions-title"}, "Personal versions"),
    h("ol", {class: "runs"}, versions.slice().reverse().map((version, i) =>
      h("li", {class: "run", dataset: {version: version.version}},
        h("div", {class: "run-head"},
          h("strong", {}, `Version ${version.version}`),
          h("span", {class: `badge badge-${version.status}`}, version.status),
          h("span", {class: "muted"}, `on global v${version.parent_version}`)),
        h("p", {class: "run-meta"}, `Created ${formatTime(version.created_at)}`),
        version.gate_report ? h("details", {class: "gate-details", open: i === 0},
          h("summary", {}, `Gate report: ${version.gate_report.decision ?? "–"}`),
          gateReport(version.gate_report)) : null))));
}
