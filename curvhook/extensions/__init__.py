"""The curvature extensions: one file each."""

from curvhook.extensions.base import Extension
from curvhook.extensions.batch_jacobian import BatchJacobian
from curvhook.extensions.diag_ggn import DiagGGN
from curvhook.extensions.diag_ggn_approx import DiagGGNApprox
from curvhook.extensions.diag_ggn_mc import DiagGGNMC
from curvhook.extensions.full_ggn import FullGGN
from curvhook.extensions.kfac import KFAC, kfac_dense

__all__ = ["BatchJacobian", "DiagGGN", "DiagGGNApprox", "DiagGGNMC", "Extension", "FullGGN", "KFAC", "kfac_dense"]
