"""Rotation designs: weighted rotations whose weighted average is the Haar average, exactly,
for every function of SO(3) (or O(3)) up to a stated degree.

Definition. A design ``{(R_i, w_i)}``, ``sum_i w_i = 1``, has degree ``L`` on SO(3) when

    S_l = sum_i w_i D^l(R_i) = 0        for 1 <= l <= L

(``D^l`` the real Wigner-D block of :func:`fastequiv.wigner_D`). Every function in the span of
the entries of ``D^0 .. D^L`` ("band-limited to degree L") then has ``sum_i w_i F(R_i)`` equal
to its Haar integral. For a model, ``F(g) = f_g(x) = rho_out(g)^-1 f(rho_in(g) x)``: the design
average is the twirled prediction ``fbar(x)`` exactly when the model's twisted prediction has
no content above degree ``L``. On O(3) the condition runs over every irrep ``(l, p)`` but the
trivial one, the determinant ``(0, o)`` included: a design of degree ``L`` on SO(3) together
with its negatives (each element times the inversion), every weight halved, is one on O(3).

Constructions (:func:`design` picks the one with the fewest rotations for a degree):

* **Finite groups.** ``(1/|G|) sum_g D^l(g)`` is the projector onto the ``G``-invariant vectors
  of ``D^l``: zero iff there are none. The cube's 24 rotations have none for ``l = 1, 2, 3``
  (the first at ``l = 4``: ``x^4 + y^4 + z^4 - 3/5``), the icosahedron's 60 none for
  ``l = 1 .. 5`` (the first at ``l = 6``): degrees 3 and 5.
* **Products** of a sphere rule and in-plane angles. Let ``{(u_j, v_j)}`` integrate the
  spherical harmonics of degree ``1 .. L`` to zero, let ``F(u)`` be any rotation with
  ``F(u) z = u`` and take the ``M = L + 1`` in-plane angles ``gamma_k = 2 pi k / M``:
  ``R_jk = F(u_j) R_z(gamma_k)``, ``w_jk = v_j / M``. Then
  ``(1/M) sum_k D^l(R_z(gamma_k))`` keeps the eigenvectors of the turns about ``z`` whose
  eigenvalue ``e^{i n gamma}`` has ``n = 0 mod M``; for ``l < M`` that is ``n = 0`` alone,
  the zonal vector ``e``, and ``D^l(F(u)) e`` is the vector of degree-``l`` harmonics at
  ``u``, which the sphere rule sums to zero. ``M = L + 1`` is the fewest equally spaced
  angles that cancel every ``n`` with ``1 <= |n| <= L``; the degree is ``L`` (at ``L + 1``,
  ``n = +-M`` survives).
* **Sphere rules**, the fewest points known to this module for each degree: the antipodal
  pair (degree 1, 2 points), the regular tetrahedron (2, 4), the octahedron (3, 6), the
  icosahedron (5, 12), McLaren's 24-point equal-weight 7-design (an orbit of the cube's
  rotation group, A. D. McLaren, Math. Comp. 17, 361 (1963); its point is solved for here),
  the 32-point rule of degree 9 (the icosahedron's 12 vertices and the dodecahedron's 20,
  two weights that cancel the icosahedral invariant of degree 6), and Lebedev's rules
  (``scipy.integrate.lebedev_rule``, odd degrees 3 .. 131: needs the ``designs`` extra,
  ``pip install "fastequiv[designs]"``) with positive weights beyond them. The Lebedev
  rules of degree 13, 25 and 27 have negative weights; :func:`design` skips them (a
  negative weight lets a per-sample loss estimate go negative), ``"lebedev:L"`` does not.

A lower bound to hold the sizes against: a quadrature with positive weights exact to degree
``L`` has at least ``sum_{l <= L/2} (2l+1)^2`` points (products of two functions of degree
``<= L/2`` must integrate exactly, so their Gram matrix, of that rank, is a sum of the
points' rank-one terms): :func:`lower_bound`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Union

import numpy as np
import torch

from . import groups
from .wigner import wigner_D_matrix

__all__ = ["Design", "SphereRule", "design", "sphere_rule", "product_design", "group_design", "with_inversion",
           "lebedev", "sphere_residual", "residuals", "lower_bound", "catalogue", "PREFIXES", "LEBEDEV_POINTS"]

#: the string forms :func:`design` takes, besides the finite groups' names
PREFIXES = ("design:", "lebedev:")
_FINITE = {"octahedral": 3, "icosahedral": 5}  # name: degree
_MAX_DEGREE = 131  # the largest Lebedev rule


@dataclasses.dataclass(frozen=True)
class SphereRule:
    """Points ``(N, 3)`` on the unit sphere with weights ``(N,)`` summing to 1 (float64), exact
    for the spherical harmonics of degree ``1 .. degree``."""

    name: str
    points: np.ndarray
    weights: np.ndarray
    degree: int


@dataclasses.dataclass(frozen=True, eq=False)
class Design:
    """Weighted rotations ``(K, 3, 3)`` (float64) exact to ``degree`` on ``group``.

    Attributes:
        name: how it was built, e.g. ``"icosahedral"`` or ``"Lebedev 50 x 11 angles"``.
        rotations: ``(K, 3, 3)`` float64; improper ones (det -1) on O(3).
        weights: ``(K,)`` float64, summing to 1.
        degree: ``S_l = sum_i w_i D^l(R_i)`` vanishes for every ``l <= degree`` (and parity).
        group: ``"SO3"`` or ``"O3"``.
    """

    name: str
    rotations: torch.Tensor
    weights: torch.Tensor
    degree: int
    group: str

    @property
    def size(self) -> int:
        """K, the number of rotations (model evaluations per sample)."""
        return int(self.rotations.shape[0])

    def __len__(self) -> int:
        return self.size

    @property
    def uniform(self) -> bool:
        """Whether every weight is ``1 / K``."""
        return bool(torch.allclose(self.weights, torch.full_like(self.weights, 1.0 / self.size), rtol=0, atol=1e-15))

    def __repr__(self) -> str:
        return f"Design({self.name!r}, rotations={self.size}, degree={self.degree}, group={self.group!r})"


# --- sphere rules ------------------------------------------------------------------------------

def _normalised(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _orbit(group: str, point) -> np.ndarray:
    """The distinct images ``g u`` of one point under a finite rotation group."""
    G = groups.group_elements(group, dtype=torch.float64).numpy()
    images = G @ _normalised(point)
    keep = []
    for p in images:
        if all(np.linalg.norm(p - q) > 1e-9 for q in keep):
            keep.append(p)
    return np.array(keep)


def _legendre_gram(points: np.ndarray, l: int) -> np.ndarray:
    """``P_l(u_j . u_k)``: by the addition theorem, ``(4 pi / (2l+1)) sum_m Y_lm(u_j) Y_lm(u_k)``."""
    return np.polynomial.legendre.legval(np.clip(points @ points.T, -1.0, 1.0), [0.0] * l + [1.0])


def sphere_residual(rule: SphereRule, l: int) -> float:
    """``||sum_j v_j D^l(F(u_j)) P||_F``, ``P`` the projector onto the zonal vector about ``z``
    (the average of ``D^l`` over ``l + 1`` turns about ``z``): the norm of the rule's sum of
    the degree-``l`` harmonics (a vector norm, so float rounding leaves it near 1e-16)."""
    P = _turns_average(l)
    D = wigner_D_matrix(((1, l, 1),), torch.from_numpy(_frames(rule.points)))
    return float(torch.einsum("j,jab,bc->ac", torch.from_numpy(rule.weights), D, P).norm())


def _turns_average(l: int) -> torch.Tensor:
    M = l + 1
    g = 2 * math.pi * np.arange(M) / M
    return wigner_D_matrix(((1, l, 1),), torch.from_numpy(_turns(g))).mean(0)


def _turns(angles: np.ndarray) -> np.ndarray:
    """Turns ``R_z(gamma)`` ``(n, 3, 3)``."""
    c, s = np.cos(angles), np.sin(angles)
    R = np.zeros((len(angles), 3, 3))
    R[:, 0, 0], R[:, 0, 1], R[:, 1, 0], R[:, 1, 1], R[:, 2, 2] = c, -s, s, c, 1
    return R


def _checked(rule: SphereRule) -> SphereRule:
    worst = max(sphere_residual(rule, l) for l in range(1, rule.degree + 1))
    if not (abs(rule.weights.sum() - 1) < 1e-13 and worst < 1e-13):
        raise RuntimeError(f"the sphere rule {rule.name} is not exact to degree {rule.degree} (residual "
                           f"{worst:.2e}): a bug in fastequiv.designs")
    return rule


def _invariant(group: str, l: int, u: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A ``group``-invariant harmonic of degree ``l`` at the points ``u`` ``(..., 3)``:
    ``sum_g P_l(u . g r)`` (the zonal harmonic about ``r`` averaged over the group)."""
    orbit = groups.group_elements(group, dtype=torch.float64).numpy() @ reference
    return np.polynomial.legendre.legval(np.clip(u @ orbit.T, -1, 1), [0.0] * l + [1.0]).sum(-1)


@functools.lru_cache(maxsize=None)
def _mclaren24() -> SphereRule:
    """24 equal weights: the orbit under the cube's rotations of a point where the group's
    invariant harmonics of degrees 4 and 6 both vanish (every other degree <= 7 has no
    invariant), found by a grid search and Newton's method in (theta, phi)."""
    reference = _normalised([0.3, 0.5, 0.8])  # any point off the symmetry axes

    def point(angles):
        t, p = np.moveaxis(np.asarray(angles), -1, 0)
        return np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], axis=-1)

    def residual(angles):
        u = point(angles)
        return np.stack([_invariant("octahedral", l, u, reference) for l in (4, 6)], axis=-1)

    # start from the best point of a grid on one octant (every solution has images there)
    t, p = np.meshgrid(np.linspace(0.05, math.pi / 2 - 0.05, 60), np.linspace(0.05, math.pi / 2 - 0.05, 60))
    grid = np.stack([t.ravel(), p.ravel()], axis=-1)
    x = grid[np.argmin((residual(grid) ** 2).sum(-1))]
    for _ in range(50):
        h = 1e-7
        J = np.stack([(residual(x + h * e) - residual(x - h * e)) / (2 * h) for e in np.eye(2)], axis=1)
        step = np.linalg.solve(J, residual(x))
        x = x - step
        if np.abs(step).max() < 1e-15:
            break
    points = _orbit("octahedral", point(x))
    if len(points) != 24:
        raise RuntimeError(f"McLaren's 24-point design: the solved point has an orbit of {len(points)} points")
    return _checked(SphereRule("McLaren 24", points, np.full(24, 1 / 24), 7))


@functools.lru_cache(maxsize=None)
def _icosahedral32() -> SphereRule:
    """The icosahedron's 12 vertices and the dodecahedron's 20 (its face centres), weighted so
    that the icosahedral invariant of degree 6 cancels; each orbit alone is a 5-design, and
    the rotations of the icosahedron have no other invariant below degree 10."""
    phi = (1 + math.sqrt(5)) / 2
    vertices = _orbit("icosahedral", [0.0, 1.0, phi])
    faces = _orbit("icosahedral", [1.0, 1.0, 1.0])
    a = np.full(12, 1 / 12)
    b = np.full(20, 1 / 20)
    both = np.concatenate([vertices, faces])
    # <Y6 means>: the two orbit means are multiples s_v, s_f of the one invariant vector
    P6 = _legendre_gram(both, 6)
    gram = lambda x, y: float(x @ P6 @ y)  # noqa: E731
    va, fb = np.concatenate([a, np.zeros(20)]), np.concatenate([np.zeros(12), b])
    s_v = math.sqrt(gram(va, va))
    s_f = gram(va, fb) / s_v
    alpha = s_f / (s_f - s_v)  # alpha s_v + (1 - alpha) s_f = 0
    if not 0 < alpha < 1:
        raise RuntimeError(f"the 32-point rule: weight share {alpha} is not in (0, 1)")
    return _checked(SphereRule("icosahedron + dodecahedron 32", both, np.concatenate([alpha * a, (1 - alpha) * b]), 9))


@functools.lru_cache(maxsize=None)
def lebedev(order: int) -> SphereRule:
    """Lebedev's rule of degree ``order`` (``scipy.integrate.lebedev_rule``), weights summing to 1."""
    if order not in LEBEDEV_POINTS:
        raise ValueError(f"order must be one of scipy's Lebedev orders {tuple(LEBEDEV_POINTS)}, got {order!r}")
    try:
        from scipy.integrate import lebedev_rule
    except ImportError as e:
        raise ImportError("Lebedev rules come from scipy.integrate.lebedev_rule (scipy >= 1.15): "
                          'pip install "fastequiv[designs]"') from e
    x, w = lebedev_rule(order)
    points = np.ascontiguousarray(np.asarray(x, dtype=np.float64).T)
    return _checked(SphereRule(f"Lebedev {points.shape[0]}", _normalised(points), np.asarray(w) / np.sum(w), order))


#: scipy's Lebedev rules: {order (the degree): points}
LEBEDEV_POINTS = dict(zip(
    (3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 35, 41, 47, 53, 59, 65, 71, 77, 83, 89, 95, 101, 107, 113,
     119, 125, 131),
    (6, 14, 26, 38, 50, 74, 86, 110, 146, 170, 194, 230, 266, 302, 350, 434, 590, 770, 974, 1202, 1454, 1730, 2030, 2354,
     2702, 3074, 3470, 3890, 4334, 4802, 5294, 5810)))
LEBEDEV_NEGATIVE = (13, 25, 27)  # orders whose rule has negative weights


def _lebedev_order(degree: int, positive: bool) -> int:
    return next(o for o in LEBEDEV_POINTS if o >= degree and not (positive and o in LEBEDEV_NEGATIVE))


def _small_rules() -> list:
    phi = (1 + math.sqrt(5)) / 2
    return [
        (1, 2, lambda: SphereRule("antipodal pair", np.array([[0.0, 0, 1], [0, 0, -1]]), np.full(2, 0.5), 1)),
        (2, 4, lambda: SphereRule("tetrahedron", _normalised([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]),
                                  np.full(4, 0.25), 2)),
        (3, 6, lambda: SphereRule("octahedron", np.concatenate([np.eye(3), -np.eye(3)]), np.full(6, 1 / 6), 3)),
        (5, 12, lambda: SphereRule("icosahedron", _orbit("icosahedral", [0.0, 1.0, phi]), np.full(12, 1 / 12), 5)),
        (7, 24, _mclaren24),
        (9, 32, _icosahedral32),
    ]


def sphere_rule(degree: int) -> SphereRule:
    """The sphere rule with the fewest points (positive weights) exact to ``degree``."""
    _check_degree(degree)
    for d, _, build in _small_rules():
        if d >= degree:
            return _checked(build())
    return lebedev(_lebedev_order(degree, positive=True))


def _sphere_size(degree: int) -> int:
    """Points of :func:`sphere_rule` for ``degree``, without building it (no scipy)."""
    for d, n, _ in _small_rules():
        if d >= degree:
            return n
    return LEBEDEV_POINTS[_lebedev_order(degree, positive=True)]


# --- designs on SO(3) and O(3) ----------------------------------------------------------------

def _frames(points: np.ndarray) -> np.ndarray:
    """``F(u)`` ``(N, 3, 3)`` with ``F(u) z = u``: ``R_z(phi) R_y(theta)`` from ``u`` itself
    (``sin theta = hypot(u_x, u_y)``, no inverse trigonometry)."""
    x, y, z = points.T
    s = np.hypot(x, y)
    cp = np.where(s > 0, x / np.where(s > 0, s, 1), 1.0)
    sp = np.where(s > 0, y / np.where(s > 0, s, 1), 0.0)
    Rz = np.zeros((len(points), 3, 3))
    Rz[:, 0, 0], Rz[:, 0, 1], Rz[:, 1, 0], Rz[:, 1, 1], Rz[:, 2, 2] = cp, -sp, sp, cp, 1
    Ry = np.zeros((len(points), 3, 3))
    Ry[:, 0, 0], Ry[:, 0, 2], Ry[:, 1, 1], Ry[:, 2, 0], Ry[:, 2, 2] = z, s, 1, -s, z
    return Rz @ Ry


def product_design(rule: SphereRule, degree: int) -> Design:
    """``F(u_j) R_z(2 pi k / (degree + 1))`` with weights ``v_j / (degree + 1)`` on SO(3):
    exact to ``degree`` when ``rule`` is (see the module docs)."""
    _check_degree(degree)
    if rule.degree < degree:
        raise ValueError(f"degree={degree}: the sphere rule {rule.name} is exact only to degree {rule.degree}")
    M = degree + 1
    R = (_frames(rule.points)[:, None] @ _turns(2 * math.pi * np.arange(M) / M)[None]).reshape(-1, 3, 3)
    w = np.repeat(rule.weights / M, M)
    return Design(f"{rule.name} x {M} angles", torch.from_numpy(R), torch.from_numpy(w), degree, "SO3")


def group_design(name: str) -> Design:
    """A finite rotation group, every element weighted ``1 / |G|``, as a design on SO(3)."""
    if name not in _FINITE:
        raise ValueError(f"name must be one of {tuple(_FINITE)}, got {name!r}")
    R = groups.group_elements(name, dtype=torch.float64)
    return Design(name, R, torch.full((R.shape[0],), 1.0 / R.shape[0], dtype=torch.float64), _FINITE[name], "SO3")


def with_inversion(d: Design) -> Design:
    """The O(3) design of the same degree: ``d`` and ``-d``, every weight halved."""
    if d.group == "O3":
        return d
    return Design(d.name + " with inversion", torch.cat([d.rotations, -d.rotations]), torch.cat([d.weights, d.weights]) / 2,
                  d.degree, "O3")


def _check_degree(degree) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= _MAX_DEGREE:
        raise ValueError(f"degree must be an int in [1, {_MAX_DEGREE}], got {degree!r}")


def _so3_candidates(degree: int) -> list:
    """``(size, build)`` of the SO(3) designs of degree >= ``degree`` this module knows."""
    found = [(24 if name == "octahedral" else 60, functools.partial(group_design, name))
             for name, d in _FINITE.items() if d >= degree]
    found.append((_sphere_size(degree) * (degree + 1), lambda: product_design(sphere_rule(degree), degree)))
    return found


@functools.lru_cache(maxsize=None)
def _design(kind: str, degree: Optional[int], group: str) -> Design:
    if kind in _FINITE:
        d = group_design(kind)
    elif kind == "design":
        # fewest rotations; a tie goes to the finite group (a group is closed: exact for it too)
        d = min(_so3_candidates(degree), key=lambda c: c[0])[1]()
    else:  # lebedev
        d = product_design(lebedev(_lebedev_order(degree, positive=False)), degree)
    return with_inversion(d) if group == "O3" else d


def design(rotations: Union[str, Design], group: str = "SO3") -> Design:
    """The design named by ``rotations`` on ``group`` (``"SO3"`` or ``"O3"``).

    ``rotations``:

    * ``"design:L"``: the design with the fewest rotations this module knows of degree at
      least ``L`` (the cube's group for 3, the icosahedron's for 4 and 5, else a product of
      the smallest sphere rule and ``L + 1`` in-plane angles);
    * ``"lebedev:L"``: Lebedev's rule of the smallest order ``>= L`` times ``L + 1`` in-plane
      angles (the construction of metatomic's symmetrisation; needs scipy);
    * ``"octahedral"`` (24 rotations, degree 3), ``"icosahedral"`` (60, degree 5);
    * a :class:`Design` (checked against ``group``).

    On O(3) every one is taken with its negatives (twice the rotations, the same degree).
    """
    if group not in ("SO3", "O3"):
        raise ValueError(f"group must be 'SO3' or 'O3' for a design, got {group!r} (a finite group is twirled exactly "
                         "by its own elements)")
    if isinstance(rotations, Design):
        if rotations.group != group:
            raise ValueError(f"rotations is a design on {rotations.group}, but the group is {group}")
        return rotations
    if not isinstance(rotations, str):
        raise ValueError(f"rotations must be a str ('design:L', 'lebedev:L', {', '.join(map(repr, _FINITE))}) or a "
                         f"fastequiv.designs.Design, got {type(rotations).__name__}")
    if rotations in _FINITE:
        return _design(rotations, None, group)
    kind, sep, rest = rotations.partition(":")
    if not sep or kind + ":" not in PREFIXES or not rest.strip().isdigit():
        raise ValueError(f"rotations must be 'design:L' or 'lebedev:L' with an integer degree L, or one of "
                         f"{tuple(_FINITE)}, got {rotations!r}")
    degree = int(rest)
    if not 1 <= degree <= _MAX_DEGREE:
        raise ValueError(f"rotations={rotations!r}: the degree L must be in [1, {_MAX_DEGREE}], got {degree}")
    return _design(kind, degree, group)


# --- checks and tables ----------------------------------------------------------------------------

def residuals(d: Design, lmax: int) -> dict:
    """``{(l, p): ||S_l||_F}`` for every irrep up to ``lmax`` the design must cancel
    (``p = +1`` only on SO(3)): float64, the degree's guarantee to float rounding."""
    R, w = d.rotations.to(torch.float64), d.weights.to(torch.float64)
    out = {}
    for l in range(lmax + 1):
        for p in ((1, -1) if d.group == "O3" else (1,)):
            if l == 0 and p == 1:
                continue
            S = torch.einsum("k,kij->ij", w, wigner_D_matrix(((1, l, p),), R))
            out[(l, p)] = float(S.norm())
    return out


def lower_bound(degree: int) -> int:
    """Fewest points of any positive-weight design of ``degree`` on SO(3):
    ``sum_{l <= degree // 2} (2l+1)^2`` (see the module docs)."""
    _check_degree(degree)
    return sum((2 * l + 1) ** 2 for l in range(degree // 2 + 1))


def catalogue(max_degree: int = 10) -> list[dict]:
    """One row per degree ``1 .. max_degree``: what ``"design:L"`` builds, its size and
    degree on SO(3), the Lebedev product's size, and :func:`lower_bound`. Needs no scipy."""
    rows = []
    for L in range(1, max_degree + 1):
        size, _ = min(_so3_candidates(L), key=lambda c: c[0])
        order = _lebedev_order(L, positive=False)
        rows.append({"degree": L, "design": size, "lebedev_order": order, "lebedev_points": LEBEDEV_POINTS[order],
                     "lebedev_product": LEBEDEV_POINTS[order] * (L + 1), "lower_bound": lower_bound(L)})
    return rows
