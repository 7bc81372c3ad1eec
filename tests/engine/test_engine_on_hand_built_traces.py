"""The engine on traces built by hand: no ``extend``, no hooks, no tape.

Each graph is written once as a function of an *executor*: :class:`Plain` runs
it (the forward of an ``nn.Module`` the torch.func references differentiate),
:class:`TraceBuilder` runs it and records every module call and tensor
operation into a :class:`~curvhook.trace.Trace` the way the module recorder and
the tape would. The plan is then built with ``graph_shape`` + ``build_plan`` and
``backpropagate`` runs the extensions; the results are compared in float64 with
``jacrev`` / ``hessian`` of the same forward (``tests/reference.py``) and, for
DiagGGNApprox, with its definition on the graph (``tests/graph_reference.py``).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Callable, Optional

import pytest
import torch
from torch import Tensor, nn

from curvhook.engine import backpropagate
from curvhook.errors import UnsupportedLossError, UnsupportedModelError
from curvhook.extensions import BatchJacobian, DiagGGN, DiagGGNApprox, FullGGN
from curvhook.loss_terms import check_gradient, find_loss_terms
from curvhook.plan import Plan, build_plan
from curvhook.plan_key import GraphShape, graph_shape
from curvhook.records import BATCHED, CONST, SHARED, LossCall, Operation, Slot, key_of, make_template
from curvhook.rules.linear import LinearRule
from curvhook.rules.tensor_ops import TENSOR_OPS
from curvhook.sources import JacobianColumns, LossHessianDiag, LossHessianSqrt
from curvhook.trace import Trace
from graph_reference import diag_ggn_approx_graph
from reference import check, compare, reference, trainable

DT = torch.float64
N = 3


# ------------------------------------------------------------------ executors
class Plain:
    """Runs a graph function without recording anything."""

    def module(self, module: nn.Module, x: Tensor) -> Tensor:
        """Call ``module`` on ``x``."""
        return module(x)

    def op(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        """Call the tensor operation ``func``."""
        return func(*args, **kwargs)


class TraceBuilder:
    """Runs a graph function and records it into a :class:`Trace`, as a real block would.

    Args:
        X: The model input.
        params: The trainable parameters of the model (a tensor operation that
            gets one records it as a :data:`SHARED` input and as a parameter).
    """

    def __init__(self, X: Tensor, params: list[nn.Parameter]) -> None:
        self.trace = Trace()
        self.trace.input_keys = {key_of(X)}
        self.param_ids = {id(p) for p in params}

    def module(self, module: nn.Module, x: Tensor, name: str = "module") -> Tensor:
        """Call a leaf module and record it (its first output followed, its own parameters)."""
        key, node = key_of(x), x.grad_fn
        y = module(x)
        op = Operation(
            name=name, module=module, args=(Slot(0),), inputs=(x,),
            input_kinds=(BATCHED if x.requires_grad else CONST,), input_keys=(key,),
            input_versions=(key[1],), input_nodes=(node,),
            output_keys=(key_of(y) if y.requires_grad else None,), output_shapes=(y.shape,),
            output=y, node=y.grad_fn, training=module.training,
            params=tuple((n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad),
        )
        self.trace.operations.append(op)
        return y

    def op(self, func: Callable, *args: Any, **kwargs: Any) -> Any:
        """Call a tensor operation and record it with its inputs by slot."""
        t_args, t_kwargs, tensors = make_template(args, kwargs)
        keys = tuple(key_of(t) for t in tensors)
        nodes = tuple(t.grad_fn for t in tensors)
        kinds, params = [], []
        for i, (t, k) in enumerate(zip(tensors, keys)):
            if not t.requires_grad:
                kinds.append(CONST)
            elif id(t) in self.param_ids:
                kinds.append(SHARED)
                params.append((f"t{i}", t))
            else:
                kinds.append(SHARED if k in self.trace.shared_keys else BATCHED)
        out = func(*args, **kwargs)
        outputs = [out] if isinstance(out, Tensor) else list(out)
        op = Operation(
            name=getattr(func, "__name__", "op"), func=func, args=t_args, kwargs=t_kwargs,
            inputs=tuple(tensors), input_kinds=tuple(kinds), input_keys=keys,
            input_versions=tuple(k[1] for k in keys), input_nodes=nodes,
            output_keys=tuple(key_of(o) if o.requires_grad else None for o in outputs),
            output_shapes=tuple(o.shape for o in outputs),
            output_values=tuple(o.detach() for o in outputs), node=outputs[0].grad_fn,
            params=tuple(params),
        )
        if BATCHED not in kinds:  # computed from parameters only
            self.trace.shared_keys.update(k for k in op.output_keys if k is not None)
        self.trace.operations.append(op)
        return out

    def finish(self, out: Tensor) -> Trace:
        """Set the model output of the trace and return it."""
        self.trace.root_key = key_of(out)
        self.trace.root_value = out.detach()
        return self.trace


class Graph(nn.Module):
    """An ``nn.Module`` whose forward is ``graph(self, x, Plain())``: what the references differentiate.

    Args:
        graph: ``(model, x, executor) -> output``.
        **parts: Submodules and parameters of the model.
    """

    def __init__(self, graph: Callable, **parts: Any) -> None:
        super().__init__()
        self.graph = graph
        for name, part in parts.items():
            setattr(self, name, part)

    def forward(self, x: Tensor) -> Tensor:
        return self.graph(self, x, Plain())


def record(model: Graph, X: Tensor) -> tuple[Trace, Tensor]:
    """Run ``model``'s graph through a :class:`TraceBuilder`.

    Returns:
        The trace and the model output (still attached to its graph).
    """
    builder = TraceBuilder(X, trainable(model)[1])
    out = model.graph(model, X, builder)
    return builder.finish(out), out


# ------------------------------------------------------------------- graphs
def chain_graph(m, x, ex):
    """``lin2(relu(lin1(x)))``, the ReLU a tensor operation."""
    return ex.module(m.lin2, ex.op(torch.relu, ex.module(m.lin1, x)))


def chain() -> Graph:
    return Graph(chain_graph, lin1=nn.Linear(3, 4), lin2=nn.Linear(4, 2)).to(DT)


def residual_graph(m, x, ex):
    """``h = lin1(x)``, ``lin3(h + lin2(tanh(h)))``, and a dead branch ``dead(h)`` nothing uses."""
    h = ex.module(m.lin1, x)
    ex.module(m.dead, h)
    return ex.module(m.lin3, ex.op(torch.add, h, ex.module(m.lin2, ex.op(torch.tanh, h))))


def residual() -> Graph:
    return Graph(
        residual_graph, lin1=nn.Linear(3, 4), dead=nn.Linear(4, 2), lin2=nn.Linear(4, 4), lin3=nn.Linear(4, 2)
    ).to(DT)


def twice_graph(m, x, ex):
    """``lin(tanh(lin(x)))``: one module, so its parameters, used by two operations."""
    return ex.module(m.lin, ex.op(torch.tanh, ex.module(m.lin, x)))


def twice() -> Graph:
    return Graph(twice_graph, lin=nn.Linear(3, 3)).to(DT)


def scaled_graph(m, x, ex):
    """``lin2(sigmoid(lin1(x) * w))``: a parameter as a shared input of a tensor operation."""
    return ex.module(m.lin2, ex.op(torch.sigmoid, ex.op(torch.mul, ex.module(m.lin1, x), m.w)))


def scaled() -> Graph:
    return Graph(scaled_graph, lin1=nn.Linear(3, 4), lin2=nn.Linear(4, 2), w=nn.Parameter(torch.rand(4) + 0.5)).to(DT)


def from_params_graph(m, x, ex):
    """``lin(x) * lin.weight.sum()``: a parameter used by a module and by an operation on parameters only."""
    s = ex.op(torch.sum, m.lin.weight)
    return ex.op(torch.mul, ex.module(m.lin, x), s)


def from_params() -> Graph:
    return Graph(from_params_graph, lin=nn.Linear(3, 2)).to(DT)


# ------------------------------------------------------------------- running
def run_engine(
    trace: Trace, model: nn.Module, extensions: list, grad_root: Optional[Tensor] = None
) -> tuple[Plan, GraphShape, dict]:
    """Plan ``trace`` and run ``backpropagate`` for ``extensions``, as the backward driver does.

    Returns:
        The plan, the graph shape and the results by extension.
    """
    shape = graph_shape(trace)
    plan = build_plan(trace, shape)
    plan.bind(trace)
    groups: dict = defaultdict(list)
    for ext in extensions:
        groups[ext.source].append(ext)
    terms = {s: find_loss_terms(trace, None, "test") for s in groups if s.needs_loss}
    if grad_root is None:
        grad_root = torch.zeros_like(trace.root_value)
    with torch.no_grad():
        results = backpropagate(trace, plan, shape, grad_root, groups, terms, trainable(model)[1])
    return plan, shape, results


def gather(model: nn.Module, results: dict, n: int) -> tuple[dict, Optional[Tensor]]:
    """The results in the layout of ``reference.collect``: ``({name: tensor}, FullGGN matrix)``."""
    params = trainable(model)[1]
    got, matrix = {}, None
    for ext, value in results.items():
        if isinstance(ext, BatchJacobian):
            c = value[id(params[0])].shape[1]
            got["BatchJacobian"] = torch.cat([value[id(p)].reshape(n, c, -1) for p in params], 2)
        elif isinstance(ext, DiagGGN):
            got["DiagGGN"] = torch.cat([value[id(p)].flatten() for p in params])
        elif isinstance(ext, DiagGGNApprox):
            got["DiagGGNApprox"] = torch.cat([value[id(p)].flatten() for p in params])
        elif isinstance(ext, FullGGN):
            got["FullGGN"] = matrix = value
    return got, matrix


def add_loss(trace: Trace, crit: nn.Module, out: Tensor, target: Tensor, scale: float) -> None:
    """Record ``scale · crit(out, target)`` on the model output, with ``dℓ/dL = scale``."""
    trace.losses.append(
        LossCall(module=crit, input=out.detach(), target=target, key=trace.root_key,
                 scale=torch.tensor(scale, dtype=out.dtype))
    )


def cross_entropy_and_mse(out: Tensor) -> tuple[list, Callable[[Tensor], Tensor]]:
    """Two losses on ``out``: ``0.7 · CE(mean) + 0.5 · MSE(sum)``.

    Returns:
        ``[(crit, target, scale), ...]`` and ``ℓ(out)`` for the reference.
    """
    y = torch.arange(out.shape[0]) % out.shape[1]
    t = torch.randn(out.shape, dtype=out.dtype)
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")
    losses = [(ce, y, 0.7), (mse, t, 0.5)]
    return losses, lambda o: 0.7 * ce(o, y) + 0.5 * mse(o, t)


GRAPHS = {"chain": chain, "residual": residual, "twice": twice, "scaled": scaled}


# -------------------------------------------------------------------- values
@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_batch_jacobian_from_jacobian_columns(name, input_requires_grad):
    model = GRAPHS[name]()
    X = torch.randn(N, 3, dtype=DT, requires_grad=input_requires_grad)
    trace, _ = record(model, X)
    _, _, results = run_engine(trace, model, [BatchJacobian()])
    got, _ = gather(model, results, N)
    compare(got, reference(model, X, approx=False), tag=" (engine)")


@pytest.mark.parametrize("name", list(GRAPHS))
def test_ggn_extensions_with_two_scaled_losses(name):
    model = GRAPHS[name]()
    X = torch.randn(N, 3, dtype=DT)
    trace, out = record(model, X)
    losses, loss_fn = cross_entropy_and_mse(out)
    for crit, target, scale in losses:
        add_loss(trace, crit, out, target, scale)
    ggn, exts = FullGGN(), [DiagGGN(), DiagGGNApprox(), BatchJacobian()]
    grad_root = torch.func.grad(loss_fn)(out.detach())
    _, _, results = run_engine(trace, model, [ggn, *exts], grad_root)
    got, matrix = gather(model, results, N)
    ref = reference(model, X, loss_fn, approx=False)
    compare({k: v for k, v in got.items() if k != "DiagGGNApprox"}, ref, matrix, tag=" (engine)")
    d = torch.func.hessian(loss_fn)(ref.out).reshape(ref.out.numel(), -1).diagonal()
    check(got["DiagGGNApprox"], diag_ggn_approx_graph(model, X, d), "DiagGGNApprox (engine)")


def test_parameter_used_by_a_module_and_an_operation_on_parameters_only():
    """``lin(x) * lin.weight.sum()``: terms reach the weight along two paths and are summed before squaring."""
    model = from_params()
    X = torch.randn(N, 3, dtype=DT)
    trace, out = record(model, X)
    crit = nn.MSELoss(reduction="sum")
    t = torch.randn(out.shape, dtype=DT)
    add_loss(trace, crit, out, t, 1.0)
    _, _, results = run_engine(trace, model, [FullGGN(), DiagGGN(), BatchJacobian()])
    got, matrix = gather(model, results, N)
    compare(got, reference(model, X, lambda o: crit(o, t), approx=False), matrix, tag=" (engine)")


def test_scratch_is_cleared_after_the_walk():
    model = chain()
    X = torch.randn(N, 3, dtype=DT)
    trace, out = record(model, X)
    add_loss(trace, nn.CrossEntropyLoss(), out, torch.tensor([0, 1, 0]), 1.0)
    run_engine(trace, model, [DiagGGN(), DiagGGNApprox()])
    for op in trace.operations:
        assert all(v is None for v in vars(op.scratch).values()), op.name


def test_loss_sources_start_where_the_losses_were_called():
    model = chain()
    X = torch.randn(N, 3, dtype=DT)
    trace, out = record(model, X)
    crit, y = nn.CrossEntropyLoss(), torch.tensor([1, 0, 1])
    add_loss(trace, crit, out, y, 2.0)
    terms = find_loss_terms(trace, None, "test")
    assert terms.start == trace.root_key and terms.scales == [2.0]
    # S Sᵀ per sample is the Hessian of 2·CE; diag(H) likewise
    start, s = LossHessianSqrt().initial(trace, out.detach(), terms)
    assert start == trace.root_key
    h = torch.func.hessian(lambda o: 2.0 * crit(o, y))(out.detach())  # [N, C, N, C]
    for n in range(N):
        check(torch.einsum("vc,vd->cd", s[:, n], s[:, n]), h[n, :, n], "loss sqrt Hessian (engine)")
    _, d = LossHessianDiag().initial(trace, out.detach(), terms)
    check(d, torch.stack([h[n, :, n].diagonal() for n in range(N)]), "loss Hessian diag (engine)")
    start, e = JacobianColumns().initial(trace, out.detach(), None)
    assert start == trace.root_key
    check(e, torch.eye(2, dtype=DT)[:, None, :].expand(2, N, 2), "identity columns (engine)")


def test_gradient_check_accepts_the_loss_gradient_and_refuses_another():
    model = chain()
    X = torch.randn(N, 3, dtype=DT)
    trace, out = record(model, X)
    crit, y = nn.CrossEntropyLoss(), torch.tensor([1, 0, 1])
    add_loss(trace, crit, out, y, 0.5)
    terms = find_loss_terms(trace, None, "test")
    grad = torch.func.grad(lambda o: 0.5 * crit(o, y))(out.detach())
    check_gradient(trace, terms, grad)
    with pytest.raises(UnsupportedLossError, match="not that of the loss"):
        check_gradient(trace, terms, grad + 1e-3)
    with pytest.raises(UnsupportedLossError, match="not that of the loss"):
        check_gradient(trace, terms, 2 * grad)  # a scale the hooks did not see


# ------------------------------------------------------------------ structure
def test_chain_plan_structure():
    model = chain()
    X = torch.randn(N, 3, dtype=DT)
    trace, _ = record(model, X)
    lin1, relu, lin2 = trace.operations
    shape = graph_shape(trace)
    # dense slots in forward order of the outputs
    assert shape.slot_of == {lin1.output_key: 0, relu.output_key: 1, lin2.output_key: 2}
    plan = build_plan(trace, shape)
    assert (plan.slots, plan.root) == (3, 2)
    assert [s.index for s in plan.steps] == [2, 1, 0]  # reverse forward order
    s2, s1, s0 = plan.steps
    assert isinstance(s2.rule, LinearRule) and s1.rule is TENSOR_OPS and isinstance(s0.rule, LinearRule)
    assert [s.outputs for s in plan.steps] == [(2,), (1,), (0,)]
    assert s2.upstream == ((0, 1),) and s1.upstream == ((0, 0),)
    assert s0.upstream == ()  # the model input is no operation's output
    assert [(u.name, u.position, u.shared) for u in s2.params] == [("weight", 0, False), ("bias", 1, False)]
    assert s1.params == ()
    assert s1.known_per_sample and not s0.known_per_sample  # relu on [N, 4]; modules are never "known"
    assert plan.shared_params == frozenset()


def test_input_that_requires_grad_gets_no_pullback():
    model = chain()
    X = torch.randn(N, 3, dtype=DT, requires_grad=True)
    trace, _ = record(model, X)
    assert trace.operations[0].input_kinds == (BATCHED,)
    plan = build_plan(trace, graph_shape(trace))
    assert plan.steps[-1].upstream == ()


def test_residual_plan_structure():
    model = residual()
    X = torch.randn(N, 3, dtype=DT)
    trace, _ = record(model, X)
    lin1, dead, tanh, lin2, add, lin3 = trace.operations
    shape = graph_shape(trace)
    slot = shape.slot_of
    assert list(slot.values()) == list(range(6))
    plan = build_plan(trace, shape)
    assert plan.root == slot[lin3.output_key]
    by_index = {s.index: s for s in plan.steps}
    assert by_index[4].upstream == ((0, slot[lin1.output_key]), (1, slot[lin2.output_key]))
    assert by_index[2].upstream == ((0, slot[lin1.output_key]),)
    assert by_index[1].upstream == ((0, slot[lin1.output_key]),)  # planned, but nothing reaches it
    assert by_index[4].known_per_sample and by_index[2].known_per_sample


def test_dead_branch_gets_zeros():
    model = residual()
    X = torch.randn(N, 3, dtype=DT)
    trace, out = record(model, X)
    add_loss(trace, nn.CrossEntropyLoss(), out, torch.tensor([0, 1, 1]), 1.0)
    ggn = FullGGN()
    _, _, results = run_engine(trace, model, [BatchJacobian(), DiagGGN(), DiagGGNApprox(), ggn])
    for ext, value in results.items():
        if isinstance(ext, FullGGN):
            continue
        for p in model.dead.parameters():
            assert value[id(p)].abs().max() == 0, type(ext).__name__
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[: names.index("dead.weight")])
    stop = start + model.dead.weight.numel() + model.dead.bias.numel()
    assert results[ggn][start:stop].abs().max() == 0 and results[ggn][:, start:stop].abs().max() == 0


def test_module_called_twice_shares_its_parameters():
    model = twice()
    X = torch.randn(N, 3, dtype=DT)
    trace, _ = record(model, X)
    plan = build_plan(trace, graph_shape(trace))
    assert plan.shared_params == frozenset({id(model.lin.weight), id(model.lin.bias)})
    for index in (0, 2):
        step = next(s for s in plan.steps if s.index == index)
        assert [(u.name, u.shared) for u in step.params] == [("weight", True), ("bias", True)]


def test_parameter_as_shared_input_of_a_tensor_operation():
    model = scaled()
    X = torch.randn(N, 3, dtype=DT)
    trace, _ = record(model, X)
    mul = trace.operations[1]
    assert mul.input_kinds == (BATCHED, SHARED) and mul.params == (("t1", model.w),)
    shape = graph_shape(trace)
    plan = build_plan(trace, shape)
    step = next(s for s in plan.steps if s.index == 1)
    assert step.upstream == ((0, shape.slot_of[trace.operations[0].output_key]),)  # not to w: no producer
    assert [(u.name, u.position, u.shared) for u in step.params] == [("t1", 0, False)]
    assert step.known_per_sample
    assert plan.shared_params == frozenset()


def test_operation_on_parameters_only_is_planned_as_shared():
    model = from_params()
    X = torch.randn(N, 3, dtype=DT)
    trace, _ = record(model, X)
    total, lin, mul = trace.operations
    assert total.input_kinds == (SHARED,) and total.output_key in trace.shared_keys
    assert mul.input_kinds == (BATCHED, SHARED)
    shape = graph_shape(trace)
    plan = build_plan(trace, shape)
    step = next(s for s in plan.steps if s.index == 2)
    assert step.upstream == ((0, shape.slot_of[lin.output_key]), (1, shape.slot_of[total.output_key]))
    assert plan.shared_params == frozenset({id(model.lin.weight)})
    assert not next(s for s in plan.steps if s.index == 0).known_per_sample  # no batch axis


# ------------------------------------------------------------------- refusals
def test_refuses_an_output_no_operation_produced():
    model = chain()
    X = torch.randn(N, 3, dtype=DT)
    trace, out = record(model, X)
    trace.root_key = key_of(out * 2)  # an output computed outside every recorded operation
    with pytest.raises(UnsupportedModelError, match="produce its output"):
        build_plan(trace, graph_shape(trace))


def test_refuses_a_module_that_drops_the_batch_axis():
    flat = nn.Flatten(0)  # [N, 4] -> [4N]

    def graph(m, x, ex):
        z = ex.module(m.flat, ex.module(m.lin1, x))
        return ex.module(m.lin2, ex.op(torch.Tensor.view, z, x.shape[0], 4))

    model = Graph(graph, lin1=nn.Linear(3, 4), flat=flat, lin2=nn.Linear(4, 2)).to(DT)
    trace, _ = record(model, torch.randn(N, 3, dtype=DT))
    with pytest.raises(UnsupportedModelError, match="keep the batch axis first"):
        build_plan(trace, graph_shape(trace))


def test_refuses_an_input_computed_by_an_unseen_operation():
    def graph(m, x, ex):
        h = ex.module(m.lin1, x)
        return ex.module(m.lin2, h * 2)  # not recorded: the executor does not see the product

    model = Graph(graph, lin1=nn.Linear(3, 4), lin2=nn.Linear(4, 2)).to(DT)
    trace, _ = record(model, torch.randn(N, 3, dtype=DT))
    with pytest.raises(UnsupportedModelError, match="did not see"):
        build_plan(trace, graph_shape(trace))


def test_refuses_an_unseen_operation_on_the_model_input_that_requires_grad():
    def graph(m, x, ex):
        return ex.module(m.lin, x + 1)  # the input has a history no operation recorded

    model = Graph(graph, lin=nn.Linear(3, 2)).to(DT)
    trace, _ = record(model, torch.randn(N, 3, dtype=DT, requires_grad=True))
    with pytest.raises(UnsupportedModelError, match="did not see"):
        build_plan(trace, graph_shape(trace))


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_refused_in_train_mode_only(train):
    def graph(m, x, ex):
        return ex.module(m.lin2, ex.module(m.bn, ex.module(m.lin1, x)))

    model = Graph(graph, lin1=nn.Linear(3, 4), bn=nn.BatchNorm1d(4), lin2=nn.Linear(4, 2)).to(DT)
    model.train(train)
    X = torch.randn(N, 3, dtype=DT)
    trace, _ = record(model, X)
    if train:
        with pytest.raises(UnsupportedModelError, match="statistics"):
            build_plan(trace, graph_shape(trace))
        return
    _, _, results = run_engine(trace, model, [BatchJacobian()])
    got, _ = gather(model, results, N)
    compare(got, reference(model, X, approx=False), tag=" (engine)")


def test_refuses_a_module_input_computed_from_parameters_only():
    def graph(m, x, ex):
        w = ex.op(torch.mul, m.w, 2.0)  # [N, 3] from a parameter only: no batch axis of the data
        return ex.op(torch.add, ex.module(m.lin, w), x.sum())

    model = Graph(graph, lin=nn.Linear(3, 2), w=nn.Parameter(torch.randn(N, 3))).to(DT)
    trace, _ = record(model, torch.randn(N, 3, dtype=DT))
    with pytest.raises(UnsupportedModelError, match="parameters only"):
        build_plan(trace, graph_shape(trace))


class TwoOutputs(nn.Module):
    """A leaf returning ``(x W, x W + 1)``: curvhook follows only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        y = x @ self.weight
        return y, y + 1


def test_refuses_a_value_reaching_a_second_module_output():
    two = TwoOutputs().to(DT)
    X = torch.randn(N, 3, dtype=DT)
    builder = TraceBuilder(X, list(two.parameters()))
    first, second = two(X)
    builder.trace.operations.append(Operation(
        name="two", module=two, args=(Slot(0),), inputs=(X,), input_kinds=(CONST,),
        input_keys=(key_of(X),), input_versions=(key_of(X)[1],), input_nodes=(None,),
        output_keys=(key_of(first),), unfollowed_output_keys=(key_of(second),),
        output_shapes=(first.shape,), output=first, node=first.grad_fn, params=(("weight", two.weight),),
    ))
    out = builder.op(torch.add, first, second)
    trace = builder.finish(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's notice for a module without rule
        plan = build_plan(trace, graph_shape(trace))
    assert plan.steps[-1].unfollowed == (graph_shape(trace).slot_of[key_of(second)],)
    with pytest.raises(UnsupportedModelError, match="second output"):
        run_engine(trace, two, [BatchJacobian()])
