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
    finetune(model, "last", example_input=torch.zeros(1, 3, 8, 8), freeze_batchnorm=setup != "train-bn")
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


def test_frozen_batch_norms_pinned_by_finetune_need_no_further_pin():
    model = EncoderDecoder().train()
    finetune(model, "last", example_input=torch.zeros(1, 3, 8, 8))  # pins enc1.1 and enc2.1 to eval
    split = split_frozen(model)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(split.tail(*split.prefix(x)), model(x), rtol=0, atol=0)
    finetune(model, "last", example_input=torch.zeros(1, 3, 8, 8), freeze_batchnorm=False)
    with pytest.raises(InflateError, match="is a batch norm in train mode"):
        split_frozen(model)  # control: without the pins the frozen part is refused


class _Sampler(nn.Module):
    """A conv whose output goes through a Tensor method that ``draw`` names, then the trainable head."""

    def __init__(self, draw):
        super().__init__()
        self.draw = draw
        self.stem = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.draw(h.detach().clone()))


_RANDOM_IN_PLACE = {
    "normal_": lambda t: t.normal_(),
    "bernoulli_": lambda t: t.bernoulli_(0.5),
    "uniform_": lambda t: t.uniform_(),
    "exponential_": lambda t: t.exponential_(),
    "random_": lambda t: t.random_(0, 2),
    "geometric_": lambda t: t.geometric_(0.5),
    "cauchy_": lambda t: t.cauchy_(),
    "log_normal_": lambda t: t.log_normal_(),
}


@pytest.mark.parametrize("method", sorted(_RANDOM_IN_PLACE))
def test_random_in_place_methods_in_the_frozen_part_are_refused(method):
    model = _Sampler(_RANDOM_IN_PLACE[method])
    finetune(model, "last", example_input=torch.zeros(1, 3, 4, 4))
    a, b = model(torch.ones(1, 3, 4, 4)), model(torch.ones(1, 3, 4, 4))
    assert not torch.equal(a, b)  # the method really is random: a cache of it would be wrong
    with pytest.raises(InflateError, match=rf"calls Tensor\.{method}, which is random"):
        split_frozen(model)


@pytest.mark.parametrize(
    ("draw", "message"),
    [(lambda t: torch.normal(t, 1.0), "calls normal"), (lambda t: torch.poisson(t.abs()), "calls poisson"),
     (lambda t: F.rrelu(t, training=True), "calls rrelu with training=True"),
     (lambda t: t.bernoulli(), "calls Tensor.bernoulli")],
)
def test_random_functions_in_the_frozen_part_are_refused(draw, message):
    model = _Sampler(lambda t: draw(t.sigmoid()))
    finetune(model, "last", example_input=torch.zeros(1, 3, 4, 4))
    with pytest.raises(InflateError, match=message):
        split_frozen(model)


def test_deterministic_in_place_methods_and_randomness_in_the_tail_are_accepted():
    model = _Sampler(lambda t: t.mul_(2).clamp_(0, 1))  # control: in-place, but not random
    finetune(model, "last", example_input=torch.zeros(1, 3, 4, 4))
    x = torch.randn(1, 3, 4, 4)
    split = split_frozen(model)
    torch.testing.assert_close(split.tail(*split.prefix(x)), model(x), rtol=0, atol=0)

    class NoisyHead(nn.Module):  # control: randomness after the first trainable layer is recomputed anyway
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.head(self.stem(x))
            return y + y.detach().clone().normal_()

    noisy = NoisyHead()
    finetune(noisy, "last", example_input=torch.zeros(1, 3, 4, 4))
    assert split_frozen(noisy).features == ["stem"]
