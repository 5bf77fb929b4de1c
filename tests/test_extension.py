"""The compiled extension fastequiv._C: build info, Philox-4x32-10 known answers, random
rotations checked against an independent NumPy implementation of the same scheme (Philox
in uint64 arithmetic, Shoemake quaternion in float64), and the C++ entry points of the row
kernels on NumPy arrays with their argument checks.

What the kernels compute through torch tensors, on every backend, is tested in the per-op
files (tests/test_<op>.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from opdata import Case
from vectors import PHILOX_KAT

import fastequiv as fe
from fastequiv import backends
from fastequiv.backends import extension as _extension
from fastequiv.backends.host import wigner_term_table
from fastequiv.ops.rotate_copies import rotate_rows_backward_reference, rotate_rows_reference
from fastequiv.ops.twirl_reduce import reduce_rows_backward_reference, reduce_rows_reference
from fastequiv.ops.wigner_d import wigner_blocks_reference


@pytest.fixture(scope="module")
def C():
    ext = _extension.load()
    if ext is None:
        pytest.fail(f"fastequiv._C did not import: {_extension.load_error()}")
    return ext


# --- independent NumPy reference -------------------------------------------------------------

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
MASK32 = np.uint64(0xFFFFFFFF)


def philox_numpy(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 on arrays of uint32 values held in uint64 (products fit in 64 bits)."""
    c = [np.asarray(v, dtype=np.uint64) for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for r in range(10):
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c


def rotations_numpy(n, seed, offset=0, improper=False):
    """(n, 3, 3) float64 rotations offset .. offset + n - 1 of the stream `seed`, and the
    improper flags."""
    i = np.arange(n, dtype=np.uint64) + np.uint64(offset)
    x0, x1, x2, x3 = philox_numpy(i & MASK32, i >> np.uint64(32), 0, 0, seed & 0xFFFFFFFF, seed >> 32)
    u0, u1, u2 = ((x >> np.uint64(8)).astype(np.float64) * 2.0**-24 for x in (x0, x1, x2))
    a, b = np.sqrt(1 - u0), np.sqrt(u0)
    w, x = a * np.sin(2 * np.pi * u1), a * np.cos(2 * np.pi * u1)
    y, z = b * np.sin(2 * np.pi * u2), b * np.cos(2 * np.pi * u2)
    R = np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
    flags = (x3 & np.uint64(1)).astype(bool) if improper else np.zeros(n, dtype=bool)
    R[flags] *= -1
    return R, flags


def draw(C, n, seed, offset=0, improper=False, dtype=np.float64):
    out = np.empty((n, 3, 3), dtype=dtype)
    C.random_rotations_cpu(out, seed, offset, improper)
    return out


# --- build info ----------------------------------------------------------------------------


def test_native_build_info(C):
    info = C.build_info()
    assert set(info) == {"cuda", "cuda_archs", "openmp", "compiler", "cpu_capability", "cuda_requested",
                         "cuda_compiler_found"}
    assert info["cuda_requested"] in ("AUTO", "ON", "OFF") and isinstance(info["cuda_compiler_found"], bool)
    assert info["cpu_capability"] in ("default", "avx2")
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert bool(info["cuda_archs"]) == info["cuda"]
    assert hasattr(C, "random_rotations_cuda") == info["cuda"]


def test_build_info():
    info = backends.build_info()
    types = {"version": str, "extension": bool, "cuda": bool, "cuda_archs": list, "openmp": bool, "backends": list,
             "torch_cuda": bool, "unavailable": dict}
    for key, typ in types.items():
        assert isinstance(info[key], typ), (key, info[key])
    assert info["extension_error"] is None or isinstance(info["extension_error"], str)
    assert info["backends"][0] == "torch"
    assert set(info["backends"]) <= {"torch", "cpu", "cuda", "triton", "cupy"}
    assert ("cpu" in info["backends"]) == info["extension"]
    if info["extension"]:
        assert info["extension_error"] is None
    assert info["torch_cuda"] == torch.cuda.is_available()
    assert info["cpu_capability"] in (("default", "avx2") if info["extension"] else (None,))
    # every backend either runs here or says why not
    assert set(info["backends"]) | set(info["unavailable"]) == {"torch", "cpu", "cuda", "triton", "cupy"}
    assert not set(info["backends"]) & set(info["unavailable"])
    assert all(isinstance(why, str) and why for why in info["unavailable"].values())
    if not info["torch_cuda"]:
        assert "cuda" in info["unavailable"]


# The row kernels over dense and graph rows, every row width branch, both float types, with
# and without centres and masks; run in this process and under FASTEQUIV_CPU_CAPABILITY.
_VARIANT_CODE = """
import torch
import fastequiv._C as C

def run():
    g = torch.Generator().manual_seed(0)
    results = {}
    for dtype in (torch.float32, torch.float64):
        for d, P, sample in ((3, 301, None), (3, 0, "graph"), (3, 0, "sorted"), (1, 7, None), (5, 9, None)):
            K, B = 3, 4
            N = B * P - 1 if P else 37 if sample == "graph" else 1001
            s = None if sample is None else torch.randint(0, B, (N,), generator=g)
            if sample == "sorted":  # runs of rows of one sample: the tiled kernels
                s = s.sort().values
            x = torch.randn(N, d, generator=g, dtype=dtype)
            M = torch.randn(K, B, d, d, generator=g, dtype=dtype)
            out = torch.randn(K, N, d, generator=g, dtype=dtype)
            y = torch.randn(N, d, generator=g, dtype=dtype)
            centre = torch.randn(K, B, d, generator=g, dtype=dtype)
            valid = torch.rand(N, generator=g) > 0.3
            gsums = torch.randn(3, B, generator=g, dtype=dtype)
            gmean = torch.randn(N, d, generator=g, dtype=dtype)
            key = f"{dtype}-{d}-{P}-{sample}"
            rot = torch.empty(K, N, d, dtype=dtype)
            C.rotate_rows_cpu(x, M, s, P, centre[0], rot)
            back = torch.empty(N, d, dtype=dtype)
            C.rotate_rows_backward_cpu(out, M, s, P, back)
            mean, sums = torch.empty(N, d, dtype=dtype), torch.zeros(3, B, dtype=dtype)
            C.reduce_rows_cpu(out, M, y, s, P, valid, centre, mean, sums)
            grad = torch.empty(K, N, d, dtype=dtype)
            C.reduce_rows_backward_cpu(gmean, gsums, out, M, y, s, P, valid, centre, mean, grad)
            results.update({key + "/rotate": rot, key + "/rotate_backward": back, key + "/mean": mean,
                            key + "/sums": sums, key + "/reduce_backward": grad})
    return results
"""


def test_cpu_variants_agree_bit_for_bit(C, tmp_path):
    """The AVX2 build of the row kernels and the baseline build (forced with
    FASTEQUIV_CPU_CAPABILITY=default) give the same bits: no variant contracts to FMA."""
    if C.build_info()["cpu_capability"] == "default":
        pytest.skip("this build or CPU has no AVX2 variant to compare with the baseline")
    code = _VARIANT_CODE + f"\nprint(C.build_info()['cpu_capability'])\ntorch.save(run(), {str(tmp_path / 'base.pt')!r})\n"
    env = {**os.environ, "FASTEQUIV_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["default"]
    scope = {}
    exec(_VARIANT_CODE, scope)
    mine, base = scope["run"](), torch.load(tmp_path / "base.pt")
    assert set(mine) == set(base) and len(mine) == 50
    for key in mine:
        assert torch.equal(mine[key], base[key]), key


def test_built_with_cuda_when_the_build_found_nvcc(C):
    """The CUDA kernels are built exactly when the build asked for them (FASTEQUIV_CUDA AUTO
    or ON) and CMake found a CUDA compiler, as the build recorded it (the machine running
    the tests may differ from the one that built); ON without a compiler fails the build.
    FASTEQUIV_EXPECT_CUDA=1 is CI's expectation on a machine with nvcc: the build must
    have them."""
    native = C.build_info()
    due = native["cuda_requested"] != "OFF" and native["cuda_compiler_found"]
    assert native["cuda"] is due, native
    if native["cuda_requested"] == "ON":
        assert native["cuda"], native
    if native["cuda"]:
        assert "nvcc" in native["compiler"] and native["cuda_archs"]
    info = backends.build_info()
    assert info["cuda"] is native["cuda"] and info["cuda_archs"] == native["cuda_archs"]
    if os.environ.get("FASTEQUIV_EXPECT_CUDA") == "1":
        assert native["cuda"] is True, native


# --- Philox-4x32-10 ------------------------------------------------------------------------



@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(C, counter, key, expected):
    assert tuple(C.philox4x32_10(counter, key)) == expected


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_numpy_reference_philox_known_answers(counter, key, expected):
    got = philox_numpy(*counter, *key)
    assert tuple(int(v) for v in got) == expected


def test_philox_matches_numpy_on_random_inputs(C):
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**32, size=(50, 6), dtype=np.uint64)
    for w in words:
        want = tuple(int(v) for v in philox_numpy(*w))
        assert tuple(C.philox4x32_10(tuple(int(v) for v in w[:4]), (int(w[4]), int(w[5])))) == want


# --- random rotations on the CPU -----------------------------------------------------------


@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("improper", [False, True])
@pytest.mark.parametrize("seed, offset", [(0, 0), (7, 3), (2**63 - 1, 2**32 - 5)])
def test_rotations_match_numpy_reference(C, dtype, atol, improper, seed, offset):
    n = 2000
    got = draw(C, n, seed, offset, improper, dtype)
    want, _ = rotations_numpy(n, seed, offset, improper)
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rotations_are_orthonormal_with_det_one(C, dtype):
    R = draw(C, 5000, seed=11, dtype=dtype).astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=tol)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=tol)


def test_improper_elements_have_det_minus_one_about_half_the_time(C):
    n = 20000
    R = draw(C, n, seed=5, improper=True)
    det = np.linalg.det(R)
    np.testing.assert_allclose(np.abs(det), 1.0, atol=1e-12)
    _, flags = rotations_numpy(n, 5, improper=True)
    assert np.array_equal(det < 0, flags)
    frac = flags.mean()
    assert abs(frac - 0.5) < 4 * 0.5 / np.sqrt(n), frac
    # Without improper=True the same stream gives the proper rotations.
    proper = draw(C, n, seed=5)
    np.testing.assert_array_equal(np.where(flags[:, None, None], -proper, proper), R)


def test_rotations_are_haar_distributed(C):
    """Under Haar measure E[R] = 0 and E[R_ij^2] = 1/3."""
    R = draw(C, 100000, seed=3)
    np.testing.assert_allclose(R.mean(0), 0.0, atol=0.01)
    np.testing.assert_allclose((R**2).mean(0), 1 / 3, atol=0.01)


def test_same_seed_reproduces_other_seed_differs(C):
    a, b, c = draw(C, 64, seed=123), draw(C, 64, seed=123), draw(C, 64, seed=124)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).min(axis=(1, 2)).max() > 0 and not np.allclose(a, c)


def test_offset_selects_a_slice_of_the_stream(C):
    long = draw(C, 100, seed=9)
    np.testing.assert_array_equal(draw(C, 30, seed=9, offset=40), long[40:70])
    # The counter's high word: offsets past 2**32 must not wrap around to the start.
    assert not np.allclose(draw(C, 4, seed=9, offset=2**32), long[:4])


def test_empty_output_is_fine(C):
    assert draw(C, 0, seed=1).shape == (0, 3, 3)


@pytest.mark.parametrize(
    "out, match",
    [
        (np.empty((4, 3), np.float64), r"shape \(n, 3, 3\)"),
        (np.empty((4, 3, 4), np.float64), r"shape \(n, 3, 3\)"),
        (np.empty((4, 9), np.float32), r"shape \(n, 3, 3\)"),
        (np.empty((4, 3, 3), np.float16), "float32 or float64"),
        (np.empty((4, 3, 3), np.int32), "float32 or float64"),
        (np.empty((4, 3, 3), np.float64).transpose(0, 2, 1), "C-contiguous"),
        (np.empty((8, 3, 3), np.float64)[::2], "C-contiguous"),
    ],
)
def test_bad_output_arrays_raise_value_error(C, out, match):
    with pytest.raises(ValueError, match=match):
        C.random_rotations_cpu(out, 0, 0, False)


def test_seed_out_of_range_raises_value_error(C):
    with pytest.raises(ValueError, match="seed"):
        C.random_rotations_cpu(np.empty((2, 3, 3)), 2**63, 0, False)


def test_accepts_torch_tensors_in_place(C):
    torch = pytest.importorskip("torch")
    out = torch.empty(16, 3, 3, dtype=torch.float32)
    C.random_rotations_cpu(out, 4, 2, True)
    np.testing.assert_array_equal(out.numpy(), draw(C, 16, 4, 2, True, np.float32))


# --- CUDA (needs a GPU) --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("improper", [False, True])
def test_cuda_matches_cpu(C, dtype, improper):
    torch = pytest.importorskip("torch")
    if not C.build_info()["cuda"] or not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of fastequiv._C and a GPU")
    dt = getattr(torch, dtype)
    n, seed, offset = 100_003, 17, 2**32 - 50
    out = torch.empty(n, 3, 3, dtype=dt, device="cuda")
    C.random_rotations_cuda(out, seed, offset, improper, torch.cuda.current_stream().cuda_stream)
    want = torch.empty(n, 3, 3, dtype=dt)
    C.random_rotations_cpu(want, seed, offset, improper)
    # Device sin/cos/sqrt may differ from the host libm by an ulp or two.
    atol = 1e-6 if dtype == "float32" else 1e-12
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=atol)
    with pytest.raises(ValueError, match="CUDA"):
        C.random_rotations_cuda(torch.empty(2, 3, 3, dtype=dt), seed, 0, False, 0)


# --- the row kernels' C++ entry points on NumPy arrays (no torch tensors) -----------------------


def test_row_kernels_take_numpy_arrays(C):
    c = Case(K=3, B=3, P=4, d=3, dtype=torch.float64, layout="graph", center=True, mask=True)
    np_ = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in vars(c).items()}
    K, N, d, B = c.K, c.N, c.d, c.B
    out = np.empty((K, N, d))
    C.rotate_rows_cpu(np_["x"], np_["M"], np_["sample"], 0, np_["center_x"], out)
    np.testing.assert_allclose(out, rotate_rows_reference(c.x, c.M, c.sample, 0, c.center_x).numpy(), atol=1e-12)

    g = np.empty((N, d))
    C.rotate_rows_backward_cpu(np_["grad_rot"], np_["M"], np_["sample"], 0, g)
    np.testing.assert_allclose(g, rotate_rows_backward_reference(c.grad_rot, c.M, c.sample, 0).numpy(), atol=1e-11)

    mean, sums = np.empty((N, d)), np.full((3, B), np.nan)
    C.reduce_rows_cpu(np_["out"], np_["M"], np_["target"], np_["sample"], 0, np_["valid"], np_["center"], mean, sums)
    want_mean, want_sums = reduce_rows_reference(c.out, c.M, c.target, c.sample, 0, c.valid, c.center, B)
    np.testing.assert_allclose(mean, want_mean.numpy(), atol=1e-12)
    np.testing.assert_allclose(sums, want_sums.numpy(), atol=1e-10)

    grad_out = np.empty((K, N, d))
    C.reduce_rows_backward_cpu(None, np_["grad_sums"], np_["out"], np_["M"], np_["target"], np_["sample"], 0,
                               np_["valid"], np_["center"], mean, grad_out)
    want = reduce_rows_backward_reference(None, c.grad_sums, c.out, c.M, c.target, c.sample, 0, c.valid, c.center,
                                          want_mean)
    np.testing.assert_allclose(grad_out, want.numpy(), atol=1e-11)

    R = fe.random_rotations(7, seed=3, dtype=torch.float64)
    index, coef, start = wigner_term_table(3)
    D = np.empty((7, 84))
    C.wigner_blocks_cpu(R.numpy(), 3, index, coef, start, D)
    np.testing.assert_allclose(D, wigner_blocks_reference(R, 3).numpy(), atol=1e-12)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=np.zeros((5, 2))), r"x: expected shape \(N, d\)"),
        (dict(M=np.zeros((2, 3, 3, 2))), r"M: expected shape \(K, B, d, d\)"),
        (dict(x=np.zeros((5, 3), np.int32)), "x: expected dtype float32 or float64"),
        (dict(out=np.zeros((2, 5, 3), np.float32)), "out: expected the dtype of x"),
        (dict(center=np.zeros((3, 3), np.float32)), "center: expected the dtype of M"),
        (dict(center=np.zeros((2, 3))), r"center: expected shape \(B, d\)"),
        (dict(out=np.zeros((2, 5, 3))[:, ::-1]), "out: expected a C-contiguous array"),
        (dict(sample=np.zeros(5, np.int32)), "sample: expected dtype int64"),
        (dict(sample=np.array([0, 1, 2, 3, 0])), r"sample: expected every index in \[0, B\)"),
        (dict(sample=None, P=0), "P: expected P >= 1"),
        (dict(sample=None, P=1), "need more than B = 3 samples"),
    ],
)
def test_row_kernels_bad_arguments_raise_value_error(C, change, match):
    args = dict(x=np.zeros((5, 3)), M=np.zeros((2, 3, 3, 3)), sample=np.zeros(5, np.int64), P=0,
                center=np.zeros((3, 3)), out=np.zeros((2, 5, 3)))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        C.rotate_rows_cpu(**args)
