"""inflate.testing checks itself: deliberately wrong inflations must be caught, with a useful message."""

import copy
import importlib.metadata
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from torch import nn

from inflate import InflateError, inflate_first_conv
from inflate.testing import (
    assert_repeat_equivalent,
    assert_zero_inflation_equivalent,
    check_inflation,
    conv_nets,
    default_rtol,
)

pytest_plugins = ["pytester"]
D = torch.float64


def _pair():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)).to(D).eval()
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="zero")
    xs = list(torch.randn(2, 2, 3, 8, 8, dtype=D))
    return net, wide, xs


def test_a_correct_inflation_passes_and_reports_per_place():
    net, wide, xs = _pair()
    report = assert_zero_inflation_equivalent(net, wide, xs, compare_at=["0"])
    assert set(report.diffs) == {"layer '0'", "output"} and report.max_relative_diff < 1e-14


def test_one_perturbed_weight_is_caught_with_where_and_how_much():
    net, wide, xs = _pair()
    with torch.no_grad():
        wide[0].weight[2, 1, 0, 0] += 1e-6
    with pytest.raises(AssertionError) as info:
        assert_zero_inflation_equivalent(net, wide, xs, compare_at=["0"])
    message = str(info.value)
    assert "layer '0': relative L2 difference" in message and "largest at index (" in message
    assert "> rtol 1.0e-10" in message and "output:" in message


def test_a_changed_bias_is_caught():
    net, wide, xs = _pair()
    with torch.no_grad():
        wide[0].bias[0] += 1e-7
    with pytest.raises(AssertionError, match=r"layer '0'"):
        assert_zero_inflation_equivalent(net, wide, xs, compare_at=["0"])


def test_the_wrong_input_slot_is_caught():
    net, _, xs = _pair()
    swapped = inflate_first_conv(copy.deepcopy(net), 2, init=lambda k, i, c: k * 0 if i == 0 else k)
    with pytest.raises(AssertionError, match="output: relative L2 difference"):
        assert_zero_inflation_equivalent(net, swapped, xs)  # the kernel reads slot 2 instead of slot 1


def test_unscaled_repeat_fails_the_repeat_guarantee():
    net, _, xs = _pair()
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="repeat", scale=False)
    with pytest.raises(AssertionError):
        assert_repeat_equivalent(net, wide, xs[0], 2)


def test_shape_mismatch_is_reported():
    net, _, xs = _pair()
    other = nn.Sequential(nn.Conv2d(6, 6, 3), nn.Flatten()).to(D)
    with pytest.raises(AssertionError, match=r"output: expected shape \(2, 2, 6, 6\), got \(2, 216\)"):
        assert_zero_inflation_equivalent(net, other, xs)


def test_default_tolerances_per_dtype():
    assert default_rtol(torch.float64) == 1e-10
    assert default_rtol(torch.float32) == 1e-4
    assert default_rtol(torch.float16) == default_rtol(torch.bfloat16) == 2e-2


def test_check_inflation_does_not_touch_the_model_and_catches_a_broken_rule(monkeypatch):
    net, _, _ = _pair()
    state = copy.deepcopy(net.state_dict())
    assert check_inflation(net, 3, init="repeat", example_input=torch.zeros(1, 3, 8, 8)).max_relative_diff < 1e-12
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    import inflate.rules as weights

    real = weights.inflate_kernel
    monkeypatch.setattr("inflate._surgery.inflate_kernel",
                        lambda k, ch, init, scale: real(k, ch, init, scale) * (1 + 1e-9))
    with pytest.raises(AssertionError, match="relative L2 difference"):
        check_inflation(net, 2, init="zero", example_input=torch.zeros(1, 3, 8, 8))


class _Conditioned(nn.Module):
    """A forward with a second tensor argument (a condition) and two outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.embed = nn.Linear(1, 4)

    def forward(self, x, t):
        y = self.conv(x) + self.embed(t)[:, :, None, None]
        return y, y.mean((2, 3))


@pytest.mark.parametrize(("example", "input_arg"), [
    ((torch.zeros(2, 3, 8, 8), torch.ones(2, 1)), None),
    ({"t": torch.ones(2, 1), "x": torch.zeros(2, 3, 8, 8)}, "x"),
    ((torch.zeros(2, 3, 8, 8), torch.ones(2, 1)), 0),
], ids=["positional", "keyword", "position"])
@pytest.mark.parametrize("init", ["zero", "repeat"])
def test_check_inflation_takes_the_example_forms_inflate_first_conv_takes(example, input_arg, init, monkeypatch):
    torch.manual_seed(0)
    net = _Conditioned()
    report = check_inflation(net, 2, init=init, example_input=example, input_arg=input_arg)
    assert set(report.diffs) == {"layer 'conv'", "output[0]", "output[1]"} and report.max_relative_diff < 1e-12
    import inflate.rules as weights

    real = weights.inflate_kernel  # negative control: one part in a billion off is caught
    monkeypatch.setattr("inflate._surgery.inflate_kernel",
                        lambda k, ch, init, scale: real(k, ch, init, scale) * (1 + 1e-9))
    with pytest.raises(AssertionError, match=r"layer 'conv': relative L2 difference"):
        check_inflation(net, 2, init=init, example_input=example, input_arg=input_arg)


def test_the_assertions_call_the_models_with_the_other_arguments():
    torch.manual_seed(0)
    net = _Conditioned().to(D).eval()
    wide = inflate_first_conv(copy.deepcopy(net), 2, init="zero", example_input=(torch.zeros(1, 3, 8, 8, dtype=D),
                                                                                 torch.zeros(1, 1, dtype=D)))
    x1, x2 = torch.randn(2, 2, 3, 8, 8, dtype=D)
    t = torch.randn(2, 1, dtype=D)
    example = {"x": torch.empty(0), "t": t}  # the input's placeholder is replaced, whatever it holds
    report = assert_zero_inflation_equivalent(net, wide, [x1, x2], example_input=example, input_arg="x")
    assert report.max_relative_diff < 1e-14
    report = assert_repeat_equivalent(net, inflate_first_conv(copy.deepcopy(net), 2, example_input=(x1, t)), x1, 2,
                                      example_input=(x1, t), compare_at=["conv"])
    assert set(report.diffs) == {"layer 'conv'", "output[0]", "output[1]"} and report.max_relative_diff < 1e-14
    with torch.no_grad():  # negative control: the condition's path changed by one part in a million
        wide.embed.bias[0] += 1e-6
    with pytest.raises(AssertionError, match=r"output\[1\]: relative L2 difference"):
        assert_zero_inflation_equivalent(net, wide, [x1, x2], example_input=example, input_arg="x")
    with pytest.raises(InflateError, match=r"input_arg: expected the keyword 'y' of example_input"):
        assert_zero_inflation_equivalent(net, wide, [x1, x2], example_input=example, input_arg="y")


@given(conv_nets())
def test_strategy_networks_run_and_are_in_eval_mode_float64(net):
    assert not net.training and all(p.dtype == D for p in net.parameters())
    out = net(torch.randn(1, *net.input_shape, dtype=D))
    assert torch.isfinite(out).all()


def test_pytest_plugin_gives_a_three_line_test(pytester):
    pytester.makepyfile(
        """
        import torch, torch.nn as nn
        def test_mine(check_inflation):
            check_inflation(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, example_input=torch.zeros(1, 3, 8, 8))
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    # control: with the plugin switched off the fixture does not exist, so the test above used it
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:inflate")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'check_inflation' not found*"])


def _imported_after(statement):
    """The heavy modules that ``statement`` imports in a fresh interpreter."""
    heavy = "('torch', 'hypothesis', 'inflate')"
    probe = f"import sys; {statement}; print(sorted(m for m in {heavy} if sys.modules.get(m)))"
    result = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_pytest_plugin_is_registered_and_imports_neither_torch_nor_inflate():
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert plugins.get("inflate") == "_inflate_pytestplugin", plugins  # the installed metadata is current
    assert _imported_after("import _inflate_pytestplugin") == "[]"
    # control: the probe sees torch when something does import it
    assert _imported_after("import inflate.testing") == "['hypothesis', 'inflate', 'torch']"


def test_inflate_testing_without_hypothesis_says_which_extra_to_install():
    blocked = "sys.modules['hypothesis'] = None"  # makes `import hypothesis` raise ImportError
    code = f"""import sys; {blocked}
try:
    import inflate.testing
except ImportError as err:
    print(err)
"""
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'expected the \'hypothesis\' package' in result.stdout
    assert 'pip install "torch-inflate[testing]"' in result.stdout
    # control: the core package does not need Hypothesis
    assert _imported_after(f"{blocked}; import inflate") == "['inflate', 'torch']"
