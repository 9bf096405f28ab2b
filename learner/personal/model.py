"""What a personal version is: its own head on top of one named global version, on a
speech-encoder version also its own input layers, and a memory of the user's corrected clips.

A personal version keeps the rest of the global version's network (the speech encoder, or the
log-mel CNN; the convolutions, BiLSTM and attention pooling) frozen and shared, and holds:
- the head: `logits = W @ embed(features) + b`, with `embed` the parent global version's
  utterance embedding;
- on a speech-encoder version, the downstream's input layers (LayerNorm and projection of the
  encoder's states, a branch's `adaptable`: about 25,000 numbers in float16 a branch where the
  blocks are summed, learner.speech_model.ADAPTABLE; where they sit side by side, as in the
  default, each block's per-channel gain and offset and the projection's bias, 3,100), which
  `embed` then uses in place of the parent's. A voice, and the microphone it comes through,
  shift the encoder's states as a whole; re-fitting the layers that read them moves every later
  stage onto the user's voice, which a head on the fixed embedding cannot (README, "Personal
  models": 93.1% against 89.7% on the validation users' other clips);
- the parent version's number and sha256, so it can only ever be served on the network it
  was trained on.

Why a memory beside it (CorrectionMemory): a user says the same things in the same voice again,
and a clip close to one they corrected is best answered by that correction; a linear head,
held near the global one, draws one boundary for all of a voice's clips and cannot. So the
answer blends the head's probabilities with the labels of the user's nearest corrected clips,
but only for a clip that close to one of them (cosine similarity of the embeddings at least
`threshold`): other voices, and the global gate set, are answered by the head alone. The file
adds the corrections' embeddings (float16: 2 bytes a dimension; at most `personal.memory_size`).
On a parent whose head also reads a probe (after the branches' embeddings: its block statistics,
or a network probe's hidden units), the memory keeps and compares the branches' part alone
(`memory_width`): the threshold was chosen on that embedding, and the probe's part would weigh in
the similarity (a linear probe's statistics, 3,456 numbers on three blocks against the branches'
640, would also take a 100-correction memory past the 1 MB a version may take; the bundled
model's network probe adds 256 units).

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

# v2 added the memory, v3 the input layers; older files still load and serve as what they hold.
PERSONAL_KIND = "personal-head-v3"
_READABLE_KINDS = ("personal-head-v1", "personal-head-v2", PERSONAL_KIND)
_ADAPTER_PREFIX = "adapter."


@dataclass(frozen=True)
class CorrectionMemory:
    """A user's corrected clips as embeddings, and how their answers blend with the head's."""

    embeddings: torch.Tensor  # (n, W) float32, unit length: the first W of the D an embedding has
    labels: torch.Tensor  # (n,) label indices
    weight: float  # the memory's share of the answer for a clip close to a correction
    threshold: float  # cosine similarity a clip needs to a correction for the memory to speak
    neighbours: int  # corrections voting, each by its similarity

    @classmethod
    def of(cls, embeddings: torch.Tensor, labels: torch.Tensor, *, weight: float,
           threshold: float, neighbours: int, size: int,
           width: int | None = None) -> "CorrectionMemory":
        """The memory of the last `size` of these corrections (oldest first), each kept as the
        first `width` numbers of its (n, D) embedding (all of them where `width` is None)."""
        kept = embeddings[-size:, :width].float()
        return cls(nn.functional.normalize(kept, dim=1), labels[-size:].long(), weight,
                   threshold, neighbours)

    @property
    def width(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def nbytes(self) -> int:
        return self.embeddings.nbytes + self.labels.nbytes

    def blend(self, logits: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, L) head logits and the clips' (B, D) embeddings -> (B, L) log-probabilities:
        `(1 - weight) * softmax(logits) + weight * votes` where a clip's nearest correction is
        at least `threshold` similar (votes: the `neighbours` nearest corrections' labels, each
        weighted by its similarity), `log_softmax(logits)` elsewhere."""
        probabilities = torch.softmax(logits, dim=1)
        if not len(self.labels):
            return torch.log(probabilities)
        compared = embeddings[:, : self.width].float()
        similarity = nn.functional.normalize(compared, dim=1) @ self.embeddings.T
        nearest = similarity.topk(min(self.neighbours, len(self.labels)), dim=1)
        votes = torch.zeros_like(probabilities).scatter_add_(
            1, self.labels[nearest.indices], nearest.values.clamp(min=0.0))
        votes = votes / votes.sum(dim=1, keepdim=True).clamp(min=1e-12)
        share = self.weight * (nearest.values[:, :1] >= self.threshold).float()
        return torch.log((1 - share) * probabilities + share * votes)


@dataclass(frozen=True)
class PersonalHead:
    """A loaded personal version: the head's weights, the memory, the global version it sits on."""

    weight: torch.Tensor  # (n_labels, embedding_dim)
    bias: torch.Tensor  # (n_labels,)
    labels: tuple[str, ...]
    parent_version: int
    parent_sha256: str
    sha256: str
    memory: CorrectionMemory | None = None  # None in a v1 file
    # Input layers of a speech-encoder parent (float16, as stored); None: the parent's own.
    adapter: dict[str, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return (self.weight.nbytes + self.bias.nbytes
                + (self.memory.nbytes if self.memory is not None else 0)
                + sum(t.nbytes for t in (self.adapter or {}).values()))

    def input_layers(self) -> dict[str, torch.Tensor] | None:
        """The adapter as the network computes with it (float32)."""
        return None if self.adapter is None else {k: v.float() for k, v in self.adapter.items()}

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings of the parent network -> (B, n_labels) this version's answer, as
        log-probabilities when the memory blends in."""
        return personal_logits(self.weight, self.bias, self.memory, embeddings)


def personal_logits(weight: torch.Tensor, bias: torch.Tensor, memory: CorrectionMemory | None,
                    embeddings: torch.Tensor) -> torch.Tensor:
    logits = nn.functional.linear(embeddings, weight, bias)
    return logits if memory is None else memory.blend(logits, embeddings)


def memory_width(net: nn.Module) -> int:
    """How much of `net`'s embedding a correction memory keeps: the branches' part where the
    head also reads a probe (module docstring), else all of it."""
    return int(net.head.in_features) - getattr(net.config, "probe_features", 0)  # log-mel: none


def personal_head_bytes(head: nn.Linear, labels: tuple[str, ...], *, parent_version: int,
                        parent_sha256: str, parent_kind: str,
                        memory: CorrectionMemory | None = None,
                        adapter: dict[str, torch.Tensor] | None = None) -> bytes:
    """The file of a personal version: safetensors with the head, the memory and the input
    layers (if any) and its parent (whose kind says which features the embeddings were computed
    from). The input layers are stored in float16: pass them already rounded (`as_stored`) so
    the version that was judged is the one that serves."""
    metadata = {"kind": PERSONAL_KIND, "labels": json.dumps(list(labels)),
                "parent_version": str(int(parent_version)), "parent_sha256": parent_sha256,
                "features": FEATURES_BY_KIND[parent_kind]}
    state = {"weight": head.weight.detach().float().contiguous().cpu(),
             "bias": head.bias.detach().float().contiguous().cpu()}
    if memory is not None:
        state["memory"] = memory.embeddings.to(torch.float16).contiguous()
        state["memory_labels"] = memory.labels.to(torch.int16).contiguous()
        metadata["memory"] = json.dumps({"weight": memory.weight, "threshold": memory.threshold,
                                         "neighbours": memory.neighbours})
    for name, tensor in (adapter or {}).items():
        state[_ADAPTER_PREFIX + name] = tensor.detach().to(torch.float16).contiguous().cpu()
    return save_with_metadata(state, metadata)


def as_stored(adapter: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Input layers rounded as a personal version's file keeps them (float16), in float32."""
    if adapter is None:
        return None
    return {k: v.detach().to(torch.float16).float() for k, v in adapter.items()}


def personal_head_from_bytes(data: bytes, expected_sha256: str | None = None) -> PersonalHead:
    """Parse and check a personal version's file; raises ModelFileError for anything else."""
    digest = sha256_bytes(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelFileError(f"personal model checksum mismatch: expected {expected_sha256}, "
                             f"got {digest}")
    try:
        metadata = read_metadata(data)
        if metadata.get("kind") not in _READABLE_KINDS:
            raise ModelFileError(f"not a personal model file (kind {metadata.get('kind')!r})")
        labels = tuple(json.loads(metadata["labels"]))
        tensors = load_safetensors(data)
        weight, bias = tensors["weight"], tensors["bias"]
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[0] != len(labels):
            raise ModelFileError(f"personal head shapes {tuple(weight.shape)}, "
                                 f"{tuple(bias.shape)} do not fit {len(labels)} labels")
        adapter = {k[len(_ADAPTER_PREFIX):]: v for k, v in tensors.items()
                   if k.startswith(_ADAPTER_PREFIX)}
        return PersonalHead(weight, bias, labels, int(metadata["parent_version"]),
                            metadata["parent_sha256"], digest,
                            _read_memory(tensors, metadata, weight.shape), adapter or None)
    except ModelFileError:
        raise
    except Exception as err:  # any parse error means the file is not a usable personal model
        raise ModelFileError(f"not a valid personal model file: {err}") from err


def _read_memory(tensors: dict, metadata: dict, head_shape) -> CorrectionMemory | None:
    if "memory" not in metadata:
        return None
    embeddings, labels = tensors["memory"].float(), tensors["memory_labels"].long()
    n_labels, width = head_shape
    if (embeddings.ndim != 2 or not 1 <= embeddings.shape[1] <= width
            or labels.shape != (embeddings.shape[0],)
            or bool(((labels < 0) | (labels >= n_labels)).any())):
        raise ModelFileError(f"personal memory shapes {tuple(embeddings.shape)}, "
                             f"{tuple(labels.shape)} do not fit the head")
    blend = json.loads(metadata["memory"])
    return CorrectionMemory(embeddings, labels, float(blend["weight"]),
                            float(blend["threshold"]), int(blend["neighbours"]))


class PersonalPredictor(EmotionPredictor):
    """The parent global version's embedding, then the personal head."""

    def __init__(self, base: EmotionPredictor, head: PersonalHead):
        if base.model.sha256 != head.parent_sha256:
            raise ModelFileError(f"personal head was trained on a global model with sha256 "
                                 f"{head.parent_sha256}, not {base.model.sha256}")
        if head.weight.shape[1] != base.model.net.head.in_features:
            raise ModelFileError("personal head does not fit the global model's embedding")
        if head.adapter is not None:
            own = dict(getattr(base.model.net, "downstream", base.model.net).named_parameters())
            if any(k not in own or own[k].shape != v.shape for k, v in head.adapter.items()):
                raise ModelFileError("personal input layers do not fit the global model")
        super().__init__(base.model)
        self.head = head
        self.labels = head.labels
        self.input_layers = head.input_layers()

    @torch.inference_mode()
    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.logits_batch([features])[0]

    @torch.inference_mode()
    def logits_batch(self, features: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        return self._head(embed_batch(self.model.net, features, batch_size,
                                      adapter=self.input_layers)).numpy()

    def _head(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head.logits(embedding)


@torch.inference_mode()
def embed_batch(net: nn.Module, features: list[np.ndarray], batch_size: int = 32, *,
                adapter: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Many clips' (frames_i, F) features -> (n, D) embeddings, batched by similar length
    (padding never changes an embedding, it only costs time); with a personal version's input
    layers (`adapter`, speech-encoder models only) in place of the network's own."""
    extra = {} if adapter is None else {"adapter": adapter}
    out = torch.zeros(len(features), net.head.in_features)
    for chunk, x, lengths in length_batches(features, batch_size):
        out[chunk] = net.embed(x, lengths, **extra)
    return out
