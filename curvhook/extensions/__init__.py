"""The curvature extensions: one file each."""

from curvhook.extensions.base import Extension
from curvhook.extensions.batch_grad import BatchGrad
from curvhook.extensions.batch_jacobian import BatchJacobian
from curvhook.extensions.batch_l2_grad import BatchL2Grad
from curvhook.extensions.diag_ggn import DiagGGN
from curvhook.extensions.diag_ggn_approx import DiagGGNApprox
from curvhook.extensions.diag_ggn_mc import DiagGGNMC
from curvhook.extensions.full_ggn import FullGGN
from curvhook.extensions.ggn_vector_product import GGNVectorProduct
from curvhook.extensions.kfac import KFAC, kfac_dense
from curvhook.extensions.low_rank_ggn import LowRankGGN
from curvhook.extensions.ntk import NTK
from curvhook.extensions.output_covariance import OutputCovariance
from curvhook.extensions.sum_grad_squared import SumGradSquared

__all__ = [
    "BatchGrad", "BatchJacobian", "BatchL2Grad", "DiagGGN", "DiagGGNApprox", "DiagGGNMC", "Extension", "FullGGN",
    "GGNVectorProduct", "KFAC", "LowRankGGN", "NTK", "OutputCovariance", "SumGradSquared", "kfac_dense",
]
