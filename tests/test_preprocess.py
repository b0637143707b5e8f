"""inflate_normalization: the preprocessing people already use keeps matching the inflated model."""

import pytest
import torch

from inflate import InflateError, inflate_normalization

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_torchvision_normalize_and_compose_normalize_each_input_as_before():
    transforms = pytest.importorskip("torchvision.transforms")
    from torchvision.transforms import v2

    x1, x2 = torch.rand(2, 3, 8, 8)
    for make in (transforms.Normalize, v2.Normalize):
        single = make(MEAN, STD)
        wide = inflate_normalization(transforms.Compose([make(MEAN, STD)]), 2)
        got = wide(torch.cat([x1, x2]))
        assert torch.equal(got, torch.cat([single(x1), single(x2)]))
        assert not torch.equal(got, torch.cat([single(x1), x2]))  # negative control: input 2 is normalised


def test_dicts_and_mixed_channel_counts():
    cfg = {"mean": tuple(MEAN), "std": tuple(STD), "input_size": (3, 224, 224)}
    inflate_normalization(cfg, 2, channels=(3, 1))
    assert cfg["mean"] == (*MEAN, sum(MEAN) / 3) and len(cfg["std"]) == 4 and isinstance(cfg["mean"], tuple)


def test_a_hugging_face_image_processor_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    processor = transformers.ViTImageProcessor(image_mean=MEAN, image_std=STD)
    inflate_normalization(processor, 3)
    assert list(processor.image_mean) == MEAN * 3
    processor.save_pretrained(tmp_path)
    assert list(transformers.ViTImageProcessor.from_pretrained(tmp_path).image_std) == STD * 3


@pytest.mark.parametrize(("transform", "kwargs", "message"), [
    (object(), {}, r"transform: expected an image processor, a Normalize, a Compose or a dict"),
    ({"mean": MEAN, "std": STD[:2]}, {}, r"dict.mean/std: expected one value per channel in each, got 3 and 2"),
    ({"mean": MEAN, "std": STD}, {"channels": (3,)}, r"channels: expected 2 counts >= 1"),
    ({"mean": MEAN, "std": STD}, {"num_inputs": 0}, r"num_inputs: expected an int >= 1, got 0"),
])
def test_invalid_arguments_change_nothing(transform, kwargs, message):
    before = dict(transform) if isinstance(transform, dict) else None
    with pytest.raises(InflateError, match=message):
        inflate_normalization(transform, **{"num_inputs": 2, **kwargs})
    if before is not None:
        assert transform == before
