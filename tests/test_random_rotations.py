"""random_rotations: seeded Haar rotations from the Philox stream, on every backend.

* the public function: reproducibility, offsets, generators, the distribution (Haar
  moments, rotation angles, O(3) and finite groups), dtypes, argument errors;
* the ``random_rotations_seeded`` kernel of each compiled backend against the torch
  reference stream (``random_rotations_seeded_reference``), with the seed read from a
  device tensor; the step-level :func:`random_rotations_seeded` and :func:`seed_tensor`;
* the ``torch.ops.fastequiv.random_rotations_seeded`` registration (opcheck).

A draw is computed in float64 (float32 in the GPU kernels) and rounded once, so the tests
hold it to bounds of their own, tighter than the package's TOL (fastequiv.tolerances;
with ``rtol=0``).
The Philox stream itself and the quaternion and group math are tests/test_groups.py.
"""

import math

import pytest
import torch
from conftest import BACKENDS, KERNELS, backend_params, device_of, kernel

import fastequiv as fe
from fastequiv.backends import registry
from fastequiv.ops.random_rotations import _seeded_op, random_rotations_seeded, random_rotations_seeded_reference, \
    seed_tensor
from fastequiv.tolerances import ROTATIONS

GPU_KERNELS = ("cuda", "cupy")


def float32_atol(backend):
    """A float32 draw against the float64 stream: the GPU kernels' sin/cos/sqrt may differ
    from the host's by an ulp or two, so they get the table's bound for rotations
    (fastequiv.tolerances.ROTATIONS, the one ``fastequiv check`` uses; not measured on a GPU)."""
    return ROTATIONS[torch.float32]["atol"] if backend in GPU_KERNELS else 1e-6


# --- the public function -----------------------------------------------------------------------

def test_same_seed_same_rotations_and_offsets_continue_the_stream():
    a = fe.random_rotations(10, seed=5, dtype=torch.float64)
    assert torch.equal(a, fe.random_rotations(10, seed=5, dtype=torch.float64))
    assert not torch.allclose(a, fe.random_rotations(10, seed=6, dtype=torch.float64))
    assert torch.equal(a[4:], fe.random_rotations(6, seed=5, offset=4, dtype=torch.float64))
    # large seeds use both key words
    b = fe.random_rotations(3, seed=2**40 + 5, dtype=torch.float64)
    assert not torch.allclose(b, fe.random_rotations(3, seed=5, dtype=torch.float64)[:3])


def test_generator_draws_a_reproducible_seed():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(fe.random_rotations(4, generator=g1), fe.random_rotations(4, generator=g2))
    # a generator advances: the next draw differs
    assert not torch.equal(fe.random_rotations(4, generator=g1),
                           fe.random_rotations(4, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(11)
    a = fe.random_rotations(4)
    torch.manual_seed(11)
    assert torch.equal(a, fe.random_rotations(4))


def test_float32_is_float64_rounded():
    a = fe.random_rotations(100, seed=9, dtype=torch.float64)
    b = fe.random_rotations(100, seed=9, dtype=torch.float32)
    torch.testing.assert_close(b.double(), a, atol=1e-6, rtol=0)


def _angles(R):
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    return torch.arccos(cos)


def test_haar_moments_and_angle_distribution():
    n = 40000
    R = fe.random_rotations(n, seed=2024, dtype=torch.float64)
    assert torch.allclose(R @ R.mT, torch.eye(3, dtype=torch.float64).expand(n, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(n, dtype=torch.float64), atol=1e-12)
    # E[R] = 0 and E[R_ij R_kl] = delta_ik delta_jl / 3 (each entry has variance 1/3)
    tol = 5 * math.sqrt(1 / 3) / math.sqrt(n)
    assert R.mean(0).abs().max() < tol
    second = torch.einsum("nij,nkl->ijkl", R, R) / n
    expected = torch.einsum("ik,jl->ijkl", torch.eye(3), torch.eye(3)).double() / 3
    assert (second - expected).abs().max() < 5 * 0.35 / math.sqrt(n)
    # rotation angle has density (1 - cos t) / pi on [0, pi]: KS test against its CDF
    t, _ = torch.sort(_angles(R))
    cdf = (t - torch.sin(t)) / math.pi
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((emp - cdf).abs(), (emp - 1 / n - cdf).abs()).max()
    assert ks < 1.63 / math.sqrt(n)  # 1% critical value


def test_o3_draws_half_improper_elements():
    n = 20000
    R = fe.random_rotations(n, seed=3, group="O3", dtype=torch.float64)
    det = torch.linalg.det(R)
    assert torch.allclose(det.abs(), torch.ones(n, dtype=torch.float64))
    frac = (det < 0).double().mean()
    assert abs(frac - 0.5) < 5 * 0.5 / math.sqrt(n)
    # the proper parts are the SO(3) stream
    so3 = fe.random_rotations(n, seed=3, dtype=torch.float64)
    torch.testing.assert_close(R * det[:, None, None], so3)


def test_finite_group_sampling_draws_elements_uniformly():
    n = 24 * 400
    R = fe.random_rotations(n, seed=0, group="octahedral", dtype=torch.float64)
    G = fe.group_elements("octahedral", dtype=torch.float64)
    idx = torch.cdist(R.reshape(n, 9), G.reshape(24, 9), compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)
    counts = torch.bincount(idx, minlength=24).double()
    chi2 = ((counts - n / 24) ** 2 / (n / 24)).sum()
    assert chi2 < 49.7  # chi2(23) 0.999 quantile


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=2**63), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(group="SU2"), "group"),
        (dict(offset=-3), "offset"),
        (dict(offset=2**63 - 2), "offset"),  # rotations 2**63 - 2 .. 2**63: the last one is past int64
        (dict(offset=2**63), "offset"),
        (dict(dtype=torch.int32), "dtype"),
        (dict(backend="fast"), "backend"),
        (dict(seed=1, generator=torch.Generator()), "not both"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fe.random_rotations(3, **kwargs)


def test_unavailable_backend_names_what_is_missing():
    with pytest.raises(fe.BackendUnavailableError, match="cuda"):
        fe.random_rotations(3, seed=0, backend="cuda")


def test_empty_and_dtypes():
    assert fe.random_rotations(0, seed=1).shape == (0, 3, 3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert fe.random_rotations(2, seed=1, dtype=dtype).dtype == dtype


def test_native_backend_is_present_in_ci():
    # the extension is part of every install: its CPU backend must be there
    assert "cpu" in registry.runnable("random_rotations_seeded", "cpu")


def test_auto_uses_the_compiled_kernel_on_cpu():
    name, _ = registry.resolve("random_rotations_seeded", "auto", "cpu")
    assert name == ("cpu" if fe.build_info()["extension"] else "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", ["SO3", "O3", "octahedral"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float64, 1e-14), (torch.bfloat16, 1e-2)],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("n,offset", [(0, 0), (1, 0), (257, 3), (33, 2**32 - 5), (3, 2**63 - 3)])
def test_backends_match_the_reference(backend, group, dtype, atol, n, offset):
    device = device_of(backend)
    ref = fe.random_rotations(n, seed=77, offset=offset, group=group, dtype=torch.float64, backend="torch")
    got = fe.random_rotations(n, seed=77, offset=offset, group=group, dtype=dtype, device=device, backend=backend)
    assert got.dtype == dtype and got.shape == (n, 3, 3) and got.device.type == device
    torch.testing.assert_close(got.double().cpu(), ref, atol=atol, rtol=0)


# --- the kernels against the reference stream --------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 5, 2**63 - 1])
@pytest.mark.parametrize("offset", [0, 2**32 - 5, 2**40 + 3, 2**63 - 37])
@pytest.mark.parametrize("improper", [False, True])
def test_seeded_kernel_is_the_reference_stream(seed, offset, improper, backend):
    dev = device_of(backend)
    n = 37
    group = "O3" if improper else "SO3"
    want = fe.random_rotations(n, seed=seed, offset=offset, group=group, dtype=torch.float64, backend="torch")
    op = kernel("random_rotations_seeded", backend)
    s = torch.tensor(seed, dtype=torch.int64, device=dev)
    got64 = op(s, n, offset, improper, torch.float64)
    torch.testing.assert_close(got64.cpu(), want, rtol=0, atol=1e-12)
    got32 = op(s, n, offset, improper, torch.float32)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.cpu().double(), want, rtol=0, atol=float32_atol(backend))
    ref = random_rotations_seeded_reference(s, n, offset, improper, torch.float64)
    torch.testing.assert_close(got64, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("improper", [False, True])
def test_seeded_kernel_matches_the_torch_stream_far_into_it(dtype, improper, backend):
    seed, n, offset = 2**40 + 3, 1001, 2**32 - 10
    got = kernel("random_rotations_seeded", backend)(torch.tensor(seed, device=device_of(backend)), n, offset,
                                                     improper, dtype)
    want = fe.random_rotations(n, seed=seed, offset=offset, group="O3" if improper else "SO3",
                               dtype=torch.float64, backend="torch")
    assert got.dtype == dtype and got.shape == (n, 3, 3)
    tol = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", KERNELS)
def test_seeded_kernel_float32_over_many_draws(backend):
    """float32 within 1e-6 of the float64 stream over many draws (the tail, not a few)."""
    s = torch.tensor(12345, device=device_of(backend))
    n = 20000
    got = kernel("random_rotations_seeded", backend)(s, n, 3, True, torch.float32)
    want = random_rotations_seeded_reference(s, n, 3, True, torch.float64)
    assert (got.double() - want).abs().max().item() < float32_atol(backend)


@pytest.mark.parametrize("backend", KERNELS)
def test_seeded_kernel_empty_and_other_dtypes(backend):
    op = kernel("random_rotations_seeded", backend)
    s = torch.tensor(3, device=device_of(backend))
    assert op(s, 0, 0, False, torch.float32).shape == (0, 3, 3)
    half = op(s, 5, 0, False, torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, random_rotations_seeded_reference(s, 5, 0, False, torch.bfloat16))


# the message of each backend's check of the seed
SEED_MESSAGE = {"cpu": "seed: expected an int64 0-dim tensor", "triton": "seed must be an int64 0-dim tensor"}


@pytest.mark.parametrize("backend", backend_params(*SEED_MESSAGE))
def test_seeded_kernel_takes_a_0_dim_seed_tensor(backend):
    op = kernel("random_rotations_seeded", backend)
    with pytest.raises(ValueError, match=SEED_MESSAGE[backend]):
        op(torch.tensor([3], device=device_of(backend)), 4, 0, False, torch.float32)


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_seeded_kernel_refuses_an_int_seed(backend):
    with pytest.raises(ValueError, match="seed must be an int64 0-dim tensor"):
        kernel("random_rotations_seeded", backend)(3, 4, 0, False, torch.float32)


@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_seeded_kernel_replays_in_a_cuda_graph(backend):
    """The seed is read on the device: a captured graph replays with a new seed."""
    fn = kernel("random_rotations_seeded", backend)
    seed = torch.tensor(1, device="cuda")
    fn(seed, 64, 0, False, torch.float32)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(seed, 64, 0, False, torch.float32)
    seed.fill_(99)
    graph.replay()
    want = random_rotations_seeded_reference(torch.tensor(99), 64, 0, False, torch.float64)
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-6, atol=2e-6)


# --- seeds on the device ---------------------------------------------------------------------------

def test_seeded_rotations_follow_the_public_stream():
    for group in ("SO3", "O3", "octahedral"):
        got = random_rotations_seeded(40, torch.tensor(2**40 + 5), group, torch.float64, offset=3, backend="torch")
        expected = fe.random_rotations(40, seed=2**40 + 5, offset=3, group=group, dtype=torch.float64, backend="torch")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", ["SO3", "O3", "octahedral"])
def test_seeded_rotations_on_every_backend(group, backend):
    """The step-level sampler (a device seed tensor) on each backend: the public stream."""
    dev = device_of(backend)
    got = random_rotations_seeded(40, torch.tensor(2**40 + 5, device=dev), group, torch.float64, offset=3,
                                  backend=backend)
    expected = fe.random_rotations(40, seed=2**40 + 5, offset=3, group=group, dtype=torch.float64, backend="torch")
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-12)


def test_seed_tensor_sources():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert int(seed_tensor(None, g1, torch.device("cpu"))) == int(seed_tensor(None, g2, torch.device("cpu")))
    assert int(seed_tensor(11, None, torch.device("cpu"))) == 11
    with pytest.raises(ValueError, match="not both"):
        seed_tensor(11, g1, torch.device("cpu"))
    with pytest.raises(ValueError, match="seed must be an int"):
        seed_tensor(-1, None, torch.device("cpu"))


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    seed = torch.tensor(5, device=device_of(backend))
    torch.library.opcheck(_seeded_op, (seed, 7, 3, True, torch.float32, backend))
