"""``curvhook/rules/complex_views.py``: diagonals through complex tensors (a rotary embedding
written with complex numbers, as DeepSeek-V2 and Llama 4 do).

Every model runs all four extensions in one block against torch.func (the exact ones) and
against DiagGGNApprox's definition on the graph (``tests/graph_reference.py``, which
differentiates each complex tensor as its real view). Before session 47 DiagGGNApprox was
refused on each of them (``jacrev`` takes no complex tensors).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import DiagGGNApprox, FullGGN
from helpers import check_graph_against_reference, float32_follows_float64, ggn_vector_product_and_full

DT = torch.float64


def _rotate_pairs(h: Tensor, angles: Tensor) -> Tensor:
    """DeepSeek-V2's ``apply_rotary_emb``: pairs of ``h`` as complex numbers times ``e^{iθ}``."""
    z = torch.view_as_complex(h.reshape(*h.shape[:-1], -1, 2))
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


FORMS = {
    # angles per position, the same for every sample: [T, D/2]
    "rotary": lambda h, angles: _rotate_pairs(h, angles),
    # angles with the batch axis (from position ids, as DeepSeek-V2 computes them): [N, T, D/2]
    "rotary_per_sample": lambda h, angles: _rotate_pairs(h, angles.expand(h.shape[0], -1, -1) * (
        1 + torch.arange(h.shape[0], dtype=h.dtype)[:, None, None])),
    # the constant in front, and a real scale on the complex numbers
    "constant_first": lambda h, angles: torch.view_as_real(
        torch.polar(torch.ones_like(angles), angles) * torch.view_as_complex(h.unflatten(-1, (-1, 2))) * 0.7
    ).flatten(-2),
    # a real tensor times a complex constant: both parts of the output read it
    "real_times_complex": lambda h, angles: torch.view_as_real(
        h[..., ::2] * torch.polar(torch.ones_like(angles), angles)).flatten(-2),
}


class ComplexRotary(nn.Module):
    """``head(tanh(form(lin(x))))`` on ``[N, T, D]`` with ``T = 3``, ``D = 4``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(12, 3)
        self.register_buffer("angles", torch.randn(3, 2))

    def forward(self, x: Tensor) -> Tensor:
        h = FORMS[self.form](self.lin(x), self.angles.to(x.dtype))
        return self.head(torch.tanh(h).flatten(1))


def _data(n: int, dtype=DT) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 3, 4, dtype=dtype), torch.arange(n) % 3


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("form", list(FORMS))
def test_complex_rotary_embeddings_are_exact(form, n):
    torch.manual_seed(0)
    model = ComplexRotary(form).to(DT)
    check_graph_against_reference(model, *_data(n))


@pytest.mark.parametrize("form", list(FORMS))
def test_ggn_vector_products_through_complex_tensors(form):
    """Forward products (``torch.func.jvp`` of the replays, complex tangents) against FullGGN."""
    torch.manual_seed(0)
    model = ComplexRotary(form).to(DT)
    product, want = ggn_vector_product_and_full(model, *_data(3))
    torch.testing.assert_close(product, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))


def test_complex64_follows_complex128():
    torch.manual_seed(0)
    float32_follows_float64(ComplexRotary("rotary"), *_data(3, torch.float32))


class ComplexSquare(nn.Module):
    """``z * z``: a complex operation without a diagonal rule."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.view_as_complex(self.lin(x).unflatten(-1, (-1, 2)))
        return self.head(torch.view_as_real(z * z).flatten(1))


def test_other_complex_operations_are_refused_for_diagonals_only():
    torch.manual_seed(0)
    model = ComplexSquare().to(DT)
    X, y = _data(3)
    with pytest.raises(UnsupportedModelError, match="no diagonal rule for the operation .*complex"):
        with extend(model, DiagGGNApprox()):
            nn.CrossEntropyLoss()(model(X), y).backward()
    full = FullGGN()  # the products of columns serve it
    with extend(model, full):
        nn.CrossEntropyLoss()(model(X), y).backward()
    assert torch.isfinite(full.matrix).all() and full.matrix.abs().max() > 0
