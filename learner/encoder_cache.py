"""The training cache of encoder states: the frozen encoder runs once per clip and variant, and
every epoch (and every downstream tried) reads the cache instead.

One cache folder per (encoder file, blocks kept, clip list, augmentation variant, seed): the
states of all clips concatenated in one float16 memory-mapped array (frames, blocks, D), pooled
to 25 fps as the downstream reads them, plus each clip's offset and length, and each block's
mean over the clip (the linear-probe features). A folder is complete only once its `index.json`
exists (written last, atomically), so an interrupted build is rebuilt, never half-read.
"""
import json
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from learner.audio import decode_audio, trim_silence
from learner.augment import perturb_wave
from learner.speech_encoder.weights import load_encoder
from learner.speech_encoder.whisper_mel import whisper_log_mel
from learner.speech_model import pool_frames
from storage.files import sha256_bytes, write_atomic

CACHE_VERSION = 1


@dataclass
class EncoderCache:
    states: np.ndarray  # (total frames, blocks, D) float16, memory-mapped
    offsets: np.ndarray  # (clips,) first frame of each clip
    lengths: np.ndarray  # (clips,) frames of each clip at 25 fps
    means: np.ndarray  # (clips, blocks_probed, D) float32: each block's mean over the clip

    def clip(self, i: int) -> np.ndarray:
        """(blocks, frames, D) float16 view of clip i."""
        start = int(self.offsets[i])
        return self.states[start : start + int(self.lengths[i])].transpose(1, 0, 2)


def encode_wave(encoder, wave: np.ndarray) -> tuple[np.ndarray, int]:
    """A 16 kHz clip (already trimmed) -> (blocks, frames at 25 fps, D) float32 states."""
    mel = torch.from_numpy(whisper_log_mel(wave))[None]
    lengths = torch.tensor([mel.shape[1]])
    with torch.inference_mode():
        states, lengths = encoder(mel, lengths)
        pooled, lengths = pool_frames(states, lengths)
    return pooled[:, 0].numpy(), int(lengths[0])


_worker_encoder = None


def _init_worker(encoder_path: str, encoder_sha256: str) -> None:
    global _worker_encoder
    torch.set_num_threads(1)
    _worker_encoder = load_encoder(Path(encoder_path), encoder_sha256)


def _encode_task(task: tuple) -> np.ndarray:
    index, path, variant, seed, augment = task
    wave = decode_audio(path, max_seconds=60.0)
    if variant > 0:  # per clip and variant, so worker scheduling cannot change the result
        rng = np.random.default_rng([seed, index, variant])
        wave = perturb_wave(wave, rng, speeds=augment["speeds"], snr_db=tuple(augment["snr_db"]),
                            gain_db=tuple(augment["gain_db"]))
    states, _ = encode_wave(_worker_encoder, trim_silence(wave))
    return states


# What a perturbed variant's states depend on (_encode_task): not `variants`, how many of them a
# recipe trains on, so raising it reuses the variants already built.
PERTURBATION_KEYS = ("speeds", "snr_db", "gain_db")


def cache_key(encoder_sha256: str, keep_blocks: int, paths: list[str], variant: int, seed: int,
              augment: dict | None) -> str:
    perturbation = {k: augment[k] for k in PERTURBATION_KEYS} if variant else None
    description = json.dumps({"v": CACHE_VERSION, "encoder": encoder_sha256, "keep": keep_blocks,
                              "paths": paths, "variant": variant, "seed": seed,
                              "augment": perturbation}, sort_keys=True)
    return sha256_bytes(description.encode())[:16]


def build_or_load_cache(
    cache_root: Path, encoder_path: Path, encoder_sha256: str, paths: list[str], *,
    keep_blocks: int, variant: int = 0, seed: int = 0, augment: dict | None = None,
    workers: int = 2, desc: str = "encoder states", progress: bool = True,
) -> EncoderCache:
    """Load the cache for these clips, building it first if it is missing or incomplete."""
    folder = Path(cache_root) / cache_key(encoder_sha256, keep_blocks, paths, variant, seed, augment)
    if not (folder / "index.json").is_file():
        _build(folder, encoder_path, encoder_sha256, paths, keep_blocks, variant, seed, augment,
               workers, desc, progress)
    index = json.loads((folder / "index.json").read_text())
    states = np.load(folder / "states.npy", mmap_mode="r")
    return EncoderCache(states=states, offsets=np.array(index["offsets"], dtype=np.int64),
                        lengths=np.array(index["lengths"], dtype=np.int64),
                        means=np.load(folder / "means.npy"))


def _build(folder: Path, encoder_path: Path, encoder_sha256: str, paths: list[str],
           keep_blocks: int, variant: int, seed: int, augment: dict | None, workers: int,
           desc: str, progress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [(i, p, variant, seed, augment) for i, p in enumerate(paths)]
    chunks, means, lengths = [], [], []
    bar = dict(total=len(tasks), desc=desc, unit="clip", disable=not progress)
    with get_context("spawn").Pool(workers, initializer=_init_worker,
                                   initargs=(str(encoder_path), encoder_sha256)) as pool:
        for states in tqdm(pool.imap(_encode_task, tasks, chunksize=8), **bar):
            means.append(states.mean(axis=1))
            chunks.append(states[:keep_blocks].transpose(1, 0, 2).astype(np.float16))
            lengths.append(states.shape[1])
    tmp = folder / f".states.{os.getpid()}.npy"
    np.save(tmp, np.concatenate(chunks))
    os.replace(tmp, folder / "states.npy")
    tmp = folder / f".means.{os.getpid()}.npy"
    np.save(tmp, np.stack(means).astype(np.float32))
    os.replace(tmp, folder / "means.npy")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    write_atomic(folder / "index.json", json.dumps({"paths": paths, "offsets": offsets,
                                                    "lengths": lengths}).encode())
