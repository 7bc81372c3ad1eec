"""One vocabulary of the tensor operations curvhook knows by name.

The tape (what to skip, what is in place), the loss-linearity check (which
functions of a loss value keep its Hessian) and the tensor-operation rules
(which closed-form pullbacks apply) all read these tables, so they cannot
disagree about an operation.
"""

from __future__ import annotations

from typing import Any

# Calls that compute no new differentiable tensor: the tape skips them at once.
NOT_OPERATIONS = frozenset({
    "detach", "detach_", "register_hook", "size", "dim", "numel", "item", "tolist", "backward",
    "requires_grad_", "retain_grad", "__len__", "__format__", "__repr__", "data_ptr", "stride",
    "is_contiguous", "storage_offset", "element_size", "__bool__", "untyped_storage",
    "__hash__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__index__",
    "__int__", "__float__", "__array__", "numpy", "cpu", "equal", "allclose", "isclose",
    "register_post_accumulate_grad_hook", "__reduce_ex__", "__deepcopy__", "nelement",
    "__set__",  # property setters: p.grad = None, x.requires_grad = ...
})
# Property getters that return a differentiable view (``x.T``), not metadata.
TENSOR_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})

# Sums and differences of two operands, ``±a ± b``.
ADDITIONS = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_"})
SUBTRACTIONS = frozenset({"sub", "__sub__", "__isub__", "sub_", "subtract"})  # the second negated
REVERSED_SUBTRACTIONS = frozenset({"rsub", "__rsub__"})  # the first operand negated

# Every Jacobian entry is 0 or ±1 with one sign per input: views, permutations,
# selections, concatenation, splits, expansion, sums, masks (maybe per sample).
STRUCTURAL = frozenset({
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone",
    "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "__getitem__",
    "expand", "expand_as", "view_as", "reshape_as", "narrow", "select", "cat", "concat",
    "concatenate", "stack", "hstack", "split", "chunk", "unbind", "tensor_split", "to",
    "float", "double", "type_as", "__get__", "repeat", "repeat_interleave", "tile", "flip", "roll", "sum", "t",
    "neg", "__neg__", "negative", "positive", "__pos__", "__setitem__",
    "masked_fill", "masked_fill_", "where", "pad",
}) | ADDITIONS | SUBTRACTIONS | REVERSED_SUBTRACTIONS
MEANS = frozenset({"mean"})
# Reshapes that may merge the batch axis with the next ones before a loss (``logits.reshape(-1, V)``).
MERGING_RESHAPES = frozenset({"reshape", "view", "flatten"})
ELEMENTWISE = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu",
    "gelu", "silu", "mish", "softplus", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log",
    "sin", "cos", "hardtanh", "hardtanh_", "hardsigmoid", "hardswish", "logsigmoid",
    "square", "sqrt", "rsqrt", "abs", "log1p", "expm1", "erf", "__pow__", "pow", "softsign",
    "tanhshrink", "threshold", "square_", "exp_", "reciprocal",
})
PRODUCTS = frozenset({"mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply"})
QUOTIENTS = frozenset({"div", "__truediv__", "__itruediv__", "div_", "divide", "true_divide"})
MATMULS = frozenset({"matmul", "__matmul__", "bmm", "mm"})
# Softmax over one dim (``F.softmax(x, dim=-1)``), which must not be the batch axis.
SOFTMAXES = frozenset({"softmax", "log_softmax"})
# Operations whose per-sample structure the rules can read off shapes and arguments.
# Normalizations along one dim (``F.normalize(q, dim=-1)``: Swin V2's cosine attention).
NORMALIZES = frozenset({"normalize"})
# Two-operand Einstein sums (MaxViT's ``einsum("bghid,bghjd->bghij", q, k)``).
EINSUMS = frozenset({"einsum"})
# Each output entry is one entry of the first argument, picked by a constant integer index
# along a dim that is not the batch axis (``x.gather(-1, idx)``: DeBERTa's relative
# positions): entries 0 or 1, an entry of ``x`` maybe picked several times.
SELECTIONS = frozenset({"gather", "take_along_dim", "index_select"})
# Sliding windows and their adjoint: Jacobian entries 0 or 1, so ``Σ_o d_o J_oi² = (Jᵀ d)_i``.
# ``Tensor.unfold(dim, size, step)`` (HaloNet's key-value windows) and ``F.unfold`` (im2col):
# each output entry is one input entry, or a zero of the padding. ``F.fold`` (col2im, VOLO's
# outlook attention): each input entry is added to one output entry, or dropped in the padding.
WINDOWS = frozenset({"unfold", "fold"})
# The largest or smallest entry along dims that are not the batch axis (Hiera's query pooling,
# ``q.amax(dim=3)``): each output entry is one input entry, or the mean of tied ones.
EXTREMES = frozenset({"amax", "amin"})
# ``max``/``min``: along an int dim they return (values, indices), each value one input entry
# (VOLO's class head); with a tensor second argument they are elementwise (``BROADCASTING``).
INDEXED_EXTREMES = frozenset({"max", "min"})
KNOWN = (
    STRUCTURAL | MEANS | ELEMENTWISE | PRODUCTS | QUOTIENTS | MATMULS | SOFTMAXES | NORMALIZES | EINSUMS | SELECTIONS
    | EXTREMES
)
# Operations with a ``dim`` that must not be the batch axis.
DIM_OPERATIONS = frozenset({
    "cat", "concat", "concatenate", "stack", "split", "chunk", "unbind", "tensor_split",
    "sum", "mean", "select", "narrow", "squeeze", "unsqueeze", "flatten", "transpose",
    "swapaxes", "swapdims", "movedim", "moveaxis", "permute", "flip", "roll", "pad", "t", "repeat_interleave",
}) | SOFTMAXES | NORMALIZES | SELECTIONS | EXTREMES
# Operations that take an integer index of the input's rank along ``dim``
# (``h.gather(1, idx)``): an index with one row per sample belongs to its sample.
INDEXED_ALONG_DIM = frozenset({
    "gather", "take_along_dim", "scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy",
    "index_fill", "index_select",
})
# Operations that broadcast their tensor arguments against each other entry by entry:
# a constant of the output's rank with one row per sample (a mask) belongs to its sample.
BROADCASTING = ADDITIONS | SUBTRACTIONS | REVERSED_SUBTRACTIONS | PRODUCTS | QUOTIENTS | frozenset({
    "where", "masked_fill", "masked_fill_", "pow", "__pow__", "__rpow__", "maximum", "minimum",
    "lerp", "addcmul", "addcdiv", "clamp", "clip",
}) | INDEXED_EXTREMES
# Operations that take a constant of the output's rank whose row ``n`` serves sample ``n``
# (``F.grid_sample(x, grid)`` with a grid ``[N, H, W, 2]``).
SAMPLE_ALIGNED = frozenset({"grid_sample"})
# Known operations that may change the number of axes (their dims are checked instead).
CHANGE_RANK = frozenset({
    "__getitem__", "squeeze", "unsqueeze", "flatten", "unflatten", "view", "reshape",
    "select", "unbind", "stack", "__get__", "split", "chunk", "tensor_split", "sum", "mean", "amax", "amin",
})

# Functions of a loss value that keep its Hessian (affine in all their tensor
# arguments together): the structural maps and means, and a few more linear maps.
LINEAR_IN_ALL = STRUCTURAL | MEANS | frozenset({
    "nansum", "nanmean", "index_select", "half", "bfloat16", "type", "sum_to_size", "cumsum",
    "t", "T", "mT", "ravel", "vstack", "squeeze_", "unsqueeze_",
})
# Linear in each argument on its own: linear when exactly one argument is a loss.
LINEAR_IN_EACH = PRODUCTS | MATMULS | frozenset({"mv", "dot", "einsum", "outer"})
# Linear in the first argument only.
LINEAR_IN_FIRST = QUOTIENTS

_INPLACE_DUNDERS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__", "__ipow__"})


def name_of(func: Any) -> str:
    """The bare name of a torch function or tensor method (``"add"``, ``"__getitem__"``)."""
    return getattr(func, "__name__", "")


def is_inplace(name: str) -> bool:
    """Whether the operation called ``name`` changes its first argument in place."""
    return name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))


def is_tensor_property(getter: Any) -> bool:
    """Whether a property getter returns a differentiable view (``x.T``), not metadata."""
    return getattr(getattr(getter, "__self__", None), "__name__", "") in TENSOR_PROPERTIES


def skipped(func: Any, name: str) -> bool:
    """Whether the tape ignores a call: no new differentiable tensor comes out of it."""
    return name in NOT_OPERATIONS or (name == "__get__" and not is_tensor_property(func))
