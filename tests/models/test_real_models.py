"""Real models as users bring them: torchvision, timm and Hugging Face transformers.

Each model is built by its package's own constructor with a tiny config and
random weights, called as the user calls it (``model(**batch)``, a Hugging Face
``ModelOutput`` back, the usual language-model loss over merged axes), and
every exact extension is compared with the torch.func reference in float64
(``zoo.exact_reference``). The packages are the test extra ``models``
(setup.cfg); without one of them its models are skipped.
"""

from __future__ import annotations

import pytest
import torch

from curvhook import extend
from curvhook.errors import UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.rules import tensor_ops
from graph_reference import diag_ggn_approx_graph
from helpers import fallback_spy
from reference import check
from zoo import MODELS, available, exact_reference, loss_hessian_diag, zero_jacobian_parameters


def _case(name: str, n: int = 2):
    package, build = MODELS[name]
    if not available(package):
        pytest.skip(f"{package} is not installed (pip install -e '.[models]')")
    torch.manual_seed(0)
    return build(n)


def _run(case, *extensions):
    with extend(case.model, *extensions):
        out = case.forward()
        case.loss(case.logits(out), case.criterion).backward()
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_extensions_match_torch_func(name):
    """DiagGGN, FullGGN and BatchJacobian of the trainable parameters, exact to 1e-10 relative."""
    case = _case(name)
    ref = exact_reference(case)
    assert not zero_jacobian_parameters(case, ref), "trainable parameters that nothing reaches: the test compares zeros"
    ggn = FullGGN()
    _run(case, DiagGGN(), BatchJacobian(), ggn)
    params = ref.params
    n, o = ref.J.shape[:2]
    diag = torch.cat([p.diag_ggn.flatten() for p in params])
    check(diag, ref.G.diagonal(), f"real/{name}/DiagGGN", rtol=case.rtol, atol_factor=case.rtol)
    check(ggn.matrix, ref.G, f"real/{name}/FullGGN", rtol=case.rtol, atol_factor=case.rtol)
    jac = torch.cat([p.batch_jacobian.reshape(n, o, -1) for p in params], dim=2)
    check(jac, ref.J, f"real/{name}/BatchJacobian", rtol=case.rtol, atol_factor=case.rtol)


@pytest.mark.parametrize("name", ["transformers.Bert", "transformers.GPT2", "torchvision.VisionTransformer"])
def test_batch_of_one(name):
    """N = 1: the batch axis and the leading axis of shared tensors have the same size."""
    case = _case(name, n=1)
    ref = exact_reference(case)
    _run(case, DiagGGN())
    check(torch.cat([p.diag_ggn.flatten() for p in ref.params]), ref.G.diagonal(), f"real/{name}/N=1", rtol=case.rtol, atol_factor=case.rtol)


# Batch sizes equal to a size of the model: LeViT's attention-bias index and T5's relative
# positions have L = N rows, MaxViT's coordinate table 3 rows; with N = 1 a leading axis of
# one is everywhere (Swin's bias module, DeBERTa's relative embeddings). A constant made from
# buffers alone has no batch axis, whatever its size (curvhook/fixed_constants.py); before,
# these were refused or went to the fallback at that one batch size.
COINCIDENT = [
    ("timm.levit_128s", 4), ("transformers.T5", 5), ("timm.maxvit", 3), ("transformers.Swin", 1),
    ("torchvision.swin_v2", 1), ("transformers.DebertaV2", 1),
]


@pytest.mark.parametrize("name,n", COINCIDENT)
def test_batch_size_equal_to_a_size_of_the_model(name, n, monkeypatch):
    served = fallback_spy(monkeypatch)
    case = _case(name, n=n)
    ref = exact_reference(case)
    _run(case, DiagGGN(), DiagGGNApprox())
    got = torch.cat([p.diag_ggn.flatten() for p in ref.params])
    check(got, ref.G.diagonal(), f"real/{name}/N={n}", rtol=case.rtol, atol_factor=case.rtol)
    assert served == []


# The vision models of one tensor input `x` (the graph reference, tests/graph_reference.py,
# calls the model on one tensor; it runs every operation per sample with dense Jacobians).
DEFINITION_CHECKED = [
    "torchvision.resnet18", "torchvision.mobilenet_v3_small", "timm.resnet10t", "timm.resnetv2_bit", "timm.nfnet",
    "timm.resnetblur", "timm.ghostnetv2",
]


@pytest.mark.parametrize("name", DEFINITION_CHECKED)
def test_diag_ggn_approx_follows_its_definition(name):
    """DiagGGNApprox against its definition applied operation by operation (dense per-sample Jacobians)."""
    case = _case(name)
    _run(case, DiagGGNApprox())
    got = torch.cat([p.diag_ggn_approx.flatten() for p in case.model.parameters() if p.requires_grad])
    expected = diag_ggn_approx_graph(case.model, case.inputs["x"], loss_hessian_diag(case))
    check(got, expected, f"real/{name}/DiagGGNApprox", rtol=1e-10)


# Models that merge the batch axis with other axes inside a block (OPT's MLP on [N·L, H],
# DeBERTa's heads, Swin's windows, LeViT's norms on x.flatten(0, 1)): the merged rows are
# followed as pseudo-samples (curvhook/row_groups.py); before, each such block was one
# module for the fallback's per-sample Jacobians.
MERGED_ROWS = [
    "transformers.OPT", "transformers.DebertaV2", "transformers.Swin", "torchvision.swin_v2", "timm.levit_128s",
    "timm.maxvit", "torchvision.swin", "transformers.Swin-shifted", "timm.hiera", "timm.gcvit",
    "timm.samvit", "timm.botnet", "timm.halonet",
]


@pytest.mark.parametrize("name", MERGED_ROWS)
def test_merged_rows_need_no_fallback(name, monkeypatch):
    served = fallback_spy(monkeypatch)
    case = _case(name)
    _run(case, DiagGGN(), DiagGGNApprox())
    # (OPT's learned position embedding, which computes its positions from the attention mask
    # and calls F.embedding, counts as that call since session 40: no fallback either)
    assert served == []


@pytest.mark.parametrize("name", [
    "transformers.Swin-shifted", "transformers.DebertaV2", "transformers.Bart", "transformers.Bart-pairs",
    "transformers.OPT", "transformers.GPT2-classifier", "transformers.Falcon", "transformers.Falcon-alibi",
    "transformers.Gemma", "transformers.Phi3", "transformers.Olmo2", "transformers.Cohere",
    "timm.resnetblur", "timm.ghostnetv2", "timm.botnet", "timm.halonet",
    "transformers.ConvNextV2", "transformers.Bit", "transformers.Pvt", "transformers.Mixtral", "transformers.Qwen2Moe",
    "transformers.DeepseekV3", "transformers.DeepseekV2", "transformers.GraniteMoe", "transformers.GptOss",
])
def test_positions_and_pooling_take_no_dense_jacobians_nor_the_fallback(name, monkeypatch):
    """HF Swin's shifted-window mask (it carries the batch axis and the bias's grad),
    DeBERTa's relative-position ``gather``, BART's end-of-sequence pooling ``h[eos, :]`` and
    GPT-2's last-token pooling have closed forms; BART's and OPT's learned position
    embeddings count as their ``F.embedding``; Falcon's ``FalconLinear`` takes the rule of
    ``nn.Linear``, Gemma's ``GemmaRMSNorm`` (weight ``1 + w``) that of ``nn.RMSNorm``, and so do
    Phi-3's and OLMo 2's RMSNorms and Cohere's LayerNorm (matched by the end of their names,
    proven on probes); Hugging Face's ``ConvNextV2GRN`` and ``WeightStandardizedConv2d`` take the
    rules of timm's ``GlobalResponseNorm`` and ``StdConv2d``; DeepSeek-V2's rotary embedding in
    complex numbers has closed-form diagonals (refused before). At real widths the dense per-sample
    Jacobians ran out of memory, and BART's position embedding in the fallback took
    288 s of a 289 s step (benchmarks/real_sizes.py)."""

    def dense(call):
        raise AssertionError(f"{call.name}: dense per-sample Jacobian")

    monkeypatch.setattr(tensor_ops, "_warn_dense_once", dense)
    served = fallback_spy(monkeypatch)
    _run(_case(name), DiagGGNApprox())
    assert served == []


# (torchvision's Swin V2 writes into a cloned bias in place, which the graph reference's replay refuses)
@pytest.mark.parametrize("name", ["timm.levit_128s", "timm.maxvit", "torchvision.swin", "timm.hiera", "timm.gcvit",
                                  "timm.samvit", "timm.botnet", "timm.halonet"])
def test_diag_ggn_approx_on_merged_rows_follows_its_definition(name):
    """As above, with each tensor's batch axis and rows per sample found by the reference.
    timm's attention is run unfused: the reference counts ``F.scaled_dot_product_attention``
    as one operation, DiagGGNApprox as its operations (``split_attention``, docs/mathematics.md).
    Activations run out of place: the reference keys diagonals by tensor, and an in-place
    activation's output is its input (curvhook gives the same either way)."""
    case = _case(name)
    for m in case.model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    _run(case, DiagGGNApprox())
    in_place = torch.cat([p.diag_ggn_approx.flatten() for p in case.model.parameters() if p.requires_grad])
    for m in case.model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    _run(case, DiagGGNApprox())
    got = torch.cat([p.diag_ggn_approx.flatten() for p in case.model.parameters() if p.requires_grad])
    torch.testing.assert_close(in_place, got, rtol=1e-12, atol=0)
    expected = diag_ggn_approx_graph(case.model, case.inputs["x"], loss_hessian_diag(case), moved_axes=True)
    check(got, expected, f"real/{name}/DiagGGNApprox", rtol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_diag_ggn_approx_runs_and_is_nonnegative(name):
    """DiagGGNApprox on every model: finite, nonnegative, shaped like the parameters."""
    case = _case(name)
    _run(case, DiagGGNApprox())
    for p in case.model.parameters():
        if p.requires_grad:
            assert p.diag_ggn_approx.shape == p.shape
            assert torch.isfinite(p.diag_ggn_approx).all() and (p.diag_ggn_approx >= 0).all()


def test_gradient_untouched_on_a_hugging_face_model():
    case = _case("transformers.GPT2")
    case.loss(case.logits(case.forward()), case.criterion).backward()
    plain = [p.grad.clone() for p in case.model.parameters() if p.requires_grad]
    case.model.zero_grad()
    _run(case, DiagGGN(), DiagGGNApprox())
    for p, g in zip([p for p in case.model.parameters() if p.requires_grad], plain):
        assert torch.equal(p.grad, g)


def test_opt_with_its_key_value_cache_is_exact():
    """OPT with the default ``use_cache=True``: its decoder layers are recorded operation by
    operation (the MLP's merged rows as pseudo-samples), so nothing replays the cache's
    ``update`` (before: each layer was one module for the fallback, and its replay wrote the
    cache again: refused, naming ``use_cache=False``)."""
    case = _case("transformers.OPT")
    case.inputs["use_cache"] = True
    ref = exact_reference(case)
    _run(case, DiagGGN())
    check(torch.cat([p.diag_ggn.flatten() for p in ref.params]), ref.G.diagonal(), "real/OPT/use_cache", rtol=case.rtol, atol_factor=case.rtol)




def test_a_cache_of_parameter_tensors_from_an_earlier_forward_is_refused_with_its_remedy():
    """timm's LeViT keeps its indexed attention biases in ``attention_bias_cache`` in eval mode:
    after a forward outside the block they are a tensor curvhook did not see computed. The
    error names the cache and the remedy; emptying it before the block gives the same
    DiagGGN as computing the biases on every call (the zoo's case)."""
    case = _case("timm.levit_128s")
    patched = [m for m in case.model.modules() if hasattr(m, "attention_bias_cache")]
    for m in patched:
        del m.get_attention_biases  # timm's own, caching in eval mode
    case.forward()  # fills the cache (with grad: under no_grad the biases would be a constant)
    with pytest.raises(UnsupportedModelError, match="attention_bias_cache"):
        _run(case, DiagGGN())
    for m in patched:
        m.attention_bias_cache = {}
    _run(case, DiagGGN())
    cached = [p.diag_ggn.clone() for p in case.model.parameters() if p.requires_grad]
    reference = _case("timm.levit_128s")
    _run(reference, DiagGGN())
    for got, p in zip(cached, [p for p in reference.model.parameters() if p.requires_grad]):
        torch.testing.assert_close(got, p.diag_ggn, rtol=1e-10, atol=1e-14)


def test_beit_relative_position_bias_is_pulled_back_through_its_lookup(monkeypatch):
    """BEiT's ``BeitRelativePositionBias`` (a table resized by ``interpolate``, concatenated, then
    ``table[index]`` viewed and permuted): its DiagGGNApprox with ``d`` pulled back through the
    lookup first (curvhook/selection_tail.py) equals the Jacobian of the whole module (the
    path before, 31 s of a step at beit-base widths), and the lookup was used."""
    from curvhook import module_recorder, selection_tail

    used = []
    original = selection_tail.SelectionTail.pull

    def pull(self, diag):
        used.append(tuple(self.u_value.shape))
        return original(self, diag)

    monkeypatch.setattr(selection_tail.SelectionTail, "pull", pull)
    case = _case("transformers.Beit")
    _run(case, DiagGGNApprox())
    name = "beit.layers.0.relative_position_bias.relative_position_bias_table"
    table = dict(case.model.named_parameters())[name]
    got = table.diag_ggn_approx.clone()
    assert used == [tuple(table.shape)]
    monkeypatch.setattr(module_recorder, "find_selection_tail", lambda *args: None)
    _run(case, DiagGGNApprox())
    assert got.abs().max() > 0
    torch.testing.assert_close(got, table.diag_ggn_approx, rtol=1e-12, atol=0)
