"""GPU benchmarks of the Triton kernels against the pure-torch row-level reference.

Run: ``pytest benchmarks/test_bench_triton.py --benchmark-only`` on a machine with a CUDA
GPU (every case skips without one; the kernels' correctness is tested on CPU in
``tests/test_triton.py``). Each group times the Triton kernel and the ``_rows`` reference
on the same inputs in the same run, and records in ``extra_info`` the size, the bytes the
op must move at least (compulsory reads and writes) and the bandwidth achieved with
them, ``GB/s``, from the mean time.
"""

import pytest
import torch

import fastequiv as fe
import fastequiv._triton  # noqa: F401  (registers the "triton" backend)
from fastequiv import _backend
from fastequiv.ops import _rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton benchmarks need a CUDA GPU")

IMPLS = ["triton", "torch"]
ELEMENTS = 10_000_000  # K * N * d of the stacked outputs


def size_of(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _impl(op, name):
    if name == "torch":
        return getattr(_rows, op)
    return _backend.resolve(op, "triton", "cuda")[1]


def _run(benchmark, fn, args, bytes_moved, **info):
    def call():
        fn(*args)
        torch.cuda.synchronize()

    call()  # compile / warm up outside the timing
    benchmark.extra_info.update(info, bytes=bytes_moved)
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = round(bytes_moved / benchmark.stats.stats.mean / 1e9, 1)


def _rows_case(K, d, dtype, graph, P=1000):
    N = ELEMENTS // (K * d)
    B = max(1, N // P)
    N = B * P
    dev = "cuda"
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    sample = torch.arange(N, device=dev) // P if graph else None
    M = fe.random_rotations(K * B, seed=0, device=dev, dtype=acc).reshape(K, B, 3, 3)
    if d != 3:
        M = torch.randn(K, B, d, d, device=dev, dtype=acc)
    return N, B, 0 if graph else P, sample, M


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [2, 8])
def test_rotate_rows(benchmark, impl, dtype, K):
    benchmark.group = f"rotate_rows K={K} d=3 {dtype} 1e7 out elements"
    N, B, P, sample, M = _rows_case(K, 3, dtype, graph=False)
    x = torch.randn(N, 3, device="cuda", dtype=dtype)
    _run(benchmark, _impl("rotate_rows", impl), (x, M, sample, P, None), (1 + K) * N * 3 * size_of(dtype), N=N, K=K)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("K", [2, 8])
def test_rotate_rows_backward(benchmark, impl, K):
    benchmark.group = f"rotate_rows_backward K={K} d=3 float32 1e7 grad elements"
    N, B, P, sample, M = _rows_case(K, 3, torch.float32, graph=False)
    grad = torch.randn(K, N, 3, device="cuda")
    _run(benchmark, _impl("rotate_rows_backward", impl), (grad, M, sample, P), (K + 1) * N * 3 * 4, N=N, K=K)


def _reduce_inputs(K, d, dtype, graph):
    N, B, P, sample, M = _rows_case(K, d, dtype, graph)
    out = torch.randn(K, N, d, device="cuda", dtype=dtype)
    target = torch.randn(N, d, device="cuda", dtype=dtype)
    valid = torch.rand(N, device="cuda") > 0.1
    return N, B, (out, M, target, sample, P, valid, None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("K,d", [(2, 3), (8, 3), (4, 9)])
def test_reduce_rows(benchmark, impl, dtype, graph, K, d):
    benchmark.group = f"reduce_rows K={K} d={d} {dtype} {'graph' if graph else 'dense'} 1e7 elements"
    N, B, args = _reduce_inputs(K, d, dtype, graph)
    # read out and target (and valid, sample), write the float32 mean
    moved = (K + 1) * N * d * size_of(dtype) + N * d * 4 + N * (1 + (8 if graph else 0))
    _run(benchmark, _impl("reduce_rows", impl), args + (B,), moved, N=N, K=K)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K,d", [(2, 3), (8, 3)])
def test_reduce_rows_backward(benchmark, impl, dtype, K, d):
    benchmark.group = f"reduce_rows_backward K={K} d={d} {dtype} 1e7 elements"
    N, B, (out, M, target, sample, P, valid, center) = _reduce_inputs(K, d, dtype, graph=False)
    mean, _ = _rows.reduce_rows(out, M, target, sample, P, valid, center, B)
    grad_sums = torch.randn(3, B, device="cuda")
    args = (None, grad_sums, out, M, target, sample, P, valid, center, mean)
    # read out, target, mean; write the gradient of out
    moved = 2 * K * N * d * size_of(dtype) + N * d * (size_of(dtype) + 4) + N
    _run(benchmark, _impl("reduce_rows_backward", impl), args, moved, N=N, K=K)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_rotations_seeded(benchmark, impl, dtype):
    n = 10_000_000
    benchmark.group = f"random_rotations_seeded 1e7 {dtype}"
    seed = torch.tensor(7, device="cuda")
    _run(benchmark, _impl("random_rotations_seeded", impl), (seed, n, 0, False, dtype), n * 9 * size_of(dtype), n=n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lmax", [4, 10])
def test_wigner_blocks(benchmark, impl, lmax):
    n = 100_000
    benchmark.group = f"wigner_blocks l<={lmax} 1e5 float32"
    R = fe.random_rotations(n, seed=1, device="cuda", dtype=torch.float32)
    S = (lmax + 1) * (2 * lmax + 1) * (2 * lmax + 3) // 3
    _run(benchmark, _impl("wigner_blocks", impl), (R, lmax), n * (9 + S) * 4, n=n)


def test_wigner_e3nn(benchmark):
    """The peer of test_wigner_blocks at l <= 4: e3nn's D_from_matrix on the same rotations."""
    from e3nn import o3

    n = 100_000
    benchmark.group = "wigner_blocks l<=4 1e5 float32"
    R = fe.random_rotations(n, seed=1, device="cuda", dtype=torch.float32)
    irreps = o3.Irreps("0e + 1o + 2e + 3o + 4e")
    _run(benchmark, irreps.D_from_matrix, (R,), n * (9 + irreps.dim ** 2) * 4, n=n)


@pytest.mark.parametrize("K", [2, 8])
def test_reduce_plain_loop(benchmark, K):
    """The peer of test_reduce_rows (dense, d = 3, float32): what users write today, a
    Python loop over the K copies that back-rotates each one and reduces with torch."""
    d, dtype = 3, torch.float32
    benchmark.group = f"reduce_rows K={K} d={d} {dtype} dense 1e7 elements"
    N, B, (out, M, target, sample, P, valid, center) = _reduce_inputs(K, d, dtype, graph=False)
    o = out.reshape(K, B, P, d)
    y = target.reshape(B, P, d)

    def loop():
        a = [o[k] @ M[k] for k in range(K)]
        abar = sum(a) / K
        total = sum(((ak - y) ** 2).sum((1, 2)) for ak in a) / K
        spread = sum(((ak - abar) ** 2).sum((1, 2)) for ak in a) / K
        return abar, total, spread

    moved = (K + 1) * N * d * size_of(dtype) + N * d * 4
    _run(benchmark, loop, (), moved, N=N, K=K)
