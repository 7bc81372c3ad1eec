"""Results across the processes of ``torch.distributed``: summed, or averaged like DDP's gradients.

Under ``DistributedDataParallel`` every process runs its own batch and
``p.grad`` is the *average* of the processes' gradients: the gradient of
``(1/W) Σ_r ℓ_r`` for ``W`` processes. curvhook's results follow the same
scalar by default (``distributed="mean"`` when the model is a DDP module):
each result is summed over the processes and scaled as that scalar scales it
(``Extension.loss_power``: curvature and gradients by ``1/W``, squared
gradients by ``1/W²``, Jacobians not at all). Per-sample results
(``grad_batch``, ``batch_l2``, ``batch_jacobian``, the output covariance) are
concatenated in rank order instead of summed. ``distributed="sum"`` sums
without scaling: the results of ``Σ_r ℓ_r``, e.g. processes that each
evaluate a sum-reduced loss on a shard of a data set.

Each extension's results travel in one collective (one flat buffer for all
parameters, plus one for the sample counts where results are concatenated).
The same code runs on more than one machine under ``torchrun`` with the
``nccl`` backend: the collectives are ``all_reduce`` and ``all_gather``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

MODES = ("sum", "mean")


def resolve_mode(model: nn.Module, distributed) -> Optional[str]:
    """``"sum"``, ``"mean"`` or ``None`` (no reduction) for ``extend(..., distributed=...)``.

    Args:
        model: The model passed to ``extend``.
        distributed: ``None``: ``"mean"`` for a ``DistributedDataParallel`` model in an
            initialised process group, else no reduction; ``False``: none; ``True``:
            ``"sum"``; or ``"sum"`` / ``"mean"``.
    """
    if distributed is None:
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        return "mean" if ddp and dist.is_available() and dist.is_initialized() else None
    if distributed is False:
        return None
    mode = "sum" if distributed is True else distributed
    if mode not in MODES:
        raise ValueError(f"extend(distributed={distributed!r}): use None, False, True, 'sum' or 'mean'.")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"extend(distributed={distributed!r}) needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)."
        )
    return mode


def sum_in_place(tensors: list[Tensor], group=None) -> None:
    """Sum ``tensors`` over the processes, in place, with one ``all_reduce`` of a flat buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    start = 0
    for t in tensors:
        t.copy_(flat[start : start + t.numel()].view_as(t))
        start += t.numel()


def concatenate(tensors: list[Tensor], group=None) -> list[Tensor]:
    """Concatenate per-sample tensors ``[N_r, *]`` of every process along the samples, in rank order.

    The processes may hold different numbers of samples: their counts are gathered
    first, and the rows are padded to the largest for one ``all_gather``.

    Returns:
        ``[Σ_r N_r, *]`` for each tensor.
    """
    if not tensors:
        return []
    n = tensors[0].shape[0]
    rows = torch.cat([t.reshape(n, -1) for t in tensors], 1)  # [N_r, total]
    world = dist.get_world_size(group)
    counts = torch.zeros(world, dtype=torch.long, device=rows.device)
    counts[dist.get_rank(group)] = n
    dist.all_reduce(counts, group=group)
    padded = rows.new_zeros(int(counts.max()), rows.shape[1])
    padded[:n] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    every = torch.cat([g[: int(c)] for g, c in zip(gathered, counts)])
    out, start = [], 0
    for t in tensors:
        width = t[0].numel() if n else t.reshape(n, -1).shape[1]
        out.append(every[:, start : start + width].reshape(-1, *t.shape[1:]))
        start += width
    return out
