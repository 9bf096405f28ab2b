"""The CNN-BiLSTM: shapes, size, padding invariance, and that it learns."""
import numpy as np
import torch

from learner.inference import pad_batch
from learner.model import EmotionNet, ModelConfig, count_parameters


def _net(seed: int = 0) -> EmotionNet:
    torch.manual_seed(seed)
    net = EmotionNet(ModelConfig())
    # Non-trivial BatchNorm statistics, so that padding leaks would show.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.bias.data.uniform_(-1, 1)
    return net.eval()


def test_output_is_one_logit_per_label_and_model_is_small():
    net = _net()
    out = net(torch.randn(3, 120, 64), torch.tensor([120, 80, 33]))
    assert out.shape == (3, 8)
    assert count_parameters(net) <= 5_000_000


def test_padding_inside_a_batch_does_not_change_a_clips_output():
    net = _net()
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((n, 64)).astype(np.float32) for n in (37, 100, 101, 103, 250)]
    with torch.inference_mode():
        alone = [net(torch.from_numpy(c)[None], torch.tensor([len(c)]))[0] for c in clips]
        x, lengths = pad_batch(clips)
        x[0, 37:] = 5.0  # garbage in the padding must not matter either
        batched = net(x, lengths)
    for i, single in enumerate(alone):
        torch.testing.assert_close(batched[i], single, atol=1e-5, rtol=1e-5)


def test_a_few_training_steps_on_a_tiny_seeded_set_lower_the_loss():
    torch.manual_seed(0)
    net = EmotionNet(ModelConfig(n_classes=2)).train()
    gen = torch.Generator().manual_seed(0)
    # Two classes that differ in where their energy sits over the mel bands.
    x = torch.randn(16, 80, 64, generator=gen)
    y = torch.arange(16) % 2
    x[y == 1, :, :16] += 1.5
    lengths = torch.full((16,), 80)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(net(x, lengths), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
