"""A model as Avalanche trains it, and back: an EmotionNet, or a SpeechEmotionModel whose
downstream is trained on its frozen encoder's states.

Avalanche hands a model one tensor (`model(mb_x)`, also in EWC's importance pass), but the model
needs each clip's length to mask padding. So a batch travels as one tensor with the mask as an
extra channel: (B, T, F + 1), the last channel 1 on real frames and 0 on padding. What a row
holds is `inputs()`: log-mel frames for an EmotionNet; for a SpeechEmotionModel, the states its
frozen encoder gives the whole clip, computed once a round (the encoder is nearly all of the
model's time, and every step, replay distillation and EWC's importance pass read them again).
The head becomes Avalanche's IncrementalClassifier, which grows when an experience brings a
label the model does not know (its old rows are kept). `export()` gives back a plain model of
the same kind, the only thing ever saved or served: nothing of Avalanche reaches a model file.

Only what a round trains is a parameter here: a frozen encoder's weights are never handed to
an optimizer, never weighed by EWC, and never written to a state file.
"""
import copy
import math
from dataclasses import replace

import numpy as np
import torch
from avalanche.models import IncrementalClassifier
from torch import nn

from learner.inference import length_batches
from learner.model import EmotionNet
from learner.speech_model import DownstreamBranch, SpeechEmotionModel


class MaskedInputNet(nn.Module):
    def __init__(self, net: EmotionNet | SpeechEmotionModel):
        super().__init__()
        owner = head_owner(net)
        head = IncrementalClassifier(owner.head.in_features, owner.head.out_features,
                                     masking=False)
        head.classifier.load_state_dict(owner.head.state_dict())
        owner.head = head
        self.net = net

    def inputs(self, features: list[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        """What this model reads of each clip, given the clip's features: the features
        themselves for an EmotionNet; for a SpeechEmotionModel its encoder's states of the whole
        clip, (frames at 25 a second, n_blocks * D) float16 (as the base training cache keeps
        them). A crop of those states is what serving computes on the whole clip, cropped."""
        if not isinstance(self.net, SpeechEmotionModel):
            return list(features)
        out: list[np.ndarray | None] = [None] * len(features)
        for chunk, x, lengths in length_batches(features, batch_size):
            states, state_lengths = self.net.encode(x, lengths)  # (B, N, T', D)
            rows = states.transpose(1, 2).flatten(2).to(torch.float16).numpy()
            for j, i in enumerate(chunk):  # each its own array: no row holds its batch alive
                out[i] = rows[j, : int(state_lengths[j])].copy()
        return out

    def input_frames(self, feature_frames: int) -> int:
        """The rows of `inputs()` that `feature_frames` frames of features become (a crop's
        length in the model's own frames): 4 feature frames a state for the speech encoder."""
        if not isinstance(self.net, SpeechEmotionModel):
            return feature_frames
        return math.ceil(feature_frames / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F + 1) rows of `inputs()` plus mask channel -> (B, n_classes) logits."""
        lengths = x[..., -1].sum(dim=1).round().long()
        if not isinstance(self.net, SpeechEmotionModel):
            return self.net(x[..., :-1], lengths)
        return self.net.downstream(states_of_rows(self.net, x[..., :-1]), lengths)

    def named_parameters(self, *args, **kwargs):
        """The trainable parameters only. Avalanche's optimizer reset and EWC (importances,
        anchor) read the model's parameters through here; a frozen encoder is not among them."""
        return ((name, p) for name, p in super().named_parameters(*args, **kwargs)
                if p.requires_grad)

    @property
    def n_classes(self) -> int:
        return head_owner(self.net).head.classifier.out_features

    def export(self) -> EmotionNet | SpeechEmotionModel:
        """A plain model of the same kind with these weights (and the grown head), in eval mode;
        a SpeechEmotionModel keeps the very encoder object it was trained on."""
        owner = head_owner(self.net)
        classifier = owner.head.classifier
        out = type(owner)(replace(owner.config, n_classes=classifier.out_features))
        state = {k: v for k, v in owner.state_dict().items() if not k.startswith("head.")}
        state["head.weight"] = classifier.weight.detach().clone()
        state["head.bias"] = classifier.bias.detach().clone()
        out.load_state_dict(state, strict=True)
        if isinstance(self.net, SpeechEmotionModel):
            out = SpeechEmotionModel(self.net.encoder, out, self.net.encoder_sha256)
        return out.eval()


def freeze_input_layers(net: nn.Module) -> None:
    """Leaves every downstream branch's input layers (DownstreamBranch.input_parameters) out of
    training: they are then not parameters here, so neither the optimizer nor EWC sees them. A
    log-mel EmotionNet has none."""
    for branch in net.modules():
        if isinstance(branch, DownstreamBranch):
            for p in branch.input_parameters():
                p.requires_grad_(False)


def states_of_rows(net: SpeechEmotionModel, rows: torch.Tensor) -> torch.Tensor:
    """(B, T, n_blocks * D) rows of `MaskedInputNet.inputs` -> (B, n_blocks, T, D) states, as
    the downstream reads them."""
    b, t = rows.shape[:2]
    return rows.reshape(b, t, net.config.n_blocks, -1).transpose(1, 2)


def head_owner(net: nn.Module) -> nn.Module:
    """The module whose `head` attribute is the head: a SpeechEmotionModel's downstream (a
    module assigned to the composite's `head` would become a new submodule of it, which its
    forward never calls), or the net itself."""
    return net.downstream if isinstance(net, SpeechEmotionModel) else net


def copy_for_training(model: nn.Module) -> nn.Module:
    """A deep copy to train (or to keep as it was), sharing any frozen encoder: it never
    changes, and every version of its kind reads the one loaded encoder."""
    shared = {id(m.encoder): m.encoder for m in model.modules()
              if isinstance(m, SpeechEmotionModel)}
    return copy.deepcopy(model, memo=shared)


def pad_with_mask(features: list[torch.Tensor]) -> torch.Tensor:
    """List of (frames_i, F) -> (B, max_frames, F + 1), zero-padded, mask in the last channel."""
    longest = max(f.shape[0] for f in features)
    batch = torch.zeros(len(features), longest, features[0].shape[1] + 1)
    for i, f in enumerate(features):
        batch[i, : f.shape[0], :-1] = f
        batch[i, : f.shape[0], -1] = 1.0
    return batch


def collate_masked(items: list[tuple]) -> list[torch.Tensor]:
    """Avalanche's collate for (features, target, ..., task label) items: the features padded
    with their mask, every other field stacked as integers."""
    return [pad_with_mask([item[0] for item in items]),
            *[torch.tensor([int(item[k]) for item in items]) for k in range(1, len(items[0]))]]


def as_float_tensor(features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(features, dtype=np.float32))
