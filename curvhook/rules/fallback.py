"""The exact generic rule for any leaf module without a registered rule.

It differentiates the module's own ``forward`` with ``torch.func`` on the
stored inputs: ``vjp`` batched over the backpropagated columns for the input,
per-sample ``vjp`` (``vmap`` over samples) for the parameters. DiagGGNApprox
needs ``Σ_o d_o J_oi²``: the rows ``J_o`` come from the same products applied to
one-hot columns, a bounded chunk of output entries at a time, so memory stays
bounded while the work grows with the output size. It is exact but slower than
a dedicated rule, so it warns once per module type.

``vmap`` over samples cannot run every module: ``nn.LSTM``'s cell adds the input
gates in place into gates computed from its own zero initial state, a tensor
without a sample axis, which ``vmap`` refuses. Such a module is mapped over its
samples with a Python loop instead: the same numbers, from ``N`` smaller calls.

The module must treat samples independently: BatchNorm using batch statistics
is rejected before this rule runs, and the first product of every call in a
backward pass compares the module's output on the whole batch with its
outputs on one sample at a time (as the tape checks the tensor operations
between modules), so a module that mixes samples (``x - x.mean(0)``) raises
``UnsupportedModelError`` naming it. It must
also be deterministic: every product replays its ``forward``, and a module that
draws random numbers (``nn.RReLU`` or attention dropout in train mode) would
draw other ones. Such a module raises ``UnsupportedModelError``; it is
recognised by the generator state its replay advances.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from curvhook._torch_internals import BATCH_NORM_TYPES
from curvhook.records import BATCHED, Operation, Slot, fill_template
from curvhook.errors import UnsupportedModelError, out_of_memory_error
from curvhook.rules.base import LayerRule

_WARNED: set[type] = set()


def _params(call: Operation) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in call.module.named_parameters(recurse=call.recurse)}


_REPLAYS = threading.local()


def replaying() -> bool:
    """Whether a rule is replaying a module's ``forward`` in this thread.

    The recorder's hooks on the extended model ignore such calls: a replay of
    the model itself (a model without children and without a rule) is no new
    forward pass of the model.
    """
    return getattr(_REPLAYS, "depth", 0) > 0


@contextmanager
def _replay_scope() -> Iterator[None]:
    _REPLAYS.depth = getattr(_REPLAYS, "depth", 0) + 1
    try:
        yield
    finally:
        _REPLAYS.depth -= 1


def _replay(call: Operation, params: dict, inputs: list[Tensor]) -> Tensor:
    """Call the module again with ``inputs`` in the places of its recorded tensor inputs.

    An input passed several times (``attention(x, x, x)``) is one input. A tuple
    output gives its first tensor.
    """
    if call.args or call.kwargs:
        args, kwargs = fill_template(call.args, call.kwargs, inputs)
    else:  # a call recorded by hand, without its arguments' layout
        args, kwargs = tuple(inputs), {}
    # The module's own forward, without its hooks: the user's forward hooks ran in the
    # forward pass, and what they computed there was recorded as operations of its own.
    wrapper = _Forward(call.module)
    with _replay_scope():
        out = functional_call(wrapper, {f"module.{k}": v for k, v in params.items()}, args, kwargs)
    return out if isinstance(out, Tensor) else next(o for o in out if isinstance(o, Tensor))


class _Forward(nn.Module):
    """Calls ``module.forward`` directly, bypassing the hooks of ``module`` (``module.<name>``
    names its parameters for ``functional_call``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module.forward(*args, **kwargs)


def _forward(call: Operation, slot: int = 0) -> Callable[[dict, Tensor], Tensor]:
    """``(params, x) ↦ module(...)`` with ``x`` as input ``slot``, the other inputs held fixed."""
    fixed = [t.detach() for t in call.inputs]
    return lambda params, x: _replay(call, params, [*fixed[:slot], x, *fixed[slot + 1 :]])


# Arguments that a module shares across the samples at the given number of
# dimensions, whatever their leading size: an attention mask ``[L, S]`` is the
# same for every sample, also where ``L`` happens to equal the batch size.
SHARED_ARGUMENTS: dict[type, dict[str, int]] = {
    nn.MultiheadAttention: {"attn_mask": 2},
    nn.TransformerEncoderLayer: {"src_mask": 2},
    nn.TransformerDecoderLayer: {"tgt_mask": 2, "memory_mask": 2},
    nn.TransformerEncoder: {"mask": 2},
    nn.TransformerDecoder: {"tgt_mask": 2, "memory_mask": 2},
    nn.Transformer: {"src_mask": 2, "tgt_mask": 2, "memory_mask": 2},
}


def _slot_names(call: Operation) -> dict[int, str]:
    """The parameter name of ``forward`` that each input slot was passed as (where known)."""
    names = {int(v): k for k, v in call.kwargs.items() if isinstance(v, Slot)}
    positional = [a for a in call.args]
    if any(isinstance(a, Slot) for a in positional):
        try:
            params = list(inspect.signature(call.module.forward).parameters)
        except (TypeError, ValueError):
            params = []
        names.update({int(a): params[i] for i, a in enumerate(positional) if isinstance(a, Slot) and i < len(params)})
    return names


def _batched(call: Operation) -> list[bool]:
    """Which inputs carry the sample axis (the first input's batch size first).

    An input that needs no gradient and is declared shared by the module's type
    (``SHARED_ARGUMENTS``: a 2-d attention mask), or computed from the model's
    buffers alone (``call.fixed_slots``: a bias ``[heads, L, L]`` with ``heads = N``),
    is passed whole to each sample.
    """
    if not call.inputs:  # called without tensors (with N = 1 its output is one sample's)
        return []
    n, fixed = _sample_count(call), call.fixed_slots
    batched = [i not in fixed and t.dim() > 0 and t.shape[0] == n for i, t in enumerate(call.inputs)]
    shared = next((v for k, v in SHARED_ARGUMENTS.items() if isinstance(call.module, k)), None)
    if shared and call.args is not None:
        for slot, name in _slot_names(call).items():
            t = call.inputs[slot]
            if slot > 0 and shared.get(name) == t.dim() and not t.requires_grad:
                batched[slot] = False
    return batched


def _sample_count(call: Operation) -> int:
    """The number of samples the call's inputs hold: the leading size of its first batched
    input (``f(scale, x)`` with a buffer ``scale`` first), else of its first input that is
    not a fixed constant (curvhook/fixed_constants.py), else of its first input."""
    inputs, kinds, fixed = call.inputs, call.input_kinds, call.fixed_slots
    for i, t in enumerate(inputs):
        if kinds[i] == BATCHED and t.dim():
            return t.shape[0]
    for i, t in enumerate(inputs):
        if i not in fixed and t.dim():
            return t.shape[0]
    return inputs[0].shape[0] if inputs[0].dim() else 1


def _per_sample(call: Operation) -> Callable[..., Tensor]:
    """``(params, *inputs_n) ↦ module(...)[0]`` for one sample.

    Every input with the sample axis is passed as that sample's slice (and gets
    the axis back, of size one); the other inputs are passed whole.
    """
    batched = _batched(call)

    def run(params: dict, *inputs_n: Tensor) -> Tensor:
        full = [x.unsqueeze(0) if b else x for x, b in zip(inputs_n, batched)]
        return _replay(call, params, full).squeeze(0)

    return run


def _map_samples(call: Operation, fn: Callable[..., Tensor], in_dims: tuple, out_dim: int) -> Callable[..., Tensor]:
    """``vmap(fn)`` over the sample axis, or a loop over the samples where ``vmap`` fails.

    Args:
        call: The recorded call; ``call.scratch.loop_over_samples`` remembers, for this
            backward pass, that ``vmap`` could not run the module.
        fn: The per-sample function.
        in_dims: The sample axis of each argument, ``None`` for one shared by all samples.
        out_dim: The sample axis of the stacked result.
    """

    def looped(*args: Tensor) -> Tensor:
        n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
        pick = lambda i: (a if d is None else a.select(d, i) for a, d in zip(args, in_dims))  # noqa: E731
        return torch.stack([fn(*pick(i)) for i in range(n)], dim=out_dim)

    def mapped(*args: Tensor) -> Tensor:
        if not call.scratch.loop_over_samples:
            try:
                return vmap(fn, in_dims=in_dims, out_dims=out_dim)(*args)
            except RuntimeError:  # e.g. an in-place write of a per-sample value (nn.LSTM)
                call.scratch.loop_over_samples = True
        return looped(*args)

    return mapped


def _rng_states(device: torch.device) -> list[Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _set_rng_states(device: torch.device, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _check_deterministic(call: Operation) -> Optional[Tensor]:
    """Raise if replaying the module draws random numbers (once per call and backward pass).

    The replay leaves the random number generators as it found them.

    Returns:
        The replayed output on the whole batch, ``[N, *out]`` (``None`` if already checked).
    """
    if call.scratch.deterministic:
        return None
    # (a module called without tensors, BEiT's relative position bias: its parameters' device)
    device = call.inputs[0].device if call.inputs else next((p.device for _, p in call.params), torch.device("cpu"))
    before = _rng_states(device)
    try:
        with torch.no_grad():
            whole = _replay(call, _params(call), [t.detach() for t in call.inputs])
    finally:
        after = _rng_states(device)
        _set_rng_states(device, before)
    if any(not torch.equal(a, b) for a, b in zip(before, after)):
        raise UnsupportedModelError(
            f"Module {call.name!r} ({type(call.module).__name__}) draws random numbers in its "
            "forward pass (dropout or a random slope in train mode). curvhook's generic rule "
            "replays the forward pass and cannot draw the same numbers again. Call "
            "model.eval(), use nn.Dropout (its mask is recorded), or register a rule for it."
        )
    call.scratch.deterministic = True
    return whole


def _check_keeps_samples_apart(call: Operation, whole: Optional[Tensor]) -> None:
    """Raise if the module mixes samples (once per call and backward pass).

    Per-sample Jacobians exist only if output ``n`` is a function of sample ``n``
    alone. The module's output on the whole batch is compared with its outputs
    on one sample at a time (``vmap``, or a loop where ``vmap`` cannot run it),
    as the tape checks the tensor operations between modules: ``x - x.mean(0)``,
    ``x.sum(0, keepdim=True)``, batch statistics and ``torch.roll(x, 1, 0)`` give
    other values. One sample cannot be mixed with others: nothing to check.

    Args:
        call: The recorded call; ``call.scratch.keeps_samples_apart_checked`` remembers the check.
        whole: Its replayed output on the whole batch, ``[N, *out]`` (``None``: replay it).
    """
    if call.scratch.keeps_samples_apart_checked or not call.inputs:  # no input: no samples to mix
        return
    if _sample_count(call) > 1:
        params, inputs = _params(call), [t.detach() for t in call.inputs]
        in_dims = (None, *(0 if b else None for b in _batched(call)))
        try:
            with torch.no_grad():
                if whole is None:
                    whole = _replay(call, params, inputs)
                each = _map_samples(call, _per_sample(call), in_dims, 0)(params, *inputs)
        except Exception as err:  # noqa: BLE001 - any failure means: cannot be run per sample
            raise UnsupportedModelError(
                f"curvhook cannot run module {call.name!r} ({type(call.module).__name__}) on one "
                f"sample at a time ({err}). Its generic rule needs modules that treat samples "
                "independently; register a rule for it (docs/custom_layers.md)."
            ) from err
        if not _same_values(each, whole):
            raise UnsupportedModelError(
                f"Module {call.name!r} ({type(call.module).__name__}) mixes samples: its output "
                "on the batch differs from its output on one sample at a time (statistics over "
                "the batch axis such as x - x.mean(0) or x.sum(0), batch normalization, "
                "torch.roll along it). Per-sample Jacobians do not exist for it. Compute batch "
                "statistics outside the model (on the data), use running statistics, or keep "
                "the batch axis out of the module's reductions."
            )
    call.scratch.keeps_samples_apart_checked = True


def _same_values(each: Tensor, whole: Tensor) -> bool:
    """Whether per-sample and whole-batch outputs agree up to rounding (NaN and ±inf included).

    The two runs may round differently (other kernels for other shapes): the
    tolerance follows the precision of the arithmetic, TF32 included where a
    float32 module on a GPU may use it (cuDNN convolutions by default).
    """
    if each.shape != whole.shape:
        return False
    tol = 0.0
    if whole.is_floating_point():
        eps = torch.finfo(whole.dtype).eps
        if whole.dtype == torch.float32 and whole.device.type == "cuda" and _tf32_allowed():
            eps = 2.0**-10
        tol = max(1e-5, 16 * eps)
    finite = whole[whole.isfinite()]
    scale = 1.0 + (finite.abs().max().item() if finite.numel() else 0.0)
    return torch.allclose(each, whole, rtol=tol, atol=0.1 * tol * scale, equal_nan=True)


def _tf32_allowed() -> bool:
    """Whether float32 convolutions or matrix products on a GPU may round to TF32."""
    return (
        torch.backends.cudnn.allow_tf32
        or torch.backends.cuda.matmul.allow_tf32
        or torch.get_float32_matmul_precision() != "highest"
    )


def _stateful_argument(call: Operation) -> Optional[object]:
    """An argument that the module's ``forward`` writes to: a key-value cache (Hugging Face's
    ``DynamicCache``, duck-typed by its ``update`` and ``get_seq_length`` methods)."""
    values = [*(call.args or ()), *(call.kwargs or {}).values()]
    for v in [w for v in values for w in (v if isinstance(v, (list, tuple)) else (v,))]:
        if not isinstance(v, Tensor) and callable(getattr(v, "update", None)) and callable(
            getattr(v, "get_seq_length", None)
        ):
            return v
    return None


def _refuse_stateful_arguments(call: Operation) -> None:
    """A replay of the module would write the cache again (and attend to what the forward pass
    wrote there): refused with the remedy, where it failed with a shape error before."""
    cache = _stateful_argument(call)
    if cache is not None:
        raise UnsupportedModelError(
            f"Module {call.name!r} ({type(call.module).__name__}) is served by the generic rule, "
            f"which replays its forward, and it was called with a key-value cache "
            f"({type(cache).__name__}): each replay would write to the cache and attend to what "
            "the forward pass wrote there. Call the model with use_cache=False (or set model.config.use_cache = False)."
        )


def _guard(call: Operation, fn: Callable[[], Tensor]) -> Tensor:
    try:
        _refuse_stateful_arguments(call)
        _check_keeps_samples_apart(call, _check_deterministic(call))
        return fn()
    except UnsupportedModelError:
        raise
    except Exception as err:  # torch.func could not transform this module
        oom = out_of_memory_error(err, f"module {call.name!r} ({type(call.module).__name__})")
        if oom is not None:
            raise oom from err
        raise UnsupportedModelError(
            f"The generic rule could not differentiate module {call.name!r} "
            f"({type(call.module).__name__}) with torch.func: {err}. Register a rule for it "
            "with curvhook.register_rule (see docs/custom_layers.md)."
        ) from err


class FallbackRule(LayerRule):
    """Exact rules for any per-sample leaf module, through ``torch.func``."""

    def warn_once(self, call: Operation) -> None:
        """Warn the first time a module type goes through this rule."""
        cls = type(call.module)
        if cls not in _WARNED:
            _WARNED.add(cls)
            warnings.warn(
                f"curvhook has no rule for {cls.__name__} (module {call.name!r}); it uses the "
                "exact but slower torch.func fallback. Register a fast rule with "
                "curvhook.register_rule (see docs/custom_layers.md).",
                stacklevel=2,
            )

    def input_jac_t_mat_prod(self, call: Operation, mat: Tensor, slot: int) -> Tensor:
        if slot == 0:  # a subclass may have a faster form for the first input
            return self.jac_t_mat_prod(call, mat)
        return self._pull_columns(call, mat, slot)

    def input_diag(self, call: Operation, diag: Tensor, slot: int) -> Tensor:
        if slot == 0:
            return self.diag_jac_t_diag_jac(call, diag)
        return self._pull_diagonal(call, diag, slot)

    def jac_t_mat_prod(self, call: Operation, mat: Tensor) -> Tensor:
        return self._pull_columns(call, mat, 0)

    def _pull_columns(self, call: Operation, mat: Tensor, slot: int) -> Tensor:
        """``J_xᵀ m`` for the input at ``slot``, ``[V, N, *x[1:]]`` (batched over the columns)."""

        def compute() -> Tensor:
            params = _params(call)
            _, pullback = vjp(lambda x: _forward(call, slot)(params, x), call.inputs[slot].detach())
            return vmap(lambda m: pullback(m)[0])(mat)

        return _guard(call, compute)

    def _pull_diagonal(self, call: Operation, diag: Tensor, slot: int) -> Tensor:
        """``diag(J_xᵀ diag(d) J_x)`` for the input at ``slot``, ``[N, *x[1:]]``."""
        pull = lambda cols: self._pull_columns(call, cols, slot)  # noqa: E731
        return _weighted_row_squares(pull, diag, call.inputs[slot][0].numel(), True)

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat: Tensor) -> Tensor:
        def compute() -> Tensor:
            params, sample = _params(call), _per_sample(call)
            other = {k: v for k, v in params.items() if k != name}

            def one_pair(m_vn: Tensor, *inputs_n: Tensor) -> Tensor:  # one column of one sample
                _, pullback = vjp(lambda p: sample({**other, name: p}, *inputs_n), params[name])
                return pullback(m_vn)[0]

            # One vmap over the V·N (column, sample) pairs, not a vmap over the columns
            # inside one over the samples: torch.func's batching of some parameter vjps
            # (prelu's) mixes two nested levels and gives wrong numbers without raising.
            v, n = mat.shape[:2]
            batched = _batched(call)
            inputs = [
                t.detach().unsqueeze(0).expand(v, *t.shape).flatten(0, 1) if b else t.detach()
                for t, b in zip(call.inputs, batched)
            ]
            in_dims = (0, *(0 if b else None for b in batched))
            pairs = _map_samples(call, one_pair, in_dims, 0)(mat.flatten(0, 1), *inputs)
            return pairs.unflatten(0, (v, n))

        return _guard(call, compute)

    def diag_jac_t_diag_jac(self, call: Operation, diag: Tensor) -> Tensor:
        # diag(J_xᵀ diag(d) J_x)_i = Σ_o d_o J_oi², with the rows J_o from batched
        # vjps of one-hot columns, a bounded chunk of output entries at a time.
        return self._pull_diagonal(call, diag, 0)

    def param_diag(self, call: Operation, name: str, diag: Tensor) -> Tensor:
        size = dict(call.module.named_parameters(recurse=call.recurse))[name].numel()
        pull = lambda cols: self.param_jac_t_mat_prod(call, name, cols)  # noqa: E731
        return _weighted_row_squares(pull, diag, size, False)


# Entries of the rows held at once by the fallback's DiagGGNApprox diagonals.
_ROW_CHUNK_ENTRIES = 1 << 24


def _weighted_row_squares(
    pull: Callable[[Tensor], Tensor], diag: Tensor, row_size: int, per_sample: bool
) -> Tensor:
    """``Σ_o d_no (J_nᵀ e_o)²`` over the output entries ``o``, in chunks of one-hot columns.

    Args:
        pull: Maps columns ``[c, N, *out]`` to ``J_nᵀ`` applied to them, ``[c, N, *row]``.
        diag: ``d``, ``[N, *out]``.
        row_size: Entries of one row ``J_nᵀ e_o`` of one sample.
        per_sample: Keep the sample axis (input diagonals) or sum over it (parameters).

    Returns:
        ``[N, *row]`` if ``per_sample`` else ``[*row]``.
    """
    n, outs = diag.shape[0], diag[0].numel()
    d = diag.reshape(n, outs)
    # Each of the c columns also carries the module's intermediate values through its vjp,
    # counted as 8 outputs' worth (attention's scores are several): without that, a window
    # attention of torchvision's swin_t (6,144 outputs a sample) took over 20 GB.
    step = max(1, _ROW_CHUNK_ENTRIES // max(1, n * (row_size + 8 * outs)))
    total = None
    for start in range(0, outs, step):
        stop = min(start + step, outs)
        cols = diag.new_zeros(stop - start, n, outs)
        cols[torch.arange(stop - start), :, torch.arange(start, stop)] = 1
        rows = pull(cols.reshape(stop - start, *diag.shape)).square()
        spec = "cn...,nc->n..." if per_sample else "cn...,nc->..."
        part = torch.einsum(spec, rows, d[:, start:stop])
        total = part if total is None else total.add_(part)
    return total


FALLBACK = FallbackRule()


def mixes_samples(module: nn.Module, training: Optional[bool] = None) -> bool:
    """Whether the module combines samples (BatchNorm with batch statistics).

    Args:
        module: The module.
        training: Its mode when it was called (``None``: its mode now). The
            forward pass decides: a call in train mode used batch statistics
            even if the model is put in eval mode before the backward pass.
    """
    if isinstance(module, BATCH_NORM_TYPES):
        return (module.training if training is None else training) or not module.track_running_stats
    return False
