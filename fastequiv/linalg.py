"""Extreme eigenpairs of a large symmetric operator given only as ``v -> H v``: Lanczos.

:func:`lanczos` with full reorthogonalisation and restarts when the Krylov space closes;
:class:`Spectrum` is what it returns. General linear algebra, nothing about models: the
Hessian spectra of :mod:`fastequiv.diagnostics` are this solver on Hessian-vector
products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["Spectrum", "lanczos", "WHICH"]

#: which end of the spectrum :func:`lanczos` returns
WHICH = ("largest", "smallest", "magnitude")


@dataclass(frozen=True)
class Spectrum:
    """Extreme eigenvalues of a symmetric operator from :func:`lanczos` (of a Hessian, from
    :func:`fastequiv.diagnostics.hessian_spectrum`).

    Attributes:
        eigenvalues: ``(k,)`` float64: ``which="largest"`` descending, ``"smallest"``
            ascending, ``"magnitude"`` by ``|lambda|`` descending.
        eigenvectors: ``(k, n)`` unit Ritz vectors (over the flattened parameters of a
            Hessian, in the order of ``names``), or None unless asked for.
        residuals: ``(k,)`` Lanczos estimates of ``|H u - lambda u|`` for each pair.
        iterations: operator products (Hessian-vector products) used.
        converged: every residual is below ``tol * max |lambda|`` (or the Krylov space was
            exhausted, which makes the values exact).
        term, which: what was computed; names: the parameters, in flattening order.
    """

    eigenvalues: torch.Tensor
    eigenvectors: Optional[torch.Tensor]
    residuals: torch.Tensor
    iterations: int
    converged: bool
    term: str = ""
    which: str = "largest"
    names: tuple = ()

    def condition(self, rtol: Optional[float] = 1e-3) -> torch.Tensor:
        """``max |lambda| / min |lambda|`` over the computed eigenvalues with ``|lambda| >
        rtol * max |lambda|`` (``rtol=None``: all of them). See :mod:`fastequiv.diagnostics`: this is
        the conditioning along the computed directions, not of the whole (rank-deficient) Hessian."""
        lam = self.eigenvalues.abs()
        top = lam.max()
        keep = lam if rtol is None else lam[lam > rtol * top]
        return top / keep.min() if keep.numel() else torch.tensor(math.nan, dtype=lam.dtype)

    def __repr__(self) -> str:
        vals = ", ".join(f"{float(v):.4g}" for v in self.eigenvalues)
        return (f"Spectrum(term={self.term!r}, which={self.which!r}, eigenvalues=[{vals}], "
                f"iterations={self.iterations}, converged={self.converged})")


def _wanted(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    if which == "largest":
        order = torch.argsort(theta, descending=True)
    elif which == "smallest":
        order = torch.argsort(theta)
    else:
        order = torch.argsort(theta.abs(), descending=True)
    return order[:k]


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, k: int, *, which: str = "largest",
            max_iter: Optional[int] = None, tol: float = 1e-4, seed: int = 0, device=None,
            dtype: torch.dtype = torch.float64, eigenvectors: bool = False) -> Spectrum:
    """``k`` extreme eigenpairs of the symmetric ``n x n`` operator ``matvec`` by Lanczos.

    Full reorthogonalisation (twice per step, against every basis vector), so the Ritz
    values carry no spurious copies. When the Krylov space closes (an invariant
    subspace: the new vector vanishes) the iteration restarts with a fresh random
    vector orthogonal to the basis, which is how repeated eigenvalues are found; the
    start vectors are drawn from a CPU generator seeded with ``seed``. It stops when the
    ``k`` wanted Ritz values have residual estimates ``|beta_m s_mi| <= tol * max |theta|``
    (checked only after a step that did not restart), after ``max_iter`` products
    (default ``min(n, max(4 k, 40))``), or when the basis spans all ``n`` dimensions.

    A cluster of nearly equal eigenvalues may show fewer copies than it has if the
    iteration stops on the tolerance before the space closes: exact multiplicities need
    ``max_iter`` up to ``n``.

    Args:
        matvec: ``v (n,) -> H v (n,)`` in ``dtype``.
        dtype: of the basis (``max_iter x n`` of it is kept); the tridiagonal matrix and
            its eigenproblem are float64.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} parameters: the Hessian has only {n} eigenvalues")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if max_iter is None:
        max_iter = min(n, max(4 * k, 40))
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k:
        raise ValueError(f"max_iter must be an int >= k={k}, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    m_max = min(n, max_iter)
    gen = torch.Generator().manual_seed(seed)
    # breakdown: the new vector is rounding noise against the operator's scale
    eps = 100 * torch.finfo(dtype).eps
    V = torch.zeros(m_max, n, dtype=dtype, device=device)
    alpha, beta = [], []  # beta[j] couples vectors j and j+1 (0 after a restart)

    def fresh(j: int) -> Optional[torch.Tensor]:
        for _ in range(3):
            v = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(2):
                v = v - V[:j].T @ (V[:j] @ v) if j else v
            nv = v.norm()
            if nv > 1e-3:
                return v / nv
        return None

    v = fresh(0)
    theta = S = None
    converged, m, last = False, 0, 0.0  # last: the norm of the residual vector after step m
    while m < m_max:
        V[m] = v
        w = matvec(v).to(dtype)
        a = torch.dot(w, v)
        w = w - a * v
        if m > 0 and beta[-1] != 0:
            w = w - beta[-1] * V[m - 1]
        for _ in range(2):
            w = w - V[: m + 1].T @ (V[: m + 1] @ w)
        b = float(w.norm())
        alpha.append(float(a))
        m += 1
        T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(beta, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        scale = max(float(theta.abs().max()), b)
        restarted = b <= eps * scale or scale == 0.0
        last = 0.0 if restarted else b
        if m == n:  # the basis spans the space: the Ritz values are the eigenvalues
            converged, last = True, 0.0
            break
        if not restarted and m >= k:
            res = b * S[-1, _wanted(theta, k, which)].abs()
            if bool((res <= tol * scale).all()):
                converged = True
                break
        if m == m_max:
            break
        if restarted:
            v = fresh(m)
            if v is None:  # no direction left: the basis spans the space
                converged = True
                break
            beta.append(0.0)
        else:
            v = w / b
            beta.append(b)
    idx = _wanted(theta, k, which)
    residuals = last * S[-1, idx].abs()
    vecs = None
    if eigenvectors:
        vecs = (S[:, idx].T.to(dtype) @ V[:m]).to(torch.float64)
    return Spectrum(theta[idx], vecs, residuals, m, converged, which=which)
