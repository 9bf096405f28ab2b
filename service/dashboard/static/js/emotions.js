// One colour per emotion, the same in bars, timeline and statistics. Labels the page does not
// know (a model that learned a new one) get a colour from the spare list, stable per label.
const COLOURS = {
  neutral: "#8b95a7",
  calm: "#0ea5e9",
  happy: "#eab308",
  sad: "#6366f1",
  angry: "#e11d48",
  fearful: "#a855f7",
  disgust: "#65a30d",
  surprised: "#f97316",
  boredom: "#a8a29e",
};
const SPARE = ["#14b8a6", "#d946ef", "#0f766e", "#b45309", "#4d7c0f", "#be123c"];

import {h} from "./dom.js";

export const NO_SPEECH = "no speech";

export function colourOf(label) {
  if (label === NO_SPEECH) return "var(--no-speech)";
  if (COLOURS[label]) return COLOURS[label];
  let hash = 0;
  for (const char of label) hash = (hash * 31 + char.charCodeAt(0)) >>> 0;
  return SPARE[hash % SPARE.length];
}

/** A small square of the label's colour, beside its name. */
export function swatch(label) {
  return h("span", {class: "swatch small", "aria-hidden": "true",
                    style: {background: colourOf(label)}});
}
