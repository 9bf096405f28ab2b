// A round's gate report as a picture: per-class recall on the gate set before (the active model)
// and after (the candidate), with the tolerated loss marked for each old class and the classes
// the gate's paired test refused in red.
// Drawn in SVG at the width it is given (redrawn when that changes), so text stays legible from a
// phone to a desktop.
import {capitalize, h, percent, s} from "./dom.js";

const ROW = 34;
const BAR = 10;
const TOP = 8;
const AXIS = 22;
const LABEL = 86;
const VALUE = 92;

let chartCount = 0;

/** The whole report: decision, reason, the chart, and the headline numbers. */
export function gateReport(report) {
  const accepted = report.decision === "accepted";
  const scope = report.scope === "user" ? `personal round for ${report.user_id}` : "global round";
  const numbers = [
    ["Macro-F1 on the gate set", pair(report.macro_f1_before, report.macro_f1_after)],
    ["Accuracy on held-out new feedback",
      pair(report.new_feedback_accuracy_before, report.new_feedback_accuracy_after)],
    report.paired ?
      ["Recall loss tolerated (tested)", `${percent(report.max_recall_drop, 1)} at ` +
        `${percent(report.confidence)} confidence`] :
      ["Largest recall drop allowed", percent(report.max_recall_drop, 1)],
    ...(report.paired ? [["Smallest loss the gate set can show", detectable(report)]] : []),
    ...(report.signal ? [["Held-out corrections it agrees with", agreement(report.signal)]] : []),
    ["Gate set / new held-out clips",
      `${report.gate_set_size ?? "–"} / ${report.new_holdout_size ?? "–"}`],
  ];
  return h("div", {class: "gate"},
    h("p", {class: "gate-decision"},
      h("span", {class: `badge ${accepted ? "badge-ok" : "badge-bad"}`}, report.decision ?? "–"),
      h("span", {class: "muted"}, scope),
      report.reason ? h("span", {}, report.reason) : null),
    gateChart(report),
    h("dl", {class: "kv compact"}, numbers.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
}

/** The range over old classes of the smallest recall loss (gaining none) the gate refuses. */
function detectable(report) {
  const losses = (report.old_classes ?? []).map((c) => report.paired[c]?.detectable_loss)
    .filter((v) => v !== null && v !== undefined);
  if (!losses.length) return "–";
  const [low, high] = [Math.min(...losses), Math.max(...losses)];
  return low === high ? percent(low, 1) : `${percent(low, 1)} – ${percent(high, 1)}`;
}

/** The signal test: agreements with the held-out corrections against what chance gives. */
function agreement(signal) {
  if (!signal.n) return "none held out";
  const counts = `${signal.agreements} of ${signal.n} (${signal.expected_by_chance.toFixed(1)} ` +
    "by chance";
  if (!signal.decidable) return `${counts}; too few to test)`;
  return `${counts}, p = ${signal.p_value.toPrecision(2)})`;
}

function pair(before, after) {
  if (before === null && after === null) return "–";
  return `${percent(before, 1)} → ${percent(after, 1)}`;
}

/** The recall chart alone. */
export function gateChart(report) {
  const before = report.recall_before ?? {};
  const after = report.recall_after ?? {};
  const old = new Set(report.old_classes ?? Object.keys(before));
  const classes = [...new Set([...(report.old_classes ?? []), ...(report.new_classes ?? []),
                              ...Object.keys(before), ...Object.keys(after)])];
  const host = h("div", {class: "gate-chart"});
  if (!classes.length) {
    host.append(h("p", {class: "empty"}, "No per-class recall in this report."));
    return host;
  }
  // A class is marked where the gate refused it: by its paired test when the report has one,
  // else (reports of before the test) where it fell past the allowed drop.
  const rows = classes.map((label) => ({
    label, before: before[label] ?? null, after: after[label] ?? null, old: old.has(label),
    refused: report.paired ? Boolean(report.paired[label]?.refused) : null,
  }));
  const maxDrop = report.max_recall_drop ?? 0;
  const id = `gate-${++chartCount}`;
  let drawnWidth = 0;
  const draw = (width) => {
    width = Math.max(280, Math.floor(width));
    if (width === drawnWidth) return;
    drawnWidth = width;
    host.replaceChildren(legend(), drawSvg(rows, maxDrop, width, id));
  };
  new ResizeObserver((entries) => {
    const available = entries[0].contentRect.width;
    if (available > 0) draw(available); // 0 while hidden: keep the last drawing
  }).observe(host);
  draw(480);
  return host;
}

function legend() {
  return h("p", {class: "gate-legend", "aria-hidden": "true"},
    h("span", {class: "key key-before"}), "before (active model)",
    h("span", {class: "key key-after"}), "after (candidate)",
    h("span", {class: "key key-floor"}), "tolerance");
}

function drawSvg(rows, maxDrop, width, id) {
  const height = TOP + rows.length * ROW + AXIS;
  const barWidth = width - LABEL - VALUE;
  const x = (value) => LABEL + Math.max(0, Math.min(1, value)) * barWidth;
  const description = rows.map((r) => `${r.label}: ${r.before === null ? "new class" :
    percent(r.before)} before, ${percent(r.after)} after`).join("; ");
  const svg = s("svg", {viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                        class: "gate-svg", "aria-labelledby": `${id}-title ${id}-desc`},
    s("title", {id: `${id}-title`}, "Recall per class on the gate set, before and after"),
    s("desc", {id: `${id}-desc`}, description));
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    svg.append(
      s("line", {x1: x(tick), x2: x(tick), y1: TOP, y2: height - AXIS + 4, class: "grid"}),
      s("text", {x: x(tick), y: height - 6, class: "axis", "text-anchor": "middle"},
        percent(tick)));
  }
  rows.forEach((row, i) => {
    const y = TOP + i * ROW + (ROW - 2 * BAR - 3) / 2;
    const dropped = row.refused ?? (row.old && row.before !== null && row.after !== null &&
      row.before - row.after > maxDrop + 1e-9);
    svg.append(s("text", {x: LABEL - 8, y: y + BAR + 5, class: "label", "text-anchor": "end"},
                 capitalize(row.label)));
    if (row.before !== null) {
      svg.append(s("rect", {x: LABEL, y, width: x(row.before) - LABEL, height: BAR, rx: 2,
                            class: "bar-before"}));
    }
    if (row.after !== null) {
      svg.append(s("rect", {x: LABEL, y: y + BAR + 3, width: x(row.after) - LABEL, height: BAR,
                            rx: 2, class: dropped ? "bar-after bar-dropped" : "bar-after"}));
    }
    if (row.old && row.before !== null) {
      const floor = x(row.before - maxDrop);
      svg.append(s("line", {x1: floor, x2: floor, y1: y + BAR + 1, y2: y + 2 * BAR + 5,
                            class: "floor"}));
    }
    const text = row.before === null ? `new · ${percent(row.after)}` :
      `${percent(row.before)} → ${percent(row.after)}`;
    svg.append(s("text", {x: width - 4, y: y + BAR + 5, "text-anchor": "end",
                          class: dropped ? "value value-dropped" : "value"}, text));
  });
  return svg;
}
