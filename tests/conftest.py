"""Test-session setup shared by every test file, and the pieces the op tests share.

* On a machine without a CUDA device the Triton kernels run in Triton's CPU interpreter:
  ``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported (and before
  :mod:`fastequiv.backends.triton` reads it, on import), which is why it is set here,
  before any test module imports fastequiv.
* :func:`assert_close_dtype`: a result against its reference, to the bound of its dtype in
  the package's one tolerance table (:data:`fastequiv.tolerances.TOL`).
* :data:`BACKENDS` / :data:`KERNELS` / :func:`backend_params`: the backend
  parametrisation of the per-op test files (tests/test_<op>.py). Every backend is listed
  everywhere; one that cannot run here is skipped with the reason: ``"cuda"`` without a
  GPU, ``"cupy"`` without cupy and a GPU, ``"triton"`` without triton. ``"torch"`` and
  ``"cpu"`` (the C++ kernels of ``fastequiv._C``, part of every install) are never
  skipped: a missing extension fails the ``"cpu"`` cases.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# fastequiv is imported where it is used, not here: a package that fails to import fails
# the tests that use it, not the collection of every test file

GPU = torch.cuda.is_available()

# --- tolerances --------------------------------------------------------------------------------
# The bounds live in the package (fastequiv.tolerances, shared with ``fastequiv check``),
# each with its reason; a test that needs another bound says so where it uses it.


def assert_close_dtype(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = None, msg=None,
                       unit: bool = False) -> None:
    """``got`` equals ``want`` to the tolerance of ``dtype`` (default: ``want.dtype``).

    Tensors of one dtype are compared as they are (so the dtype is checked too), on the
    CPU; tensors of different dtypes (a float32 result against a float64 reference) are
    compared in float64. ``unit``: values at most 1 in magnitude, held to ``atol`` alone.
    """
    from fastequiv.tolerances import TOL

    dtype = dtype or want.dtype
    bound = dict(TOL[dtype], rtol=0) if unit else TOL[dtype]
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.dtype != want.dtype:
        got, want = got.double(), want.double()
    if msg is not None and not callable(msg):
        text = msg
        msg = lambda m: f"{text}: {m}"  # noqa: E731
    torch.testing.assert_close(got, want, **bound, msg=msg)


def acc_of(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the row contract: float64 if any of ``dtypes`` is, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# --- backends ----------------------------------------------------------------------------------

#: the compiled backends, each tested against the torch reference
COMPILED = ("cpu", "triton", "cuda", "cupy")


def device_of(backend: str) -> str:
    """The device a backend's tests run on: CUDA for ``"cuda"`` and ``"cupy"``, and for
    ``"triton"`` on a machine with a GPU (its interpreter runs CPU tensors otherwise)."""
    return "cuda" if backend in ("cuda", "cupy") or (backend == "triton" and GPU) else "cpu"


def skip_reason(backend: str):
    """Why ``backend``'s cases are skipped on this machine, or ``None``.

    Only a missing GPU, a missing cupy or a missing triton skips: ``"cpu"`` never does,
    and on a machine with a GPU ``"cuda"`` runs (an extension built without CUDA fails).
    """
    if backend in ("torch", "cpu"):
        return None
    if backend == "cuda":
        return None if GPU else "needs a CUDA GPU (the 'cpu' cases run the same kernels/*.cuh math)"
    if backend == "cupy":
        if not GPU:
            return "needs cupy and a CUDA GPU (the 'cpu' cases run the same kernels/*.cuh math)"
        from fastequiv.backends import cupy

        return cupy.available(torch.device("cuda"))
    if backend == "triton":
        from fastequiv.backends import triton

        return triton.available(torch.device(device_of("triton")))
    raise ValueError(f"unknown backend {backend!r}")


def backend_params(*names: str) -> list:
    """``pytest.param`` of each backend, skipped (with the reason) where it cannot run,
    and marked ``gpu`` where it needs one."""
    params = []
    for name in names:
        marks = [pytest.mark.gpu] if device_of(name) == "cuda" and name != "triton" else []
        why = skip_reason(name)
        if why is not None:
            marks.append(pytest.mark.skip(reason=f"backend {name!r}: {why}"))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


#: every backend, the torch reference first
BACKENDS = backend_params("torch", *COMPILED)
#: every compiled backend (tested against the torch reference)
KERNELS = backend_params(*COMPILED)


def kernel(op: str, backend: str):
    """``backend``'s implementation of the registry op ``op`` on its test device."""
    from fastequiv.backends import registry

    name, impl = registry.resolve(op, backend, device_of(backend))
    assert name == backend
    return impl
