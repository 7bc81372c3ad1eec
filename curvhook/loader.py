"""``curvhook.accumulate``: the extensions over a whole data set, one batch at a time.

Each batch runs forward, the loss with ``reduction="sum"`` and a backward pass
inside one ``extend(..., accumulate=True)`` block, so the results add up to
those of the sum of the per-sample losses over the data set (per-sample
results such as ``grad_batch`` are concatenated). With ``reduction="mean"``
they are then rescaled to the mean over the samples: curvature and gradients
by ``1/N``, squared gradients by ``1/N²``, Jacobians not at all
(``Extension.loss_power``). ``p.grad`` is left as it was.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from curvhook.context import extend
from curvhook.extensions.base import Extension

# Keys a dict batch's target is looked up under, in this order, when ``target_key`` is not given.
TARGET_KEYS = ("labels", "label", "targets", "target", "y")

Batch = Union[tuple, list, dict]


def accumulate(
    model: nn.Module,
    loader: Iterable[Batch],
    *extensions: Extension,
    loss_fn: Union[nn.Module, Callable[[Tensor, Any], Tensor]],
    reduction: str,
    device: Optional[Union[str, torch.device]] = None,
    progress: Optional[bool] = None,
    target_key: Optional[str] = None,
    write: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run ``extensions`` over every batch of ``loader`` and return their results for the data set.

    Args:
        model: The model (left unchanged; put it in ``eval()`` mode first if it has
            BatchNorm or dropout you do not want).
        loader: Batches ``(inputs, target)`` (a tuple or list; ``inputs`` a tensor, or
            a tuple of the model's positional arguments) or dicts (the target under
            ``target_key``, every other entry a keyword argument of the model, as for
            Hugging Face models).
        *extensions: curvhook extensions (those that cannot accumulate, NTK and
            LowRankGGN, are refused).
        loss_fn: A loss module (``nn.CrossEntropyLoss()``, any reduction: a copy with
            ``reduction="sum"`` is used), or a function ``(output, target) → scalar``
            that must return the *sum* of the per-sample losses of the batch.
        reduction: ``"sum"``: the results of ``Σ_n ℓ_n`` over the data set; ``"mean"``:
            of ``(1/N) Σ_n ℓ_n``, ``N`` the number of samples seen (the model output's
            leading size, summed over the batches). No default: the two differ by ``N``.
        device: Move every tensor of a batch there first (``None``: leave them).
        progress: Show a tqdm progress bar over the batches (``None``: when standard
            error is a terminal).
        target_key: The key of the target in dict batches (default: the first of
            ``labels``, ``label``, ``targets``, ``target``, ``y`` present).
        write: Leave the results on the parameters (as ``extend`` does); ``False``
            removes them there after collecting them.

    Returns:
        ``{attribute: {parameter name: result}}`` for every extension that writes to
        the parameters (``"diag_ggn"``, ``"kfac"``, ...); results kept on the extension
        (``FullGGN().matrix``, ``OutputCovariance(...).covariance``) stay there.

    Example::

        results = curvhook.accumulate(model, loader, DiagGGN(), loss_fn=nn.CrossEntropyLoss(),
                                      reduction="sum")
        results["diag_ggn"]["0.weight"]  # diag(G) of the whole data set's summed loss
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"accumulate(reduction={reduction!r}): choose 'sum' or 'mean'.")
    loss = _summed(loss_fn)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = [p.grad for p in params]
    for p in params:  # autograd would add into the user's gradient tensors in place
        p.grad = None
    samples = 0
    show = sys.stderr.isatty() if progress is None else progress
    batches = _progress(loader, show)
    try:
        with extend(model, *extensions, accumulate=True):
            for batch in batches:
                args, kwargs, target = _unpack(batch, target_key, device)
                output = model(*args, **kwargs)
                loss(output, target).backward()
                samples += _batch_size(output)
                for p in params:  # the gradient of the block is not the user's
                    p.grad = None
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        if hasattr(batches, "close"):
            batches.close()
    if reduction == "mean" and samples:
        for ext in extensions:
            ext.rescale(params, 1.0 / samples)
    results = {
        ext.attribute: {name: getattr(p, ext.attribute) for name, p in named if hasattr(p, ext.attribute)}
        for ext in extensions
    }
    if not write:
        for ext in extensions:
            for p in params:
                if hasattr(p, ext.attribute):
                    delattr(p, ext.attribute)
    return results


def _summed(loss_fn: Union[nn.Module, Callable]) -> Callable:
    """``loss_fn`` with ``reduction="sum"`` (a copy of a loss module; a function as it is)."""
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        summed = copy.copy(loss_fn)
        summed.reduction = "sum"
        return summed
    return loss_fn


def _to(obj: Any, device: Optional[Union[str, torch.device]]) -> Any:
    """``obj`` with every tensor in it (tuples, lists, dicts) moved to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _unpack(batch: Batch, target_key: Optional[str], device) -> tuple[tuple, dict, Any]:
    """``(args, kwargs, target)`` of one batch."""
    batch = _to(batch, device)
    if isinstance(batch, dict):
        key = target_key or next((k for k in TARGET_KEYS if k in batch), None)
        if key is None or key not in batch:
            raise ValueError(
                f"accumulate: no target in the dict batch (keys {sorted(batch)}); pass target_key=."
            )
        kwargs = {k: v for k, v in batch.items() if k != key}
        return (), kwargs, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return args, {}, target
    raise ValueError(
        "accumulate: a batch must be (inputs, target) or a dict with the target under target_key; "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _batch_size(output: Any) -> int:
    first = output if isinstance(output, Tensor) else next(t for t in _tensors(output))
    return int(first.shape[0])


def _tensors(obj: Any):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _progress(loader: Iterable, show: bool) -> Iterable:
    """``loader`` wrapped in a tqdm bar when ``show`` (tqdm is a dependency of curvhook)."""
    if not show:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc="curvhook.accumulate", unit="batch")
