"""Discovery follows the data: which layers read the input, and what is refused."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from inflate import InflateError, find_input_layers, inflate_first_conv
from inflate._discovery import discover

from . import models

X = torch.zeros(2, 3, 16, 16)


def test_plain_and_multi_branch_stems():
    assert find_input_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))) == ["0"]
    assert find_input_layers(models.Branches(), X) == ["k3", "k1", "pool_conv"]


@pytest.mark.parametrize(
    ("module", "x"),
    [
        (nn.Conv1d(2, 4, 3), torch.zeros(1, 2, 10)),
        (nn.Conv3d(2, 4, 3), torch.zeros(1, 2, 5, 6, 7)),
        (nn.ConvTranspose2d(2, 4, 3, stride=2), torch.zeros(1, 2, 5, 5)),
        (nn.Conv2d(4, 8, 3, groups=4), torch.zeros(1, 4, 5, 5)),
        (nn.Linear(6, 3), torch.zeros(2, 6)),
    ],
)
def test_every_layer_kind(module, x):
    assert find_input_layers(nn.Sequential(module), x) == ["0"]


def test_linear_patch_embedding_layouts():
    found = discover(models.PatchLinear(), X).layers
    assert [(f.name, f.layout.kind, f.layout.outer, f.layout.inner) for f in found] == [("embed", "linear", 16, 1)]
    found = discover(models.PatchLinear(pattern="b c (h p1) (w p2) -> b (h w) (c p1 p2)"), X).layers
    assert (found[0].layout.outer, found[0].layout.inner) == (1, 16)


@pytest.mark.parametrize(("unshuffle", "outer", "inner"), [(False, 4, 1), (True, 1, 4)])
def test_space_to_depth_stems_are_followed(unshuffle, outer, inner):
    # TResNet's view/permute puts the 2x2 offsets before the channels, pixel_unshuffle after
    (found,) = discover(models.SpaceToDepth(unshuffle=unshuffle), X).layers
    assert (found.name, found.layout.outer, found.layout.inner, found.channels) == ("conv", outer, inner, 3)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(models.StdConv(3, 4, 3)), r"layer '0' \(StdConv\) computes its conv2d weight during forward"),
        (models.Normalized(), r"per-channel operand of shape \(1, 3, 1, 1\)"),
        (nn.Sequential(nn.GroupNorm(1, 3), nn.Conv2d(3, 4, 1)), r"reads the input only after group_norm"),
        (models.Shared(), r"layer 'conv' reads the input and also other tensors"),
        (models.InputSkip(), r"cat of the input with other tensors"),
        (models.PatchLinear(norm=True), r"after layer_norm"),
        (nn.Sequential(nn.Conv2d(3, 3, 1), nn.Identity()), None),
    ],
)
def test_refusals_name_the_layer_and_the_reason(model, message):
    if message is None:  # control: a plain model is accepted
        assert find_input_layers(model, X) == ["0"]
        return
    with pytest.raises(InflateError, match=message):
        find_input_layers(model, X)


def test_input_reaching_the_output_directly_is_refused():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x.mean()

    with pytest.raises(InflateError, match="model output depends on the input through mean"):
        find_input_layers(Skip(), X)


def test_parametrized_weights_are_refused():
    conv = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", nn.Identity())
    with pytest.raises(InflateError, match="computes its conv2d weight"):
        find_input_layers(nn.Sequential(conv), X)
    normed = parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(InflateError, match="weight norm"):
        find_input_layers(nn.Sequential(normed), X)


def test_lazy_modules_are_refused():
    with pytest.raises(InflateError, match="lazy module '0'"):
        find_input_layers(nn.Sequential(nn.LazyConv2d(4, 3)), X)


@pytest.mark.parametrize("builder", ["googlenet", "inception_v3"])
def test_torchvision_transform_input_is_widened_per_input(builder, tmp_path):
    """GoogLeNet and Inception v3 re-normalise channels 0, 1, 2 one by one in code: rewritten
    into an equal per-channel affine read from two lists, bit for bit the original, whose
    lists are then widened per input. Both rules exact in float64; the rewritten model
    saves and loads whole; the original class, inflated by hand, cannot read 6 channels."""
    torchvision = pytest.importorskip("torchvision")
    size = 75 if builder == "inception_v3" else 32
    torch.manual_seed(0)
    net = getattr(torchvision.models, builder)(init_weights=True, aux_logits=False, transform_input=True).double()
    net.eval()
    x1, x2 = torch.rand(2, 2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        before = net(x1)
    stem = find_input_layers(net, x1)
    assert len(stem) == 1 and type(net).__name__ in ("GoogLeNet", "Inception3")  # finding changes nothing
    zero = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=x1)
    assert isinstance(zero, type(net)) and type(zero).__name__.startswith("PerInput")
    assert zero.input_scale == [0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5] * 2
    assert set(zero.state_dict()) == set(net.state_dict())
    with torch.no_grad():
        assert torch.equal(zero(torch.cat([x1, x2], 1)), before)  # the extra channels add exact zeros
    rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=x1)
    with torch.no_grad():
        # two halves summed differ from the original sum by an ulp, which ~100 layers amplify
        # (2e-11 relative seen on Inception v3); a wrong stem or transform is off by order 1
        torch.testing.assert_close(rep(torch.cat([x1, x1], 1)), before, rtol=1e-9, atol=1e-9 * before.abs().max())
    torch.save(zero, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(torch.cat([x1, x2], 1)), before)
    # negative control: the stem widened by hand, the class left as it was
    by_hand = copy.deepcopy(zero)
    by_hand.__class__ = type(net)
    with pytest.raises(RuntimeError), torch.no_grad():
        by_hand(torch.cat([x1, x2], 1))


def test_the_rewritten_input_transform_is_the_original_bit_for_bit():
    torchvision = pytest.importorskip("torchvision")
    from inflate._rewrites import find, rewritten

    net = torchvision.models.googlenet(init_weights=True, aux_logits=False, transform_input=True).eval()
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 16, 16, dtype=dtype)
        with torch.no_grad():
            expected = net._transform_input(x)
            with rewritten(find(net)):
                got = net._transform_input(x)
        assert torch.equal(got, expected) and not torch.equal(x, expected)
    assert type(net).__name__ == "GoogLeNet" and not hasattr(net, "input_scale")  # put back


def test_data_dependent_models_fall_back_to_one_real_run():
    with pytest.raises(InflateError, match="pass example_input"):
        find_input_layers(models.DataDependent())
    assert find_input_layers(models.DataDependent(), torch.randn(1, 3, 8, 8)) == ["conv"]


def test_discovery_changes_nothing_and_leaves_no_hooks():
    model = models.Branches().train()
    before = copy.deepcopy(model.state_dict())
    find_input_layers(model, X)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched in train mode
    assert model.training
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_discovery_restores_the_very_same_parameters_and_drops_what_forward_registers():
    """Stand-ins are swapped in for the call only: afterwards every module holds its own
    Parameter and buffer objects again, and what the forward registered or set (a lazily
    built cache, the last input, a call counter) is not left behind, also when the forward
    fails."""

    class Cached(nn.Module):
        def __init__(self, fail=False):
            super().__init__()
            self.conv, self.fail = nn.Conv2d(3, 4, 3), fail

        def forward(self, x):
            self.register_buffer("cache", torch.zeros(1, device=x.device))
            self.last_input = x  # a plain attribute: would keep a meta tensor
            self.conv.calls = getattr(self.conv, "calls", 0) + 1
            if self.fail:
                raise RuntimeError("no")
            return self.conv(x) + self.cache

    for fail in (False, True):
        model = Cached(fail)
        params = [id(p) for p in model.parameters()]
        dicts = (id(model.conv._parameters), id(model._buffers))
        if fail:
            with pytest.raises(InflateError):
                find_input_layers(model)
        else:
            assert find_input_layers(model) == ["conv"]
        assert [id(p) for p in model.parameters()] == params
        assert (id(model.conv._parameters), id(model._buffers)) == dicts
        assert "cache" not in model._buffers and all(not t.is_meta for t in model.state_dict().values())
        assert not hasattr(model, "last_input") and not hasattr(model.conv, "calls")
        assert all("forward" not in m.__dict__ for m in model.modules())  # no lowered forward left behind


def test_wrappers_are_looked_through():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert find_input_layers(nn.DataParallel(net), X) == ["0"]
    assert find_input_layers(torch.compile(net, backend="eager"), X) == ["0"]


def test_functional_use_of_a_parameter_is_followed():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel)

    (found,) = discover(Functional(), X).layers
    assert (found.name, found.param) == ("", "kernel")


def test_tensors_made_like_the_input_do_not_carry_it():
    class Grid(nn.Module):  # an identity grid added to the output, cast with .to(x)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, x):
            grid = torch.zeros(2, *x.shape[-2:]).to(x)
            return grid + self.conv(x) + torch.zeros_like(x[:, :2])

    assert find_input_layers(Grid(), X) == ["conv"]


def test_shared_modules_get_their_own_parameters_back():
    """One module registered under two names (CoaT shares its position encodings so):
    every name of it holds the real parameters again after discovery."""
    shared = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.ReLU(), shared)
    params = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    assert find_input_layers(model, X) == ["0"]
    assert {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)} == params
    assert not any(p.is_meta for p in model.parameters())
    model(X)  # still runs for real


def _tiny_csatv2():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("csatv2", dims=(16, 24, 32, 40), depths=(1, 1, 1, 1), transformer_depths=(0, 0, 1, 1),
                             num_classes=10).double().eval()


def test_csatv2_dct_stem_reads_each_input_on_its_own(tmp_path):
    """CSATv2's stem converts RGB to YCbCr in code and takes the DCT of each component:
    rewritten to convert each input on its own, its three convs read one block of 64
    coefficients per input. Both rules exact in float64; with a rule that gives input 2
    twice input 1's kernel, the stem's output is the original stem's on input 1 plus twice
    its response to input 2 (each input converted on its own); it saves and loads whole,
    inflates again, and the original class, widened by hand, cannot read 6 channels."""
    net = _tiny_csatv2()
    x1, x2, x3, x4 = torch.rand(4, 2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        before, stem1, stem2 = net(x1), net.stem_dct(x1), net.stem_dct(x2)
    tol = {"rtol": 1e-12, "atol": 1e-12 * before.abs().max()}  # float64 rounding is ~1e-16 relative
    assert find_input_layers(net, x1) == ["stem_dct.conv_y", "stem_dct.conv_cb", "stem_dct.conv_cr"]
    assert type(net.stem_dct).__name__ == "LearnableDct2d"  # finding changes nothing
    zero = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=x1)
    assert type(zero.stem_dct).__name__ == "PerInputLearnableDct2d" and zero.stem_dct.conv_y.in_channels == 128
    assert set(zero.state_dict()) == set(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(zero(torch.cat([x1, x2], 1)), before, **tol)
    rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=x1)
    with torch.no_grad():
        torch.testing.assert_close(rep(torch.cat([x1, x1], 1)), before, **tol)
        assert (rep(torch.cat([x1, x2], 1)) - before).abs().max() > 1e-3  # it reads input 2
    twice = inflate_first_conv(copy.deepcopy(net), 2, init=lambda kernel, i, c: kernel * (1 + i), example_input=x1)
    bias = torch.cat([net.stem_dct.conv_y.bias, net.stem_dct.conv_cb.bias, net.stem_dct.conv_cr.bias])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(twice.stem_dct(torch.cat([x1, x2], 1)), stem1 + 2 * (stem2 - bias),
                                   rtol=1e-12, atol=1e-12)
        # negative control: inputs converted together (channels 1-3 of input 1 with 4-6 of input 2) differ
        mixed = torch.cat([x1[:, :2], x2[:, :1], x1[:, 2:], x2[:, 1:]], 1)
        assert (twice.stem_dct(mixed) - (stem1 + 2 * (stem2 - bias))).abs().max() > 1e-3
    torch.save(zero, tmp_path / "net.pt")
    loaded = torch.load(tmp_path / "net.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.cat([x1, x2], 1)), before, **tol)
    again = inflate_first_conv(loaded, 2, init="zero", example_input=torch.cat([x1, x2], 1))
    assert again.stem_dct.conv_y.in_channels == 256
    with torch.no_grad():
        torch.testing.assert_close(again(torch.cat([x1, x2, x3, x4], 1)), before, **tol)
    by_hand = copy.deepcopy(zero)  # negative control: the convs widened, the class left as it was
    by_hand.stem_dct.__class__ = type(net.stem_dct)
    with pytest.raises(RuntimeError), torch.no_grad():
        by_hand(torch.cat([x1, x2], 1))


def test_csatv2_stem_refuses_inputs_that_are_not_rgb_and_stays_untouched():
    net = _tiny_csatv2()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(InflateError, match=r"stem_dct.conv_y.*multiple of 3 channels, got \(3, 1\)"):
        inflate_first_conv(net, 2, channels=[3, 1], example_input=torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    assert type(net.stem_dct).__name__ == "LearnableDct2d" and net.stem_dct.conv_y.in_channels == 64
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_a_stem_whose_forward_was_replaced_on_the_instance_is_followed_as_it_is():
    """The rewrite replaces the class's forward; a forward set on the instance would win over it
    and is not known to read each input on its own: not rewritten, followed, refused (it mixes
    channels), the model unchanged."""
    import types

    net = _tiny_csatv2()
    stem = net.stem_dct
    stem.forward = types.MethodType(type(stem).forward, stem)
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    with pytest.raises(InflateError, match="stem_dct.*reads the input only after"):
        inflate_first_conv(net, 2, example_input=x)
    assert type(stem).__name__ == "LearnableDct2d" and stem.conv_y.in_channels == 64


def test_the_rewritten_dct_stem_is_the_original_bit_for_bit():
    from inflate._rewrites import find, rewritten

    net = _tiny_csatv2()
    for dtype in (torch.float32, torch.float64):
        net.to(dtype)
        x = torch.randn(2, 3, 32, 48, dtype=dtype)
        with torch.no_grad():
            expected = net.stem_dct(x)
            with rewritten(find(net)):
                assert type(net.stem_dct).__name__ == "PerInputLearnableDct2d"
                got = net.stem_dct(x)
        assert torch.equal(got, expected)
    assert type(net.stem_dct).__name__ == "LearnableDct2d"  # put back


def _mixed_stem(channels, out, kernels, depthwise=False):
    from timm.layers import MixedConv2d

    torch.manual_seed(0)
    return nn.Sequential(MixedConv2d(channels, out, kernels, padding="same", depthwise=depthwise, bias=True), nn.ReLU(),
                         nn.Conv2d(out, 5, 3)).double().eval()


@pytest.mark.parametrize("channels, out, kernels, depthwise", [(3, 12, [3, 5, 7], False), (4, 8, [3, 5], True)])
def test_a_mixed_conv_reading_the_input_splits_each_input(channels, out, kernels, depthwise, tmp_path):
    """timm's MixedConv2d splits the input's channels among convs of different kernel sizes:
    rewritten so that each input is split alike and conv j reads split j of every input
    (a depthwise split becomes a dense conv). Both rules exact in float64; with input 2 given
    twice input 1's kernel, the output is the original on input 1 plus twice its response to
    input 2; only the MixedConv2d that reads the input keeps the rewrite."""
    pytest.importorskip("timm")
    net = _mixed_stem(channels, out, kernels, depthwise)
    net.append(_mixed_stem(5, 6, [3, 5])[0])  # a MixedConv2d that does not read the input
    x1, x2 = torch.rand(2, 2, channels, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        before, stem1, stem2 = net(x1), net[0](x1), net[0](x2)
    tol = {"rtol": 1e-12, "atol": 1e-12 * before.abs().max()}  # float64 rounding is ~1e-16 relative
    assert find_input_layers(net, x1) == [f"0.{j}" for j in range(len(kernels))]
    zero = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=x1)
    assert [type(m).__name__ for m in (zero[0], zero[3])] == ["PerInputMixedConv2d", "MixedConv2d"]
    assert all(conv.groups == 1 for conv in zero[0].values())
    rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=x1)
    twice = inflate_first_conv(copy.deepcopy(net), 2, init=lambda kernel, i, c: kernel * (1 + i), example_input=x1)
    bias = torch.cat([conv.bias for conv in net[0].values()])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(zero(torch.cat([x1, x2], 1)), before, **tol)
        torch.testing.assert_close(rep(torch.cat([x1, x1], 1)), before, **tol)
        assert (rep(torch.cat([x1, x2], 1)) - before).abs().max() > 1e-3  # it reads input 2
        expected = stem1 + 2 * (stem2 - bias)
        torch.testing.assert_close(twice[0](torch.cat([x1, x2], 1)), expected, rtol=1e-12, atol=1e-12)
        swapped = torch.cat([x2[:, :1], x1[:, 1:], x1[:, :1], x2[:, 1:]], 1)  # negative control: channel 0 swapped
        assert (twice[0](swapped) - expected).abs().max() > 1e-3
    torch.save(zero, tmp_path / "net.pt")
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "net.pt", weights_only=False)(torch.cat([x1, x2], 1)),
                                   before, **tol)
    by_hand = copy.deepcopy(zero)  # negative control: the convs widened, the class left as it was
    by_hand[0].__class__ = type(net[0])
    with pytest.raises(RuntimeError), torch.no_grad():
        by_hand(torch.cat([x1, x2], 1))


def test_a_mixed_conv_reading_permuted_channels_or_another_count_is_refused():
    pytest.importorskip("timm")

    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixed = _mixed_stem(3, 6, [3, 5])[0]

        def forward(self, x):
            return self.mixed(x[:, [2, 0, 1]])

    net = Permuted().double()
    with pytest.raises(InflateError, match="mixed.*reads the input only after"):
        inflate_first_conv(net, 2, example_input=torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    assert type(net.mixed).__name__ == "MixedConv2d" and net.mixed["0"].in_channels == 2
    net = _mixed_stem(3, 6, [3, 5])
    with pytest.raises(InflateError, match=r"'0\.0'.*multiple of 3 channels, got \(3, 1\)"):
        inflate_first_conv(net, 2, channels=[3, 1], example_input=torch.zeros(1, 3, 8, 8, dtype=torch.float64))
    assert type(net[0]).__name__ == "MixedConv2d" and net[0]["0"].in_channels == 2


def test_rewritten_stems_guess_their_input_and_trace_with_torch_fx():
    """Without example_input, a model starting with a known stem is called with the stem's own
    channel count (its first conv reads only a share of it), also once inflated; the rewritten
    stems stay traceable by torch.fx, so split_frozen caches the frozen prefix of an inflated CSATv2."""
    from timm.layers import MixedConv2d

    from inflate import finetune, split_frozen
    from inflate._examples import default_example_inputs

    net = nn.Sequential(MixedConv2d(3, 6, [3, 5], padding="same"), nn.Conv2d(6, 2, 1))
    assert [tuple(t.shape) for t in default_example_inputs(net)] == [(2, 3, 224, 224)]
    inflate_first_conv(net, 2)  # no example_input
    assert [tuple(t.shape) for t in default_example_inputs(net)] == [(2, 6, 224, 224)]
    x = torch.rand(2, 6, 8, 8)
    assert torch.equal(torch.fx.symbolic_trace(net[0])(x), net[0](x))
    csatv2 = inflate_first_conv(_tiny_csatv2().float(), 2, init="zero")
    finetune(csatv2, "last", example_input=torch.zeros(1, 6, 64, 64))
    split, x = split_frozen(csatv2), torch.rand(2, 6, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(split.tail(*split.prefix(x)), csatv2(x))
