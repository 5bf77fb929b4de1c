"""The ``"cpu"`` and ``"cuda"`` backends: the kernels of the compiled extension ``fastequiv._C``.

The per-element math is kernels/*.cuh, compiled both into the C++ CPU kernels (csrc/,
OpenMP) and the CUDA kernels (kernels/*.cu, nvcc). The host side (argument checks,
outputs, dtypes) is :mod:`.host`, shared with the CuPy backend; this module only says how
a kernel is started: ``fastequiv._C.<name>_cpu(...)``, or ``<name>_cuda(..., stream)`` on
torch's current stream of the tensors' device. Nothing syncs with the host on CUDA: the
Philox seed is read by the kernel from device memory, and ``reduce_rows``' per-sample sums
are added with atomics (so they may differ between runs by rounding; under
``torch.use_deterministic_algorithms(True)`` twirl_reduce does not use them, see
:func:`fastequiv.ops.twirl_reduce.atomic_sums`). The ``"cuda"`` backend is available on a
GPU only when one of the architectures the extension was built for runs on it
(:func:`arch_runs_on`).

``backend="auto"`` picks ``"cpu"`` for CPU tensors for every row op (each measured faster
than the torch reference on a 2-core CPU, see benchmarks/RESULTS.md), and for
``voxels_resample``, whose exact (cube-group) path is the ``cube_copies`` kernel (its
trilinear path is the reference's ``grid_sample``; ``voxels_reduce`` has no CPU kernel).
"""

from __future__ import annotations

import functools
import re
from typing import Optional

import torch

from . import extension, host, registry


def arch_runs_on(arch: str, capability: tuple[int, int]) -> Optional[bool]:
    """Whether code built for the CMake CUDA architecture ``arch`` runs on a device of compute
    capability ``capability``, by CUDA's compatibility rules; ``None`` for an entry that
    names no architecture (``native``, ``all``, ``all-major``: the build resolved those).

    * ``"XY-real"``: SASS for sm_XY, which runs on devices of the same major version and a
      minor version of at least Y (sm_80 runs on 8.0, 8.6, 8.9; sm_90 on 9.0 only).
    * ``"XY-virtual"``: PTX for compute_XY, which the driver compiles for any device of
      capability X.Y or newer.
    * ``"XY"``: both (CMake's default), so it runs wherever either does.
    * ``"XYa"`` (architecture-specific, e.g. 90a): only on capability X.Y exactly; ``"XYf"``
      (family-specific, e.g. 100f): on the same major version, minor at least Y.
    """
    m = re.fullmatch(r"(\d+)(\d)([af]?)(?:-(real|virtual))?", arch.strip())
    if m is None:
        return None
    built, suffix, kind = (int(m.group(1)), int(m.group(2))), m.group(3), m.group(4)
    if suffix == "a":
        return capability == built
    same_major = capability[0] == built[0] and capability[1] >= built[1]
    if suffix == "f" or kind == "real":
        return same_major
    if kind == "virtual":
        return capability >= built
    return same_major or capability >= built


def cuda_arch_mismatch(capability: tuple[int, int], archs: list) -> Optional[str]:
    """Why kernels built for ``archs`` (``build_info()["cuda_archs"]``) cannot run on a device
    of compute capability ``capability``, or ``None`` when one of them runs there (or an
    entry cannot be read, e.g. ``native``: the build knew its GPU)."""
    runs = [arch_runs_on(a, tuple(capability)) for a in archs]
    if not archs or any(r is None or r for r in runs):
        return None
    major, minor = capability
    return (f"fastequiv._C was built for CUDA architectures {list(archs)}, none of which runs on this GPU "
            f"(compute capability {major}.{minor}): reinstall with "
            f"CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES={major}{minor} pip install .")


@functools.lru_cache(maxsize=None)
def _device_mismatch(index: Optional[int]) -> Optional[str]:
    archs = extension.load().build_info()["cuda_archs"]
    return cuda_arch_mismatch(torch.cuda.get_device_capability(index), archs)


def available(device_type: str):
    """The availability check of the ``device_type`` backend ("cpu" or "cuda")."""

    def check(device: torch.device) -> Optional[str]:
        ext = extension.load()
        if ext is None:
            return f"fastequiv._C is not importable ({extension.load_error()})"
        if not hasattr(ext, "reduce_rows_cpu"):
            return "fastequiv._C predates the row kernels (reinstall fastequiv to rebuild it)"
        if device_type == "cuda" and not hasattr(ext, "reduce_rows_cuda"):
            return "fastequiv._C was built without CUDA (reinstall with nvcc on PATH or FASTEQUIV_CUDA=ON)"
        if torch.device(device).type != device_type:
            return f"it runs on {device_type} tensors"
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return "torch sees no CUDA device"
            return _device_mismatch(torch.device(device).index)
        return None

    return check


def launcher(device_type: str):
    """``launch(name, device, *args)``: ``fastequiv._C.<name>_<device_type>(*args)``, plus
    torch's current stream on CUDA. On the CPU the row kernels take data pointers instead
    (:data:`RAW`): :mod:`.host` has checked their arrays."""

    def launch(name: str, device: torch.device, *args) -> None:
        ext = extension.load()
        if device_type == "cuda":
            getattr(ext, f"{name}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)
        elif name in RAW:
            RAW[name](ext, *args)
        else:
            getattr(ext, f"{name}_cpu")(*args)

    return launch


def _rotate_rows(C, x, M, sample, P, center, out):
    K, B, d = M.shape[:3]
    C.rotate_rows_raw_cpu(x.data_ptr(), M.data_ptr(), ptr(sample), P, center.data_ptr(), out.data_ptr(), K,
                          x.shape[0], B, d, CODES[x.dtype], CODES[M.dtype])


def _rotate_rows_backward(C, grad, M, sample, P, out):
    K, B, d = M.shape[:3]
    C.rotate_rows_backward_raw_cpu(grad.data_ptr(), M.data_ptr(), ptr(sample), P, out.data_ptr(), K, grad.shape[1],
                                   B, d, CODES[grad.dtype], CODES[M.dtype])


def _reduce_rows(C, out, M, target, sample, P, valid, center, mean, sums, weights=None):
    K, B, d = M.shape[:3]
    C.reduce_rows_raw_cpu(out.data_ptr(), M.data_ptr(), target.data_ptr(), ptr(sample), P, ptr(valid),
                          center.data_ptr(), mean.data_ptr(), sums.data_ptr(), K, out.shape[1], B, d,
                          CODES[out.dtype], CODES[target.dtype], CODES[M.dtype], ptr(weights))


def _reduce_rows_backward(C, grad_mean, grad_sums, out, M, target, sample, P, valid, center, mean, grad_out,
                          weights=None):
    K, B, d = M.shape[:3]
    C.reduce_rows_backward_raw_cpu(ptr(grad_mean), grad_sums.data_ptr(), out.data_ptr(), M.data_ptr(),
                                   target.data_ptr(), ptr(sample), P, ptr(valid), center.data_ptr(), mean.data_ptr(),
                                   grad_out.data_ptr(), K, out.shape[1], B, d, CODES[out.dtype],
                                   CODES[target.dtype], CODES[M.dtype], ptr(weights))


def _cube_copies(C, x, M, out):
    C.cube_copies_raw_cpu(x.data_ptr(), M.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.shape[2], M.shape[0],
                          CODES[x.dtype])


#: the CPU kernels on data pointers, with the arguments their launches get (those of the
#: *_cpu bindings; cube_copies' M in the grid's dtype)
RAW = {"rotate_rows": _rotate_rows, "rotate_rows_backward": _rotate_rows_backward, "reduce_rows": _reduce_rows,
       "reduce_rows_backward": _reduce_rows_backward, "cube_copies": _cube_copies}


for _kind in ("cpu", "cuda"):
    for _name, _impl in host.row_ops(_kind, launcher(_kind)).items():
        _impl.__name__ = _impl.__qualname__ = f"{_name}_{_kind}"
        registry.register(_name, _kind, available=available(_kind))(_impl)

for _name in host.ROW_OPS:
    registry.set_auto_order(_name, "cpu", ("cpu",))

# voxel grids: the cube-group copies on the CPU (no CUDA kernel here; Triton has the GPU's)
_resample = host.voxels_resample(launcher("cpu"))
_resample.__name__ = _resample.__qualname__ = "voxels_resample_cpu"
registry.register("voxels_resample", "cpu", available=available("cpu"))(_resample)
registry.set_auto_order("voxels_resample", "cpu", ("cpu",))


# --- the hot path: the kernels on data pointers ------------------------------------------------
# The measuring functions (fastequiv.stacking.CallPlan, fastequiv.ops.decomposition) call
# fastequiv._C's *_raw_cpu entry points with data pointers and sizes: they hand over only
# contiguous CPU arrays of the shapes and dtypes they checked, once per call or once per plan.

#: the dtype codes of the raw entry points (fastequiv::Dtype in csrc/rows.h)
CODES = {torch.float32: 2, torch.float64: 3}


def raw():
    """``fastequiv._C`` (loaded: the caller has resolved the ``"cpu"`` backend)."""
    return extension.load()


def ptr(t: Optional[torch.Tensor]) -> int:
    """The data pointer of ``t``, 0 for None."""
    return 0 if t is None else t.data_ptr()
