"""Real architectures with random weights in float64: both equivalences to <= 1e-10 relative.

CI runs a fixed sample that covers every stem family the library claims; the full
timm and torchvision registries run behind ``-m zoo_full`` and print a summary.
"""

import contextlib
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from inflate import inflate_first_conv

from . import zoo
from .zoo import F32, PRECISIONS, D, TooBig, check, outcome

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# name -> (input shape, extra create_model kwargs, what it covers)
TIMM_SAMPLE = {
    "resnet18": ((3, 64, 64), {}, "plain 7x7 stem"),
    "resnet26d": ((3, 64, 64), {}, "deep 3-conv stem"),
    "tf_efficientnet_lite0": ((3, 64, 64), {}, "TF 'same' padding (F.pad then conv)"),
    "mobilenetv3_small_050": ((3, 64, 64), {}, "hard-swish stem, SE"),
    "regnetx_002": ((3, 64, 64), {}, "RegNet stem"),
    "convnext_atto": ((3, 64, 64), {}, "4x4 patchify conv + LayerNorm2d"),
    "vit_tiny_patch16_224": ((3, 64, 64), {"img_size": 64}, "conv patch embedding, ViT"),
    "swin_tiny_patch4_window7_224": ((3, 112, 112), {"img_size": 112}, "patch embedding + windows"),
    "repvgg_a0": ((3, 64, 64), {}, "multi-branch stem (3x3 + 1x1)"),
    "mobileone_s0": ((3, 64, 64), {}, "multi-branch reparam stem"),
    "fastvit_t8": ((3, 64, 64), {}, "MobileOne-block stem"),
    "crossvit_tiny_240": ((3, 240, 240), {}, "two patch embeddings at different scales"),
    "tresnet_m": ((3, 64, 64), {}, "space-to-depth stem"),
    "levit_128s": ((3, 224, 224), {}, "conv stem of a hybrid"),
    "ghostnet_050": ((3, 64, 64), {}, "ghost module"),
    "dla34": ((3, 64, 64), {}, "DLA base layer"),
    "inception_v3": ((3, 96, 96), {}, "Inception stem"),
    "tnt_s_patch16_224": ((3, 64, 64), {"img_size": 64}, "TNT: F.unfold pixel embedding, then a conv"),
    "csatv2": ((3, 64, 64), {}, "YCbCr DCT stem, rewritten to convert each input on its own"),
    "test_nfnet": ((3, 64, 64), {}, "weight-standardized stem (ScaledStdConv2d), standardized per input"),
    "nf_resnet26": ((3, 64, 64), {}, "NF-ResNet: ScaledStdConv2d stem"),
    "resnetv2_50x1_bit": ((3, 64, 64), {}, "BiT: StdConv2d stem"),
    "vit_tiny_r_s16_p8_224": ((3, 64, 64), {"img_size": 64}, "hybrid ViT on a BiT stem: StdConv2dSame"),
}
TV_SAMPLE = {
    "resnet18": (3, 64, 64),
    "mobilenet_v3_small": (3, 64, 64),
    "squeezenet1_1": (3, 64, 64),
    "shufflenet_v2_x0_5": (3, 64, 64),
    "mnasnet0_5": (3, 64, 64),
    "regnet_x_400mf": (3, 64, 64),
    "efficientnet_b0": (3, 64, 64),
    "densenet121": (3, 64, 64),
    "googlenet": (3, 64, 64),
    "swin_t": (3, 64, 64),
    "vit_b_16": (3, 224, 224),
    "alexnet": (3, 64, 64),
}


@pytest.mark.parametrize("name", list(TIMM_SAMPLE))
def test_timm_sample(name):
    shape, kwargs, _ = TIMM_SAMPLE[name]
    torch.manual_seed(0)
    diffs = check(timm.create_model(name, **kwargs), shape)
    assert diffs["zero"] <= diffs["output_rtol"] and diffs["repeat"] <= diffs["output_rtol"], diffs


@pytest.mark.parametrize("name", list(TV_SAMPLE))
def test_torchvision_sample(name):
    torch.manual_seed(0)
    kwargs = {"init_weights": False} if name == "googlenet" else {}  # sensitize() re-initialises anyway
    diffs = check(torchvision.models.get_model(name, weights=None, **kwargs), TV_SAMPLE[name])
    assert diffs["zero"] <= diffs["output_rtol"] and diffs["repeat"] <= diffs["output_rtol"], diffs


def _names(registry, names):
    """INFLATE_ZOO_STRIDE=k keeps every k-th name only (a quick look); INFLATE_ZOO_SHARD=i/n
    the i-th of n interleaved shards (one process each); INFLATE_ZOO_SKIP=file drops the
    ``registry:name`` lines in that file (finishing an interrupted sweep)."""
    names = names[:: int(os.environ.get("INFLATE_ZOO_STRIDE", "1"))]
    if os.environ.get("INFLATE_ZOO_SKIP"):
        with open(os.environ["INFLATE_ZOO_SKIP"]) as f:
            skip = {line.strip() for line in f}
        names = [n for n in names if f"{registry}:{n}" not in skip]
    shard, shards = (int(v) for v in os.environ.get("INFLATE_ZOO_SHARD", "0/1").split("/"))
    return names[shard::shards]


def _sweep(registry, names, build):
    """Check every model of :func:`_names`."""
    names = _names(registry, names)
    counts = {}
    for name in names:
        result = outcome(lambda: build(name))
        key = result.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
        print(f"{name:50s} {result}")
    print("summary:", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), f"(of {len(names)})")
    failures = {k: v for k, v in counts.items() if k.split(" (")[0] in ("WRONG", "ERROR")}
    assert not failures, f"the library failed on some models (see the lines marked WRONG or ERROR): {failures}"
    return counts


# float64 checks up to MAX_PARAMS, float32 checks up to MAX_PARAMS32. The inflated copies share
# every tensor outside the input layers with the model (zoo.lean_copy), so a check holds about
# one model: 2.8e9 float32 parameters are 10.4 GiB, which leaves room for the activations and a
# second sweep on a 24 GiB machine. Larger models need more memory (the GPU machine).
MAX_PARAMS = int(float(os.environ.get("INFLATE_ZOO_MAX_PARAMS", "2e8")))
MAX_PARAMS32 = int(float(os.environ.get("INFLATE_ZOO_MAX_PARAMS32", "2.8e9")))


def _precision(count):
    """The dtype to check a model of ``count`` parameters in, or TooBig."""
    if count > MAX_PARAMS32:
        raise TooBig(f"{count / 1e6:.0f}M parameters > INFLATE_ZOO_MAX_PARAMS32")
    return D if count <= MAX_PARAMS else F32


# The full sweeps build each model on the CPU and check it on INFLATE_ZOO_DEVICE (e.g. cuda, where
# models too big for float64 on the CPU fit: raise INFLATE_ZOO_MAX_PARAMS there).
DEVICE = os.environ.get("INFLATE_ZOO_DEVICE", "cpu")


def _runs(model, shape, dtype=D):
    with torch.no_grad():
        model.to(DEVICE, dtype).eval()(torch.zeros(1, *shape, dtype=dtype, device=DEVICE))
    return model, shape, dtype


def _timm_build(name):
    """Small inputs where the model allows them (img_size=64), else its own input size; in
    float64, or float32 above INFLATE_ZOO_MAX_PARAMS. With INFLATE_ZOO_OFFLOAD=folder its weights
    live in files there (zoo.offloaded): models larger than the memory, at the disk's speed."""
    dtype = _precision(zoo.meta_count(lambda: timm.create_model(name)) or 0)  # unknown: checked as small
    cfg = timm.models.get_pretrained_cfg(name)
    size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    attempts = [({"img_size": 64}, (size[0], 64, 64)), ({}, (size[0], 64, 64)), ({}, size)]
    offload = os.environ.get("INFLATE_ZOO_OFFLOAD")
    for kwargs, shape in attempts:
        try:
            with zoo.offloaded(offload, dtype) if offload else contextlib.nullcontext():
                model = timm.create_model(name, **kwargs)
            return _runs(model, shape, dtype)
        except Exception as error:  # noqa: BLE001 - try the next way to build it
            last = error.with_traceback(None)  # its frames would keep the failed model alive
    raise last


@pytest.mark.zoo_full
def test_full_timm_registry():
    _sweep("timm", timm.list_models(), _timm_build)


def _torchvision_build(name):
    """At the crop size of the model's default weights (299 for Inception), else 224."""
    try:
        size = torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0]
    except Exception:  # noqa: BLE001 - no weights metadata: the common size
        size = 224
    model = torchvision.models.get_model(name, weights=None)
    dtype = _precision(sum(p.numel() for p in model.parameters()))
    return _runs(model, (3, size if size <= 299 else 224, size if size <= 299 else 224), dtype)


@pytest.mark.zoo_full
def test_full_torchvision_classification_zoo():
    _sweep("torchvision", torchvision.models.list_models(module=torchvision.models), _torchvision_build)


def test_float32_path_of_the_big_models(monkeypatch):
    """The full sweeps check models over INFLATE_ZOO_MAX_PARAMS in float32 (see zoo.PRECISIONS):
    a small model forced through that path is exact with its negative control detected, a 0.1%
    error in the repeat rule's scale is caught, and a control that changes nothing fails."""
    monkeypatch.setitem(globals(), "MAX_PARAMS", 0)
    assert outcome(lambda: _timm_build("vit_tiny_patch16_224")) == "exact (float32)"
    model, shape, dtype = _timm_build("vit_tiny_patch16_224")
    diffs = check(model, shape, dtype=dtype)
    assert dtype == F32 and diffs["rtol"] == 1e-5 and diffs["output_rtol"] == 1e-5 * max(1, diffs["amplification"])
    assert diffs["zero"] <= diffs["output_rtol"] and diffs["repeat"] <= diffs["output_rtol"], diffs

    def off_by_a_thousandth(model, n, *, init, **kwargs):
        wide = inflate_first_conv(model, n, init=init, **kwargs)
        if init == "repeat":
            with torch.no_grad():
                wide.patch_embed.proj.weight.mul_(1.001)
        return wide

    with monkeypatch.context() as patch:
        patch.setattr(zoo, "inflate_first_conv", off_by_a_thousandth)
        result = outcome(lambda: _timm_build("vit_tiny_patch16_224"))
    assert result.startswith("WRONG (float32): inflated model is not equivalent"), result

    monkeypatch.setitem(PRECISIONS, F32, dataclasses.replace(PRECISIONS[F32], control=0.0))
    with pytest.raises(AssertionError, match="negative control not detected"):
        check(*_timm_build("vit_tiny_patch16_224")[:2], dtype=F32)


def test_the_check_copies_share_all_but_the_input_layers_and_catch_a_write_into_them(monkeypatch):
    """The inflated copies share every tensor outside the input layers with the original (one
    model's memory for the big models); an inflation that wrote into a shared tensor is caught."""
    model, shape, dtype = _timm_build("resnet18")
    copied = zoo.lean_copy(model, ["conv1"])
    assert copied.fc.weight is model.fc.weight and copied.bn1.running_mean is model.bn1.running_mean
    assert copied.conv1.weight is not model.conv1.weight
    assert torch.equal(copied.conv1.weight, model.conv1.weight)

    def writes_into_the_head(net, *args, **kwargs):
        net = real(net, *args, **kwargs)
        with torch.no_grad():
            net.fc.bias.add_(1.0)  # shared with the original
        return net

    real = zoo.inflate_first_conv
    assert outcome(lambda: (model, shape, dtype)) == "exact"
    monkeypatch.setattr(zoo, "inflate_first_conv", writes_into_the_head)
    model, shape, dtype = _timm_build("resnet18")
    result = outcome(lambda: (model, shape, dtype))
    assert result.startswith("WRONG") and "changed the original" in result, result


def test_the_sweep_driver_checks_each_model_in_its_own_process_and_resumes(tmp_path):
    """tests.zoo_sweep: one JSON line per model (outcome, parameters, seconds, peak memory), the
    size filter applied, a model already in the file skipped, a crashed model recorded."""
    import json
    import subprocess
    import sys

    from . import zoo_sweep

    out = tmp_path / "sweep.jsonl"
    out.write_text(json.dumps({"name": "resnet10t", "outcome": "exact"}) + "\n")  # done before
    names = ["resnet10t", "resnet18", "resnet50"]
    counts = {n: zoo_sweep.count("timm", n) for n in names}
    assert counts["resnet18"] == sum(p.numel() for p in timm.create_model("resnet18").parameters())
    out.with_suffix(".counts.json").write_text(json.dumps({**dict.fromkeys(timm.list_models(), 0), **counts}))
    run = subprocess.run([sys.executable, "-m", "tests.zoo_sweep", "timm", "--out", str(out), "--max-params", "2e7"],
                         capture_output=True, text=True, timeout=600, check=True, cwd=Path(__file__).parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["resnet10t", "resnet18"], run.stdout  # resnet50: 25.6M
    assert rows[1]["outcome"] == "exact" and rows[1]["params"] == counts["resnet18"]
    assert rows[1]["seconds"] > 0 and rows[1]["peak_gib"] > 0.1 and "1 to check (1 already in" in run.stdout
    # a model that takes too long (here: longer than starting Python and importing torch) is recorded
    subprocess.run([sys.executable, "-m", "tests.zoo_sweep", "timm", "--out", str(out), "--max-params", "3e7",
                    "--timeout", "1"], capture_output=True, text=True, timeout=600, check=True,
                   cwd=Path(__file__).parents[1])
    last = json.loads(out.read_text().splitlines()[-1])
    assert (last["name"], last["outcome"]) == ("resnet50", "timeout: over 1 s")
    assert len(out.read_text().splitlines()) == 3


def test_offloaded_weights_live_in_files_and_check_exact(tmp_path, monkeypatch):
    """INFLATE_ZOO_OFFLOAD: the large weights are built in the check's dtype in files (the page cache
    holds what fits), so models larger than the memory can be checked; the check is the same."""
    monkeypatch.setenv("INFLATE_ZOO_OFFLOAD", str(tmp_path))
    model, shape, dtype = _timm_build("resnet18")
    backed = {n for n, p in model.named_parameters() if p.untyped_storage().filename}
    assert "layer4.1.conv2.weight" in backed and "fc.weight" not in backed  # 2.4M and 0.5M elements
    assert dtype == D and model.layer4[1].conv2.weight.dtype == D and not list(tmp_path.iterdir())
    assert outcome(lambda: (model, shape, dtype)) == "exact"
