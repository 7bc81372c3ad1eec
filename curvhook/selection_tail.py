"""The entries picked at the end of a computation from parameters only.

A leaf module computed from parameters alone often ends by picking entries of a
small table: BEiT's relative position bias is ``table[index]`` viewed and
permuted, 8.8k entries spread over 466k. Write the module as ``w = S(u)``,
``u = g(θ)``, where ``S`` is the chain of operations at its end that copy
entries: every entry of ``w`` is one entry of ``u`` or a constant, so every
row of ``S`` holds at most one nonzero, a ``1``. Then for the diagonal of
DiagGGNApprox, with ``k(o)`` the entry of ``u`` that output ``o`` copies,

    Σ_o d_o (∂w_o/∂θ_i)² = Σ_o d_o (∂u_k(o)/∂θ_i)² = Σ_k (Sᵀ d)_k (∂u_k/∂θ_i)²,

so ``d`` is pulled back through ``S`` first (one backward of the copies) and
only ``g``'s Jacobian, 8.8k × 8.8k for BEiT instead of 466k × 8.8k, is formed
(:func:`curvhook.rules.parameters_only._diagonal`).

The operations the tape recorded inside the module give ``S`` and ``g``: the
chain is followed back from the module output while each operation copies
entries of its one input that requires grad, and ``g`` replays the recorded
operations that compute ``u``. Before it is used, the replay is checked against
the recorded values; where it differs, the module's own replay serves.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.func import vjp, vmap

from curvhook.operations import ADDITIONS, SELECTIONS, SUBTRACTIONS
from curvhook.records import Operation, flat_tensors, key_of

# Every entry of the output is a copy (Jacobian entry 1) of at most one entry of the one
# input that requires grad, or a constant: views, permutations, indexing, expansion,
# concatenation with constants, masks, adding a constant. Negations are left out (entry -1:
# ``Sᵀ d`` would no longer be ``(S ∘ S)ᵀ d``), and so are sums (several entries per output).
_COPIES = frozenset({
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone",
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "__getitem__",
    "expand", "expand_as", "view_as", "reshape_as", "narrow", "select", "cat", "concat",
    "concatenate", "stack", "split", "chunk", "unbind", "tensor_split", "to", "float", "double",
    "type_as", "repeat", "tile", "flip", "roll", "t", "masked_fill", "where", "pad",
}) | SELECTIONS | ADDITIONS


class SelectionTail:
    """A computation from parameters only split as ``w = S(g(θ))`` (see the module docstring).

    Attributes:
        head: The recorded operations that compute ``u = g(θ)``, in order (empty where
            ``u`` is the parameter or input itself).
        tail: The copying operations from ``u`` to the output, in order, each with the
            index of the output the chain follows (``split`` and ``unbind`` give several).
        u_key: The identity of ``u`` in the recording.
        u_value: ``u`` as recorded, detached.
        out_value: The module output as recorded, detached.
    """

    def __init__(
        self, head: list[Operation], tail: list[tuple[Operation, int]], u_key, u_value: Tensor, out_value: Tensor,
    ) -> None:
        self.head = head
        self.tail = tail
        self.u_key = u_key
        self.u_value = u_value
        self.out_value = out_value

    def reads(self, source_id: int) -> bool:
        """Whether ``u`` depends on the tensor with ``id`` ``source_id`` (else its diagonal is zero)."""
        return self.u_key[0] == source_id or any(key[0] == source_id for op in self.head for key in op.input_keys)

    def head_function(self, source_id: int) -> Callable[[Tensor], Tensor]:
        """``x ↦ u`` with ``x`` in the place of the tensor with ``id`` ``source_id``, ``[*x] → [*u]``."""
        if self.u_key[0] == source_id:
            return lambda x: x
        head, u_key = self.head, self.u_key

        def g(x: Tensor) -> Tensor:
            env: dict = {}
            for op in head:
                tensors = [
                    x if key[0] == source_id else env.get(key, t.detach())
                    for t, key in zip(op.inputs, op.input_keys)
                ]
                for key, value in zip(op.output_keys, tuple(flat_tensors(op.invoke(tensors)))):
                    if key is not None:
                        env[key] = value
            return env[u_key]

        return g

    def tail_function(self) -> Callable[[Tensor], Tensor]:
        """``u ↦ w``: the copies, ``[*u] → [*w]``."""
        tail = self.tail

        def s(u: Tensor) -> Tensor:
            current, key = u, self.u_key
            for op, index in tail:
                tensors = [current if k == key else t.detach() for t, k in zip(op.inputs, op.input_keys)]
                current, key = tuple(flat_tensors(op.invoke(tensors)))[index], op.output_keys[index]
            return current

        return s

    def pull(self, diag: Tensor) -> Tensor:
        """``Sᵀ d`` for each sample: ``[N, *w] → [N, *u]``."""
        _, pull = vjp(self.tail_function(), self.u_value)
        return vmap(lambda d: pull(d)[0])(diag)

    def replays(self, source_id: int, at: Tensor) -> bool:
        """Whether the replay of the head at ``at`` and of the tail give the recorded values."""
        with torch.no_grad():
            u = self.head_function(source_id)(at.detach())
            if u.shape != self.u_value.shape or not torch.allclose(u, self.u_value, rtol=1e-5, atol=1e-6):
                return False
            w = self.tail_function()(self.u_value)
            return w.shape == self.out_value.shape and torch.allclose(w, self.out_value, rtol=1e-5, atol=1e-6)


def find_selection_tail(inner_ops: list[Operation], output: Tensor, sources: set) -> Optional[SelectionTail]:
    """The split ``w = S(g(θ))`` of a leaf computed from parameters only, or ``None``.

    ``None`` where no copy ends the computation, where it picks no fewer entries
    than it reads (nothing to gain), or where the head reads a tensor that requires
    grad and that no recorded operation made (computed out of the tape's sight).

    Args:
        inner_ops: The tensor operations recorded while the module's ``forward`` ran.
        output: What it returned, ``[*w]``.
        sources: The keys of the module's tensor arguments (a parameter passed as one).
    """
    producer: dict = {}
    for i, op in enumerate(inner_ops):
        for j, key in enumerate(op.output_keys):
            if key is not None:
                producer[key] = (i, j)
    key = key_of(output)
    tail: list[tuple[Operation, int]] = []
    u_value: Optional[Tensor] = None
    while key in producer:
        i, j = producer[key]
        op = inner_ops[i]
        source = _copied_input(op)
        if source is None:
            break
        tail.append((op, j))
        key = op.input_keys[source]
        u_value = op.inputs[source]
    if not tail or u_value is None or u_value.numel() >= output.numel():
        return None
    if key not in producer and key not in sources and not isinstance(u_value, torch.nn.Parameter):
        return None  # made out of the tape's sight
    head = _ops_computing(inner_ops, producer, key, sources)
    if head is None:
        return None
    return SelectionTail(head, tail[::-1], key, u_value.detach(), output.detach())


def _copied_input(op: Operation) -> Optional[int]:
    """The slot of the one input whose entries ``op`` copies (see :data:`_COPIES`), or ``None``."""
    if op.inplace or op.module is not None or len(op.output_values) != len(op.output_keys):
        return None
    name = op.func_name
    grads = [i for i, t in enumerate(op.inputs) if t.requires_grad]
    if len(grads) != 1 or op.uses(grads[0]) != 1:
        return None
    slot = grads[0]
    if any(v.dtype != op.inputs[slot].dtype for v in op.output_values):
        return None  # a cast to fewer digits would round Sᵀ d (small d to zero in float16)
    if name in SELECTIONS or name == "embedding":
        source = 1 if name == "embedding" else 0
        if op.args[source:source + 1] != (slot,) or _changed_backward(op):
            return None
    elif name in SUBTRACTIONS or name in ADDITIONS:
        if op.kwargs.get("alpha", 1) != 1 or (name in SUBTRACTIONS and op.args[:1] != (slot,)):
            return None  # ``c - x`` or ``add(c, x, alpha=2)``: entries -1 or 2
    elif name not in _COPIES:
        return None
    return slot


# F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse) and
# torch.gather(input, dim, index, sparse_grad): arguments that rescale the rows (max_norm), divide
# the gradient by the counts (scale_grad_by_freq), or make it sparse.
_EMBEDDING_FLAGS = {"max_norm": 3, "scale_grad_by_freq": 5, "sparse": 6}
_GATHER_FLAGS = {"sparse_grad": 3}


def _changed_backward(op: Operation) -> bool:
    """Whether a selection's arguments make its backward other than ``Sᵀ`` (or sparse)."""
    flags = _EMBEDDING_FLAGS if op.func_name == "embedding" else _GATHER_FLAGS if op.func_name == "gather" else {}
    for name, position in flags.items():
        value = op.args[position] if len(op.args) > position else op.kwargs.get(name)
        if value is not None and value is not False:
            return True
    return False


def _ops_computing(inner_ops: list[Operation], producer: dict, key, sources: set) -> Optional[list[Operation]]:
    """The recorded operations that ``key`` depends on, in order; ``None`` where one of them
    reads a tensor that requires grad and is neither a parameter, nor an argument of the
    module, nor made by a recorded operation."""
    needed, stack = set(), [key]
    while stack:
        k = stack.pop()
        if k not in producer or producer[k][0] in needed:
            continue
        i = producer[k][0]
        needed.add(i)
        stack.extend(inner_ops[i].input_keys)
    head = [inner_ops[i] for i in sorted(needed)]
    for op in head:
        for t, k in zip(op.inputs, op.input_keys):
            if t.requires_grad and k not in producer and k not in sources and not isinstance(t, torch.nn.Parameter):
                return None
    return head
