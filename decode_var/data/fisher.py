"""Cramér-Rao lower bound of (x, y, z, phot, bg) for any PSF model, from autograd derivatives.

For one emitter the pixels of its ROI are independent Poisson counts with means ``mu_k(theta)``,
``theta = (x, y, z, phot, bg)``. The Fisher information is ``I_ij = sum_k d_i mu_k d_j mu_k / mu_k`` and
the bound is ``diag(I^-1)``. An EMCCD's excess noise factor F^2 = 2 halves the information (doubles the
variances), as in :mod:`decode_var.data.crlb`, whose analytic Gaussian bound this reproduces.

The derivatives ``d mu_k / d theta_i`` come from autograd: emitters are independent, so one
Jacobian-vector product per parameter (tangent 1 for that parameter of every emitter) yields the
derivatives of all emitters at once. The product is formed by the double-backward identity
``J v = d/du (u^T J v)``, which works for any model torch can differentiate in reverse mode.
"""
from __future__ import annotations

from typing import Callable

import torch

from decode_var.data.crlb import photons_and_background
from decode_var.core.errors import ShapeError

__all__ = ["crlb_from_model", "jacobian_columns"]

#: parameter order of the bound
PARAMS = ("x", "y", "z", "phot", "bg")


def jacobian_columns(model: Callable, theta_E5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mu_EK = model(theta)`` and ``d mu_EK / d theta_E5[:, i]`` for each i, as (E, 5, K).

    ``model`` maps (E, 5) parameters to (E, K) means, emitter e depending only on row e.
    """
    theta = theta_E5.detach().clone().requires_grad_(True)
    mu_EK = model(theta)
    if mu_EK.dim() != 2 or mu_EK.size(0) != theta.size(0):
        raise ShapeError(f"PSF model must return (E, K) pixel means, got {tuple(mu_EK.shape)} for {theta.size(0)} "
                         "emitters.")
    u = torch.zeros_like(mu_EK, requires_grad=True)
    (vjp_E5,) = torch.autograd.grad(mu_EK, theta, grad_outputs=u, create_graph=True)  # u^T J, linear in u
    cols = []
    for i in range(theta.size(1)):
        tangent = torch.zeros_like(theta)
        tangent[:, i] = 1.0
        (jv_EK,) = torch.autograd.grad(vjp_E5, u, grad_outputs=tangent, retain_graph=True, allow_unused=True)
        cols.append(torch.zeros_like(mu_EK) if jv_EK is None else jv_EK)
    return mu_EK.detach(), torch.stack(cols, 1).detach()


def crlb_from_model(model: Callable, xyz_px, phot, bg, em_gain: bool = False, chunk: int = 1024) -> torch.Tensor:
    """CRLB variances of x, y, z, phot, bg for each emitter under ``model``.

    Args:
        model: ``model(xyz_E3, phot_E, bg_E) -> mu_EK``, expected photons in each of the K pixels of each
            emitter's ROI, background included; emitter e's row may depend only on its own parameters.
        xyz_px: (E, 3) x, y in px, z in nm.
        phot: (E,) photons. bg: (E,) or scalar, photons / px.
        em_gain: True for an EMCCD (excess noise factor 2: variances doubled).
        chunk: emitters per block.

    Returns:
        (E, 5) float32 variances: x, y in px^2, z in nm^2, phot in photons^2, bg in (photons / px)^2. When the
        model does not depend on z (a 2D PSF), the z column is nan and the others are the 4-parameter bound.
    """
    xyz = torch.as_tensor(xyz_px, dtype=torch.float64)
    if xyz.dim() != 2 or xyz.size(1) != 3:
        raise ShapeError(f"crlb_from_model expects xyz_px of shape (E, 3), got {tuple(xyz.shape)}.")
    n = xyz.size(0)
    phot, bg = photons_and_background(phot, bg, n, "crlb_from_model")
    out = []
    for s in range(0, n, chunk):
        theta_E5 = torch.cat([xyz[s:s + chunk], phot[s:s + chunk, None], bg[s:s + chunk, None]], 1)
        mu_EK, d_E5K = jacobian_columns(lambda t: model(t[:, :3], t[:, 3], t[:, 4]), theta_E5)
        fisher_E55 = torch.einsum("eik,ejk->eij", d_E5K / mu_EK.clamp_min(1e-30)[:, None, :], d_E5K)
        out.append(_inverse_diag(fisher_E55))
    var = torch.cat(out, 0) if out else torch.zeros(0, 5, dtype=torch.float64)
    if em_gain:
        var = var * 2.0
    return var.float()


def _inverse_diag(fisher_E55: torch.Tensor) -> torch.Tensor:
    """diag(I^-1) per emitter; a parameter the model ignores (zero row) gets nan, the rest its reduced bound."""
    used = fisher_E55.diagonal(dim1=1, dim2=2).abs().amax(0) > 0
    var = torch.full(fisher_E55.shape[:2], float("nan"), dtype=fisher_E55.dtype)
    idx = torch.nonzero(used).flatten()
    sub = fisher_E55[:, idx][:, :, idx]
    var[:, idx] = torch.diagonal(torch.linalg.inv(sub), dim1=1, dim2=2)
    return var
