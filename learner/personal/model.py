"""What a personal version is: a new linear head on top of one named global version.

A personal version keeps the global version's whole feature extractor (CNN, BiLSTM, attention
pooling, and the speech encoder under them in a version of that kind) frozen and replaces only
its head: `logits = W @ embed(features) + b`, with `embed` the parent global version's
256-dimensional utterance embedding of its own kind's features. The file holds W and b (8 x 256
+ 8 floats, about 9 KB with its metadata) plus the parent version's number and sha256, so it can
only ever be served on the network it was trained on.

Why the head only: a speaker's clips sit together in embedding space; what a user's corrections
teach is where, for this voice, one emotion ends and the next begins, which is what the head
draws. Training it needs the embeddings once, then milliseconds; thousands of users cost
kilobytes each; and a user's corrections cannot reach the shared feature extractor at all. (A
residual adapter before the head was measured too: no larger gain, and more lost on the global
gate set.)

This module is imported by the service: no Avalanche here.
"""
import json
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from learner.checkpoint import FEATURES_BY_KIND, ModelFileError
from learner.file_metadata import read_metadata, save_with_metadata
from learner.inference import EmotionPredictor, length_batches
from storage.files import sha256_bytes

PERSONAL_KIND = "personal-head-v1"


@dataclass(frozen=True)
class PersonalHead:
    """A loaded personal version: the head's weights and the global version it sits on."""

    weight: torch.Tensor  # (n_labels, embedding_dim)
    bias: torch.Tensor  # (n_labels,)
    labels: tuple[str, ...]
    parent_version: int
    parent_sha256: str
    sha256: str

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.bias.nbytes


def personal_head_bytes(head: nn.Linear, labels: tuple[str, ...], *, parent_version: int,
                        parent_sha256: str, parent_kind: str) -> bytes:
    """The file of a personal version: safetensors with the head and its parent (whose kind
    says which features the head's embeddings were computed from)."""
    metadata = {"kind": PERSONAL_KIND, "labels": json.dumps(list(labels)),
                "parent_version": str(int(parent_version)), "parent_sha256": parent_sha256,
                "features": FEATURES_BY_KIND[parent_kind]}
    state = {"weight": head.weight.detach().float().contiguous().cpu(),
             "bias": head.bias.detach().float().contiguous().cpu()}
    return save_with_metadata(state, metadata)


def personal_head_from_bytes(data: bytes, expected_sha256: str | None = None) -> PersonalHead:
    """Parse and check a personal version's file; raises ModelFileError for anything else."""
    digest = sha256_bytes(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelFileError(f"personal model checksum mismatch: expected {expected_sha256}, "
                             f"got {digest}")
    try:
        metadata = read_metadata(data)
        if metadata.get("kind") != PERSONAL_KIND:
            raise ModelFileError(f"not a personal model file (kind {metadata.get('kind')!r})")
        labels = tuple(json.loads(metadata["labels"]))
        tensors = load_safetensors(data)
        weight, bias = tensors["weight"], tensors["bias"]
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] != len(labels):
            raise ModelFileError(f"personal head shapes {tuple(weight.shape)}, "
                                 f"{tuple(bias.shape)} do not fit {len(labels)} labels")
        return PersonalHead(weight, bias, labels, int(metadata["parent_version"]),
                            metadata["parent_sha256"], digest)
    except ModelFileError:
        raise
    except Exception as err:  # any parse error means the file is not a usable personal model
        raise ModelFileError(f"not a valid personal model file: {err}") from err


class PersonalPredictor(EmotionPredictor):
    """The parent global version's embedding, then the personal head."""

    def __init__(self, base: EmotionPredictor, head: PersonalHead):
        if base.model.sha256 != head.parent_sha256:
            raise ModelFileError(f"personal head was trained on a global model with sha256 "
                                 f"{head.parent_sha256}, not {base.model.sha256}")
        if head.weight.shape[1] != base.model.net.head.in_features:
            raise ModelFileError("personal head does not fit the global model's embedding")
        super().__init__(base.model)
        self.head = head
        self.labels = head.labels

    @torch.inference_mode()
    def logits(self, features: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(features).unsqueeze(0)
        embedding = self.model.net.embed(x, torch.tensor([features.shape[0]]))
        return self._head(embedding)[0].numpy()

    @torch.inference_mode()
    def logits_batch(self, features: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        return self._head(embed_batch(self.model.net, features, batch_size)).numpy()

    def _head(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(embedding, self.head.weight, self.head.bias)


@torch.inference_mode()
def embed_batch(net: nn.Module, features: list[np.ndarray], batch_size: int = 32) -> torch.Tensor:
    """Many clips' (frames_i, F) features -> (n, D) embeddings, batched by similar length
    (padding never changes an embedding, it only costs time)."""
    out = torch.zeros(len(features), net.head.in_features)
    for chunk, x, lengths in length_batches(features, batch_size):
        out[chunk] = net.embed(x, lengths)
    return out
