"""A model as Avalanche trains it, and back: an EmotionNet, or a SpeechEmotionModel whose
downstream is trained on its frozen encoder.

Avalanche hands a model one tensor (`model(mb_x)`, also in EWC's importance pass), but the model
needs each clip's length to mask padding. So a batch travels as one tensor with the mask as an
extra channel: (B, T, F + 1), the last channel 1 on real frames and 0 on padding. The head
becomes Avalanche's IncrementalClassifier, which grows when an experience brings a label the
model does not know (its old rows are kept). `export()` gives back a plain model of the same
kind, the only thing ever saved or served: nothing of Avalanche reaches a model file.

Only what a round trains is a parameter here: a frozen encoder's weights are never handed to
an optimizer, never weighed by EWC, and never written to a state file.
"""
import copy
from dataclasses import replace

import numpy as np
import torch
from avalanche.models import IncrementalClassifier
from torch import nn

from learner.model import EmotionNet
from learner.speech_model import SpeechEmotionModel


class MaskedInputNet(nn.Module):
    def __init__(self, net: EmotionNet | SpeechEmotionModel):
        super().__init__()
        owner = head_owner(net)
        head = IncrementalClassifier(owner.head.in_features, owner.head.out_features,
                                     masking=False)
        head.classifier.load_state_dict(owner.head.state_dict())
        owner.head = head
        self.net = net
        # (batch, its encoder states, their lengths) of the batch this model last read, on the
        # speech encoder: another model on the same encoder reads the same batch's states from
        # here instead of running the encoder again (`forward_rows`).
        self.encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F + 1) features plus mask channel -> (B, n_classes) logits."""
        lengths = x[..., -1].sum(dim=1).round().long()
        if not isinstance(self.net, SpeechEmotionModel):
            return self.net(x[..., :-1], lengths)
        # SpeechEmotionModel.forward in its two steps, keeping the states between them.
        states, state_lengths = self.net.encode(x[..., :-1], lengths)
        self.encoded = (x, states, state_lengths)
        return self.net.downstream(states, state_lengths)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor,
                     encoded_by: "MaskedInputNet") -> torch.Tensor:
        """This model's logits on x[rows], as `self(x[rows])` gives them. When `encoded_by`
        last read x and runs the same frozen encoder file, its states of those rows are read
        instead of encoding them again: the int8 encoder encodes each clip alone and padding is
        zeroed, so they are the very states the rows alone would get (cut to the rows' longest)."""
        encoded = encoded_by.encoded
        if (not isinstance(self.net, SpeechEmotionModel) or encoded is None or encoded[0] is not x
                or encoded_by.net.encoder_sha256 != self.net.encoder_sha256):
            return self(x[rows])
        _, states, lengths = encoded
        lengths = lengths[rows]
        return self.net.downstream(states[rows][:, :, : int(lengths.max())], lengths)

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
