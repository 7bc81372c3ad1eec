"""DiagGGNMC: a Monte-Carlo estimate of the GGN diagonal.

``diag( (1/M) Σ_m Σ_n J_nᵀ s_nm s_nmᵀ J_n )`` with sampled columns ``s_nm``,
``E[s sᵀ] = H_n`` (:class:`~curvhook.sources.SampledLossHessianSqrt`): the
gradient of the loss at targets drawn from the model's own predictive
distribution, scaled for the reduction. The columns travel backward exactly as
DiagGGN's square-root factor does, scaled by ``1/√M``, so DiagGGN's parameter
products (``param_sq_sum``) give the average over the ``M`` samples: an unbiased
estimate of ``diag(G)`` from ``M`` columns instead of ``V`` (``C - 1`` for
cross-entropy).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from curvhook.extensions.diag_ggn import DiagGGN
from curvhook.sources import SampledLossHessianSqrt, Source


def check_mc_samples(mc_samples: object) -> int:
    """``mc_samples`` as a positive ``int``, or a ``ValueError`` saying what is wanted."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}.")
    return mc_samples


def check_generator(generator: object) -> Optional[torch.Generator]:
    """``generator`` if it is ``None`` or a ``torch.Generator``, else a ``TypeError``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}.")
    return generator


class DiagGGNMC(DiagGGN):
    """Writes ``p.diag_ggn_mc``, shaped like ``p``: the Monte-Carlo GGN diagonal.

    Args:
        mc_samples: ``M``, the sampled columns per sample (one backward walk carries all).
        generator: A ``torch.Generator`` on the model's device for reproducible
            draws; ``None`` uses torch's default generator (``torch.manual_seed``).
        loss: See :class:`~curvhook.extensions.base.Extension`.

    Example::

        g = torch.Generator().manual_seed(0)
        with extend(model, DiagGGNMC(mc_samples=1, generator=g)):
            criterion(model(X), y).backward()
        p.diag_ggn_mc  # E[p.diag_ggn_mc] = p.diag_ggn
    """

    attribute = "diag_ggn_mc"
    source_type = SampledLossHessianSqrt

    def __init__(
        self, mc_samples: int = 1, generator: Optional[torch.Generator] = None, loss: Optional[nn.Module] = None
    ) -> None:
        super().__init__(loss)
        self.mc_samples = check_mc_samples(mc_samples)
        self.generator = check_generator(generator)

    @property
    def source(self) -> Source:
        return SampledLossHessianSqrt(self.loss, self.mc_samples, self.generator)

    def _options(self) -> list[str]:
        options = [f"mc_samples={self.mc_samples}"]
        if self.generator is not None:
            options.append(f"generator={self.generator!r}")
        return options + super()._options()
