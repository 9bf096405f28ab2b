"""The serving form of an EmotionNet: the same function in eval mode, computed with fewer ops.

Built once per loaded version (`for_serving`), never trained: the BatchNorm of each conv block is
folded into the conv's weights and bias, max-pooling is two strided `torch.maximum`s (MaxPool2d
costs more than the conv before it on these shapes), ReLU runs in place, and when every clip of
a batch has its full length (one clip alone, or clips of one length) the masks, which would be
all ones, and the pack/unpack around the LSTM are skipped. A batch with padding takes the masked
path, the same as EmotionNet's. Outputs equal EmotionNet's in eval mode to float rounding
(tests/learner/test_serving_net.py holds them within 1e-5).
"""
from dataclasses import replace

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from learner.checkpoint import LOGMEL_KIND, WHISPER_KIND, LoadedModel
from learner.model import EmotionNet, fold_batch_norm, time_mask
from learner.serving_ensemble import ServingEnsemble
from learner.speech_model import SpeechEmotionEnsemble, SpeechEmotionModel


class ServingNet(nn.Module):
    def __init__(self, net: EmotionNet):
        super().__init__()
        self.config = net.config
        self.convs = nn.ModuleList(_fold_batch_norm(b.conv, b.norm) for b in net.blocks)
        # (stride, pool kernel (freq, time)) of each block, for the lengths and the pooling.
        self.shapes = [(b.stride, _kernel(b.pool)) for b in net.blocks]
        # Shared with `net`, not copied: the same weights, and `head` stays where callers that
        # put their own head on the embedding (personal versions) read its size.
        self.project, self.lstm, self.score, self.head = (net.project, net.lstm, net.pool.score,
                                                          net.head)
        self.eval()
        self.requires_grad_(False)

    def embed(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, F) features, (B,) frame counts -> (B, 2*lstm_hidden), as EmotionNet.embed."""
        full = bool((lengths == features.shape[1]).all())
        x = features.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        if not full:
            x = x * time_mask(lengths, x.shape[-1])[:, None, None, :]
        for conv, (stride, kernel) in zip(self.convs, self.shapes):
            x = _max_pool(torch.relu_(conv(x)), kernel)
            # Full clips stay full: a padded conv keeps ceil(T / stride), pooling floors both.
            lengths = (lengths + stride - 1) // stride // kernel[1]
            if not full:
                x = x * time_mask(lengths, x.shape[-1])[:, None, None, :]
        b, c, f, t = x.shape
        x = self.project(x.permute(0, 3, 1, 2).reshape(b, t, c * f))  # (B, T/4, H)
        if full and t > 0:
            h, _ = self.lstm(x)
            scores = self.score(h).squeeze(-1)  # (B, T/4)
        else:
            lengths = lengths.clamp(min=1)
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            h, _ = self.lstm(packed)
            h, _ = pad_packed_sequence(h, batch_first=True, total_length=t)
            scores = self.score(h).squeeze(-1).masked_fill(~time_mask(lengths, t), float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return torch.bmm(weights.unsqueeze(1), h).squeeze(1)  # (B, 2H)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-> (B, n_classes) logits (dropout is the identity in eval mode)."""
        return self.head(self.embed(features, lengths))


def for_serving(model: LoadedModel) -> LoadedModel:
    """The same loaded version with its network in serving form: a log-mel EmotionNet as a
    ServingNet; a speech-encoder model's ensemble of side-by-side branches as a ServingEnsemble
    (learner.serving_ensemble) on the same encoder. Anything else serves as it is."""
    net = model.net
    if model.kind == LOGMEL_KIND and not isinstance(net, ServingNet):
        return replace(model, net=ServingNet(net.eval()))
    if (model.kind == WHISPER_KIND and isinstance(net.downstream, SpeechEmotionEnsemble)
            and net.config.block_mix == "concat"):
        serving = ServingEnsemble(net.downstream.eval())
        return replace(model, net=SpeechEmotionModel(net.encoder, serving, net.encoder_sha256))
    return model


def _fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """conv then BN (running statistics) as one conv with a bias."""
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, bias=True)
    with torch.no_grad():
        weight, bias = fold_batch_norm(conv, norm)
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded


def _kernel(pool: nn.Module) -> tuple[int, int]:
    if not isinstance(pool, nn.MaxPool2d):
        return 1, 1
    kernel = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,) * 2
    if pool.stride not in (kernel, kernel[0]) or pool.padding not in (0, (0, 0)):
        raise ValueError(f"no serving form for {pool}")  # EmotionNet only pools k x k, stride k
    return kernel


def _max_pool(x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """MaxPool2d(kernel) (stride = kernel, an odd remainder dropped) on (B, C, F, T)."""
    for dim, k in ((2, kernel[0]), (3, kernel[1])):
        if k > 1:
            n = x.shape[dim] // k * k
            parts = [x.narrow(dim, 0, n)[(slice(None),) * dim + (slice(i, None, k),)]
                     for i in range(k)]
            x = parts[0]
            for part in parts[1:]:
                x = torch.maximum(x, part)
    return x
