"""The ``"cpu"`` and ``"cuda"`` backends: the kernels of the compiled extension ``fastequiv._C``.

The per-element math is kernels/*.cuh, compiled both into the C++ CPU kernels (csrc/,
OpenMP) and the CUDA kernels (kernels/*.cu, nvcc). The host side (argument checks,
outputs, dtypes) is :mod:`.host`, shared with the CuPy backend; this module only says how
a kernel is started: ``fastequiv._C.<name>_cpu(...)``, or ``<name>_cuda(..., stream)`` on
torch's current stream of the tensors' device. Nothing syncs with the host on CUDA: the
Philox seed is read by the kernel from device memory, and ``reduce_rows``' per-sample sums
are added with atomics (so they may differ between runs by rounding).

``backend="auto"`` picks ``"cpu"`` for CPU tensors for every row op (each measured faster
than the torch reference on a 2-core CPU, see benchmarks/RESULTS.md), and for
``voxels_resample``, whose exact (cube-group) path is the ``cube_copies`` kernel (its
trilinear path is the reference's ``grid_sample``; ``voxels_reduce`` has no CPU kernel).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import extension, host, registry


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
        if device_type == "cuda" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    return check


def launcher(device_type: str):
    """``launch(name, device, *args)``: ``fastequiv._C.<name>_<device_type>(*args)``, plus
    torch's current stream on CUDA."""

    def launch(name: str, device: torch.device, *args) -> None:
        fn = getattr(extension.load(), f"{name}_{device_type}")
        if device_type == "cuda":
            fn(*args, torch.cuda.current_stream(device).cuda_stream)
        else:
            fn(*args)

    return launch


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
