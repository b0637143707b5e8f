"""Example inputs for any forward: positional and keyword arguments, the input named by
position or keyword, and diffusers UNets (the InstructPix2Pix construction: ``conv_in``
widened from 4 to 8 channels with zeros) exact, with their config kept in step."""

import copy

import pytest
import torch
from torch import nn

from inflate import InexactError, InflateError, find_input_layers, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent, check_inflation

D = torch.float64


class Conditioned(nn.Module):
    """A forward with a second tensor argument that is not the input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.embed = nn.Linear(1, 4)

    def forward(self, x, t, scale=1.0):
        return self.conv(x) * scale + self.embed(t)[:, :, None, None]


def test_the_input_is_the_first_tensor_unless_named():
    net = Conditioned().double()
    x, t = torch.randn(2, 3, 8, 8, dtype=D), torch.randn(2, 1, dtype=D)
    assert find_input_layers(net, (x, t)) == ["conv"]
    assert find_input_layers(net, {"x": x, "t": t}) == ["conv"]
    assert find_input_layers(net, {"t": t, "x": x}, input_arg="x") == ["conv"]
    assert find_input_layers(net, (x, t, 2.0), input_arg=0) == ["conv"]
    # the other tensor named as the input: the linear layer reads it
    assert find_input_layers(net, (x, t), input_arg=1) == ["embed"]


@pytest.mark.parametrize(("example", "input_arg", "message"), [
    ([1, 2], None, r"example_input: expected a Tensor, a tuple of positional arguments or a dict"),
    ((1.0, "a"), None, r"example_input: expected at least one tensor argument to inflate, got none"),
    ((torch.zeros(1, 3, 8, 8),), 2, r"input_arg: expected the position 2 of example_input to hold a tensor"),
    ({"x": torch.zeros(1, 3, 8, 8)}, "y", r"input_arg: expected the keyword 'y' of example_input to hold"),
    ((torch.zeros(1, 3, 8, 8),), True, r"input_arg: expected a position \(int\) or a keyword \(str\), got True"),
])
def test_example_inputs_are_validated_at_the_door(example, input_arg, message):
    net = Conditioned()
    before = net.conv.weight.clone()
    with pytest.raises(InflateError, match=message):
        inflate_first_conv(net, 2, example_input=example, input_arg=input_arg)
    assert torch.equal(net.conv.weight, before)


def test_keyword_and_positional_examples_inflate_exactly():
    net = Conditioned().double().eval()
    x1, x2 = torch.randn(2, 2, 3, 8, 8, dtype=D)
    t = torch.randn(2, 1, dtype=D)
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input={"t": t, "x": x1}, input_arg="x")
    with torch.no_grad():
        expected, got = net(x1, t), wide(torch.cat([x1, x2], 1), t)
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    with torch.no_grad():  # negative control: the second input does reach a repeat-inflated model
        rep = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", example_input=(x1, t))
        assert not torch.allclose(rep(torch.cat([x1, x2], 1), t), expected, rtol=1e-6)


diffusers = pytest.importorskip("diffusers")


def _unet(conditional: bool):
    torch.manual_seed(0)
    common = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
              "layers_per_block": 1, "norm_num_groups": 8}
    if conditional:
        return diffusers.UNet2DConditionModel(**common, cross_attention_dim=16, attention_head_dim=4,
                                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).double().eval()
    return diffusers.UNet2DModel(**common, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).double().eval()


class _Sample(nn.Module):
    """The UNet's ``.sample`` output as a plain tensor, for the assertions."""

    def __init__(self, unet, **fixed):
        super().__init__()
        self.unet, self.fixed = unet, fixed

    def forward(self, x):
        return self.unet(x, **self.fixed).sample


@pytest.mark.parametrize("conditional", [False, True])
def test_a_diffusers_unet_inflates_exactly_from_its_config_alone(conditional):
    """No example input: the config says the sample's size and channels. The zero rule gives
    the InstructPix2Pix construction: the UNet is the original on the first 4 channels."""
    unet = _unet(conditional)
    assert find_input_layers(unet) == ["conv_in"]
    zero = inflate_first_conv(copy.deepcopy(unet), 2, init="zero")
    rep = inflate_first_conv(copy.deepcopy(unet), 2, init="repeat")
    assert zero.conv_in.in_channels == 8 and zero.config.in_channels == 8 and unet.config.in_channels == 4
    fixed = {"timestep": torch.tensor([10])}
    if conditional:
        fixed["encoder_hidden_states"] = torch.randn(1, 3, 16, dtype=D)
    x1, x2 = torch.randn(2, 1, 4, 16, 16, dtype=D)
    original = _Sample(unet, **fixed)
    assert_zero_inflation_equivalent(original, _Sample(zero, **fixed), [x1, x2], compare_at=["unet.conv_in"],
                                     rtol=1e-12)
    assert_repeat_equivalent(original, _Sample(rep, **fixed), x1, 2, compare_at=["unet.conv_in"], rtol=1e-12)
    with pytest.raises(AssertionError):  # negative control: repeat is not zero-exact
        assert_zero_inflation_equivalent(original, _Sample(rep, **fixed), [x1, x2], rtol=1e-6)


def test_an_inflated_unet_saves_and_loads_through_diffusers(tmp_path):
    unet = _unet(False)
    wide = inflate_first_conv(unet, 2, init="zero")
    wide.save_pretrained(tmp_path)
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path).double().eval()
    assert loaded.config.in_channels == 8 and loaded.conv_in.in_channels == 8
    x = torch.randn(1, 8, 16, 16, dtype=D)
    with torch.no_grad():
        assert torch.equal(loaded(x, 10).sample, wide(x, 10).sample)


def _vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   latent_channels=4, norm_num_groups=4, sample_size=16).double().eval()


class _Latent(nn.Module):
    """The mean of the VAE's latent distribution, what a latent diffusion model is trained on."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae.encode(x).latent_dist.mean


@pytest.mark.parametrize("whole", [True, False], ids=["autoencoder", "encoder"])
def test_a_diffusers_vae_encoder_inflates_exactly(whole):
    """An AutoencoderKL from its config alone (``sample`` of ``sample_size``, no timestep), or its
    bare ``encoder`` with an example: ``encoder.conv_in`` widened, both rules exact at that layer
    and at the latent, the autoencoder's ``config.in_channels`` kept in step."""
    vae = _vae()
    x1, x2 = torch.randn(2, 1, 3, 16, 16, dtype=D)
    if whole:
        assert find_input_layers(vae) == ["encoder.conv_in"]
        zero = inflate_first_conv(copy.deepcopy(vae), 2, init="zero")
        rep = inflate_first_conv(copy.deepcopy(vae), 2, init="repeat")
        assert zero.config.in_channels == rep.config.in_channels == 6 and vae.config.in_channels == 3
    else:
        zero, rep = copy.deepcopy(vae), copy.deepcopy(vae)
        inflate_first_conv(zero.encoder, 2, init="zero", example_input=x1)
        inflate_first_conv(rep.encoder, 2, init="repeat", example_input=x1)
    assert zero.encoder.conv_in.in_channels == rep.encoder.conv_in.in_channels == 6
    original, at = _Latent(vae), ["vae.encoder.conv_in"]
    # the rtol of the UNets: float64 rounding through a few conv/group-norm blocks stays near 1e-15
    assert_zero_inflation_equivalent(original, _Latent(zero), [x1, x2], compare_at=at, rtol=1e-12)
    assert_repeat_equivalent(original, _Latent(rep), x1, 2, compare_at=at, rtol=1e-12)
    with pytest.raises(AssertionError):  # negative control: the second input reaches the repeat model
        assert_zero_inflation_equivalent(original, _Latent(rep), [x1, x2], compare_at=at, rtol=1e-6)
    if whole:  # and the decoded image, through the whole autoencoder
        assert_zero_inflation_equivalent(_Sample(vae), _Sample(zero), [x1, x2], rtol=1e-12)


def test_an_inflated_vae_saves_and_loads_through_diffusers(tmp_path):
    wide = inflate_first_conv(_vae(), 2, init="zero")
    wide.save_pretrained(tmp_path)
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).double().eval()
    assert loaded.config.in_channels == 6 and loaded.encoder.conv_in.in_channels == 6
    x = torch.randn(1, 6, 16, 16, dtype=D)
    assert torch.equal(_Latent(loaded)(x), _Latent(wide)(x))


def test_check_inflation_of_a_diffusers_unet_from_its_config_or_an_example():
    """No example: the config's call (sample, timestep, one token of conditioning); or the
    call as a diffusers pipeline makes it, by keyword."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                                          attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    assert set(check_inflation(unet, 2).diffs) == {"layer 'conv_in'", "output"}
    example = {"sample": torch.zeros(2, 4, 8, 8), "timestep": torch.tensor([5, 50]),
               "encoder_hidden_states": torch.randn(2, 3, 8)}
    report = check_inflation(unet, 2, init="repeat", example_input=example, input_arg="sample")
    assert report.max_relative_diff < 1e-12 and unet.conv_in.in_channels == 4


def test_a_unet_that_uses_the_channel_count_is_still_refused():
    unet = _unet(False)
    conv_in = unet.conv_in

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_in

        def forward(self, x):
            return self.conv(x / x.shape[1])

    unet.conv_in = Scaled()
    with pytest.raises(InexactError, match=r"gets 4 on the original model and 8 on the inflated one"):
        inflate_first_conv(unet, 2)
    assert conv_in.in_channels == 4 and unet.config.in_channels == 4


@pytest.mark.parametrize(("name", "in_chans"), [("resnet18", 1), ("resnet18", 4), ("vit_tiny_patch16_224", 13)])
def test_any_source_channel_count_inflates_exactly(name, in_chans):
    """Pretrained on 1 (grayscale), 4 (RGB-NIR) or 13 channels (Sentinel-2 style)."""
    timm = pytest.importorskip("timm")
    from .zoo import check

    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    diffs = check(timm.create_model(name, in_chans=in_chans, **kwargs), (in_chans, 32, 32))
    assert diffs["zero"] <= diffs["output_rtol"] and diffs["repeat"] <= diffs["output_rtol"], diffs
