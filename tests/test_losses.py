"""``curvhook/losses.py`` and how the loss is used: loss Hessians (every supported option),
the factor of the cross-entropy Hessian, scaled and summed losses, nonlinear functions
of the loss, and the loss errors."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvhook import extend
from curvhook.errors import UnsupportedLossError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.losses import _softmax_factor
from helpers import check_against_reference, data, mlp, run_curvhook
from reference import collect, compare, reference

DT = torch.float64
N = 4
C = 3
GGN_EXTENSIONS = [DiagGGN, DiagGGNApprox, FullGGN]


def randomize(model):
    model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


# ------------------------------------------------------------------ models
def model_for(shape):
    """A small MLP whose output has per-sample shape ``shape``, made of leaf modules only."""
    numel = int(torch.tensor(shape).prod()) if shape else 1
    layers = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, numel)]
    if len(shape) == 0:
        layers.append(nn.Flatten(0))  # [N, 1] -> [N]
    elif len(shape) > 1:
        layers.append(nn.Unflatten(1, shape))
    return randomize(nn.Sequential(*layers))


def spatial_via_linear_on_positions():
    """``[N, C, d1]`` logits from a Linear that acts on ``[N, C, in]`` positions (no Unflatten)."""
    return randomize(nn.Sequential(nn.Unflatten(1, (C, 2)), nn.Linear(2, 5), nn.Sigmoid(), nn.Linear(5, 3)))


def class_targets(shape, c=C, ignore=None):
    y = torch.randint(0, c, shape)
    if ignore is not None:
        y.view(-1)[::3] = ignore  # some positions ignored, never all
    return y


def prob_targets(shape):
    return torch.softmax(torch.randn(shape, dtype=DT), 1)


CE_OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=torch.tensor([0.3, 1.0, 2.5], dtype=DT)),
    "ignore_index": dict(ignore_index=1),
    "ignore_index_default_-100": dict(),  # targets -100 put in below
    "label_smoothing": dict(label_smoothing=0.15),
    "weight_label_smoothing": dict(weight=torch.tensor([0.3, 1.0, 2.5], dtype=DT), label_smoothing=0.2),
    "weight_ignore_label_smoothing": dict(
        weight=torch.tensor([0.3, 1.0, 2.5], dtype=DT), ignore_index=2, label_smoothing=0.1
    ),
    "weight_ignore_-100": dict(weight=torch.tensor([0.3, 1.0, 2.5], dtype=DT)),
}

CE_SHAPES = {"NC": (C,), "NCd1": (C, 2), "NCd1d2": (C, 2, 2)}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("option", sorted(CE_OPTIONS))
@pytest.mark.parametrize("shape", sorted(CE_SHAPES))
def test_cross_entropy_class_targets(shape, option, reduction):
    out_shape = CE_SHAPES[shape]
    model = model_for(out_shape)
    X = torch.randn(N, 4, dtype=DT)
    target_shape = (N, *out_shape[1:])
    if option == "ignore_index":
        y = class_targets(target_shape, ignore=1)
    elif option.endswith("-100"):
        y = class_targets(target_shape, ignore=-100)
    elif option == "weight_ignore_label_smoothing":
        y = class_targets(target_shape, ignore=2)
    else:
        y = class_targets(target_shape)
    crit = nn.CrossEntropyLoss(reduction=reduction, **CE_OPTIONS[option])
    check_against_reference(model, X, lambda out: crit(out, y))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("option", ["plain", "weight", "label_smoothing", "weight_label_smoothing"])
@pytest.mark.parametrize("shape", sorted(CE_SHAPES))
def test_cross_entropy_probability_targets(shape, option, reduction):
    out_shape = CE_SHAPES[shape]
    model = model_for(out_shape)
    X = torch.randn(N, 4, dtype=DT)
    y = prob_targets((N, *out_shape))
    crit = nn.CrossEntropyLoss(reduction=reduction, **CE_OPTIONS[option])
    check_against_reference(model, X, lambda out: crit(out, y))


def test_cross_entropy_unnormalized_soft_targets():
    """Probability targets need not sum to one; the loss is still linear in them."""
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = torch.rand(N, C, dtype=DT) * 2
    crit = nn.CrossEntropyLoss()
    check_against_reference(model, X, lambda out: crit(out, y))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_spatial_from_linear_on_positions(reduction):
    model = spatial_via_linear_on_positions()  # [N, 6] -> [N, 3, 2] -> [N, 3, 5] -> [N, 3, 3]
    X = torch.randn(N, 6, dtype=DT)
    y = class_targets((N, 3))
    crit = nn.CrossEntropyLoss(reduction=reduction, weight=torch.tensor([1.0, 0.5, 2.0], dtype=DT))
    check_against_reference(model, X, lambda out: crit(out, y))


@pytest.mark.parametrize("n", [1, 3])
def test_cross_entropy_single_sample_and_single_valid_target(n):
    model = model_for((C,))
    X = torch.randn(n, 4, dtype=DT)
    y = torch.full((n,), -100)
    y[0] = 2
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    check_against_reference(model, X, lambda out: crit(out, y))


MSE_SHAPES = {"N": (), "NC": (C,), "NAB": (2, 3)}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", sorted(MSE_SHAPES))
def test_mse(shape, reduction):
    out_shape = MSE_SHAPES[shape]
    model = model_for(out_shape)
    X = torch.randn(N, 4, dtype=DT)
    y = torch.randn(N, *out_shape, dtype=DT)
    crit = nn.MSELoss(reduction=reduction)
    check_against_reference(model, X, lambda out: crit(out, y))


BCE_CASES = {
    "N_binary": ((), dict(), "binary"),
    "N_soft": ((), dict(), "soft"),
    "NC_multilabel": ((C,), dict(), "binary"),
    "NC_weight": ((C,), dict(weight=torch.tensor([0.5, 1.0, 3.0], dtype=DT)), "binary"),
    "NC_sample_weight": ((C,), dict(weight=torch.rand(N, 1, dtype=DT) + 0.2), "soft"),
    "NC_pos_weight": ((C,), dict(pos_weight=torch.tensor([2.0, 0.5, 4.0], dtype=DT)), "binary"),
    "NC_pos_weight_soft": ((C,), dict(pos_weight=torch.tensor([2.0, 0.5, 4.0], dtype=DT)), "soft"),
    "NC_weight_pos_weight": (
        (C,),
        dict(weight=torch.tensor([0.5, 1.0, 3.0], dtype=DT), pos_weight=torch.tensor([2.0, 0.5, 4.0], dtype=DT)),
        "soft",
    ),
    "NAB_pos_weight": ((2, 3), dict(pos_weight=torch.tensor([3.0, 0.2, 1.0], dtype=DT)), "binary"),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", sorted(BCE_CASES))
def test_bce_with_logits(case, reduction):
    out_shape, options, kind = BCE_CASES[case]
    model = model_for(out_shape)
    X = torch.randn(N, 4, dtype=DT)
    y = torch.rand(N, *out_shape, dtype=DT)
    if kind == "binary":
        y = (y > 0.5).to(DT)
    crit = nn.BCEWithLogitsLoss(reduction=reduction, **options)
    check_against_reference(model, X, lambda out: crit(out, y))


# ------------------------------------------------------- scaled and summed
def test_scaled_loss():
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = class_targets((N,))
    crit = nn.CrossEntropyLoss()
    check_against_reference(model, X, lambda out: crit(out, y) / 4)


@pytest.mark.parametrize("factor", [3.0, 0.01])
def test_multiplied_loss_mse(factor):
    model = model_for((2, 3))
    X = torch.randn(N, 4, dtype=DT)
    y = torch.randn(N, 2, 3, dtype=DT)
    crit = nn.MSELoss(reduction="sum")
    check_against_reference(model, X, lambda out: factor * crit(out, y))


def test_sum_of_two_cross_entropies_with_different_reductions():
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = class_targets((N,))
    mean, total = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1)
    check_against_reference(model, X, lambda out: mean(out, y) + 0.5 * total(out, y))


def test_sum_of_mse_and_bce_on_the_same_output():
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y_reg, y_bin = torch.randn(N, C, dtype=DT), (torch.rand(N, C, dtype=DT) > 0.5).to(DT)
    mse, bce = nn.MSELoss(), nn.BCEWithLogitsLoss(reduction="sum", pos_weight=torch.full((C,), 2.0, dtype=DT))
    check_against_reference(model, X, lambda out: (mse(out, y_reg) + 2 * bce(out, y_bin)) / 3)


def test_same_loss_module_called_twice():
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y1, y2 = class_targets((N,)), class_targets((N,))
    crit = nn.CrossEntropyLoss()
    check_against_reference(model, X, lambda out: crit(out, y1) + crit(out, y2))


def test_metric_loss_that_is_not_backpropagated_is_ignored():
    """An unsupported loss computed on the output for logging only must not disturb the result."""
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = class_targets((N,))
    crit, metric = nn.CrossEntropyLoss(), nn.L1Loss()
    target = F.one_hot(y, C).to(DT)

    def loss_fn(out):
        metric(out, target)  # computed with grad, but not part of the backpropagated scalar
        return crit(out, y)

    check_against_reference(model, X, loss_fn)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_reduction_none_raises_from_backward(loss, ext):
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    crit, y = {
        "ce": (nn.CrossEntropyLoss(reduction="none"), class_targets((N,))),
        "mse": (nn.MSELoss(reduction="none"), torch.randn(N, C, dtype=DT)),
        "bce": (nn.BCEWithLogitsLoss(reduction="none"), torch.rand(N, C, dtype=DT)),
    }[loss]
    with extend(model, ext()):
        loss_value = crit(model(X), y).sum()  # the forward must not raise
        with pytest.raises(UnsupportedLossError, match="reduction"):
            loss_value.backward()


@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
def test_reduction_none_mean_of_single_sample_raises(ext):
    model = model_for((C,))
    X = torch.randn(1, 4, dtype=DT)
    with extend(model, ext()):
        loss_value = nn.CrossEntropyLoss(reduction="none")(model(X), class_targets((1,))).mean()
        with pytest.raises(UnsupportedLossError):
            loss_value.backward()


@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
@pytest.mark.parametrize("loss", ["L1Loss", "NLLLoss", "HuberLoss", "SmoothL1Loss", "BCELoss"])
def test_unsupported_loss_module_raises(loss, ext):
    """Named in the error; NLLLoss and BCELoss point to the supported loss of the logits."""
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    crit = getattr(nn, loss)()
    y = class_targets((N,)) if loss == "NLLLoss" else torch.rand(N, C, dtype=DT)
    prepare = {"NLLLoss": lambda o: o.log_softmax(1), "BCELoss": torch.sigmoid}.get(loss, lambda o: o)
    remedy = {"NLLLoss": "use nn.CrossEntropyLoss", "BCELoss": "use nn.BCEWithLogitsLoss"}.get(loss, "")
    with extend(model, ext()):
        value = crit(prepare(model(X)), y)
        with pytest.raises(UnsupportedLossError, match=f"{loss}.*{remedy}"):
            value.backward()
    assert not hasattr(model[0].weight, ext.attribute)


def _functional_case(case):
    """``(output shape, loss of the output)`` of a functional loss as users call it."""
    kind, _, option = case.partition("/")
    reduction = "sum" if option.endswith("sum") else "mean"
    if kind == "ce":
        opts = dict(CE_OPTIONS[option.removesuffix("_sum")], reduction=reduction) if option != "probabilities" else {}
        y = prob_targets((N, C)) if option == "probabilities" else class_targets(
            (N,), ignore=-100 if option.endswith("-100") else opts.get("ignore_index"))
        return (C,), lambda out: F.cross_entropy(out, y, **opts)
    if kind == "ce_spatial":  # keywords only, classes on axis 1
        y = class_targets((N, 2))
        return (C, 2), lambda out: F.cross_entropy(input=out, target=y, label_smoothing=0.1)
    if kind == "ce_tokens":  # a language model's loss: [N, T, V] merged into rows
        y = class_targets((N, 2), c=C)
        return (2, C), lambda out: F.cross_entropy(out.reshape(-1, C), y.reshape(-1), reduction=reduction)
    if kind == "mse":
        y = torch.randn(N, 2, 3, dtype=DT)
        return (2, 3), lambda out: F.mse_loss(out, y, reduction=reduction)
    if kind == "bce":
        opts = {k: v for k, v in BCE_CASES[option.removesuffix("_sum")][1].items()}
        y = torch.rand(N, C, dtype=DT)
        return (C,), lambda out: F.binary_cross_entropy_with_logits(out, y, reduction=reduction, **opts)
    raise KeyError(case)


FUNCTIONAL_CASES = [
    *(f"ce/{option}" for option in sorted(CE_OPTIONS)), "ce/plain_sum", "ce/weight_sum", "ce/probabilities",
    "ce_spatial", "ce_tokens", "ce_tokens/sum", "mse", "mse/sum",
    "bce/NC_multilabel", "bce/NC_weight_pos_weight", "bce/NC_pos_weight_sum",
]


@pytest.mark.parametrize("case", FUNCTIONAL_CASES)
def test_functional_losses_are_found_like_their_modules(case):
    """``F.cross_entropy(model(X), y)``, ``F.mse_loss`` and ``F.binary_cross_entropy_with_logits``
    in the block are found like their modules, with their options (weights, ignored
    targets, label smoothing, reductions, merged token rows). Every GGN extension raised
    "needs the loss" before: the user had to name it."""
    torch.manual_seed(0)
    shape, loss = _functional_case(case)
    model = model_for(shape)
    check_against_reference(model, torch.randn(N, 4, dtype=DT), loss)


def test_a_functional_loss_in_a_loss_module_is_counted_once():
    """``nn.CrossEntropyLoss`` calls ``F.cross_entropy``: one loss, not two (twice the GGN)."""
    torch.manual_seed(0)
    model, y = model_for((C,)), class_targets((N,))
    check_against_reference(model, torch.randn(N, 4, dtype=DT), lambda out: nn.CrossEntropyLoss()(out, y) + F.cross_entropy(out, y))


@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
def test_a_functional_loss_with_an_option_its_module_lacks_is_not_taken(ext):
    """``F.mse_loss(out, y, weight=w)`` (torch >= 2.7) has no ``nn.MSELoss`` twin: not taken as
    that loss, so the extensions that need the loss say so (and suggest naming it)."""
    if "weight" not in inspect.signature(F.mse_loss).parameters:
        pytest.skip("F.mse_loss has no weight on this torch")
    model, X = model_for((C,)), torch.randn(N, 4, dtype=DT)
    y, w = torch.randn(N, C, dtype=DT), torch.rand(N, C, dtype=DT)
    with extend(model, ext()):
        value = F.mse_loss(model(X), y, weight=w)
        with pytest.raises(UnsupportedLossError, match="loss="):
            value.backward()


@pytest.mark.parametrize(
    "functional, named, target",
    [
        (lambda out, y: F.cross_entropy(out, y), nn.CrossEntropyLoss(), "class"),
        (lambda out, y: F.cross_entropy(out, y, reduction="sum"), nn.CrossEntropyLoss(reduction="sum"), "class"),
        (lambda out, y: F.cross_entropy(out, y, label_smoothing=0.2), nn.CrossEntropyLoss(label_smoothing=0.2), "class"),
        (lambda out, y: F.mse_loss(out, y), nn.MSELoss(), "real"),
        (lambda out, y: F.mse_loss(out, y, reduction="sum"), nn.MSELoss(reduction="sum"), "real"),
        (lambda out, y: F.binary_cross_entropy_with_logits(out, y), nn.BCEWithLogitsLoss(), "unit"),
    ],
    ids=["ce_mean", "ce_sum", "ce_smoothing", "mse_mean", "mse_sum", "bce_mean"],
)
def test_named_loss_with_functional_loss_is_exact(functional, named, target):
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = {"class": class_targets((N,)), "real": torch.randn(N, C, dtype=DT), "unit": torch.rand(N, C, dtype=DT)}[target]
    ggn = FullGGN(loss=named)
    computes_its_loss = ComputesItsLoss(model, lambda out: functional(out, y))  # only the named loss describes it
    with extend(computes_its_loss, DiagGGN(loss=named), DiagGGNApprox(loss=named), ggn, BatchJacobian()):
        computes_its_loss(X)[1].backward()
    got = collect(model, N)
    compare(got, reference(model, X, lambda out: functional(out, y)), ggn.matrix)


@pytest.mark.parametrize(
    "scalar, named",
    [
        (lambda out, y: F.cross_entropy(out, y) / 4, nn.CrossEntropyLoss()),  # gradient accumulation
        (lambda out, y: 0.5 * nn.CrossEntropyLoss()(out, y), nn.CrossEntropyLoss()),
        (lambda out, y: F.cross_entropy(out, y), nn.CrossEntropyLoss(reduction="sum")),  # the name is wrong
        (lambda out, y: F.cross_entropy(2 * out, y), nn.CrossEntropyLoss()),  # an operation after the model
    ],
    ids=["functional_over_4", "module_times_half", "named_sum_called_mean", "after_the_model"],
)
def test_a_loss_found_in_the_block_comes_before_a_named_one(scalar, named):
    """A named loss has no multiple and no targets; a loss called in the block has both. With a
    loss named, ``F.cross_entropy(out, y) / 4`` gave 4 times the GGN, and a mean loss named as
    a sum N times; the loss found is used now, exact."""
    torch.manual_seed(0)
    model, X, y = model_for((C,)), torch.randn(N, 4, dtype=DT), class_targets((N,))
    ggn = FullGGN(loss=named)
    with extend(model, DiagGGN(loss=named), DiagGGNApprox(loss=named), ggn):
        scalar(model(X), y).backward()
    compare(collect(model, N, ("DiagGGN", "DiagGGNApprox", "FullGGN")), reference(model, X, lambda out: scalar(out, y)), ggn.matrix)


def test_named_loss_for_cross_entropy_on_spatial_output():
    model = model_for((C, 2, 2))
    X = torch.randn(N, 4, dtype=DT)
    y = class_targets((N, 2, 2))
    named = nn.CrossEntropyLoss()
    computes_its_loss = ComputesItsLoss(model, lambda out: F.cross_entropy(out, y))
    with extend(computes_its_loss, DiagGGN(loss=named), DiagGGNApprox(loss=named)):
        computes_its_loss(X)[1].backward()
    compare(collect(model, N, ("DiagGGN", "DiagGGNApprox")), reference(model, X, lambda out: F.cross_entropy(out, y)))


@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
@pytest.mark.parametrize(
    "extra",
    [
        lambda out: out.pow(2).sum(),
        lambda out: 1e-3 * out.pow(2).sum(),
        lambda out: out.exp().mean(),
    ],
    ids=["squared", "small_squared", "exp"],
)
def test_extra_output_term_raises(extra, ext):
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = class_targets((N,))
    crit = nn.CrossEntropyLoss()
    with extend(model, ext()):
        out = model(X)
        value = crit(out, y) + extra(out)
        with pytest.raises(UnsupportedLossError):
            value.backward()


@pytest.mark.parametrize(
    "exts",
    [
        lambda: [BatchJacobian(), DiagGGN()],
        lambda: [BatchJacobian(), DiagGGNApprox(), FullGGN()],
        lambda: [DiagGGN(loss=nn.CrossEntropyLoss()), DiagGGNApprox()],
    ],
    ids=["jacobian_then_diag", "jacobian_then_two_sources", "named_then_found"],
)
def test_extra_output_term_raises_with_several_sources(exts):
    """The loss check runs once per backward pass, by a source that uses the found loss."""
    model = model_for((C,))
    X, y = torch.randn(N, 4, dtype=DT), class_targets((N,))
    with extend(model, *exts()):
        out = model(X)
        with pytest.raises(UnsupportedLossError):
            (nn.CrossEntropyLoss()(out, y) + 1e-3 * out.pow(2).sum()).backward()


NONLINEAR = {
    "square": lambda losses: losses[0].pow(2),
    "exp": lambda losses: losses[0].exp(),
    "sqrt": lambda losses: losses[0].sqrt(),
    "log": lambda losses: (1 + losses[0]).log(),
    "product_of_two_losses": lambda losses: losses[0] * losses[1],
}


@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
@pytest.mark.parametrize("phi", sorted(NONLINEAR))
def test_nonlinear_function_of_the_loss_is_never_silently_wrong(phi, ext):
    """ℓ = φ(L) has the Hessian φ'(L) ∂²L + φ''(L) ∇L ∇Lᵀ: curvhook must raise (as the docs
    promise) or, if it ever supports it, return the exact GGN of ℓ. Not φ'(L) · GGN(L)."""
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y1, y2 = torch.randn(N, C, dtype=DT), torch.randn(N, C, dtype=DT)
    crit1, crit2 = nn.MSELoss(), nn.MSELoss(reduction="sum")
    loss_fn = lambda out: NONLINEAR[phi]([crit1(out, y1), crit2(out, y2)])  # noqa: E731
    try:
        got, matrix, _ = run_curvhook(model, X, loss_fn, which=(ext.__name__,))
    except UnsupportedLossError:
        return
    compare(got, reference(model, X, loss_fn, approx=ext is DiagGGNApprox), matrix)


@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
def test_negative_multiple_of_loss_raises(ext):
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = class_targets((N,))
    with extend(model, ext()):
        value = -nn.CrossEntropyLoss()(model(X), y)
        with pytest.raises(UnsupportedLossError):
            value.backward()


@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
def test_backward_from_output_without_loss_raises_for_ggn(ext):
    model = model_for((C,))
    with extend(model, ext()):
        value = model(torch.randn(N, 4, dtype=DT)).sum()
        with pytest.raises(UnsupportedLossError):
            value.backward()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", [(C,), (2, 3), ()])
def test_batch_jacobian_alone_without_loss(shape, n):
    model = model_for(shape)
    X = torch.randn(n, 4, dtype=DT)
    got, _, _ = run_curvhook(model, X, lambda out: out.sum(), which=("BatchJacobian",))
    compare(got, reference(model, X))


def test_batch_jacobian_ignores_the_loss():
    """BatchJacobian needs no loss, so an unsupported or 'none'-reduced loss is fine."""
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    crit = nn.L1Loss(reduction="none")
    y = torch.randn(N, C, dtype=DT)
    got, _, _ = run_curvhook(model, X, lambda out: crit(out, y).pow(2).sum(), which=("BatchJacobian",))
    compare(got, reference(model, X))


def test_named_loss_rejected_for_batch_jacobian():
    with pytest.raises(TypeError):
        BatchJacobian(loss=nn.MSELoss())


def test_all_supported_losses_listed():
    from curvhook import supported_losses

    assert set(supported_losses()) >= {nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss}


def test_loss_called_with_keyword_arguments():
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = class_targets((N,))
    crit = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=DT))
    check_against_reference(model, X, lambda out: crit(input=out, target=y))


@pytest.mark.parametrize(
    "case",
    ["ce_negative_weight", "named_ce_with_weight", "named_bce_with_pos_weight", "bce_pos_weight_target_above_one"],
)
def test_losses_whose_hessian_cannot_be_formed_raise(case):
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    if case == "ce_negative_weight":
        crit, y = nn.CrossEntropyLoss(weight=torch.tensor([1.0, -0.5, 1.0], dtype=DT)), class_targets((N,))
        ext, call = DiagGGN(), lambda out: crit(out, y)
    elif case == "named_ce_with_weight":
        w = torch.tensor([1.0, 2.0, 1.0], dtype=DT)
        y = class_targets((N,))
        ext = DiagGGN(loss=nn.CrossEntropyLoss(weight=w))
        model, call = ComputesItsLoss(model, lambda out: F.cross_entropy(out, y, weight=w)), lambda out: out[1]
    elif case == "named_bce_with_pos_weight":
        pw = torch.full((C,), 2.0, dtype=DT)
        y = torch.rand(N, C, dtype=DT)
        ext = FullGGN(loss=nn.BCEWithLogitsLoss(pos_weight=pw))
        model = ComputesItsLoss(model, lambda out: F.binary_cross_entropy_with_logits(out, y, pos_weight=pw))
        call = lambda out: out[1]  # noqa: E731  (the loss in the forward: only the named loss describes it)
    else:  # r y + 1 - y < 0: the second derivative is negative
        crit = nn.BCEWithLogitsLoss(pos_weight=torch.full((C,), 0.5, dtype=DT))
        y = torch.full((N, C), 3.0, dtype=DT)
        ext, call = DiagGGNApprox(), lambda out: crit(out, y)
    with extend(model, ext):
        value = call(model(X))
        with pytest.raises(UnsupportedLossError, match="needs the targets" if case.startswith("named") else ""):
            value.backward()


@pytest.mark.parametrize("ext", GGN_EXTENSIONS)
def test_backward_on_something_other_than_the_loss_raises(ext):
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    with extend(model, ext()):
        out = model(X)
        nn.CrossEntropyLoss()(out, class_targets((N,)))  # computed, but not backpropagated
        with pytest.raises(UnsupportedLossError):
            out.pow(2).sum().backward()


def test_bce_without_pos_weight_targets_outside_unit_interval_are_exact():
    """Without pos_weight the BCE Hessian σ(1-σ) does not depend on the target at all."""
    model = model_for((C,))
    X = torch.randn(N, 4, dtype=DT)
    y = torch.rand(N, C, dtype=DT) * 3 - 1
    crit = nn.BCEWithLogitsLoss(weight=torch.tensor([1.0, 0.2, 2.0], dtype=DT))
    check_against_reference(model, X, lambda out: crit(out, y))


# ------------------------------------------------ the cross-entropy Hessian factor
@pytest.mark.parametrize("c", [1, 2, 3, 10])
def test_softmax_factor_squares_to_the_cross_entropy_hessian(c):
    torch.manual_seed(3)
    logits = torch.randn(6, c, dtype=DT) * 3
    logits[0] = torch.tensor([60.0] + [0.0] * (c - 1), dtype=DT)  # saturated: p is one-hot
    p = logits.softmax(-1)
    q = _softmax_factor(p)
    assert q.shape == (6, c, c - 1)
    factor = q * p.sqrt().unsqueeze(-1)
    for i in range(6):
        f = lambda z: torch.nn.functional.cross_entropy(z[None], torch.tensor([0]))  # noqa: E731
        hess = torch.func.hessian(f)(logits[i])
        torch.testing.assert_close(factor[i] @ factor[i].T, hess, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(q[i].T @ q[i], torch.eye(c - 1, dtype=DT), rtol=0, atol=1e-12)


# ---------------------- nonlinear functions of the loss, watched and not
@pytest.mark.parametrize("use", ["exp_logged", "detached_square", "item"])
def test_nonlinear_function_of_the_loss_that_is_not_backpropagated_is_fine(use):
    """Logging exp(loss) (a perplexity) must not trip the nonlinearity check."""
    model = mlp()
    X, y = data()
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        loss = crit(model(X), y)
        logged = {"exp_logged": lambda: loss.exp(), "detached_square": lambda: loss.detach() ** 2,
                  "item": lambda: loss.item()}[use]()
        (2.0 * loss + 1.0).backward()
    ref = reference(model, X, lambda out: 2.0 * crit(out, y), approx=False)
    compare(collect(model, 4, ("DiagGGN",)), ref)
    assert logged is not None


def test_nonlinear_function_of_the_loss_raises_before_any_result_is_written():
    model = mlp()
    X, y = data()
    with extend(model, DiagGGN()):
        loss = nn.CrossEntropyLoss()(model(X), y)
        with pytest.raises(UnsupportedLossError, match="nonlinear function of a loss"):
            (loss * loss).backward()
    assert not any(hasattr(p, "diag_ggn") for p in model.parameters())


def test_a_layer_of_the_model_applied_to_a_loss_value_is_watched():
    """Inside torch layers the mode is off the stack, except for inputs that carry a loss value."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Softplus()).to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    crit = nn.CrossEntropyLoss()
    with extend(model, DiagGGN()):
        loss = crit(model(X), y)
        again = model(loss.expand(4, 3))  # the model's layers on the loss value: nonlinear in it
        with pytest.raises(UnsupportedLossError, match="nonlinear function of a loss"):
            (loss + crit(again, y)).backward()



# ------------------------------------------------------- named losses: what the gradient says
T, V = 5, 6  # tokens and vocabulary of a per-token head [N, T, V]


class ComputesItsLoss(nn.Module):
    """A model that returns ``(logits, loss)``, the loss computed in its ``forward`` (Hugging Face's ``labels=``)."""

    def __init__(self, net: nn.Module, loss_of_logits) -> None:
        super().__init__()
        self.net, self.loss_of_logits = net, loss_of_logits

    def forward(self, x):
        logits = self.net(x)
        return logits, self.loss_of_logits(logits)


def _named_case(case):
    """``(model, X, named loss, the scalar backpropagated)`` of one misuse of a named loss."""
    X = torch.randn(N, 4, dtype=DT)
    if case in ("token_head_ce_over_last_axis", "hf_shifted_labels"):  # a language model's loss, in its forward
        if case == "token_head_ce_over_last_axis":  # classes on the last axis
            y = class_targets((N, T), c=V)
            loss = lambda out: F.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
        else:  # what a Hugging Face causal LM given labels= computes
            y = class_targets((N, T), c=V, ignore=-100)
            loss = lambda out: F.cross_entropy(out[:, :-1].flatten(0, 1), y[:, 1:].flatten())  # noqa: E731
        return ComputesItsLoss(model_for((T, V)), loss), X, nn.CrossEntropyLoss(), lambda out: out[1]
    # The loss in the model's forward: a named loss is then the only description of it (a loss
    # called in the block after the model is found and used instead).
    if case == "ignored_samples":
        y = class_targets((N,), ignore=-100)
        loss, named = lambda out: F.cross_entropy(out, y, ignore_index=-100), nn.CrossEntropyLoss()  # noqa: E731
    elif case == "ce_named_mse_used":
        y = torch.randn(N, C, dtype=DT)
        loss, named = lambda out: F.mse_loss(out, y), nn.CrossEntropyLoss()  # noqa: E731
    elif case == "bce_summed_named_mean":  # the gradient is N C times what the named mean implies
        y = torch.rand(N, C, dtype=DT)
        loss = lambda out: F.binary_cross_entropy_with_logits(out, y, reduction="sum")  # noqa: E731
        named = nn.BCEWithLogitsLoss()
    else:
        raise KeyError(case)
    return ComputesItsLoss(model_for((C,)), loss), X, named, lambda out: out[1]


NAMED_MISUSES = ["token_head_ce_over_last_axis", "hf_shifted_labels", "ignored_samples", "ce_named_mse_used",
                 "bce_summed_named_mean"]


@pytest.mark.parametrize("ext", [DiagGGN, DiagGGNApprox, FullGGN])
@pytest.mark.parametrize("case", NAMED_MISUSES)
def test_a_named_loss_that_is_not_the_backpropagated_scalar_raises(case, ext):
    """A named loss has no targets, but the gradient at the model output tells which targets it
    would need: distributions over axis 1 for CrossEntropyLoss, values in [0, 1] for
    BCEWithLogitsLoss, and a gradient at every position. A per-token head's loss over the last
    axis (what Hugging Face's ``labels=`` computes, which the error for ``labels=`` suggested
    naming), ignored labels, or another loss gave wrong numbers (up to 0.8 relative) silently."""
    torch.manual_seed(0)
    model, X, named, scalar = _named_case(case)
    with extend(model, ext(loss=named)):
        value = scalar(model(X))
        with pytest.raises(UnsupportedLossError, match="not that of this loss applied to the model output"):
            value.backward()


@pytest.mark.parametrize("options", ["plain", "sum", "label_smoothing", "probabilities", "spatial"])
def test_a_named_cross_entropy_that_is_the_backpropagated_scalar_passes_its_check(options):
    """The check lets every correct use through, exact against the reference."""
    torch.manual_seed(0)
    shape = (C, 2) if options == "spatial" else (C,)
    model, X = model_for(shape), torch.randn(N, 4, dtype=DT)
    kwargs = {"sum": dict(reduction="sum"), "label_smoothing": dict(label_smoothing=0.2)}.get(options, {})
    y = prob_targets((N, C)) if options == "probabilities" else class_targets((N, *shape[1:]))
    named = nn.CrossEntropyLoss(**kwargs)
    computes_its_loss = ComputesItsLoss(model, lambda out: F.cross_entropy(out, y, **kwargs))
    with extend(computes_its_loss, DiagGGN(loss=named)):
        computes_its_loss(X)[1].backward()
    got = torch.cat([p.diag_ggn.flatten() for p in model.parameters()])
    ref = reference(model, X, lambda out: named(out, y))
    compare({"DiagGGN": got}, ref)


def test_a_loss_computed_in_float32_on_a_float64_model_is_checked_at_float32_precision():
    """Hugging Face's causal-LM loss upcasts: ``F.cross_entropy(logits.float(), y)``. On a float64
    model the gradient reaching the output is only float32-precise, and the check refused it
    against float64's tolerance. The results agree with the float64 loss to float32's precision."""
    torch.manual_seed(0)
    model, X, y = model_for((C,)), torch.randn(N, 4, dtype=DT), class_targets((N,))
    with extend(model, DiagGGN()):
        F.cross_entropy(model(X).float(), y).backward()
    got = torch.cat([p.diag_ggn.flatten() for p in model.parameters()])
    ref = reference(model, X, lambda out: F.cross_entropy(out, y), approx=False)
    compare({"DiagGGN": got}, ref, rtol=1e-5, atol_factor=1e-6)
