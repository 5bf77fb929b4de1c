"""The math under rotation sampling: the Philox stream, quaternions and the finite groups.

Sampling itself (fe.random_rotations on every backend) is tests/test_random_rotations.py."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from vectors import PHILOX_KAT

import fastequiv as fe
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
