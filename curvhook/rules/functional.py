"""Functional layers called in a container's ``forward``: the module rules, reused.

Real models override ``forward`` and call ``F.batch_norm`` (timm's ``BatchNormAct2d``),
``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``, ``F.linear``, ``torch.addmm``
(GPT-2's ``Conv1D``), ``F.embedding`` or ``F.conv2d`` (timm's ``Conv2dSame``). Such a call is recorded as a tensor
operation; :data:`FUNCTIONAL_RULES` gives it the closed forms of the module rule
of the same layer (``curvhook/rules/normalization.py``, ``linear.py``,
``embedding.py``) instead of ``torch.func`` Jacobians: a :class:`_ModuleCall`
presents the operation as a call of a module whose attributes (``weight``,
``eps``, ``normalized_shape`` …) are the call's arguments. The parameters of
the operation are named ``"t<slot>"``; each maps to the module's ``"weight"`` or
``"bias"``.

``torch.addmm(b, x, W)`` is ``F.linear(x, Wᵀ, b)``: the results for ``W`` are
the module rule's, transposed. Any form the module rule does not cover (a
batched weight, an input passed twice, ``beta ≠ 1``) takes the generic exact
path of :class:`~curvhook.rules.tensor_ops.TensorOpRule`.

``F.scaled_dot_product_attention`` (no dropout, a mask without a per-sample
axis) and the normalizations are known to keep samples apart, so the
per-sample replay check is skipped. ``F.batch_norm`` with ``training=True``
normalizes with batch statistics and is refused.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhook.errors import UnsupportedModelError
from curvhook.records import BATCHED, CONST, SHARED, Operation, Slot
from curvhook.rules.attention import attention_diagonals
from curvhook.rules.batched_products import AddcmulFunction, BaddbmmFunction
from curvhook.rules.base import LayerRule
from curvhook.rules.conv import _GRAD_WEIGHT as _CONV_GRAD_WEIGHT, ConvRule, _geometry as _conv_geometry
from curvhook.rules.embedding import EmbeddingRule
from curvhook.rules.linear import LinearRule
from curvhook.rules.normalization import BatchNormRule, GroupNormRule, LayerNormRule, RMSNormRule
from curvhook.rules.pooling import AdaptiveAvgPoolRule, AvgPoolRule, MaxPoolRule
from curvhook.rules.tensor_ops import TensorOpRule
from curvhook.rules.linear_maps import linear_vjp
from curvhook.rules.upsampling import UpsampleRule, interpolates_separably


class _ModuleCall:
    """A recorded functional call, as the module rules read a module call.

    Attributes:
        module: The layer's attributes (``weight``, ``bias``, ``eps`` …) from the call's arguments.
        inputs: ``(x,)``, the layer input ``[N, *in]``.
        op: The recorded operation (its ``scratch`` is the module rule's cache).
    """

    training = False
    # (the call's autograd node is not the module's: rules that would apply it take their own route)
    node = output = None

    def __init__(self, op: Operation, module: SimpleNamespace, x: Tensor) -> None:
        self.op, self.module, self.inputs = op, module, (x,)

    @property
    def input(self) -> Tensor:
        return self.inputs[0]

    @property
    def scratch(self):
        return self.op.scratch

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def output_shape(self):
        return self.op.output_shapes[0]


def _bind(call: Operation, names: tuple[str, ...], defaults: dict) -> dict[str, Any]:
    """The call's arguments by parameter name, slots left as :class:`Slot` markers."""
    bound = dict(defaults)
    bound.update(zip(names, call.args))
    bound.update(call.kwargs)
    return bound


def _value(call: Operation, arg: Any) -> Any:
    """A bound argument with its tensor filled in (detached)."""
    return call.inputs[arg].detach() if isinstance(arg, Slot) else arg


class FunctionalRule(TensorOpRule):
    """A torch functional served by a module rule (see the module docstring).

    Class attributes of the subclasses:
        names: The functional's positional parameter names.
        defaults: Their defaults.
        rule: The module rule.
        x_arg: The parameter that is the layer input.
        roles: Functional parameter name -> module parameter name (``"weight"``, ``"bias"``).
    """

    names: tuple[str, ...] = ()
    defaults: dict = {}
    rule: LayerRule
    x_arg = "input"
    roles = {"weight": "weight", "bias": "bias"}

    # ------------------------------------------------------------ structure
    def bound(self, call: Operation) -> dict[str, Any]:
        return _bind(call, self.names, self.defaults)

    def module(self, call: Operation, args: dict[str, Any]) -> SimpleNamespace:
        """The attributes the module rule reads, from the bound arguments."""
        return SimpleNamespace(**{k: _value(call, v) for k, v in args.items()})

    def configuration_ok(self, call: Operation, args: dict[str, Any]) -> bool:
        """Whether the module rule covers this form of the call (checked shapes aside)."""
        return True

    def keeps_samples_apart(self, call: Operation, n: int) -> bool:
        """Whether the arguments show that the call keeps samples apart (no replay check)."""
        args = self.bound(call)
        x = args.get(self.x_arg)
        return (
            isinstance(x, Slot) and call.input_kinds[x] == BATCHED and call.inputs[x].shape[0] == n
            and all(s is not None and len(s) and s[0] == n for s in call.output_shapes)
            and all(call.input_kinds[v] != BATCHED for k, v in args.items() if k != self.x_arg and isinstance(v, Slot))
            and self.configuration_ok(call, args)
        )

    def _served(self, call: Operation, value: Any) -> Optional[tuple[_ModuleCall, dict]]:
        """The module call, if the module rule serves this call: else ``None`` (generic path)."""
        if isinstance(value, list) or not call.known_per_sample:
            return None
        args = self.bound(call)
        x = args[self.x_arg]
        if sum(isinstance(v, Slot) and v == x for v in args.values()) != 1:
            return None  # the layer input passed twice (F.linear(x, x))
        return _ModuleCall(call, self.module(call, args), call.inputs[x].detach()), args

    def _role(self, call: Operation, args: dict, slot: int) -> Optional[str]:
        return next((self.roles[k] for k, v in args.items() if k in self.roles and isinstance(v, Slot) and v == slot), None)

    # -------------------------------------------------------------- input
    def input_jac_t_mat_prod(self, call: Operation, value, slot: int) -> Tensor:
        served = self._served(call, value)
        if served is not None and call.input_kinds[slot] == BATCHED:
            return self.rule.jac_t_mat_prod(served[0], value)
        if served is not None and self._role(call, served[1], slot) is not None:
            return self.param_jac_t_mat_prod(call, f"t{slot}", value)
        return super().input_jac_t_mat_prod(call, value, slot)

    def input_diag(self, call: Operation, value, slot: int) -> Tensor:
        served = self._served(call, value)
        if served is not None and call.input_kinds[slot] == BATCHED:
            return self.rule.diag_jac_t_diag_jac(served[0], value)
        return super().input_diag(call, value, slot)

    # --------------------------------------------------------- parameters
    def _param(self, call: Operation, name: str, value, method: str) -> Optional[Tensor]:
        served = self._served(call, value)
        role = None if served is None else self._role(call, served[1], call.slot_of(name))
        if role is None:
            return None
        return self.transposed(role, getattr(self.rule, method)(served[0], role, value))

    def transposed(self, role: str, result: Tensor) -> Tensor:
        """The module rule's result in the functional's layout of the parameter (default: the same)."""
        return result

    def param_jac_t_mat_prod(self, call: Operation, name: str, mat) -> Tensor:
        out = self._param(call, name, mat, "param_jac_t_mat_prod")
        return out if out is not None else super().param_jac_t_mat_prod(call, name, mat)

    def param_sq_sum(self, call: Operation, name: str, mat) -> Tensor:
        out = self._param(call, name, mat, "param_sq_sum")
        return out if out is not None else super().param_sq_sum(call, name, mat)

    def param_diag(self, call: Operation, name: str, diag) -> Tensor:
        out = self._param(call, name, diag, "param_diag")
        return out if out is not None else super().param_diag(call, name, diag)


class BatchNormFunction(FunctionalRule):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, momentum, eps)``."""

    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    rule = BatchNormRule()

    def configuration_ok(self, call: Operation, args: dict) -> bool:
        self.refuse(call, args)
        stats = (args["running_mean"], args["running_var"])
        return all(isinstance(s, Slot) and call.input_kinds[s] != BATCHED for s in stats)

    @staticmethod
    def refuse(call: Operation, args: dict) -> None:
        """Batch statistics mix samples: refused with the remedy."""
        if args["training"] or args["running_mean"] is None:
            raise UnsupportedModelError(
                f"The operation {call.name} normalizes with statistics of the whole batch "
                "(F.batch_norm with training=True), so samples are mixed and per-sample "
                "Jacobians do not exist. Call model.eval() (BatchNorm then uses its running statistics)."
            )

    def check(self, call: Operation) -> None:
        self.refuse(call, self.bound(call))
        super().check(call)


class LayerNormFunction(FunctionalRule):
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` over trailing axes of a sample."""

    names = ("input", "normalized_shape", "weight", "bias", "eps")
    defaults = {"weight": None, "bias": None, "eps": 1e-5}
    rule = LayerNormRule()

    def module(self, call: Operation, args: dict) -> SimpleNamespace:
        module = super().module(call, args)
        shape = module.normalized_shape
        module.normalized_shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return module

    def configuration_ok(self, call: Operation, args: dict) -> bool:
        shape = args["normalized_shape"]
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return 0 < len(shape) < call.inputs[args["input"]].dim()  # not the batch axis


class RMSNormFunction(LayerNormFunction):
    """``F.rms_norm(x, normalized_shape, weight, eps)``."""

    names = ("input", "normalized_shape", "weight", "eps")
    defaults = {"weight": None, "eps": None}
    rule = RMSNormRule()


class GroupNormFunction(FunctionalRule):
    """``F.group_norm(x, num_groups, weight, bias, eps)``: per sample always."""

    names = ("input", "num_groups", "weight", "bias", "eps")
    defaults = {"weight": None, "bias": None, "eps": 1e-5}
    rule = GroupNormRule()


class LinearFunction(FunctionalRule):
    """``F.linear(x, weight, bias)`` with ``x`` ``[N, *, in]``."""

    names = ("input", "weight", "bias")
    defaults = {"bias": None}
    rule = LinearRule()

    def configuration_ok(self, call: Operation, args: dict) -> bool:
        w, b = _value(call, args["weight"]), _value(call, args["bias"])
        return isinstance(w, Tensor) and w.dim() == 2 and (b is None or b.dim() == 1)

    def param_factors(self, call: Operation, name: str, mat: Tensor):
        served = self._served(call, mat)
        role = None if served is None else self._role(call, served[1], call.slot_of(name))
        return None if role is None else self.rule.param_factors(served[0], role, mat)

    def input_diag(self, call: Operation, value, slot: int) -> Tensor:
        """A weight or bias computed from parameters (torchvision's Swin V2 clones its ``qkv``
        bias and zeroes the keys' part) gets its per-sample diagonal in closed form, like
        a parameter's: ``Σ_p d_npo`` for the bias, ``Σ_p d_npo x_npi²`` for the weight."""
        served = self._served(call, value)
        role = None if served is None else self._role(call, served[1], slot)
        if role is None or call.input_kinds[slot] == BATCHED:
            return super().input_diag(call, value, slot)
        x = served[0].input
        d = value.reshape(value.shape[0], -1, value.shape[-1])  # [N, P, out]
        if role == "bias":
            return d.sum(1)
        return self.transposed(role, torch.einsum("npo,npi->noi", d, x.reshape(x.shape[0], -1, x.shape[-1]).square()))


class AddmmFunction(LinearFunction):
    """``torch.addmm(b, x, W) = x W + b``: ``F.linear(x, Wᵀ, b)`` for ``x`` ``[N, in]``, ``W`` ``[in, out]``."""

    names = ("input", "mat1", "mat2")
    defaults = {}
    x_arg = "mat1"
    roles = {"mat2": "weight", "input": "bias"}

    def module(self, call: Operation, args: dict) -> SimpleNamespace:
        return SimpleNamespace(weight=_value(call, args["mat2"]).t(), bias=_value(call, args["input"]))

    def configuration_ok(self, call: Operation, args: dict) -> bool:
        b = _value(call, args["input"])
        return args.get("beta", 1) == 1 and args.get("alpha", 1) == 1 and isinstance(b, Tensor) and b.dim() == 1

    def transposed(self, role: str, result: Tensor) -> Tensor:
        return result.transpose(-1, -2) if role == "weight" else result

    def param_factors(self, call: Operation, name: str, mat: Tensor):
        return None  # the factors of Wᵀ, not W


class EmbeddingFunction(FunctionalRule):
    """``F.embedding(indices, weight, padding_idx)``: indices ``[N, *]`` from the model input."""

    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
    defaults = {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False}
    rule = EmbeddingRule()
    roles = {"weight": "weight"}

    def _served(self, call: Operation, value: Any) -> Optional[tuple[_ModuleCall, dict]]:
        args = self.bound(call)
        x, w = args["input"], args["weight"]
        if isinstance(value, list) or not isinstance(w, Slot) or args["max_norm"] is not None or args["scale_grad_by_freq"]:
            return None
        if not (isinstance(x, Slot) and call.input_kinds[x] == BATCHED):
            # indices without the batch axis (positions [1, L] of a batch of N > 1): the output
            # is computed from the weight alone, one value per sample of it; the module rule
            # reads one row of indices per sample (it crashed, or gave FullGGN wrong numbers)
            return None
        return _ModuleCall(call, self.module(call, args), _value(call, x)), args


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


class AttentionFunction(TensorOpRule):
    """``F.scaled_dot_product_attention``: known to keep samples apart without dropout.

    Its products are the generic exact ones (``torch.func`` on the whole call);
    DiagGGNApprox counts it as its operations by default (:class:`SplitAttentionFunction`).
    """

    def operations_rule(self) -> TensorOpRule:
        return SPLIT_SDPA

    def keeps_samples_apart(self, call: Operation, n: int) -> bool:
        args = _bind(call, SDPA_ARGS, {"attn_mask": None, "dropout_p": 0.0})
        q, k, v = (args.get(a) for a in SDPA_ARGS[:3])
        mask = _value(call, args["attn_mask"])
        batched = [t for t in (q, k, v) if isinstance(t, Slot) and call.input_kinds[t] == BATCHED]
        out_rank = len(call.output_shapes[0])
        frozen = self._frozen_per_sample(call)
        # (a batched mask of lower rank broadcasts its batch axis onto another one: mixes samples)
        batched_mask = isinstance(args["attn_mask"], Slot) and call.input_kinds[args["attn_mask"]] == BATCHED
        return (
            args["dropout_p"] == 0 and bool(batched) and len(batched) + len(frozen) == 3
            and all(call.inputs[t].dim() == out_rank and call.inputs[t].shape[0] == n for t in batched)
            # shared by the samples, or a constant per sample (a padding mask), cut by sample
            and (self._batched_mask(call) is not None if batched_mask else (
                mask is None or mask.dim() < out_rank or mask.shape[0] == 1 or self._mask_per_sample(call) is not None))
        )

    @staticmethod
    def _batched_mask(call: Operation) -> Optional[int]:
        """The slot of an added mask computed from the batch, ``[N, H or 1, L, S]``: HF Swin's
        shift mask copied for every sample (``repeat``) plus the relative position bias, on
        windows merged with the batch axis. Sample ``n`` reads ``mask[n]``, as it reads ``q[n]``."""
        args = _bind(call, SDPA_ARGS, {"attn_mask": None})
        mask, q = args["attn_mask"], args.get("query")
        if not (isinstance(mask, Slot) and isinstance(q, Slot)) or call.input_kinds[mask] != BATCHED:
            return None
        m, x = call.inputs[mask], call.inputs[q]
        return mask if m.is_floating_point() and m.dim() == x.dim() and m.shape[0] == x.shape[0] else None

    @staticmethod
    def _mask_per_sample(call: Operation) -> Optional[int]:
        """The slot of a constant mask with one slice per sample, ``[N, H or 1, L, S]``
        (Hugging Face's padding mask): sample ``n`` reads ``mask[n]`` by broadcasting."""
        args = _bind(call, SDPA_ARGS, {"attn_mask": None})
        mask, q = args["attn_mask"], args.get("query")
        if not (isinstance(mask, Slot) and isinstance(q, Slot)) or call.input_kinds[mask] != CONST or call.batch_axes:
            return None
        m, x = call.inputs[mask], call.inputs[q]
        return mask if m.dim() == x.dim() and m.shape[0] == x.shape[0] and x.shape[0] > 1 else None

    @staticmethod
    def _frozen_per_sample(call: Operation) -> list[int]:
        """The slots among ``q``, ``k``, ``v`` of constants with one slice per sample: the keys
        and values of cross-attention to a frozen encoder (BART's or T5's decoder with the
        encoder frozen). The call pairs ``q[n]`` with ``k[n]`` and ``v[n]`` (equal leading axes
        are not broadcast), so sample ``n`` reads slice ``n`` of each."""
        if call.batch_axes is not None or not call.output_shapes[0]:
            return []
        args = _bind(call, SDPA_ARGS, {"attn_mask": None})
        out = call.output_shapes[0]
        return [
            t for t in (args.get(a) for a in SDPA_ARGS[:3])
            if isinstance(t, Slot) and call.input_kinds[t] == CONST
            and call.inputs[t].dim() == len(out) and call.inputs[t].shape[0] == out[0]
        ]

    def _sliced_slots(self, call: Operation) -> list[int]:
        slots = super()._sliced_slots(call)
        mask = self._mask_per_sample(call)
        cut = [*slots, *([] if mask is None else [mask]), *self._frozen_per_sample(call)]
        return sorted(set(cut))


class SplitAttentionFunction(AttentionFunction):
    """DiagGGNApprox through ``F.scaled_dot_product_attention`` counted as its operations.

    As :class:`~curvhook.rules.attention.SplitAttentionRule` does for
    ``nn.MultiheadAttention`` (``split_attention=True``, the default), the call
    counts as ``S = s q kᵀ + mask``, ``A = softmax(S)``, ``O = A v``, attention
    written out by hand, with only the diagonal kept between them (see
    :func:`~curvhook.rules.attention.attention_diagonals`). Forms it does not
    cover (dropout, a mask with grad that is not computed from parameters alone,
    inputs without their batch axis first) take the whole-operation rule; a
    constant mask, shared or with one slice per sample (a padding mask), is
    applied as the call broadcasts it. An added mask computed from parameters (T5's relative
    position bias) gets the diagonal at the scores (``∂S/∂mask = I``). Keys and values of a
    frozen encoder (constants with one slice per sample) are read, and get no diagonal.
    """

    def operations_rule(self) -> TensorOpRule:
        return self

    def _split(self, call: Operation, value: Any) -> Optional[dict[int, Tensor]]:
        """``{slot: [N, *x[1:]]}``: the diagonals at ``q``, ``k``, ``v`` (summed where one tensor is several)."""
        cached = call.scratch.attention
        if cached is not None and cached[0] == "sdpa_split" and cached[1] is value:
            return cached[2]
        args = _bind(call, SDPA_ARGS, {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None})
        slots = [args.get(a) for a in SDPA_ARGS[:3]]
        mask = args["attn_mask"]
        # an added mask computed from parameters (T5's relative position bias) gets the
        # diagonal at the scores, per sample, summed to its shape
        shared_mask = isinstance(mask, Slot) and call.input_kinds[mask] == SHARED and mask not in slots
        batched_mask = mask is not None and mask not in slots and self._batched_mask(call) == mask
        frozen = self._frozen_per_sample(call)
        if (
            isinstance(value, list) or not call.known_per_sample or call.batch_axes is not None
            # each of q, k, v batched, or a frozen constant with one slice per sample
            or not all(isinstance(t, Slot) and call.input_kinds[t] == BATCHED or t in frozen for t in slots)
            or not any(call.input_kinds[t] == BATCHED for t in slots)
            or (isinstance(mask, Slot) and call.input_kinds[mask] != CONST and not (shared_mask or batched_mask))
            or set(call.kwargs) - set(SDPA_ARGS) - {"enable_gqa"}
        ):
            return None
        q, k, v = (call.inputs[t].detach() for t in slots)
        mask_value = _value(call, mask)
        if shared_mask:
            mask_value = mask_value.detach()
            padded = (1,) * (value.dim() - mask_value.dim()) + tuple(mask_value.shape)
            if padded[0] != 1:  # a shared tensor along the batch axis: the generic rule
                return None
        elif batched_mask:
            mask_value = mask_value.detach()
        diags = attention_diagonals(
            q, k, v, value, mask_value, bool(args["is_causal"]), args["scale"], with_scores=shared_mask or batched_mask
        )
        results: dict[int, Tensor] = {}
        for t, d in zip(slots, diags):
            if call.input_kinds[t] == BATCHED:  # (a frozen key or value needs no diagonal)
                results[t] = d if t not in results else results[t] + d
        if shared_mask:
            d_s, n = diags[3], value.shape[0]
            results[mask] = d_s.sum_to_size(n, *padded[1:]).reshape(n, *mask_value.shape)
        elif batched_mask:  # ∂S/∂mask = I per sample, summed over the axes the mask is broadcast along
            results[mask] = diags[3].sum_to_size(mask_value.shape)
        call.scratch.attention = ("sdpa_split", value, results)
        return results

    def input_diag(self, call: Operation, value: Any, slot: int) -> Tensor:
        results = self._split(call, value)
        if results is None or slot not in results:
            return super().input_diag(call, value, slot)
        return results[slot]


SPLIT_SDPA = SplitAttentionFunction()


class ConvFunction(FunctionalRule):
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)``: the rule of
    ``nn.Conv*d`` (zero padding, an int, a tuple, ``'same'`` or ``'valid'``) on the module the
    call's arguments make. timm's ``Conv2dSame`` (TF's asymmetric 'same') pads with ``F.pad``
    and calls ``F.conv2d``; DiagGGNApprox without this rule took dense per-sample Jacobians."""

    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    rule = ConvRule()

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def module(self, call: Operation, args: dict) -> SimpleNamespace:
        d, conv = self.dims, getattr(F, f"conv{self.dims}d")
        weight, bias = _value(call, args["weight"]), _value(call, args["bias"])
        stride, dilation, groups = _ntuple(args["stride"], d), _ntuple(args["dilation"], d), args["groups"]
        padding = args["padding"] if isinstance(args["padding"], str) else _ntuple(args["padding"], d)
        return SimpleNamespace(
            weight=weight, bias=bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
            kernel_size=tuple(weight.shape[2:]), padding_mode="zeros",
            _conv_forward=lambda x, w, b: conv(x, w, b, stride, padding, dilation, groups),
        )

    def configuration_ok(self, call: Operation, args: dict) -> bool:
        w, b = _value(call, args["weight"]), _value(call, args["bias"])
        fixed = all(not isinstance(args[k], Slot) for k in ("stride", "padding", "dilation", "groups"))
        return (
            fixed and isinstance(w, Tensor) and w.dim() == self.dims + 2 and (b is None or b.dim() == 1)
            and call.inputs[args["input"]].dim() == self.dims + 2 and isinstance(args["groups"], int)
        )


    def input_diag(self, call: Operation, value, slot: int) -> Tensor:
        """A weight or bias computed from parameters (Mamba's causal convolution,
        ``F.conv1d(x, conv.weight.squeeze(1).unsqueeze(1), conv.bias, groups=C)``) gets its
        per-sample diagonal in closed form, like a parameter's: ``Σ_l d[n, o, l]`` for the
        bias; for the weight, ``Σ_l d[n, o, l] U[n, i, l]²`` (``U`` the patches), which is the
        weight gradient of one convolution with the samples stacked as groups: ``x²`` as its
        input ``[1, N·C, …]`` and ``d`` as its output gradient ``[1, N·O, …]``, ``N·groups``
        groups. Before session 45: dense per-sample Jacobians."""
        served = self._served(call, value)
        role = None if served is None else self._role(call, served[1], slot)
        if role is None or call.input_kinds[slot] == BATCHED:
            return super().input_diag(call, value, slot)
        if role == "bias":
            return value.flatten(2).sum(2)
        layer = served[0]
        x, padding, _ = _conv_geometry(layer)  # (asymmetric 'same' padded explicitly)
        module, n = layer.module, x.shape[0]
        weight = tuple(module.weight.shape)
        grad = _CONV_GRAD_WEIGHT[self.dims](
            x.square().reshape(1, -1, *x.shape[2:]), (n * weight[0], *weight[1:]),
            value.reshape(1, -1, *value.shape[2:]), module.stride, padding, module.dilation, n * module.groups,
        )
        return grad.reshape(n, *weight)


def _ntuple(value: Any, d: int) -> tuple:
    """``value`` for each of ``d`` axes, as torch reads it (an int or a one-element tuple: every axis)."""
    if isinstance(value, (tuple, list)):
        return tuple(value) * d if len(value) == 1 else tuple(value)
    return (value,) * d


class AvgPoolFunction(FunctionalRule):
    """``F.avg_pool{1,2,3}d(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
    divisor_override)`` and ``F.adaptive_avg_pool{1,2,3}d(x, output_size)``: the rules of
    ``nn.AvgPool*d`` and ``nn.AdaptiveAvgPool*d`` on the module the call's arguments make.
    (DiagGGNApprox without them took dense per-sample Jacobians: 5.4 GB for one 32-channel
    24×24 map of torchvision's Inception v3.)"""

    def __init__(
        self, module_type: type, names: tuple[str, ...], defaults: dict, rule: LayerRule, dims: int,
    ) -> None:
        self.module_type, self.names, self.defaults, self.rule, self.dims = module_type, names, defaults, rule, dims

    def module(self, call: Operation, args: dict) -> nn.Module:
        return self.module_type(**{k: _value(call, args[k]) for k in self.names[1:] if k in args})

    def configuration_ok(self, call: Operation, args: dict[str, Any]) -> bool:
        # ``[N, C, *spatial]``; one axis fewer is one sample without a batch axis to torch
        # (``F.max_pool1d(x.flatten(1), 2)`` pools ``[N, L]`` as channels): the generic path
        return call.inputs[args["input"]].dim() == self.dims + 2


_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_POOL_DEFAULTS = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True}


def _average_pools() -> dict[Callable, TensorOpRule]:
    rules: dict[Callable, TensorOpRule] = {}
    for dims, module_type in ((1, nn.AvgPool1d), (2, nn.AvgPool2d), (3, nn.AvgPool3d)):
        names = _POOL_ARGS if dims == 1 else (*_POOL_ARGS, "divisor_override")
        defaults = _POOL_DEFAULTS if dims == 1 else {**_POOL_DEFAULTS, "divisor_override": None}
        rules[getattr(F, f"avg_pool{dims}d")] = AvgPoolFunction(module_type, names, defaults, AvgPoolRule(), dims)
    for dims, module_type in ((1, nn.AdaptiveAvgPool1d), (2, nn.AdaptiveAvgPool2d), (3, nn.AdaptiveAvgPool3d)):
        rules[getattr(F, f"adaptive_avg_pool{dims}d")] = AvgPoolFunction(
            module_type, ("input", "output_size"), {}, AdaptiveAvgPoolRule(), dims
        )
    return rules


class MaxPoolFunction(AvgPoolFunction):
    """``F.max_pool{1,2,3}d(x, kernel_size, stride, padding, dilation, ceil_mode)``: the rule of
    ``nn.MaxPool*d`` (torchvision's Inception blocks call ``F.max_pool2d(x, 3, stride=2)`` in
    their ``forward``: dense per-sample Jacobians before session 42). With
    ``return_indices=True`` (two outputs): the generic path."""

    def configuration_ok(self, call: Operation, args: dict[str, Any]) -> bool:
        return super().configuration_ok(call, args) and not _value(call, args.get("return_indices", False))


def _max_pools() -> dict[Callable, TensorOpRule]:
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    defaults = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
    return {
        getattr(F, f"max_pool{dims}d"): MaxPoolFunction(module_type, names, defaults, MaxPoolRule(), dims)
        for dims, module_type in ((1, nn.MaxPool1d), (2, nn.MaxPool2d), (3, nn.MaxPool3d))
    }


class InterpolateFunction(FunctionalRule):
    """``F.interpolate(x, size, scale_factor, mode, align_corners, recompute_scale_factor,
    antialias)``: the rule of ``nn.Upsample`` on the module the call's arguments make (modes
    ``nearest``, ``nearest-exact``, ``linear``, ``bilinear``, ``bicubic``, ``trilinear``, without
    ``antialias``). GhostNetV2's attention upsamples its gate with ``F.interpolate``: dense
    per-sample Jacobians before session 44 (19 s against a 0.13 s plain step at 64×64)."""

    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
    defaults = {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
                "recompute_scale_factor": None, "antialias": False}
    rule = UpsampleRule()

    def module(self, call: Operation, args: dict) -> nn.Module:
        return nn.Upsample(**{k: _value(call, args[k]) for k in self.names[1:6]})

    def configuration_ok(self, call: Operation, args: dict[str, Any]) -> bool:
        return (
            not _value(call, args["antialias"]) and interpolates_separably(_value(call, args["mode"]))
            and call.inputs[args["input"]].dim() in (3, 4, 5)
            and not any(isinstance(args[k], Slot) for k in self.names[1:])
        )

    # A tensor without the batch axis (computed from parameters only: PVT's position table,
    # BEiT's relative-position table, resized): the same linear map for every sample, ``[1, C,
    # *in]`` or ``[C, *in]``-like with the leading axes of the columns merged into its first.
    def _shared_call(self, call: Operation, value: Any, slot: int) -> Optional[_ModuleCall]:
        """The module call of an interpolation of a tensor without the batch axis, where the
        module rule serves it; else ``None``."""
        if isinstance(value, list) or call.input_kinds[slot] == BATCHED or call.uses(slot) != 1:
            return None
        args = self.bound(call)
        if not (isinstance(args["input"], Slot) and args["input"] == slot and self.configuration_ok(call, args)):
            return None
        return _ModuleCall(call, self.module(call, args), call.inputs[slot].detach())

    def shared_jac_t_mat_prod(self, call: Operation, value: Any, slot: int) -> Tensor:
        """``Aᵀ m`` for every column and sample, ``[V, N, *out] → [V, N, *in]``: one autograd transpose."""
        served = self._shared_call(call, value, slot)
        if served is None:
            return super().shared_jac_t_mat_prod(call, value, slot)
        x = served.input
        lead = value.dim() - x.dim()
        return linear_vjp(served, value.flatten(0, lead)).reshape(*value.shape[:lead], *x.shape)

    def input_jac_t_mat_prod(self, call: Operation, value: Any, slot: int) -> Tensor:
        if self._shared_call(call, value, slot) is not None:
            return self.shared_jac_t_mat_prod(call, value, slot)
        return super().input_jac_t_mat_prod(call, value, slot)

    def input_diag(self, call: Operation, value: Any, slot: int) -> Tensor:
        """For a tensor without the batch axis, ``Σ_o d_no A_oi²`` per sample ``[N, *out] → [N, *in]``
        by the separable closed form of ``nn.Upsample`` (before session 46, dense Jacobians of the
        whole map: 15.7 GB for PVT's 56×56×64 table)."""
        served = self._shared_call(call, value, slot)
        if served is None:
            return super().input_diag(call, value, slot)
        x = served.input
        lead = value.dim() - x.dim()
        return self.rule.diag_jac_t_diag_jac(served, value.flatten(0, lead)).reshape(*value.shape[:lead], *x.shape)

    # A parameter interpolated directly: its products go through ``shared_jac_t_mat_prod`` (the
    # tensor-operation rule's ``param_jac_t_mat_prod``); its diagonal is the shared input's summed
    # over the samples (``param_diag``: ``[N, *out] → [*w]``).
    def param_diag(self, call: Operation, name: str, diag: Any) -> Tensor:
        slot = call.slot_of(name)
        if self._shared_call(call, diag, slot) is not None:
            return self.input_diag(call, diag, slot).sum(0)
        return super().param_diag(call, name, diag)


FUNCTIONAL_RULES: dict[Callable, TensorOpRule] = {
    F.interpolate: InterpolateFunction(),
    F.batch_norm: BatchNormFunction(),
    F.layer_norm: LayerNormFunction(),
    F.group_norm: GroupNormFunction(),
    F.linear: LinearFunction(),
    torch.addmm: AddmmFunction(),
    F.embedding: EmbeddingFunction(),
    F.scaled_dot_product_attention: AttentionFunction(),
    **_average_pools(),
    **_max_pools(),
    F.conv1d: ConvFunction(1),
    F.conv2d: ConvFunction(2),
    F.conv3d: ConvFunction(3),
}
FUNCTIONAL_RULES[torch.baddbmm] = FUNCTIONAL_RULES[torch.Tensor.baddbmm] = BaddbmmFunction()
FUNCTIONAL_RULES[torch.addcmul] = FUNCTIONAL_RULES[torch.Tensor.addcmul] = AddcmulFunction(divide=False)
FUNCTIONAL_RULES[torch.addcdiv] = FUNCTIONAL_RULES[torch.Tensor.addcdiv] = AddcmulFunction(divide=True)
if hasattr(F, "rms_norm"):  # torch >= 2.4
    FUNCTIONAL_RULES[F.rms_norm] = RMSNormFunction()
