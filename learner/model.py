"""The CNN-BiLSTM emotion classifier, whole, in one file.

log-mel (B, T, F) -> CNN front end (local spectro-temporal patterns, T/4)
-> BiLSTM (context over the utterance) -> attention pooling (which frames carry the emotion)
-> linear head. Variable-length input is handled with masks everywhere, so padding a clip
inside a batch never changes its output.
"""
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


@dataclass(frozen=True)
class ModelConfig:
    n_features: int = 64
    n_classes: int = 8
    channels: tuple[int, ...] = (16, 32, 64)
    lstm_hidden: int = 128
    dropout: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**{**data, "channels": tuple(data["channels"])})


class ConvBlock(nn.Module):
    """conv3x3 -> BN -> ReLU, then either a stride-2 conv (the first block: a full-resolution
    conv plus pooling would cost most of the model's time) or max-pooling."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, pool: tuple[int, int] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.pool = nn.MaxPool2d(pool) if pool else nn.Identity()
        self.stride, self.pool_time = stride, pool[1] if pool else 1

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool(torch.relu(self.norm(self.conv(x))))  # (B, C, F', T')
        lengths = (lengths + self.stride - 1) // self.stride  # a padded conv keeps ceil(L / stride)
        lengths = lengths // self.pool_time  # pooling drops an odd last frame
        # Zero the padded frames again: the next conv must see exactly the zeros it would
        # see at the end of an unpadded clip, or padding would leak into real frames.
        return x * time_mask(lengths, x.shape[-1])[:, None, None, :], lengths


class AttentionPooling(nn.Module):
    """Softmax-weighted mean over valid frames."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.Tanh(), nn.Linear(dim // 2, 1))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=1)
        return torch.einsum("bt,btd->bd", weights, h)  # (B, D)


class EmotionNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        # Frequency halves in every block (64 -> 8 bins); time in the first two (100 -> 25 fps).
        blocks = [ConvBlock(1, c1, stride=2), ConvBlock(c1, c2, pool=(2, 2)),
                  ConvBlock(c2, c3, pool=(2, 1))]
        c_in, freq = c3, config.n_features // 8
        self.blocks = nn.ModuleList(blocks)
        self.project = nn.Sequential(nn.Linear(c_in * freq, config.lstm_hidden), nn.ReLU())
        self.lstm = nn.LSTM(
            config.lstm_hidden, config.lstm_hidden, batch_first=True, bidirectional=True
        )
        self.pool = AttentionPooling(2 * config.lstm_hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * config.lstm_hidden, config.n_classes)

    def embed(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, F) features, (B,) frame counts -> (B, 2*lstm_hidden) utterance embedding."""
        x = features.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        x = x * time_mask(lengths, x.shape[-1])[:, None, None, :]
        for block in self.blocks:
            x, lengths = block(x, lengths)
        b, c, f, t = x.shape
        x = self.project(x.permute(0, 3, 1, 2).reshape(b, t, c * f))  # (B, T/4, H)
        lengths = lengths.clamp(min=1)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=t)  # (B, T/4, 2H)
        return self.pool(h, time_mask(lengths, t))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-> (B, n_classes) logits."""
        return self.head(self.dropout(self.embed(features, lengths)))


def time_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def fold_batch_norm(conv: nn.Module, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv (any dimension) then BatchNorm with its running statistics, as the weight and bias
    of one conv: what the serving forms compute instead of the two."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.ndim - 1)))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    return weight, (bias - norm.running_mean) * scale + norm.bias


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """All parameters the model computes with, or only those training may change (a frozen
    encoder's are not, nor a network probe's hidden layer: `probe_parameters`). A speech
    encoder's blocks past those the downstream reads never run (the file may hold more): they
    are not counted."""
    encoder, config = getattr(model, "encoder", None), getattr(model, "config", None)
    idle = [] if encoder is None else list(encoder.blocks[config.n_blocks:])
    skipped = {id(m) for block in idle for m in block.modules()}
    total = 0
    for m in model.modules():
        if id(m) in skipped:
            continue
        total += sum(p.numel() for p in m.parameters(recurse=False)
                     if p.requires_grad or not trainable_only)
        # An int8 encoder's linear layers keep theirs packed, outside parameters().
        if not trainable_only and isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            total += m.weight().numel() + (m.bias().numel() if m.bias() is not None else 0)
    return total + (0 if trainable_only else probe_parameters(model))


def probe_parameters(model: nn.Module) -> int:
    """The weights and biases of a network probe's hidden layer (learner.speech_model): fitted
    once by the recipe and kept in buffers, int8, so outside parameters(); rounds never train
    them. 0 for a model without one."""
    return sum(m.probe_hidden_weight.numel() + m.probe_hidden_bias.numel()
               for m in model.modules() if "probe_hidden_weight" in m._buffers)
