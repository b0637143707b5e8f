"""Cached frozen features: same training as without the cache, and clear refusals."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inflate import InflateError, finetune, pin_batchnorm, split_frozen

timm = pytest.importorskip("timm")
D = torch.float64


class EncoderDecoder(nn.Module):
    """A small U-Net-like network predicting a 2-channel map; its last conv is the trainable layer."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.dec = nn.Sequential(nn.Conv2d(16 + 8, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = F.interpolate(self.enc2(a), size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.dec(torch.cat([b, a], 1)))


def _train(model, batches, targets, split=None, epochs=4, lr=0.101):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    cached = split.precompute(batches) if split is not None else None
    losses = []
    for _ in range(epochs):
        total = 0.0
        for i, (x, y) in enumerate(zip(batches, targets)):
            out = split.tail(*cached[i]) if split is not None else model(x)
            loss = F.mse_loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / len(batches))
    return losses


@pytest.mark.parametrize("kind", ["timm-head", "encoder-decoder"])
def test_cached_and_uncached_training_give_the_same_losses(kind):
    def build():
        torch.manual_seed(0)
        if kind == "timm-head":
            model = timm.create_model("resnet18", num_classes=4).to(D)
            xs = [torch.randn(2, 3, 32, 32, dtype=D) for _ in range(3)]
            ys = [torch.randn(2, 4, dtype=D) for _ in range(3)]
        else:
            model = EncoderDecoder().to(D)
            xs = [torch.randn(2, 3, 16, 16, dtype=D) for _ in range(3)]
            ys = [torch.randn(2, 2, 16, 16, dtype=D) for _ in range(3)]
        finetune(model, "last", example_input=xs[0])
        pin_batchnorm(model, "eval")
        return model.train(), xs, ys

    model, xs, ys = build()
    plain = _train(model, xs, ys)
    model, xs, ys = build()
    split = split_frozen(model)
    cached = _train(model, xs, ys, split)
    assert plain[-1] < plain[0]  # it does learn
    assert max(abs(a - b) for a, b in zip(plain, cached)) < 1e-6, (plain, cached)
    # the tail trained the model's own parameters: the full model now gives the cached result
    torch.testing.assert_close(model(xs[0]), split.tail(*split.prefix(xs[0])), rtol=1e-12, atol=1e-12)


def test_features_are_where_expected():
    model = EncoderDecoder().eval()
    finetune(model, "last", example_input=torch.zeros(1, 3, 8, 8))
    assert split_frozen(model).features == ["dec_1"]
    finetune(model, [2, -1], example_input=torch.zeros(1, 3, 8, 8))  # the decoder conv and the last conv
    assert split_frozen(model).features == ["cat"]
    finetune(model, [1, -1], example_input=torch.zeros(1, 3, 8, 8))  # enc2: the skip from enc1 is cached
    assert split_frozen(model).features == ["enc1_2", "getitem"]  # the skip and its size for interpolate


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("train-bn", r"'enc1.1' \(BatchNorm2d\) is a batch norm in train mode"),
        ("dropout", r"is random in train mode"),
        ("frozen", r"expected at least one trainable parameter"),
        ("control-flow", r"the graph cannot be split: torch.fx could not trace"),
    ],
)
def test_refusals(setup, message):
    model = EncoderDecoder().eval()
    finetune(model, "last", example_input=torch.zeros(1, 3, 8, 8))
    if setup == "train-bn":
        model.train()
    elif setup == "dropout":
        model.enc1.append(nn.Dropout(0.5))
        model.train()
        pin_batchnorm(model, "eval")
    elif setup == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 2, 1)

            def forward(self, x):
                return self.conv(x) if x.sum() > 0 else -self.conv(x)

        model = Branchy()
    with pytest.raises(InflateError, match=message):
        split_frozen(model)
