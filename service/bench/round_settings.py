"""`emoloop bench round-settings`: learner settings compared on validation speakers, where
choices are made (`bench continual` measures on test speakers, where they are not).

Newcomers are the validation speakers, in the bundled model's recipe, of the corpora whose
sentences are spoken in several emotions (NEWCOMER_CORPORA); their clips are split by sentence as
in `bench continual`, half corrected, half measured. The other validation speakers (ASED, whose
sentences each carry one emotion, and BanglaSER-Extended, one sentence an emotion: a sentence
split cannot hold their words apart) are the old speakers, never corrected. Training, early
stopping and the test figures never read these clips, but the shipped gate set holds them all,
so no round is gated here: for each settings variant and learner seed one round's candidate is
trained from the bundled model (learner.continual.strategies.train_candidate, on the round's
seeded held-out split, from the shipped replay set, as a first round does) and measured as it
is. What the gate would say of a variant is `bench continual`'s and `bench gate`'s to show.

Each variant is the configured learner with some keys changed (`--variant batch_size=32`); the
configured learner itself is always measured first. Figures: the candidate's change from the
bundled model, in points, the median over seeds with a 95% bootstrap interval over the clips
(bench continual's change_summary), each seed's beside it.
"""
from pathlib import Path

import numpy as np

from learner.corpora import read_corpora
from service.bench.continual import (NEWCOMER_CORPORA, SEEDS, _features, _printer,
                                     change_summary, split_newcomers)
PARTS = ("newcomers", "old_validation")


def parse_variant(text: str) -> dict[str, str]:
    """'key=value,key=value' -> {key: value} (the learner settings validate the values)."""
    variant = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"a variant is key=value[,key=value]: {item!r}")
        variant[key.strip()] = value.strip()
    return variant


def learner_variants(variants: list[dict[str, str]]) -> list:
    """The configured learner settings, then each variant of them; ValueError (pydantic's,
    naming the key) for an unknown key or a bad value."""
    from storage.settings import LearnerSettings, get_settings

    configured = get_settings().learner.model_dump()
    return [LearnerSettings(**configured)] + [LearnerSettings(**{**configured, **variant})
                                               for variant in variants]


def run_round_settings_bench(data_dir: Path, *, variants: list[dict[str, str]],
                             seeds: list[int] | None = None, split_seed: int = 20261121,
                             threads: int = 1, progress: bool = True) -> dict:
    from learner.checkpoint import LoadedModel, load_default_model
    from learner.continual.base_sets import load_base_set
    from learner.inference import EmotionPredictor, limit_threads, logits_batches
    from learner.training import load_training_config
    from service.learner_commands import recipe_for_kind

    settings = learner_variants(variants)
    limit_threads(threads)
    seeds = list(seeds or SEEDS)
    model = load_default_model()
    config = load_training_config(recipe_for_kind(model.kind))
    validation = set(config["split"]["validation_speakers"])
    clips = [c for c in read_corpora(data_dir, config.get("corpora"))
             if c.emotion in config["labels"] and c.speaker in validation]
    new = [c for c in clips if c.corpus in NEWCOMER_CORPORA]
    old = [c for c in clips if c.corpus not in NEWCOMER_CORPORA]
    if not new or not old:
        raise ValueError(f"no validation speakers of {NEWCOMER_CORPORA} or of other corpora in "
                         f"{recipe_for_kind(model.kind)}")
    shares, measured = split_newcomers(new, 1, np.random.default_rng(split_seed))
    corrected = shares[0]
    say = _printer(progress)
    say(f"newcomers {len(new)} clips: {len(corrected)} corrected, {len(measured)} measured; "
        f"old validation speakers {len(old)} clips; {len(settings)} settings x seeds {seeds}")
    features = _features({c.path: c for c in corrected + measured + old}.values(), model.kind)
    replay = load_base_set("replay", None, kind=model.kind)
    candidates = []
    for number, learner in enumerate(settings):
        for seed in seeds:
            candidates.append(_candidate(model, learner, corrected, features, replay, seed))
            say(f"variant {number} seed {seed}: trained")
    measured_clips = {"newcomers": measured, "old_validation": old}
    # The bundled model first, then each variant's candidates seed by seed.
    predictors = [EmotionPredictor(model)] + [
        EmotionPredictor(LoadedModel(net, labels, sha256="", kind=model.kind))
        for net, labels in candidates]
    right = {}
    for name, part in measured_clips.items():
        logits = logits_batches(predictors, [features[c.path] for c in part])
        right[name] = [_right(part, p.labels, x) for p, x in zip(predictors, logits)]
    start = {name: right[name][0] for name in PARTS}
    report = {"data": str(data_dir), "model_kind": model.kind, "seeds": seeds,
              "split_seed": split_seed, "threads": threads,
              "newcomers": sorted({c.speaker for c in new}),
              "old_validation_speakers": sorted({c.speaker for c in old}),
              "corrected": len(corrected),
              "clips": {name: len(part) for name, part in measured_clips.items()},
              "variants": []}
    for number, learner in enumerate(settings):
        first = 1 + number * len(seeds)
        outcomes = [(start, {name: right[name][first + k] for name in PARTS})
                    for k in range(len(seeds))]
        report["variants"].append({
            "changed": {} if number == 0 else variants[number - 1],
            "learner": learner.model_dump(mode="json"),
            "summary": change_summary(outcomes, np.random.default_rng(split_seed), PARTS)})
    report["lines"] = _lines(report)
    return report


def _candidate(model, learner, corrected, features, replay, seed: int):
    """(net, labels) of one round's candidate from the bundled model on `corrected`."""
    from learner.continual.replay import (BufferedSample, Sample, base_exemplars,
                                          split_holdout)
    from learner.continual.strategies import bootstrap_ewc_state, train_candidate
    from storage.runs import ExemplarRow

    rng = np.random.default_rng(seed)
    samples = [Sample(features[c.path], c.emotion, ExemplarRow("feedback", c.emotion, 0.0))
               for c in corrected]
    train, _ = split_holdout(samples, learner.holdout_share, rng)
    buffer = [BufferedSample(Sample(replay.features[row.base_index], row.label, row), row.weight)
              for row in base_exemplars(replay, model.labels, rng)]
    ewc = (bootstrap_ewc_state(model.net, model.labels, buffer, learner, seed=seed)
           if learner.strategy == "ewc+replay" else None)
    candidate = train_candidate(model.net, model.labels, train, buffer, ewc, learner,
                                strategy=learner.strategy, seed=seed)
    return candidate.net, candidate.labels


def _right(clips, labels, logits) -> np.ndarray:
    """Per clip, whether its answer (restricted to its corpus's labels) was right."""
    from learner.evaluation import outcomes_from_logits

    outcomes, _ = outcomes_from_logits(clips, labels, logits)
    return np.array([o.truth == o.predicted for o in outcomes], dtype=bool)


def _lines(report: dict) -> list[str]:
    lines = [f"newcomers {', '.join(report['newcomers'])}: {report['corrected']} corrected, "
             f"{report['clips']['newcomers']} measured; old validation speakers "
             f"{', '.join(report['old_validation_speakers'])} "
             f"({report['clips']['old_validation']} clips); seeds {report['seeds']}",
             "one round's candidate (not gated) against the bundled model, points: median over "
             "seeds [95% interval] (each seed)"]
    for variant in report["variants"]:
        name = ", ".join(f"{k}={v}" for k, v in variant["changed"].items()) or "configured"
        figures = []
        for part in PARTS:
            s = variant["summary"][part]
            figures.append(f"{part} {s['start']:.1f}% {s['median_change']:+.1f} "
                           f"[{s['interval_95'][0]:+.1f}, {s['interval_95'][1]:+.1f}] "
                           f"({', '.join(f'{x:+.1f}' for x in s['per_seed'])})")
        lines.append(f"{name}: {'; '.join(figures)}")
    return lines
