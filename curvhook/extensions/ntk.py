"""NTK: the empirical neural tangent kernel of a batch, without Jacobians.

``K[n, c, m, d] = Σ_p J[n, c, p] J[m, d, p]`` over all trainable parameters,
with ``J[n, c, :]`` the gradient of output entry ``c`` of sample ``n``. The
identity columns ``e_c`` are backpropagated (as for BatchJacobian); each
operation contributes the Gram matrix of its parameter products,
``⟨J_θᵀ e_cn, J_θᵀ e_dm⟩``, which the rules contract without forming the
products where the layer has structure (``nn.Linear`` without positions:
``(e_cn·e_dm)(x_n·x_m)``, two small Gram matrices; see
:meth:`~curvhook.rules.base.LayerRule.param_gram`). A parameter used by several
operations sums its products over the uses first.
"""

from __future__ import annotations

from typing import Optional

from einops import rearrange
from torch import Tensor, nn

from curvhook.errors import CurvhookError
from curvhook.extensions.base import Extension
from curvhook.records import Operation
from curvhook.rules.base import LayerRule
from curvhook.sources import JacobianColumns

_SUM = "sum"  # the key of the running sum of the Gram matrices in ``totals``


def gram_of_products(products: Tensor) -> Tensor:
    """``[V, N, *θ]`` products → their Gram matrix ``[V·N, V·N]``."""
    flat = products.reshape(*products.shape[:2], -1).flatten(0, 1)
    return flat @ flat.T


def summed_grams(totals: dict, shared: frozenset[int], params: list[nn.Parameter], size: int, like: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
    """The Gram matrices of every parameter, and their sum, from the terms of a walk.

    Args:
        totals: By ``id(p)``: a Gram matrix ``[V·N, V·N]``, or for a shared parameter
            its summed products ``[V, N, *θ]``; under ``_SUM`` a running sum of Gram
            matrices not kept per parameter.
        shared: ``id`` of the parameters used by several operations.
        params: The trainable parameters.
        size: ``V·N``.
        like: A tensor of the dtype and device of the result.

    Returns:
        The sum ``[V·N, V·N]`` and the Gram matrix of each parameter kept in ``totals``.
    """
    total = totals.get(_SUM)
    each = {}
    for p in params:
        term = totals.get(id(p))
        if term is None:
            continue
        each[id(p)] = gram_of_products(term) if id(p) in shared else term
        total = each[id(p)].clone() if total is None else total.add_(each[id(p)])
    if total is None:
        total = like.new_zeros(size, size)
    return total, each


class NTK(Extension):
    """Writes ``NTK.matrix``, ``[N, C, N, C]``: the empirical NTK of the batch.

    ``C`` is the number of output entries of one sample (flattened, as for
    ``BatchJacobian``). No loss is needed: backward may start at
    ``model(X).sum()``. The Jacobian ``[N, C, P]`` is never formed.

    Args:
        per_parameter: Also write ``p.ntk``, ``[N, C, N, C]``: the share of each
            parameter (the sum over its entries only); the shares sum to ``matrix``.

    Example::

        ntk = NTK()
        with extend(model, ntk):
            model(X).sum().backward()
        K = ntk.matrix.flatten(0, 1).flatten(1)  # [N·C, N·C]

    The kernel couples the samples of one batch: it is refused with
    ``accumulate=True`` and for several forward passes reached by one backward.
    """

    attribute = "ntk"
    loss_power = 0
    accumulates = False
    distributes = False
    source_type = JacobianColumns

    def __init__(self, per_parameter: bool = False) -> None:
        super().__init__()
        self.per_parameter = per_parameter
        self.matrix: Optional[Tensor] = None

    def param_term(self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool) -> Tensor:
        if shared:  # the products are summed over the uses before the Gram matrix
            return rule.param_jac_t_mat_prod(op, name, value)
        return rule.param_gram(op, name, value)

    def add_term(self, totals: dict, p: nn.Parameter, term: Tensor) -> None:
        if self.per_parameter or term.dim() != 2:
            return super().add_term(totals, p, term)
        old = totals.get(_SUM)  # one running sum: no kernel per parameter is held
        totals[_SUM] = term if old is None else old.add_(term)

    def finalize(self, totals: dict, shared: frozenset[int], params: list[nn.Parameter], root: Tensor) -> tuple:
        n, c = root.shape[0], root[0].numel()
        total, each = summed_grams(totals, shared, params, c * n, root)
        as_kernel = lambda g: rearrange(g.view(c, n, c, n), "c n d m -> n c m d")  # noqa: E731
        per_param = {pid: as_kernel(g) for pid, g in each.items()} if self.per_parameter else {}
        return as_kernel(total), per_param, (n, c)

    def reset(self, params: list[nn.Parameter]) -> None:
        super().reset(params)
        self.matrix = None

    def write(self, results: tuple, params: list[nn.Parameter], accumulate: bool) -> None:
        matrix, per_param, (n, c) = results
        if accumulate and self.matrix is not None:
            raise CurvhookError(
                "NTK is the kernel of one batch: the samples of two backward passes (accumulate=True) "
                "or of two forward passes reached by one backward have no cross terms. Pass one "
                "batch through the model, or run one extend block per batch."
            )
        dtype = params[0].dtype if params else matrix.dtype
        self.matrix = matrix.to(dtype)
        if self.per_parameter:
            for p in params:
                value = per_param.get(id(p))
                setattr(p, self.attribute, matrix.new_zeros(n, c, n, c, dtype=dtype) if value is None else value.to(dtype))

    def result_bytes(self, params: list[nn.Parameter]) -> int:
        own = 0 if self.matrix is None else self.matrix.untyped_storage().nbytes()
        return own + super().result_bytes(params)
