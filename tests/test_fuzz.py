"""Random architectures from a grammar of supported layers and graph constructs (``fuzz_grammar.py``).

Each example is a tiny float64 model drawn by hypothesis (residuals, ``cat``/``split``/``chunk``,
matmul between activations and attention, weight sharing, container parameters, custom
containers and a module without a rule, operations after the model, the three losses with
both reductions, N in {1, 2, 3, 5}) and checks all four extensions, BatchGrad, NTK and
GGNVectorProduct (one direction, or K = 2 on odd seeds; a dict or a list) against torch.func,
``p.grad`` against a plain backward and that no hook is left (``fuzz_grammar.check_case``).

CI runs the ``ci`` profile (conftest.py: a fixed seed, a few examples per family); locally,
``--hypothesis-profile thorough`` runs thousands (tests/README.md). A failure names its sort:
``[refusal]`` (a supported model refused), ``[wrong number]``, ``[crash]``,
``[grad changed]``, ``[hooks left]`` or ``[reference]`` (the test's own references failed).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_grammar import FAMILIES, Case, cases, check_case

# Cases of the grammar that CI always runs, whatever hypothesis draws: what a random search
# found refused or wrong (/work/scratch/fuzz_report.md of issue #20; ``eK``: catalogue entry K),
# and the constructs of entry 8 that pass. ``Case`` fields in order: family, input shape, steps,
# head, wrapper, operation after the model, loss, reduction, N, C (then keywords).
LINEAR_RELU_3D = [("linear", {"out": 3, "bias": True}), ("act", {"name": "ReLU", "inplace": True})]
FIXED = {
    "e8-param-times-input": Case("vec", (4,), [], "linear", "custom", "none", "ce", "mean", 5, 3, pre="scale"),
    "e8-x-at-w-first": Case(
        "seq", (2, 4), [("act", {"name": "Tanh", "inplace": False})], "linear", "custom", "none", "mse", "sum", 3, 2,
        pre="matmul",
    ),
    "e8-childless-module-as-model": Case("vec", (4,), [], "custom_leaf", "bare", "none", "ce", "mean", 5, 3),
    "e8-childless-module-as-model-post": Case("vec", (4,), [], "custom_leaf", "bare", "2tanh", "bce", "sum", 2, 3),
    "e9-inplace-after-linear-3d": Case("seq", (2, 4), LINEAR_RELU_3D, "linear", "sequential", "none", "ce", "mean", 5, 2),
    "e9-inplace-in-residual-3d": Case(
        "ids", (3,), [("embedding", {"f": 2, "padding_idx": 0}), ("residual", {"name": "Mish", "inplace": True})],
        "custom_leaf", "custom", "2tanh", "mse", "mean", 2, 3,
    ),
    "e9-inplace-after-unflatten": Case(
        "vec", (4,), [("to_seq", {"t": 2, "f": 3}), ("act", {"name": "Hardswish", "inplace": True})],
        "linear", "sequential", "none", "ce", "mean", 5, 2,
    ),
    "e5-rmsnorm2-after-relu": Case(
        "vec", (3,), [("linear", {"out": 2, "bias": True}), ("act", {"name": "ReLU", "inplace": False}), ("rmsnorm", {})],
        "linear", "sequential", "none", "ce", "sum", 5, 3, seed=11,
    ),
    # a saturated softmax (1 − p ≈ 2e-10): torch.func's CE Hessian keeps 6e-6 relative there,
    # so the reference uses reference.cross_entropy_hessian (curvhook agreed to 1e-15)
    "saturated-cross-entropy": Case(
        "ids", (1,), [("embedding", {"f": 3, "padding_idx": None})] + [("op_affine", {})] * 3, "linear", "sequential",
        "none", "ce", "mean", 1, 2,
    ),
    "mha-causal-mask-T-equals-N": Case(
        "seq", (3, 2), [("mha", {"heads": 1, "bias": True, "causal": True})], "linear", "sequential", "none", "ce", "mean", 3, 2,
    ),
}


@pytest.mark.parametrize("case", FIXED.values(), ids=FIXED.keys())
def test_fixed_case_is_exact(case):
    check_case(case)


@pytest.mark.parametrize("family", FAMILIES)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_supported_model_is_exact(family, data):
    """One drawn model of ``family`` (the input: vec, seq, ids, img1, img2): every check of ``check_case``."""
    check_case(data.draw(cases(family), label="case"))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_closed_form_loss_hessians_keep_their_digits_where_the_loss_saturates(reduction):
    """The reference's closed forms against 50-digit arithmetic, at logits where ``1 − p ≈ 1e-10``."""
    mpmath = pytest.importorskip("mpmath")

    from reference import bce_with_logits_hessian, cross_entropy_hessian

    mpmath.mp.dps = 50
    out = torch.tensor([[10.6023, -11.5753], [1.0, -2.0]], dtype=torch.float64)
    n, c = out.shape
    s = mpmath.mpf(n if reduction == "mean" else 1)
    exact = torch.zeros(n * c, n * c, dtype=torch.float64)
    for i in range(n):
        z = [mpmath.mpf(float(v)) for v in out[i]]
        e = [mpmath.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        for a in range(c):
            for b in range(c):
                exact[i * c + a, i * c + b] = float(((p[a] if a == b else 0) - p[a] * p[b]) / s)
    got = cross_entropy_hessian(out, reduction)
    torch.testing.assert_close(got, exact, rtol=1e-14, atol=0)
    y = torch.tensor([0, 1])
    func = torch.func.hessian(lambda o: torch.nn.functional.cross_entropy(o, y, reduction=reduction))(out)
    func = func.reshape(n * c, n * c)
    assert ((func - exact).abs() / exact.abs().clamp_min(1e-300))[exact != 0].max() > 1e-9  # why the closed form exists
    torch.testing.assert_close(func, exact, rtol=0, atol=1e-14)  # and agrees with torch.func absolutely

    sig = [1 / (1 + mpmath.exp(-mpmath.mpf(float(v)))) for v in out.flatten()]
    scale = mpmath.mpf(out.numel() if reduction == "mean" else 1)
    exact_bce = torch.diag(torch.tensor([float(q * (1 - q) / scale) for q in sig], dtype=torch.float64))
    torch.testing.assert_close(bce_with_logits_hessian(out, reduction), exact_bce, rtol=1e-14, atol=0)
