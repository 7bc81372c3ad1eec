"""``curvhook/rules/node_kernels.py``: autograd nodes applied into recycled buffers.

Every kernel of the table must give bitwise what the node gives (it is the
same ATen kernel), and every case it does not cover must return ``None`` so
that the node is applied as it is.
"""

import pytest
import torch
import torch.nn.functional as F

from curvhook import _memory
from curvhook.rules import node_kernels
from curvhook.rules.base import apply_node

SHAPE = (4, 8, 48, 48)  # 295 KB in float32: large enough to be recycled (≥ 256 KiB in all)

OPERATIONS = {
    "ReluBackward0": F.relu,
    "TanhBackward0": torch.tanh,
    "SigmoidBackward0": torch.sigmoid,
    "GeluBackward0": F.gelu,
    "GeluBackward0-tanh": lambda x: F.gelu(x, approximate="tanh"),
    "SiluBackward0": F.silu,
    "LeakyReluBackward0": lambda x: F.leaky_relu(x, 0.2),
    "MaxPool2DWithIndicesBackward0": lambda x: F.max_pool2d(x, 3, 2, 1),
    "MaxPool2DWithIndicesBackward0-ceil": lambda x: F.max_pool2d(x, (2, 3), (2, 1), (1, 0), ceil_mode=True),
    "MaxPool3DWithIndicesBackward0": lambda x: F.max_pool3d(x.unsqueeze(1), (2, 2, 2), 2),
}


def test_the_table_covers_the_listed_nodes():
    assert {name.split("-")[0] for name in OPERATIONS} == set(node_kernels._KERNELS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_kernel_gives_bitwise_what_the_node_gives(name, dtype):
    torch.manual_seed(0)
    x = torch.randn(SHAPE, dtype=dtype)
    x[0, 0, 0, :4] = 0.0  # kinks of ReLU and LeakyReLU
    x.requires_grad_()
    y = OPERATIONS[name](x)
    assert y.grad_fn.name() == name.split("-")[0]
    v = torch.randn_like(y)
    with torch.no_grad():  # as inside backward
        into = node_kernels.apply_into(y.grad_fn, v)
        expected = y.grad_fn(v)
        via_apply_node = apply_node(y.grad_fn, v)
    assert into is not None
    assert into.shape == expected.shape and into.dtype == expected.dtype
    assert torch.equal(into, expected)
    assert torch.equal(via_apply_node, expected)


def test_the_buffer_is_recycled_across_calls():
    x = torch.randn(SHAPE, requires_grad=True)
    y = F.relu(x)
    v = torch.randn_like(y)
    _memory._recycled()
    _memory._recycling.cap = 1 << 30  # as in a backward pass that may pool new buffers
    try:
        with torch.no_grad():
            first = node_kernels.apply_into(y.grad_fn, v)
            address = first.data_ptr()
            del first
            second = node_kernels.apply_into(y.grad_fn, 2 * v)
            assert second.data_ptr() == address
            assert torch.equal(second, y.grad_fn(2 * v))
    finally:
        _memory.release_scratch()
    assert not _memory._recycling.pool


def test_cases_it_does_not_cover_are_left_to_the_node():
    x = torch.randn(SHAPE, requires_grad=True)
    y = F.relu(x)
    v = torch.randn_like(y)
    other, small = x.exp(), F.relu(torch.randn(3, 5, requires_grad=True))
    with torch.no_grad():
        assert node_kernels.apply_into(other.grad_fn, v) is None  # a node not in the table
        assert node_kernels.apply_into(y.grad_fn, v.transpose(2, 3)) is None  # not contiguous
        assert node_kernels.apply_into(y.grad_fn, v.double()) is None  # another dtype
        assert node_kernels.apply_into(small.grad_fn, torch.ones(3, 5)) is None  # small: not recycled
    assert node_kernels.apply_into(y.grad_fn, v) is None  # grad mode on (create_graph=True)


def test_an_overwritten_saved_tensor_still_raises_autograds_error():
    x = torch.randn(SHAPE, requires_grad=True)
    y = torch.tanh(x)
    v = torch.randn_like(y)
    with torch.no_grad():
        y.mul_(2)
        assert node_kernels.apply_into(y.grad_fn, v) is None
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            apply_node(y.grad_fn, v)
