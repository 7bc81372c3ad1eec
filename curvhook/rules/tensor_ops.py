"""Rules for tensor operations executed between modules (``x + y``, ``x.view``, ``F.relu`` …).

Every operation is recorded as a :class:`~curvhook.calls.Operation` and can be
run again on its stored inputs. Its tensor arguments are *batched* (computed
from the model input, batch axis first), *shared* (parameters, or tensors
computed from parameters only) or constant.

One generic rule serves every operation exactly with ``torch.func``:

- ``J_xᵀ m`` for a batched input: the ``vjp`` of the whole batched operation,
  ``vmap``-ed over the ``V`` columns (a batched backward, cheap for glue).
- Per-sample products for a shared input: ``vjp`` of the per-sample operation
  ``x_n ↦ op(x_n[None])[0]`` under ``vmap`` over samples.
- ``diag(Jᵀ diag(d) J)`` (DiagGGNApprox): per-sample ``jacrev``.

Before it is used, the per-sample operation is checked against the recorded
output, so an operation that mixes samples or moves the batch axis raises
instead of giving wrong numbers.

The diagonal rules of DiagGGNApprox have cheap exact forms for the common
operations, with ``d ≥ 0``:

- structural maps (views, permutations, selections, concatenation, splits,
  expansion) and ``±`` (``add``/``sub``): every Jacobian entry is ``0`` or ``±1``
  and has one sign per input, so ``Σ_o d_o J_oi² = |Jᵀ d|``;
- ``mean``: entries ``1/k``, so ``Σ_o d_o J_oi² = (Jᵀ d) / k``;
- elementwise functions: ``d ⊙ σ'(x)²``;
- ``a ⊙ b``, ``a / b`` and ``a @ b``, bilinear: the diagonal for ``a`` is the
  transposed product with the other operand squared, e.g. ``d @ (b²)ᵀ``.

An input passed more than once (``x + x``) takes the generic path.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import jacrev, vjp, vmap

from curvhook import _memory
from curvhook._torch_internals import tensor_version
from curvhook.errors import UnsupportedModelError, out_of_memory_error
from curvhook.mask_index import gather_entry, mask_selection_hint
from curvhook.operations import (
    ADDITIONS, BROADCASTING, CHANGE_RANK, DIM_OPERATIONS, EINSUMS, ELEMENTWISE, EXTREMES, INDEXED_ALONG_DIM,
    INDEXED_EXTREMES, KNOWN, MATMULS, MEANS, NORMALIZES, PRODUCTS, QUOTIENTS, REVERSED_SUBTRACTIONS, SAMPLE_ALIGNED,
    SELECTIONS, SOFTMAXES, STRUCTURAL, SUBTRACTIONS, WINDOWS,
)
from curvhook.records import BATCHED, CONST, SHARED, Operation, Slot
from curvhook.rules.base import LayerRule, apply_node
from curvhook.rules.complex_views import complex_diag, involves_complex
from curvhook.rules.softmax import softmax_diag

# ----------------------------------------------------------------- structure
def _broadcasts_to(shape: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` (and no further)."""
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == tuple(target)
    except RuntimeError:
        return False


def batch_safe(call: Operation, n: int) -> bool:
    """Whether the shapes and arguments show that ``call`` keeps samples apart.

    A ``False`` sends the call to the generic rule, which checks it numerically.
    """
    name = call.func_name
    if name not in KNOWN:
        return False
    if any(s is not None and (len(s) == 0 or s[0] != n) for s in call.output_shapes):
        return False
    out_ndim = len(call.output_shapes[0])
    if name == "__setitem__":
        return _setitem_keeps_batch(call, n)
    for t, kind in zip(call.inputs, call.input_kinds):
        if kind == BATCHED and (t.dim() != out_ndim or t.shape[0] != n) and name not in _ANY_RANK:
            # the others may change the number of axes; their dims are checked below
            return False
    if name in DIM_OPERATIONS and not _dims_avoid_batch(call):
        return False
    if name == "__getitem__":
        # (a batch gather, x[arange(N), idx], depends on the index values: the per-sample
        # replay checks it on every pass, with its indices cut by sample)
        return _index_keeps_batch(call.args[1] if len(call.args) > 1 else None)
    if name in MATMULS:
        return _matmul_keeps_batch(call)
    if name in EINSUMS:
        return _einsum_subscripts(call) is not None
    if name in ("__get__",):
        return getattr(call.func.__self__, "__name__", "") in ("mT", "mH")
    if call.kwargs.get("alpha", 1) != 1:
        return False
    return True


def _basic_index_shape(shape: torch.Size, index) -> Optional[tuple[int, ...]]:
    """The shape of ``x[index]`` for a basic index of ints, full or partial slices and at most
    one ``...``, where the batch axis (axis 0) is kept whole; ``None`` for any other index
    (tensors, ``None``, booleans, an index that reads the batch axis)."""
    entries = index if isinstance(index, tuple) else (index,)
    if any(not (e is Ellipsis or isinstance(e, slice) or (type(e) is int)) for e in entries):
        return None  # (a Slot is an int subclass: a tensor index)
    if sum(e is Ellipsis for e in entries) > 1:
        return None
    taken = len(entries) - (Ellipsis in entries)
    if taken > len(shape):
        return None
    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        entries = entries[:at] + (slice(None),) * (len(shape) - taken) + entries[at + 1 :]
    entries = entries + (slice(None),) * (len(shape) - len(entries))
    if entries[0] != slice(None):
        return None
    return tuple(len(range(*e.indices(size))) for e, size in zip(entries, shape) if isinstance(e, slice))


def _setitem_keeps_batch(call: Operation, n: int) -> bool:
    """Whether ``x[index] = v`` on a batched ``x`` (or a constant ``x`` with one row per sample
    and a batched ``v``) keeps samples apart.

    A ``v`` without gradient (a scalar, a constant) leaves each entry of ``x`` or replaces
    it by a constant, whatever the index (``x[mask] = 0``). A ``v`` with gradient needs a
    basic index that keeps the batch axis whole (:func:`_basic_index_shape`), and ``v``
    with sample ``n``'s values in its row ``n`` (batched, of the rank of ``x[index]``) or
    the same values for every sample (a parameter that broadcasts without a batch axis):
    ``x[0] = w`` writes ``w`` into one sample only, and goes to the per-sample replay.
    """
    if len(call.args) != 3 or not isinstance(call.args[0], Slot):
        return False
    base, value = call.inputs[call.args[0]], call.args[2]
    if base.shape[0] != n or call.input_kinds[call.args[0]] == SHARED:
        return False
    if call.input_kinds[call.args[0]] == CONST:  # a buffer with one row per sample (``zeros(N, …)``)
        if not (isinstance(value, Slot) and call.input_kinds[value] == BATCHED):
            return False
    if not isinstance(value, Slot):
        return isinstance(value, (int, float, bool))
    v, kind = call.inputs[value], call.input_kinds[value]
    if kind == CONST:
        return True
    target = _basic_index_shape(base.shape, call.args[1])
    if target is None:
        return False
    if kind == BATCHED:
        return v.dim() == len(target) and v.shape[0] == n
    # shared: broadcast from the right, its axes at or before the batch axis of size one
    return all(size == 1 for size in v.shape[: max(0, v.dim() - len(target) + 1)])


def _dims_avoid_batch(call: Operation) -> bool:
    name = call.func_name
    args, kwargs = call.args, call.kwargs
    first = next((t for t, k in zip(call.inputs, call.input_kinds) if k == BATCHED), None)
    ndim = first.dim() if first is not None else 1
    if name in ("permute",):
        dims = args[1:] if len(args) > 1 else kwargs.get("dims", ())
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        return len(dims) > 0 and dims[0] % ndim == 0
    if name == "t":  # swaps the first two axes: the batch axis, unless 1-d
        return ndim < 2
    if name in ("transpose", "swapaxes", "swapdims", "movedim", "moveaxis"):
        dims = [a for a in args[1:3]] + [kwargs[k] for k in ("dim0", "dim1", "source", "destination") if k in kwargs]
        flat = [d for x in dims for d in (x if isinstance(x, (tuple, list)) else (x,))]
        return all(isinstance(d, int) and d % ndim != 0 for d in flat)
    if name == "flatten":
        # flatten(0, j) of [N, 1, …, 1, …] keeps [N, …]: a reshape whose input and output
        # both lead with N keeps each sample's entries in its row (row-major order)
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        return start % ndim != 0 or (first is not None and first.shape[0] == call.output_shapes[0][0])
    if name in ("stack", "unsqueeze"):
        dim = _dim_arg(call, default=0)
        return dim is not None and dim % (ndim + 1) != 0
    if name in ("sum", "mean") or name in EXTREMES:
        dim = _dim_arg(call, default=None)
        if dim is None:
            return False
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return len(dims) > 0 and all(d % ndim != 0 for d in dims)
    if name == "pad":  # F.pad(x, (left, right, …)) pads the last len // 2 axes, from the last
        pads = args[1] if len(args) > 1 else kwargs.get("pad", ())
        if not isinstance(pads, (tuple, list)) or not all(isinstance(p, int) for p in pads):
            return False
        return len(pads) < 2 * ndim or all(p == 0 for p in pads[2 * (ndim - 1) : 2 * ndim])
    if name == "squeeze":
        dim = _dim_arg(call, default=None)
        if dim is None:
            return first is not None and first.shape[0] != 1
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return all(d % ndim != 0 for d in dims)
    if name == "roll":  # torch.roll(x, shifts, dims): the keyword is ``dims``
        dim = call.kwargs["dims"] if "dims" in call.kwargs else _dim_arg(call, default=None, position=2)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return dim is not None and all(d % ndim != 0 for d in dims)
    if name == "flip":  # torch.flip(x, dims)
        dim = call.kwargs["dims"] if "dims" in call.kwargs else _dim_arg(call, default=None)
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        return dim is not None and all(d % ndim != 0 for d in dims)
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    if name == "repeat_interleave" and type(repeats) is int and repeats == 1 and _dim_arg(call, None, 2) is not None:
        return True  # each entry once, in place (GCViT's global query at one window per image)
    position = 2 if name in (
        "split", "tensor_split", "narrow", "select", "chunk", "normalize", "take_along_dim", "repeat_interleave",
    ) else 1
    # (repeat_interleave without a dim flattens: it mixes samples)
    default = 1 if name == "normalize" else None if name == "repeat_interleave" else 0
    dim = _dim_arg(call, default=default, position=position)
    return isinstance(dim, int) and dim % ndim != 0


# x.op(y): y gives only a shape (and dtype); the entries of J_x are 0 or 1, each output taken from one input.
_SHAPED_AS = frozenset({"expand_as", "view_as", "reshape_as"})
# Operations whose batched inputs may have another rank than the output (their batch axis is
# checked by dims, or is kept by the row-major order of a reshape to a leading size of N).
_ANY_RANK = CHANGE_RANK | {"view_as", "reshape_as"} | EINSUMS


# One-input reshapes that keep every entry and its row-major order (``γ.reshape(1, -1, 1, 1)``).
_REORDER_FREE = frozenset({
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone", "view_as",
    "reshape_as", "to", "float", "double",  # the last three where they keep dtype and device
})

# Pointwise, with scalar bounds: a diagonal Jacobian of entries 0 and 1.
CLAMPS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "clamp_min_", "clamp_max_"})
# Broadcasting operations that are entrywise in each operand (no sum over entries): for an
# operand of the output's shape, the Jacobian is diagonal (``torch.max(x, c)``, ``where(m, x, y)``).
_ENTRYWISE_IN_EACH = frozenset({
    "maximum", "minimum", "fmax", "fmin", "where", "masked_fill", "masked_fill_", "lerp", "addcmul", "addcdiv",
    "pow", "__pow__", "__rpow__",
}) | INDEXED_EXTREMES | CLAMPS

_CONCATENATIONS = frozenset({"cat", "concat", "concatenate"})
_SPLITS = frozenset({"split", "chunk", "tensor_split"})


def _selection_diag(call: Operation, value, slot: int) -> Optional[Tensor]:
    """``Σ_o d_o J_oi²`` of a concatenation or split along one dim: a selection, so ``Jᵀ d``.

    For ``cat``, the slice of ``d`` where input ``slot`` lies; for a split, the diagonals
    of its pieces concatenated (zeros where nothing reached a piece). ``None`` for
    forms it does not read (a list not of tensors, inputs of other ranks, ...).
    """
    x = call.inputs[slot]
    if call.func_name in _CONCATENATIONS:
        parts, dim = (call.args[0] if call.args else call.kwargs.get("tensors")), _dim_arg(call, default=0)
        if isinstance(value, list) or not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
            return None
        if not all(isinstance(p, Slot) and (call.inputs[p].dim() == value.dim() or _skipped(call.inputs[p])) for p in parts):
            return None
        offset = 0
        for p in parts:
            if _skipped(call.inputs[p]):  # cat skips 1-d empty tensors (an empty cache in front)
                continue
            size = call.inputs[p].shape[dim]
            if p == slot:
                return value.narrow(dim, offset, size)
            offset += size
        return None
    dim = _dim_arg(call, default=0, position=2)
    if not isinstance(value, list) or not isinstance(dim, int) or any(s is None for s in call.output_shapes):
        return None
    pieces = [v if v is not None else x.new_zeros(shape) for v, shape in zip(value, call.output_shapes)]
    if sum(p.shape[dim] for p in pieces) != x.shape[dim]:
        return None
    return torch.cat(pieces, dim)


def _selects(call: Operation, slot: int) -> bool:
    """Whether every Jacobian entry of input ``slot`` is 0 or ±1, one sign per input entry
    (:data:`STRUCTURAL`; the source of a :data:`SELECTIONS` call, not its index): then
    ``Σ_o d_o J_oi² = |Jᵀ d|_i``, one backward of ``d`` instead of a Jacobian."""
    name = call.func_name
    if name == "embedding":  # F.embedding(indices, weight): rows of the weight (max_norm rescales them)
        max_norm = call.args[3] if len(call.args) > 3 else call.kwargs.get("max_norm")
        return len(call.args) > 1 and call.args[1] == slot and max_norm is None
    if name in WINDOWS:
        return bool(call.args) and call.args[0] == slot
    if name in INDEXED_EXTREMES:  # along a dim: (values, indices), each value one entry (VOLO's head)
        dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
        return isinstance(dim, int) and len(call.inputs) == 1 and bool(call.args) and call.args[0] == slot
    return name in STRUCTURAL or (name in SELECTIONS and bool(call.args) and call.args[0] == slot)


def _refuse_changed_index(call: Operation) -> None:
    """A selection replays its index as it is now: an index changed in place after the call
    (``take_along_dim`` keeps none of it for autograd, so torch does not notice) would pick
    other entries. Known by its shapes to keep samples apart, the call has no replay check
    that would catch it."""
    for t, kind, version in zip(call.inputs, call.input_kinds, call.input_versions):
        if kind == CONST and tensor_version(t) != version:
            raise UnsupportedModelError(
                f"The index given to the operation {call.name} was changed in place after the call, "
                "so curvhook no longer knows which entries the forward pass picked. Change a copy "
                "of it instead (idx.clone())."
            )


def _skipped(t: Tensor) -> bool:
    """A tensor that ``torch.cat`` leaves out whatever the others' shapes: 1-d and empty."""
    return t.dim() == 1 and t.numel() == 0


def _sum_to(t: Tensor, x: Tensor) -> Tensor:
    """``t`` summed over the axes along which ``x`` was broadcast (as autograd does for ``x``)."""
    return t if t.shape == x.shape else t.sum_to_size(x.shape)


def _dim_arg(call: Operation, default, position: int = 1):
    if "dim" in call.kwargs:
        return call.kwargs["dim"]
    if len(call.args) > position and not isinstance(call.args[position], Slot):
        return call.args[position]
    return default


def batch_gather(call: Operation) -> Optional[tuple[int, tuple[int, ...]]]:
    """``x[torch.arange(N), idx, ...]``: one row per sample, at per-sample constant indices.

    Hugging Face's sequence classifiers pool ``logits[arange(N), last_token]``. Sample
    ``n``'s output is ``x[n, idx[n], ...]``: it keeps samples apart when every other
    tensor index is a constant of one entry per sample. Returns the slot of the
    ``arange`` and the slots of the other tensor indices, or ``None`` for any other form.
    It reads the index values, so it is not part of :func:`batch_safe` (whose answer
    a plan keeps across passes): the per-sample replay cuts the indices by sample and
    checks the call on every pass.
    """
    if call.func_name != "__getitem__" or len(call.args) != 2 or call.kwargs or call.batch_axes is not None:
        return None
    x, index = call.args
    if not isinstance(x, Slot) or call.input_kinds[x] != BATCHED or not isinstance(index, tuple) or not index:
        return None
    first, n = index[0], call.inputs[x].shape[0]
    if not isinstance(first, Slot) or any(isinstance(i, Slot) and i == x for i in index):
        return None
    rows, others = call.inputs[first], []
    if call.input_kinds[first] != CONST or rows.dtype != torch.long or rows.shape != (n,):
        return None
    if not torch.equal(rows, torch.arange(n, device=rows.device)):
        return None
    for i in index[1:]:
        if not gather_entry(i, call.inputs, call.input_kinds, n) or (isinstance(i, Slot) and i == first):
            return None
        if isinstance(i, Slot):
            others.append(i)
    return first, tuple(others)


def _per_sample_constants(call: Operation) -> list[int]:
    """The slots of the constants that carry the batch axis of a :data:`BROADCASTING`,
    :data:`INDEXED_ALONG_DIM`, :data:`SAMPLE_ALIGNED` or batched :data:`MATMULS` operation:
    of the output's rank, with one row per sample.

    ``torch.where(mask, mask_token, h)`` with a mask ``[N, L, 1]`` (BEiT, MAE), and
    ``h.gather(d, idx)`` with ``idx`` ``[N, k]``: sample ``n`` reads ``mask[n]`` and
    ``idx[n]`` only (``d`` must not be the batch axis).
    """
    out = call.output_shapes[0]
    if call.batch_axes is not None or not out:
        return []
    if call.func_name in MATMULS:
        # ``A @ v`` with ``v`` ``[N, H, L, d]`` from frozen layers: the leading axes of a batched
        # product pair ``A[n]`` with ``v[n]`` (a 2-d operand's leading axis is a matrix row)
        return [
            i for i, (t, k) in enumerate(zip(call.inputs, call.input_kinds))
            if k == CONST and t.dim() == len(out) >= 3 and t.shape[0] == out[0]
        ]
    if call.func_name in INDEXED_ALONG_DIM:
        dim = _dim_arg(call, default=None, position=2 if call.func_name == "take_along_dim" else 1)
        if not isinstance(dim, int) or dim % len(out) == 0:
            return []
    return [
        i for i, (t, k) in enumerate(zip(call.inputs, call.input_kinds))
        if k == CONST and t.dim() == len(out) and t.shape[0] == out[0]
    ]


def _index_keeps_batch(index) -> bool:
    first = index[0] if isinstance(index, tuple) and index else index
    if first is Ellipsis:
        return True
    return isinstance(first, slice) and first == slice(None)


def _matmul_keeps_batch(call: Operation) -> bool:
    if len(call.inputs) != 2 or len(call.args) < 2:
        return False
    a, b = (call.inputs[s] if isinstance(s, Slot) else None for s in call.args[:2])
    ka, kb = (call.input_kinds[s] if isinstance(s, Slot) else "const" for s in call.args[:2])
    if a is None or b is None:
        return False
    # a constant with one slice per sample (keys or values of frozen layers, [N, H, L, d]) is
    # paired with the batched operand's slice of the same sample (_per_sample_constants)
    per_sample = a.dim() == b.dim() >= 3 and a.shape[0] == b.shape[0]
    if kb == BATCHED:  # its batch axis must be a broadcast axis, not the contracted one
        return b.dim() >= 3 and (ka != BATCHED or a.dim() == b.dim()) and (ka == BATCHED or a.dim() <= 2 or (ka == CONST and per_sample))
    return ka == BATCHED and a.dim() >= 2 and (b.dim() <= 2 or (kb == CONST and per_sample))


# --------------------------------------------------------------- the rule
def _outputs(result) -> tuple[Tensor, ...]:
    if isinstance(result, Tensor):
        return (result,)
    return tuple(r for r in _flatten(result) if isinstance(r, Tensor))


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    else:
        yield obj


def _as_list(call: Operation, value, lead: tuple[int, ...]) -> list[Tensor]:
    """The values at every output, zeros where none arrived: ``[*lead, *out]`` each."""
    values = value if isinstance(value, list) else [value]
    return [
        v if v is not None else call.output_values[i].new_zeros(*lead, *sample_shape(call, i))
        for i, v in enumerate(values)
    ]


def _guard(call: Operation, fn: Callable[[], Tensor]) -> Tensor:
    try:
        return fn()
    except UnsupportedModelError:
        raise
    except Exception as err:
        oom = out_of_memory_error(err, f"the operation {call.name}")
        if oom is not None:
            raise oom from err
        raise UnsupportedModelError(
            f"curvhook could not differentiate the operation {call.name} with torch.func: "
            f"{err}. Wrap it in a module and register a rule for that module "
            "(docs/custom_layers.md)."
        ) from err


class TensorOpRule(LayerRule):
    """Exact rules for a recorded tensor operation (see the module docstring)."""

    # ---------------------------------------------------------- helpers
    def _fixed(self, call: Operation) -> list[Tensor]:
        if call.func_name in SELECTIONS:
            _refuse_changed_index(call)
        return [t.detach() for t in call.inputs]

    def _function(self, call: Operation, slots: tuple[int, ...]) -> Callable:
        """``(*tensors at slots) ↦ outputs`` with every other argument held fixed."""
        fixed = self._fixed(call)

        def run(*xs: Tensor):
            tensors = list(fixed)
            for s, x in zip(slots, xs):
                tensors[s] = x
            return _outputs(call.invoke(tensors))

        return run

    def _per_sample(self, call: Operation, slots: tuple[int, ...]) -> Callable:
        """``(batched samples…, *tensors at slots) ↦ outputs[n]`` for one sample.

        Each sample gets its batch axis back (of size one) where the batched
        input has it, and loses it at each output's batch axis.
        """
        batched = self._sliced_slots(call)
        in_axes = [input_axis(call, i) for i in batched]
        out_axes = [output_axis(call, j) for j in range(len(call.output_values))]
        fixed = self._fixed(call)

        def run(samples: tuple[Tensor, ...], *xs: Tensor):
            tensors = list(fixed)
            for i, axis, x_n in zip(batched, in_axes, samples):
                tensors[i] = x_n.unsqueeze(axis)
            for s, x in zip(slots, xs):
                tensors[s] = x
            outs = _outputs(call.invoke(tensors))
            return tuple(o.squeeze(axis) for o, axis in zip(outs, out_axes))

        return run

    def keeps_samples_apart(self, call: Operation, n: int) -> bool:
        """Whether the structure of ``call`` shows that it keeps samples apart (see :func:`batch_safe`)."""
        return batch_safe(call, n)

    def _sliced_slots(self, call: Operation) -> list[int]:
        """The inputs cut into samples for per-sample functions: the batched ones, and the
        per-sample constant indices of a :func:`batch_gather`.

        (A rule may add constants that carry the batch axis by the operation's
        broadcasting, such as a per-sample attention mask.)
        """
        slots = [i for i, k in enumerate(call.input_kinds) if k == BATCHED]
        # (an in-place operation on a view, recorded on its base: the operation's own name)
        name = getattr(call.func, "wrapped_name", call.func_name)
        if (name in INDEXED_ALONG_DIM or name in BROADCASTING or name in SAMPLE_ALIGNED or name in MATMULS
                or call.inplace):  # (``zeros(N, …)[:, :k] = h``, ``empty_like(h).copy_(h)``: row n is sample n's)
            return sorted([*slots, *_per_sample_constants(call)])
        gather = batch_gather(call) if call.func_name == "__getitem__" else None
        return slots if gather is None else sorted([*slots, gather[0], *gather[1]])

    def _samples(self, call: Operation) -> tuple[Tensor, ...]:
        """The inputs of :meth:`_sliced_slots`, batch axis first.

        The ``arange`` of a :func:`batch_gather` becomes zeros: one sample is row 0 of its own batch.
        """
        gather = batch_gather(call) if call.func_name == "__getitem__" else None
        rows = None if gather is None else gather[0]
        return tuple(
            torch.zeros_like(call.inputs[i]) if i == rows else call.inputs[i].detach().movedim(input_axis(call, i), 0)
            for i in self._sliced_slots(call)
        )

    def check(self, call: Operation) -> None:
        """Check, once per backward, that the operation treats samples independently."""
        if call.scratch.keeps_samples_apart_checked or BATCHED not in call.input_kinds:
            return
        if any(k == BATCHED and t.dim() == 0 for t, k in zip(call.inputs, call.input_kinds)):
            raise UnsupportedModelError(
                f"The operation {call.name} takes a scalar computed from the batch (a tensor of shape "
                "(): a reduction over every axis of a batched tensor, torch.max(t), t.sum(), t.norm(), "
                "or one entry, t[0, 0]). curvhook cannot split a scalar into samples, and with more "
                "than one sample it mixes them: per-sample Jacobians do not exist. Reduce over each "
                "sample's own axes instead (t.amax(dim=(1, 2), keepdim=True)). (Nystromformer's "
                "pseudo-inverse starts from one over such a maximum.)"
            )

        def compute():
            per_sample = self._per_sample(call, ())
            return vmap(lambda s: per_sample(s))(self._samples(call))

        try:
            outs = compute()
            recorded = [r.movedim(output_axis(call, j), 0) for j, r in enumerate(_recorded_outputs(call))]
            same = len(outs) == len(recorded) and all(
                o.shape == r.shape and _same_values(o, r)
                for o, r in zip(outs, recorded)
            )
        except Exception as err:  # noqa: BLE001 - any failure means: cannot be split by sample
            random = "random" in str(err)
            raise UnsupportedModelError(
                f"curvhook cannot split the operation {call.name} into samples ({err}). " + (
                    "It draws random numbers (F.dropout(h, training=True) in a forward): use "
                    "nn.Dropout, whose mask curvhook records, or call model.eval()." if random else
                    "Operations must keep the batch axis first and treat samples independently.")
                + mask_selection_hint(call)
            ) from err
        if not same:
            n = call.output_values[0].shape[0] if call.output_values[0].dim() else None
            per_sample_constant = any(  # of the output's rank: not a per-channel vector with C = N
                k == "const" and t.dim() == call.output_values[0].dim() and t.shape[0] == n
                for t, k in zip(call.inputs, call.input_kinds)
            )
            hint = (
                " One of its arguments without grad has the batch axis (a per-sample mask?): "
                "curvhook passes such constants whole to each sample; masked_fill, where, "
                "+, − and * take them, or wrap the operation in a module with a rule."
                if per_sample_constant else ""
            )
            if call.func_name == "__setitem__":
                hint = (
                    " It writes a tensor with a gradient into some samples only (an index that selects "
                    "along the batch axis, x[0] = w) or with rows that are not the samples': write "
                    "into every sample (x[:, …] = v), or use torch.where with a per-sample mask."
                )
            raise UnsupportedModelError(
                f"The operation {call.name} mixes samples, moves the batch axis, or is random "
                "(it gives other values when applied to one sample at a time). Per-sample "
                "Jacobians do not exist for it. Keep the batch axis first, and make random "
                "operations modules (nn.Dropout)." + (mask_selection_hint(call) or hint)
            )
        call.scratch.keeps_samples_apart_checked = True

    # ----------------------------------------------------- matrix products
    def input_jac_t_mat_prod(self, call: Operation, value, slot: int) -> Tensor:
        """``J_xᵀ m`` for the tensor at ``slot``: ``[V, N, *x[1:]]`` (batched) or ``[V, N, *x]`` (shared)."""
        if call.input_kinds[slot] == BATCHED:
            if self._safe(call) and not isinstance(value, list):
                fast = self._fast_columns(call, value, slot)
                if fast is not None:
                    return fast
            mats = _as_list(call, value, _lead(value))
            if not self._safe(call):
                self.check(call)

            return _guard(call, lambda: self._pull_whole(call, mats, slot))
        return self.shared_jac_t_mat_prod(call, value, slot)

    def _pull_whole(self, call: Operation, mats: list[Tensor], slot: int) -> Tensor:
        """``J_xᵀ m`` of the whole batched operation: for one column (``V = 1``, the diagonals)
        by autograd on a replay (:func:`_pullback_by_autograd`), else by its ``vjp``
        ``vmap``-ed over the columns.

        ``mats`` and the result keep the batch axis second (``[V, N, *rest]``);
        the operation sees it where its tensors have it.
        """
        if call.batch_axes is not None:
            mats = [m.movedim(1, 1 + output_axis(call, j)) for j, m in enumerate(mats)]
        x = call.inputs[slot].detach()
        if mats[0].shape[0] == 1 and not call.inplace:
            pulled = _pullback_by_autograd(self._function(call, (slot,)), x, [m[0] for m in mats]).unsqueeze(0)
        else:
            _, pull = vjp(self._function(call, (slot,)), x)
            pulled = vmap(lambda *m: pull(tuple(m))[0])(*mats)
        return pulled if call.batch_axes is None else pulled.movedim(1 + input_axis(call, slot), 1)

    def shared_jac_t_mat_prod(self, call: Operation, value, slot: int) -> Tensor:
        """Per-sample ``J_wᵀ m_vn`` for a shared tensor ``w``: ``[V, N, *w]``."""
        w = call.inputs[slot].detach()
        lead = _lead(value)
        if BATCHED not in call.input_kinds:  # an operation on parameters only: no sample axis
            mats = [m.flatten(0, 1) for m in _as_list_shared(call, value, lead)]

            def compute_shared():
                _, pull = vjp(self._function(call, (slot,)), w)
                out = vmap(lambda *m: pull(tuple(m))[0])(*mats)
                return out.reshape(*lead, *w.shape)

            return _guard(call, compute_shared)
        mats = _as_list(call, value, lead)
        if not self._safe(call):
            self.check(call)
        per_sample = self._per_sample(call, (slot,))

        def compute():
            def one_pair(samples, *m_vn):  # one column of one sample: [*out[1:]] each
                _, pull = vjp(lambda x: per_sample(samples, x), w)
                return pull(tuple(m_vn))[0]

            # One vmap over the V·N (column, sample) pairs, not a vmap over the columns
            # inside one over the samples: torch.func's batching of some parameter vjps
            # (prelu's) mixes two nested levels and gives wrong numbers without raising.
            v, n = mats[0].shape[:2]
            samples = tuple(s.unsqueeze(0).expand(v, *s.shape).flatten(0, 1) for s in self._samples(call))
            pairs = vmap(one_pair)(samples, *(m.flatten(0, 1) for m in mats))
            return pairs.unflatten(0, (v, n))

        return _guard(call, compute)

    # ------------------------------------------------------------ diagonals
    def input_diag(self, call: Operation, value, slot: int) -> Tensor:
        """``diag(J_xᵀ diag(d) J_x)`` per sample: ``[N, *x[1:]]`` or ``[N, *w]`` (shared)."""
        if involves_complex(call, slot):
            return complex_diag(call, value, slot)
        if call.batch_axes is not None and _selects(call, slot) and call.uses(slot) == 1:
            # entries 0 or ±1, one sign per input: Σ_o d_o J_oi² = |Jᵀ d|, the batch axis moved
            mats = [d.unsqueeze(0) for d in _diag_list(call, value)]
            return _guard(call, lambda: self._pull_whole(call, mats, slot)[0].abs())
        if call.batch_axes is not None and call.func_name in MEANS and len(call.inputs) == 1:
            # entries 1/k: Σ_o d_o J_oi² = (Jᵀ d)_i / k, the batch axis moved (CrossViT's mean over
            # its heads, stacked in front of the batch axis)
            mats = [d.unsqueeze(0) for d in _diag_list(call, value)]
            shrink = call.output_values[0].numel() / call.inputs[slot].numel()
            return _guard(call, lambda: self._pull_whole(call, mats, slot)[0] * shrink)
        if self._safe(call):
            fast = self._fast_diag(call, value, slot)
            if fast is not None:
                return fast
        if slot == 0 and call.batch_axes is None and getattr(call.func, "entrywise", False):
            return self._entrywise_write_diag(call, value)
        if (slot > 0 and call.batch_axes is None and call.input_kinds[slot] == BATCHED
                and getattr(call.func, "wrapped_name", None) in _COPIES):
            # what a copy through a view writes (``k[..., :d].copy_(a)``, ``v[i] = a``): every
            # entry of the base reads at most one entry of the source, so J has entries 0 and 1
            # and Σ_o d_o J_oi² = (Jᵀ d)_i, one backward of d on the replay
            self.check(call)
            mats = [d.unsqueeze(0) for d in _diag_list(call, value)]
            return _guard(call, lambda: self._pull_whole(call, mats, slot)[0])
        return self._exact_diag(call, value, slot)

    def _entrywise_write_diag(self, call: Operation, value: Tensor) -> Tensor:
        """``J² d`` at the base of an entrywise in-place operation on a view of it
        (:mod:`curvhook.view_writes`): its Jacobian is diagonal, ``J 1 = Jᵀ 1`` its
        diagonal, one replay's backward instead of dense per-sample Jacobians."""
        self.check(call)

        def compute():
            x = call.inputs[0]
            slope = _pullback_by_autograd(self._function(call, (0,)), x, [torch.ones_like(call.output_values[0])])
            return slope.square() * value

        return _guard(call, compute)

    def _safe(self, call: Operation) -> bool:
        return call.known_per_sample

    def _fast_diag(self, call: Operation, value, slot: int) -> Optional[Tensor]:
        name = call.func_name
        if call.input_kinds[slot] != BATCHED or call.uses(slot) > 1:
            return None
        if not isinstance(value, list):
            direct = _linear_pullback(call, value, slot, squared=True)
            if direct is not None:
                return direct
        x = call.inputs[slot].detach()
        if name in _SHAPED_AS and not isinstance(value, list) and len(call.args) == 2 and not call.kwargs:
            if call.args[0] == slot:  # x.expand_as(y): sums over the expanded axes; x.view_as(y): a view
                return _sum_to(value, x) if name == "expand_as" else value.reshape(x.shape)
            return torch.zeros_like(x)  # y only gives the shape (and dtype)
        if name in _CONCATENATIONS or name in _SPLITS:
            pulled = _selection_diag(call, value, slot)
            if pulled is not None:
                return pulled
        if _selects(call, slot) or name in MEANS:
            single = not isinstance(value, list) and len(call.inputs) == 1 and call.node is not None
            chain = self._node_chain(call, slot) if single else None
            if chain is not None:
                # a chain of one-input autograd operations (a view, transpose, mean; reshape
                # of a strided tensor: clone, then view): their backward applied to d is
                # Jᵀ d, without torch.func's vjp and vmap around it (0.3 ms each). None at
                # all: the call returned its input (``contiguous()`` of a contiguous tensor).
                pulled = value
                for node in chain:
                    pulled = apply_node(node, pulled)
                pulled = pulled.abs() if chain else pulled
            else:
                mats = [d.unsqueeze(0) for d in _diag_list(call, value)]
                pulled = self._pull_batched(call, mats, slot)[0].abs()
            if name in MEANS:
                pulled = pulled * (call.output_values[0].numel() / x.numel())
            return pulled
        if name in ("relu", "relu_") and len(call.output_values) == 1 and self._own_node(call, slot):
            # slopes 0 and 1: σ'² ⊙ d = σ' ⊙ d, the operation's own backward applied to d
            return apply_node(call.node, value)
        if name in ELEMENTWISE and len(call.output_values) == 1:
            slope = self._elementwise_slope(call, slot)
            return value * slope.square() if slope is not None else None
        if name in EXTREMES and len(call.inputs) == 1:
            return _extreme_diag(call, value)
        if name in PRODUCTS | QUOTIENTS | MATMULS and len(call.args) >= 2:
            return self._bilinear_diag(call, value, slot)
        if name in NORMALIZES and len(call.inputs) == 1:
            return _normalize_diag(call, value)
        if name in EINSUMS:
            return _einsum_diag(call, value, slot)
        if name in SOFTMAXES and len(call.inputs) == 1:
            dim = _dim_arg(call, default=None)  # not the batch axis: the call is known_per_sample
            if not isinstance(dim, int) or tensor_version(call.inputs[slot]) != call.input_versions[slot]:
                return None
            # softmax(x, dim, dtype=float32) in a float64 model (Llama's eager attention) casts
            # x first: s as the forward computed it, the diagonal in x's dtype.
            s = torch.softmax(x, dim, dtype=call.output_values[0].dtype)
            return softmax_diag(s, dim, value.to(s.dtype), name == "log_softmax").to(x.dtype)
        return None

    def _fast_columns(self, call: Operation, value: Tensor, slot: int) -> Optional[Tensor]:
        """``J_xᵀ m`` without torch.func: sums, means, and elementwise ``σ(x)`` (``m ⊙ σ'(x)``)."""
        direct = _linear_pullback(call, value, slot, squared=False)
        if direct is not None or call.func_name not in ELEMENTWISE:
            return direct
        if len(call.output_values) != 1 or call.uses(slot) > 1:
            return None
        slope = self._elementwise_slope(call, slot)
        return value * slope if slope is not None else None

    def _pull_batched(self, call: Operation, mats: list[Tensor], slot: int) -> Tensor:
        _, pull = vjp(self._function(call, (slot,)), call.inputs[slot].detach())
        return vmap(lambda *m: pull(tuple(m))[0])(*mats)

    @staticmethod
    def _node_chain(call: Operation, slot: int, longest: int = 3) -> Optional[list]:
        """The autograd nodes from the output back to input ``slot``, if each has that one input.

        ``[]`` where the output's node is the input's (the call returned its input, same
        shape); ``None`` where the path branches, is longer than ``longest``, or is unknown.
        """
        node, source = call.node, call.input_nodes[slot]
        if source is None:
            return None
        if node is source:
            return [] if call.output_values[0].shape == call.inputs[slot].shape else None
        chain = []
        while len(chain) < longest and len(node.next_functions) == 1:
            chain.append(node)
            node = node.next_functions[0][0]
            if node is source:
                return chain
        return None

    @staticmethod
    def _own_node(call: Operation, slot: int) -> bool:
        """Whether ``call.node`` is one autograd operation from input ``slot`` to the output.

        Only for a call with one input that has a node: where two operands come from one
        node (``a, b = h.chunk(2, -1)``; ``maximum(a, b)``), the node's first edge is the
        input of either, and its backward's first output would be read for both.
        """
        node = call.node
        return (
            node is not None
            and sum(n is not None for n in call.input_nodes) == 1
            and call.output_values[0].shape == call.inputs[slot].shape
            and bool(node.next_functions)
            and node.next_functions[0][0] is call.input_nodes[slot]
        )

    def _elementwise_slope(self, call: Operation, slot: int) -> Optional[Tensor]:
        """``σ'(x)`` of a unary elementwise operation, from its autograd node if it is one.

        Kept in ``call.scratch`` for the backward pass: every source reads the same slope.
        """
        slopes = call.scratch.slopes
        if slopes is None:
            slopes = call.scratch.slopes = {}
        if slot not in slopes:
            slopes[slot] = self._compute_slope(call, slot)
        return slopes[slot]

    def _compute_slope(self, call: Operation, slot: int) -> Optional[Tensor]:
        x = call.inputs[slot]
        if call.output_values[0].shape != x.shape:
            return None
        node = call.node
        if self._own_node(call, slot):
            return apply_node(node, _memory.ones(call.output_values[0].shape, like=call.output_values[0]))
        if tensor_version(x) != call.input_versions[slot]:
            return None
        _, pull = vjp(self._function(call, (slot,)), x.detach())
        return pull((torch.ones_like(call.output_values[0]),))[0]

    def _bilinear_diag(self, call: Operation, value: Tensor, slot: int) -> Optional[Tensor]:
        """``a⊙b``, ``a/b``, ``a@b``: the transposed product with the other operand squared."""
        name = call.func_name
        first = call.args[0]
        other_arg = call.args[1] if isinstance(first, Slot) and first == slot else first
        other = call.inputs[other_arg].detach() if isinstance(other_arg, Slot) else other_arg
        if not isinstance(other, (Tensor, int, float)):
            return None
        x = call.inputs[slot].detach()
        is_first = isinstance(first, Slot) and first == slot
        if name in QUOTIENTS:
            if call.kwargs.get("rounding_mode") is not None:
                return None
            if not is_first:  # ∂(a/b)/∂b = −a/b², b broadcast: one entry of b per output entry
                return _sum_to(value * (other / x.square()).square(), x)
            return _sum_to(value / other**2, x)  # the transposed product, broadcasting undone
        elif name in PRODUCTS:
            return _sum_to(value * other**2, x)
        else:  # matmul
            sq = other**2
            squared = (lambda t: t @ sq) if is_first else (lambda t: sq @ t)

        def compute():
            _, pull = vjp(squared, x)
            return pull(value)[0]

        return _guard(call, compute)

    def _shared_diag(self, call: Operation, value, slot: int) -> Optional[Tensor]:
        """Per-sample ``diag(J_wᵀ diag(d_n) J_w)`` for a shared operand ``w`` of ``x ⊙ w``, ``w / x``, ``x @ w``.

        The operation is linear in ``w`` with coefficients from the batched operand
        ``x``, so the squared Jacobian is the same operation with ``x`` squared:
        ``Σ_o d_o J_oj² = J_wᵀ d`` evaluated at ``x∘x`` (``1/x²`` for a quotient).
        A product is summed to ``w``'s shape directly, a matrix product pulled back
        by one ``vjp`` per sample under ``vmap``.

        Args:
            call: A recorded operation known to keep samples apart.
            value: ``[N, *out]``, the diagonal at the output.
            slot: The shared operand ``w``.

        Returns:
            ``[N, *w]``, or ``None`` for every other operation or form of call
            (``w`` used twice, more than one batched operand, keyword arguments).
        """
        name = call.func_name
        if name in EINSUMS and not isinstance(value, list):
            return self._shared_einsum_diag(call, value, slot)
        if name == "__setitem__" and not isinstance(value, list) and call.args[2] == slot and call.uses(slot) == 1:
            # x[index] = w, broadcast over the samples (a basic index, see batch_safe): each entry
            # of w copied into several entries of x, Σ_o d_o J_oj² = the sum of d over its copies
            picked, w = value[call.args[1]], call.inputs[slot]
            tail = tuple(w.shape[max(0, w.dim() - picked.dim() + 1) :])  # w's axes after the batch axis
            shape = (1,) * (picked.dim() - 1 - len(tail)) + tail
            return picked.sum_to_size(picked.shape[0], *shape).reshape(-1, *w.shape)
        if isinstance(value, list) or call.kwargs or len(call.args) != 2 or call.uses(slot) != 1:
            return None
        if name in ADDITIONS or name in SUBTRACTIONS or name in REVERSED_SUBTRACTIONS:
            return _shared_sum_diag(call.inputs[slot], value)
        if not (name in PRODUCTS or name in MATMULS or name in QUOTIENTS):
            return None
        first, second = call.args
        if not (isinstance(first, Slot) and isinstance(second, Slot)):
            return None
        other = second if first == slot else first
        if call.input_kinds[other] != BATCHED or call.input_kinds.count(BATCHED) != 1 or call.uses(other) != 1:
            return None
        if name in QUOTIENTS and first != slot:
            return None  # ∂(x/w)/∂w = -x/w²: the generic path
        w, x = call.inputs[slot].detach(), call.inputs[other].detach()
        x_sq = x.reciprocal().square() if name in QUOTIENTS else x.square()
        out_dim = value.dim()
        # (x may broadcast too, each output entry still reads one entry of each operand: Mamba's
        # dt[:, :, :, None] * A[None, :, None, :], [N, D, T, 1] ⊙ [1, D, 1, S])
        x_fits = _broadcasts_to(x.shape, value.shape)
        if name in PRODUCTS:
            if w.dim() > out_dim or (w.dim() == out_dim and w.shape[0] != 1) or not x_fits:
                return None
            pulled = value * x_sq
            target = (1,) * (out_dim - w.dim()) + tuple(w.shape)
            return pulled.sum_to_size(value.shape[0], *target[1:]).reshape(-1, *w.shape)
        if name in QUOTIENTS:  # w / x with w shared: J_w = 1/x
            if w.dim() > out_dim or (w.dim() == out_dim and w.shape[0] != 1) or not x_fits:
                return None
            target = (1,) * (out_dim - w.dim()) + tuple(w.shape)
            return (value * x_sq).sum_to_size(value.shape[0], *target[1:]).reshape(-1, *w.shape)
        is_first = first == slot

        def one(x_n: Tensor, d_n: Tensor) -> Tensor:
            f = (lambda v: v @ x_n) if is_first else (lambda v: x_n @ v)
            _, pull = vjp(f, w)
            return pull(d_n)[0]

        return _guard(call, lambda: vmap(one)(x_sq, value))

    def _pointwise_shared_diag(self, call: Operation, value, slot: int) -> Optional[Tensor]:
        """``σ'(w)² ⊙ d_n`` for a pointwise function of a tensor ``w`` computed from parameters
        only (Swin V2's ``16 * sigmoid(bias)`` and ``clamp(logit_scale, max=c).exp()``): its
        Jacobian is diagonal, one for every sample. ``None`` for any other operation."""
        if isinstance(value, list) or len(call.inputs) != 1 or call.uses(slot) != 1 or len(call.output_values) != 1:
            return None
        w, name = call.inputs[slot], call.func_name
        if value.shape[1:] != w.shape or call.output_values[0].dtype != w.dtype:
            return None
        if name in ELEMENTWISE or name in CLAMPS:
            slope = self._elementwise_slope(call, slot)
            return None if slope is None else value * slope.square()
        if (name in PRODUCTS or name in QUOTIENTS) and len(call.args) == 2 and not call.kwargs:
            other = call.args[1] if call.args[0] == slot else call.args[0]
            if isinstance(other, (int, float)) and not isinstance(other, bool) and (name in PRODUCTS or call.args[0] == slot):
                return value * (other**2 if name in PRODUCTS else 1 / other**2)
        return None

    def _shared_einsum_diag(self, call: Operation, value: Tensor, slot: int) -> Optional[Tensor]:
        """Per-sample ``Σ_o d_no J_oj²`` for a shared operand ``w`` of ``einsum(spec, x, w)``
        with ``x`` batched: the sum with ``x`` squared, pulled back by one ``vjp`` per sample
        under ``vmap`` (see :func:`_einsum_diag`)."""
        if _einsum_subscripts(call) is None or call.uses(slot) != 1:
            return None
        spec, a_slot, b_slot = call.args
        other = b_slot if slot == a_slot else a_slot
        if call.input_kinds[other] != BATCHED:
            return None
        w, x_sq = call.inputs[slot].detach(), call.inputs[other].detach().square()

        def one(x_n: Tensor, d_n: Tensor) -> Tensor:
            _, pull = vjp(_einsum_of(spec, slot == a_slot, x_n.unsqueeze(0)), w)
            return pull(d_n.unsqueeze(0))[0]

        return _guard(call, lambda: vmap(one)(x_sq, value))

    def _exact_diag(self, call: Operation, value, slot: int) -> Tensor:
        """``Σ_o d_o J_oi²`` per sample: the closed forms of a shared operand, else dense
        per-sample Jacobians (then it warns once per function)."""
        shared = call.input_kinds[slot] != BATCHED
        if shared and self._safe(call) and BATCHED in call.input_kinds:
            fast = self._shared_diag(call, value, slot)
            if fast is not None:
                return fast
        if BATCHED not in call.input_kinds:  # parameters only: one Jacobian for every sample
            w = call.inputs[slot].detach()
            if (
                call.func_name in _REORDER_FREE and len(call.inputs) == 1 and call.uses(slot) == 1
                and not isinstance(value, list) and value[0].numel() == w.numel()
                and call.output_values[0].dtype == w.dtype and call.output_values[0].device == w.device
            ):
                # the same entries in the same (row-major) order: J = I, the diagonal reshaped back
                return value.reshape(value.shape[0], *w.shape)
            pointwise = self._pointwise_shared_diag(call, value, slot)
            if pointwise is not None:
                return pointwise
            if call.func_name in EINSUMS and not isinstance(value, list) and _einsum_subscripts(call) is not None:
                # linear in w, each output entry reading each entry of w once: the sum with the
                # other operand squared, pulled back per sample (timm's RelPosBiasTf resizes a
                # bias table by einsum with constant matrices)
                spec, a_slot, b_slot = call.args
                other_sq = call.inputs[b_slot if slot == a_slot else a_slot].detach().square()
                _, pull = vjp(_einsum_of(spec, slot == a_slot, other_sq), w)
                return _guard(call, lambda: vmap(lambda d: pull(d)[0])(value))
            if _selects(call, slot) and not isinstance(value, list) and call.uses(slot) == 1:
                # entries 0 or ±1, one sign per input (``γ.reshape(1, -1, 1, 1)``): |Jᵀ d| per sample
                _, pull = vjp(self._function(call, (slot,)), w)
                return _guard(call, lambda: vmap(lambda d: pull((d,))[0])(value).abs())
            _warn_dense_once(call)
            jacs = jacrev(self._function(call, (slot,)))(w)
            first = next(v for v in value if v is not None) if isinstance(value, list) else value
            diags = _as_list_shared(call, value, (first.shape[0],))
            total = 0
            for d, jac in zip(diags, jacs):
                jac = jac.reshape(d[0].numel(), w.numel())
                total = total + torch.einsum("no,op->np", d.reshape(d.shape[0], -1), jac.square())
            return total.reshape(-1, *w.shape)
        if not shared and call.func_name in _ENTRYWISE_IN_EACH and call.uses(slot) == 1 and not isinstance(value, list) \
                and len(call.output_values) == 1 and call.inputs[slot].shape == call.output_values[0].shape:
            # an operand of the output's shape (not broadcast): each output entry reads its own
            # entry of x, so J_x is diagonal and Σ_o d_o J_oi² = σ'_i² d_i, once the replay has
            # shown that the call keeps samples apart (XGLM's torch.max(scores, torch.full((), m))
            # on the attention scores: 512 GB of dense Jacobians at 128 tokens)
            if not self._safe(call):
                self.check(call)
            slope = self._elementwise_slope(call, slot)
            if slope is not None:
                return value * slope.square()
        if not shared and (call.func_name in SELECTIONS | WINDOWS | INDEXED_EXTREMES or call.func_name == "__getitem__") \
                and _selects(call, slot) and call.uses(slot) == 1:
            # each output entry one input entry: Jᵀ d over the whole batch, once the replay has
            # shown that the call keeps samples apart (a per-sample gather h[arange(N), idx],
            # BART's h[ids.eq(eos), :]: 38 GB of dense Jacobians at bart-base; HaloNet's
            # overlapping windows kv.unfold(2, 6, 4))
            if not self._safe(call):
                self.check(call)
            mats = [d.unsqueeze(0) for d in _diag_list(call, value)]
            return _guard(call, lambda: self._pull_whole(call, mats, slot)[0].abs())
        _warn_dense_once(call)
        if not self._safe(call):
            self.check(call)
        diags = _diag_list(call, value)
        per_sample = self._per_sample(call, (slot,))
        samples = self._samples(call)
        batched_slots = self._sliced_slots(call)

        def compute():
            if shared:
                w = call.inputs[slot].detach()
                jacs = vmap(jacrev(lambda s, x: per_sample(s, x), argnums=1), in_dims=(0, None))(samples, w)
                size = w.numel()
            else:
                pos = batched_slots.index(slot)

                def f(x_n, s):
                    s = list(s)
                    s[pos] = x_n
                    return per_sample(tuple(s))

                jacs = vmap(jacrev(f))(samples[pos], samples)
                size = samples[pos][0].numel()
            total = 0
            for d, jac in zip(diags, jacs):
                jac = jac.reshape(d.shape[0], d[0].numel(), size)
                # (reshape: a per-sample scalar, ``h.norm(dim=-1)``, has no axis 1 to flatten)
                total = total + torch.einsum("no,noi->ni", d.reshape(d.shape[0], -1), jac.square())
            shape = call.inputs[slot].shape if shared else samples[pos].shape[1:]
            return total.reshape(-1, *shape)

        return _guard(call, compute)

    # --------------------------------------------------- parameter results
    def param_jac_t_mat_prod(self, call: Operation, name: str, mat) -> Tensor:
        return self.shared_jac_t_mat_prod(call, mat, call.slot_of(name))

    def param_sq_sum(self, call: Operation, name: str, mat) -> Tensor:
        return self.param_jac_t_mat_prod(call, name, mat).square().sum((0, 1))

    def param_diag(self, call: Operation, name: str, diag) -> Tensor:
        return self._exact_diag(call, diag, call.slot_of(name)).sum(0)


_DENSE_WARNED: set[str] = set()


def _warn_dense_once(call: Operation) -> None:
    """Warn the first time an operation's DiagGGNApprox diagonal takes dense per-sample Jacobians."""
    name = call.func_name
    if name in _DENSE_WARNED:
        return
    _DENSE_WARNED.add(name)
    warnings.warn(
        f"curvhook has no closed-form diagonal for the operation {call.name}: DiagGGNApprox "
        "differentiates it with dense per-sample Jacobians (exact, but their cost grows with "
        "the square of its size). Wrap it in a module and register a rule with "
        "curvhook.register_rule (docs/custom_layers.md) if it is slow.",
        stacklevel=3,
    )


def _extreme_diag(call: Operation, value: Tensor) -> Optional[Tensor]:
    """``Σ_o d_o J_oi²`` of ``amax``/``amin`` over ``dims``: ``J_oi = 1/k`` for the ``k`` entries
    tied at the extreme of output ``o`` (autograd shares the gradient among them), else 0."""
    dim = _dim_arg(call, default=None)
    if dim is None or isinstance(dim, Slot) or set(call.kwargs) - {"dim", "keepdim"}:
        return None
    keepdim = call.kwargs.get("keepdim", call.args[2] if len(call.args) > 2 else False)
    if not isinstance(keepdim, bool):
        return None
    x = call.inputs[0].detach()
    dims = sorted(d % x.dim() for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
    out, d = call.output_values[0], value
    if not keepdim:
        for a in dims:  # ascending: each index is already the input's
            out, d = out.unsqueeze(a), d.unsqueeze(a)
    hits = x == out
    count = hits.sum(dims, keepdim=True).clamp(min=1)
    return torch.where(hits, d / count.square().to(d.dtype), 0)


def _linear_pullback(call: Operation, value: Tensor, slot: int, squared: bool) -> Optional[Tensor]:
    """``J_xᵀ m`` (or ``Σ_o d_o J_oi²`` if ``squared``) for ``±a ± b`` and ``mean``, directly.

    Both are linear with constant coefficients: a sum gives its operand ``±m``,
    summed over the axes it was broadcast along; a mean over ``K`` entries gives
    every entry ``m / K``, and the squared Jacobian ``d / K²``.

    Args:
        call: A recorded operation already known to keep samples apart.
        value: ``[*lead, N, *out]``, the columns (or the diagonal) at the output.
        slot: A batched input used once by the operation.
        squared: Pull back a diagonal instead of columns.

    Returns:
        ``[*lead, N, *x[1:]]``, or ``None`` for every other operation or form of call.
    """
    name = call.func_name
    x = call.inputs[slot]
    lead = value.shape[: value.dim() - len(call.output_shapes[0])]
    if name in ADDITIONS or name in SUBTRACTIONS or name in REVERSED_SUBTRACTIONS:
        if call.kwargs or len(call.args) != 2 or call.uses(slot) != 1:
            return None  # alpha=..., out=..., or x ± x
        position = 0 if isinstance(call.args[0], Slot) and call.args[0] == slot else 1
        negated = (name in SUBTRACTIONS and position == 1) or (name in REVERSED_SUBTRACTIONS and position == 0)
        pulled = value if value.shape[len(lead):] == x.shape else value.sum_to_size(*lead, *x.shape)
        return -pulled if negated and not squared else pulled
    if name in MEANS and slot == 0 and call.uses(slot) == 1 and set(call.kwargs) <= {"dim", "keepdim"}:
        dim = _dim_arg(call, default=None)
        if dim is None or isinstance(dim, Slot):
            return None
        keepdim = call.kwargs.get("keepdim", call.args[2] if len(call.args) > 2 else False)
        if not isinstance(keepdim, bool):
            return None
        dims = sorted(d % x.dim() for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))
        if not keepdim:
            for d in dims:  # ascending, so each index is already that of the input
                value = value.unsqueeze(len(lead) + d)
        count = x.numel() // max(call.output_values[0].numel(), 1)
        return value.expand(*lead, *x.shape) / (count * count if squared else count)
    return None


def _einsum_subscripts(call: Operation) -> Optional[tuple[str, str, str]]:
    """``(a, b, out)`` of ``torch.einsum("a,b->out", x, y)`` where it keeps samples apart and
    each output entry reads each operand entry at most once, times one entry of the other
    operand: two distinct tensor operands given one by one, explicit output, no ellipsis,
    no label twice in one operand (a diagonal), every label of an operand in the other
    operand or the output (none summed out of one operand alone), and every batched
    operand's first label the output's first (the batch axis). ``None`` for any other form."""
    args = call.args
    if call.kwargs or len(args) != 3 or not isinstance(args[0], str):
        return None
    a_slot, b_slot = args[1], args[2]
    if not (isinstance(a_slot, Slot) and isinstance(b_slot, Slot)) or a_slot == b_slot:
        return None
    spec = args[0].replace(" ", "")
    if "." in spec or "->" not in spec:
        return None
    ins, out = spec.split("->")
    parts = ins.split(",")
    if len(parts) != 2 or not out or any(len(set(p)) != len(p) for p in (*parts, out)):
        return None
    if any(label not in other and label not in out for p, other in (parts, parts[::-1]) for label in p):
        return None  # summed out of one operand alone ("bi,bj->bi"): J_oi is a sum of the other's entries
    for p, slot in zip(parts, (a_slot, b_slot)):
        if call.inputs[slot].dim() != len(p):
            return None
        if call.input_kinds[slot] == BATCHED and p[0] != out[0]:
            return None
    return parts[0], parts[1], out


def _einsum_diag(call: Operation, value, slot: int) -> Optional[Tensor]:
    """``Σ_o d_o J_oi²`` for one operand of a two-operand Einstein sum: linear in it, each
    output entry reads each of its entries at most once (no label twice in an operand),
    so ``J_oi`` is one entry of the other operand and the squared Jacobian is the same sum
    with the other operand squared: the transposed product at ``d``, one ``vjp``."""
    if isinstance(value, list) or _einsum_subscripts(call) is None or call.uses(slot) != 1:
        return None
    spec, a_slot, b_slot = call.args
    other = b_slot if slot == a_slot else a_slot
    x, y_sq = call.inputs[slot].detach(), call.inputs[other].detach().square()
    _, pull = vjp(_einsum_of(spec, slot == a_slot, y_sq), x)
    return pull(value)[0]


def _einsum_of(spec: str, first: bool, other: Tensor) -> Callable[[Tensor], Tensor]:
    """``t ↦ einsum(spec, t, other)`` (``first``) or ``t ↦ einsum(spec, other, t)``."""
    return (lambda t: torch.einsum(spec, t, other)) if first else (lambda t: torch.einsum(spec, other, t))


def _normalize_diag(call: Operation, value: Tensor) -> Optional[Tensor]:
    """``Σ_o d_o J_oi²`` of ``y = F.normalize(x, p=2, dim)``, in closed form.

    Along ``dim``, ``J = (I − y yᵀ) / r`` with ``r = ‖x‖``, so
    ``Σ_o d_o J_oi² = (d_i (1 − y_i²)² + y_i² Σ_{o≠i} d_o y_o²) / r²``, a sum of
    non-negative terms. ``1 − y_i² = Σ_{o≠i} x_o² / r²`` and both sums over
    ``o ≠ i`` are formed from exclusive prefix and suffix sums: nothing
    cancels, also where one entry carries the norm (``y_i² → 1``). Where the
    norm is below ``eps`` (zero-padded tokens: Swin V2's keys of its padding
    carry no bias), ``y = x / eps`` and ``J = I / eps``: ``d / eps²``. ``None``
    (the generic path) for ``p ≠ 2``.
    """
    args = _bind_normalize(call)
    if args is None:
        return None
    dim, eps = args
    x = call.inputs[0].detach()
    x_sq = x.square()
    r_sq = x_sq.sum(dim, keepdim=True)
    small = torch.linalg.vector_norm(x, dim=dim, keepdim=True) < eps  # as F.normalize's clamp_min(eps)
    r_sq = torch.where(small, 1.0, r_sq)
    y_sq = x_sq / r_sq
    others = sum_of_others(x_sq, dim) / r_sq  # 1 − y_i²
    diag = (value * others.square() + y_sq * sum_of_others(value * y_sq, dim)) / r_sq
    return torch.where(small, value / (eps * eps), diag)


# In-place writes whose source lands in the target entry by entry (through a view: WriteThrough).
_COPIES = frozenset({"copy_", "__setitem__"})


def _same_values(replayed: Tensor, recorded: Tensor) -> bool:
    """Whether a per-sample replay gave the recorded values, to float32's rounding. Entries
    that are not finite must match as they are (``new_empty`` leaves whatever the memory held,
    NaN included, where a write through a view did not reach)."""
    finite = recorded[recorded.isfinite()]
    scale = 1 + (finite.abs().max().item() if finite.numel() else 0.0)
    return torch.allclose(replayed, recorded, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)


def sum_of_others(a: Tensor, dim: int) -> Tensor:
    """``Σ_{o≠i} a_o`` along ``dim`` for every ``i``, from exclusive prefix and suffix sums
    (no subtraction: for ``a ≥ 0`` exact to rounding, however large ``a_i``)."""
    size = a.shape[dim]
    if size == 1:
        return torch.zeros_like(a)
    zero = torch.zeros_like(a.narrow(dim, 0, 1))
    before = torch.cat([zero, a.cumsum(dim).narrow(dim, 0, size - 1)], dim)
    after = torch.cat([a.flip(dim).cumsum(dim).narrow(dim, 0, size - 1).flip(dim), zero], dim)
    return before + after


def _bind_normalize(call: Operation) -> Optional[tuple[int, float]]:
    """``(dim, eps)`` of ``F.normalize(x, p=2.0, dim=1, eps=1e-12)``; ``None`` for another form."""
    names = ("input", "p", "dim", "eps", "out")
    bound = dict(zip(names, call.args))
    bound.update(call.kwargs)
    if set(bound) - set(names) or bound.get("out") is not None or not isinstance(bound.get("input"), Slot):
        return None
    p, dim, eps = bound.get("p", 2.0), bound.get("dim", 1), bound.get("eps", 1e-12)
    if p != 2 or not isinstance(dim, int) or not isinstance(eps, (int, float)):
        return None
    return dim, eps


def _shared_sum_diag(w: Tensor, value: Tensor) -> Optional[Tensor]:
    """Per-sample ``Σ_o d_o J_oj²`` for the shared operand ``w`` of ``x ± w``: ``d`` summed to ``w``'s shape.

    Every entry of ``J_w`` is ``0`` or ``±1``, one per output entry. A ``w`` with
    the batch size as its first axis (an embedding of constant indices, expanded
    to the batch) gives sample ``n`` only its own row ``w[n]``.

    Args:
        w: The shared operand, broadcast to the output ``[N, *out]``.
        value: ``[N, *out]``, the diagonal at the output.

    Returns:
        ``[N, *w.shape]``, or ``None`` if ``w`` has more axes than the output.
    """
    n, out_dim = value.shape[0], value.dim()
    if w.dim() > out_dim:
        return None
    if w.dim() < out_dim or w.shape[0] == 1:
        target = (1,) * (out_dim - w.dim()) + tuple(w.shape)
        return value.sum_to_size(n, *target[1:]).reshape(n, *w.shape)
    if w.shape[0] != n:
        return None
    rows = value.sum_to_size(n, *w.shape[1:])
    result = value.new_zeros(n, *w.shape)
    index = torch.arange(n, device=value.device)
    result[index, index] = rows
    return result


def _recorded_outputs(call: Operation) -> tuple[Tensor, ...]:
    """The outputs the operation computed: the recorded ones, or a replay on the whole batch.

    ``output_values`` share storage with the outputs, so an in-place operation
    after this one (``nn.SiLU(inplace=True)`` after ``F.batch_norm``) changes
    them; their version counters tell. The replay then gives the values to compare with.
    """
    changed = any(
        key is not None and tensor_version(value) != key[1]
        for value, key in zip(call.output_values, call.output_keys)
    )
    if not changed:
        return call.output_values
    with torch.no_grad():
        return _outputs(call.invoke([t.detach() for t in call.inputs]))


def _pullback_by_autograd(fn: Callable, x: Tensor, grads: list[Tensor]) -> Tensor:
    """``J_xᵀ m`` for one column ``m`` (``grads``, one per output of ``fn``) by autograd on a replay.

    One column needs no ``vmap``; autograd's backward of the replayed operation costs
    a fraction of ``torch.func``'s ``vjp`` and ``vmap`` around it (a timm ViT's
    ``qkv.unbind(0)``: 0.15 against 1.4 ms). Not for in-place operations: their
    replay would write into the leaf.

    Args:
        fn: ``x ↦`` the operation's outputs (a tuple), other arguments held fixed.
        x: The input, ``[*x]``.
        grads: ``m`` at each output, its shape.

    Returns:
        ``[*x]``.
    """
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        pairs = [(o, g) for o, g in zip(fn(leaf), grads) if o.requires_grad]
        if not pairs:
            return torch.zeros_like(x)
        (pulled,) = torch.autograd.grad([o for o, _ in pairs], leaf, [g for _, g in pairs], allow_unused=True)
    return torch.zeros_like(x) if pulled is None else pulled


def _diag_list(call: Operation, value) -> list[Tensor]:
    """Diagonals at every output of an operation on batched tensors, zeros where none arrived."""
    values = value if isinstance(value, list) else [value]
    n = call.output_values[0].shape[output_axis(call, 0)]
    return [
        v if v is not None else call.output_values[i].new_zeros(n, *sample_shape(call, i))
        for i, v in enumerate(values)
    ]


def input_axis(call: Operation, slot: int) -> int:
    """The batch axis of the batched input at ``slot`` (see :mod:`curvhook.batch_axis`)."""
    return 0 if call.batch_axes is None else call.batch_axes[0][slot]


def output_axis(call: Operation, index: int) -> int:
    """The batch axis of output ``index``."""
    return 0 if call.batch_axes is None else call.batch_axes[1][index]


def sample_shape(call: Operation, index: int) -> tuple[int, ...]:
    """The shape of one sample of output ``index``: its shape without the batch axis."""
    shape = list(call.output_values[index].shape)
    del shape[output_axis(call, index)]
    return tuple(shape)


def _lead(value) -> tuple[int, int]:
    first = next(v for v in (value if isinstance(value, list) else [value]) if v is not None)
    return tuple(first.shape[:2])


def _as_list_shared(call: Operation, value, lead) -> list[Tensor]:
    values = value if isinstance(value, list) else [value]
    return [
        v if v is not None else call.output_values[i].new_zeros(*lead, *call.output_values[i].shape)
        for i, v in enumerate(values)
    ]


TENSOR_OPS = TensorOpRule()
