"""A boolean mask that picks the same number of entries of every sample, recorded as the
positions it picks.

Hugging Face's BART and mBART sequence classifiers pool the hidden state at each
sample's end-of-sequence token with a boolean mask::

    h[input_ids.eq(eos), :]          # h [N, L, H], mask [N, L]  ->  [N·c, H]

where ``c`` is the number of masked entries per sample. torch evaluates ``x[mask]``
as ``x[mask.nonzero(as_tuple=True)]``. Where every sample has exactly one entry
masked (``c = 1``), the first of those positions is ``arange(N)``, and the call is
the per-sample gather ``x[arange(N), idx]`` that the tensor-operation rules already
split by sample (:func:`curvhook.rules.tensor_ops.batch_gather`): sample ``n``'s
output is ``x[n, idx[n]]``. Where every sample has ``c > 1`` entries masked (BART's
pair classification: ``<s> A </s></s> B </s>``, three), the positions come sample by
sample in row-major order, so the result is ``c`` merged rows per sample
(:mod:`curvhook.row_groups`): sample ``n``'s rows ``n·c … n·c + c − 1`` are its ``c``
picks, and the reshape after it (``.view(N, -1, H)``) splits them again
(:data:`curvhook.rules.row_groups.GATHERED_ROWS`). The rewrite is exact (same values,
same order) and is made on every pass, so it follows the mask's values.

A mask that picks different numbers of entries of the samples is left as it is; the
per-sample check refuses it with a message that says how to select several entries
per sample.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvhook.records import BATCHED, CONST, Slot, key_of


def mask_as_positions(
    t_args: tuple, tensors: list, kinds: list, keys: tuple, nodes: tuple, moved_axes: dict
) -> Optional[tuple[tuple, list, list, tuple, tuple, int]]:
    """``x[mask, …]`` as ``x[rows, idx…, …]`` where ``mask`` picks ``c`` entries of every sample
    (``rows`` is ``arange(N)`` with each sample repeated ``c`` times).

    Args:
        t_args: The arguments of a recorded ``__getitem__``, ``(Slot(x), index)``.
        tensors: The distinct tensors of the call, in slot order.
        kinds: Their kinds (:data:`BATCHED`, :data:`CONST`, …).
        keys: Their keys.
        nodes: Their autograd nodes.
        moved_axes: The trace's tensors whose batch axis is not first, by key.

    Returns:
        ``(t_args, tensors, kinds, keys, nodes, c)`` of the rewritten call, or ``None``
        where the call is no such selection: the mask ``[N, *k]`` (two axes or more,
        the leading axes of ``x``, without grad) must be the index's first entry,
        followed only by entries the per-sample gather takes (``:``, ``...``, integers,
        one index per sample; for ``c > 1`` only ``:`` and ``...``), have the same
        number ``c ≥ 1`` of ``True`` in each sample ``mask[n]``, and ``x`` its batch
        axis first.
    """
    if len(t_args) != 2:
        return None
    x_slot, index = t_args
    entries = index if isinstance(index, tuple) else (index,)
    if not (isinstance(x_slot, Slot) and kinds[x_slot] == BATCHED and entries and isinstance(entries[0], Slot)):
        return None
    mask_slot, x = entries[0], tensors[x_slot]
    mask = tensors[mask_slot]
    if (
        kinds[mask_slot] != CONST or mask.dtype != torch.bool or mask.dim() < 2
        or tuple(mask.shape) != tuple(x.shape[: mask.dim()]) or mask_slot == x_slot
        or keys[x_slot] in moved_axes
        or not all(gather_entry(e, tensors, kinds, x.shape[0]) for e in entries[1:])
    ):
        return None
    counts = mask.flatten(1).sum(1)
    c = int(counts[0]) if counts.numel() else 0
    if c < 1 or not bool((counts == c).all()):
        return None
    if c > 1 and not all(e is Ellipsis or e == slice(None) for e in entries[1:]):
        return None  # (the per-sample index entries of a gather are one per sample, not per pick)
    positions: tuple[Tensor, ...] = mask.nonzero(as_tuple=True)  # the first: arange(N), each c times
    tensors = list(tensors)
    tensors[mask_slot] = positions[0]
    new_slots = []
    for p in positions[1:]:
        new_slots.append(Slot(len(tensors)))
        tensors.append(p)
    new_index = (mask_slot, *new_slots, *entries[1:])
    n_new = len(new_slots)
    return (
        (x_slot, new_index),
        tensors,
        [*kinds, *([CONST] * n_new)],
        (*keys[:mask_slot], key_of(positions[0]), *keys[mask_slot + 1:], *(key_of(p) for p in positions[1:])),
        (*nodes, *([None] * n_new)),
        c,
    )


def gather_entry(entry, tensors: list, kinds: list, n: int) -> bool:
    """Whether an index entry after the rows of a per-sample gather ``x[arange(N), …]`` keeps
    samples apart: ``:``, ``...``, an integer, or a constant of one index per sample, ``[N]``
    (:func:`curvhook.rules.tensor_ops.batch_gather`; ``h[mask, 1:4]`` is none of these)."""
    if isinstance(entry, Slot):
        t = tensors[entry]
        return kinds[entry] == CONST and t.dtype == torch.long and tuple(t.shape) == (n,)
    return entry is Ellipsis or entry == slice(None) or isinstance(entry, int)


def mask_selection_hint(call) -> str:
    """What to do about ``x[mask]`` with a per-sample boolean mask that picks another number
    of entries than one per sample (``""`` for any other call).

    Args:
        call: The recorded :class:`~curvhook.records.Operation`.
    """
    if call.func_name != "__getitem__" or len(call.args) != 2:
        return ""
    index = call.args[1]
    entries = index if isinstance(index, tuple) else (index,)
    n = call.inputs[0].shape[0] if call.inputs and call.inputs[0].dim() else None
    for e in entries:
        if isinstance(e, Slot):
            m = call.inputs[e]
            if m.dtype == torch.bool and m.dim() >= 2 and m.shape[0] == n:
                counts = m.flatten(1).sum(1).tolist() if call.batch_axes is None else None
                if counts is not None and all(c == 1 for c in counts):
                    return (
                        " It indexes with a boolean mask that picks one entry of each sample, in a form "
                        "curvhook does not split by sample (other index entries than ':' after the mask, "
                        "a batch axis that is not first, or an operation after the model): index with "
                        "the mask alone inside the model (h[mask], then h[mask][:, 1:4])."
                    )
                picked = f"selects {counts} entries of the samples" if counts is not None else "has the batch axis"
                return (
                    f" It indexes with a boolean mask that {picked}: curvhook splits such a selection "
                    "by sample only where it picks the same number of entries of each sample (BART's "
                    "end-of-sequence pooling), with only ':' after the mask. To pick k entries of "
                    "every sample, gather them: torch.take_along_dim(h, idx[..., None], dim=1) with "
                    "idx [N, k]."
                )
    return ""
