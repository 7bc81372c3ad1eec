"""Constants that cannot hold the batch: the model's buffers and frozen parameters.

curvhook finds the batch axis of a tensor from its record where it can, but a
constant (a tensor that needs no gradient) has no record. Where a constant
meets parameters, or is passed to a module, its leading size is the only hint:
``inputs_embeds + position_embeds`` with frozen token embeddings ``[N, L, D]``
has one row per sample. That guess is wrong when a size of the model equals the
batch size by chance: MaxViT's relative-position bias ``[heads, L, L]`` with
``heads = N``, Swin's mask ``[windows, L, L]``, an index table ``[L, L]`` with
``L = N``. The bias was then taken for a batched tensor and the model refused,
or served by the slow fallback, at that one batch size.

A constant computed from buffers and frozen parameters alone, through any
operation that cannot copy it along a new batch axis, does not depend on the
sample: it is *fixed*. A fixed constant is never taken for a batched one:

- a module on fixed constants and parameters computes a tensor shared by
  every sample (``rel_bias_mlp(coords)``, ``embedding(rel_index)``);
- an operation of fixed constants and parameters likewise (``table[index]``);
- the fallback passes a fixed constant whole to each sample.

A tensor the forward makes from nothing (``torch.zeros((1, H, W, 1))`` for Swin's
mask) is fixed too, unless one of its sizes is ``N`` (``torch.ones(N, L)``, a
default attention mask, has one row per sample; ``torch.zeros(2, N, H)[0]`` is a
per-sample state). Tensors of positions (:data:`POSITIONS`: ``torch.arange(L)``,
T5's relative positions) are fixed whatever their size: ``torch.arange(N)``
made in the forward and fed to a layer as one position per sample is then
taken for a shared tensor (exact, or refused by name where a module gets it).
Likewise only :data:`REPLICATORS` (``expand``, ``repeat``, ``cat``, ``new_ones`` …)
can make an axis of size ``N`` out of fixed tensors; their outputs with such an
axis are left to the leading-size guess (``position_ids.expand(N, L)``). With
``N = 1`` a size of one is no question: the one sample reads all of it.

A buffer is fixed whatever its shape: a buffer that holds a state per sample
(``[N, H]``, a batch size built into the model) is taken for a shared tensor.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional

from torch import Tensor

from curvhook.records import CONST, key_of
from curvhook.trace import Trace

# Operations whose output may repeat their input along a new leading axis.
REPLICATORS = frozenset({
    "expand", "expand_as", "broadcast_to", "broadcast_tensors", "repeat", "repeat_interleave", "tile",
    "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "cat", "concat", "concatenate",
    "stack", "hstack", "vstack", "row_stack", "dstack", "column_stack", "block_diag", "kron", "outer",
    "cartesian_prod", "meshgrid",
})


# New tensors of positions, never of samples, whatever their size (``torch.arange(L)`` with
# ``L = N``: T5's relative positions).
POSITIONS = frozenset({"arange", "range", "linspace", "logspace", "eye", "tril_indices", "triu_indices"})


def is_fixed(fixed_ids: set[int], trace: Trace, t: Tensor) -> bool:
    """Whether the constant ``t`` is a buffer, a frozen parameter, or computed from those alone."""
    if id(t) in fixed_ids:
        return True
    ref = trace.fixed_keys.get(key_of(t)) if trace.fixed_keys else None
    return ref is not None and ref() is t


def fixed_slots(fixed_ids: set[int], trace: Trace, tensors: Iterable[Tensor], kinds: Iterable[str]) -> tuple[int, ...]:
    """The slots of the fixed constants among an operation's inputs."""
    if not fixed_ids and not trace.fixed_keys:
        return ()
    return tuple(i for i, (t, k) in enumerate(zip(tensors, kinds)) if k == CONST and is_fixed(fixed_ids, trace, t))


def all_fixed(fixed_ids: set[int], trace: Trace, tensors: list) -> bool:
    """Whether every tensor argument of an operation that needs no gradient is fixed."""
    return bool(tensors) and (bool(fixed_ids) or bool(trace.fixed_keys)) and all(
        is_fixed(fixed_ids, trace, t) for t in tensors
    )


def note_fixed(trace: Trace, name: Optional[str], out: Any, batch_hint: Optional[int], new: bool = False) -> None:
    """Mark the tensor outputs of an operation or module on fixed constants (or of an
    operation on no tensor) as fixed.

    Args:
        trace: The forward pass.
        name: The operation's name, ``None`` for a module.
        out: What it returned.
        batch_hint: ``N``: a replicator's or a new tensor's output with an axis of that
            size is left unmarked (it may be one copy per sample), unless it is one of
            :data:`POSITIONS`.
        new: The operation read no tensor (``torch.zeros(…)``, ``torch.arange(L)``).
    """
    ambiguous = name in REPLICATORS or (new and name not in POSITIONS)
    for o in out if isinstance(out, (tuple, list)) else (out,):
        if not isinstance(o, Tensor):
            continue
        if ambiguous and batch_hint != 1 and batch_hint in o.shape:
            continue  # (any axis: ``torch.zeros(2, N, H)[0]`` is a per-sample state)
        trace.fixed_keys[key_of(o)] = weakref.ref(o)  # not held: an id reused later never matches
