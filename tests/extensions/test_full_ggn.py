"""``curvhook/extensions/full_ggn.py``: the Kronecker blocks of Linear layers next to dense
blocks, in tiles of any size, and frozen layers between Kronecker layers.

FullGGN is checked against ``Jᵀ H J`` from torch.func in every table of ``tests/rules/``.
"""

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import FullGGN
from curvhook.extensions import full_ggn as full_ggn_module
from helpers import DT, conv_net
from reference import collect, compare, reference


def run(model, X, y, *exts):
    with extend(model, *exts):
        nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize("tile", [3, 512])
@pytest.mark.parametrize("n", [1, 5])
def test_full_ggn_kronecker_blocks_next_to_dense_blocks(monkeypatch, tile, n):
    """Linear layers give Kronecker blocks, convolutions dense ones: every pairing."""
    monkeypatch.setattr(full_ggn_module, "_TILE", tile)  # 3: mirror many small tiles
    torch.manual_seed(1)
    model, X, y = conv_net(), torch.randn(n, 2, 4, 4, dtype=DT), torch.randint(0, 3, (n,))
    ggn = FullGGN()
    run(model, X, y, ggn)
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, n, ("FullGGN",)), ref, ggn.matrix)
    torch.testing.assert_close(ggn.matrix, ggn.matrix.T, rtol=1e-12, atol=1e-15)


def test_full_ggn_with_a_frozen_layer_between_kronecker_layers():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2)).to(DT)
    model[2].requires_grad_(False)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    ggn = FullGGN()
    run(model, X, y, ggn)
    ref = reference(model, X, lambda o: nn.CrossEntropyLoss()(o, y), approx=False)
    compare(collect(model, 4, ("FullGGN",)), ref, ggn.matrix)
