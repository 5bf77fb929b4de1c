"""Rotation sampling: the Philox stream, Haar uniformity, quaternions, finite groups."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from vectors import PHILOX_KAT

import fastequiv as fe
from fastequiv.backends import registry
from fastequiv.groups import philox4x32_10, random_quaternions



@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(torch.tensor(counter, dtype=torch.int64), key)
    assert tuple(out.tolist()) == expected


def test_philox_stream_matches_triton_randint4x(tmp_path):
    """The counter scheme is Triton's tl.randint4x(seed, i): run it in the interpreter."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch, triton, triton.language as tl
        from fastequiv.groups import philox_words

        @triton.jit
        def draw(out_ptr, seed, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            m = i < n
            r0, r1, r2, r3 = tl.randint4x(seed, i)
            tl.store(out_ptr + i * 4 + 0, r0.to(tl.int64) & 0xFFFFFFFF, mask=m)
            tl.store(out_ptr + i * 4 + 1, r1.to(tl.int64) & 0xFFFFFFFF, mask=m)
            tl.store(out_ptr + i * 4 + 2, r2.to(tl.int64) & 0xFFFFFFFF, mask=m)
            tl.store(out_ptr + i * 4 + 3, r3.to(tl.int64) & 0xFFFFFFFF, mask=m)

        n, seed = 37, 123456789012
        out = torch.zeros(n, 4, dtype=torch.int64)
        draw[(3,)](out, seed, n, BLOCK=16)
        assert torch.equal(out, philox_words(n, seed, 0, "cpu")), (out[:2], philox_words(2, seed, 0, "cpu"))
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    # run outside the checkout so the installed fastequiv is the one imported
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


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
    assert not torch.equal(fe.random_rotations(4, generator=g1), fe.random_rotations(4, generator=torch.Generator().manual_seed(3)))
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


def test_random_quaternions_are_unit_and_give_the_same_rotations():
    q = random_quaternions(50, seed=4, dtype=torch.float64)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(fe.quaternion_to_matrix(q), fe.random_rotations(50, seed=4, dtype=torch.float64))


def test_quaternion_matrix_round_trip_including_near_pi():
    q = random_quaternions(500, seed=1, dtype=torch.float64)
    # rotations by ~pi (w ~ 0) and the identity are the hard cases for naive formulas
    special = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1e-9, 0.6, 0.8, 0]], dtype=torch.float64)
    q = torch.cat([q, special / special.norm(dim=-1, keepdim=True)])
    R = fe.quaternion_to_matrix(q)
    q2 = fe.matrix_to_quaternion(R)
    assert (q2[:, 0] >= 0).all()
    torch.testing.assert_close(fe.quaternion_to_matrix(q2), R, atol=1e-12, rtol=0)
    # q and -q are the same rotation: compare up to sign
    same = torch.minimum((q2 - q).norm(dim=-1), (q2 + q).norm(dim=-1))
    assert same.max() < 1e-12


def test_quaternion_convention_is_w_first():
    # a quarter turn about z: (w, x, y, z) = (cos 45, 0, 0, sin 45) maps x to y
    q = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)], dtype=torch.float64)
    R = fe.quaternion_to_matrix(q)
    torch.testing.assert_close(R @ torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([0.0, 1, 0], dtype=torch.float64))


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


@pytest.mark.parametrize("group,order", [("octahedral", 24), ("icosahedral", 60)])
def test_finite_groups_are_groups(group, order):
    G = fe.group_elements(group, dtype=torch.float64)
    assert G.shape == (order, 3, 3)
    torch.testing.assert_close(G[0], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(torch.linalg.det(G), torch.ones(order, dtype=torch.float64))
    torch.testing.assert_close(G @ G.mT, torch.eye(3, dtype=torch.float64).expand(order, 3, 3))
    flat = G.reshape(order, 9)
    dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    assert (dist + torch.eye(order, dtype=torch.float64) * 10).min() > 0.5  # distinct
    prods = (G[:, None] @ G[None, :]).reshape(-1, 9)
    assert torch.cdist(prods, flat, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-9  # closed
    # the group average of the vector rep is 0 (no fixed vector): both act irreducibly
    assert G.mean(0).abs().max() < 1e-12


def test_octahedral_is_the_signed_permutations_of_det_one():
    G = fe.group_elements("octahedral", dtype=torch.float64)
    assert set(G.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert ((G != 0).sum(-1) == 1).all()


def test_icosahedral_preserves_the_icosahedron():
    phi = (1 + math.sqrt(5)) / 2
    verts = []
    for s1 in (1, -1):
        for s2 in (1, -1):
            verts += [(0, s1, s2 * phi), (s1, s2 * phi, 0), (s2 * phi, 0, s1)]
    V = torch.tensor(verts, dtype=torch.float64)
    G = fe.group_elements("icosahedral", dtype=torch.float64)
    moved = torch.einsum("gij,vj->gvi", G, V)
    assert torch.cdist(moved.reshape(-1, 3), V, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-9


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


def _backends():
    """Every backend with a random_rotations implementation that can run on this machine."""
    names = []
    for name in registry.implemented("random_rotations_seeded"):
        device = "cuda" if name == "cuda" else "cpu"
        try:
            registry.resolve("random_rotations_seeded", name, device)
        except fe.BackendUnavailableError:
            continue
        names.append((name, device))
    return names


def test_native_backends_are_present_in_ci():
    # the extension is part of every install: its CPU backend must be there
    assert ("cpu", "cpu") in _backends()


@pytest.mark.parametrize("backend,device", _backends())
@pytest.mark.parametrize("group", ["SO3", "O3", "octahedral"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float64, 1e-14), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n,offset", [(0, 0), (1, 0), (257, 3), (33, 2**32 - 5)])
def test_backends_match_the_reference(backend, device, group, dtype, atol, n, offset):
    ref = fe.random_rotations(n, seed=77, offset=offset, group=group, dtype=torch.float64, backend="torch")
    got = fe.random_rotations(n, seed=77, offset=offset, group=group, dtype=dtype, device=device, backend=backend)
    assert got.dtype == dtype and got.shape == (n, 3, 3) and got.device.type == device
    torch.testing.assert_close(got.double().cpu(), ref, atol=atol, rtol=0)


def test_auto_uses_the_compiled_kernel_on_cpu():
    name, _ = registry.resolve("random_rotations_seeded", "auto", "cpu")
    assert name == ("cpu" if fe.build_info()["extension"] else "torch")
