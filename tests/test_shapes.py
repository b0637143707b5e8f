"""The meta-output shortcuts of ``inflate._shapes`` agree with PyTorch's own meta kernels.

Every case runs the shortcut and, where it applies, :func:`inflate._shapes.check` (the real
meta kernel: same shape, dtype, strides of axes longer than 1, in place or not). Each rule
must apply to at least one case, and the odd cases (mixed dtypes, overlapping strides,
``out=``-like keywords) must fall through to PyTorch. The whole suite also runs with
``shapes.CHECK`` on (``tests/conftest.py``), so every model any test traces checks them too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from inflate import _shapes as shapes


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


X = meta(2, 8, 5, 6)
CL = X.contiguous(memory_format=torch.channels_last)
NHWC = meta(2, 5, 6, 8).permute(0, 3, 1, 2)  # dense, permuted
SLICE = meta(2, 16, 5, 6)[:, ::2]  # not dense
C8 = meta(8)
T = torch.Tensor

APPLIES = [
    ("bn", F.batch_norm, (X, C8, C8, C8, C8), {"training": True}),
    ("bn channels_last", F.batch_norm, (CL, C8, C8), {}),
    ("bn permuted", F.batch_norm, (NHWC, None, None), {"training": True}),
    ("bn half", F.batch_norm, (X.half(), None, None), {"training": True}),
    ("gn", F.group_norm, (X, 2, C8, C8), {}),
    ("gn channels_last", F.group_norm, (CL, 4), {}),
    ("gn permuted", F.group_norm, (NHWC, 1, C8, None), {}),
    ("ln", F.layer_norm, (meta(2, 7, 8), (8,), C8, C8), {}),
    ("ln permuted", F.layer_norm, (NHWC.permute(0, 2, 3, 1), (8,)), {}),
    ("linear", F.linear, (meta(2, 7, 8), meta(4, 8), meta(4)), {}),
    ("linear 1d", F.linear, (meta(8), meta(4, 8)), {}),
    ("linear permuted", F.linear, (NHWC.permute(0, 2, 3, 1), meta(4, 8)), {}),
    ("conv2d", torch.conv2d, (X, meta(4, 8, 3, 3), meta(4), 2, 1), {}),
    ("conv2d tuples", torch.conv2d, (X, meta(4, 8, 3, 1)), {"stride": (1, 2), "padding": (2, 0), "dilation": (2, 1)}),
    ("conv2d same", torch.conv2d, (X, meta(4, 8, 3, 3), None, 1, "same"), {}),
    ("conv2d valid", torch.conv2d, (X, meta(4, 8, 3, 3), None, 1, "valid"), {}),
    ("conv2d groups", torch.conv2d, (X, meta(8, 2, 3, 3), None, 1, 1, 1, 4), {}),
    ("conv1d", torch.conv1d, (meta(2, 3, 17), meta(5, 3, 4), None, 3), {}),
    ("conv3d", torch.conv3d, (meta(1, 3, 4, 9, 9), meta(5, 3, 2, 3, 3), None, (1, 2, 2)), {}),
    ("conv2d channels_last", torch.conv2d, (CL, meta(4, 8, 3, 3)), {}),
    ("conv2d channels_last weight", torch.conv2d, (X, meta(4, 8, 3, 3).contiguous(memory_format=torch.channels_last)),
     {}),
    ("conv3d channels_last", torch.conv3d, (meta(2, 8, 3, 5, 6).contiguous(memory_format=torch.channels_last_3d),
                                            meta(4, 8, 1, 3, 3)), {}),
    ("adaptive pool", F.adaptive_avg_pool2d, (X, 1), {}),
    ("adaptive pool channels_last", F.adaptive_avg_pool2d, (CL, (2, 3)), {}),
    ("adaptive pool None", F.adaptive_avg_pool2d, (meta(8, 5, 6), (None, 3)), {}),
    ("adaptive pool 1d", F.adaptive_avg_pool1d, (meta(2, 8, 9), 4), {}),
    ("adaptive pool 3d", F.adaptive_avg_pool3d, (meta(2, 8, 3, 5, 6), (1, 2, 2)), {}),
    ("max pool", F.max_pool2d, (X, 3, 2, 1), {}),
    ("max pool ceil", F.max_pool2d, (meta(2, 8, 7, 9), 2), {"ceil_mode": True}),
    ("max pool ceil edge", F.max_pool2d, (meta(2, 8, 5, 5), 2, 2, 1), {"ceil_mode": True}),
    ("max pool dilation channels_last", F.max_pool2d, (CL, (3, 2), (1, 2), (1, 0), 2), {}),
    ("max pool 1d", F.max_pool1d, (meta(2, 8, 11), 3), {}),
    ("max pool 3d", F.max_pool3d, (meta(2, 8, 4, 6, 6), 2), {}),
    ("avg pool", F.avg_pool2d, (X, 2), {}),
    ("avg pool ceil pad", F.avg_pool2d, (meta(2, 8, 7, 9), 3, 2, 1, True, False), {}),
    ("avg pool 1d", F.avg_pool1d, (meta(2, 8, 11), 3, 2), {}),
    ("avg pool 3d", F.avg_pool3d, (meta(2, 8, 4, 6, 6), 2), {}),
    ("sdpa", F.scaled_dot_product_attention, (meta(2, 3, 10, 16),) * 3, {}),
    ("sdpa transposed", F.scaled_dot_product_attention, (meta(2, 10, 3, 16).transpose(1, 2),) * 2
     + (meta(2, 3, 10, 8),), {"is_causal": True}),
    ("matmul", T.matmul, (meta(2, 3, 4, 5), meta(2, 3, 5, 6)), {}),
    ("mean keepdim", T.mean, (X, (2, 3), True), {}),
    ("mean dim", torch.mean, (X, -1), {}),
    ("mean list", T.mean, (X, [1, 3]), {"keepdim": False}),
    ("gelu", F.gelu, (NHWC,), {}),
    ("silu", F.silu, (X,), {}),
    ("silu inplace", F.silu, (X, True), {}),
    ("relu inplace kw", F.relu, (CL,), {"inplace": True}),
    ("relu6", F.relu6, (X,), {}),
    ("hardswish", F.hardswish, (X,), {}),
    ("leaky_relu inplace", F.leaky_relu, (X, 0.1, True), {}),
    ("hardtanh", F.hardtanh, (X, -2.0, 2.0), {}),
    ("elu inplace", F.elu, (X, 1.0, True), {}),
    ("sigmoid", torch.sigmoid, (X,), {}),
    ("sigmoid method", T.sigmoid, (NHWC,), {}),
    ("relu_", torch.relu_, (X,), {}),
    ("add", T.add, (X, meta(2, 8, 5, 6)), {}),
    ("add alpha", torch.add, (X, X), {"alpha": 2}),
    ("mul broadcast", T.mul, (X, meta(2, 8, 1, 1)), {}),
    ("mul broadcast into b", T.mul, (meta(8, 1, 1), NHWC), {}),
    ("mul permuted", T.mul, (NHWC, meta(1, 8, 1, 1)), {}),
    ("mul channels_last, contiguous", T.mul, (CL, X), {}),
    ("sub scalar", T.sub, (X, 1), {}),
    ("div float", T.div, (NHWC, 3.0), {}),
    ("add_", T.add_, (meta(2, 8, 5, 6), X), {}),
    ("dropout eval", F.dropout, (NHWC,), {"p": 0.2, "training": False, "inplace": False}),
    ("dropout p=0", F.dropout, (X, 0.0), {}),
    ("dropout train", F.dropout, (CL,), {"p": 0.5, "training": True, "inplace": False}),
    ("dropout train permuted", F.dropout, (NHWC, 1.0), {}),
    ("dropout inplace", F.dropout, (X, 0.5, True, True), {}),
    ("cat", torch.cat, ([meta(2, 1, 8).expand(2, 1, 8), meta(2, 5, 8)], 1), {}),
    ("cat negative dim", torch.cat, ((meta(2, 3), meta(2, 4)),), {"dim": -1}),
    ("cat 4d", torch.cat, ([X, meta(2, 3, 5, 6)], 1), {}),
    ("reshape copying", T.reshape, (meta(2, 12, 10, 64).transpose(1, 2), 2, 10, 768), {}),
    ("reshape copying -1", T.reshape, (meta(2, 12, 10, 64).transpose(1, 2), (2, -1, 768)), {}),
    ("reshape copying permuted", torch.reshape, (NHWC, [2, -1]), {}),
    ("add_ int counter", T.add_, (meta(dtype=torch.long), 1), {}),
    ("mul_ broadcast", T.mul_, (meta(2, 8, 5, 6), meta(8, 1, 1)), {}),
]

FALLS_THROUGH = [
    ("bn mixed dtypes", F.batch_norm, (X.double(), C8, C8), {}),
    ("bn not dense", F.batch_norm, (SLICE, None, None), {"training": True}),
    ("bn one value per channel", F.batch_norm, (meta(1, 8, 1, 1), None, None), {"training": True}),
    ("bn stats of the wrong size", F.batch_norm, (X, meta(4), meta(4)), {}),
    ("gn groups do not divide", F.group_norm, (X, 3), {}),
    ("gn one value per group", F.group_norm, (meta(1, 4, 1), 4), {}),
    ("ln wrong normalized_shape", F.layer_norm, (meta(2, 7, 8), (7,)), {}),
    ("bn integer", F.batch_norm, (meta(2, 8, dtype=torch.long), None, None), {"training": True}),
    ("conv not dense", torch.conv2d, (SLICE, meta(4, 8, 3, 3)), {}),
    ("adaptive pool ambiguous layout", F.adaptive_avg_pool2d, (meta(2, 1, 5, 6), 1), {}),
    ("max pool indices", F.max_pool2d, (X, 2), {"return_indices": True}),
    ("max pool padding too large", F.max_pool2d, (X, 2, 1, 2), {}),
    ("avg pool window larger than input", F.avg_pool2d, (meta(2, 8, 2, 2), 3), {}),
    ("adaptive pool bad size", F.adaptive_avg_pool2d, (X, (1, 2, 3)), {}),
    ("conv wrong channels", torch.conv2d, (X, meta(4, 3, 3, 3)), {}),
    ("conv padding mode string", torch.conv2d, (X, meta(4, 8, 3, 3), None, 1, "bogus"), {}),
    ("linear wrong in_features", F.linear, (meta(2, 7), meta(4, 8)), {}),
    ("sdpa mask", F.scaled_dot_product_attention, (meta(2, 3, 10, 16),) * 3 + (meta(10, 10),), {}),
    ("matmul broadcast", T.matmul, (meta(3, 4, 5), meta(5, 6)), {}),
    ("mean all", T.mean, (X,), {}),
    ("mean dtype", T.mean, (X, 1), {"dtype": torch.float64}),
    ("add int tensor", T.add, (meta(3, dtype=torch.long), meta(3, dtype=torch.long)), {}),
    ("add bool scalar", T.add, (X, True), {}),
    ("add float to int tensor", T.add, (meta(3, dtype=torch.long), 1.5), {}),
    ("add mixed dtypes", T.add, (X, X.half()), {}),
    ("add both broadcast", T.add, (meta(2, 1, 4), meta(2, 3, 1)), {}),
    ("add_ into smaller", T.add_, (meta(8, 1, 1), X), {}),
    ("add_ not dense", T.add, (SLICE, 1.0), {}),
    ("div rounding", T.div, (X, 2.0), {"rounding_mode": "floor"}),
    ("gelu not dense", F.gelu, (SLICE,), {}),
    ("dropout p out of range", F.dropout, (X, 1.5), {}),
    ("dropout train not dense", F.dropout, (SLICE, 0.5, True), {}),
    ("cat channels_last", torch.cat, ([CL, CL], 1), {}),
    ("cat shapes differ", torch.cat, ([meta(2, 3), meta(3, 3)], 1), {}),
    ("cat mixed dtypes", torch.cat, ([meta(2, 3), meta(2, 3).half()],), {}),
    ("cat out", torch.cat, ([meta(2, 3), meta(2, 3)],), {"out": meta(4, 3)}),
    ("reshape contiguous", T.reshape, (X, 2, -1), {}),
    ("reshape viewable", T.reshape, (meta(2, 12, 10, 64).transpose(1, 2), 2, 10, 12, 8, 8), {}),
    ("reshape viewable slice", T.reshape, (SLICE, 2, 8, 30), {}),
    ("reshape permuted viewable", T.reshape, (NHWC, 2, 8, 30), {}),
    ("reshape wrong numel", T.reshape, (NHWC, 2, 7, -1), {}),
    ("reshape two -1", T.reshape, (NHWC, -1, -1), {}),
]


@pytest.mark.parametrize("case", APPLIES, ids=[c[0] for c in APPLIES])
def test_shortcut_matches_pytorch(case):
    _, func, args, kwargs = case
    out = shapes.shortcut(func, args, kwargs)
    assert out is not shapes.MISSING, "expected this plain case to take the shortcut"
    shapes.check(func, args, kwargs, out)


@pytest.mark.parametrize("case", FALLS_THROUGH, ids=[c[0] for c in FALLS_THROUGH])
def test_unsure_cases_fall_through(case):
    _, func, args, kwargs = case
    assert shapes.shortcut(func, args, kwargs) is shapes.MISSING


def test_every_rule_is_exercised():
    """Each rule (one function may serve several ops) takes the shortcut in some case above."""
    used = {id(shapes.RULES[func]) for _, func, _, _ in APPLIES}
    missing = {getattr(f, "__name__", repr(f)) for f, rule in shapes.RULES.items() if id(rule) not in used}
    assert not missing, f"rules without a test case that takes them: {sorted(missing)}"


def test_check_catches_a_wrong_shortcut():
    """Negative control: a shortcut that gets strides or identity wrong is caught."""
    with pytest.raises(AssertionError, match="gelu"):
        shapes.check(F.gelu, (NHWC,), {}, meta(2, 8, 5, 6))  # contiguous instead of NHWC's strides
    with pytest.raises(AssertionError, match="in place"):
        shapes.check(F.silu, (X, True), {}, meta(2, 8, 5, 6))  # a new tensor for an in-place op
    with pytest.raises(AssertionError, match="float64"):
        shapes.check(F.linear, (meta(2, 8), meta(4, 8)), {}, meta(2, 4, dtype=torch.float64))


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    perm_seed=st.randoms(use_true_random=False),
    broadcast=st.lists(st.booleans(), min_size=4, max_size=4),
    op=st.sampled_from([T.add, T.mul, T.sub, T.div, T.add_, T.mul_, F.gelu, F.silu, torch.sigmoid, F.batch_norm,
                        F.group_norm, F.layer_norm]),
    swap=st.booleans(),
)
def test_elementwise_shortcuts_on_random_layouts(shape, perm_seed, broadcast, op, swap):
    """Any dense permutation of any shape, with an operand broadcast along random axes."""
    perm = list(range(len(shape)))
    perm_seed.shuffle(perm)
    a = meta(*[shape[p] for p in perm]).permute(*[perm.index(d) for d in range(len(shape))])
    assert tuple(a.shape) == tuple(shape)
    if op in (F.gelu, F.silu, torch.sigmoid):
        args: tuple = (a,)
    elif op is F.batch_norm:
        args = (a, None, None, None, None, True)
    elif op is F.group_norm:
        args = (a, 1)
    elif op is F.layer_norm:
        args = (a, a.shape[-1:])
    else:
        b = meta(*[1 if bc else s for s, bc in zip(shape, broadcast)])
        args = (b, a) if swap else (a, b)
    out = shapes.shortcut(op, args, {})
    if out is not shapes.MISSING:
        shapes.check(op, args, {}, out)
    else:  # only the cases the rules refuse on purpose
        one_per_channel = a.numel() == a.shape[1:2].numel()
        # a broadcast operand first, with two or more axes of its own: its order competes with a's
        competing = swap and args[0].shape != a.shape and sum(size > 1 for size in args[0].shape) > 1
        assert (op in (T.add_, T.mul_) and swap or competing or op is F.batch_norm and (a.ndim < 2 or one_per_channel)
                or op is F.group_norm and (a.ndim < 2 or a.numel() == 1))


@given(
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    ceil_mode=st.booleans(),
    op=st.sampled_from(["conv", "max", "avg"]),
    channels_last=st.booleans(),
)
def test_window_shape_formulas(size, kernel, stride, padding, dilation, ceil_mode, op, channels_last):
    """Conv and pooling output sizes for random windows: the shortcut agrees with PyTorch, and
    gives way to it (MISSING) wherever PyTorch rejects the arguments."""
    x = meta(2, 4, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if op == "conv":
        func, args = torch.conv2d, (x, meta(6, 2, *kernel), None, stride, padding, dilation, 2)
    elif op == "max":
        func, args = F.max_pool2d, (x, kernel, stride, padding, dilation, ceil_mode)
    else:
        func, args = F.avg_pool2d, (x, kernel, stride, padding, ceil_mode)
    out = shapes.shortcut(func, args, {})
    try:
        func(*args)
    except RuntimeError:
        assert out is shapes.MISSING, "the shortcut accepted arguments PyTorch rejects"
        return
    if out is not shapes.MISSING:
        shapes.check(func, args, {}, out)
    else:
        ambiguous = x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        assert ambiguous and op != "conv", "only pooling of ambiguous layouts may fall through"


@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    perm_seed=st.randoms(use_true_random=False),
    merge=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_reshape_shortcut_on_random_layouts(shape, perm_seed, merge):
    """Any dense permutation, reshaped to its sizes shuffled and partly merged: the shortcut
    gives PyTorch's copy exactly when PyTorch cannot make a view."""
    perm = list(range(len(shape)))
    perm_seed.shuffle(perm)
    a = meta(*[shape[p] for p in perm]).permute(*[perm.index(d) for d in range(len(shape))])
    sizes = list(shape)
    perm_seed.shuffle(sizes)
    new = [sizes[0]]
    for size, join in zip(sizes[1:], merge):
        if join:
            new[-1] *= size
        else:
            new.append(size)
    out = shapes.shortcut(T.reshape, (a, *new), {})
    real = a.reshape(new)
    if out is shapes.MISSING:  # declined: PyTorch's reshape is a view (or the input is contiguous)
        assert a.is_contiguous() or real._is_view()
    else:
        assert not real._is_view()
        shapes.check(T.reshape, (a, *new), {}, out)
