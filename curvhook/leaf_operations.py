"""Leaf modules without a rule that are recorded as the tensor operations they run.

A leaf module that no rule serves goes to the ``torch.func`` fallback, whose
diagonal (DiagGGNApprox) needs the module's whole per-sample Jacobian. Many
such modules only call a few torch functions: timm's ``GELU`` (``F.gelu``),
``LayerNorm2d`` (``permute``, ``F.layer_norm``, ``permute``), torchvision's
``Permute``, a layer scale ``x * gamma``. The tape records those calls inside
the leaf anyway; when they form a chain whose operation-by-operation diagonal
equals the module's own, the recorder keeps them instead of the leaf, and
each is served by the tensor-operation rules (closed forms for the common ones).

The chain keeps the definition of DiagGGNApprox (the module is one operation)
when at most one of its operations is *general* and every other one is
*monomial*: its Jacobian in the chain's tensor has at most one nonzero per row
and per column (permutations and other views, elementwise functions, ``x ⊙ w``,
``x / w``, ``x ± w`` without broadcasting ``x``). For a monomial ``M``,
``diag(Mᵀ A M) = (M∘M)ᵀ diag(A)`` depends on the diagonal of ``A`` alone, and
``Mᵀ D M`` is diagonal for a diagonal ``D``, so truncating to the diagonal
between the operations loses nothing. A parameter (or a tensor computed from
parameters inside the module) must enter once, in the general operation or
after it (the operations after it are monomial). The general operation may be
one on parameters alone (timm's ``RelPosBias``: ``attn + table[index]``, viewed
and permuted): what enters after it is added or multiplied in entry by entry,
each output entry reading one entry of it, so ``Mᵀ D M`` is diagonal again for
the map ``M`` from it to the output.

The batch axis stays first, whole or as merged rows (:mod:`curvhook.row_groups`):
Hiera's ``Unroll`` moves strided patches of each sample into the batch axis and
back (``[N, L, C] → [N·4, …] → [N·16, …] → [N, L, C]``), and GCViT's window
attention passes its ``RelPosBias`` scores of ``[N·windows, …]``. Such a chain
groups the rows at its end as at its start, and each of its operations is
followed row by row. A leaf that returns its input unchanged
(``StochasticDepth`` in eval mode) is dropped: its Jacobian is the identity.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Collection, Optional

from torch import Tensor, nn

from curvhook.operations import (
    ADDITIONS, BROADCASTING, ELEMENTWISE, PRODUCTS, QUOTIENTS, REVERSED_SUBTRACTIONS, SUBTRACTIONS,
)
from curvhook.records import BATCHED, CONST, SHARED, Operation, Slot, key_of
from curvhook.row_groups import PURE_RESHAPES, rows_followed

# Structural maps whose Jacobian is a permutation of the entries (no entry repeated or dropped).
_PERMUTING = frozenset({
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone",
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "view_as", "reshape_as",
    "to", "float", "double", "type_as", "flip", "roll", "neg", "__neg__", "negative", "positive", "__pos__",
})
_SCALINGS = PRODUCTS | ADDITIONS | SUBTRACTIONS | REVERSED_SUBTRACTIONS


def _one_operation_of_its_inputs(leaf: Operation, module: nn.Module, ops: list[Operation], output: Any) -> bool:
    """Whether a leaf without parameters ran exactly one operation, on its own tensor arguments
    (and constants), that returned its output: the leaf is that operation, whatever the number
    of batched inputs, and DiagGGNApprox counts one operation either way."""
    if len(ops) != 1 or not isinstance(output, Tensor) or any(True for _ in module.parameters()):
        return False
    op = ops[0]
    own = set(leaf.input_keys)
    batched = {k for k, kind in zip(leaf.input_keys, leaf.input_kinds) if kind == BATCHED}
    return (
        len(op.output_keys) == 1 and op.output_keys[0] == key_of(output) and bool(batched)
        and {k for k, kind in zip(op.input_keys, op.input_kinds) if kind == BATCHED} == batched
        and all(kind == CONST or k in own for k, kind in zip(op.input_keys, op.input_kinds))
    )


def as_operations(
    leaf: Operation, module: nn.Module, ops: list[Operation], output: Any, shared_keys: Collection = (),
) -> Optional[list[Operation]]:
    """The operations that stand for a leaf call without a rule, or ``None`` to keep the leaf.

    Args:
        leaf: The leaf's record (inputs filled in; its outputs not yet).
        module: The module called.
        ops: The tensor operations recorded while its ``forward`` ran, in order.
        output: What its ``forward`` returned.
        shared_keys: The keys of the tensors computed without the batch (from parameters
            and fixed constants); an operation on constants whose output is not among
            them carries the batch axis (BART's learned positions ``[N, L]`` looked up).

    Returns:
        ``ops`` when they form a chain that keeps the module's diagonal (see the
        module docstring); ``[]`` when the module returned its input unchanged;
        ``None`` otherwise.
    """
    batched = [k for k, kind in zip(leaf.input_keys, leaf.input_kinds) if kind == BATCHED]
    if _one_operation_of_its_inputs(leaf, module, ops, output):
        return ops  # the leaf is that operation (SqueezeBERT's MatMulWrapper: torch.matmul(a, b))
    if not isinstance(output, Tensor) or not output.requires_grad or len(batched) > 1 or output.dim() == 0:
        return None
    # On constants only (frozen features, torchvision's LayerNorm2d after a frozen stem), the
    # chain starts where its first operation reads one (nothing travels back to the input).
    current, end = (batched[0] if batched else None), key_of(output)
    if current is not None and ops and not any(current in op.input_keys for op in ops):
        current = None  # the input gives only a shape (BART's encoder positions read inputs_embeds.shape)
    # the leading size: that of the batch, or of merged rows (N·k) where the leaf's input has them;
    # N itself is known at the first operation on the batch (``n`` below)
    lead = leaf.inputs[leaf.input_kinds.index(BATCHED)].shape[0] if batched else output.shape[0]
    n = lead
    params = {id(p) for p in module.parameters() if p.requires_grad}
    if not ops:
        return [] if current == end and not params else None
    produced_shared: set = set()
    used: Counter = Counter()
    seen_params: set[int] = set()
    rows = start_rows = None  # merged rows per sample along the chain (curvhook/row_groups.py)
    general = False
    shared_before_general = False
    for op in ops:
        if len(op.output_keys) != 1 or op.output_keys[0] is None:
            return None
        slots = [i for i, k in enumerate(op.input_kinds) if k == BATCHED]
        for i, kind in enumerate(op.input_kinds):
            if kind != SHARED:
                continue
            t = op.inputs[i]
            if id(t) in params:
                seen_params.add(id(t))
            elif op.input_keys[i] not in produced_shared:
                return None  # a shared tensor from outside the module: the leaf holds it fixed
            used[("shared", id(t) if id(t) in params else op.input_keys[i])] += op.uses(i)
        if not slots:  # computed from parameters (and constants) only
            if _monomial(op, None):
                produced_shared.add(op.output_keys[0])
                continue
            if general:
                return None
            # the general operation, on parameters and constants: BART's and OPT's learned
            # positions (the positions made from the input, then F.embedding), an output with
            # the batch axis, or without it (from fixed constants: positions [1, L] at N = 1);
            # beside a batched input, a shared tensor that later operations add or multiply in
            # (a relative-position bias ``table[index]``: see the module docstring)
            general = True
            if op.output_keys[0] in shared_keys:
                produced_shared.add(op.output_keys[0])
            elif current is None and op.output_shapes[0] and op.output_shapes[0][0] == lead:
                current = op.output_keys[0]
            else:
                return None  # (positions [1, L] beside a batch of N > 1: the leaf broadcasts them)
            continue
        if current is None and len(slots) == 1 and op.input_nodes[slots[0]] is None:
            current = op.input_keys[slots[0]]  # a constant read with the parameters
        if len(slots) != 1 or op.input_keys[slots[0]] != current or op.uses(slots[0]) != 1:
            return None
        if op.rows == 0 or op.batch_axes is not None or (rows is not None and op.rows_in != rows):
            return None
        if start_rows is None:  # (the leaf's input may have merged rows: GCViT's window attention)
            start_rows, n = op.rows_in, op.inputs[slots[0]].shape[0] // op.rows_in
        if not op.output_shapes[0] or op.output_shapes[0][0] != n * op.rows or op.inputs[slots[0]].shape[0] != n * op.rows_in:
            return None  # the batch axis stays first, whole or as merged rows (Hiera's ``Unroll``)
        if op.rows != op.rows_in and op.func_name not in PURE_RESHAPES:
            return None
        rows = op.rows
        has_shared = SHARED in op.input_kinds
        if has_shared and _covers_leading_axis(op):
            return None  # one slice of it per sample or row (``x * w`` with ``w`` ``[N·k, 1, 1]``)
        if not _monomial(op, slots[0]):
            if general or shared_before_general:
                return None
            general = True
        elif has_shared and not general:
            shared_before_general = True
        current = op.output_keys[0]
    shared_end = current is None and end in produced_shared  # computed from parameters alone
    ends = (current == end or shared_end) and seen_params == params
    expected = len(seen_params) + len(produced_shared) - shared_end  # (the output is not used inside)
    if not (ends and _each_used_once(used, expected)):
        return None
    merged = any(op.rows != 1 or op.rows_in != 1 for op in ops)
    if rows != start_rows or (merged and not rows_followed(ops, n)):
        return None  # merged rows: grouped at the end as at the start, and followed row by row
    return ops


def _covers_leading_axis(op: Operation) -> bool:
    """Whether a shared input that ``op`` broadcasts against the batched one entry by entry spans
    the output's leading axis (the batch, or merged rows) with more than one entry: it would
    give each sample or row its own slice, which the operation's rule, applied per sample or
    row, does not read so. (A layer's weight, ``F.conv2d(x, w)``, is no such operand.)"""
    out = op.output_shapes[0]
    return op.func_name in BROADCASTING and any(
        kind == SHARED and t.dim() == len(out) and t.shape[0] != 1
        for t, kind in zip(op.inputs, op.input_kinds)
    )


def _each_used_once(used: Counter, expected: int) -> bool:
    """Every parameter and shared tensor enters the chain once, and each is used.

    ``expected`` counts the parameters seen and the shared tensors computed in the
    module: one of them without a use is a computation the chain does not need.
    """
    return all(n == 1 for n in used.values()) and len([k for k in used if k[0] == "shared"]) == expected


def _monomial(op: Operation, slot: Optional[int]) -> bool:
    """Whether ``op`` is monomial in its input at ``slot`` (its only tensor input when ``None``)."""
    name = op.func_name
    tensors = [i for i, k in enumerate(op.input_kinds) if k != CONST]
    if slot is None:
        if len(tensors) != 1:
            return False
        slot = tensors[0]
    x, out_shape = op.inputs[slot], op.output_shapes[0]
    if name in _PERMUTING:
        return len(tensors) == 1 and x.numel() == math.prod(out_shape)
    if name == "pad":  # zeros around (or a crop): each entry kept at most once, at one place
        mode = op.args[2] if len(op.args) > 2 else op.kwargs.get("mode", "constant")
        return len(tensors) == 1 and mode == "constant"
    if x.shape != out_shape:
        return False
    if name in ELEMENTWISE:
        return len(tensors) == 1 or name in ("__pow__", "pow")
    if name in _SCALINGS or (name in QUOTIENTS and op.args and isinstance(op.args[0], Slot) and op.args[0] == slot):
        return len(op.args) == 2 and not op.kwargs
    return False
