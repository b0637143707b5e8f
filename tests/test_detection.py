"""torchvision detection models: images are a list of ``(C, H, W)`` tensors that the model's
``GeneralizedRCNNTransform`` normalises with the Python lists ``image_mean``/``image_std``,
resizes and copies into a padded batch. Discovery follows them through all of it; the lists
are widened per input; both rules exact in float64, RGB-D (``channels=[3, 1]``) included."""

import copy

import pytest
import torch
from torch import nn

from inflate import InexactError, inflate_first_conv

detection = pytest.importorskip("torchvision.models.detection")

D = torch.float64
#: Detection outputs pass through box decoding, NMS and top-k; the zero rule adds exact zeros
#: (bit-identical in practice), the repeat rule sums two halves (a few ulps): 1e-10 leaves room
#: for rounding and none for a wrong stem or normaliser (their errors are of order 1).
RTOL = 1e-10

_SMALL = {"min_size": 32, "max_size": 48, "num_classes": 3, "weights": None, "weights_backbone": None}
_RCNN = {**_SMALL, "box_score_thresh": 0.0, "box_detections_per_img": 10, "rpn_pre_nms_top_n_test": 30,
         "rpn_post_nms_top_n_test": 30}
_DENSE = {**_SMALL, "score_thresh": 0.0, "detections_per_img": 10}

#: builder -> keyword arguments: small images, every box kept (a random-init model scores low)
DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_fpn": _RCNN,
    # one box per image: the mask and keypoint heads run 4 and 8 convs of 256 and 512 channels on each
    "maskrcnn_resnet50_fpn": {**_RCNN, "box_detections_per_img": 1},
    "keypointrcnn_resnet50_fpn": {**_RCNN, "box_detections_per_img": 1},
    "retinanet_resnet50_fpn": _DENSE,
    "fcos_resnet50_fpn": _DENSE,
    "ssdlite320_mobilenet_v3_large": {k: v for k, v in _DENSE.items() if k not in ("min_size", "max_size")},
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(detection, name)(**DETECTORS[name]).to(D).eval()
    if name.startswith("ssd"):
        model.transform.fixed_size = (64, 64)  # SSD resizes to a fixed size: 320 by default
    return model


def _images(channels: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(channels, 30, 40, dtype=D, generator=g), torch.rand(channels, 24, 36, dtype=D, generator=g)]


def _assert_same(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        assert b["boxes"].shape[0] > 0  # something was detected: the comparison is not empty
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=RTOL)


def _stem(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", list(DETECTORS))
def test_torchvision_detectors_inflate_exactly(name):
    model = _build(name)
    x1, x2 = _images(), _images(seed=1)
    with torch.no_grad():
        before = model(x1)
    zero = inflate_first_conv(copy.deepcopy(model), 2, init="zero", example_input=(x1,))
    assert _stem(zero).in_channels == 6 and len(zero.transform.image_mean) == len(zero.transform.image_std) == 6
    with torch.no_grad():
        _assert_same(zero([torch.cat([a, b]) for a, b in zip(x1, x2)]), before)
    rep = inflate_first_conv(model, 2, init="repeat", example_input=(x1,))
    with torch.no_grad():
        _assert_same(rep([torch.cat([a, a]) for a in x1]), before)


def test_a_detector_inflated_by_hand_cannot_read_its_new_input():
    """Negative control: the stem widened as timm's adapt_input_conv would, the transform's
    3-value normaliser left alone: the detector fails on its first 6-channel image."""
    model = _build("fasterrcnn_mobilenet_v3_large_fpn")
    stem = _stem(model)
    with torch.no_grad():
        stem.weight = nn.Parameter(torch.cat([stem.weight, torch.zeros_like(stem.weight)], 1))
    stem.in_channels = 6
    with pytest.raises(RuntimeError, match="size of tensor a \\(6\\) must match"), torch.no_grad():
        model([torch.cat([x, x]) for x in _images()])


def test_an_rgbd_detector_reads_rgb_like_the_original_whatever_the_depth():
    model = _build("fasterrcnn_mobilenet_v3_large_fpn")
    rgb, depth = _images(), _images(1, seed=2)
    with torch.no_grad():
        before = model(rgb)
    inflate_first_conv(model, 2, init="zero", channels=[3, 1], example_input=(rgb,))
    assert model.transform.image_mean == pytest.approx([0.485, 0.456, 0.406, (0.485 + 0.456 + 0.406) / 3])
    with torch.no_grad():
        _assert_same(model([torch.cat([a, d]) for a, d in zip(rgb, depth)]), before)


def test_a_transform_whose_normaliser_is_also_read_elsewhere_is_refused():
    model = _build("fasterrcnn_mobilenet_v3_large_fpn")
    transform = model.transform
    normalize = transform.normalize

    def also_summed(image):  # the same list read a second time, for something else
        return normalize(image) * torch.as_tensor(transform.image_mean, dtype=image.dtype).sum()

    transform.normalize = also_summed
    with pytest.raises(InexactError, match=r"'transform.image_mean' is applied to the input channel by channel"):
        inflate_first_conv(model, 2, example_input=(_images(),))
    assert len(model.transform.image_mean) == 3 and _stem(model).in_channels == 3
