"""The fused ops behind the public API, each dispatched through ``backend=``.

* :func:`rotate_copies`: the K rotated copies of an input, stacked along dim 0.
* :func:`twirl_reduce`: back-rotation of K stacked outputs, the twirled mean and the
  per-sample sums of the loss decomposition, in one pass.
* :func:`wigner_D`: real Wigner-D matrices in e3nn's basis.

The ``"torch"`` implementation of each op is the reference every other backend is
checked against. Each compiled backend registers its kernels for the row-level contract
of :mod:`fastequiv.ops._rows` on import (cheaply: triton and cupy are imported on first use).
"""

from .. import _cupy, _native, _triton  # noqa: F401  (register the compiled backends)

from ..wigner import wigner_D
from .rotate_copies import rotate_copies
from .twirl_reduce import TwirlSums, twirl_reduce

__all__ = ["rotate_copies", "twirl_reduce", "TwirlSums", "wigner_D"]
