// The HTTP API, as the page uses it. Every error becomes an ApiError carrying the service's
// {error, detail}; network failures and missing keys too, so views handle one kind of failure.
import {keyFor} from "./keys.js";

export class ApiError extends Error {
  constructor(status, error, detail) {
    super(detail);
    this.status = status;
    this.error = error;
  }
}

/** api("/v1/models"), or api(path, {method: "POST", json: {...}, key: "admin"}); `form` sends
 * a FormData body. */
export async function api(path, {method = "GET", json, form, key = "app"} = {}) {
  const token = keyFor(key);
  if (!token) {
    throw new ApiError(0, "no_key", key === "admin"
      ? "This needs an admin key: add one under Keys."
      : "Enter an API key first (Keys, top right).");
  }
  const headers = {Authorization: `Bearer ${token}`};
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  let response;
  try {
    response = await fetch(path, {method, headers, body, cache: "no-store"});
  } catch {
    throw new ApiError(0, "network", "The service did not answer. Is it running?");
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, data?.error ?? `http_${response.status}`,
                       data?.detail ?? response.statusText);
  }
  return data;
}

/** Send a clip: the answer of POST /v1/predictions. */
export function predict(blob, fileName, userId) {
  const form = new FormData();
  form.append("file", blob, fileName);
  if (userId) form.append("user_id", userId);
  return api("/v1/predictions", {method: "POST", form});
}

/** Send a long recording: POST /v1/recordings answers 201 (done) or 202 (a job to poll). */
export function sendRecording(file, userId) {
  const form = new FormData();
  form.append("file", file, file.name);
  if (userId) form.append("user_id", userId);
  return api("/v1/recordings", {method: "POST", form});
}

export function getRecording(recordingId) {
  return api(`/v1/recordings/${encodeURIComponent(recordingId)}`);
}

export function sendSegmentFeedback(recordingId, index, label, userId) {
  const json = userId ? {label, user_id: userId} : {label};
  const path = `/v1/recordings/${encodeURIComponent(recordingId)}/segments/${index}/feedback`;
  return api(path, {method: "POST", json});
}

export function sendFeedback(predictionId, label, userId) {
  const json = userId ? {label, user_id: userId} : {label};
  const path = `/v1/predictions/${encodeURIComponent(predictionId)}/feedback`;
  return api(path, {method: "POST", json});
}

// Which endpoints this service has: the learner and personal models may not have landed in the
// version that serves the page. Read once from the OpenAPI document, which needs no key.
let capabilities;

export function hasEndpoint(method, path) {
  capabilities ??= fetch("/openapi.json", {cache: "no-store"})
    .then((response) => (response.ok ? response.json() : {paths: {}}))
    .then((doc) => doc.paths || {})
    .catch(() => ({}));
  return capabilities.then((paths) => Boolean(paths[path]?.[method.toLowerCase()]));
}

let labels;

/** {labels, feedback_labels, model_version}; refreshed when keys change. */
export function getLabels({refresh = false} = {}) {
  if (refresh || !labels) {
    labels = api("/v1/labels").catch((err) => {
      labels = undefined;
      throw err;
    });
  }
  return labels;
}

/** The global version serving now, from /ready (no key needed); null while loading. */
export async function servingVersion() {
  const response = await fetch("/ready", {cache: "no-store"});
  if (!response.ok) return null;
  return (await response.json()).model_version;
}
