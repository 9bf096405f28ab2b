"""The canonical emotion labels and how each corpus's own codes map onto them."""
from collections.abc import Sequence

# RAVDESS's eight, in the order the bundled default model's head uses.
DEFAULT_LABELS: tuple[str, ...] = (
    "neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised",
)
# Every label a corpus in the shared layout may carry.
CANONICAL_LABELS: tuple[str, ...] = DEFAULT_LABELS + ("boredom",)

# The corpora's own codes, for reading originals that were not converted to the shared layout.
RAVDESS_CODES = {
    "01": "neutral", "02": "calm", "03": "happy", "04": "sad",
    "05": "angry", "06": "fearful", "07": "disgust", "08": "surprised",
}
TESS_WORDS = {
    "neutral": "neutral", "happy": "happy", "sad": "sad", "angry": "angry",
    "fear": "fearful", "disgust": "disgust", "ps": "surprised",
}
BANGLASER_CODES = {"01": "happy", "02": "sad", "03": "angry", "04": "surprised", "05": "neutral"}
# BanglaSER-Extended keeps BanglaSER's codes and adds two.
BANGLASER_EXT_CODES = {**BANGLASER_CODES, "06": "disgust", "07": "fearful"}
ASED_CODES = {"n": "neutral", "f": "fearful", "h": "happy", "s": "sad", "a": "angry"}
NEMO_WORDS = {"neutral": "neutral", "happiness": "happy", "sadness": "sad", "anger": "angry",
              "fear": "fearful", "surprised": "surprised"}


def canonical_label(label: str) -> str:
    """Normalise a user's or a manifest's label; raises ValueError for a label we do not know."""
    normalised = label.strip().lower()
    if normalised not in CANONICAL_LABELS:
        raise ValueError(
            f"unknown emotion label {label!r}; known labels: {', '.join(CANONICAL_LABELS)}"
        )
    return normalised


def feedback_labels(configured: Sequence[str] | None, allow_new: bool,
                    model_labels: Sequence[str] | None = None) -> tuple[str, ...]:
    """What feedback may name: the configured labels (`learner.labels`; every canonical label
    when None), or, when new labels are not allowed, only those the model knows."""
    labels = tuple(configured) if configured else CANONICAL_LABELS
    if unknown := set(labels) - set(CANONICAL_LABELS):
        raise ValueError(f"learner.labels names labels that are not canonical: {sorted(unknown)}")
    if not allow_new and model_labels is not None:
        labels = tuple(label for label in labels if label in model_labels)
    return labels


def label_from_source(corpus: str, source_label: str) -> str:
    """Map a corpus's own code (RAVDESS '05-strong', TESS 'ps', BanglaSER '03', ASED 'f', nEMO
    'sadness') to a canonical label."""
    code = source_label.strip().lower()
    if corpus == "ravdess":
        return RAVDESS_CODES[code.split("-")[0]]
    if corpus == "tess":
        return TESS_WORDS[code]
    if corpus == "banglaser":
        return BANGLASER_CODES[code]
    if corpus == "banglaser-ext":
        return BANGLASER_EXT_CODES[code]
    if corpus == "ased":
        return ASED_CODES[code]
    if corpus == "nemo":
        return NEMO_WORDS[code]
    raise KeyError(f"no label mapping for corpus {corpus!r}")
