"""``curvhook/rules/recurrent.py``: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` with ``batch_first=True``.

A recurrent module returns a tuple, which the chain reference of ``reference.py``
cannot follow, so every case of the table runs the graph check of
``tests/helpers.py`` (``check_graph_against_reference``): BatchJacobian, DiagGGN
and FullGGN against torch.func, DiagGGNApprox against its definition on the graph
(the recurrent module is one operation), in float64, for one sample and for a
batch of three with a non-contiguous input, with the fallback refused; then the
same model in float32 against the float64 results.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from curvhook import UnsupportedModelError, extend
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.rules import registry
from curvhook.rules.recurrent import RecurrentRule
from helpers import (
    CLASSES,
    DT,
    check_graph_against_reference,
    leaf_types,
    noncontiguous,
    registered_types,
    run_curvhook,
)
from graph_reference import diag_ggn_approx_graph
from reference import check, compare, reference

FEATURES, LENGTH = 3, 4


class Recurrent(nn.Module):
    """``Linear → recurrent module → last step or whole sequence → Linear`` (or on the raw input)."""

    def __init__(self, cell: type, use: str = "last", embed: bool = True, hidden: int = 4, **kwargs) -> None:
        super().__init__()
        self.emb = nn.Linear(FEATURES, FEATURES) if embed else nn.Identity()
        self.rnn = cell(FEATURES, hidden, batch_first=True, **kwargs)
        self.use = use
        self.head = nn.LazyLinear(CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(torch.tanh(self.emb(x)))
        if self.use == "last":
            return self.head(out[:, -1])
        if self.use == "mean":
            return self.head(out.mean(1))
        return self.head(out.flatten(1))  # "all": every step


CASES = {
    "lstm_last": lambda: Recurrent(nn.LSTM),
    "lstm_all_two_layers": lambda: Recurrent(nn.LSTM, use="all", num_layers=2),
    "lstm_bidirectional_no_bias": lambda: Recurrent(nn.LSTM, bidirectional=True, bias=False),
    "lstm_proj_two_layers_bidirectional": lambda: Recurrent(
        nn.LSTM, use="all", num_layers=2, bidirectional=True, proj_size=2
    ),
    "lstm_dropout_eval": lambda: Recurrent(nn.LSTM, num_layers=2, dropout=0.5),
    "gru_last": lambda: Recurrent(nn.GRU),
    "gru_all_bidirectional_two_layers": lambda: Recurrent(nn.GRU, use="all", num_layers=2, bidirectional=True),
    "gru_no_bias_mean": lambda: Recurrent(nn.GRU, use="mean", bias=False),
    "rnn_tanh_last": lambda: Recurrent(nn.RNN),
    "rnn_relu_all_two_layers": lambda: Recurrent(nn.RNN, use="all", num_layers=2, nonlinearity="relu"),
    "rnn_tanh_bidirectional_no_bias": lambda: Recurrent(nn.RNN, bidirectional=True, bias=False),
    "lstm_on_the_input": lambda: Recurrent(nn.LSTM, embed=False, num_layers=2),
    "gru_on_the_input": lambda: Recurrent(nn.GRU, embed=False, use="all"),
}


def _model(case: str, n: int) -> nn.Module:
    torch.manual_seed(0)
    model = CASES[case]().to(DT).eval()
    with torch.no_grad():
        model(torch.randn(n, LENGTH, FEATURES, dtype=DT))  # materializes the LazyLinear head
    with torch.no_grad():  # weights away from the small default init: every regime of the gates
        for name, p in model.rnn.named_parameters():
            p.copy_(torch.randn_like(p) * (0.8 if name.startswith("weight") else 0.5))
    assert isinstance(registry.rule_for(model.rnn), RecurrentRule)
    return model


def _data(n: int, contiguous: bool = True) -> tuple[Tensor, Tensor]:
    X = torch.randn(n, LENGTH, FEATURES, dtype=DT)
    return (X if contiguous else noncontiguous(X)), torch.randint(0, CLASSES, (n,))


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_one_sample(case):
    model = _model(case, 1)
    check_graph_against_reference(model, *_data(1))


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_batch_noncontiguous_and_float32(case):
    """N = 3 with a non-contiguous input in float64, then float32 against the float64 results."""
    model = _model(case, 3)
    X, y = _data(3, contiguous=False)
    check_graph_against_reference(model, X, y)
    crit = nn.CrossEntropyLoss()
    want, _, _ = run_curvhook(model, X, lambda o: crit(o, y), split_attention=False)
    got, _, _ = run_curvhook(copy.deepcopy(model).float(), X.float(), lambda o: crit(o, y), split_attention=False)
    for key, value in got.items():
        assert value.dtype == torch.float32
        check(value.double(), want[key], key + " (float32)", rtol=1e-4, atol_factor=1e-4)


def test_table_covers_every_registered_type():
    assert registered_types("recurrent") <= leaf_types({k: (build, None) for k, build in CASES.items()})


def test_mse_on_the_whole_sequence_with_an_initial_state():
    """Sequence to sequence: MSE on every step, with an initial state ``(h0, c0)`` held fixed."""
    torch.manual_seed(3)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(FEATURES, 4, num_layers=2, batch_first=True, bidirectional=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            n = x.shape[0]
            h0 = torch.linspace(-1, 1, 4 * n * 4, dtype=x.dtype).view(4, n, 4)
            out, _ = self.rnn(x, (h0, 0.5 * h0))
            return self.out(out)

    model = Seq2Seq().to(DT)
    X, target = torch.randn(3, LENGTH, FEATURES, dtype=DT), torch.randn(3, LENGTH, 2, dtype=DT)
    crit = nn.MSELoss()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no rule")
        got, matrix, _ = run_curvhook(model, X, lambda o: crit(o, target), split_attention=False)
    ref = reference(model, X, lambda o: crit(o, target), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, matrix)
    d = torch.func.hessian(lambda o: crit(o, target))(ref.out).reshape(ref.out.numel(), -1).diagonal()
    check(got["DiagGGNApprox"], diag_ggn_approx_graph(model, X, d), "DiagGGNApprox")


def test_rule_declines_batch_first_false_and_train_mode_dropout():
    assert registry.rule_for(nn.LSTM(3, 4)) is None  # batch_first=False: served on its batch-first view
    dropped = nn.GRU(3, 4, num_layers=2, dropout=0.3, batch_first=True)
    assert registry.rule_for(dropped) is None
    assert isinstance(registry.rule_for(dropped.eval()), RecurrentRule)
    with warnings.catch_warnings():  # torch warns that one layer has no dropout to apply
        warnings.simplefilter("ignore")
        one_layer = nn.RNN(3, 4, dropout=0.3, batch_first=True)
    assert isinstance(registry.rule_for(one_layer), RecurrentRule)


@pytest.mark.parametrize("read", ["index", "flatten", "first_output"])
def test_using_the_final_state_is_refused_with_what_works(read):
    """curvhook follows only the first output of a module: ``h_n`` raises a clear error that
    names the module and says to read the last step of ``out`` (it leaked torch's
    ``squeeze()`` argument error for ``h_n.transpose(0, 1).flatten(1)``). The last step of
    ``out`` is ``h_n``'s last layer, and exact."""

    class LastState(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(FEATURES, 4, num_layers=2, batch_first=True)
            self.head = nn.Linear(8 if read == "flatten" else 4, CLASSES)

        def forward(self, x):
            out, (h_n, _) = self.rnn(x)
            if read == "index":
                return self.head(h_n[-1])
            if read == "flatten":
                return self.head(h_n.transpose(0, 1).flatten(1))
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = LastState().to(DT)
    X, y = _data(3)
    if read == "first_output":
        with torch.no_grad():
            torch.testing.assert_close(model.rnn(X)[0][:, -1], model.rnn(X)[1][0][-1])
        check_graph_against_reference(model, X, y)
        return
    with pytest.raises(UnsupportedModelError, match=r"reads a further output of module 'rnn' \(LSTM\).*out\[:, -1\]"):
        with extend(model, DiagGGN()):
            nn.CrossEntropyLoss()(model(X), y).backward()


def test_float32_where_the_fused_kernel_fails_in_the_fallback():
    """float32 on CPU: the rule never calls the fused kernel, so all four extensions run."""
    torch.manual_seed(4)
    model = Recurrent(nn.LSTM, num_layers=2, bidirectional=True).float()
    X, y = torch.randn(3, LENGTH, FEATURES), torch.randint(0, CLASSES, (3,))
    exts = [BatchJacobian(), DiagGGN(), DiagGGNApprox(), FullGGN()]
    with extend(model, *exts):
        nn.CrossEntropyLoss()(model(X), y).backward()
    for p in model.parameters():
        for attr in ("batch_jacobian", "diag_ggn", "diag_ggn_approx"):
            assert getattr(p, attr).dtype == torch.float32 and torch.isfinite(getattr(p, attr)).all()


def test_dropout_between_layers_in_train_mode_raises_a_clear_error():
    """Declined: the fallback's random-numbers check (``batch_first=False``: tests/test_batch_axis.py)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(FEATURES, 4, num_layers=2, dropout=0.5, batch_first=True)
            self.head = nn.Linear(4, CLASSES)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Net().to(DT).train()
    X, y = _data(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedModelError, match="random numbers"):
            with extend(model, DiagGGN()):
                nn.CrossEntropyLoss()(model(X), y).backward()


@pytest.mark.parametrize("chunk", [1, 10**9])
def test_diag_ggn_approx_in_chunks_of_columns(monkeypatch, chunk):
    """One one-hot column at a time, or all at once: the same exact diagonals."""
    from curvhook.rules import recurrent  # noqa: PLC0415

    monkeypatch.setattr(recurrent, "_ROW_CHUNK_ENTRIES", chunk)
    model = _model("gru_all_bidirectional_two_layers", 2)
    check_graph_against_reference(model, *_data(2))


class Packed(nn.Module):
    """A variable-length batch: packed for the LSTM (``packed=True``), or padded and read at each
    sample's last valid step, as the refusal of the packed form suggests."""

    def __init__(self, packed: bool):
        super().__init__()
        self.emb, self.rnn, self.head = nn.Linear(FEATURES, 3), nn.LSTM(3, 4, batch_first=True), nn.Linear(4, CLASSES)
        self.packed = packed

    def forward(self, x, lengths):
        h = torch.tanh(self.emb(x))
        if self.packed:
            from torch.nn.utils.rnn import pack_padded_sequence

            out, (h_n, _) = self.rnn(pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False))
            return self.head(h_n[-1])
        out, _ = self.rnn(h)
        return self.head(out[torch.arange(x.shape[0]), lengths - 1])


def test_a_packed_sequence_is_refused_with_the_padded_form_that_works():
    """A PackedSequence crashed the forward (AttributeError while recording it); it is refused
    when the LSTM is called now, and the padded form the message names is exact and equals
    the packed model's output."""
    torch.manual_seed(0)
    X, y, lengths = torch.randn(3, LENGTH, FEATURES, dtype=DT), torch.randint(0, CLASSES, (3,)), torch.tensor([4, 2, 3])
    packed, padded = Packed(True).to(DT), Packed(False).to(DT)
    padded.load_state_dict(packed.state_dict())
    with pytest.raises(UnsupportedModelError, match="PackedSequence.*out\\[torch.arange\\(N\\), lengths - 1\\]"):
        with extend(packed, DiagGGN()):
            packed(X, lengths)
    torch.testing.assert_close(padded(X, lengths), packed(X, lengths))
    crit = nn.CrossEntropyLoss()

    class Bound(nn.Module):  # the reference calls the model on X alone
        def __init__(self):
            super().__init__()
            self.m = padded

        def forward(self, x):
            return self.m(x, lengths)

    model = Bound()
    got, matrix, _ = run_curvhook(model, X, lambda out: crit(out, y), ("BatchJacobian", "DiagGGN", "FullGGN"))
    compare(got, reference(model, X, lambda out: crit(out, y), approx=False), matrix)
