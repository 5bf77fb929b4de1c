"""FrameAveraged: exact invariance and equivariance of a non-equivariant model averaged over
its input's PCA frames (dense and graph batches, SO(3) and O(3), every kind of head), a
closed form of the average, and each degenerate spectrum with its documented fallback."""

from __future__ import annotations

import math

import pytest
import torch

import fastequiv as fe
from fastequiv.adapted import Adapted
from fastequiv.frames import frame_signs, principal_frames

DT = torch.float64


def _net(seed: int, width: int = 32, out: int = 13) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, out)).double()


def _proper_or_not(group: str, B: int, seed: int) -> torch.Tensor:
    R = fe.random_rotations(B, seed=seed, dtype=DT)
    if group == "O3":  # every other sample reflected too
        R = R * torch.tensor([1.0, -1.0] * B, dtype=DT)[:B, None, None]
    return R


def _turn(pos: torch.Tensor, R: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
    """``R (p - c) + c`` per sample, ``c`` the centroid of the valid points."""
    w = torch.ones(pos.shape[:-1], dtype=DT) if mask is None else mask.to(DT)
    c = (pos * w[..., None]).sum(1, keepdim=True) / w.sum(1)[:, None, None]
    return torch.einsum("bij,bnj->bni", R, pos - c) + c


# --- dense batches -----------------------------------------------------------------------------

DENSE_SPEC = dict(inputs={"pos": "position", "z": "scalar", "mask": "scalar"},
                  output={"energy": "scalar", "forces": "vector", "stress": "rank2", "feat": "1x0e + 1x1o + 1x2e"},
                  mask="mask")


def _dense_model(net):
    """Per atom, from the raw coordinates: nothing in it is equivariant."""

    def model(pos, z, mask):
        h = net(torch.cat([pos, z[..., None]], -1)) * mask[..., None]
        energy = h[..., :1].sum(1)
        stress = torch.einsum("bni,bnj->bnij", h[..., 1:4], h[..., 4:7])  # per atom
        return {"energy": energy, "forces": h[..., 1:4], "stress": stress, "feat": h[..., 4:13].sum(1)[:, :9]}

    return model


def _dense_batch(B=6, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(B, N, 3, generator=g, dtype=DT) * torch.tensor([1.0, 1.6, 0.6], dtype=DT)
    z = torch.randint(0, 3, (B, N), generator=g).to(DT)
    n = torch.tensor([7, 5, 6, 4, 7, 3])[:B]
    mask = torch.arange(N)[None] < n[:, None]
    pos = torch.where(mask[..., None], pos, torch.full((), 1e3, dtype=DT))  # padding holds junk
    return pos, z, mask


@pytest.mark.parametrize("group", ["SO3", "O3"])
def test_dense_frame_average_is_invariant_and_equivariant_to_1e12(group):
    spec = fe.Spec(**DENSE_SPEC, group=group)
    pos, z, mask = _dense_batch()
    fa = fe.FrameAveraged(_dense_model(_net(0)), spec=spec)
    out = fa(pos=pos, z=z, mask=mask)
    assert not principal_frames(pos, group, mask=mask).degenerate.any()
    R = _proper_or_not(group, pos.shape[0], seed=5)
    turned = fa(pos=torch.where(mask[..., None], _turn(pos, R, mask), pos), z=z, mask=mask)
    D = fe.wigner_D("1x0e + 1x1o + 1x2e", R)
    want = {"energy": out["energy"], "forces": torch.einsum("bij,bnj->bni", R, out["forces"]),
            "stress": torch.einsum("bij,bnjk,blk->bnil", R, out["stress"], R), "feat": torch.einsum("bij,bj->bi", D, out["feat"])}
    m = mask[..., None]
    for name in want:
        got, w = turned[name], want[name]
        if name == "forces":
            got, w = got * m, w * m
        if name == "stress":
            got, w = got * m[..., None], w * m[..., None]
        assert (got - w).abs().max() < 1e-12, name
    # and the model itself is far from equivariant: the average did the work
    raw = _dense_model(_net(0))
    moved = raw(torch.where(mask[..., None], _turn(pos, R, mask), pos), z, mask)
    assert (moved["energy"] - raw(pos, z, mask)["energy"]).abs().max() > 1e-2


def test_closed_form_of_a_linear_map_and_a_quadratic_energy():
    """For f(p) = A (p - c) per atom, the sign frames average A to its diagonal in the
    principal basis: f_FA(p) = sum_i A_ii v_i v_i^T (p - c). For E = sum_a (u . (p_a - c))^2,
    E_FA = N sum_i u_i^2 l_i (l_i the covariance's eigenvalues, ascending). Both against
    numpy's eigendecomposition, not the module's."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 3, generator=g, dtype=DT)
    u = torch.randn(3, generator=g, dtype=DT)
    B, N = 4, 9
    pos = torch.randn(B, N, 3, generator=g, dtype=DT) * torch.tensor([0.5, 1.0, 2.0], dtype=DT)

    def model(pos):
        d = pos - pos.mean(1, keepdim=True)
        return {"f": d @ A.T, "e": ((d @ u) ** 2).sum(1, keepdim=True)}

    for group in ("SO3", "O3"):
        spec = fe.Spec(inputs={"pos": "position"}, output={"f": "vector", "e": "scalar"}, group=group)
        out = fe.FrameAveraged(model, spec=spec)(pos=pos)
        import numpy as np
        d = (pos - pos.mean(1, keepdim=True)).numpy()
        for b in range(B):
            lam, V = np.linalg.eigh(d[b].T @ d[b] / N)
            P = sum(A[i, i].item() * np.outer(V[:, i], V[:, i]) for i in range(3))
            np.testing.assert_allclose(out["f"][b].numpy(), d[b] @ P.T, atol=1e-12)
            np.testing.assert_allclose(out["e"][b, 0].item(), N * float((u.numpy() ** 2 * lam).sum()), rtol=1e-12)


def test_the_frames_turn_the_principal_axes_onto_the_coordinate_axes():
    pos, _, mask = _dense_batch()
    for group, K in (("SO3", 4), ("O3", 8)):
        fr = principal_frames(pos, group, mask=mask)
        assert fr.R.shape == (K, pos.shape[0], 3, 3)
        eye = torch.eye(3, dtype=DT).expand_as(fr.R)
        torch.testing.assert_close(fr.R @ fr.R.transpose(-1, -2), eye)
        det = torch.linalg.det(fr.R)
        assert (det[:4] > 0).all() and (group == "SO3" or (det[4:] < 0).all())
        assert len({tuple(s.tolist()) for s in frame_signs(group)}) == K
    with pytest.raises(ValueError, match="group"):
        principal_frames(pos, "octahedral")


# --- graph batches -----------------------------------------------------------------------------

def _graph_batch(sizes=(5, 3, 6, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    N = sum(sizes)
    pos = torch.randn(N, 3, generator=g, dtype=DT) * torch.tensor([1.4, 1.0, 0.5], dtype=DT)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    src, dst = [], []
    start = 0
    for n in sizes:
        for i in range(n):
            for j in range(n):
                if i != j:
                    src.append(start + i)
                    dst.append(start + j)
        start += n
    return pos, batch, torch.tensor([src, dst]), torch.randn(N, generator=g, dtype=DT)


def test_graph_frame_average_is_invariant_and_equivariant_to_1e12():
    net = _net(1, out=4)
    B = 4

    def model(pos, batch, edge_index, z):
        vec = pos[edge_index[1]] - pos[edge_index[0]]
        h = net(torch.cat([pos, z[:, None]], -1))
        msg = torch.zeros_like(pos).index_add(0, edge_index[0], torch.tanh(vec @ net[0].weight[:3, :3]))
        forces = h[:, 1:] + msg
        energy = torch.zeros(int(batch.max()) + 1, 1, dtype=DT).index_add(0, batch, h[:, :1])
        return {"energy": energy, "forces": forces}

    spec = fe.Spec(inputs={"pos": "position", "batch": "batch", "edge_index": "index", "z": "scalar"},
                   output={"energy": "scalar", "forces": "vector"})
    pos, batch, edge_index, z = _graph_batch()
    fa = fe.FrameAveraged(model, spec=spec)
    out = fa(pos=pos, batch=batch, edge_index=edge_index, z=z)
    R = fe.random_rotations(B, seed=9, dtype=DT)
    c = torch.zeros(B, 3, dtype=DT).index_add(0, batch, pos) / torch.bincount(batch)[:, None].to(DT)
    turned_pos = torch.einsum("nij,nj->ni", R[batch], pos - c[batch]) + c[batch]
    turned = fa(pos=turned_pos, batch=batch, edge_index=edge_index, z=z)
    assert (turned["energy"] - out["energy"]).abs().max() < 1e-12
    assert (turned["forces"] - torch.einsum("nij,nj->ni", R[batch], out["forces"])).abs().max() < 1e-12
    # the graph frames are the dense frames of the same graphs padded with a mask
    sizes = torch.bincount(batch)
    dense = torch.zeros(B, int(sizes.max()), 3, dtype=DT)
    mask = torch.arange(dense.shape[1])[None] < sizes[:, None]
    dense[mask] = pos
    g_fr = principal_frames(pos, batch=batch, num_graphs=B)
    d_fr = principal_frames(dense, mask=mask)
    torch.testing.assert_close(g_fr.eigenvalues, d_fr.eigenvalues)
    torch.testing.assert_close(g_fr.R.abs(), d_fr.R.abs())


# --- adapted models ----------------------------------------------------------------------------

class _Toy(Adapted):
    """A codebase whose batch calls the coordinates "R" and the species "Z"."""

    family = "toy"

    def __init__(self, net):
        super().__init__(net, fe.Spec(inputs={"pos": "position", "z": "scalar", "batch": "batch"},
                                      output={"energy": "scalar", "forces": "vector"}, call="dict"))

    def prepare(self, data):
        return data if "pos" in data else {"pos": data["R"], "z": data["Z"], "batch": data["graph"]}

    def forward(self, inputs):
        h = self.model(torch.cat([inputs["pos"], inputs["z"][:, None]], -1))
        B = int(inputs["batch"].max()) + 1
        return {"energy": torch.zeros(B, 1, dtype=DT).index_add(0, inputs["batch"], h[:, :1]), "forces": h[:, 1:4]}


def test_an_adapted_model_takes_no_spec_and_its_own_batch():
    model = _Toy(_net(2, out=4))
    pos, batch, _, z = _graph_batch()
    fa = fe.FrameAveraged(model)
    out = fa({"R": pos, "Z": z, "graph": batch})
    R = fe.random_rotations(4, seed=2, dtype=DT)
    c = torch.zeros(4, 3, dtype=DT).index_add(0, batch, pos) / torch.bincount(batch)[:, None].to(DT)
    turned = fa({"R": torch.einsum("nij,nj->ni", R[batch], pos - c[batch]) + c[batch], "Z": z, "graph": batch})
    assert (turned["energy"] - out["energy"]).abs().max() < 1e-12
    assert (turned["forces"] - torch.einsum("nij,nj->ni", R[batch], out["forces"])).abs().max() < 1e-12
    # a frame-averaged adapted model is measured like the model itself: exactly equivariant
    d = fe.equivariance_error(fa, {"R": pos, "Z": z, "graph": batch},
                              {"energy": torch.zeros(4, 1, dtype=DT), "forces": torch.zeros_like(pos)}, seed=0)
    assert d.equiv < 1e-24
    with pytest.raises(ValueError, match="carries its own spec"):
        fe.FrameAveraged(model, spec=fe.Spec(inputs={"pos": "position"}, output="vector"))


# --- degenerate spectra ------------------------------------------------------------------------

def _vector_model(net):
    def model(pos):
        return {"energy": net(torch.cat([pos, pos[..., :1] ** 2], -1))[..., :1].sum(1),
                "forces": net(torch.cat([pos, pos[..., :1]], -1))[..., 1:4]}

    return model


VSPEC = fe.Spec(inputs={"pos": "position"}, output={"energy": "scalar", "forces": "vector"})


def _shapes():
    """One structure of each kind, 6 atoms, with a random orientation and centre."""
    t = torch.arange(6, dtype=DT)
    ring = torch.stack([torch.cos(t * math.pi / 3), torch.sin(t * math.pi / 3), torch.zeros(6, dtype=DT)], -1)
    line = torch.stack([torch.zeros(6, dtype=DT), torch.zeros(6, dtype=DT), t - 2.1 + 0.3 * t ** 2], -1)
    octa = torch.cat([torch.eye(3, dtype=DT), -torch.eye(3, dtype=DT)])  # a regular octahedron
    planar = ring * torch.tensor([1.0, 1.7, 0.0], dtype=DT) + torch.tensor([0.3, 0.0, 0.0], dtype=DT) * t[:, None]
    generic = torch.randn(6, 3, generator=torch.Generator().manual_seed(4), dtype=DT)
    shapes = {"ring": ring, "line": line, "octahedron": octa, "planar": planar, "generic": generic}
    R = fe.random_rotations(len(shapes), seed=11, dtype=DT)
    return {k: v @ R[i].T + 0.5 * i for i, (k, v) in enumerate(shapes.items())}


def test_each_kind_of_spectrum_is_classified():
    shapes = _shapes()
    pos = torch.stack(list(shapes.values()))
    fr = principal_frames(pos)
    got = dict(zip(shapes, fr.degenerate.tolist()))
    # a planar structure with distinct in-plane moments is not degenerate: its normal is an axis
    assert got == {"ring": True, "line": True, "octahedron": True, "planar": False, "generic": False}
    assert fr.eigenvalues[3, 0].abs() < 1e-12  # planar: the normal's eigenvalue is 0
    # a single atom: all eigenvalues 0
    assert principal_frames(torch.zeros(2, 1, 3, dtype=DT)).degenerate.all()
    # the tolerance is relative to the largest eigenvalue
    stretched = torch.diag(torch.tensor([1.0, 1.0 + 1e-3, 2.0], dtype=DT)).repeat(2, 1)
    stretched = torch.cat([stretched, -stretched])[None]
    assert not principal_frames(stretched, tol=1e-4).degenerate.any()
    assert principal_frames(stretched, tol=1e-2).degenerate.all()


def test_a_planar_structure_with_distinct_moments_is_exact():
    shapes = _shapes()
    pos = torch.stack([shapes["planar"], shapes["generic"]])
    fa = fe.FrameAveraged(_vector_model(_net(3)), spec=VSPEC, degenerate="raise")
    out = fa(pos=pos)
    R = fe.random_rotations(2, seed=1, dtype=DT)
    turned = fa(pos=_turn(pos, R))
    assert (turned["energy"] - out["energy"]).abs().max() < 1e-12
    assert (turned["forces"] - torch.einsum("bij,bnj->bni", R, out["forces"])).abs().max() < 1e-12


def test_a_linear_structure_with_frames_is_exact_for_scalars_and_vectors():
    """The 4 frames of a line pair up into rotations by pi about it, which cancel the
    in-plane part of a vector whatever basis the eigensolver picked in the plane."""
    line = _shapes()["line"][None]
    fa = fe.FrameAveraged(_vector_model(_net(4)), spec=VSPEC, degenerate="frames")
    out = fa(pos=line)
    for seed in range(3):
        R = fe.random_rotations(1, seed=seed, dtype=DT)
        turned = fa(pos=_turn(line, R))
        assert (turned["energy"] - out["energy"]).abs().max() < 1e-12
        assert (turned["forces"] - torch.einsum("bij,bnj->bni", R, out["forces"])).abs().max() < 1e-12
    axis = line[0, -1] - line[0, 0]
    torch.testing.assert_close(torch.linalg.cross(out["forces"][0], axis.expand(6, 3)),
                               torch.zeros(6, 3, dtype=DT), atol=1e-12, rtol=0)  # along the line


def test_degenerate_samples_get_the_twirl_and_the_others_their_frames():
    shapes = _shapes()
    pos = torch.stack(list(shapes.values()))  # ring, line, octahedron degenerate; planar, generic not
    model = _vector_model(_net(5))
    out = fe.FrameAveraged(model, spec=VSPEC, seed=3, samples=12)(pos=pos)
    twirled = fe.Twirled(model, spec=VSPEC, seed=3, samples=12)(pos=pos)
    framed = fe.FrameAveraged(model, spec=VSPEC, degenerate="frames")(pos=pos)
    for name in ("energy", "forces"):
        torch.testing.assert_close(out[name][:3], twirled[name][:3], atol=1e-14, rtol=0)
        torch.testing.assert_close(out[name][3:], framed[name][3:], atol=1e-14, rtol=0)
    # with frames, the ring is not exact (its in-plane basis is arbitrary); with raise, it raises
    with pytest.raises(ValueError, match=r"samples \[0, 1, 2\] have a degenerate"):
        fe.FrameAveraged(model, spec=VSPEC, degenerate="raise")(pos=pos)


def test_a_batch_without_degenerate_samples_makes_one_model_call():
    calls = []
    net = _net(6)

    def model(pos):
        calls.append(pos.shape[0])
        return _vector_model(net)(pos)

    shapes = _shapes()
    fe.FrameAveraged(model, spec=VSPEC)(pos=torch.stack([shapes["planar"], shapes["generic"]]))
    assert calls == [8]
    calls.clear()
    fe.FrameAveraged(model, spec=VSPEC, samples=5)(pos=torch.stack([shapes["ring"], shapes["generic"]]))
    assert calls == [8, 10]


# --- one frame per sample, for training --------------------------------------------------------

def test_one_frame_is_one_of_the_frames_and_trains():
    pos, z, mask = _dense_batch()
    net = _net(7)
    spec = fe.Spec(**DENSE_SPEC)
    model = _dense_model(net)
    one = fe.FrameAveraged(model, spec=spec, frames="one", seed=4)(pos=pos, z=z, mask=mask)
    fr = principal_frames(pos, mask=mask)
    # every frame's twisted prediction, by hand
    twisted = []
    for k in range(4):
        Rk = fr.R[k]
        out = model(torch.where(mask[..., None], _turn(pos, Rk, mask), pos), z, mask)
        twisted.append(torch.einsum("bji,bnj->bni", Rk, out["forces"]))
    twisted = torch.stack(twisted)  # (4, B, N, 3)
    err = (twisted - one["forces"][None]).abs().amax(dim=(2, 3))  # (4, B)
    assert (err.min(0).values < 1e-12).all()
    # the draws differ between samples and between seeds, and the same seed repeats
    again = fe.FrameAveraged(model, spec=spec, frames="one", seed=4)(pos=pos, z=z, mask=mask)
    torch.testing.assert_close(again["forces"], one["forces"])
    # gradients reach the parameters (and the positions, through the eigenvectors)
    p = pos.clone().requires_grad_(True)
    loss = fe.FrameAveraged(model, spec=spec, frames="one")(pos=p, z=z, mask=mask)["energy"].sum()
    loss.backward()
    assert net[0].weight.grad.abs().sum() > 0 and p.grad[mask].abs().sum() > 0


def test_the_gradient_of_an_averaged_energy_is_the_derivative_of_the_averaged_function():
    """Forces from a frame-averaged energy: autograd through the frames matches central
    differences of the (exactly invariant) averaged energy."""
    net = _net(8, out=1)
    spec = fe.Spec(inputs={"pos": "position"}, output="scalar")
    fa = fe.FrameAveraged(lambda pos: net(torch.cat([pos, pos[..., :1]], -1)).sum(1), spec=spec)
    pos = torch.randn(1, 5, 3, dtype=DT, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    (grad,) = torch.autograd.grad(fa(pos=pos).sum(), pos)
    h = 1e-6
    fd = torch.zeros_like(pos)
    with torch.no_grad():
        for i in range(5):
            for j in range(3):
                e = torch.zeros_like(pos)
                e[0, i, j] = h
                fd[0, i, j] = (fa(pos=pos + e) - fa(pos=pos - e)).sum() / (2 * h)
    torch.testing.assert_close(grad, fd, atol=1e-7, rtol=1e-6)


def test_arguments_are_checked():
    spec = fe.Spec(inputs={"pos": "position", "v": "position"}, output="vector")
    with pytest.raises(ValueError, match="positions="):
        fe.FrameAveraged(lambda pos, v: pos, spec=spec)
    fe.FrameAveraged(lambda pos, v: pos, spec=spec, positions="v")
    with pytest.raises(ValueError, match="no input with rep"):
        fe.FrameAveraged(lambda v: v, spec=fe.Spec(inputs={"v": "vector"}, output="vector"))
    with pytest.raises(ValueError, match="frames must be"):
        fe.FrameAveraged(lambda pos: pos, spec=VSPEC, frames="some")
    with pytest.raises(ValueError, match="degenerate must be"):
        fe.FrameAveraged(lambda pos: pos, spec=VSPEC, degenerate="ignore")
    with pytest.raises(ValueError, match="Twirled"):
        fe.FrameAveraged(lambda pos: pos, spec=fe.Spec(inputs={"pos": "position"}, output="vector",
                                                       group="octahedral"))
