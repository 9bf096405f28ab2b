// One result: the emotion, a bar per label, and the labels as buttons that send a correction in
// one click. Updated in place, so in the live view a button does not move or vanish under the
// pointer while new windows arrive every second.
import {getLabels} from "./api.js";
import {sendCorrection} from "./corrections.js";
import {capitalize, h, percent, replaceChildren} from "./dom.js";
import {colourOf, swatch} from "./emotions.js";

export class ResultView {
  /** `correct(prediction, label)` sends a correction and resolves to its feedback id; by
   * default, POST /v1/predictions/{id}/feedback. */
  constructor(host, {correct} = {}) {
    this.host = host;
    this.send = correct ?? ((prediction, label) => sendCorrection(prediction.prediction_id, label));
    this.prediction = null;
    this.barLabels = "";
    // A persistent live region: screen readers hear each new emotion once, not the whole card.
    this.announcer = h("p", {class: "visually-hidden", "aria-live": "polite"});
  }

  clear(message) {
    this.reset(h("p", {class: "empty"}, message));
  }

  fail(message) {
    this.reset(h("p", {class: "error-box", role: "alert"}, message));
  }

  reset(content) {
    this.prediction = null;
    this.barLabels = "";
    this.building = null; // the next result builds its card again
    replaceChildren(this.host, content, this.announcer);
  }

  /** Show a prediction; `caption` says where it came from (a file name, a window's time). */
  async show(prediction, caption = "") {
    const changed = prediction.prediction_id !== this.prediction?.prediction_id;
    this.prediction = prediction;
    this.building ??= this.build();
    await this.building;
    const labels = Object.keys(prediction.probabilities);
    if (labels.join() !== this.barLabels) this.buildBars(labels);

    const {emotion, confidence, model_version: version} = prediction;
    this.card.dataset.predictionId = prediction.prediction_id;
    this.emotion.textContent = capitalize(emotion);
    this.swatch.style.background = colourOf(emotion);
    replaceChildren(this.meta,
      h("span", {}, `${percent(confidence)} confident`),
      h("span", {}, `model v${version}`),
      prediction.personal ? h("span", {class: "badge badge-personal"}, "personal model") : null,
      h("span", {}, `${Math.round(prediction.latency_ms)} ms`),
      caption ? h("span", {}, caption) : null);
    for (const [label, row] of this.bars) {
      const p = prediction.probabilities[label] ?? 0;
      row.fill.style.width = `${(p * 100).toFixed(1)}%`;
      row.value.textContent = percent(p);
      row.item.classList.toggle("top", label === emotion);
    }
    if (changed) {
      for (const button of this.buttons) button.setAttribute("aria-pressed", "false");
      this.announcer.textContent = `${emotion}, ${percent(confidence)}`;
    }
  }

  async build() {
    let labels;
    try {
      labels = (await getLabels()).feedback_labels;
    } catch {
      labels = Object.keys(this.prediction.probabilities);
    }
    this.swatch = h("span", {class: "swatch", "aria-hidden": "true"});
    this.emotion = h("p", {class: "result-emotion"});
    this.meta = h("p", {class: "result-meta"});
    this.barList = h("ul", {class: "bars", "aria-label": "Probability of each emotion"});
    this.status = h("p", {class: "feedback-status", role: "status"});
    this.buttons = labels.map((label) => h("button", {
      type: "button", class: "label-button", "aria-pressed": "false", dataset: {label},
      onclick: () => this.correct(label),
    }, swatch(label), capitalize(label)));
    this.card = h("div", {class: "result"},
      h("div", {class: "result-head"}, this.swatch, h("div", {}, this.emotion, this.meta)),
      this.barList,
      h("fieldset", {class: "correct"},
        h("legend", {}, "Right emotion? One click sends it as a correction."),
        h("div", {class: "label-buttons"}, this.buttons),
        this.status));
    replaceChildren(this.host, this.card, this.announcer);
  }

  buildBars(labels) {
    this.barLabels = labels.join();
    this.bars = new Map(labels.map((label) => {
      const fill = h("span", {class: "bar-fill", style: {background: colourOf(label)}});
      const value = h("span", {class: "bar-value"});
      const item = h("li", {class: "bar-row"},
        h("span", {class: "bar-label"}, capitalize(label)),
        h("span", {class: "bar-track", "aria-hidden": "true"}, fill), value);
      return [label, {item, fill, value}];
    }));
    replaceChildren(this.barList, [...this.bars.values()].map((row) => row.item));
  }

  async correct(label) {
    const prediction = this.prediction;
    const button = this.buttons.find((b) => b.dataset.label === label);
    button.setAttribute("aria-busy", "true");
    this.status.className = "feedback-status";
    this.status.textContent = `Sending ${label}…`;
    try {
      const feedbackId = await this.send(prediction, label);
      if (this.prediction === prediction) {
        for (const b of this.buttons) b.setAttribute("aria-pressed", String(b === button));
      }
      const what = label === prediction.emotion ? "confirmation" : "correction";
      this.status.className = "feedback-status ok";
      this.status.textContent = `Received: ${label} (${what} #${feedbackId}).`;
    } catch (err) {
      this.status.className = "feedback-status error";
      this.status.textContent = `Not sent: ${err.message}`;
    } finally {
      button.removeAttribute("aria-busy");
    }
  }
}
