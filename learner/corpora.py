"""Readers for corpora in the shared layout (`<corpus>/manifest.csv` under one folder) and
speaker-disjoint splits: accuracy is only ever measured on speakers a model never heard."""
import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from learner.labels import canonical_label

MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class CorpusClip:
    path: Path  # absolute
    corpus: str
    speaker: str
    gender: str
    language: str
    emotion: str
    source_label: str
    duration_s: float
    text_id: str = ""  # which sentence or word was spoken (the manifest's own numbering)


class CorpusError(ValueError):
    """A data folder or manifest that is not in the shared layout."""


def find_manifests(data_dir: Path) -> list[Path]:
    """`data_dir/<corpus>/manifest.csv`, or `data_dir/manifest.csv` for a single corpus folder."""
    data_dir = Path(data_dir)
    if (data_dir / MANIFEST).is_file():
        return [data_dir / MANIFEST]
    manifests = sorted(data_dir.glob(f"*/{MANIFEST}"))
    if not manifests:
        raise CorpusError(f"no {MANIFEST} found in {data_dir} or its sub-folders")
    return manifests


def read_manifest(manifest: Path) -> list[CorpusClip]:
    """Paths in a manifest are relative to the folder above the corpus folder."""
    root = manifest.parent.parent
    clips = []
    with open(manifest, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                clips.append(CorpusClip(
                    path=(root / row["path"]).resolve(),
                    corpus=row["corpus"],
                    speaker=row["speaker"],
                    gender=row.get("gender") or "",
                    language=row.get("language") or "",
                    emotion=canonical_label(row["emotion"]),
                    source_label=row.get("source_label") or "",
                    duration_s=float(row.get("duration_s") or 0.0),
                    text_id=row.get("text_id") or "",
                ))
            except (KeyError, ValueError) as err:
                raise CorpusError(f"{manifest}:{line}: {err}") from err
    return clips


def read_corpora(data_dir: Path, corpora: Iterable[str] | None = None) -> list[CorpusClip]:
    wanted = set(corpora) if corpora else None
    clips = []
    for manifest in find_manifests(data_dir):
        clips.extend(c for c in read_manifest(manifest) if wanted is None or c.corpus in wanted)
    return clips


@dataclass(frozen=True)
class SpeakerSplit:
    train: list[CorpusClip]
    validation: list[CorpusClip]
    test: list[CorpusClip]


def split_by_speaker(
    clips: list[CorpusClip], *, validation_speakers: Iterable[str], test_speakers: Iterable[str]
) -> SpeakerSplit:
    """Named speakers go to validation and test; everyone else trains. No speaker is on two sides."""
    validation, test = set(validation_speakers), set(test_speakers)
    if overlap := validation & test:
        raise CorpusError(f"speakers both in validation and test: {sorted(overlap)}")
    return SpeakerSplit(
        train=[c for c in clips if c.speaker not in validation | test],
        validation=[c for c in clips if c.speaker in validation],
        test=[c for c in clips if c.speaker in test],
    )
