"""Python reuses the id of a dead tensor: the record must not mistake a new tensor for it.

curvhook names a tensor by ``(id, version)``. A tensor the record knows by that key
(computed from parameters only, or with its batch axis moved) that no later
operation reads dies at once, and the next tensor of the same size often gets
its id. Before session 43 such a batched tensor passed for a shared one
(``zeros_like(w[1:])`` each step: a torch shape error in the next layer's rule)
or for one with a moved batch axis (the model output refused as having its batch
axis second). The loops below make the reuse near certain; every case is checked
against torch.func and DiagGGNApprox against its definition.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from helpers import DT, check_graph_against_reference


class DeadTensors(nn.Module):
    """A tensor the record knows by its key dies in every step of a loop."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 3)
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        for _ in range(30):
            if self.kind == "shared":  # a slice of a parameter, read by no recorded operation
                h = torch.tanh(h) + torch.zeros_like(self.w[1:]).sum()
            elif self.kind == "moved_axis":  # the batch axis second, then unused
                unused = h.transpose(0, 1) * 1.0  # noqa: F841
                h = torch.tanh(h) * 1.5
            else:  # "batched": a branch nobody reads
                unused = torch.tanh(h * 2)  # noqa: F841
                h = torch.sigmoid(h) * 1.5
        return self.b(h)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind", ["shared", "moved_axis", "batched"])
def test_a_new_tensor_with_the_id_of_a_dead_one_is_not_taken_for_it(kind, n):
    torch.manual_seed(0)
    model = DeadTensors(kind).to(DT)
    check_graph_against_reference(model, torch.randn(n, 4, dtype=DT), torch.arange(n) % 3, moved_axes=True)
