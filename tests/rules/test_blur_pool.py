"""``curvhook/rules/blur_pool.py``: timm's ``BlurPool2d`` (TResNet, ``resnetblur``).

Every extension against the torch.func references (float64), DiagGGNApprox against
its definition with the module as one operation; the fallback must serve nothing.
The settings cover the borders where two taps of one window read the same input
position (reflect padding), the other padding modes, filter sizes 3 and 5, odd map
sizes, and a filter per channel or one for all.
"""

import pytest
import torch
from torch import nn

from curvhook.rules import blur_pool, fallback
from helpers import DT, check_exact_without_fallback, float32_follows_float64

layers = pytest.importorskip("timm.layers", reason="timm is in the models extra")


class Blurred(nn.Module):
    """A convolution, ``BlurPool2d``, a nonlinearity and a head."""

    def __init__(self, size: int, filt_size: int, stride: int, pad_mode: str, channels: bool):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.blur = layers.BlurPool2d(3 if channels else None, filt_size=filt_size, stride=stride, pad_mode=pad_mode)
        with torch.no_grad():
            out = self.blur(torch.zeros(1, 3, size, size)).shape
        self.head = nn.Linear(out.numel(), 3)

    def forward(self, x):
        return self.head(torch.tanh(self.blur(self.conv(x))).flatten(1))


SETTINGS = {
    "reflect_3": (5, 3, 2, "reflect", True),
    "reflect_5_even": (6, 5, 2, "reflect", False),
    "replicate_3_stride_1": (4, 3, 1, "replicate", True),
    "constant_5": (5, 5, 2, "constant", True),
    "circular_3": (4, 3, 2, "circular", False),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("setting", SETTINGS)
def test_against_the_references(setting, n, monkeypatch):
    size, *rest = SETTINGS[setting]
    torch.manual_seed(0)
    model = Blurred(size, *rest).to(DT)
    X, y = torch.randn(n, 2, size, size, dtype=DT), torch.randint(0, 3, (n,))
    check_exact_without_fallback(model, X, y, monkeypatch)


def test_taps_at_a_reflected_border_read_one_position_twice():
    """Reflect padding by one: the first window reads positions ``1, 0, 1`` along each axis."""
    positions = blur_pool.tap_positions((4, 4), [1, 1, 1, 1], "reflect", 3, 2, "cpu")
    assert positions.shape == (4, 9)
    assert positions[0].tolist() == [5, 4, 5, 1, 0, 1, 5, 4, 5]


def test_another_form_goes_to_the_exact_fallback(monkeypatch):
    """A module of the same name whose filter is applied otherwise fails the check against its forward."""
    torch.manual_seed(0)

    class BlurPool2d(layers.BlurPool2d):
        def forward(self, x):
            return super().forward(x).flip(-1)

    BlurPool2d.__module__ = "timm.layers.lookalike"
    model = Blurred(5, 3, 2, "reflect", True).to(DT)
    model.blur = BlurPool2d(3, filt_size=3, stride=2).to(DT)
    served = []
    own = fallback.FallbackRule.diag_jac_t_diag_jac
    monkeypatch.setattr(fallback.FallbackRule, "diag_jac_t_diag_jac",
                        lambda self, call, d: served.append(call.name) or own(self, call, d))
    X, y = torch.randn(3, 2, 5, 5, dtype=DT), torch.randint(0, 3, (3,))
    from helpers import check_graph_against_reference

    check_graph_against_reference(model, X, y)
    assert served


def test_float32_follows_float64():
    torch.manual_seed(1)
    model = Blurred(6, 3, 2, "reflect", True)
    float32_follows_float64(model, torch.randn(2, 2, 6, 6), torch.randint(0, 3, (2,)))
