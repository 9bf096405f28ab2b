"""The first blocks of Whisper's audio encoder, whole, in one file (frozen; never trained here).

log-mel (B, T, 80) at 100 fps
-> conv1 (k3) + GELU -> conv2 (k3, stride 2) + GELU          (B, T/2, D) at 50 fps
-> + sinusoid-learned position table, sliced to the clip's length (no 30 s padding)
-> n_blocks pre-LN transformer blocks (self-attention, then a 4D GELU MLP)
-> the hidden state after each block, (n_blocks, B, T/2, D)

Whisper's final layer norm is not applied: the downstream reads intermediate blocks, which carry
more of the voice (and of its emotion) than the last. Padded frames are zeroed before each conv
and masked out of attention, so a clip's valid frames do not depend on what it is batched with
(the padded frames of the output hold junk: readers mask them).
"""
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    n_mels: int = 80
    width: int = 512  # D: 512 for Whisper base, 384 for tiny
    heads: int = 8
    n_blocks: int = 4  # how many of Whisper's blocks are kept
    max_frames: int = 1500  # rows of the position table: 30 s at 50 fps
    precision: str = "float32"  # or "bfloat16", or "int8" (`with_precision`)

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)  # CTranslate2's fused linear_0 (key bias zero)
        self.attn_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, 4 * width)
        self.mlp_out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, D/H)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv1d(config.n_mels, config.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(config.width, config.width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positions", torch.zeros(config.max_frames, config.width))
        self.blocks = nn.ModuleList(EncoderBlock(config.width, config.heads)
                                    for _ in range(config.n_blocks))
        self.requires_grad_(False)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor,
                blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 80) log-mel, (B,) frame counts -> (n, B, T', D) hidden states of the first n
        blocks (`blocks`, else all the file holds: a model reading fewer runs only those) and
        (B,) lengths T' = ceil(T / 2)."""
        if self.config.precision != "float32" and mel.shape[0] > 1:
            # In a batch a clip's states would depend on its neighbours (and padding): dynamic
            # int8 takes one activation scale per call, and bfloat16 rounds each product to 8
            # bits, where the batch's shape picks the kernel and so the order of the sums (logits
            # 0.01 apart). Each clip alone keeps its answer its own.
            alone = [self._states(mel[i : i + 1, :n], lengths[i : i + 1], blocks)
                     for i, n in enumerate(lengths.tolist())]
            t = max(states.shape[2] for states, _ in alone)
            return (torch.cat([F.pad(states, (0, 0, 0, t - states.shape[2])) for states, _ in alone], 1),
                    torch.cat([n for _, n in alone]))
        return self._states(mel, lengths, blocks)

    def _states(self, mel: torch.Tensor, lengths: torch.Tensor,
                blocks: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        full = bool((lengths == mel.shape[1]).all())  # one clip, or clips of one length
        x = mel.transpose(1, 2).to(self.conv1.weight.dtype)  # (B, 80, T)
        if not full:  # the conv must see zeros past a clip's end, as it does on the clip alone
            x = x * _mask(lengths, x.shape[-1])[:, None, :]
        x = F.gelu(self.conv1(x))
        if not full:
            x = x * _mask(lengths, x.shape[-1])[:, None, :]
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T', D)
        lengths = (lengths + 1) // 2
        t = x.shape[1]
        if t > self.config.max_frames:
            raise ValueError(f"{t} encoder frames exceed Whisper's {self.config.max_frames} (30 s)")
        x = x + self.positions[:t]
        attn_mask = None if full else _mask(lengths, t)[:, None, None, :]  # keys only
        states = []
        for block in self.blocks[:blocks]:
            x = block(x, attn_mask)
            states.append(x)
        return torch.stack(states).float(), lengths


# Block 1's attention stays in float32: its input carries Whisper's few huge activation channels,
# which int8 with one scale per call cannot hold. On RAVDESS clips keeping it cut the relative
# error of block 2's states from 4.3% to 2.4% (block 3's from 5.4% to 3.7%), for about 2.5 ms a
# 3 s clip (README, "Precision").
FLOAT32_LAYERS = ("blocks.0.qkv", "blocks.0.attn_out")

PRECISIONS = ("float32", "bfloat16", "int8")


def with_precision(encoder: WhisperEncoder) -> nn.Module:
    """The encoder as its config says it runs (the file records it, so a downstream is trained on
    the very states it is served). bfloat16: every weight and activation (CPUs with AVX-512 BF16
    run it natively); int8: see `quantized_int8`."""
    precision = encoder.config.precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown encoder precision {precision!r}")
    if precision == "bfloat16":
        return encoder.to(torch.bfloat16)
    return quantized_int8(encoder) if precision == "int8" else encoder


def quantized_int8(encoder: WhisperEncoder) -> nn.Module:
    """The encoder with its linear layers in dynamic int8 (per-output-channel weight scales,
    activations quantised per call), except FLOAT32_LAYERS. Deterministic: the same weights give
    the same int8 model, so a downstream trained on its states serves on the same states."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    layers = [name for name, module in encoder.named_modules()
              if isinstance(module, nn.Linear) and name not in FLOAT32_LAYERS]
    with warnings.catch_warnings():  # torch.ao's "migrate to torchao" notice: not a dependency here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(encoder, {name: per_channel_dynamic_qconfig for name in layers})


def _mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def ct2_names(n_blocks: int) -> dict[str, str]:
    """Our parameter name -> the CTranslate2 variable it is read from."""
    names = {"conv1.weight": "encoder/conv1/weight", "conv1.bias": "encoder/conv1/bias",
             "conv2.weight": "encoder/conv2/weight", "conv2.bias": "encoder/conv2/bias",
             "positions": "encoder/position_encodings/encodings"}
    parts = {"attn_norm": "self_attention/layer_norm", "qkv": "self_attention/linear_0",
             "attn_out": "self_attention/linear_1", "mlp_norm": "ffn/layer_norm",
             "mlp_in": "ffn/linear_0", "mlp_out": "ffn/linear_1"}
    for i in range(n_blocks):
        for ours, theirs in parts.items():
            norm = ours.endswith("norm")
            names[f"blocks.{i}.{ours}.weight"] = f"encoder/layer_{i}/{theirs}/" + ("gamma" if norm else "weight")
            names[f"blocks.{i}.{ours}.bias"] = f"encoder/layer_{i}/{theirs}/" + ("beta" if norm else "bias")
    return names
