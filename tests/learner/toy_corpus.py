"""A tiny corpus in the shared layout, made of synthetic audio, for end-to-end tests."""
import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from service.bench.clips import voiced_clip

# Two 'emotions' a small model can tell apart quickly: low and slow vs high and fast.
PITCH = {"sad": 0.7, "happy": 1.6}


def make_corpus(root: Path, corpus: str = "toy", speakers: int = 4, per_label: int = 4) -> Path:
    folder = root / corpus
    rows = []
    for s in range(speakers):
        speaker = f"{corpus}-a{s + 1:02d}"
        (folder / speaker).mkdir(parents=True)
        for label, factor in PITCH.items():
            for k in range(per_label):
                wave = voiced_clip(1.0, 16_000 * factor, seed=100 * s + k)[: 16_000]
                name = f"{speaker}/{label}-{k}.wav"
                # Lead-in and tail silence, as in the real corpora: trimming must remove it.
                padded = np.concatenate([np.zeros(4000, np.float32), wave, np.zeros(4000, np.float32)])
                sf.write(folder / name, padded, 16_000, subtype="PCM_16")
                rows.append({"path": f"{corpus}/{name}", "corpus": corpus, "speaker": speaker,
                             "gender": "", "language": "en", "emotion": label,
                             "source_label": label, "text_id": f"t{k}",
                             "duration_s": f"{len(padded) / 16_000:.3f}"})
    with open(folder / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root
