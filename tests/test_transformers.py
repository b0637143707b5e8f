"""Hugging Face transformers vision models, built from tiny random configs: both rules exact,
the default example input read from ``config.image_size``, ``config.num_channels`` and the
embeddings' ``num_channels`` check kept in step, and ``save_pretrained``/``from_pretrained``
rebuilding the inflated model. A model whose config would not rebuild it is refused."""

import copy

import pytest
import torch
from torch import nn

from inflate import InexactError, find_input_layers, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent

T = pytest.importorskip("transformers")

D = torch.float64
#: float64 rounding through a few attention/conv blocks stays near 1e-15; 1e-10 leaves room
#: for it and none for a wrong block (a 2x error at the stem is a relative error of 1).
RTOL = 1e-10

_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
        "image_size": 32, "patch_size": 8}
_STAGES = {"hidden_sizes": [8, 16], "depths": [1, 1]}
_SEGFORMER = {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [8, 16],
              "patch_sizes": [7, 3], "strides": [4, 2], "num_attention_heads": [1, 2], "mlp_ratios": [2, 2]}

#: name -> (model class name, config class name, config kwargs)
ARCHS = {
    "vit": ("ViTModel", "ViTConfig", _VIT),
    "vit-classifier": ("ViTForImageClassification", "ViTConfig", {**_VIT, "num_labels": 3}),
    "deit": ("DeiTModel", "DeiTConfig", _VIT),
    "dinov2": ("Dinov2Model", "Dinov2Config", _VIT),
    "beit": ("BeitModel", "BeitConfig", {**_VIT, "vocab_size": 10}),
    "convnext": ("ConvNextModel", "ConvNextConfig", {**_STAGES, "num_stages": 2, "image_size": 32}),
    "resnet": ("ResNetForImageClassification", "ResNetConfig", {**_STAGES, "embedding_size": 8, "num_labels": 3}),
    "regnet": ("RegNetModel", "RegNetConfig", {**_STAGES, "embedding_size": 8, "groups_width": 8}),
    "swin": ("SwinModel", "SwinConfig", {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1],
                                         "num_heads": [2, 2], "window_size": 4}),
    "levit": ("LevitModel", "LevitConfig", {"image_size": 64, "hidden_sizes": [16, 32, 48], "depths": [1, 1, 1],
                                            "num_attention_heads": [1, 2, 3], "key_dim": [8, 8, 8]}),
    # vision towers of image-text models
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", _VIT),
    "clip-projection": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", {**_VIT, "projection_dim": 8}),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", _VIT),
    # dense prediction: hierarchical encoders and their heads
    "segformer": ("SegformerModel", "SegformerConfig", _SEGFORMER),
    "segformer-segmentation": ("SegformerForSemanticSegmentation", "SegformerConfig",
                               {**_SEGFORMER, "decoder_hidden_size": 16, "num_labels": 3}),
    "dpt": ("DPTModel", "DPTConfig", {**_VIT, "add_pooling_layer": False}),
    "dpt-depth": ("DPTForDepthEstimation", "DPTConfig", {**_VIT, "num_hidden_layers": 4, "backbone_out_indices": [0, 1, 2, 3],
                                                         "neck_hidden_sizes": [8, 8, 8, 8], "fusion_hidden_size": 8,
                                                         "head_hidden_size": 8}),
    "pvt": ("PvtModel", "PvtConfig", {"image_size": 32, "num_encoder_blocks": 2, "depths": [1, 1], "hidden_sizes": [8, 16],
                                      "sequence_reduction_ratios": [2, 1], "patch_sizes": [4, 2], "strides": [4, 2],
                                      "num_attention_heads": [1, 2], "mlp_ratios": [2, 2]}),
    "yolos": ("YolosModel", "YolosConfig", {**_VIT, "image_size": [32, 32], "num_detection_tokens": 2}),
    # more classification backbones
    "dinov2-registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", _VIT),
    "convnextv2": ("ConvNextV2Model", "ConvNextV2Config", {**_STAGES, "num_stages": 2, "image_size": 32}),
    "swinv2": ("Swinv2Model", "Swinv2Config", {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1],
                                               "num_heads": [2, 2], "window_size": 4}),
    "focalnet": ("FocalNetModel", "FocalNetConfig", {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 1],
                                                     "hidden_sizes": [16, 32]}),
    "mobilevit": ("MobileViTModel", "MobileViTConfig", {"image_size": 32, "hidden_sizes": [16, 24, 32],
                                                        "neck_hidden_sizes": [8, 8, 8, 16, 16, 24, 32],
                                                        "num_attention_heads": 2}),
    "mobilenet-v2": ("MobileNetV2Model", "MobileNetV2Config", {"image_size": 32, "depth_multiplier": 0.25}),
}



def _build(name: str) -> nn.Module:
    model_cls, config_cls, kwargs = ARCHS[name]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, config_cls)(**kwargs)).double().eval()
    # Random init can leave a model nearly blind to its input (layer scales of 1e-6, weights
    # of std 0.02 that shrink LeViT's four-conv stem output to 1e-9 of the biases): rescale
    # conv and linear weights to unit gain and perturb scales and norms, so that a wrong
    # stem really shows at the output.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0, module.weight[0].numel() ** -0.5)
        for pname, p in model.named_parameters():
            if "layer_scale" in pname or "lambda" in pname or "norm" in pname.lower():
                p.copy_(0.5 + torch.rand_like(p))
    return model


def _size(model: nn.Module) -> int:
    size = getattr(model.config, "image_size", 32)
    return size[0] if isinstance(size, (tuple, list)) else size


class _Out(nn.Module):
    """The model's head output (``logits``, ``predicted_depth``, ``image_embeds``) or else its
    ``last_hidden_state`` as a plain tensor, for the assertions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(pixel_values=x)
        return next(getattr(out, key) for key in ("logits", "predicted_depth", "image_embeds", "last_hidden_state")
                    if getattr(out, key, None) is not None)


@pytest.mark.parametrize("name", list(ARCHS))
def test_transformers_models_inflate_exactly_from_their_config_alone(name):
    """No example input: the config says the image size. Both rules exact, at the widened
    layer and at the output; the config and the embeddings' check say the new count."""
    model = _build(name)
    (stem,) = find_input_layers(model, {"pixel_values": torch.randn(1, 3, _size(model), _size(model), dtype=D)})
    zero = inflate_first_conv(copy.deepcopy(model), 2, init="zero")
    rep = inflate_first_conv(copy.deepcopy(model), 2, init="repeat")
    assert model.config.num_channels == 3
    counts = {n: m.num_channels for n, m in model.named_modules() if isinstance(getattr(m, "num_channels", None), int)}
    for wide in (zero, rep):
        assert wide.config.num_channels == 6
        # the embeddings' check of the input's channel count says 6 (Swin has none); the later
        # stages' patch embeddings of PVT or FocalNet check their own input's count, kept
        assert {n: wide.get_submodule(n).num_channels for n in counts} == {n: 6 if c == 3 else c
                                                                          for n, c in counts.items()}
    x1, x2 = torch.randn(2, 1, 3, _size(model), _size(model), dtype=D)
    original, at = _Out(model), [f"model.{stem}"]
    assert_zero_inflation_equivalent(original, _Out(zero), [x1, x2], compare_at=at, rtol=RTOL)
    assert_repeat_equivalent(original, _Out(rep), x1, 2, compare_at=at, rtol=RTOL)
    with pytest.raises(AssertionError):  # negative control: the second input reaches the repeat model
        assert_zero_inflation_equivalent(original, _Out(rep), [x1, x2], rtol=1e-6)


@pytest.mark.parametrize("name", ["vit-classifier", "convnext", "clip", "siglip", "segformer"])
def test_an_inflated_transformers_model_saves_and_loads(name, tmp_path):
    model = _build(name)
    wide = inflate_first_conv(model, 2, init="zero", channels=(3, 1))
    wide.save_pretrained(tmp_path)
    loaded = type(wide).from_pretrained(tmp_path).double().eval()
    assert loaded.config.num_channels == 4
    saved, back = wide.state_dict(), loaded.state_dict()
    assert set(back) == set(saved) and all(torch.equal(back[k], saved[k]) for k in saved)
    x = torch.randn(2, 4, _size(model), _size(model), dtype=D)
    # the same weights; the loaded model may take other kernel paths (transformers 5.24 differs
    # in the last bit of a float64 ViT's output), so the outputs agree to rounding, not bit for bit
    torch.testing.assert_close(_Out(loaded)(x), _Out(wide)(x), rtol=1e-12, atol=1e-12)


def test_a_config_that_would_not_rebuild_the_inflated_model_is_refused():
    """A masked-image-modeling head sizes its pixel decoder by ``num_channels`` too: the
    inflated model would save but not load. Refused, with the model unchanged."""
    torch.manual_seed(0)
    model = T.ViTForMaskedImageModeling(T.ViTConfig(**_VIT, encoder_stride=8)).double().eval()
    before = model.vit.embeddings.patch_embeddings.projection.weight
    with pytest.raises(InexactError, match=r"from_pretrained would not rebuild.*decoder\.0\.weight"):
        inflate_first_conv(model, 2)
    assert model.vit.embeddings.patch_embeddings.projection.weight is before
    assert model.config.num_channels == 3 and model.vit.embeddings.patch_embeddings.num_channels == 3


@pytest.mark.parametrize("padding", ["SAME", None])
def test_a_weight_standardized_stem_is_exact_but_refused_where_from_pretrained_would_rebuild_it(padding, tmp_path):
    """BiT standardizes its stem weight in the forward. Widened, the stem standardizes each
    input's block on its own (inflate._standardized): exact under both rules, shown on the bare
    embedder. The whole BitModel is refused, untouched: save_pretrained/from_pretrained would
    rebuild a plain ``N*C``-channel WeightStandardizedConv2d, which standardizes over the whole
    fan-in -- the negative control below builds exactly that and shows it differs."""
    torch.manual_seed(0)
    config = T.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2, global_padding=padding)
    model = T.BitModel(config).double().eval()
    example = {"pixel_values": torch.randn(1, 3, 32, 32, dtype=D)}
    stem = model.embedder.convolution
    with pytest.raises(InexactError, match=r"'embedder.convolution' \(WeightStandardizedConv2d\) would standardize "
                                           r"each input's block.*BitModel.from_pretrained"):
        inflate_first_conv(model, 2, init="zero", example_input=example)
    assert model.config.num_channels == 3 and model.embedder.convolution is stem and stem.in_channels == 3

    x1, x2 = torch.randn(2, 1, 3, 32, 32, dtype=D)
    zero = inflate_first_conv(copy.deepcopy(stem), 2, init="zero", example_input=x1)  # the bare layer
    rep = inflate_first_conv(copy.deepcopy(stem), 2, init="repeat", example_input=x1)
    assert isinstance(zero, T.models.bit.modeling_bit.WeightStandardizedConv2d)
    assert_zero_inflation_equivalent(stem, zero, [x1, x2], rtol=RTOL)
    assert_repeat_equivalent(stem, rep, x1, 2, rtol=RTOL)

    # negative control: what from_pretrained would give -- the inflated weights in a plain 6-channel BiT
    wide = copy.deepcopy(model)
    wide.embedder.convolution, wide.embedder.num_channels, wide.config.num_channels = zero, 6, 6
    wide.save_pretrained(tmp_path)
    plain = T.BitModel.from_pretrained(tmp_path).double().eval()
    x = torch.cat([x1, x2], 1)
    with torch.no_grad():
        assert not torch.allclose(_Out(plain)(x), _Out(wide)(x), rtol=1e-3)


def test_discovery_leaves_a_model_that_never_ran_as_it_was():
    """Finding the input layers must not change the model. Here the trace is the model's first
    forward: transformers installs its output-capturing hooks and marks the model as hooked.
    Were the mark's absence restored but the hooks kept (as inflate once did), the next forward
    would install them a second time and the decode head would get four hidden states, not two."""
    model = _build("segformer-segmentation")
    untouched = copy.deepcopy(model)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    find_input_layers(model)
    x = torch.randn(1, 3, 32, 32, dtype=D)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    assert torch.equal(_Out(model)(x), _Out(untouched)(x))
