"""The downstream on the speech encoder's states: its BiLSTM over padded clips computes what one
over a packed sequence does, padding never moves a clip's answer (blocks summed or side by side),
and branches joined under one head answer the mean of their own answers."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from learner.model import count_parameters, probe_parameters
from learner.speech_model import (BlockMeanProbe, DownstreamConfig, SpeechEmotionEnsemble,
                                  SpeechEmotionNet, bidirectional_lstm, build_downstream)

CONFIG = DownstreamConfig(n_blocks=3, width=24, n_classes=5, channels=8, conv_layers=1,
                          kernel=3, lstm_hidden=6, dropout=0.5, input_dropout=0.3)


def _branch(seed: int, block_mix: str = "sum") -> SpeechEmotionNet:
    torch.manual_seed(seed)
    net = SpeechEmotionNet(replace(CONFIG, block_mix=block_mix))
    with torch.no_grad():  # non-trivial BatchNorm statistics, block weights and block norms
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
        if block_mix == "sum":
            net.block_logits.uniform_(-1, 1)
        else:
            net.in_norm.weight.uniform_(0.5, 2)
            net.in_norm.bias.uniform_(-1, 1)
    return net.eval()


def _clips(lengths: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(CONFIG.n_blocks, n, CONFIG.width, generator=gen) for n in lengths]


def _padded(clips: list[torch.Tensor], fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([c.shape[1] for c in clips])
    batch = torch.full((len(clips), CONFIG.n_blocks, int(lengths.max()), CONFIG.width), fill)
    for i, c in enumerate(clips):
        batch[i, :, : c.shape[1]] = c
    return batch, lengths


def test_the_bilstm_over_padded_clips_is_the_packed_bilstm_forward_and_backward():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(8, 6, batch_first=True, bidirectional=True)
    lengths = torch.tensor([13, 5, 9, 1])
    x = torch.randn(4, 13, 8)
    valid = torch.arange(13)[None, :] < lengths[:, None]

    ours_in = x.clone().requires_grad_(True)
    ours = bidirectional_lstm(lstm, ours_in, lengths)
    (ours * valid[:, :, None]).square().sum().backward()
    our_grads = [ours_in.grad.clone()] + [p.grad.clone() for p in lstm.parameters()]
    lstm.zero_grad()

    packed_in = x.clone().requires_grad_(True)
    packed, _ = lstm(pack_padded_sequence(packed_in, lengths, batch_first=True,
                                          enforce_sorted=False))
    theirs, _ = pad_packed_sequence(packed, batch_first=True, total_length=13)
    theirs.square().sum().backward()
    their_grads = [packed_in.grad] + [p.grad for p in lstm.parameters()]

    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-6, rtol=1e-5)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _probe(blocks: int = 2, std: bool = False, deltas: bool = False,
           hidden: int = 0) -> BlockMeanProbe:
    """A random probe; with `hidden`, a network probe of that many hidden units."""
    gen = torch.Generator().manual_seed(5)
    width = blocks * CONFIG.width * (1 + int(std) + int(deltas))
    reads = hidden or width
    layer = dict(hidden_weight=torch.randn(hidden, width, generator=gen) / width ** 0.5,
                 hidden_bias=torch.randn(hidden, generator=gen)) if hidden else {}
    return BlockMeanProbe(blocks, torch.randn(width, generator=gen),
                          torch.rand(width, generator=gen) + 0.5,
                          torch.randn(CONFIG.n_classes, reads, generator=gen),
                          torch.randn(CONFIG.n_classes, generator=gen), std, deltas, **layer)


@pytest.mark.parametrize("block_mix", ["sum", "concat"])
@pytest.mark.parametrize("branches,probe", [(1, None), (3, None), (1, "means"), (3, "means"),
                                            (3, "means and stds"), (3, "all three"),
                                            (3, "network")])
def test_padding_inside_a_batch_does_not_change_a_clips_output(branches, probe, block_mix):
    members = [_branch(seed, block_mix) for seed in range(branches)]
    joined = branches > 1 or probe
    fitted = _probe(std=probe != "means", deltas=probe in ("all three", "network"),
                    hidden=16 if probe == "network" else 0) if probe else None
    net = SpeechEmotionEnsemble.of(members, fitted).eval() if joined else members[0]
    clips = _clips((7, 20, 21, 1, 16))
    with torch.inference_mode():
        alone = [net(c[None], torch.tensor([c.shape[1]]))[0] for c in clips]
        batched = net(*_padded(clips, fill=5.0))  # garbage in the padding must not matter
    for i, single in enumerate(alone):
        torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=1e-5)


def test_branches_joined_answer_the_mean_of_their_logits_and_read_as_one_network():
    members = [_branch(seed) for seed in (1, 2, 3)]
    ensemble = SpeechEmotionEnsemble.of(members).eval()
    x, lengths = _padded(_clips((9, 14, 4)), fill=0.0)
    with torch.inference_mode():
        own = torch.stack([m(x, lengths) for m in members])
        torch.testing.assert_close(ensemble(x, lengths), own.mean(dim=0), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(own[0], own[1], atol=1e-3)  # three different answers
        # One embedding, the branches' side by side, under one head: what personal heads,
        # rounds and Avalanche's head read.
        embedding = ensemble.embed(x, lengths)
        torch.testing.assert_close(embedding[:, 12:24], members[1].embed(x, lengths))
    assert ensemble.head.in_features == 3 * 2 * CONFIG.lstm_hidden
    assert ensemble.config.branches == 3
    assert ensemble.adaptable == tuple(f"branches.{k}.{name}" for k in range(3)
                                       for name in members[0].adaptable)
    rebuilt = build_downstream(ensemble.config)
    rebuilt.load_state_dict(ensemble.state_dict(), strict=True)  # as a model file loads it
    # Without a probe, the entries of a file written before probes existed: it loads as it is.
    assert {k.split(".")[0] for k in ensemble.state_dict()} == {"branches", "head"}
    assert isinstance(rebuilt, SpeechEmotionEnsemble)
    assert isinstance(build_downstream(CONFIG), SpeechEmotionNet)


def _clip_statistics(clips: list[torch.Tensor], std: bool, deltas: bool) -> torch.Tensor:
    """(clips, statistics): each clip's first two blocks' means, then (`std`) their deviations,
    then (`deltas`) their mean absolute frame-to-frame changes, computed clip by clip, apart
    from the model's masked batch computation."""
    statistics = [torch.stack([c[:2].mean(dim=1).flatten() for c in clips])]
    if std:  # numpy's population deviation
        statistics.append(torch.from_numpy(np.stack([c[:2].numpy().std(axis=1).reshape(-1)
                                                     for c in clips])))
    if deltas:  # the clip of 4 frames has 3 changes, whatever the batch pads it to
        statistics.append(torch.stack([(c[:2, 1:] - c[:2, :-1]).abs().mean(dim=1).flatten()
                                       for c in clips]))
    return torch.cat(statistics, dim=1)


@pytest.mark.parametrize("std,deltas", [(False, False), (True, False), (True, True)])
def test_a_probe_joined_adds_its_logits_on_the_clips_block_means_to_the_branches_mean(std, deltas):
    """The linear probe (standardised clip means of the first blocks, with `std` their standard
    deviations over the clip, with `deltas` their mean absolute changes from frame to frame,
    then a linear map) is read by the same head as the branches, so the joined answer is
    exactly the sum of the two, and a model file with a probe loads back as written."""
    members = [_branch(seed) for seed in (1, 2)]
    probe = _probe(blocks=2, std=std, deltas=deltas)
    joined = SpeechEmotionEnsemble.of(members, probe).eval()
    clips = _clips((9, 14, 4))
    x, lengths = _padded(clips, fill=0.0)
    probe_logits = ((_clip_statistics(clips, std, deltas) - probe.mean) / probe.scale) \
        @ probe.weight.T + probe.bias
    with torch.inference_mode():
        branches = torch.stack([m(x, lengths) for m in members]).mean(dim=0)
        torch.testing.assert_close(joined(x, lengths), branches + probe_logits, atol=1e-5,
                                   rtol=1e-5)
    assert (joined.config.probe_blocks, joined.config.probe_std,
            joined.config.probe_deltas) == (2, std, deltas)
    assert joined.head.in_features == (2 * 2 * CONFIG.lstm_hidden
                                       + 2 * CONFIG.width * (1 + int(std) + int(deltas)))
    rebuilt = build_downstream(joined.config)
    rebuilt.load_state_dict(joined.state_dict(), strict=True)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.eval()(x, lengths), joined(x, lengths))


def test_a_network_probe_joined_adds_its_networks_logits_and_the_head_reads_its_hidden_units():
    """A network probe (`probe_hidden`): the standardised statistics through its hidden layer
    (its weights kept in int8 steps) and a ReLU; the head reads those units beside the
    branches' embeddings, its columns for them the network's last layer, so the joined answer
    is the branches' mean plus the network's logits; such a file loads back as written, and one
    written before network probes (no `probe_hidden` in its config) loads as the linear probe
    it holds."""
    members = [_branch(seed) for seed in (1, 2)]
    probe = _probe(blocks=2, std=True, deltas=True, hidden=16)
    joined = SpeechEmotionEnsemble.of(members, probe).eval()
    clips = _clips((9, 14, 4))
    x, lengths = _padded(clips, fill=0.0)
    statistics = _clip_statistics(clips, std=True, deltas=True)
    # The hidden weights as the file keeps them: each unit's row in 255 even steps of its
    # largest magnitude, so within half a step of the fitted ones.
    step = probe.hidden_weight.abs().amax(dim=1, keepdim=True) / 127
    kept = torch.round(probe.hidden_weight / step) * step
    assert joined.probe_hidden_weight.dtype == torch.int8
    stored = joined.probe_hidden_weight.float() * joined.probe_hidden_scale[:, None]
    torch.testing.assert_close(stored, kept, atol=1e-6, rtol=1e-5)
    assert float((kept - probe.hidden_weight).abs().max()) <= float(step.max()) / 2 + 1e-6
    units = torch.relu(((statistics - probe.mean) / probe.scale) @ kept.T + probe.hidden_bias)
    assert bool((units == 0).any()) and bool((units > 0).any())  # the ReLU is at work
    with torch.inference_mode():
        branches = torch.stack([m(x, lengths) for m in members]).mean(dim=0)
        torch.testing.assert_close(joined(x, lengths),
                                   branches + units @ probe.weight.T + probe.bias,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joined.embed(x, lengths)[:, 2 * 2 * CONFIG.lstm_hidden:], units,
                                   atol=1e-5, rtol=1e-5)
    assert joined.config.probe_hidden == 16 and joined.config.probe_features == 16
    # Computed with, so counted among the model's parameters; fitted once, so not trainable.
    own = sum(p.numel() for p in joined.parameters())
    assert probe_parameters(joined) == 16 * statistics.shape[1] + 16
    assert count_parameters(joined) == own + probe_parameters(joined)
    assert count_parameters(joined, trainable_only=True) == own
    assert joined.head.in_features == 2 * 2 * CONFIG.lstm_hidden + 16
    rebuilt = build_downstream(DownstreamConfig.from_dict(joined.config.to_dict()))
    rebuilt.load_state_dict(joined.state_dict(), strict=True)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.eval()(x, lengths), joined(x, lengths))

    linear = SpeechEmotionEnsemble.of(members, _probe(blocks=2, std=True, deltas=True)).eval()
    older = {k: v for k, v in linear.config.to_dict().items() if k != "probe_hidden"}
    loaded = build_downstream(DownstreamConfig.from_dict(older))
    loaded.load_state_dict(linear.state_dict(), strict=True)
    assert loaded.config.probe_hidden == 0 and not hasattr(loaded, "probe_hidden_weight")
    with torch.inference_mode():
        torch.testing.assert_close(loaded.eval()(x, lengths), linear(x, lengths))


def test_a_personal_adapter_moves_only_its_own_branch():
    ensemble = SpeechEmotionEnsemble.of([_branch(1), _branch(2)]).eval()
    x, lengths = _padded(_clips((9, 14)), fill=0.0)
    own = dict(ensemble.named_parameters())
    adapter = {name: own[name].detach().clone() for name in ensemble.adaptable}
    project = adapter["branches.1.project.weight"]
    project += 0.5 * torch.randn(project.shape, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        before, after = ensemble.embed(x, lengths), ensemble.embed(x, lengths, adapter=adapter)
    width = 2 * CONFIG.lstm_hidden
    torch.testing.assert_close(after[:, :width], before[:, :width])
    assert not np.allclose(after[:, width:].numpy(), before[:, width:].numpy(), atol=1e-3)


def test_blocks_side_by_side_are_each_normalised_on_their_own():
    """Whisper's depths differ in scale by orders of magnitude: with `block_mix` concat a block
    scaled up by 1000 must reach the projection as it would unscaled (one norm over all the
    blocks would let it drown the others), and the projection reads every block."""
    net = _branch(1, "concat")
    x, lengths = _padded(_clips((9, 14)), fill=0.0)
    loud = x.clone()
    loud[:, 2] *= 1000.0
    with torch.inference_mode():
        torch.testing.assert_close(net(loud, lengths), net(x, lengths), atol=1e-4, rtol=1e-4)
        for block in range(CONFIG.n_blocks):
            other = x.clone()
            other[:, block] = torch.flip(other[:, block], dims=[-1])
            assert not torch.allclose(net(other, lengths), net(x, lengths), atol=1e-4)
    assert net.project.in_features == CONFIG.n_blocks * CONFIG.width


def test_an_unknown_block_mix_is_refused():
    with pytest.raises(ValueError, match="block_mix"):
        replace(CONFIG, block_mix="mean")
