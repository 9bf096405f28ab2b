// The models view (admin): every version with status, parent, labels, metrics and gate report;
// activate or roll back after a confirmation; start a learning round; the rounds and the audit log.
// The learner's endpoints may not exist in the service serving the page: then those parts say so.
import {ApiError, api, hasEndpoint} from "./api.js";
import {confirmAction} from "./confirm.js";
import {$, emptyNote, formatTime, h, percent, replaceChildren} from "./dom.js";
import {gateReport} from "./gate-chart.js";
import {hasAdminKey} from "./keys.js";
import {refreshServing} from "./serving.js";

const RUNS_PATH = "/v1/admin/runs";
const START_ROUND_PATH = "/v1/admin/learner/run";
const RUN_POLL_MS = 1000;
const NOT_AVAILABLE = "Not available: this version of the service has no learner endpoints yet.";

export function initModels() {
  const view = new ModelsView();
  $("#models-refresh").addEventListener("click", () => view.load());
  $("#start-round").addEventListener("click", () => view.startRound());
  return view;
}

class ModelsView {
  async load() {
    const admin = hasAdminKey();
    const [canRun, canList] = await Promise.all([hasEndpoint("post", START_ROUND_PATH),
                                                 hasEndpoint("get", RUNS_PATH)]);
    const start = $("#start-round");
    start.disabled = !admin || !canRun;
    start.title = !canRun ? NOT_AVAILABLE : admin ? "" : "Needs an admin key";
    if (!admin) {
      this.say("Read-only: add an admin key under Keys to activate versions, start rounds and " +
               "read the audit log.", "readonly");
    } else if ($("#models-message").dataset.kind === "readonly") {
      this.say("", "info");
    }
    await Promise.all([this.loadVersions(admin), this.loadRuns(admin, canList),
                       this.loadAudit(admin)]);
  }

  say(text, kind = "info") {
    const box = $("#models-message");
    box.textContent = text;
    box.dataset.kind = kind;
  }

  async loadVersions(admin) {
    const host = $("#versions");
    let versions;
    try {
      versions = await api("/v1/models");
    } catch (err) {
      const message = `Could not list versions: ${err.message}`;
      replaceChildren(host, h("p", {class: "error-box"}, message));
      return;
    }
    const active = versions.find((v) => v.status === "active")?.version ?? null;
    const newestWithGate = versions.findLast((v) => v.gate_report)?.version;
    replaceChildren(host, versions.slice().reverse().map((version) =>
      versionCard(version, {active, admin, openGate: version.version === newestWithGate,
                            onActivate: () => this.activate(version, active)})));
  }

  async activate(version, active) {
    const rollback = active !== null && version.version < active;
    const verb = `${rollback ? "Roll back to" : "Activate"} version ${version.version}`;
    const answer = await confirmAction({
      title: `${verb}?`,
      message: `Version ${version.version} will answer every prediction from now on; every ` +
        `worker switches within about a second.` +
        (active !== null ? ` Version ${active} is retired (you can activate it again later).` : ""),
      confirmLabel: verb,
    });
    if (!answer) {
      this.say("Nothing changed.", "info");
      return;
    }
    try {
      await api(`/v1/admin/models/${version.version}/activate`,
                {method: "POST", key: "admin", json: answer.reason ? {reason: answer.reason} : {}});
      this.say(`Version ${version.version} is active.`, "ok");
    } catch (err) {
      this.say(`Version ${version.version} was not activated: ${err.message}`, "error");
    }
    await Promise.all([this.load(), refreshServing()]);
  }

  async startRound() {
    const button = $("#start-round");
    button.disabled = true;
    this.say("Starting a round…", "info");
    try {
      const {run_id: runId} = await api(START_ROUND_PATH, {method: "POST", key: "admin"});
      this.say(`Round #${runId} started. Its result appears under Learning rounds.`, "ok");
      this.followRun(runId);
    } catch (err) {
      if (err.error === "round_running") this.say("A round is already running.", "info");
      else if (err.status === 404 && err.error !== "no_key") this.say(NOT_AVAILABLE, "info");
      else this.say(`The round did not start: ${err.message}`, "error");
    } finally {
      button.disabled = false;
    }
    await this.loadRuns(hasAdminKey(), await hasEndpoint("get", RUNS_PATH));
  }

  /** Refresh the rounds until this one finishes, while the models view stays open. */
  followRun(runId) {
    clearInterval(this.runTimer);
    this.runTimer = setInterval(async () => {
      if ($("#view-models").hidden) return;
      try {
        const run = await api(`${RUNS_PATH}/${runId}`, {key: "admin"});
        if (run.status === "running") return;
        clearInterval(this.runTimer);
        const kind = run.status === "failed" ? "error" : "ok";
        this.say(`Round #${runId} finished: ${run.status}.`, kind);
        await Promise.all([this.load(), refreshServing()]);
      } catch {
        clearInterval(this.runTimer);
      }
    }, RUN_POLL_MS);
  }

  async loadRuns(admin, available) {
    const host = $("#runs");
    if (!available) return replaceChildren(host, emptyNote(NOT_AVAILABLE));
    if (!admin) return replaceChildren(host, emptyNote("Needs an admin key."));
    try {
      const {runs} = await api(RUNS_PATH, {key: "admin"});
      // The newest round's gate report is open; older ones one click away.
      replaceChildren(host, runs.length
        ? h("ol", {class: "runs"}, runs.map((run, i) => runItem(run, i === 0)))
        : emptyNote("No learning round has run yet."));
    } catch (err) {
      replaceChildren(host, emptyNote(err instanceof ApiError && err.status === 404 ? NOT_AVAILABLE
        : `Could not list rounds: ${err.message}`));
    }
  }

  async loadAudit(admin) {
    const host = $("#audit");
    if (!admin) return replaceChildren(host, emptyNote("Needs an admin key."));
    try {
      const entries = await api("/v1/admin/audit?limit=50", {key: "admin"});
      replaceChildren(host, entries.length ? h("ol", {class: "audit"}, entries.map(auditItem))
        : emptyNote("Nothing recorded yet."));
    } catch (err) {
      replaceChildren(host, emptyNote(`Could not read the audit log: ${err.message}`));
    }
  }
}

function versionCard(version, {active, admin, openGate, onActivate}) {
  const isActive = version.status === "active";
  let action = null;
  if (isActive) {
    action = h("span", {class: "serving-note"}, "Serving now");
  } else if (version.status === "rejected") {
    action = h("span", {class: "muted"}, "Rejected by the gate: cannot be activated");
  } else if (admin) {
    const label = active !== null && version.version < active
      ? `Roll back to v${version.version}` : `Activate v${version.version}`;
    action = h("button", {type: "button", class: "btn", onclick: onActivate,
                          dataset: {activate: version.version}}, label);
  }
  return h("article", {class: `card version${isActive ? " version-active" : ""}`,
                       dataset: {version: version.version, status: version.status},
                       "aria-labelledby": `version-${version.version}`},
    h("header", {class: "version-head"},
      h("h2", {id: `version-${version.version}`}, `Version ${version.version}`),
      h("span", {class: `badge badge-${version.status} version-status`}, version.status)),
    h("dl", {class: "kv"},
      h("dt", {}, "Parent"),
      h("dd", {}, version.parent_version ? `v${version.parent_version}` : "none (base model)"),
      h("dt", {}, "Created"), h("dd", {}, formatTime(version.created_at)),
      h("dt", {}, "Activated"), h("dd", {}, formatTime(version.activated_at)),
      h("dt", {}, `Labels (${version.labels.length})`), h("dd", {}, version.labels.join(", ")),
      h("dt", {}, "sha256"),
      h("dd", {class: "mono", title: version.sha256}, `${version.sha256.slice(0, 16)}…`),
      ...metricRows(version.metrics)),
    version.gate_report ? h("details", {class: "gate-details", open: openGate},
      h("summary", {}, `Gate report: ${version.gate_report.decision ?? "–"}`),
      gateReport(version.gate_report)) : null,
    Object.keys(version.metrics || {}).length ? h("details", {class: "raw"},
      h("summary", {}, "All metrics"),
      h("pre", {}, JSON.stringify(version.metrics, null, 2))) : null,
    action ? h("footer", {class: "version-foot"}, action) : null);
}

/** Headline metrics: top-level numbers, and one line per section of numbers (validation, test). */
function metricRows(metrics = {}) {
  const rows = [];
  for (const [key, value] of Object.entries(metrics)) {
    if (typeof value === "number") rows.push([key, number(value)]);
    else if (value && typeof value === "object" && !Array.isArray(value)) {
      const parts = Object.entries(value).filter(([, v]) => typeof v === "number")
        .map(([k, v]) => `${k.replaceAll("_", " ")} ${number(v)}`);
      if (parts.length) rows.push([key, parts.join(" · ")]);
    }
  }
  return rows.flatMap(([k, v]) => [h("dt", {}, k.replaceAll("_", " ")), h("dd", {}, v)]);
}

function number(value) {
  return Number.isInteger(value) ? value.toLocaleString() : value <= 1 && value >= 0
    ? percent(value, 1) : value.toFixed(3);
}

function runItem(run, open) {
  const counts = Object.entries(run.counts || {}).map(([k, v]) => `${k.replaceAll("_", " ")} ${v}`);
  return h("li", {class: "run", dataset: {run: run.id, status: run.status}},
    h("div", {class: "run-head"},
      h("strong", {}, `Round #${run.id}`),
      h("span", {class: `badge badge-${run.status}`}, run.status),
      h("span", {class: "muted"},
        [run.trigger, run.scope === "user" ? `user ${run.user_id}` : run.scope]
          .filter(Boolean).join(" · "))),
    h("p", {class: "run-meta"}, `Started ${formatTime(run.started_at)}`,
      run.finished_at ? `, finished ${formatTime(run.finished_at)}` : "",
      run.candidate_version ? `; candidate v${run.candidate_version}` : ""),
    counts.length ? h("p", {class: "run-meta"}, counts.join(" · ")) : null,
    // A skipped round says why (no new feedback) in `error`; that is news, not a failure.
    run.error ? h("p", {class: run.status === "skipped" ? "muted" : "error-box"},
      run.status === "skipped" ? `Skipped: ${run.error}` : run.error) : null,
    run.gate_report ? h("details", {class: "gate-details", open},
      h("summary", {}, `Gate report: ${run.gate_report.decision ?? "–"}`),
      gateReport(run.gate_report)) : null);
}

function auditItem(entry) {
  const {reason, ...rest} = entry.details || {};
  const details = Object.entries(rest).map(([k, v]) => `${k.replaceAll("_", " ")}: ${brief(v)}`);
  return h("li", {class: "audit-entry"},
    h("div", {class: "audit-head"},
      h("code", {}, entry.action), h("span", {}, entry.target),
      h("time", {datetime: entry.created_at, class: "muted"}, formatTime(entry.created_at))),
    reason ? h("p", {}, `“${reason}”`) : null,
    h("p", {class: "muted small"},
      entry.actor_key_id === null ? "by the command line or the learner"
        : `by key #${entry.actor_key_id}`,
      details.length ? ` · ${details.join(" · ")}` : ""));
}

function brief(value) {
  if (value === null || value === undefined) return "–";
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > 24 ? `${text.slice(0, 16)}…` : text;
}
