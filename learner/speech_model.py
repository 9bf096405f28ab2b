"""The emotion network on a frozen speech encoder, whole, in one file: the downstream that is
trained, on the hidden states of the first blocks of Whisper's encoder.

encoder states (N, B, T, D) at 50 fps (learner.speech_encoder; frozen, computed once per clip)
-> pooled in pairs of frames to 25 fps (`pool_frames`; what the training cache stores)
-> softmax-weighted sum of the N blocks (which depths carry emotion is learned)
-> LayerNorm -> linear projection to `channels` (D is wide; everything after runs narrow)
   (or, `block_mix` "concat": each block normalised on its own, the N blocks side by side
   projected to `channels`, which can keep what differs between depths)
-> Conv1d blocks (local patterns over 40 ms steps) -> BiLSTM (context over the utterance)
-> attention pooling (which frames carry the emotion) -> linear head.
Variable length is masked at every stage: padding a clip inside a batch never changes its output.

A downstream of several branches (`branches` > 1, SpeechEmotionEnsemble) is that many of the
above trained apart, on different seeds, whose embeddings one head reads side by side: the mean
of their logits, written as one linear layer, so that learner rounds, Avalanche's head and personal
heads see one network. Seeds alone move a single downstream by several points on unseen voices;
the mean of several moves less and scores higher (README, "How it was chosen").
"""
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from learner.model import AttentionPooling, time_mask

# What a personal version re-fits for its user's voice (learner.personal.model): the layers that
# carry the encoder's states into the downstream, where a voice's and a microphone's offsets sit
# (in each branch of an ensemble: a downstream's `adaptable` names them).
ADAPTABLE = ("in_norm.weight", "in_norm.bias", "project.weight", "project.bias")
# With the blocks side by side (`block_mix` concat) the projection alone is 98,000 numbers a
# branch, which would take a five-branch personal version past its 1 MB bound: there a personal
# version re-fits each block's per-channel gain and offset, and the projection's bias (3,100).
ADAPTABLE_SIDE_BY_SIDE = ("in_norm.weight", "in_norm.bias", "project.bias")


@dataclass(frozen=True)
class DownstreamConfig:
    n_blocks: int = 4  # encoder blocks read (the first n)
    width: int = 512  # the encoder's D
    n_classes: int = 8
    channels: int = 128
    conv_layers: int = 2
    kernel: int = 5
    lstm_hidden: int = 128
    dropout: float = 0.3  # before the head
    input_dropout: float = 0.0  # on the projected frames: fewer of a voice's details to memorise
    branches: int = 1  # downstreams trained apart whose embeddings one head reads (an ensemble)
    block_mix: str = "sum"  # "sum": softmax-weighted sum of the blocks; "concat": side by side
    # The first `probe_blocks` blocks' mean states over the clip, standardised, beside the
    # branches' embeddings: a probe read by the same head (SpeechEmotionEnsemble).
    probe_blocks: int = 0
    # The probe also reads each of those blocks' standard deviation over the clip (how much a
    # state moves within the utterance, which a mean cannot say).
    probe_std: bool = False
    # And each block's mean absolute change from one frame to the next (how fast the states
    # move: a deviation cannot tell a slow drift from a quick alternation).
    probe_deltas: bool = False
    # 0: the head reads the standardised statistics themselves (a linear probe). Otherwise a
    # hidden layer of this many ReLU units reads them and the head reads its output: a small
    # network in place of the regression (README, "How it was chosen": 0.804 against 0.794).
    probe_hidden: int = 0

    @property
    def probe_width(self) -> int:
        """The block statistics the probe reads, standardised."""
        return self.probe_blocks * self.width * (1 + int(self.probe_std) + int(self.probe_deltas))

    @property
    def probe_features(self) -> int:
        """The numbers the probe adds to what the head reads (after the branches' embeddings):
        its hidden layer's units, or without one the statistics themselves."""
        return self.probe_hidden if self.probe_blocks and self.probe_hidden else self.probe_width

    def __post_init__(self):
        if self.block_mix not in ("sum", "concat"):
            raise ValueError(f"block_mix must be 'sum' or 'concat', not {self.block_mix!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DownstreamConfig":
        return cls(**data)


def pool_frames(states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, B, T, D) at 50 fps -> (N, B, ceil(T/2), D) means of frame pairs (a lone last frame
    stays itself), and the new lengths; padded frames come out zero whatever they held."""
    n, b, t, d = states.shape
    if not bool((lengths == t).all()):
        states = states * time_mask(lengths, t)[None, :, :, None]
    if t % 2:
        states = torch.cat([states, states.new_zeros(n, b, 1, d)], dim=2)
    pooled = states.view(n, b, -1, 2, d).sum(dim=3)
    new_lengths = (lengths + 1) // 2
    # A pair is two frames unless it is a clip's odd last frame.
    count = 2 - (torch.arange(pooled.shape[2])[None, :] * 2 + 1 >= lengths[:, None]).float()
    pooled = pooled / count.clamp(min=1)[None, :, :, None]
    return pooled * time_mask(new_lengths, pooled.shape[2])[None, :, :, None], new_lengths


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, C): each clip's first `length` frames in reverse order, the padding after them left
    in place."""
    t = x.shape[1]
    index = torch.arange(t)[None, :].expand(len(lengths), t)
    reverse = lengths[:, None] - 1 - index
    index = torch.where(reverse >= 0, reverse, index)
    return x.gather(1, index[:, :, None].expand(-1, -1, x.shape[2]))


def bidirectional_lstm(lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A one-layer bidirectional `lstm` over (B, T, C) padded clips -> (B, T, 2H): forward from
    each clip's first frame, backward from its own last one, as over a packed sequence (padded
    frames' outputs are left unmasked: the pooling masks them). Not packed because on a CPU the
    backward pass of a packed LSTM took 77 ms a batch of 32 and this one 11 ms: a learning round
    trains the downstream, and an ensemble's branches each run one."""
    zeros = x.new_zeros(1, x.shape[0], lstm.hidden_size)
    outputs = []
    for suffix, sequence in (("", x), ("_reverse", reverse_within(x, lengths))):
        weights = [getattr(lstm, f"{name}_l0{suffix}")
                   for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        # (has biases, 1 layer, no dropout, training, one direction, batch first)
        h, _, _ = torch.lstm(sequence, (zeros, zeros), weights, True, 1, 0.0, lstm.training,
                             False, True)
        outputs.append(h)
    return torch.cat([outputs[0], reverse_within(outputs[1], lengths)], dim=2)


class BlockNorm(nn.Module):
    """LayerNorm of each block's D channels with the block's own gain and bias: Whisper's depths
    differ in scale by orders of magnitude, so one norm over all of them would hear the loudest."""

    def __init__(self, n_blocks: int, width: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_blocks, width))
        self.bias = nn.Parameter(torch.zeros(n_blocks, width))
        self.eps = eps

    def normalise(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(..., N, D) -> the same, each block normalised, then scaled by `weight`, `bias`."""
        return nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps) * weight + bias


class ConvBlock1d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.BatchNorm1d(c_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Re-zero padded frames: the next conv must see the zeros an unpadded clip ends with.
        return torch.relu(self.norm(self.conv(x))) * mask[:, None, :]


class DownstreamBranch(nn.Module):
    """Encoder states -> one embedding: everything of the downstream but its head."""

    def __init__(self, config: DownstreamConfig):
        super().__init__()
        self.config = config
        if config.block_mix == "sum":
            self.adaptable = ADAPTABLE
            self.block_logits = nn.Parameter(torch.zeros(config.n_blocks))
            self.in_norm = nn.LayerNorm(config.width)
            self.project = nn.Linear(config.width, config.channels)
        else:
            self.adaptable = ADAPTABLE_SIDE_BY_SIDE
            self.in_norm = BlockNorm(config.n_blocks, config.width)
            self.project = nn.Linear(config.n_blocks * config.width, config.channels)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.convs = nn.ModuleList(ConvBlock1d(config.channels, config.channels, config.kernel)
                                   for _ in range(config.conv_layers))
        self.lstm = nn.LSTM(config.channels, config.lstm_hidden, batch_first=True,
                            bidirectional=True)
        self.pool = AttentionPooling(2 * config.lstm_hidden)

    def input_parameters(self) -> list[nn.Parameter]:
        """The parameters of the layers that read the encoder's states (the block weights, the
        norm, the projection): most of a side-by-side branch's numbers."""
        layers = [self.in_norm, self.project]
        return [*(p for layer in layers for p in layer.parameters()),
                *([self.block_logits] if self.config.block_mix == "sum" else [])]

    def embed(self, states: torch.Tensor, lengths: torch.Tensor,
              adapter: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, N, T, D) pooled encoder states, (B,) frame counts -> (B, 2*lstm_hidden).
        `adapter`: a personal version's own values of the `adaptable` parameters, used in place
        of these (passed, not swapped in: other requests read this network meanwhile)."""
        p = {name: self.get_parameter(name) for name in ADAPTABLE} | (adapter or {})
        if self.config.block_mix == "sum":
            weights = torch.softmax(self.block_logits, dim=0)
            x = torch.einsum("n,bntd->btd", weights, states)  # (B, T, D)
            x = nn.functional.layer_norm(x, self.in_norm.normalized_shape, p["in_norm.weight"],
                                         p["in_norm.bias"], self.in_norm.eps)
        else:
            x = self.in_norm.normalise(states.transpose(1, 2), p["in_norm.weight"],
                                       p["in_norm.bias"]).flatten(2)  # (B, T, N*D)
        x = nn.functional.linear(x, p["project.weight"], p["project.bias"])
        t = x.shape[1]
        mask = time_mask(lengths, t)
        x = self.input_dropout(x).transpose(1, 2) * mask[:, None, :]  # (B, C, T)
        for conv in self.convs:
            x = conv(x, mask)
        lengths = lengths.clamp(min=1)
        h = bidirectional_lstm(self.lstm, x.transpose(1, 2), lengths)  # (B, T, 2H)
        return self.pool(h, time_mask(lengths, t))


class SpeechEmotionNet(DownstreamBranch):
    """One branch and its head: the downstream of `branches` = 1."""

    def __init__(self, config: DownstreamConfig):
        super().__init__(config)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * config.lstm_hidden, config.n_classes)

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-> (B, n_classes) logits."""
        return self.head(self.dropout(self.embed(states, lengths)))


class SpeechEmotionEnsemble(nn.Module):
    """`branches` downstreams side by side under one head (the module docstring says why)."""

    def __init__(self, config: DownstreamConfig):
        super().__init__()
        self.config = config
        branch = replace(config, branches=1, probe_blocks=0, probe_std=False, probe_deltas=False,
                         probe_hidden=0)
        self.branches = nn.ModuleList(DownstreamBranch(branch) for _ in range(config.branches))
        self.dropout = nn.Dropout(config.dropout)
        probe_width = config.probe_width
        if probe_width:  # only then: files written before the probe hold no such entries
            # What standardises the probe's statistics (its scaler, from the training clips).
            self.register_buffer("probe_mean", torch.zeros(probe_width))
            self.register_buffer("probe_scale", torch.ones(probe_width))
            if config.probe_hidden:
                # A network probe's hidden layer, fitted once by the recipe as the scaler is:
                # buffers, so learning rounds and personal versions read it and leave it as it
                # is. Its weights (256 x 3,456 on the bundled model, half the downstream's
                # numbers) are kept as int8 with one scale a unit, 0.9 MB in the file instead of
                # 3.5, which keeps the files shipped within their 50 MB.
                hidden = config.probe_hidden
                self.register_buffer("probe_hidden_weight",
                                     torch.zeros(hidden, probe_width, dtype=torch.int8))
                self.register_buffer("probe_hidden_scale", torch.ones(hidden))
                self.register_buffer("probe_hidden_bias", torch.zeros(hidden))
        self.head = nn.Linear(config.branches * 2 * config.lstm_hidden + config.probe_features,
                              config.n_classes)
        self.adaptable = tuple(f"branches.{k}.{name}" for k, member in enumerate(self.branches)
                               for name in member.adaptable)

    @classmethod
    def of(cls, members: list[SpeechEmotionNet],
           probe: "BlockMeanProbe | None" = None) -> "SpeechEmotionEnsemble":
        """The members as one network whose logits are the mean of theirs, exactly, plus the
        probe's (already weighted) logits when one is given: the head reads the network probe's
        hidden units as it reads the branches' embeddings, its last layer beside theirs."""
        hidden = probe.hidden_weight if probe is not None else None
        config = replace(members[0].config, branches=len(members),
                         probe_blocks=probe.blocks if probe else 0,
                         probe_std=bool(probe and probe.std),
                         probe_deltas=bool(probe and probe.deltas),
                         probe_hidden=0 if hidden is None else hidden.shape[0])
        ensemble = cls(config)
        for branch, member in zip(ensemble.branches, members):
            own = {k: v for k, v in member.state_dict().items() if not k.startswith("head.")}
            branch.load_state_dict(own, strict=True)
        with torch.no_grad():
            weights = [m.head.weight / len(members) for m in members]
            bias = torch.stack([m.head.bias for m in members]).mean(dim=0)
            if probe is not None:
                ensemble.probe_mean.copy_(probe.mean)
                ensemble.probe_scale.copy_(probe.scale)
                if hidden is not None:
                    weight, scale = quantise_rows(hidden)
                    ensemble.probe_hidden_weight.copy_(weight)
                    ensemble.probe_hidden_scale.copy_(scale)
                    ensemble.probe_hidden_bias.copy_(probe.hidden_bias)
                weights.append(probe.weight)
                bias = bias + probe.bias
            ensemble.head.weight.copy_(torch.cat(weights, dim=1))
            ensemble.head.bias.copy_(bias)
        return ensemble

    def embed(self, states: torch.Tensor, lengths: torch.Tensor,
              adapter: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, N, T, D), (B,) -> (B, head.in_features): the branches' embeddings, and what
        the head reads of the probe when it has one (`probe_reading`)."""
        parts = []
        for k, branch in enumerate(self.branches):
            own = None if adapter is None else {name: adapter[f"branches.{k}.{name}"]
                                                for name in branch.adaptable}
            parts.append(branch.embed(states, lengths, adapter=own))
        if self.config.probe_blocks:
            parts.append(probe_reading(self, states, lengths))
        return torch.cat(parts, dim=1)

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(states, lengths)))


def probe_reading(net: nn.Module, states: torch.Tensor, lengths: torch.Tensor,
                  hidden_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, T, D), (B,) -> (B, config.probe_features): what the head of `net` (an ensemble,
    or its serving form, holding the probe's buffers) reads of the probe: the block statistics
    standardised, then through the hidden layer and its ReLU when it has one. `hidden_weight`:
    that layer's weights already dequantised (`dequantise_rows`), where the caller keeps them."""
    statistics = probe_statistics(states, lengths, net.config)
    standardised = (statistics - net.probe_mean) / net.probe_scale
    if not net.config.probe_hidden:
        return standardised
    if hidden_weight is None:
        hidden_weight = dequantise_rows(net.probe_hidden_weight, net.probe_hidden_scale)
    return torch.relu(nn.functional.linear(standardised, hidden_weight, net.probe_hidden_bias))


def quantise_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) float -> (R, C) int8 and (R,) scales: each row rounded to 255 even steps of its
    own largest magnitude (a row of zeros keeps scale 1)."""
    scale = weight.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def dequantise_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quantise_rows`' output back to float32 (R, C)."""
    return weight.float() * scale[:, None]


def clip_means(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, N, T, D), (B,) -> (B, N, D): each block's mean over the clip's own frames."""
    mask = time_mask(lengths, states.shape[2])[:, None, :, None]
    return (states * mask).sum(dim=2) / lengths.clamp(min=1)[:, None, None]


def clip_stds(states: torch.Tensor, lengths: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(B, N, T, D), (B,), their `clip_means` (B, N, D) -> (B, N, D): each block's standard
    deviation over the clip's own frames (population: divided by the frame count, as numpy's
    default). The means are passed in because the probe has already computed them."""
    mask = time_mask(lengths, states.shape[2])[:, None, :, None]
    centred = (states - means[:, :, None]) * mask
    return (centred.square().sum(dim=2) / lengths.clamp(min=1)[:, None, None]).sqrt()


def clip_deltas(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, N, T, D), (B,) -> (B, N, D): each block's mean absolute change between consecutive
    frames of the clip's own (T_i - 1 pairs; zero for a clip of one frame)."""
    pairs = (lengths - 1).clamp(min=0)
    mask = time_mask(pairs, states.shape[2] - 1)[:, None, :, None]
    change = (states[:, :, 1:] - states[:, :, :-1]).abs() * mask
    return change.sum(dim=2) / pairs.clamp(min=1)[:, None, None]


def probe_statistics(states: torch.Tensor, lengths: torch.Tensor,
                     config: DownstreamConfig) -> torch.Tensor:
    """(B, N, T, D), (B,) -> (B, config.probe_width): what the head's probe reads, before its
    standardisation: the first `probe_blocks` blocks' clip means, then (`probe_std`) their
    deviations, then (`probe_deltas`) their frame-to-frame changes."""
    probed = states[:, : config.probe_blocks]
    means = clip_means(probed, lengths)
    statistics = [means.flatten(1)]
    if config.probe_std:
        statistics.append(clip_stds(probed, lengths, means).flatten(1))
    if config.probe_deltas:
        statistics.append(clip_deltas(probed, lengths).flatten(1))
    return torch.cat(statistics, dim=1)


@dataclass(frozen=True)
class BlockMeanProbe:
    """A fitted probe on the first `blocks` blocks' clip means (then, when `std`, their
    standard deviations, then, when `deltas`, their mean frame-to-frame changes): standardise
    with `mean` and `scale`; then, for a network probe, `hidden_weight` (hidden, statistics)
    and `hidden_bias` and a ReLU; then `weight` (n_classes, statistics or hidden) and `bias`,
    already scaled by its share of the joined answer. Joined (SpeechEmotionEnsemble.of), the
    hidden weights are kept rounded to int8 steps (`quantise_rows`)."""
    blocks: int
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    std: bool = False
    deltas: bool = False
    hidden_weight: torch.Tensor | None = None
    hidden_bias: torch.Tensor | None = None


def build_downstream(config: DownstreamConfig) -> SpeechEmotionNet | SpeechEmotionEnsemble:
    ensemble = config.branches > 1 or config.probe_blocks > 0
    return SpeechEmotionEnsemble(config) if ensemble else SpeechEmotionNet(config)


class SpeechEmotionModel(nn.Module):
    """The whole model as it serves: Whisper log-mel (B, T, 80) -> frozen encoder -> frame pairs
    pooled -> downstream. The same interface as EmotionNet (`embed`, `head`, `config`), so
    inference, rounds and personal heads work on either kind. Only the downstream is saved in a
    model version's file; the encoder is the bundled one, named there by its sha256."""

    def __init__(self, encoder: nn.Module, downstream: SpeechEmotionNet | SpeechEmotionEnsemble,
                 encoder_sha256: str):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.encoder_sha256 = encoder_sha256  # which bundled encoder file the downstream reads
        self.downstream = downstream
        self.config = downstream.config

    @property
    def head(self) -> nn.Linear:
        return self.downstream.head

    def train(self, mode: bool = True) -> "SpeechEmotionModel":
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode, whatever the caller does
        return self

    def encode(self, mel: torch.Tensor,
               lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 80) Whisper log-mel, (B,) frame counts -> (B, N, T', D) pooled encoder states
        and (B,) their lengths: what the downstream reads. Every model on the same encoder file
        reading as many blocks reads the same states (learner.inference.logits_batches computes
        them once for all); the encoder runs only the blocks the downstream reads."""
        with torch.no_grad():
            states, lengths = self.encoder(mel, lengths, blocks=self.config.n_blocks)
            states, lengths = pool_frames(states, lengths)
        return states.transpose(0, 1), lengths

    def embed(self, mel: torch.Tensor, lengths: torch.Tensor,
              adapter: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T, 80) Whisper log-mel, (B,) frame counts -> (B, head.in_features)."""
        return self.downstream.embed(*self.encode(mel, lengths), adapter=adapter)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.downstream(*self.encode(mel, lengths))
