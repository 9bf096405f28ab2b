// The recordings view: upload a long file, follow the job's progress, draw its emotion over
// time (the segments above, each window's own answer below) and correct any segment in one click.
import {getLabels, getRecording, sendRecording} from "./api.js";
import {sendSegmentCorrection} from "./corrections.js";
import {$, capitalize, h, percent, replaceChildren, s} from "./dom.js";
import {colourOf, swatch} from "./emotions.js";
import {userId} from "./keys.js";

const POLL_MS = 500;
const SILENCE = "silence";

function clock(seconds) {
  const minutes = Math.floor(seconds / 60);
  return `${String(minutes).padStart(2, "0")}:${(seconds % 60).toFixed(1).padStart(4, "0")}`;
}

function colour(label) {
  return label === SILENCE ? "var(--no-speech)" : colourOf(label);
}

export function initRecordings() {
  const input = $("#recording-input");
  input.addEventListener("change", () => {
    if (input.files.length) analyse(input.files[0]);
    input.value = ""; // the same file again is a new upload
  });
}

function status(text, progress = null) {
  $("#recording-status").hidden = false;
  $("#recording-status-text").textContent = text;
  const bar = $("#recording-progress");
  bar.hidden = progress === null;
  if (progress !== null) bar.value = progress;
}

async function analyse(file) {
  $("#recording-result").hidden = true;
  status(`Uploading ${file.name}…`, 0);
  try {
    let recording = await sendRecording(file, userId());
    while (recording.status === "running") {
      status(`Analysing ${file.name}: ${percent(recording.progress)}`, recording.progress);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      recording = await getRecording(recording.recording_id);
    }
    if (recording.status === "failed") throw new Error(recording.error.detail);
    status(`${file.name}: done.`, 1);
    await show(recording, file.name);
  } catch (err) {
    status(`Not analysed: ${err.message}`);
  }
}

async function show(recording, name) {
  const result = $("#recording-result");
  result.dataset.recordingId = recording.recording_id;
  $("#recording-name").textContent = name;
  const speech = recording.windows.filter((w) => w.raw !== SILENCE).length;
  $("#recording-meta").textContent = `${clock(recording.duration_s)} · ` +
    `${recording.windows.length} windows (${speech} with speech) · ` +
    `${recording.segments.length} segments · model v${recording.model_version}`;
  const rows = await segmentRows(recording);
  drawPlot(recording, rows);
  drawLegend(recording);
  replaceChildren($("#recording-segments"), rows);
  result.hidden = false;
}

function drawPlot(recording, rows) {
  const scale = 1000 / recording.duration_s;
  const segments = recording.segments.map((segment, index) => s("rect", {
    x: segment.start * scale, y: 0, height: 52, class: "plot-segment",
    width: Math.max((segment.end - segment.start) * scale, 1),
    fill: colour(segment.emotion), dataset: {index, emotion: segment.emotion},
    onclick: () => select(rows, index),
  }, s("title", {}, `${clock(segment.start)}–${clock(segment.end)} ${segment.emotion}`)));
  // Each window speaks for the time around its centre: half-way to its neighbours' centres,
  // the first from the start and the last to the end (a segment boundary above may sit
  // elsewhere between two centres: learner.timeline.boundary).
  const centres = recording.windows.map((w) => (w.start + w.end) / 2);
  const cuts = [0, ...centres.slice(1).map((c, i) => (centres[i] + c) / 2), recording.duration_s];
  const windows = recording.windows.map((w, i) => s("rect", {
    x: cuts[i] * scale, y: 60, height: 24, width: Math.max((cuts[i + 1] - cuts[i]) * scale, 1),
    fill: colour(w.raw), class: "plot-window",
  }));
  replaceChildren($("#recording-plot"), segments, windows);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => h("span", {}, clock(f * recording.duration_s)));
  replaceChildren($("#recording-axis"), ticks);
}

function drawLegend(recording) {
  const share = new Map();
  for (const segment of recording.segments) {
    share.set(segment.emotion, (share.get(segment.emotion) ?? 0) + segment.end - segment.start);
  }
  const items = [...share].sort((a, b) => b[1] - a[1]).map(([label, seconds]) =>
    h("li", {dataset: {label}}, h("span", {class: "swatch small", "aria-hidden": "true",
                                           style: {background: colour(label)}}),
      `${capitalize(label)} ${percent(seconds / recording.duration_s)}`));
  replaceChildren($("#recording-legend"), items);
}

async function segmentRows(recording) {
  let labels;
  try {
    labels = (await getLabels()).feedback_labels;
  } catch {
    labels = Object.keys(recording.windows.find((w) => w.probabilities)?.probabilities ?? {});
  }
  return recording.segments.map((segment, index) => {
    const head = h("p", {class: "segment-head"},
      h("span", {class: "segment-time"}, `${clock(segment.start)}–${clock(segment.end)}`),
      segment.emotion === SILENCE ? null : swatch(segment.emotion),
      h("strong", {}, capitalize(segment.emotion)),
      segment.confidence === null ? null : h("span", {}, `${percent(segment.confidence)}`));
    const item = h("li", {class: "recording-segment", dataset: {index}, tabindex: "-1"}, head);
    if (segment.emotion !== SILENCE) {
      const state = h("p", {class: "feedback-status", role: "status"});
      const buttons = labels.map((label) => h("button", {
        type: "button", class: "label-button", "aria-pressed": "false", dataset: {label},
        onclick: () => correct(recording.recording_id, index, label, buttons, state),
      }, swatch(label), capitalize(label)));
      item.append(h("fieldset", {class: "correct"},
        h("legend", {class: "visually-hidden"}, "The right emotion for this segment"),
        h("div", {class: "label-buttons"}, buttons), state));
    }
    return item;
  });
}

function select(rows, index) {
  for (const rect of document.querySelectorAll("#recording-plot .plot-segment")) {
    rect.classList.toggle("selected", Number(rect.dataset.index) === index);
  }
  for (const row of rows) row.classList.toggle("selected", Number(row.dataset.index) === index);
  rows[index].scrollIntoView({block: "nearest"});
  rows[index].focus();
}

async function correct(recordingId, index, label, buttons, state) {
  const button = buttons.find((b) => b.dataset.label === label);
  button.setAttribute("aria-busy", "true");
  state.className = "feedback-status";
  state.textContent = `Sending ${label}…`;
  try {
    const feedbackId = await sendSegmentCorrection(recordingId, index, label);
    for (const b of buttons) b.setAttribute("aria-pressed", String(b === button));
    state.className = "feedback-status ok";
    state.textContent = `Received: ${label} (correction #${feedbackId}).`;
  } catch (err) {
    state.className = "feedback-status error";
    state.textContent = `Not sent: ${err.message}`;
  } finally {
    button.removeAttribute("aria-busy");
  }
}
