"""Curvature backends for laplace-torch, computed by curvhook.

``CurvhookGGN`` and ``CurvhookEF`` implement laplace-torch's curvature
interface (``laplace.curvature.GGNInterface`` and ``EFInterface``) with
curvhook's extensions, so that any model curvhook supports (residual
networks, normalisation layers, custom glue between modules) can be given a
Laplace posterior::

    from laplace import Laplace
    from curvhook.integrations.laplace import CurvhookGGN

    la = Laplace(model, "classification", subset_of_weights="all",
                 hessian_structure="full", backend=CurvhookGGN)
    la.fit(train_loader)

Conventions, as laplace's other backends: the curvature is that of
``backend.lossfunc`` with ``reduction="sum"`` (``CrossEntropyLoss`` or
``MSELoss``), multiplied by ``backend.factor`` (``1`` for classification,
``1/2`` for regression, so that ``MSELoss`` becomes the Gaussian negative
log-likelihood with unit noise). Every backward pass is
``torch.autograd.grad``, so ``p.grad`` is never touched, and the results
curvhook writes on the parameters are removed again (``curvhook.clear``).

Which extension serves which method (docs/laplace.md has the details):

| method | curvhook |
|---|---|
| ``jacobians`` | ``BatchJacobian`` (``enable_backprop=True``: torch.func) |
| ``gradients`` | ``BatchGrad`` |
| ``CurvhookGGN.diag`` / ``full`` / ``kron`` | ``DiagGGN`` / ``FullGGN`` / ``KFAC`` |
| ``stochastic=True`` | ``DiagGGNMC`` / sampled columns / ``KFAC(mc_samples)`` |
| ``CurvhookEF.diag`` / ``full`` / ``kron`` | ``SumGradSquared`` / ``BatchGrad`` / ``KFAC`` |
| ``functional_variance`` | ``OutputCovariance`` |
| ``ntk`` | ``NTK`` |
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

try:
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
    from laplace.utils import Kron
except ImportError as error:  # pragma: no cover - exercised only without laplace-torch
    raise ImportError(
        "curvhook.integrations.laplace needs laplace-torch: pip install laplace-torch"
    ) from error

import curvhook
from curvhook.extensions import (
    KFAC,
    NTK,
    BatchGrad,
    BatchJacobian,
    DiagGGN,
    DiagGGNMC,
    FullGGN,
    OutputCovariance,
    SumGradSquared,
)

__all__ = ["CurvhookInterface", "CurvhookGGN", "CurvhookEF", "functional_variance"]

Inputs = Union[Tensor, MutableMapping]
Objective = Callable[[Tensor], Tensor]
Covariance = Union[Tensor, dict]

_SQUARED_SUM = nn.MSELoss(reduction="sum")


class CurvhookInterface(CurvatureInterface):
    """What ``CurvhookGGN`` and ``CurvhookEF`` share: running curvhook, Jacobians, gradients.

    Args:
        model: The network, or laplace's ``FeatureExtractor`` for last-layer Laplace.
        likelihood: ``"classification"`` or ``"regression"``.
        last_layer: Curvature of the last layer only (its input is the detached
            feature of ``model.forward_with_features``).
        subnetwork_indices: ``[S]`` indices into the flattened trainable parameters:
            the results are restricted to them (laplace's ``SubnetLaplace``).
        dict_key_x: Key of the input tensor in dict inputs.
        dict_key_y: Key of the targets in dict inputs.
    """

    # ------------------------------------------------------------ running curvhook

    def _module_and_input(self, x: Inputs) -> tuple[nn.Module, Inputs]:
        """The module curvhook extends and its input: the model, or its last layer on features."""
        if self.last_layer:
            _, features = self.model.forward_with_features(x)
            return self._model, features.detach()
        return self.model, x

    def _run(self, extensions: list, x: Inputs, objective: Objective) -> tuple[Tensor, Tensor]:
        """One forward pass and one ``torch.autograd.grad`` of ``objective(output)`` with curvhook.

        Args:
            extensions: curvhook extensions; their results are read off ``self.params``
                by the caller and removed from the parameters afterwards.
            x: Model input, ``[N, *in]`` (or a dict).
            objective: Maps the output ``[N, *out]`` to the scalar that is differentiated.

        Returns:
            The output ``[N, *out]`` and the scalar, both detached.
        """
        module, inputs = self._module_and_input(x)
        with curvhook.extend(module, *extensions):
            output = module(inputs)
            scalar = objective(output)
            torch.autograd.grad(scalar, self.params, allow_unused=True)
        return output.detach(), scalar.detach()

    def _read(self, attribute: str, shape: Callable[[nn.Parameter], tuple]) -> list[Tensor]:
        """Takes ``attribute`` off every trainable parameter (zeros where the backward did not reach it)."""
        results = []
        for p in self.params:
            value = getattr(p, attribute, None)
            results.append(value if value is not None else p.new_zeros(shape(p)))
        return results

    def _clear(self) -> None:
        """Removes the results curvhook left on the parameters."""
        curvhook.clear(self._model)

    def _loss(self, output: Tensor, y: Tensor) -> Tensor:
        """``lossfunc(output, y)``; class scores ``[N, *, C]`` are flattened to ``[N·*, C]``."""
        if self.likelihood == "classification" and output.ndim > 2 and y.dtype in (torch.long, torch.int):
            return self.lossfunc(output.reshape(-1, output.shape[-1]), y.reshape(-1))
        return self.lossfunc(output, y)

    def _restrict(self, vector: Tensor) -> Tensor:
        """``vector[..., subnetwork_indices]`` (the last axis indexes parameters)."""
        return vector if self.subnetwork_indices is None else vector[..., self.subnetwork_indices]

    def _output_gradient(self, output: Tensor, y: Tensor) -> Tensor:
        """``∂ lossfunc / ∂f_n`` per sample, ``[N, C]``, from the detached output ``[N, *out]``."""
        f = output.detach().reshape(output.shape[0], -1)
        if self.likelihood == "regression":
            return 2.0 * (f - y.reshape(f.shape).to(f.dtype))
        probs = torch.softmax(f, dim=-1)
        if y.dtype.is_floating_point:  # class probabilities as targets
            return probs - y.reshape(f.shape).to(f.dtype)
        return probs - nn.functional.one_hot(y.reshape(-1), f.shape[-1]).to(f.dtype)

    def _sampled_columns(self, output: Tensor, mc_samples: int) -> Tensor:
        """Columns ``s`` with ``E[s sᵀ] = ∂² lossfunc / ∂f_n²``, ``[N, M, C]``.

        Classification: ``s = p - e_ŷ`` with ``ŷ ~ Categorical(softmax f)``;
        regression (``MSELoss``, Hessian ``2 I``): ``s = √2 ε``, ``ε ~ N(0, I)``.
        """
        f = output.detach().reshape(output.shape[0], -1)
        n, c = f.shape
        if self.likelihood == "regression":
            return 2.0**0.5 * torch.randn(n, mc_samples, c, dtype=f.dtype, device=f.device)
        probs = torch.softmax(f, dim=-1)
        labels = torch.multinomial(probs, mc_samples, replacement=True)  # [N, M]
        return probs.unsqueeze(1) - nn.functional.one_hot(labels, c).to(f.dtype)

    @staticmethod
    def _projected_squares(columns: Tensor) -> Objective:
        """The objective ``Σ_{n,m} (s_nmᵀ f_n)²`` for constant columns ``s``, ``[N, M, C]``.

        Its GGN is ``2 Σ_{n,m} J_nᵀ s_nm s_nmᵀ J_n``: with ``s`` the output gradients
        this is twice the empirical Fisher, with sampled columns ``2 M`` times the
        Monte-Carlo Fisher. curvhook counts the product with ``s`` and the sum as
        operations after the model, so the squared loss is all it needs to know.
        """

        def objective(output: Tensor) -> Tensor:
            projected = (output.reshape(output.shape[0], 1, -1) * columns).sum(-1)  # [N, M]
            return _SQUARED_SUM(projected, torch.zeros_like(projected))

        return objective

    # ------------------------------------------------------------ Jacobians and gradients

    def jacobians(self, x: Inputs, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians of the model output from curvhook's ``BatchJacobian``.

        With ``enable_backprop=True`` the result must be differentiable (with respect
        to ``x`` and the parameters), which curvhook's results are not: laplace's
        torch.func implementation (``CurvatureInterface.jacobians``) computes it.

        Args:
            x: Input ``[N, *in]`` (or a dict).
            enable_backprop: Keep the graph through the Jacobians and the output.

        Returns:
            Jacobians ``[N, C, P]`` (``[N, C, S]`` for a subnetwork) and the output ``[N, C]``.
        """
        if enable_backprop:
            return CurvatureInterface.jacobians(self, x, enable_backprop=True)
        output, _ = self._run([BatchJacobian()], x, lambda out: out.sum())
        n = output.shape[0]
        parts = self._read("batch_jacobian", lambda p: (n, output[0].numel(), *p.shape))
        self._clear()
        jacobian = torch.cat([part.reshape(n, part.shape[1], -1) for part in parts], dim=2)
        return self._restrict(jacobian), output

    def selected_output_jacobians(
        self, x: Inputs, outputs: Tensor, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians of selected outputs, one ``BatchGrad`` pass per selected column.

        The full ``[N, C, P]`` Jacobian is never formed: column ``k`` is the
        per-sample gradient of ``Σ_n f[n, outputs[n, k]]``.

        Args:
            x: Input ``[N, *in]``.
            outputs: Output indices ``[N]`` or ``[N, K]``.
            enable_backprop: As in ``jacobians`` (then laplace's torch.func default runs).

        Returns:
            Jacobians ``[N, K, P]`` and the output ``[N, C]``.
        """
        if enable_backprop:
            return CurvatureInterface.selected_output_jacobians(self, x, outputs, enable_backprop=True)
        if outputs.ndim == 1:
            outputs = outputs[:, None]
        columns, output = [], None
        for k in range(outputs.shape[1]):
            index = outputs[:, k : k + 1].to(dtype=torch.long)
            output, _ = self._run(
                [BatchGrad()], x, lambda out: out.gather(1, index.to(out.device)).sum()
            )
            if index.shape[0] != output.shape[0]:
                raise ValueError("Output selectors must match the input batch size.")
            grads = self._read("grad_batch", lambda p: (output.shape[0], *p.shape))
            columns.append(torch.cat([g.flatten(1) for g in grads], dim=1))
        self._clear()
        return self._restrict(torch.stack(columns, dim=1)), output

    def gradients(self, x: Inputs, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of ``lossfunc`` from curvhook's ``BatchGrad``.

        Args:
            x: Input ``[N, *in]``.
            y: Targets ``[N]`` (classes) or ``[N, C]``.

        Returns:
            Gradients ``[N, P]`` (``[N, S]`` for a subnetwork) and the loss (without ``factor``).
        """
        output, loss = self._run([BatchGrad()], x, lambda out: self._loss(out, y))
        grads = self._read("grad_batch", lambda p: (output.shape[0], *p.shape))
        self._clear()
        return self._restrict(torch.cat([g.flatten(1) for g in grads], dim=1)), loss

    # ------------------------------------------------------------ products without Jacobians

    def functional_variance(self, x: Inputs, cov: Covariance) -> Tensor:
        """``J_n Σ J_nᵀ`` per sample from curvhook's ``OutputCovariance``.

        laplace computes the GLM predictive's variance itself, from the Jacobians
        ``jacobians`` returns (``BaseLaplace.functional_variance(Js)``); this method
        (and the module-level ``functional_variance(la, x)``, which builds ``Σ``
        from a fitted Laplace object) gives the same numbers without forming them.

        Args:
            x: Input ``[N, *in]``.
            cov: A dict from each trainable parameter to its diagonal covariance
                (shaped like it) or Kronecker factors ``(A, B)`` in curvhook's KFAC
                layout, or a dense ``[P, P]`` covariance (docs/mathematics.md).

        Returns:
            ``[N, C, C]``.
        """
        extension = OutputCovariance(cov)
        self._run([extension], x, lambda out: out.sum())
        self._clear()
        return extension.covariance

    def ntk(self, x: Inputs) -> Tensor:
        """The empirical NTK Gram matrix of a batch from curvhook's ``NTK``.

        ``K[n·C + c, m·C + d] = Σ_p J[n, c, p] J[m, d, p]``, laplace's ``FunctionalLaplace``
        layout (``independent_outputs=False``); the Jacobian is not formed.
        ``FunctionalLaplace`` builds its kernels from ``jacobians`` across batches
        and does not call a backend for them, so this is a helper.

        Args:
            x: Input ``[N, *in]``.

        Returns:
            ``[N·C, N·C]``.
        """
        extension = NTK()
        output, _ = self._run([extension], x, lambda out: out.sum())
        self._clear()
        size = output[0].numel() * output.shape[0]
        return extension.matrix.reshape(size, size)

    # ------------------------------------------------------------ Kronecker factors

    def _kron(
        self, kfac: KFAC, diagonal: DiagGGN, x: Inputs, objective: Objective, N: int
    ) -> tuple[Tensor, Kron]:
        """Runs ``kfac`` and ``diagonal`` and converts to laplace's ``Kron`` (before ``factor``).

        Per trainable parameter, in ``self.params`` order:

        - weight of ``nn.Linear``/convolution: ``[B, A · M/N]``. curvhook's ``A`` is the
          mean over the ``M`` samples of the batch and ``B`` the sum, so ``B ⊗ A``
          approximates the batch's GGN; laplace sums the ``Kron`` of its batches
          factor by factor, so ``A`` is rescaled to a mean over all ``N`` data.
          One ``1 × 1`` weight gets the one block ``[B A M/N]``.
        - bias (``A = [[1]]``): ``[B]``, a sum over the batch as it is.
        - any other one-dimensional parameter (normalisation layers): ``[diag(d)]``,
          ``d`` its exact GGN diagonal from ``diagonal``.
        - other parameters have no Kronecker structure in curvhook: ValueError.

        Returns:
            The output ``[N, *out]`` and the ``Kron``.
        """
        output, _ = self._run([kfac, diagonal], x, objective)
        batch = output.shape[0]
        blocks = []
        for p in self.params:
            factors = getattr(p, "kfac", None)
            if factors is not None:
                a, b = factors
                if a.numel() == 1 and p.ndim == 1:  # bias
                    blocks.append([b])
                elif a.numel() == 1 and b.numel() == 1:
                    blocks.append([b * a * (batch / N)])
                else:
                    blocks.append([b, a * (batch / N)])
            elif p.ndim == 1:
                d = getattr(p, diagonal.attribute, None)
                blocks.append([torch.diag(d if d is not None else torch.zeros_like(p))])
            else:
                self._clear()
                raise ValueError(
                    f"Parameter of shape {tuple(p.shape)} has no Kronecker factors: curvhook's KFAC covers "
                    "nn.Linear and nn.Conv1d/2d/3d (groups=1). Use hessian_structure='diag' or 'full', "
                    "or freeze the parameter."
                )
        self._clear()
        return output, Kron(blocks)


class CurvhookGGN(CurvhookInterface, GGNInterface):
    """laplace-torch's ``GGNInterface`` from curvhook: the exact GGN, or the Monte-Carlo Fisher.

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y:
            As ``CurvhookInterface``.
        stochastic: Monte-Carlo Fisher (sampled columns) instead of the exact GGN.
        num_samples: Columns per sample when ``stochastic``; a ``mc_samples`` keyword
            of ``diag``/``full``/``kron`` overrides it (curvlinops' spelling).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: Optional[torch.LongTensor] = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
    ) -> None:
        GGNInterface.__init__(
            self, model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y,
            stochastic=stochastic, num_samples=num_samples,
        )

    def _mc_samples(self, kwargs: dict) -> int:
        return int(kwargs.get("mc_samples", self.num_samples))

    def diag(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Diagonal of the GGN (``DiagGGN``) or of the MC Fisher (``DiagGGNMC``).

        Args:
            x: Input ``[N, *in]``.
            y: Targets.
            **kwargs: ``mc_samples`` (stochastic); others (``N``, ASDL's options) are ignored.

        Returns:
            ``factor · loss`` and the diagonal ``[P]`` (``[S]``), times ``factor``.
        """
        extension = DiagGGNMC(mc_samples=self._mc_samples(kwargs)) if self.stochastic else DiagGGN()
        _, loss = self._run([extension], x, lambda out: self._loss(out, y))
        diagonal = torch.cat([d.flatten() for d in self._read(extension.attribute, lambda p: p.shape)])
        self._clear()
        return self.factor * loss, self.factor * self._restrict(diagonal)

    def full(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The dense GGN (``FullGGN``), or the MC Fisher from sampled columns.

        Stochastic: ``M`` columns ``s_nm`` per sample (``_sampled_columns``) and
        ``FullGGN`` of ``Σ (s_nmᵀ f_n)²`` scaled by ``1/(2M)``: ``(1/M) Σ J_nᵀ s sᵀ J_n``
        at the cost of ``M`` backpropagated columns.

        Returns:
            ``factor · loss`` and ``[P, P]`` (``[S, S]``), times ``factor``.
        """
        extension = FullGGN()
        if not self.stochastic:
            _, loss = self._run([extension], x, lambda out: self._loss(out, y))
            matrix = extension.matrix
        else:
            samples = self._mc_samples(kwargs)
            with torch.no_grad():
                module, inputs = self._module_and_input(x)
                columns = self._sampled_columns(module(inputs), samples)
            output, _ = self._run([extension], x, self._projected_squares(columns))
            matrix = extension.matrix / (2 * samples)
            loss = self._loss(output, y)
        self._clear()
        if self.subnetwork_indices is not None:
            matrix = matrix[self.subnetwork_indices][:, self.subnetwork_indices]
        return self.factor * loss, self.factor * matrix

    def kron(self, x: Inputs, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """KFAC (``KFAC``: exact columns, or ``mc_samples`` sampled ones if stochastic).

        Args:
            x: Input ``[M, *in]``.
            y: Targets.
            N: Number of data points over all batches (``A`` is rescaled by ``M/N``).
            **kwargs: ``mc_samples``; ``kfac_approx`` (``"expand"``, default, or ``"reduce"``).

        Returns:
            ``factor · loss`` and the ``Kron`` (laplace's layout), times ``factor``.
        """
        approx = kwargs.get("kfac_approx", "expand")
        if self.stochastic:
            samples = self._mc_samples(kwargs)
            kfac, diagonal = KFAC(mc_samples=samples, approx=approx), DiagGGNMC(mc_samples=samples)
        else:
            kfac, diagonal = KFAC(approx=approx), DiagGGN()
        output, kron = self._kron(kfac, diagonal, x, lambda out: self._loss(out, y), N)
        return self.factor * self._loss(output, y), kron * self.factor


class CurvhookEF(CurvhookInterface, EFInterface):
    """laplace-torch's ``EFInterface`` (empirical Fisher ``Σ_n g_n g_nᵀ``) from curvhook.

    ``full`` is laplace's ``EFInterface.full`` over ``gradients`` (``BatchGrad``).
    """

    def diag(self, x: Inputs, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``Σ_n g_n ∘ g_n`` from ``SumGradSquared`` (no ``[N, P]`` gradients).

        Returns:
            ``factor · loss`` and the diagonal ``[P]`` (``[S]``), times ``factor``.
        """
        _, loss = self._run([SumGradSquared()], x, lambda out: self._loss(out, y))
        diagonal = torch.cat([d.flatten() for d in self._read("sum_grad_squared", lambda p: p.shape)])
        self._clear()
        return self.factor * loss, self.factor * self._restrict(diagonal)

    def kron(self, x: Inputs, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """Empirical KFAC: ``KFAC`` with the output gradients as the columns.

        The EF is the GGN of ``½ Σ_n (g_nᵀ f_n)²`` with ``g_n`` held constant, so
        curvhook's exact KFAC of that objective, halved, has ``B = Σ g gᵀ`` of the
        gradients at each layer's output (curvlinops' ``fisher_type="empirical"``).

        Returns:
            ``factor · loss`` and the ``Kron``, times ``factor``.
        """
        with torch.no_grad():
            module, inputs = self._module_and_input(x)
            gradient = self._output_gradient(module(inputs), y)
        approx = kwargs.get("kfac_approx", "expand")
        output, kron = self._kron(
            KFAC(approx=approx), DiagGGN(), x, self._projected_squares(gradient.unsqueeze(1)), N
        )
        return self.factor * self._loss(output, y), kron * (0.5 * self.factor)


def functional_variance(la: Any, x: Inputs) -> Tensor:
    """The GLM predictive's ``J_n Σ J_nᵀ`` of a fitted Laplace object, without its Jacobians.

    Equal to ``la.functional_variance(la.backend.jacobians(x)[0])``, computed by
    curvhook's ``OutputCovariance``:

    - ``DiagLaplace``: ``Σ = diag(la.posterior_variance)``; no Jacobian is formed.
    - ``FullLaplace``: the dense ``la.posterior_covariance`` (curvhook forms the
      per-sample Jacobian internally, as laplace would).
    - ``KronLaplace`` is refused: its posterior covariance, the inverse of
      ``H + δ I`` with ``H`` Kronecker-factored, is not a Kronecker product.

    Args:
        la: A fitted ``DiagLaplace`` or ``FullLaplace`` over all weights.
        x: Input ``[N, *in]``.

    Returns:
        ``[N, C, C]``.
    """
    from laplace.baselaplace import DiagLaplace, FullLaplace

    backend = la.backend
    if not isinstance(backend, CurvhookInterface):
        backend = CurvhookGGN(la.model, la.likelihood)
    if backend.last_layer or backend.subnetwork_indices is not None:
        raise ValueError("functional_variance covers Laplace over all weights only.")
    if isinstance(la, DiagLaplace):
        variance, cov, start = la.posterior_variance, {}, 0
        for p in backend.params:
            cov[p] = variance[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
    elif isinstance(la, FullLaplace):
        cov = la.posterior_covariance
    else:
        raise NotImplementedError(
            f"{type(la).__name__}: only DiagLaplace and FullLaplace have a posterior covariance "
            "that OutputCovariance takes; use la.functional_variance(Js)."
        )
    return backend.functional_variance(x, cov)
