"""``curvhook/extensions/diag_ggn_approx.py``: where the approximation is exact, and where it is not.

The approximation is checked against its definition in every table of
``tests/rules/``; ``split_attention=True`` is in ``tests/rules/test_attention.py``;
a single Linear with MSELoss (exact) is in ``tests/rules/test_linear.py``.
"""

import pytest
import torch

from helpers import DEEP_MLPS, DT, ce, check_against_reference, randomize_linear
from reference import check


@pytest.mark.parametrize("case", ["tanh_relu", "sigmoid_gelu_elu"])
def test_approx_is_exact_for_last_linear_layer(case):
    """Each weight of the last Linear moves one output entry, so only diag(H) matters there."""
    model = randomize_linear(DEEP_MLPS[case]())
    X = torch.randn(4, 4, dtype=DT)
    y = torch.randint(0, 3, (4,))
    got, ref = check_against_reference(model, X, ce(y))
    last = sum(p.numel() for p in model[-1].parameters())
    check(got["DiagGGNApprox"][-last:], ref.diag_ggn[-last:], "DiagGGNApprox")
    # ... and the approximation really is an approximation further down
    assert not torch.allclose(got["DiagGGNApprox"][:-last], ref.diag_ggn[:-last], rtol=1e-3)
