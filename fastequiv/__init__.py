"""fastequiv: how much of a model's loss comes from imperfect rotational symmetry.

    import fastequiv as fe
    spec = fe.Spec(inputs={"pos": "position", "z": "scalar"}, output="vector")
    d = fe.equivariance_error(model, {"pos": pos, "z": z}, target=forces, spec=spec, samples=8)
    d.total, d.mean, d.equiv, d.pct

The math and the performance targets: docs/design.md in the repository. Every function
that computes takes ``backend=`` ("auto", "torch", "triton", "cpu", "cuda", "cupy").
"""

from .backends import BackendUnavailableError, build_info
from .backends import extension as _extension

_extension.warn_if_source_checkout()  # a source tree shadowing the installed package has no _C
from .estimators import Decomposition, LabelFree, Terms
from .groups import group_elements, matrix_to_quaternion, quaternion_to_matrix, random_quaternions
from .reps import Rep, Voxels
from .spec import Spec
from . import ops
from .ops import random_rotations, warmup, wigner_D
from .twirl import Twirled, equivariance_error, twirl_loss
from . import designs
from .design_twirl import design_error
from .adapted import Adapted
from .adapters import adapt
from . import distributed
from .monitor import EquivarianceMonitor
from .lie import lie_derivative, lie_loss
from .frames import FrameAveraged
from .penalty import EquivWeight
from . import voxels
from . import diagnostics

try:
    from importlib.metadata import version as _version

    __version__ = _version("fastequiv")
except Exception:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Adapted",
    "BackendUnavailableError",
    "Decomposition",
    "EquivWeight",
    "EquivarianceMonitor",
    "FrameAveraged",
    "LabelFree",
    "Rep",
    "Spec",
    "Terms",
    "Twirled",
    "Voxels",
    "adapt",
    "build_info",
    "design_error",
    "designs",
    "diagnostics",
    "equivariance_error",
    "group_elements",
    "lie_derivative",
    "lie_loss",
    "matrix_to_quaternion",
    "ops",
    "quaternion_to_matrix",
    "random_quaternions",
    "random_rotations",
    "twirl_loss",
    "voxels",
    "warmup",
    "wigner_D",
]
