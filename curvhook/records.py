"""What a forward pass records: one :class:`Operation` per leaf-module call or tensor operation.

Module calls and tensor operations between modules (``x + y``, ``x.view``,
``F.relu``) are recorded as the same type, with the same fields: their tensor
arguments by *slot* (the ``i``-th distinct tensor argument), the identity of
every input and output, and the parameters they use with their names.

A tensor is identified by ``(id(tensor), version)``. The record holds a
reference to every tensor it names, so the ``id`` cannot be reused while the
record lives, and the version counter tells apart the states of a tensor that
an in-place operation (``ReLU(inplace=True)``) changes. No ``data_ptr`` is used,
so views and memory reuse cannot confuse two tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from curvhook._torch_internals import tensor_version

TensorKey = tuple[int, int]

# What an input of an operation is:
BATCHED = "batched"  # computed from the model input: batch axis first
SHARED = "shared"  # requires grad without a batch axis: a parameter, or computed from parameters only
CONST = "const"  # needs no gradient


def key_of(tensor: Tensor) -> TensorKey:
    """Return the identity of ``tensor`` in its current state."""
    return (id(tensor), tensor_version(tensor))


@dataclass(eq=False)
class Scratch:
    """What rules compute once per backward pass and reuse for every source.

    Every field starts at ``None`` and is cleared after the operation's step of
    the reverse walk. Each names the rule that fills it.
    """

    keeps_samples_apart_checked: Optional[bool] = None  # tensor_ops, fallback: the per-sample replay agreed
    slopes: Optional[dict] = None  # tensor_ops: σ'(x) of an elementwise operation, by slot
    grn: Optional[tuple] = None  # normalization: GlobalResponseNorm's terms
    loop_over_samples: Optional[bool] = None  # fallback: vmap could not run the module
    deterministic: Optional[bool] = None  # fallback: the replay draws no random numbers
    pool_indices: Optional[Tensor] = None  # pooling: the argmax positions of max pooling
    pool_coefficients: Optional[Tensor] = None  # pooling: squared averaging weights
    conv_geometry: Optional[Any] = None  # conv: sizes of the unfolded input
    conv_patches: Optional[Tensor] = None  # conv: the unfolded input
    conv_rows: Optional[Tensor] = None  # conv: the unfolded input, a patch per row
    upsampling_matrices: Optional[Any] = None  # upsampling: interpolation matrices per axis
    linear_m_sq: Optional[tuple] = None  # linear: squared columns summed over V
    linear_m_norms: Optional[tuple] = None  # linear: ‖m_vn‖² of one backpropagated matrix
    attention: Optional[tuple] = None  # attention: the diagonals of one call
    jac_diag: Optional[Tensor] = None  # elementwise: the Jacobian diagonal σ'(x)
    bn_scale: Optional[Tensor] = None  # normalization: γ / √(v + ε) of BatchNorm
    bn_x_hat: Optional[Tensor] = None  # normalization: BatchNorm's normalized input
    normalized: Optional[tuple] = None  # normalization: (x̂, 1/σ) of LayerNorm / GroupNorm
    x_hat_sq: Optional[Tensor] = None  # normalization: x̂²
    softmax: Optional[tuple] = None  # softmax: (softmax(x), dim)
    batched_view: Optional[Any] = None  # parameters_only: the call as a batched operation
    batch_first_view: Optional[Any] = None  # batch_axis_view: the call with its batch axis first
    recurrent: Optional[Any] = None  # recurrent: the re-run recurrence (pullback, forward values, caches)
    relative_logits: Optional[tuple] = None  # relative_position: q, the offset tables, R_w, R_h (() for the fallback)
    blur_pool: Optional[tuple] = None  # blur_pool: tap positions and squared weights (() for the fallback)
    norm_form: Optional[int] = None  # normalization: the form a probed norm computes (-1 for the fallback)
    moe: Optional[Any] = None  # mixture_of_experts: the recomputed routing (False for the fallback)
    moe_pull: Optional[tuple] = None  # mixture_of_experts: the last pullback, by its input


@dataclass(eq=False)
class Operation:
    """One leaf-module call or one tensor operation of the forward pass.

    Attributes:
        name: What to call it in messages (``"'encoder.0' (Linear)"`` or
            ``"add (in 'block')"``).
        module: The leaf module called; ``None`` for a tensor operation.
        func: The function or tensor method called; ``None`` for a module.
        args: Positional arguments, tensors replaced by :class:`Slot` markers.
        kwargs: Keyword arguments, likewise.
        inputs: The distinct tensor arguments, by slot, as they were at call time.
        input_kinds: Per slot, :data:`BATCHED`, :data:`SHARED` or :data:`CONST`.
        fixed_slots: The slots of the constants computed from the model's buffers and
            frozen parameters alone: never batched, whatever their leading size
            (:mod:`curvhook.fixed_constants`).
        input_keys: Identity of each input before the call.
        input_versions: Version counter of each input before the call.
        input_nodes: ``grad_fn`` of each input before the call.
        output_keys: Identity of each followed output (``None`` for one without grad).
            A module's first tensor output is followed; a tensor operation's all.
        unfollowed_output_keys: Further outputs of a module that require grad;
            using one is refused.
        output_shapes: Shape of each followed output.
        output: A module's first output (``None`` for the output of the model:
            holding it would tie the record to the graph it is hooked on).
        output_values: A tensor operation's outputs, detached.
        node: ``grad_fn`` of the first output right after the call; ``None`` where
            ``node_saves_hooked``.
        node_saves_hooked: The call ran under saved-tensor hooks (activation
            checkpointing): its node's saved tensors are unpacked once, by autograd,
            so no rule may read the node; they recompute from the stored tensors.
        params: ``(name, parameter)`` of the trainable parameters it uses: a
            module's own (all below it when ``recurse``), or ``("t<slot>", p)``
            for parameters passed to a tensor operation.
        training: ``module.training`` at call time.
        recurse: A module with children it did not call: one operation over all
            parameters below it (``nn.MultiheadAttention``).
        inplace: The operation modified its first argument in place.
        overwritten: For an in-place tensor operation whose derivatives depend on the
            value it overwrote (``h.tanh_()``, ``h.mul_(w)``): the overwritten tensor,
            held so that its ``id`` is not reused; ``inputs[0]`` is then a copy of
            its value before the call.
        known_per_sample: Set from the plan before a backward pass: the
            structure of this tensor operation shows that it keeps samples
            apart, so its rule may skip the per-sample replay.
        from_parameters: A leaf module called on constants and parameters only
            whose output has no batch axis (a position embedding of
            ``arange(L)``): its output is shared by every sample.
        selection_tail: For a leaf ``from_parameters``, the entries picked at the end
            of its computation (:mod:`curvhook.selection_tail`), where they spread fewer
            entries over its output; ``None`` otherwise.
        to_batch: A tensor operation that broadcasts a tensor computed from
            parameters only along a new batch axis (``cls_token.expand(N, -1, -1)``):
            every row of its output is the same function of the parameters.
        batch_axes: ``(input axes by slot, output axes)`` for a tensor operation
            or module call on or to a batched tensor whose batch axis is not first
            (:mod:`curvhook.batch_axis`, :mod:`curvhook.rules.batch_axis_view`);
            ``None`` (every batch axis first) for all others. An input axis of
            ``None``: a constant or shared input; an output axis of ``None``:
            curvhook cannot tell.
        rows_per_sample: For an operation after the model that merges the batch
            axis with the axes after it (``logits.reshape(-1, V)``): each sample is
            a block of this many rows of its output. ``0`` otherwise.
        rows: For an operation of the model on tensors whose batch axis a reshape
            merged with the axes after it (``[N, L, H]`` viewed as ``[N·L, H]``):
            each sample is a block of this many consecutive rows of its outputs'
            leading axis, and the rule sees each row as a pseudo-sample
            (:mod:`curvhook.row_groups`). ``1`` for one row per sample; ``0`` where
            its batched inputs disagree.
        rows_in: The same for its batched inputs, where a reshape changes the
            grouping (``rows_in != rows``: the merge or the split itself).
        scratch: Per-backward values the rules reuse.
    """

    name: str
    inputs: tuple[Tensor, ...]
    input_kinds: tuple[str, ...]
    input_keys: tuple[TensorKey, ...]
    input_versions: tuple[int, ...]
    input_nodes: tuple[Any, ...]
    module: Optional[nn.Module] = None
    func: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output_keys: tuple[Optional[TensorKey], ...] = ()
    unfollowed_output_keys: tuple[TensorKey, ...] = ()
    output_shapes: tuple[Optional[torch.Size], ...] = ()
    output: Optional[Tensor] = None
    output_values: tuple[Optional[Tensor], ...] = ()
    node: Any = None
    node_saves_hooked: bool = False
    params: tuple[tuple[str, nn.Parameter], ...] = ()
    training: bool = False
    recurse: bool = False
    inplace: bool = False
    overwritten: tuple[Tensor, ...] = ()
    known_per_sample: bool = False
    from_parameters: bool = False
    selection_tail: Optional[Any] = None
    to_batch: bool = False
    batch_axes: Optional[tuple] = None
    rows_per_sample: int = 0
    rows: int = 1
    rows_in: int = 1
    fixed_slots: tuple[int, ...] = ()
    _scratch: Optional[Scratch] = field(default=None, repr=False)

    @property
    def scratch(self) -> Scratch:
        """Per-backward values the rules reuse, made when a rule first asks.

        Most operations never ask: no object is made for them (fewer objects for
        Python's cyclic garbage collector to track while a step runs).
        """
        if self._scratch is None:
            self._scratch = Scratch()
        return self._scratch

    @property
    def input(self) -> Tensor:
        """The first input, ``[N, *in]``."""
        return self.inputs[0]

    @property
    def output_key(self) -> Optional[TensorKey]:
        """Identity of the first output."""
        return self.output_keys[0] if self.output_keys else None

    @property
    def output_shape(self) -> Optional[torch.Size]:
        """Shape of the first output."""
        return self.output_shapes[0] if self.output_shapes else None

    @property
    def func_name(self) -> str:
        """The bare name of the function (``"add"``, ``"__getitem__"``); ``""`` for a module."""
        return getattr(self.func, "__name__", str(self.func)) if self.func is not None else ""

    def slot_of(self, name: str) -> int:
        """Slot of a parameter passed to a tensor operation, from its name ``"t<slot>"``."""
        return int(name[1:])

    def uses(self, slot: int) -> int:
        """How many times the tensor at ``slot`` is passed (``x + x``: twice)."""
        count, stack = 0, [self.args, tuple(self.kwargs.values())]
        while stack:
            obj = stack.pop()
            if isinstance(obj, (list, tuple)):
                stack.extend(obj)
            else:
                count += isinstance(obj, Slot) and obj == slot
        return count

    def invoke(self, tensors: list[Tensor]) -> Any:
        """Call the tensor operation again with ``tensors`` in the slots (out of place)."""
        args, kwargs = fill_template(self.args, self.kwargs, tensors)
        if self.inplace:
            args = (args[0].clone(),) + args[1:]
            result = self.func(*args, **kwargs)
            return args[0] if result is None else result
        return self.func(*args, **kwargs)

    def clear_scratch(self) -> None:
        """Forget what the rules computed in this backward pass."""
        self._scratch = None


@dataclass(eq=False)
class LossScratch:
    """What a loss rule computes once per backward pass (see :mod:`curvhook.losses`)."""

    coefficients: Optional[tuple] = None  # cross-entropy: (p, a, α)
    parts: Optional[tuple] = None  # BCE with logits: (σ(f), weights, pos_weight)


@dataclass(eq=False)
class LossCall:
    """A loss module called on a model output.

    Attributes:
        module: The loss module (``nn.CrossEntropyLoss`` ...).
        input: The model output it was called on, detached, ``[N, *out]``.
        target: The target it was called with (``None`` for a named loss).
        key: Identity of the tensor the loss was called on: the model output, or a
            tensor computed from it by operations after the model.
        scale: ``dℓ/dL``, the derivative of the backpropagated scalar ℓ with
            respect to this loss value L, captured by a hook during backward.
            ``None`` until backward passes through the loss.
        scratch: Per-backward values of the loss rule.
        batch_part: The operation that took part of the batch of the model output
            (``"__getitem__"`` for ``out[:4]``) when the loss was called on such a
            part: then it has no curvature curvhook can give, and a backward
            through it is refused. ``None`` for a loss on the whole batch.
    """

    module: nn.Module
    input: Tensor
    target: Optional[Tensor]
    key: Optional[TensorKey] = None
    scale: Optional[Tensor] = None
    scratch: LossScratch = field(default_factory=LossScratch)
    batch_part: Optional[str] = None


class Slot(int):
    """Placeholder for the ``i``-th distinct tensor argument inside a recorded call."""

    __slots__ = ()


# Slots are immutable: the templates of every call share these (a Slot is an object
# that Python's cyclic garbage collector tracks; one per argument would be made per step).
_SLOTS = tuple(Slot(i) for i in range(64))


def _slot_marker(i: int) -> Slot:
    return _SLOTS[i] if i < len(_SLOTS) else Slot(i)


def make_template(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[Tensor]]:
    """Replace tensor arguments by :class:`Slot` markers, one slot per distinct tensor.

    Returns:
        ``(args, kwargs, tensors)``: the arguments with slots (one level into lists
        and tuples, as for ``torch.cat``) and the distinct tensors in slot order.
    """
    tensors: list[Tensor] = []
    index: dict[int, int] = {}
    new_args = tuple(_slot(a, tensors, index) for a in args)
    new_kwargs = {k: _slot(v, tensors, index) for k, v in kwargs.items()}
    return new_args, new_kwargs, tensors


# Module-level helpers rather than nested recursive closures: a closure that calls
# itself is a reference cycle, which would keep the tensors it saw alive until
# the garbage collector runs, and make it run more often.
def _slot(obj: Any, tensors: list[Tensor], index: dict[int, int]) -> Any:
    if isinstance(obj, Tensor):
        if id(obj) not in index:
            index[id(obj)] = len(tensors)
            tensors.append(obj)
        return _slot_marker(index[id(obj)])
    if isinstance(obj, (list, tuple)) and any(isinstance(o, Tensor) for o in obj):
        return _same_container(obj, [_slot(o, tensors, index) for o in obj])
    return obj


def fill_template(args: tuple, kwargs: dict, tensors: list[Tensor]) -> tuple[tuple, dict]:
    """Inverse of :func:`make_template` with new tensors in the slots."""
    return tuple(_fill(a, tensors) for a in args), {k: _fill(v, tensors) for k, v in kwargs.items()}


def _fill(obj: Any, tensors: list[Tensor]) -> Any:
    if isinstance(obj, Slot):
        return tensors[obj]
    if isinstance(obj, (list, tuple)) and any(isinstance(o, Slot) for o in obj):
        return _same_container(obj, [_fill(o, tensors) for o in obj])
    return obj


def _same_container(obj: Any, items: list) -> Any:
    """``items`` in a container of ``obj``'s kind: a list, a tuple, or the same namedtuple."""
    if not isinstance(obj, tuple):
        return items
    if hasattr(type(obj), "_fields"):  # a namedtuple: the module reads its fields by name
        # _make: tuple.__new__ with the fields as they are; a subclass's own __new__ (PackedSequence
        # checks batch_sizes' device) would reject the placeholders of a template
        return type(obj)._make(items)
    return tuple(items)


def tensor_arguments(args: tuple, kwargs: dict) -> Iterator[Tensor]:
    """The tensors among a call's arguments, one level into lists and tuples (``torch.cat``)."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, Tensor):
            yield arg
        elif isinstance(arg, (list, tuple)):
            yield from (a for a in arg if isinstance(a, Tensor))


def carries_gradient(t: Tensor) -> bool:
    """Whether ``t`` can carry a gradient (floating point or complex; not ``max``'s indices)."""
    return t.is_floating_point() or t.is_complex()


class DifferentiableOutputs:
    """An operation that also returns integer tensors, returning only its others.

    ``h.max(dim=-1)`` gives ``(values, indices)``; its record replays
    ``(values,)``, since ``torch.func.vjp`` refuses integer outputs and no
    gradient flows through them. One instance per operation (:meth:`of`), so
    that plans keyed by the function stay the same from step to step.
    """

    _made: dict = {}

    def __init__(self, func: Any) -> None:
        self.func = func
        self.__name__ = getattr(func, "__name__", str(func))

    @classmethod
    def of(cls, func: Any) -> "DifferentiableOutputs":
        """The wrapper of ``func`` (made once)."""
        try:
            made = cls._made.get(func)
        except TypeError:  # an unhashable callable: a new wrapper (its plans are not reused)
            return cls(func)
        if made is None:
            made = cls._made[func] = cls(func)
        return made

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        return tuple(o for o in flat_tensors(self.func(*args, **kwargs)) if carries_gradient(o))


def flat_tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in a (nested) tuple or list output, in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from flat_tensors(o)
