"""The fused ops behind the public API, each dispatched through ``backend=``.

One file per op, each holding its public function, its pure-torch reference (the ground
truth every backend is tested against) and its ``torch.library`` registration (fake +
autograd) side by side:

* :mod:`.rotate_copies`: the K rotated copies of an input, stacked along dim 0.
* :mod:`.twirl_reduce`: back-rotation of K stacked outputs, the twirled mean and the
  per-sample sums of the loss decomposition, in one pass.
* :mod:`.wigner_d`: real Wigner-D matrices in e3nn's basis.
* :mod:`.random_rotations`: seeded Haar rotations (Philox), the same on every backend.
* :mod:`.voxels`: the same two ops for fields on a grid.
* :mod:`.warmup`: every table a step reads, built on its device before a CUDA graph is
  captured.

Shared pieces: :mod:`.layout` (the row contract, masks), :mod:`.action` (each copy's
matrices, built once per step), :mod:`.interop` (CuPy/NumPy arrays). The compiled
backends (:mod:`fastequiv.backends`) register their kernels on import.
"""

from .. import backends  # noqa: F401  (registers the compiled backends)

from .action import Action
from .layout import TwirlSums
from .random_rotations import random_rotations
from .rotate_copies import rotate_copies
from .twirl_reduce import twirl_reduce
from .warmup import warmup
from .wigner_d import wigner_D

__all__ = ["Action", "TwirlSums", "random_rotations", "rotate_copies", "twirl_reduce", "warmup", "wigner_D"]
