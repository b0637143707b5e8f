"""Properties over random conv networks (inflate.testing strategies): the guarantees, stated generally."""

import copy

import torch
from hypothesis import given, note
from hypothesis import strategies as st

from inflate import InflateError, find_input_layers, inflate_first_conv
from inflate.testing import assert_repeat_equivalent, assert_zero_inflation_equivalent, conv_nets, input_batches

D = torch.float64


def _example(net):
    return torch.zeros(1, *net.input_shape, dtype=D)


@given(net=conv_nets(), n=st.integers(2, 4), data=st.data())
def test_zero_rule_gives_the_original_output_for_any_other_inputs(net, n, data):
    note(net.description)
    xs = data.draw(input_batches(net.input_shape, num_inputs=n))
    wide = inflate_first_conv(copy.deepcopy(net), n, init="zero", example_input=_example(net))
    layers = find_input_layers(net, _example(net))
    assert_zero_inflation_equivalent(net, wide, xs, compare_at=layers)


@given(net=conv_nets(), n=st.integers(2, 4), data=st.data())
def test_scaled_repeat_gives_the_original_output_for_identical_inputs(net, n, data):
    note(net.description)
    (x,) = data.draw(input_batches(net.input_shape))
    wide = inflate_first_conv(copy.deepcopy(net), n, init="repeat", example_input=_example(net))
    assert_repeat_equivalent(net, wide, x, n, compare_at=find_input_layers(net, _example(net)))


@given(net=conv_nets(dims=(2,), input_affine=False), n=st.integers(2, 4), k=st.floats(-2, 2))
def test_average_rule_keeps_the_first_layer_response_to_constant_inputs(net, n, k):
    # the promise is about a constant input to the layer: no per-channel affine before it
    note(net.description)
    wide = inflate_first_conv(copy.deepcopy(net), n, init="average", example_input=_example(net))
    c, *spatial = net.input_shape
    x = torch.full((1, c, *spatial), k, dtype=D)
    seen = {}
    for name, model, inp in (("a", net, x), ("b", wide, torch.cat([x] * n, 1))):
        model.stem[0].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
        model(inp)
    torch.testing.assert_close(seen["b"], seen["a"], rtol=1e-10, atol=1e-10)


@given(net=conv_nets(multi_branch=True), fail_at=st.integers(0, 8))
def test_inflation_is_atomic(net, fail_at):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    calls = []

    def rule(kernel, i, c):
        calls.append(i)
        if len(calls) > fail_at:
            raise InflateError("planned failure")
        return kernel

    try:
        inflate_first_conv(net, 2, init=rule, example_input=_example(net))
    except InflateError:
        assert list(net.parameters()) == params
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
        assert all(m.in_channels == net.in_channels for m in net.stem)
    else:  # fewer calls than fail_at: everything was inflated
        assert all(m.in_channels == 2 * net.in_channels for m in net.stem)
