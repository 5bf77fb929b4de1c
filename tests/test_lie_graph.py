"""lie_derivative on graph batches: the same numbers as the dense layout, and the closed
form L_X f(x) = [A, X] x for a linear per-node map, with per-edge and per-graph inputs."""

import torch

import fastequiv as fe
from fastequiv.lie import so3_generators

DT = torch.float64


def _graphs():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 5, 4]
    pos = torch.randn(sum(sizes), 3, generator=g, dtype=DT)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return pos, batch, sizes


def test_linear_node_map_on_a_graph_batch_matches_the_closed_form_and_the_dense_layout():
    A = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    pos, batch, sizes = _graphs()
    spec = fe.Spec(inputs={"v": "vector", "batch": "batch"}, output="vector")
    lie = fe.lie_derivative(lambda v, batch: v @ A.T, {"v": pos, "batch": batch}, spec=spec)
    X = so3_generators(DT)
    want = torch.einsum("ij,gjk,nk->gni", A, X, pos) - torch.einsum("gij,jk,nk->gni", X, A, pos)
    torch.testing.assert_close(lie, want)
    # the same graphs padded into a dense batch with a mask
    N = max(sizes)
    dense = torch.zeros(len(sizes), N, 3, dtype=DT)
    mask = torch.zeros(len(sizes), N, dtype=torch.bool)
    start = 0
    for b, n in enumerate(sizes):
        dense[b, :n], mask[b, :n] = pos[start:start + n], True
        start += n
    lie_dense = fe.lie_derivative(lambda v: v @ A.T, dense, spec=fe.Spec(inputs="vector", output="vector"), mask=mask)
    torch.testing.assert_close(lie_dense[:, mask], lie)


def test_positions_edges_and_graph_inputs_turn_together():
    """An exactly equivariant model of positions, per-edge shifts and a per-graph field has
    zero Lie derivative; dropping the edge rep (a non-rotated shift) makes it non-zero."""
    pos, batch, sizes = _graphs()
    g = torch.Generator().manual_seed(2)
    src = torch.cat([torch.arange(s, s + n - 1) for s, n in zip([0, 3, 8], sizes)])
    edge_index = torch.stack([src, src + 1])
    shifts = torch.randn(edge_index.shape[1], 3, generator=g, dtype=DT)
    field = torch.randn(len(sizes), 3, generator=g, dtype=DT)

    inputs = {"pos": pos, "batch": batch, "edge_index": edge_index, "shifts": shifts, "field": field}
    roles = {"pos": "position", "batch": "batch", "edge_index": "index", "field": "vector@graph"}

    def centred(pos, batch, edge_index, shifts, field):
        c = torch.zeros(field.shape[0], 3, dtype=DT).index_add(0, batch, pos) / torch.bincount(batch)[:, None].to(DT)
        rel = pos - c[batch]
        vec = pos[edge_index[1]] - pos[edge_index[0]] + shifts
        out = torch.zeros_like(pos).index_add(0, edge_index[0], vec * vec.norm(dim=-1, keepdim=True))
        return out + field[batch] * (rel ** 2).sum(-1, keepdim=True)

    spec = fe.Spec(inputs={**roles, "shifts": "vector@edge"}, output="vector")
    lie = fe.lie_derivative(centred, inputs, spec=spec)
    assert lie.abs().max() < 1e-12
    unturned = fe.Spec(inputs={**roles, "shifts": "scalar@edge"}, output="vector")
    assert fe.lie_derivative(centred, inputs, spec=unturned).abs().max() > 1e-3
