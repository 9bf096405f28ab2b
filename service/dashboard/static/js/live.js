// The live view: stream the microphone to the service and show, every second, the window's
// own answer and the smoothed one, as two timelines, with the share of time per emotion. The
// service stores nothing of a stream unless a window is corrected.
import {$, capitalize, h, percent, replaceChildren} from "./dom.js";
import {NO_SPEECH, colourOf, swatch} from "./emotions.js";
import {counted} from "./corrections.js";
import {userId} from "./keys.js";
import {Microphone, level} from "./microphone.js";
import {ResultView} from "./result.js";
import {EmotionStream} from "./stream.js";

const SILENCE = "silence";

export function initLive() {
  const view = new LiveView();
  $("#live-toggle").addEventListener("click", () => view.toggle());
  $("#live-clear").addEventListener("click", () => view.clearSession());
  return view;
}

function shown(label) {
  return label === SILENCE ? NO_SPEECH : label;
}

class LiveView {
  constructor() {
    this.button = $("#live-toggle");
    this.state = $("#live-state");
    this.levelBar = $("#live-level");
    this.result = new ResultView($("#live-result"), {
      correct: (prediction, label) => this.correct(prediction, label),
    });
    this.microphone = null;
    this.stream = null;
    this.entries = []; // one per window that came back, in window order
    this.pinned = null; // a window the user picked on the timeline, shown instead of the latest
  }

  toggle() {
    return this.microphone ? this.stop() : this.start();
  }

  async start() {
    this.setRecording(true, "Starting the microphone…");
    const microphone = new Microphone();
    const stream = new EmotionStream({
      onWindow: (window) => this.add(window),
      onClose: (reason) => this.stop(`Stream closed: ${reason}`),
    });
    this.microphone = microphone;
    this.stream = stream;
    let sending = false;
    try {
      const rate = await microphone.start((block) => {
        if (this.microphone !== microphone) return;
        this.levelBar.style.width = `${(level(block) * 100).toFixed(0)}%`;
        if (sending) stream.send(block);
      });
      this.ready = await stream.open(rate, userId());
      this.sessionOffset = this.entries.length ? this.entries.at(-1).end : 0;
      this.startedAt = performance.now();
      sending = true;
      this.say("Recording: speak now");
    } catch (err) {
      stream.close();
      await microphone.stop();
      this.microphone = this.stream = null;
      this.setRecording(false, `Could not record: ${err.message}`);
    }
  }

  async stop(message = "Stopped") {
    const microphone = this.microphone;
    this.microphone = null;
    this.stream?.close();
    this.setRecording(false, message);
    this.levelBar.style.width = "0";
    await microphone?.stop();
  }

  setRecording(on, text) {
    this.button.setAttribute("aria-pressed", String(on));
    $("#live-toggle-text").textContent = on ? "Stop recording" : "Start recording";
    this.say(text);
    $("#live-clock").textContent = "";
  }

  /** A window from the stream; `delay_ms` is how long after its last sample the answer came. */
  add(window) {
    const offset = this.sessionOffset;
    const entry = {...window, stream: this.stream, start: offset + window.start,
                   end: offset + window.end, seconds: this.ready.hop_s,
                   delay_ms: performance.now() - this.startedAt - window.end * 1000};
    if (window.probabilities) {
      entry.prediction = {
        prediction_id: `window-${offset}-${window.index}`, emotion: window.raw,
        confidence: window.probabilities[window.raw], probabilities: window.probabilities,
        model_version: this.ready.model_version, latency_ms: Math.max(0, entry.delay_ms)};
    }
    this.entries.push(entry);
    if (!this.pinned && entry.prediction) this.result.show(entry.prediction, caption(entry));
    this.tick(entry.prediction ? "Recording" : "Recording (too quiet: speak up)");
    this.renderTimeline();
    this.renderStats();
  }

  async correct(prediction, label) {
    const entry = this.entries.find((e) => e.prediction === prediction);
    if (entry.stream !== this.stream || !this.microphone) {
      throw new Error("that window's stream has ended; its audio is gone");
    }
    return counted(await entry.stream.correct(entry.index, label));
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
    $("#live-clock").textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
  }

  latestWithPrediction() {
    return this.entries.findLast((e) => e.prediction);
  }

  pin(entry) {
    this.pinned = entry === this.latestWithPrediction() ? null : entry;
    this.result.show(entry.prediction, caption(entry) + (this.pinned ? " (picked)" : ""));
    this.renderTimeline();
  }

  clearSession() {
    this.entries = [];
    this.pinned = null;
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
    const raw = this.entries.map((entry) => {
      const text = `${seconds(entry.start)}–${seconds(entry.end)}: ${shown(entry.raw)}` +
        (entry.prediction ? ` ${percent(entry.prediction.confidence)}` : "");
      const attrs = {class: "segment", title: text,
                     style: {background: colourOf(shown(entry.raw))}};
      if (!entry.prediction) return h("li", {}, h("span", {...attrs, "aria-label": text}));
      // One tab stop for the whole timeline; the arrow keys move between windows.
      return h("li", {}, h("button", {
        ...attrs, type: "button", "aria-label": text, "aria-pressed": String(entry === selected),
        tabindex: entry === selected ? "0" : "-1", dataset: {index: this.entries.indexOf(entry)},
        onclick: () => this.pin(entry), onkeydown: (event) => this.moveSelection(event, entry),
      }));
    });
    const smoothed = this.entries.map((entry) => {
      const text = `${seconds(entry.start)}–${seconds(entry.end)}: ${shown(entry.smoothed)}`;
      return h("li", {}, h("span", {class: "segment smoothed", title: text, "aria-label": text,
                                    dataset: {label: entry.smoothed},
                                    style: {background: colourOf(shown(entry.smoothed))}}));
    });
    const last = this.entries.at(-1);
    replaceChildren(host,
      this.pinned ? h("p", {class: "pin-note"},
        `Showing the window at ${caption(this.pinned)}. `,
        h("button", {type: "button", class: "btn btn-small", onclick: () => this.followLive()},
          "Back to live")) : null,
      h("p", {class: "timeline-label", id: "timeline-raw-title"}, "Each window"),
      h("ol", {class: "timeline raw", "aria-labelledby": "timeline-raw-title"}, raw),
      h("p", {class: "timeline-label", id: "timeline-smoothed-title"},
        "Smoothed (from the windows so far)"),
      h("ol", {class: "timeline smoothed", "aria-labelledby": "timeline-smoothed-title"},
        smoothed),
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
    $(`#live-timeline button[data-index="${this.entries.indexOf(clickable[to])}"]`)?.focus();
  }

  followLive() {
    this.pinned = null;
    const latest = this.latestWithPrediction();
    if (latest) this.result.show(latest.prediction, caption(latest));
    this.renderTimeline();
    $("#live-toggle").focus();
  }

  renderStats() {
    const host = $("#live-stats");
    const spoken = this.entries.filter((e) => e.smoothed !== SILENCE);
    if (!spoken.length) {
      replaceChildren(host, h("p", {class: "empty"}, "Statistics appear after the first result."));
      return;
    }
    // The smoothed answer of each window, standing for the hop it added: a share of time.
    const time = new Map();
    for (const e of spoken) time.set(e.smoothed, (time.get(e.smoothed) ?? 0) + e.seconds);
    const total = [...time.values()].reduce((a, b) => a + b, 0);
    const rows = [...time.entries()].sort((a, b) => b[1] - a[1]);
    const quiet = (this.entries.length - spoken.length) * (this.ready?.hop_s ?? 1);
    const delays = this.entries.map((e) => e.delay_ms).sort((a, b) => a - b);
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
        `; median answer ${Math.max(0, Math.round(delays[delays.length >> 1]))} ms after the hop`,
        "."));
  }
}

function seconds(value) {
  return `${value.toFixed(value < 10 && value % 1 ? 1 : 0)} s`;
}

function caption(entry) {
  return `${seconds(entry.start)}–${seconds(entry.end)}`;
}
