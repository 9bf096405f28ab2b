"""The serving form of the network answers exactly what the trained network answers."""
import numpy as np
import torch

from learner.checkpoint import model_from_bytes
from learner.features import extract_features
from learner.inference import pad_batch
from learner.model import EmotionNet, ModelConfig
from learner.serving_net import ServingNet, for_serving
from service.bench.clips import voiced_clip
from tests.learner.toy_learning import toy_model  # noqa: F401 (fixture)


def _net(seed: int, config: ModelConfig | None = None) -> EmotionNet:
    torch.manual_seed(seed)
    net = EmotionNet(config or ModelConfig())
    # Non-trivial BatchNorm statistics and affine terms, so that a wrong fold would show.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-1, 1)
    return net.eval()


def test_full_length_batches_and_single_clips_match_the_trained_network():
    for seed, config in ((0, ModelConfig()), (1, ModelConfig(channels=(8, 16, 24), n_classes=5))):
        net = _net(seed, config)
        serving = ServingNet(net)
        for batch, frames in ((1, 301), (4, 300), (3, 97), (2, 26)):  # odd lengths: pooling drops
            x = torch.randn(batch, frames, 64)
            lengths = torch.full((batch,), frames)
            with torch.inference_mode():
                torch.testing.assert_close(serving(x, lengths), net(x, lengths),
                                           atol=1e-5, rtol=1e-5)


def test_padded_batches_match_each_clip_alone():
    net = _net(2)
    serving = ServingNet(net)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((n, 64)).astype(np.float32) for n in (300, 37, 101, 250, 300)]
    x, lengths = pad_batch(clips)
    x[1, 37:] = 5.0  # garbage in the padding must not matter
    with torch.inference_mode():
        batched = serving(x, lengths)
        for i, clip in enumerate(clips):
            alone = net(torch.from_numpy(clip)[None], torch.tensor([len(clip)]))[0]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(serving.embed(x, lengths), net.embed(x, lengths),
                                   atol=1e-5, rtol=1e-5)


def test_a_trained_model_in_serving_form_gives_the_same_logits_on_speech_like_clips(toy_model):
    model = model_from_bytes(toy_model)  # trained: its BatchNorm statistics are real ones
    serving = for_serving(model)
    assert serving.labels == model.labels and serving.sha256 == model.sha256
    assert for_serving(serving).net is serving.net  # already in serving form: kept as it is
    features = [extract_features(voiced_clip(s, seed=i)) for i, s in enumerate((3.0, 3.0, 1.2))]
    with torch.inference_mode():
        for f in features:
            one = torch.from_numpy(f)[None], torch.tensor([len(f)])
            torch.testing.assert_close(serving.net(*one), model.net(*one), atol=1e-4, rtol=0)
        x, lengths = pad_batch(features)
        torch.testing.assert_close(serving.net(x, lengths), model.net(x, lengths),
                                   atol=1e-4, rtol=0)
