"""Whole models of the kinds users train, against the torch.func references (issue #4).

Each model is run once with all four extensions in one ``extend`` block and
compared in float64, for ``N = 1`` and ``N = 3``:

- ``BatchJacobian``, ``DiagGGN`` and ``FullGGN`` with ``reference`` (the
  Jacobian of the whole model from ``jacrev`` of ``functional_call``, and the
  loss Hessian from ``torch.func.hessian``);
- ``DiagGGNApprox`` with ``diag_ggn_approx_graph`` (the diagonal
  backpropagation by its definition, every module and tensor operation
  differentiated per sample with ``jacrev``).

The models are tiny so that the dense references stay fast.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhook import extend
from curvhook.errors import UnsupportedLossError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.rules import fallback, registry
from graph_reference import diag_ggn_approx_graph
from helpers import DEEP_MLPS, Chain, bce, check_against_reference, mse, randomize_linear
from reference import check, collect, compare, reference

DT = torch.float64
SIZES = [1, 3]


# ------------------------------------------------------------------- helpers
def run_extensions(model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor]) -> tuple[dict, Tensor]:
    """One ``extend`` block with all four extensions: forward, ``loss_fn(out).backward()``.

    DiagGGNApprox counts ``nn.MultiheadAttention`` as one operation here
    (``split_attention=False``), as ``graph_reference`` does; the split form is
    tested in tests/test_attention.py.

    Returns:
        The collected results (``reference.collect``) and ``FullGGN.matrix``.
    """
    ggn = FullGGN()
    with extend(model, BatchJacobian(), DiagGGN(), DiagGGNApprox(split_attention=False), ggn):
        loss_fn(model(X)).backward()
    return collect(model, X.shape[0]), ggn.matrix


def check_against_references(
    got: dict, matrix: Tensor, model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor],
    approx_model: Optional[nn.Module] = None,
):
    """Compare the four results with the torch.func references; return ``reference``'s result.

    Args:
        got: What :func:`run_extensions` collected.
        matrix: ``FullGGN.matrix``.
        model: The model (float64).
        X: Its input.
        loss_fn: ``out ↦ ℓ``, exactly as backpropagated.
        approx_model: A model computing the same function with the same
            operations, for the DiagGGNApprox reference where ``model`` works in
            place (the reference follows tensors by identity only).
    """
    ref = reference(model, X, loss_fn, approx=False)
    # the supported losses have no cross-sample Hessian blocks (sanity check of the reference)
    torch.testing.assert_close(ref.H_full, ref.H, rtol=0, atol=1e-12 * ref.H.abs().max().item())
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, matrix)
    hessian_diag = ref.H.diagonal()
    check(got["DiagGGNApprox"], diag_ggn_approx_graph(approx_model or model, X, hessian_diag), "DiagGGNApprox")
    return ref


def check_model(
    model: nn.Module, X: Tensor, loss_fn: Callable[[Tensor], Tensor], approx_model: Optional[nn.Module] = None
) -> None:
    """Run the extensions on ``model`` and compare them with the references."""
    got, matrix = run_extensions(model, X, loss_fn)
    check_against_references(got, matrix, model, X, loss_fn, approx_model)


def bn_eval(model: nn.Module) -> nn.Module:
    """Eval mode, with running statistics and affine parameters away from their defaults."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def ce(y: Tensor) -> Callable[[Tensor], Tensor]:
    """``CrossEntropyLoss(reduction='mean')`` with targets ``y``, called as a module."""
    crit = nn.CrossEntropyLoss()
    return lambda out: crit(out, y)


def mse_sum(y: Tensor) -> Callable[[Tensor], Tensor]:
    """``MSELoss(reduction='sum')`` with targets ``y``, called as a module."""
    crit = nn.MSELoss(reduction="sum")
    return lambda out: crit(out, y)


# -------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convolutions with BatchNorm and a shortcut.

    Args:
        cin: Input channels.
        cout: Output channels.
        stride: Stride of the first convolution; with ``cin != cout`` or
            ``stride != 1`` the shortcut is a 1x1 convolution and BatchNorm.
        inplace: Write the block as torchvision does (``ReLU(inplace=True)``
            called twice, ``out += identity``) instead of out of place.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if self.inplace:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += identity
            return self.relu(out)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + identity)


class TinyResNet(nn.Module):
    """Stem, one plain block, one downsampling block, global average pooling, classifier."""

    def __init__(self, classes: int = 3, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = BasicBlock(4, 4, inplace=inplace)
        self.layer2 = BasicBlock(4, 8, stride=2, inplace=inplace)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("n", SIZES)
def test_resnet(n):
    torch.manual_seed(0)
    model = bn_eval(TinyResNet().to(DT))
    X = torch.randn(n, 3, 8, 8, dtype=DT)
    check_model(model, X, ce(torch.randint(0, 3, (n,))))


@pytest.mark.parametrize("n", SIZES)
def test_resnet_inplace_as_torchvision_writes_it(n):
    torch.manual_seed(0)
    model = bn_eval(TinyResNet(inplace=True).to(DT))
    twin = TinyResNet(inplace=False).to(DT).eval()
    twin.load_state_dict(model.state_dict())
    X = torch.randn(n, 3, 8, 8, dtype=DT)
    y = torch.randn(n, 3, dtype=DT)
    check_model(model, X, mse_sum(y), approx_model=twin)


# --------------------------------------------------------------- transformer
class TinyEncoder(nn.Module):
    """Token embedding, a learned positional parameter, one ``TransformerEncoderLayer``.

    Args:
        head: ``"mean"`` (mean over tokens, ``[N, C]``), ``"first"`` (first token,
            ``[N, C]``), ``"tokens_last"`` (per token, ``[N, T, C]``) or
            ``"tokens_channels"`` (per token, classes second: ``[N, C, T]`` as
            ``CrossEntropyLoss`` wants it).
    """

    def __init__(self, head: str, vocab: int = 7, length: int = 4, d_model: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.head = head
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.5 * torch.randn(length, d_model))
        self.encoder = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(d_model, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.encoder(self.embed(tokens) + self.pos)
        if self.head == "mean":
            return self.out(h.mean(1))
        if self.head == "first":
            return self.out(h[:, 0])
        logits = self.out(h)  # [N, T, C]
        return logits if self.head == "tokens_last" else logits.transpose(1, 2)


def spy_on_fast_path(monkeypatch) -> list:
    """Count the calls of the fused kernel of ``TransformerEncoderLayer``'s eval-mode fast path."""
    calls = []
    fused = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    return calls


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("head", ["mean", "first", "tokens_channels", "tokens_last"])
def test_transformer_encoder(head, n, monkeypatch):
    """Embedding, positional parameter, encoder layer in eval mode, four heads.

    Without grad the layer takes its fused fast path; inside the block (grad
    enabled, a torch-function mode active) it runs its modules, which curvhook
    follows. Both compute the same function, the output the reference sees.
    """
    torch.manual_seed(0)
    model = TinyEncoder(head).to(DT).eval()
    tokens = torch.randint(0, 7, (n, 4))
    if head in ("mean", "first"):
        loss_fn = ce(torch.randint(0, 3, (n,)))
    elif head == "tokens_channels":  # [N, C, T]: per-position cross-entropy
        loss_fn = ce(torch.randint(0, 3, (n, 4)))
    else:  # [N, T, C] directly, with a regression loss
        loss_fn = mse_sum(torch.randn(n, 4, 3, dtype=DT))
    fused = spy_on_fast_path(monkeypatch)
    with torch.no_grad():
        fast = model(tokens)
    assert fused, "this configuration should take the fast path without grad"
    fused.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.MultiheadAttention goes through the fallback
        got, matrix = run_extensions(model, tokens, loss_fn)
    assert not fused, "the fast path ran inside the block"
    ref = check_against_references(got, matrix, model, tokens, loss_fn)
    torch.testing.assert_close(fast, ref.out, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- U-Net
class TinyUNet(nn.Module):
    """Two levels with ``torch.cat`` skips: max-pool and strided convolution down,
    ``ConvTranspose2d`` and ``F.interpolate`` up, mean over space and a classifier."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.enc2 = nn.Conv2d(4, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.up1 = nn.Conv2d(6, 6, 1)
        self.dec1 = nn.Conv2d(12, 6, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.dec2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: Tensor) -> Tensor:
        s1 = F.relu(self.enc1(x))  # [N, 4, 8, 8]
        s2 = torch.tanh(self.enc2(self.pool(s1)))  # [N, 6, 4, 4]
        bottom = F.relu(self.down(s2))  # [N, 6, 2, 2]
        u = self.up1(F.interpolate(bottom, scale_factor=2, mode="nearest"))  # [N, 6, 4, 4]
        h = F.relu(self.dec1(torch.cat([u, s2], dim=1)))
        h = F.relu(self.dec2(torch.cat([self.up2(h), s1], dim=1)))  # [N, 4, 8, 8]
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
def test_unet(loss, n):
    torch.manual_seed(0)
    model = TinyUNet().to(DT)
    X = torch.randn(n, 3, 8, 8, dtype=DT)
    loss_fn = ce(torch.randint(0, 3, (n,))) if loss == "ce_mean" else mse_sum(torch.randn(n, 3, dtype=DT))
    check_model(model, X, loss_fn)


# ---------------------------------------------------------- weight sharing
class SharedMLP(nn.Module):
    """One ``nn.Linear`` called twice and one ``nn.Parameter`` used in two operations."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.hidden = nn.Linear(5, 5)
        self.scale = nn.Parameter(torch.rand(5) + 0.5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x) * self.scale)
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden(h) + self.scale)
        return self.out(h)


class UntiedMLP(SharedMLP):
    """``SharedMLP`` with its second uses given their own copies of the shared parameters."""

    def __init__(self, shared: SharedMLP) -> None:
        super().__init__()
        self.load_state_dict(shared.state_dict())
        self.hidden2 = copy.deepcopy(self.hidden)
        self.scale2 = nn.Parameter(self.scale.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x) * self.scale)
        h = torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden2(h) + self.scale2)
        return self.out(h)

    def tie(self, per_param: Tensor) -> Tensor:
        """Sum a per-parameter vector over the copies: the layout of ``SharedMLP``'s parameters."""
        sizes = [p.numel() for p in self.parameters()]
        parts = dict(zip([name for name, _ in self.named_parameters()], per_param.split(sizes)))
        for copy_name, name in [("hidden2.weight", "hidden.weight"), ("hidden2.bias", "hidden.bias"), ("scale2", "scale")]:
            parts[name] = parts[name] + parts.pop(copy_name)
        return torch.cat(list(parts.values()))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
def test_weight_shared_mlp(loss, n):
    torch.manual_seed(0)
    model = SharedMLP().to(DT)
    X = torch.randn(n, 4, dtype=DT)
    loss_fn = ce(torch.randint(0, 3, (n,))) if loss == "ce_mean" else mse_sum(torch.randn(n, 3, dtype=DT))
    check_model(model, X, loss_fn)
    # the cross terms between the uses matter: without them the diagonal is another one
    untied = UntiedMLP(model)
    without_cross_terms = untied.tie(reference(untied, X, loss_fn, approx=False).diag_ggn)
    assert not torch.allclose(without_cross_terms, reference(model, X, loss_fn, approx=False).diag_ggn, rtol=1e-3)


# ------------------------------------------------ LSTM and GRU (rule, fallback)
class RecurrentClassifier(nn.Module):
    """``nn.LSTM`` or ``nn.GRU`` (tuple output) followed by a classifier on the last step."""

    def __init__(self, cell: type) -> None:
        super().__init__()
        self.rnn = cell(input_size=3, hidden_size=4, batch_first=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_recurrent_by_its_rule(cell, n):
    """``curvhook/rules/recurrent.py`` serves the module: no fallback warning."""
    torch.manual_seed(0)
    model = RecurrentClassifier(cell).to(DT)
    X = torch.randn(n, 3, 3, dtype=DT)
    loss_fn = ce(torch.randint(0, 3, (n,)))
    fallback._WARNED.discard(cell)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no rule")
        got, matrix = run_extensions(model, X, loss_fn)
    check_against_references(got, matrix, model, X, loss_fn)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["LSTM", "GRU"])
def test_recurrent_through_the_fallback(cell, n, monkeypatch):
    """Without its rule: the exact fallback, which loops over samples where ``vmap`` cannot run the cell."""
    monkeypatch.delitem(registry._RULES, cell)
    torch.manual_seed(0)
    model = RecurrentClassifier(cell).to(DT)
    X = torch.randn(n, 3, 3, dtype=DT)
    loss_fn = ce(torch.randint(0, 3, (n,)))
    fallback._WARNED.discard(cell)  # the warning comes once per module type and process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_extensions(model, X, loss_fn)
        got, matrix = run_extensions(model, X, loss_fn)  # a second block: no second warning
    ours = [w for w in caught if f"no rule for {cell.__name__}" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    check_against_references(got, matrix, model, X, loss_fn)


# ------------------------------------------ operations after the model output
class MLP(nn.Module):
    """A small MLP with five outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


AFTER = {
    "scale_tanh": lambda out: 2 * out.tanh(),
    "slice_affine": lambda out: 2 * out[:, :3] - 1,
    "log_softmax": lambda out: F.log_softmax(out, dim=1),
}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("after", sorted(AFTER))
def test_operations_after_the_model_moved_inside_are_exact(after, n):
    """The documented remedy: move the operations into the model's forward."""
    torch.manual_seed(0)
    model = Chain(MLP(), AFTER[after]).to(DT)
    X = torch.randn(n, 4, dtype=DT)
    classes = 3 if after == "slice_affine" else 5
    check_model(model, X, ce(torch.randint(0, classes, (n,))))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("after", sorted(AFTER))
def test_batch_jacobian_with_operations_after_the_model(after, n):
    """BatchJacobian needs no loss: it is the Jacobian of the model output whatever follows."""
    torch.manual_seed(0)
    model = MLP().to(DT)
    X = torch.randn(n, 4, dtype=DT)
    g = AFTER[after]
    crit = nn.CrossEntropyLoss()
    y = torch.randint(0, 3, (n,))
    with extend(model, BatchJacobian()):
        crit(g(model(X)), y).backward()
    compare(collect(model, n, ("BatchJacobian",)), reference(model, X, approx=False))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("after", ["scale_tanh", "slice_affine", "per_token_transpose"])
def test_operations_after_the_model_before_the_loss(after, n):
    """GGN extensions when ``crit(g(model(X)), y)`` is backpropagated.

    The contract checked: the operations ``g`` after the model are part of the
    network (exactly as if moved into its forward): ``G = Σ_n J_nᵀ H_n J_n``
    with ``J`` the Jacobian of ``g ∘ f`` and ``H`` the Hessian of the loss at
    ``g(f)``. For an affine ``g`` this is the Hessian of ``ℓ`` with respect to
    the model output itself.
    """
    torch.manual_seed(0)
    if after == "per_token_transpose":
        model = TinyEncoder("tokens_last").to(DT).eval()
        X = torch.randint(0, 7, (n, 4))
        g, y = (lambda out: out.transpose(1, 2)), torch.randint(0, 3, (n, 4))
    else:
        model = MLP().to(DT)
        X = torch.randn(n, 4, dtype=DT)
        g, y = AFTER[after], torch.randint(0, 3, (n,))
    crit = nn.CrossEntropyLoss()
    exts = [DiagGGN(), DiagGGNApprox(split_attention=False), FullGGN()]  # attention as one operation, as the reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extend(model, *exts):
            crit(g(model(X)), y).backward()
    got = collect(model, n, ("DiagGGN", "DiagGGNApprox", "FullGGN"))
    whole = Chain(model, g)
    ref = reference(whole, X, lambda out: crit(out, y), approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, exts[2].matrix)
    check(got["DiagGGNApprox"], diag_ggn_approx_graph(whole, X, ref.H.diagonal()), "DiagGGNApprox")


def test_named_loss_with_operations_after_the_model_raises():
    """``loss=`` cannot describe a loss of ``g(f)``: curvhook must refuse, never be wrong. (A loss
    module or function called on ``g(f)`` is found and comes before the named loss: the scalar
    here is one curvhook does not find.)"""
    model = MLP().to(DT)
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(0, 5, (3,))
    loss_fn = lambda out: nn.functional.nll_loss((2 * out).log_softmax(1), y)  # noqa: E731
    ggn = FullGGN(loss=nn.CrossEntropyLoss())
    with pytest.raises(UnsupportedLossError, match="operations applied to the output after the model"):
        with extend(model, DiagGGN(loss=nn.CrossEntropyLoss()), ggn):
            loss_fn(model(X)).backward()


# ------------------------------------------------------------- deeper MLPs
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce_sum"])
@pytest.mark.parametrize("case", sorted(DEEP_MLPS))
def test_deeper_mlps(case, loss, n):
    model = randomize_linear(DEEP_MLPS[case]())
    X = torch.randn(n, 4, dtype=DT)
    loss_fn = {
        "ce": lambda: ce(torch.randint(0, 3, (n,))),
        "mse": lambda: mse(torch.randn(n, 3, dtype=DT)),
        "bce_sum": lambda: bce((torch.rand(n, 3, dtype=DT) > 0.5).to(DT), "sum"),
    }[loss]()
    check_against_reference(model, X, loss_fn)
