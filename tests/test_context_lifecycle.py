"""The life of an ``extend`` block (``curvhook/context.py``): results replaced by the next backward."""

import torch
from torch import nn

from curvhook import extend
from curvhook.extensions import DiagGGN
from helpers import DT


def test_results_of_the_previous_backward_are_removed_when_the_next_starts():
    """They are replaced by the new ones; reading them during the next backward finds none."""
    model = nn.Sequential(nn.Linear(3, 2)).to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    seen = []
    with extend(model, DiagGGN()):
        nn.CrossEntropyLoss()(model(X), y).backward()
        out = model(X)
        out.register_hook(lambda g: seen.append(hasattr(model[0].weight, "diag_ggn")))
        nn.CrossEntropyLoss()(out, y).backward()
    assert seen == [False] and model[0].weight.diag_ggn.shape == (2, 3)


