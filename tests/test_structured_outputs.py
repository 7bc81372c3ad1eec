"""Models that return a dict, a Hugging Face style ``ModelOutput``, or a tuple (``extend(..., output=)``).

The curvature is of one tensor of the output: its ``"logits"``, its only
tensor that requires grad, or the one the user names. Results must equal
those of the same model returning that tensor alone.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import DiagGGN, DiagGGNApprox

DT = torch.float64


class ModelOutput(OrderedDict):
    """What Hugging Face models return: a mapping that also has attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err


Pair = namedtuple("Pair", ["scores", "features"])


class Net(nn.Module):
    """Returns ``wrap(logits, hidden)``."""

    def __init__(self, wrap) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.wrap = wrap

    def forward(self, x):
        hidden = torch.tanh(self.body(x))
        return self.wrap(self.head(hidden), hidden)


WRAPS = {
    "dict with logits": (lambda f, h: {"logits": f, "hidden": h}, None, lambda o: o["logits"]),
    "ModelOutput": (lambda f, h: ModelOutput(logits=f, hidden_states=(h,)), None, lambda o: o.logits),
    "dict, one tensor with grad": (lambda f, h: {"scores": f, "mask": h.detach() > 0}, None, lambda o: o["scores"]),
    "tuple, named by index": (lambda f, h: (f, h), 0, lambda o: o[0]),
    "dict, named by key": (lambda f, h: {"scores": f, "features": h}, "scores", lambda o: o["scores"]),
    "namedtuple, named by attribute": (lambda f, h: Pair(f, h), "scores", lambda o: o.scores),
    "tuple, named by a function": (lambda f, h: (h, f), lambda o: o[1], lambda o: o[1]),
}


def _diag(model, X, y, pick, output):
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN(), DiagGGNApprox(), output=output):
        crit(pick(model(X)), y).backward()
    return [(p.diag_ggn.clone(), p.diag_ggn_approx.clone()) for p in model.parameters()]


@pytest.mark.parametrize("name", list(WRAPS))
def test_structured_output_equals_the_plain_tensor(name):
    wrap, output, pick = WRAPS[name]
    torch.manual_seed(0)
    model = Net(wrap).to(DT)
    X, y = torch.randn(3, 4, dtype=DT), torch.tensor([0, 2, 1])
    got = _diag(model, X, y, pick, output)
    model.wrap = lambda f, h: f
    expected = _diag(model, X, y, lambda o: o, None)
    for (g, ga), (e, ea) in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=0)
        torch.testing.assert_close(ga, ea, rtol=1e-13, atol=0)


def test_ambiguous_output_lists_the_candidates():
    model = Net(lambda f, h: {"scores": f, "features": h}).to(DT)
    with pytest.raises(UnsupportedModelError, match="'scores', 'features'.*output="):
        with extend(model, DiagGGN()):
            model(torch.randn(2, 4, dtype=DT))


@pytest.mark.parametrize("output", ["missing", 5, lambda o: 3])
def test_a_wrong_output_choice_is_refused(output):
    model = Net(lambda f, h: (f, h)).to(DT)
    with pytest.raises(UnsupportedModelError, match="output="):
        with extend(model, DiagGGN(), output=output):
            model(torch.randn(2, 4, dtype=DT))


@dataclasses.dataclass(slots=True)
class SlottedOutput:
    logits: torch.Tensor
    hidden: torch.Tensor


@pytest.mark.parametrize("wrap, pick", [
    (lambda f, h: SlottedOutput(f, h), lambda o: o.logits),
    (lambda f, h: {"a": {"b": {"c": {"d": f}}}, "h": h}, lambda o: o["a"]["b"]["c"]["d"]),
    (lambda f, h: [[[[f, h]]]], lambda o: o[0][0][0][0]),
], ids=["slots_dataclass", "nested_dicts", "nested_lists"])
def test_an_output_function_that_selects_a_tensor_at_any_depth_is_followed(wrap, pick):
    """A function that returns one of the output's own tensors is a selection, however deep it
    lies (the review found a depth limit and ``__slots__`` objects refused as "computed")."""
    torch.manual_seed(0)
    model = Net(wrap).to(DT)
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(0, 3, (3,))
    got = _diag(model, X, y, pick, pick)
    model.wrap = lambda f, h: f
    for a, b in zip(got, _diag(model, X, y, lambda o: o, None)):
        torch.testing.assert_close(a, b)


def test_an_output_function_that_computes_a_new_tensor_is_refused_at_the_forward_pass():
    """``output=lambda o: (o[0] + o[1]) / 2``: no loss can be computed from a tensor only curvhook
    sees (before: the block wrote nothing, and its end suggested output=1)."""
    model = Net(lambda f, h: (f, h[:, :3])).to(DT)
    with pytest.raises(UnsupportedModelError, match="computed a new tensor.*wrapper module"):
        with extend(model, DiagGGN(), output=lambda o: (o[0] + o[1]) / 2):
            model(torch.randn(2, 4, dtype=DT))


@pytest.mark.parametrize(
    "wrap, output, pick, suggested",
    [
        (lambda f, h: (f, h), 0, lambda o: o[1], "output=1"),
        (lambda f, h: {"scores": f, "features": h}, "scores", lambda o: o["features"], "output='features'"),
        (lambda f, h: ModelOutput(logits=f, hidden_states=(h,)), None, lambda o: o.hidden_states[0],
         r"output=lambda output: output\['hidden_states'\]\[0\]"),
    ],
    ids=["tuple", "dict", "ModelOutput's hidden states"],
)
def test_a_loss_on_another_tensor_of_the_output_is_refused(wrap, output, pick, suggested):
    """The loss never reaches the tensor curvhook follows: without the error the block
    would write no results and say nothing."""
    torch.manual_seed(0)
    model = Net(wrap).to(DT)
    X, y = torch.randn(3, 4, dtype=DT), torch.tensor([0, 2, 1])
    with pytest.raises(UnsupportedModelError, match=f"reached output.*wrote no results.*{suggested}"):
        with extend(model, DiagGGN(), output=output):
            nn.CrossEntropyLoss()(pick(model(X)), y).backward()
    assert not any(hasattr(p, "diag_ggn") for p in model.parameters())


@pytest.mark.parametrize("order", ["auxiliary_first", "auxiliary_later", "separate_forward_first"])
def test_other_tensors_of_the_output_may_get_gradients_of_their_own(order):
    """A pass through another tensor of the output alone (an auxiliary loss, before or after
    the main one, or with a forward pass of its own), and an input gradient through it: no
    refusal, and the results are those of the followed tensor's loss."""
    torch.manual_seed(0)
    model = Net(lambda f, h: {"logits": f, "hidden": h}).to(DT)
    X, y = torch.randn(3, 4, dtype=DT, requires_grad=True), torch.tensor([0, 2, 1])
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        if order == "separate_forward_first":
            model(X)["hidden"].square().sum().backward()
        out = model(X)
        if order == "auxiliary_first":
            out["hidden"].square().sum().backward(retain_graph=True)
        crit(out["logits"], y).backward(retain_graph=True)
        first = [p.diag_ggn.clone() for p in model.parameters()]
        if order == "auxiliary_later":
            out["hidden"].square().sum().backward(retain_graph=True)
        torch.autograd.grad(out["hidden"].sum(), X)
    for p, f in zip(model.parameters(), first):
        torch.testing.assert_close(p.diag_ggn, f, rtol=0, atol=0)
    model.wrap = lambda f, h: f
    with extend(model, DiagGGN()):
        crit(model(X), y).backward()
    for p, f in zip(model.parameters(), first):
        torch.testing.assert_close(p.diag_ggn, f, rtol=1e-13, atol=0)
