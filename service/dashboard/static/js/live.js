// The live view: record, send a window every second, and show the current emotion, a timeline
// of the session and the share of time per emotion.
import {predict} from "./api.js";
import {$, capitalize, h, percent, replaceChildren} from "./dom.js";
import {NO_SPEECH, colourOf, swatch} from "./emotions.js";
import {userId} from "./keys.js";
import {HOP_SECONDS, Microphone, Windower, level} from "./microphone.js";
import {ResultView} from "./result.js";
import {encodeWav} from "./wav.js";

const MAX_IN_FLIGHT = 2; // a slow service gets fewer windows rather than a growing queue
const QUIET = new Set(["silent_audio", "audio_too_short", "empty_audio"]);

export function initLive() {
  const view = new LiveView();
  $("#live-toggle").addEventListener("click", () => view.toggle());
  $("#live-clear").addEventListener("click", () => view.clearSession());
  return view;
}

class LiveView {
  constructor() {
    this.button = $("#live-toggle");
    this.state = $("#live-state");
    this.levelBar = $("#live-level");
    this.result = new ResultView($("#live-result"));
    this.microphone = null;
    this.entries = []; // one per window that came back, in window order
    this.pinned = null; // a window the user picked on the timeline, shown instead of the latest
    this.inFlight = 0;
    this.skipped = 0;
    this.windowIndex = 0;
  }

  toggle() {
    return this.microphone ? this.stop() : this.start();
  }

  async start() {
    this.setRecording(true, "Starting the microphone…");
    const microphone = new Microphone();
    this.microphone = microphone;
    let windower;
    try {
      const rate = await microphone.start((block) => {
        if (!windower || this.microphone !== microphone) return;
        this.levelBar.style.width = `${(level(block) * 100).toFixed(0)}%`;
        const window = windower.push(block);
        if (window) this.send(window);
      });
      windower = new Windower(rate);
      this.sessionOffset = this.entries.length ? this.entries.at(-1).end : 0;
      this.startedAt = performance.now();
      this.say("Recording: speak now");
    } catch (err) {
      await microphone.stop();
      this.microphone = null;
      this.setRecording(false, `Could not record: ${err.message}`);
    }
  }

  async stop() {
    const microphone = this.microphone;
    this.microphone = null;
    this.setRecording(false, "Stopped");
    this.levelBar.style.width = "0";
    await microphone?.stop();
  }

  setRecording(on, text) {
    this.button.setAttribute("aria-pressed", String(on));
    $("#live-toggle-text").textContent = on ? "Stop recording" : "Start recording";
    this.say(text);
    $("#live-clock").textContent = "";
  }

  async send({samples, rate, start, end}) {
    if (this.inFlight >= MAX_IN_FLIGHT) {
      this.skipped += 1;
      return;
    }
    const index = this.windowIndex++;
    const offset = this.sessionOffset;
    // For the statistics each window stands for the newest second of audio it added.
    const entry = {index, start: offset + start, end: offset + end,
                   seconds: Math.min(HOP_SECONDS, end)};
    this.inFlight += 1;
    try {
      entry.prediction = await predict(encodeWav(samples, rate), `live-${index}.wav`, userId());
      entry.label = entry.prediction.emotion;
      this.tick("Recording");
    } catch (err) {
      if (!QUIET.has(err.error)) {
        this.say(`Window not classified: ${err.message}`);
        if (err.status === 401 || err.status === 403) await this.stop();
        return;
      }
      entry.label = NO_SPEECH; // silence is part of the session, not an error
      this.tick("Recording (too quiet: speak up)");
    } finally {
      this.inFlight -= 1;
    }
    this.add(entry);
  }

  /** The state line is a live region: change it only when the state changes, so a screen
   * reader is not read the clock every second. */
  say(text) {
    if (this.state.textContent !== text) this.state.textContent = text;
  }

  tick(text) {
    if (!this.microphone) return;
    this.say(text);
    const seconds = Math.floor((performance.now() - this.startedAt) / 1000);
    const clock = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
    $("#live-clock").textContent = clock;
  }

  add(entry) {
    this.entries.push(entry);
    this.entries.sort((a, b) => a.index - b.index);
    if (!this.pinned && entry.prediction && entry === this.latestWithPrediction()) {
      this.result.show(entry.prediction, windowCaption(entry));
    }
    this.renderTimeline();
    this.renderStats();
  }

  latestWithPrediction() {
    return this.entries.findLast((e) => e.prediction);
  }

  pin(entry) {
    this.pinned = entry === this.latestWithPrediction() ? null : entry;
    this.result.show(entry.prediction, windowCaption(entry) + (this.pinned ? " (picked)" : ""));
    this.renderTimeline();
  }

  clearSession() {
    this.entries = [];
    this.pinned = null;
    this.skipped = 0;
    this.result.clear("Results appear here while you speak.");
    this.renderTimeline();
    this.renderStats();
  }

  renderTimeline() {
    const host = $("#live-timeline");
    if (!this.entries.length) {
      replaceChildren(host, h("p", {class: "empty"}, "No windows yet."));
      return;
    }
    // Redrawn every second while recording: keep keyboard focus on the timeline if it was there.
    const hadFocus = host.querySelector(".timeline")?.contains(document.activeElement);
    const selected = this.pinned ?? this.latestWithPrediction();
    const segments = this.entries.map((entry) => {
      const text = `${seconds(entry.start)}–${seconds(entry.end)}: ${entry.label}` +
        (entry.prediction ? ` ${percent(entry.prediction.confidence)}` : "");
      const attrs = {class: "segment", title: text, style: {background: colourOf(entry.label)}};
      if (!entry.prediction) return h("li", {}, h("span", {...attrs, "aria-label": text}));
      // One tab stop for the whole timeline; the arrow keys move between windows.
      return h("li", {}, h("button", {
        ...attrs, type: "button", "aria-label": text, "aria-pressed": String(entry === selected),
        tabindex: entry === selected ? "0" : "-1", dataset: {index: entry.index},
        onclick: () => this.pin(entry), onkeydown: (event) => this.moveSelection(event, entry),
      }));
    });
    const last = this.entries.at(-1);
    replaceChildren(host,
      this.pinned ? h("p", {class: "pin-note"},
        `Showing the window at ${windowCaption(this.pinned)}. `,
        h("button", {type: "button", class: "btn btn-small", onclick: () => this.followLive()},
          "Back to live")) : null,
      h("ol", {class: "timeline", "aria-labelledby": "timeline-title"}, segments),
      h("div", {class: "timeline-axis", "aria-hidden": "true"},
        h("span", {}, seconds(this.entries[0].start)), h("span", {}, seconds(last.end))));
    if (hadFocus) host.querySelector(".timeline [tabindex='0']")?.focus();
  }

  moveSelection(event, entry) {
    const clickable = this.entries.filter((e) => e.prediction);
    const at = clickable.indexOf(entry);
    const moves = {ArrowLeft: at - 1, ArrowRight: at + 1, Home: 0, End: clickable.length - 1};
    const to = moves[event.key];
    if (to === undefined || !clickable[to]) return;
    event.preventDefault();
    this.pin(clickable[to]);
    $(`#live-timeline button[data-index="${clickable[to].index}"]`)?.focus();
  }

  followLive() {
    this.pinned = null;
    const latest = this.latestWithPrediction();
    if (latest) this.result.show(latest.prediction, windowCaption(latest));
    this.renderTimeline();
    $("#live-toggle").focus();
  }

  renderStats() {
    const host = $("#live-stats");
    const spoken = this.entries.filter((e) => e.prediction);
    if (!spoken.length) {
      replaceChildren(host, h("p", {class: "empty"}, "Statistics appear after the first result."));
      return;
    }
    // Each window stands for the newest second it added: the share of time, not of windows.
    const time = new Map();
    for (const entry of spoken) time.set(entry.label, (time.get(entry.label) ?? 0) + entry.seconds);
    const total = [...time.values()].reduce((a, b) => a + b, 0);
    const rows = [...time.entries()].sort((a, b) => b[1] - a[1]);
    const quiet = this.entries.filter((e) => !e.prediction).reduce((a, e) => a + e.seconds, 0);
    const latency = spoken.map((e) => e.prediction.latency_ms).sort((a, b) => a - b);
    replaceChildren(host,
      h("div", {class: "stack", "aria-hidden": "true"}, rows.map(([label, t]) =>
        h("span", {style: {width: `${(100 * t) / total}%`, background: colourOf(label)},
                   title: `${label} ${percent(t / total)}`}))),
      h("ul", {class: "stat-list"}, rows.map(([label, t]) => h("li", {},
        swatch(label),
        h("span", {class: "stat-label"}, capitalize(label)),
        h("span", {class: "stat-value"}, percent(t / total)),
        h("span", {class: "stat-seconds"}, seconds(t))))),
      h("p", {class: "stat-summary"},
        `${seconds(total)} of speech in ${spoken.length} window${spoken.length === 1 ? "" : "s"}`,
        quiet ? `, ${seconds(quiet)} too quiet` : "",
        `; median server time ${Math.round(latency[latency.length >> 1])} ms`,
        this.skipped ? `; ${this.skipped} windows skipped while the service was busy` : "", "."));
  }
}

function seconds(value) {
  return `${value.toFixed(value < 10 && value % 1 ? 1 : 0)} s`;
}

function windowCaption(entry) {
  return `${seconds(entry.start)}–${seconds(entry.end)}`;
}
