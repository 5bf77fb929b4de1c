"""Seven defects found running fastequiv on real codebases (NequIP, SevenNet, TorchMD-Net,
Orb, SchNetPack), each pinned by a test that failed before its fix."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

import fastequiv as fe

DT = torch.float64
K, SEED = 4, 5


def _graphs(seed=0, sizes=(3, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(sum(sizes), 3, generator=g, dtype=DT)
    z = torch.randint(1, 5, (sum(sizes),), generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    same = batch[:, None] == batch[None, :]
    src, dst = torch.nonzero(same & ~torch.eye(len(z), dtype=torch.bool), as_tuple=True)
    return pos, z, batch, src, dst


def _pair_forces(pos, src, dst, field=0.0):
    """An exactly equivariant pair force (plus an optional constant field along z)."""
    vec = pos[dst] - pos[src]
    f = torch.zeros_like(pos).index_add(0, src, vec * torch.exp(-vec.norm(dim=-1, keepdim=True)))
    return f + field * torch.tensor([0.0, 0.0, 1.0], dtype=pos.dtype)


def test_1_tuple_spec_with_graph_roles():
    pos, z, batch, src, dst = _graphs()

    def model(z, pos, batch):  # TorchMD-Net's call: model(z, pos, batch)
        same = batch[:, None] == batch[None, :]
        s, d = torch.nonzero(same & ~torch.eye(len(z), dtype=torch.bool), as_tuple=True)
        return _pair_forces(pos, s, d, field=0.2)

    spec = fe.Spec(inputs=("scalar", "position", "batch"), output="vector")
    d = fe.equivariance_error(model, (z, pos, batch), torch.zeros_like(pos), spec=spec, samples=K, seed=SEED)
    # the same model and rotations through a dict spec
    spec_d = fe.Spec(inputs={"z": "scalar", "pos": "position", "batch": "batch"}, output="vector")
    d_d = fe.equivariance_error(lambda z, pos, batch: model(z, pos, batch), {"z": z, "pos": pos, "batch": batch},
                                torch.zeros_like(pos), spec=spec_d, samples=K, seed=SEED)
    torch.testing.assert_close(d.per_sample.equiv, d_d.per_sample.equiv)
    assert float(d.equiv) > 1e-3


def test_2_twirled_dict_call_is_called_like_the_model():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3, dtype=DT)

    def model(data):
        return {"forces": lin(data["pos"])}

    spec = fe.Spec(inputs={"pos": "vector"}, output={"forces": "vector"}, call="dict", group="octahedral")
    tw = fe.Twirled(model, spec=spec)
    x = {"pos": torch.randn(6, 5, 3, dtype=DT)}
    out = tw(x)  # like model(x)
    torch.testing.assert_close(out["forces"], tw(**x)["forces"])
    # the twirled model is measured like the model, and is exactly octahedral-equivariant
    d = fe.equivariance_error(tw, x, {"forces": torch.zeros(6, 5, 3, dtype=DT)}, spec=spec)
    assert float(d.equiv) < 1e-28


@pytest.mark.parametrize("names", [("idx_i", "idx_j"), ("senders", "receivers")])
def test_3_edges_as_two_1d_index_tensors(names):
    pos, z, batch, src, dst = _graphs(1)
    shifts = torch.randn(len(src), 3, dtype=DT)  # per-edge Cartesian shifts rotate with their edge
    a, b = names

    def model(**kw):
        vec = kw["pos"][kw[b]] - kw["pos"][kw[a]] + kw["shifts"]
        f = torch.zeros_like(kw["pos"]).index_add(0, kw[a], vec * torch.exp(-vec.norm(dim=-1, keepdim=True)))
        return f

    spec = fe.Spec(inputs={"pos": "position", "batch": "batch", a: "index", b: "index", "shifts": "vector@edge"},
                   output="vector")
    inputs = {"pos": pos, "batch": batch, a: src, b: dst, "shifts": shifts}
    d = fe.equivariance_error(model, inputs, torch.randn_like(pos), spec=spec, samples=K, seed=SEED)
    assert float(d.equiv) < 1e-25 < float(d.total)
    # the same as a (2, E) edge_index
    spec2 = fe.Spec(inputs={"pos": "position", "batch": "batch", "edge_index": "index", "shifts": "vector@edge"},
                    output="vector")
    d2 = fe.equivariance_error(lambda pos, batch, edge_index, shifts: model(pos=pos, shifts=shifts, **{a: edge_index[0], b: edge_index[1]}),
                               {"pos": pos, "batch": batch, "edge_index": torch.stack([src, dst]), "shifts": shifts},
                               torch.randn_like(pos), spec=spec2, samples=K, seed=SEED)
    assert float(d2.equiv) < 1e-25


Out = namedtuple("Out", ["energy", "forces"])


class Holder:
    """A batch-like object that indexes by name, as SevenNet's AtomGraphData does."""

    def __init__(self, **kw):
        self._store = kw

    def __getitem__(self, key):
        return self._store[key]


@pytest.mark.parametrize("wrap", ["namedtuple", "indexable"])
def test_4_heads_read_from_whatever_the_model_returns(wrap):
    pos, z, batch, src, dst = _graphs(2)
    make = (lambda e, f: Out(e, f)) if wrap == "namedtuple" else (lambda e, f: Holder(inferred_energy=e, energy=e, forces=f))

    def model(pos, batch, edge_index):
        f = _pair_forces(pos, edge_index[0], edge_index[1], field=0.1)
        e = torch.zeros(int(batch.max()) + 1, dtype=pos.dtype).index_add(0, batch, pos[:, 2])
        return make(e, f)

    spec = fe.Spec(inputs={"pos": "position", "batch": "batch", "edge_index": "index"},
                   output={"energy": "scalar", "forces": "vector"})
    inputs = {"pos": pos, "batch": batch, "edge_index": torch.stack([src, dst])}
    y = {"energy": torch.zeros(3, dtype=DT), "forces": torch.zeros_like(pos)}
    d = fe.equivariance_error(model, inputs, y, spec=spec, samples=K, seed=SEED)
    assert float(d.heads["forces"].equiv) > 1e-4
    with pytest.raises(ValueError, match=r"lacks the heads \['stress'\]"):
        fe.equivariance_error(model, inputs, {**y, "stress": torch.zeros(3, 3, 3, dtype=DT)},
                              spec=fe.Spec(inputs=spec.inputs, output={**spec.output, "stress": "rank2"}), samples=K)


VOIGT_ASE = ("xx", "yy", "zz", "yz", "xz", "xy")
VOIGT_SEVENNET = ("xx", "yy", "zz", "xy", "yz", "zx")


@pytest.mark.parametrize("order", [VOIGT_ASE, VOIGT_SEVENNET])
def test_5_voigt_stress_transforms_as_the_tensor_it_stands_for(order):
    rep = fe.reps.as_rep("voigt" if order == VOIGT_ASE else f"voigt({', '.join(order)})")
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 3, 3, generator=g, dtype=DT)
    S = A + A.transpose(1, 2)
    idx = {"x": 0, "y": 1, "z": 2}
    voigt = torch.stack([S[:, idx[c[0]], idx[c[1]]] for c in order], dim=-1)
    torch.testing.assert_close(rep.from_matrix(S), voigt)
    torch.testing.assert_close(rep.to_matrix(voigt), S)

    # a model whose stress is R-equivariant in 3x3 form but returned in Voigt form
    def model(cell):
        stress = cell.transpose(1, 2) @ cell  # rows of cell are lattice vectors: cell^T cell -> R (.) R^T
        return {"stress": rep.from_matrix(stress)}

    cells = torch.randn(4, 3, 3, generator=g, dtype=DT)
    spec = fe.Spec(inputs={"cell": "cell"}, output={"stress": rep})
    target6 = rep.from_matrix(torch.randn(4, 3, 3, generator=g, dtype=DT).tril().matrix_exp())
    d6 = fe.equivariance_error(model, {"cell": cells}, {"stress": target6}, spec=spec, samples=K, seed=SEED)
    d33 = fe.equivariance_error(model, {"cell": cells}, {"stress": rep.to_matrix(target6)}, spec=spec, samples=K,
                                seed=SEED)
    assert float(d6.equiv) < 1e-25 < float(d6.total)
    torch.testing.assert_close(d6.total, d33.total)
    # the loss is that of the 3x3 tensor: mean over its 9 entries
    pred = rep.to_matrix(model(cells)["stress"])
    torch.testing.assert_close(d6.total, ((pred - rep.to_matrix(target6)) ** 2).mean(dim=(1, 2)).mean())
    # twirled, a Voigt head comes back in Voigt form
    tw = fe.Twirled(model, spec=fe.Spec(inputs={"cell": "cell"}, output={"stress": rep}, group="octahedral"))
    torch.testing.assert_close(tw(cell=cells)["stress"], model(cells)["stress"])
    with pytest.raises(ValueError, match="six distinct entries"):
        fe.reps.as_rep("voigt(xx, yy, zz, xy, yx, zx)")


def test_6_kept_tensors_with_a_row_per_graph_node_or_edge_raise_before_the_model_call():
    pos, z, batch, src, dst = _graphs(3)
    calls = []

    def model(pos, batch, edge_index, **kept):
        calls.append(1)
        return _pair_forces(pos, edge_index[0], edge_index[1])

    spec = fe.Spec(inputs={"pos": "position", "batch": "batch", "edge_index": "index"}, output="vector",
                   unnamed="keep")
    inputs = {"pos": pos, "batch": batch, "edge_index": torch.stack([src, dst]), "energy": torch.zeros(3),
              "weights": torch.ones(len(z)), "shift": torch.zeros(len(src), 3), "config": torch.tensor(1.0)}
    with pytest.raises(ValueError) as err:
        fe.equivariance_error(model, inputs, torch.zeros_like(pos), spec=spec, samples=K)
    msg = str(err.value)
    assert "'energy' has 3 rows, the number of graphs" in msg and "'weights' has 12 rows, the number of nodes" in msg
    assert f"'shift' has {len(src)} rows, the number of edges" in msg and "scalar@graph" in msg
    assert "config" not in msg and not calls  # raised before the model ran
    del inputs["energy"], inputs["weights"], inputs["shift"]
    fe.equivariance_error(model, inputs, torch.zeros_like(pos), spec=spec, samples=K)  # bookkeeping passes
    assert calls


def test_7_every_unnamed_tensor_is_listed():
    pos, z, batch, src, dst = _graphs(4)
    spec = fe.Spec(inputs={"pos": "position", "batch": "batch"}, output="vector")
    inputs = {"pos": pos, "batch": batch, "a": torch.zeros(3), "b": torch.zeros(2, 2), "c": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"inputs\['a'\].*inputs\['b'\].*inputs\['c'\].* have no rep"):
        fe.equivariance_error(lambda pos, batch, **kw: pos, inputs, pos, spec=spec, samples=K)


def test_a_non_contiguous_edge_index_is_read_as_its_values():
    """torch.tensor(edges).T is how many loaders build edge_index: a transposed view. The
    compiled path once read its storage in the wrong order (an IndexError)."""
    pos, z, batch, src, dst = _graphs(5)
    transposed = torch.stack([src, dst], dim=1).T
    assert not transposed.is_contiguous()

    def model(pos, batch, edge_index):
        return _pair_forces(pos, edge_index[0], edge_index[1], field=0.2)

    spec = fe.Spec(inputs={"pos": "position", "batch": "batch", "edge_index": "index"}, output="vector")
    y = torch.randn_like(pos)
    ref = fe.equivariance_error(model, {"pos": pos, "batch": batch, "edge_index": transposed.contiguous()}, y,
                                spec=spec, samples=K, seed=SEED, backend="torch")
    for backend in ("auto", "torch"):
        d = fe.equivariance_error(model, {"pos": pos, "batch": batch, "edge_index": transposed}, y, spec=spec,
                                  samples=K, seed=SEED, backend=backend)
        torch.testing.assert_close(d.per_sample.total, ref.per_sample.total)
        torch.testing.assert_close(d.per_sample.equiv, ref.per_sample.equiv)


def test_a_mask_with_a_trailing_one_is_refused_not_ignored():
    """A (B, N, 1) mask over (B, N, 3) outputs once masked nothing at all (read as a
    per-sample mask of a per-sample output): it raises, naming the shape to give."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3, 5, 3, generator=g, dtype=DT), torch.randn(3, 5, 3, generator=g, dtype=DT)
    m = torch.ones(3, 5, dtype=torch.bool)
    m[0, 3:] = False
    spec = fe.Spec(inputs="vector", output="vector")
    with pytest.raises(ValueError, match=r"give it as \(3, 5\)"):
        fe.equivariance_error(lambda v: 2 * v, x, y, spec=spec, mask=m[..., None], samples=K)
    d = fe.equivariance_error(lambda v: 2 * v, x, y, spec=spec, mask=m, samples=K, seed=SEED)
    assert float(d.total) > 0
