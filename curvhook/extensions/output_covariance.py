"""OutputCovariance: ``J_n Σ J_nᵀ`` per sample, the covariance of the linearised outputs.

For a Gaussian over the weights with covariance ``Σ`` (a Laplace posterior),
the linearised model output of sample ``n`` has covariance ``J_n Σ J_nᵀ``,
``[C, C]``. The identity columns ``e_c`` are backpropagated; with ``Σ``
block-diagonal over the parameters each operation contributes
``(J_θᵀ e_cn)ᵀ Σ_θ (J_θᵀ e_dn)``, contracted by the rules without forming the
products where the layer has structure
(:meth:`~curvhook.rules.base.LayerRule.param_metric_gram`). A dense ``Σ``
couples the parameters, so there the products of every parameter are formed.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from curvhook.errors import CurvhookError
from curvhook.extensions.base import Extension
from curvhook.records import Operation
from curvhook.rules.base import LayerRule, metric_gram_of_products
from curvhook.sources import JacobianColumns

Covariance = Union[Tensor, dict]


class OutputCovariance(Extension):
    """Writes ``OutputCovariance.covariance``, ``[N, C, C]``: ``J_n Σ J_nᵀ`` for every sample.

    ``C`` is the number of output entries of one sample (flattened). No loss is
    needed: backward may start at ``model(X).sum()``.

    Args:
        cov: The weight covariance ``Σ`` over the trainable parameters, one of

            - a dict from every trainable parameter to its block: a tensor shaped like
              the parameter (a diagonal), or Kronecker factors ``(A, B)`` in the layout
              ``KFAC`` writes (``Σ_p = torch.kron(B, A)`` in ``p.flatten()`` order; ``A``
              is ``[[1]]`` for a bias); the two kinds may be mixed. The Jacobian is never
              formed for the layers with structure (linear layers, convolutions).
            - a dense ``[P, P]`` tensor in ``model.parameters()`` order (trainable
              parameters only). The Jacobian ``[N, C, P]`` is formed.

    Example::

        ext = OutputCovariance({p: var for p, var in zip(model.parameters(), variances)})
        with extend(model, ext):
            model(X).sum().backward()
        ext.covariance  # [N, C, C]

    With ``accumulate=True`` the covariances of successive batches are
    concatenated along the sample axis.
    """

    attribute = "output_covariance"
    loss_power = 0
    source_type = JacobianColumns

    def __init__(self, cov: Covariance) -> None:
        super().__init__()
        if isinstance(cov, Tensor):
            if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
                raise ValueError(f"A dense covariance must be [P, P]; got shape {tuple(cov.shape)}.")
        elif isinstance(cov, dict):
            for p, block in cov.items():
                _check_block(p, block)
        else:
            raise TypeError(
                "OutputCovariance(cov) takes a dict {parameter: diagonal or (A, B)} or a dense "
                f"[P, P] tensor; got {type(cov).__name__}."
            )
        self.cov = cov
        self._blocks = {id(p): block for p, block in cov.items()} if isinstance(cov, dict) else {}
        self.covariance: Optional[Tensor] = None

    @property
    def dense(self) -> bool:
        return isinstance(self.cov, Tensor)

    def _metric(self, p: nn.Parameter, like: Tensor):
        block = self._blocks[id(p)]
        if isinstance(block, tuple):
            return tuple(f.to(like.dtype) for f in block)
        return block.to(like.dtype)

    def param_term(self, rule: LayerRule, op: Operation, name: str, value: Tensor, shared: bool) -> Tensor:
        p = dict(op.params)[name]
        if self.dense or shared or id(p) not in self._blocks:  # products: summed over uses, or coupled by Σ
            return rule.param_jac_t_mat_prod(op, name, value)
        return rule.param_metric_gram(op, name, value, self._metric(p, value))

    def finalize(self, totals: dict, shared: frozenset[int], params: list[nn.Parameter], root: Tensor) -> Tensor:
        n, c = root.shape[0], root[0].numel()
        if self.dense:
            return self._dense(totals, params, n, c, root)
        missing = [i for i, p in enumerate(params) if id(p) not in self._blocks]
        if missing:
            raise CurvhookError(
                f"OutputCovariance: the covariance dict has no block for trainable parameters at positions "
                f"{missing} of model.parameters() (shapes {[tuple(params[i].shape) for i in missing]}). Give "
                "every trainable parameter a block (zeros for one you hold fixed), or freeze it."
            )
        out = root.new_zeros(n, c, c)
        for p in params:
            term = totals.get(id(p))
            if term is not None:
                out += metric_gram_of_products(term, self._metric(p, term)) if id(p) in shared else term
        return out

    def _dense(self, totals: dict, params: list[nn.Parameter], n: int, c: int, root: Tensor) -> Tensor:
        sizes = [p.numel() for p in params]
        if self.cov.shape[0] != sum(sizes):
            raise CurvhookError(
                f"OutputCovariance: the dense covariance is {tuple(self.cov.shape)}, but the model has "
                f"P = {sum(sizes)} trainable parameters."
            )
        jac = root.new_zeros(c, n, sum(sizes))  # [C, N, P]
        start = 0
        for p, size in zip(params, sizes):
            term = totals.get(id(p))
            if term is not None:
                jac[:, :, start : start + size] = term.reshape(*term.shape[:2], -1)
            start += size
        flat = jac.flatten(0, 1)  # [(C N), P]
        weighted = (flat @ self.cov.to(flat.dtype)).view(c, n, -1)
        return torch.einsum("cnp,dnp->ncd", weighted, jac)

    def reset(self, params: list[nn.Parameter]) -> None:
        super().reset(params)
        self.covariance = None

    def write(self, results: Tensor, params: list[nn.Parameter], accumulate: bool) -> None:
        dtype = params[0].dtype if params else results.dtype
        value = results.to(dtype)
        self.covariance = torch.cat([self.covariance, value]) if accumulate and self.covariance is not None else value

    def reduce_across_processes(self, params: list[nn.Parameter], group=None) -> None:
        from curvhook import distributed

        if self.covariance is not None:
            (self.covariance,) = distributed.concatenate([self.covariance], group)

    def result_bytes(self, params: list[nn.Parameter]) -> int:
        return 0 if self.covariance is None else self.covariance.untyped_storage().nbytes()


def _check_block(p: nn.Parameter, block) -> None:
    if isinstance(block, Tensor):
        if block.shape != p.shape:
            raise ValueError(f"A diagonal covariance block must be shaped like its parameter {tuple(p.shape)}; got {tuple(block.shape)}.")
        return
    if not (isinstance(block, tuple) and len(block) == 2 and all(isinstance(f, Tensor) for f in block)):
        raise TypeError("A covariance block is a tensor shaped like the parameter (diagonal) or a pair (A, B).")
    a_factor, b_factor = block
    rows = p.shape[0] if p.dim() else 1
    cols = p.numel() // max(rows, 1)
    if a_factor.shape != (cols, cols) or b_factor.shape != (rows, rows):
        raise ValueError(
            f"Kronecker factors (A, B) of a parameter of shape {tuple(p.shape)} must be A [{cols}, {cols}] and "
            f"B [{rows}, {rows}] (Σ_p = kron(B, A) in p.flatten() order, as KFAC writes p.kfac); got "
            f"{tuple(a_factor.shape)} and {tuple(b_factor.shape)}."
        )
