"""wigner_D: real Wigner-D matrices in e3nn's basis, with the packed blocks on any backend.

* :func:`wigner_blocks_reference` is the pure-torch reference of the ``wigner_blocks``
  kernel (the Ivanic–Ruedenberg recursion of :mod:`fastequiv.wigner`), differentiable
  with respect to ``R``;
* ``torch.ops.fastequiv.wigner_blocks`` is the same op on a compiled backend (fake
  registration for ``torch.compile``; no gradient with respect to ``R``: asking for one
  raises);
* :func:`wigner_D` is the public function, :func:`wigner_D_key` the unchecked form the
  ops use inside a step. Both assemble the block-diagonal matrix from the packed blocks
  in one gather (:func:`fastequiv.wigner.assemble`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import registry
from ..groups import orientation
from ..wigner import assemble, check_R, irreps_key, key_lmax, packed_blocks, packed_width, parse_irreps

__all__ = ["wigner_D", "wigner_D_key", "packed_blocks_of", "wigner_blocks_reference"]


def wigner_blocks_reference(R: Tensor, lmax: int) -> Tensor:
    """Reference of ``torch.ops.fastequiv.wigner_blocks``: packed blocks ``D_0 .. D_lmax``
    of proper rotations ``R`` ``(N, 3, 3)``, ``(N, S)`` in ``R.dtype`` with
    ``S = sum_l (2l+1)^2``; block ``l`` row-major at column ``sum_{l' < l} (2l'+1)^2``."""
    return packed_blocks(R, lmax)


registry.register("wigner_blocks", "torch")(wigner_blocks_reference)


@torch.library.custom_op("fastequiv::wigner_blocks", mutates_args=())
def wigner_blocks(R: Tensor, lmax: int, backend: str) -> Tensor:
    return registry.implementation("wigner_blocks", backend)(R, lmax)


@wigner_blocks.register_fake
def _(R, lmax, backend):
    return R.new_empty((R.shape[0], packed_width(lmax)))


def wigner_D_key(key: tuple[tuple[int, int, int], ...], R: Tensor, backend: str = "auto") -> Tensor:
    """:func:`wigner_D` of the irreps ``key`` (:func:`fastequiv.wigner.irreps_key`),
    unchecked: the form the ops use inside a step. ``backend`` may be ``"auto"``, which
    picks the torch reference where ``R`` requires grad (the kernels do not differentiate
    with respect to ``R``)."""
    batch = R.shape[:-2]
    packed, sign = packed_blocks_of(R.reshape(-1, 3, 3), key_lmax(key), backend)
    out = assemble(key, packed, sign)
    return out.reshape(*batch, *out.shape[-2:])


def packed_blocks_of(R: Tensor, lmax: int, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(packed, sign)``: the packed blocks ``(n, S)`` of the proper parts of the
    orthogonal ``R`` ``(n, 3, 3)`` on ``backend`` (the torch reference where ``R`` requires
    grad and ``backend`` is ``"auto"``), and their orientation ``(n,)``."""
    sign = orientation(R)
    proper = R * sign[:, None, None]
    if R.requires_grad and backend == "auto":
        backend = "torch"
    name = registry.resolve_name("wigner_blocks", backend, R.device)
    if name == "torch":
        return wigner_blocks_reference(proper, lmax), sign
    if R.requires_grad:
        raise ValueError(f"backend={backend!r} does not differentiate wigner_D with respect to R, which "
                         "requires grad; use backend='torch' (or 'auto')")
    work = proper if proper.dtype in (torch.float32, torch.float64) else proper.float()
    return wigner_blocks(work.contiguous(), lmax, name).to(R.dtype), sign


def wigner_D(irreps, R: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Block-diagonal real Wigner-D matrix of ``irreps`` for rotations ``R``, e3nn basis.

    Args:
        irreps: an ``e3nn.o3.Irreps`` or a string such as ``"2x0e + 1x1o + 1x2e"``.
        R: orthogonal matrices of shape ``(..., 3, 3)`` (any batch shape, including none
            and size 0), any float dtype and device. Improper ``R`` (``det R < 0``) act
            with e3nn's parity rule ``D = p**k * D_l(-R)``, ``k = 1`` when ``det R < 0``.
        backend: ``"auto"`` or a backend name; see :mod:`fastequiv.backends`.

    Returns:
        Tensor of shape ``(..., irreps.dim, irreps.dim)``, block diagonal in the order of
        ``irreps`` (each of ``mul`` copies is its own block), equal to
        ``o3.Irreps(irreps).D_from_matrix(R)``. Differentiable with respect to ``R`` on the
        torch backend (``"auto"`` picks it when ``R`` requires grad).

    Raises:
        ValueError: ``R`` is not ``(..., 3, 3)`` floating point, or ``irreps`` is not
            a valid irreps.
        fastequiv.BackendUnavailableError: ``backend`` cannot run here.
    """
    irreps = parse_irreps(irreps)
    check_R(R)
    registry.check_backend(backend)
    return wigner_D_key(irreps_key(irreps), R, backend)
