"""EmotionNet as Avalanche trains it, and back.

Avalanche hands a model one tensor (`model(mb_x)`, also in EWC's importance pass), but EmotionNet
needs each clip's length to mask padding. So a batch travels as one tensor with the mask as an
extra channel: (B, T, F + 1), the last channel 1 on real frames and 0 on padding. The head
becomes Avalanche's IncrementalClassifier, which grows when an experience brings a label the
model does not know (its old rows are kept). `export()` gives back a plain EmotionNet, the only
thing ever saved or served: nothing of Avalanche reaches a model file.
"""
from dataclasses import replace

import numpy as np
import torch
from avalanche.models import IncrementalClassifier
from torch import nn

from learner.model import EmotionNet


class MaskedInputNet(nn.Module):
    def __init__(self, net: EmotionNet):
        super().__init__()
        head = IncrementalClassifier(net.head.in_features, net.head.out_features, masking=False)
        head.classifier.load_state_dict(net.head.state_dict())
        net.head = head
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F + 1) features plus mask channel -> (B, n_classes) logits."""
        lengths = x[..., -1].sum(dim=1).round().long()
        return self.net(x[..., :-1], lengths)

    @property
    def n_classes(self) -> int:
        return self.net.head.classifier.out_features

    def export(self) -> EmotionNet:
        """A plain EmotionNet with these weights (and the grown head), in eval mode."""
        classifier = self.net.head.classifier
        out = EmotionNet(replace(self.net.config, n_classes=classifier.out_features))
        state = {k: v for k, v in self.net.state_dict().items() if not k.startswith("head.")}
        state["head.weight"] = classifier.weight.detach().clone()
        state["head.bias"] = classifier.bias.detach().clone()
        out.load_state_dict(state, strict=True)
        return out.eval()


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
