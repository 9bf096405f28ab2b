"""The serving form of a downstream of branches answers what the downstream answers: on full
clips and padded batches, with its probe, with a personal version's input layers, and as the
form `for_serving` gives a loaded model of the speech kind."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from learner.checkpoint import model_from_bytes
from learner.inference import EmotionPredictor
from learner.model import count_parameters
from learner.serving_ensemble import ServingEnsemble
from learner.serving_net import for_serving
from learner.speech_encoder.whisper_mel import extract_speech_features
from learner.speech_model import SpeechEmotionEnsemble, SpeechEmotionNet
from service.bench.clips import voiced_clip
from tests.learner.test_speech_model import CONFIG, _branch, _clips, _padded, _probe
from tests.learner.tiny_speech import (bundled_tiny_encoder, tiny_encoder_file,  # noqa: F401
                                       toy_speech_model)


def _ensemble(branches: int = 3, probe: bool = True, conv_layers: int = 1,
              probe_hidden: int = 0) -> SpeechEmotionEnsemble:
    members = [_branch(seed, "concat") for seed in range(branches)]
    if conv_layers > 1:  # CONFIG's branches have one conv: rebuild them with more
        members = []
        for seed in range(branches):
            torch.manual_seed(seed)
            net = SpeechEmotionNet(replace(CONFIG, block_mix="concat", conv_layers=conv_layers))
            with torch.no_grad():
                for module in net.modules():
                    if isinstance(module, torch.nn.BatchNorm1d):
                        module.running_mean.uniform_(-1, 1)
                        module.running_var.uniform_(0.5, 2)
                        module.weight.uniform_(0.5, 1.5)
                        module.bias.uniform_(-1, 1)
                net.in_norm.weight.uniform_(0.5, 2)
                net.in_norm.bias.uniform_(-1, 1)
            members.append(net.eval())
    fitted = _probe(blocks=2, std=True, deltas=True, hidden=probe_hidden) if probe else None
    return SpeechEmotionEnsemble.of(members, fitted).eval()


@pytest.mark.parametrize("branches,probe,conv_layers,probe_hidden",
                         [(3, True, 1, 0), (2, False, 1, 0), (2, True, 2, 0), (3, True, 1, 16)])
def test_full_clips_and_padded_batches_get_the_downstreams_logits(branches, probe, conv_layers,
                                                                  probe_hidden):
    ensemble = _ensemble(branches, probe, conv_layers, probe_hidden)
    serving = ServingEnsemble(ensemble)
    clips = _clips((7, 20, 21, 1, 16))
    with torch.inference_mode():
        for clip in clips:  # one clip alone: the full-length path, no masks
            x, n = clip[None], torch.tensor([clip.shape[1]])
            torch.testing.assert_close(serving(x, n), ensemble(x, n), atol=1e-5, rtol=1e-5)
        x, lengths = _padded(clips, fill=5.0)  # garbage in the padding must not matter
        torch.testing.assert_close(serving(x, lengths), ensemble(x, lengths), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(serving.embed(x, lengths), ensemble.embed(x, lengths),
                                   atol=1e-5, rtol=1e-5)


def test_a_personal_versions_input_layers_are_read_in_place_of_the_branches_own():
    ensemble = _ensemble()
    serving = ServingEnsemble(ensemble)
    own = dict(ensemble.named_parameters())
    gen = torch.Generator().manual_seed(7)
    adapter = {name: own[name].detach() + 0.3 * torch.randn(own[name].shape, generator=gen)
               for name in ensemble.adaptable}
    x, lengths = _padded(_clips((9, 14, 3)), fill=0.0)
    with torch.inference_mode():
        adapted = serving.embed(x, lengths, adapter=adapter)
        torch.testing.assert_close(adapted, ensemble.embed(x, lengths, adapter=adapter),
                                   atol=1e-5, rtol=1e-5)
        assert not torch.allclose(adapted, serving.embed(x, lengths), atol=1e-3)
        # Nothing of the adapter stays behind: the next request without one reads the global.
        torch.testing.assert_close(serving.embed(x, lengths), ensemble.embed(x, lengths),
                                   atol=1e-5, rtol=1e-5)
    # The names a personal version is checked against, and fits, are the downstream's own.
    assert {k: v.shape for k, v in serving.named_parameters()} == \
        {k: v.shape for k, v in ensemble.named_parameters()}
    assert serving.adaptable == ensemble.adaptable


def test_a_loaded_speech_model_serves_in_this_form_with_the_same_answers(
        toy_speech_model, bundled_tiny_encoder):
    model = model_from_bytes(toy_speech_model)
    trained = count_parameters(model.net, trainable_only=True)
    serving = for_serving(model)
    assert isinstance(serving.net.downstream, ServingEnsemble)
    assert (serving.labels, serving.sha256, serving.kind) == (model.labels, model.sha256,
                                                              model.kind)
    assert serving.net.encoder is model.net.encoder  # one encoder, shared
    assert for_serving(serving).net is serving.net  # already in serving form: kept as it is
    assert count_parameters(model.net, trainable_only=True) == trained  # the loaded one untouched
    features = [extract_speech_features(voiced_clip(s, seed=i))
                for i, s in enumerate((3.0, 2.2, 0.7))]
    ours, theirs = EmotionPredictor(serving), EmotionPredictor(model)
    np.testing.assert_allclose(ours.logits_batch(features), theirs.logits_batch(features),
                               atol=1e-5, rtol=1e-5)
    for f in features:
        np.testing.assert_allclose(ours.logits(f), theirs.logits(f), atol=1e-5, rtol=1e-5)
