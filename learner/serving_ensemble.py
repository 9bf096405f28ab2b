"""The serving form of a SpeechEmotionEnsemble: the same function in eval mode, with its branches
computed side by side instead of one after another.

Built once per loaded version (`learner.serving_net.for_serving`), never trained. A downstream
of five branches ran about fifty small ops a branch, most of them on 75 frames, and took 6 ms a
3 s clip on one thread, a quarter of the whole model (README, "Speed"). Here:
- each block is normalised once (every branch normalises the same states, with its own gain and
  offset after), and the branches' gains, offsets and projections are folded into one matrix:
  one matmul projects all of them;
- their convolutions (BatchNorm folded in) are one grouped convolution, their attention pooling
  one batched product;
- when every clip of a batch has its full length the masks, which would be all ones, are skipped
  and each BiLSTM runs in one call over the whole sequence.
Only the LSTMs stay one call a branch (a block-diagonal LSTM of the five was ten times slower).
The branches' own modules are kept, shared, under their names: a personal version's input layers
(`adapter`) replace theirs by name and are folded at the call. Outputs equal the ensemble's in
eval mode to float rounding (tests/learner/test_serving_ensemble.py holds them within 1e-5).
"""
import torch
from torch import nn

from learner.model import fold_batch_norm, time_mask
from learner.speech_model import (SpeechEmotionEnsemble, bidirectional_lstm, dequantise_rows,
                                  probe_reading)


class ServingEnsemble(nn.Module):
    def __init__(self, ensemble: SpeechEmotionEnsemble):
        super().__init__()
        config = ensemble.config
        if config.block_mix != "concat":
            raise ValueError("only an ensemble of side-by-side blocks has a serving form")
        self.config = config
        # Shared, not copied: the same weights under the same names (personal adapters are
        # checked against them), and `head` stays what callers read the embedding's size from.
        self.branches, self.head = ensemble.branches, ensemble.head
        self.adaptable = ensemble.adaptable  # what a personal version re-fits, by those names
        if config.probe_width:
            self.probe_mean, self.probe_scale = ensemble.probe_mean, ensemble.probe_scale
            if config.probe_hidden:
                self.probe_hidden_bias = ensemble.probe_hidden_bias
        self.eps = ensemble.branches[0].in_norm.eps
        with torch.no_grad():
            weight, bias = self.projection()
            self.register_buffer("project_weight", weight)
            self.register_buffer("project_bias", bias)
            # Buffers, not parameters: the served network's parameters are the downstream's.
            for i in range(config.conv_layers):
                weight, bias = _grouped_conv([branch.convs[i] for branch in self.branches])
                self.register_buffer(f"conv{i}_weight", weight)
                self.register_buffer(f"conv{i}_bias", bias)
            scores = [branch.pool.score for branch in self.branches]  # Linear, Tanh, Linear each
            self.register_buffer("score_in_weight", torch.stack([s[0].weight.T for s in scores]))
            self.register_buffer("score_in_bias", torch.stack([s[0].bias for s in scores]))
            self.register_buffer("score_out_weight", torch.stack([s[2].weight[0] for s in scores]))
            self.register_buffer("score_out_bias", torch.cat([s[2].bias for s in scores]))
            if config.probe_hidden:  # dequantised once, not a request
                self.register_buffer("probe_hidden_float", dequantise_rows(
                    ensemble.probe_hidden_weight, ensemble.probe_hidden_scale))
        self.eval()

    def projection(self, adapter: dict[str, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every branch's block gains and offsets (a personal version's, where `adapter` has
        them) folded into its projection, the branches stacked: (K*C, N*D) and (K*C,).
        project(z * g + o) = z @ (W * g)^T + (W @ o + b), z the normalised states."""
        weights, biases = [], []
        for k, branch in enumerate(self.branches):
            own = {name: (adapter or {}).get(f"branches.{k}.{name}", branch.get_parameter(name))
                   for name in ("in_norm.weight", "in_norm.bias", "project.weight",
                                "project.bias")}
            project = own["project.weight"]
            weights.append(project * own["in_norm.weight"].flatten()[None, :])
            biases.append(project @ own["in_norm.bias"].flatten() + own["project.bias"])
        return torch.cat(weights), torch.cat(biases)

    def embed(self, states: torch.Tensor, lengths: torch.Tensor,
              adapter: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, N, T, D), (B,) -> (B, head.in_features), as SpeechEmotionEnsemble.embed."""
        b, _, t, d = states.shape
        k, c, h = len(self.branches), self.config.channels, self.config.lstm_hidden
        full = bool((lengths == t).all())
        weight, bias = (self.project_weight, self.project_bias) if adapter is None \
            else self.projection(adapter)
        z = nn.functional.layer_norm(states.transpose(1, 2), (d,), eps=self.eps).flatten(2)
        x = nn.functional.linear(z, weight, bias).transpose(1, 2)  # (B, K*C, T)
        mask = None if full else time_mask(lengths, t)
        for i in range(self.config.conv_layers):
            x = torch.relu_(nn.functional.conv1d(
                x if full else x * mask[:, None, :], getattr(self, f"conv{i}_weight"),
                getattr(self, f"conv{i}_bias"), padding=self.config.kernel // 2, groups=k))
        if not full:
            x = x * mask[:, None, :]
        x = x.transpose(1, 2)  # (B, T, K*C)
        hidden = torch.stack(
            [branch.lstm(x[..., i * c:(i + 1) * c])[0] if full
             else bidirectional_lstm(branch.lstm, x[..., i * c:(i + 1) * c], lengths.clamp(min=1))
             for i, branch in enumerate(self.branches)], dim=2)  # (B, T, K, 2H)
        scores = torch.tanh(torch.einsum("btkd,kdh->btkh", hidden, self.score_in_weight)
                            + self.score_in_bias)
        scores = torch.einsum("btkh,kh->btk", scores, self.score_out_weight) + self.score_out_bias
        if not full:
            scores = scores.masked_fill(~time_mask(lengths.clamp(min=1), t)[:, :, None],
                                        float("-inf"))
        pooled = torch.einsum("btk,btkd->bkd", torch.softmax(scores, dim=1), hidden)
        parts = [pooled.reshape(b, k * 2 * h)]
        if self.config.probe_blocks:
            hidden = self.probe_hidden_float if self.config.probe_hidden else None
            parts.append(probe_reading(self, states, lengths, hidden))
        return torch.cat(parts, dim=1)

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """-> (B, n_classes) logits (dropout is the identity in eval mode)."""
        return self.head(self.embed(states, lengths))


def _grouped_conv(blocks: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """The branches' ConvBlock1d at one depth (conv, then BatchNorm with its running statistics)
    as the weight and bias of one grouped conv, group k being branch k's."""
    weights, biases = zip(*(fold_batch_norm(block.conv, block.norm) for block in blocks))
    return torch.cat(weights), torch.cat(biases)
