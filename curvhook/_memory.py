"""Large result buffers backed by transparent huge pages on Linux CPUs.

The batch Jacobian and the full GGN are written into fresh buffers of hundreds
of MB. With 4 KiB pages, the first write to such a buffer costs one page fault
per 4 KiB, which on a virtual machine takes longer than the arithmetic (a
1 GB outer product: about 330 ms with 4 KiB pages, 85 ms with 2 MiB pages).
:func:`empty` asks the kernel for 2 MiB pages with ``madvise(MADV_HUGEPAGE)``
before the buffer is first touched. Nothing changes where that is not possible
(not Linux, not the CPU, a small buffer) or when the environment variable
``CURVHOOK_HUGEPAGES=0`` is set.

Even with huge pages, a fresh buffer of several GB costs seconds of faults on
every step. So large buffers are also *recycled*: :func:`empty` hands out the
memory of an earlier large buffer of the same size once no tensor uses it any
more (its storage has no other owner: no result the user kept, no view of it,
no tensor saved by autograd). The extensions remove their attributes of the
previous backward pass when the next one starts, so a training loop that drops
its results gets the same memory back on every step; a result the user still
holds is never written to.

Recycling starts at 256 KiB: glibc hands buffers of that size back to the
kernel when they are freed, so a fresh one faults its pages in again on every
step (the first-layer weight diagonal of the benchmark MLP, 800 KB, took longer
to fault in than its GEMM).

Holding a buffer keeps its memory allocated after the rule that asked for it is
done with it, as the CUDA caching allocator keeps what a step used: a pass
keeps for the next pass every free buffer it used (largest first, up to an
eighth of the machine's memory), so what is held between passes is at most
what the pass itself worked with (the large buffers it asked for, once each).
A pass may pool new buffers up to its results plus what the last pass worked
with (at first half the results, at least 32 MiB).
A buffer still in use that this pass did not hand out (a result the user
kept) is forgotten: the user owns it. Without the holding, a temporary above
glibc's mmap threshold (32 MiB) faults its pages in on every step: on a 2-core
VM without transparent huge pages about 1.5 ms per MB, so the ReLU pull-back of
ten columns of 3c3d's first layer (256 MB) took 25 ms reused and 41–410 ms fresh.
The first pass of a block recycles nothing; the block's exit parks the free
buffers for the model's next block (:func:`park`), and
:func:`release_memory` frees them.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import weakref
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

from curvhook._torch_internals import storage_use_count

_MADV_HUGEPAGE = 14
_PAGE = 4096
_MIN_BYTES = 8 << 20  # huge pages from here on: below, their fault saving is negligible
_RECYCLE_MIN_BYTES = 256 << 10  # recycled from here on: smaller ones stay in malloc's heap

_enabled = sys.platform.startswith("linux") and os.environ.get("CURVHOOK_HUGEPAGES", "1") != "0"
_madvise_loaded = False
_madvise: Optional[ctypes._CFuncPtr] = None


def _madvise_function() -> Optional[ctypes._CFuncPtr]:
    """libc's ``madvise``, loaded on the first large buffer; ``None`` where it is unavailable.

    Loaded lazily and without ``ctypes.util.find_library``, which runs
    ``ldconfig -p`` in a subprocess: importing curvhook starts no process. The
    symbols already loaded into the process (``CDLL(None)``) include libc's on
    Linux; ``libc.so.6`` is the fallback.
    """
    global _madvise, _madvise_loaded
    if _madvise_loaded:
        return _madvise
    _madvise_loaded = True
    if not _enabled:
        return None
    for name in (None, "libc.so.6"):
        try:
            function = ctypes.CDLL(name, use_errno=True).madvise
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            continue
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        function.restype = ctypes.c_int
        _madvise = function
        break
    return _madvise


def empty(shape: Sequence[int], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised tensor of ``shape`` with the dtype and device of ``like``.

    Args:
        shape: The shape of the buffer.
        like: A tensor whose dtype and device the buffer takes.
        dtype: Overrides the dtype of ``like``.

    Returns:
        A contiguous tensor. On a CPU and from 256 KiB on, it may reuse the
        memory of an earlier buffer of the same size that nothing uses any
        more; from 8 MiB on it is backed by huge pages where the kernel allows it.
    """
    dtype, shape, numel = dtype or like.dtype, tuple(shape), math.prod(shape)
    if not _recycles(numel * dtype.itemsize, like):
        return torch.empty(shape, dtype=dtype, device=like.device)
    pool = _recycled()
    if pool is not None:
        for entry in pool:
            buf = entry[0]
            if buf.numel() == numel and buf.dtype == dtype and _unused(buf):
                entry[1] = _recycling.generation
                return buf.view(shape)
    out = _fresh((numel,), dtype, like.device)
    if pool is not None:
        if _recycling.new_bytes + out.nbytes <= _recycling.cap:
            pool.append([out, _recycling.generation])
            _recycling.new_bytes += out.nbytes
        else:  # beyond what this pass may pool: counted, so that the next pass may
            _recycling.unpooled += out.nbytes
    return out.view(shape)


def recyclable(shape: Sequence[int], like: Tensor) -> Optional[Tensor]:
    """:func:`empty` where it may recycle, else ``None``: ``torch.mm(a, b, out=None)``
    then allocates as usual, without a separate ``empty`` operation.

    Args:
        shape: The shape of the result.
        like: Gives dtype and device.
    """
    return empty(shape, like) if _recycles(math.prod(shape) * like.element_size(), like) else None


def _recycles(nbytes: int, like: Tensor) -> bool:
    """Whether a buffer of ``nbytes`` on ``like``'s device is worth recycling."""
    return like.device.type == "cpu" and nbytes >= _RECYCLE_MIN_BYTES


def _fresh(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new buffer, advised to use huge pages when it is large and on the CPU."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.nbytes
    if nbytes >= _MIN_BYTES and out.device.type == "cpu":
        madvise = _madvise_function()
        if madvise is not None:
            start = -(-out.data_ptr() // _PAGE) * _PAGE
            end = (out.data_ptr() + nbytes) // _PAGE * _PAGE
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: failure is harmless
    return out


# Large buffers handed out by ``empty`` during the current block, per thread, as
# [buffer, number of the backward pass that last used it]. Without torch's
# storage use count (a private function: _torch_internals.storage_use_count),
# or where it does not count views, nothing is recycled.
_recycling = threading.local()
_HELD_FRACTION = 0.5  # new buffers a pass may pool beyond its results, at least: half the results ...
_HELD_MIN_BYTES = 32 << 20  # ... or this much where the results are smaller


def _physical_memory_bytes() -> int:
    """The machine's memory (Linux, macOS), else 16 GiB."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - Windows
        return 16 << 30


# Free buffers a pass keeps for the next, at most (beyond held_budget): an eighth of the memory.
_HELD_MAX_BYTES = _physical_memory_bytes() // 8


def held_budget(result_bytes: int) -> float:
    """The least a pass may pool beyond its results: half the results, at least 32 MiB.

    The first pass of a block knows only this (it has made no temporaries yet);
    :func:`drop_unused` then raises it to what the pass worked with.
    """
    return max(_HELD_FRACTION * result_bytes, _HELD_MIN_BYTES)


def _count_of_a_lone_tensor() -> Optional[int]:
    """The use count ``_unused`` sees for a tensor nothing else shares, if a view adds one."""
    t = torch.empty(1)
    alone = storage_use_count(t)
    if alone is None:
        return None
    view = t.view(1)
    with_view = storage_use_count(t)
    del view
    return alone if with_view == alone + 1 else None


_LONE_COUNT = _count_of_a_lone_tensor()


def _recycled() -> Optional[list[list]]:
    """This thread's list of recyclable buffers, or ``None`` when recycling is off."""
    if _LONE_COUNT is None:
        return None
    pool = getattr(_recycling, "pool", None)
    if pool is None:
        pool = _recycling.pool = []
        _recycling.generation = _recycling.new_bytes = _recycling.cap = _recycling.unpooled = 0
    return pool


def _unused(buf: Tensor) -> bool:
    """Whether only the pool's own tensor uses ``buf``'s memory.

    The storage's use count is one per tensor (view, or tensor saved for
    backward) that shares it, plus one for the storage object of this call.
    """
    return storage_use_count(buf) == _LONE_COUNT


def drop_unused(result_bytes: int) -> None:
    """End of a backward pass: of the buffers this pass handed out, keep those in use
    and the free ones for the next pass; forget all others.

    The next pass may pool new buffers up to the results plus what this pass
    worked with (its free buffers, and the new ones it could not pool), at least
    :func:`held_budget`: from the third pass of a block on, every large
    temporary comes from the pool.

    Args:
        result_bytes: The memory of the results the pass wrote.
    """
    pool = _recycled()
    if pool is None:
        return
    in_use, used_now = [], []  # free buffers this pass used: kept for the next
    for entry in pool:
        if entry[1] != _recycling.generation:
            continue  # not handed out by this pass: free, or a result the user kept
        (used_now if _unused(entry[0]) else in_use).append(entry)
    worked = sum(entry[0].nbytes for entry in used_now) + _recycling.unpooled
    budget = max(held_budget(result_bytes), min(worked, _HELD_MAX_BYTES))
    _recycling.cap = result_bytes + budget
    _recycling.new_bytes = _recycling.unpooled = 0
    kept = []
    for entry in sorted(used_now, key=lambda e: e[0].nbytes, reverse=True):
        if entry[0].nbytes <= budget:  # all of them, unless beyond an eighth of the memory
            kept.append(entry)
            budget -= entry[0].nbytes
    pool[:] = in_use + kept
    _recycling.generation += 1


def forget_idle() -> None:
    """A reverse walk is done: let go of the buffers it did not hand out.

    The previous block's results (:func:`adopt`) and the free buffers of the
    last pass wait in the pool for the walk to reuse them. What the walk did
    not take, nothing later in the pass takes: the rest of the backward pass is
    autograd's, which allocates through malloc. Held until :func:`drop_unused`,
    that memory sits beside the gradients autograd now allocates and raises the
    step's peak by up to the size of the results; where malloc then grows its
    heap, the gradients fault fresh pages in (seen on medium resnet18 in some
    processes: 13,800 faults a step, 44 ms backward instead of 31). Let go now,
    autograd's gradients can take its place. Buffers this walk handed out stay
    for the next pass.

    Call it only after the last walk of a backward pass: the backward driver
    does where no other forward pass of its block waits for this backward, and
    nothing happens here while another block is active on this thread (two
    models in one backward pass), whose walk may still come.
    """
    if getattr(_blocks, "active", 0) > 1:  # another block's walk may come in this pass and reuse them
        return
    pool = _recycled()
    if pool is not None:
        pool[:] = [entry for entry in pool if entry[1] == _recycling.generation]


def adopt(results: Iterable[Tensor]) -> None:
    """A block starts: offer the memory of the previous block's results for recycling.

    The results are about to be removed from the parameters (the extensions
    reset them). Where nothing else holds a result's memory once they are
    gone (the user kept no reference), this block's first backward pass writes
    into it instead of faulting fresh pages in: a training loop that opens a new
    block per step recycles its results as one long block does. Memory still in
    use is never handed out (:func:`empty` checks), and the block's exit drops
    the pool as usual, so nothing is held after it.

    Args:
        results: The tensors the extensions wrote in an earlier block (views of
            one buffer are counted once).
    """
    pool = _recycled()
    if pool is None:
        return
    known = {e[0].untyped_storage().data_ptr() for e in pool}
    for t in results:
        if not isinstance(t, Tensor) or not _recycles(t.untyped_storage().nbytes(), t):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in known:
            continue
        known.add(storage.data_ptr())
        whole = torch.empty(0, dtype=t.dtype, device=t.device)
        whole.set_(storage, 0, (storage.nbytes() // t.element_size(),))
        pool.append([whole, _recycling.generation - 1])  # not handed out by this pass yet


def held_bytes() -> tuple[int, int]:
    """Bytes of this thread's recyclable buffers: ``(in use, free)``."""
    pool = getattr(_recycling, "pool", None) or []
    used = sum(e[0].nbytes for e in pool if not _unused(e[0]))
    return used, sum(e[0].nbytes for e in pool) - used


def zeros(shape: Sequence[int], like: Tensor) -> Tensor:
    """Like :func:`empty`, filled with zeros."""
    return empty(shape, like).zero_()


def ones(shape: Sequence[int], like: Tensor) -> Tensor:
    """Like :func:`empty`, filled with ones (the vector that reads a diagonal Jacobian off a node)."""
    return empty(shape, like).fill_(1)


def mul(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` (broadcast) into a buffer from :func:`empty`."""
    out = empty(_broadcast(a.shape, b.shape), like=a, dtype=torch.result_type(a, b))
    return torch.mul(a, b, out=out)


def _broadcast(s: Sequence[int], t: Sequence[int]) -> tuple[int, ...]:
    """Broadcast shape of two shapes (``torch.broadcast_shapes`` imports sympy on first use)."""
    s, t = (1,) * (len(t) - len(s)) + tuple(s), (1,) * (len(s) - len(t)) + tuple(t)
    if any(i != j and 1 not in (i, j) for i, j in zip(s, t)):
        raise ValueError(f"shapes {s} and {t} do not broadcast")
    return tuple(j if i == 1 else i for i, j in zip(s, t))


# Scratch buffers reused across backward passes, per thread: temporaries that
# never leave the rule that made them (x², a chunk of per-sample products).
# A fresh buffer of a few MB costs one page fault per 4 KiB on every step; a
# reused one does not. The pool is emptied when an ``extend`` block exits.
_scratch = threading.local()
_SCRATCH_MIN_BYTES = 256 << 10


def scratch(shape: Sequence[int], like: Tensor, slot: str) -> Tensor:
    """An uninitialised buffer of ``shape`` that ``slot`` reuses on every call.

    Args:
        shape: The shape wanted.
        like: Gives dtype and device.
        slot: Names the use site; the previous contents of the slot's buffer are
            overwritten, so a caller must be done with it before asking again.

    Returns:
        A contiguous tensor (a fresh one for small sizes and non-CPU devices).
    """
    numel = math.prod(shape)
    if like.device.type != "cpu" or numel * like.element_size() < _SCRATCH_MIN_BYTES:
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    pool = getattr(_scratch, "pool", None)
    if pool is None:
        pool = _scratch.pool = {}
    key = (slot, like.dtype)
    entry = pool.get(key)  # (flat buffer, shape of the last view, the last view)
    shape = tuple(shape)
    if entry is not None and entry[1] == shape:
        return entry[2]  # the usual case, every step: no slicing and viewing operations
    if entry is None or entry[0].numel() < numel:
        entry = (_fresh((numel,), like.dtype, like.device), None, None)
    view = entry[0][:numel].view(shape)
    pool[key] = (entry[0], shape, view)
    return view


def square(x: Tensor, slot: str) -> Tensor:
    """``x ∘ x`` into the scratch buffer of ``slot`` (a fresh tensor where ``scratch`` gives one)."""
    if x.device.type != "cpu" or x.nbytes < _SCRATCH_MIN_BYTES:
        return x.square()
    return torch.mul(x, x, out=scratch(x.shape, x, slot))


def release_scratch() -> None:
    """Drop this thread's scratch and recyclable buffers (the ``extend`` block exits)."""
    _scratch.pool = {}
    _recycling.pool = None  # _recycled() starts afresh: nothing held, no budget


# Between two blocks on the same model, per thread: the scratch buffers and the
# free recyclable buffers (at most the budget of :func:`held_budget`) of the
# last block, so that a training loop that opens a block per step (the README
# idiom) reuses its temporaries as one long block does instead of faulting
# their pages in again. Only the last model's are parked, under a weak key:
# they go with the model, when another model's block starts, or with
# :func:`release_memory`. No result and no recorded tensor is parked.
_parked = threading.local()
_blocks = threading.local()  # .active: the extend blocks active on this thread (resume ... park)


def park(model: object) -> None:
    """The block of ``model`` exits: keep its temporaries for its next block, drop the rest.

    Args:
        model: The extended model (weakly referenced).
    """
    _blocks.active = max(0, getattr(_blocks, "active", 0) - 1)
    scratch = getattr(_scratch, "pool", None) or {}
    pool = getattr(_recycling, "pool", None) or []
    free = [entry for entry in pool if _unused(entry[0])]  # drop_unused kept them within the budget
    # What the last pass may hold, the next block's first pass may too.
    cap = getattr(_recycling, "cap", 0) if getattr(_recycling, "pool", None) is not None else 0
    table: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    if scratch or free or cap:
        table[model] = (scratch, free, cap)
    _parked.table = table
    release_scratch()


def resume(model: object) -> None:
    """A block of ``model`` starts: take back what its last block parked, drop any other model's."""
    _blocks.active = getattr(_blocks, "active", 0) + 1
    table = getattr(_parked, "table", None)
    _parked.table = None
    entry = table.pop(model, None) if table is not None else None
    if entry is None:
        return
    scratch, free, cap = entry
    _scratch.pool = scratch
    pool = _recycled()
    if pool is not None:
        _recycling.cap = cap  # the first pass of this block may pool new buffers as the last one did
        for item in free:
            item[1] = _recycling.generation - 1  # not handed out by this block's first pass yet
            pool.append(item)


def release_memory() -> None:
    """Free every buffer curvhook keeps on this thread between blocks (see :func:`park`)."""
    _parked.table = None
    release_scratch()
