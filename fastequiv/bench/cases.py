"""The benchmark cases: every fused op, its pure-torch reference and the tools it replaces.

A :class:`Case` is one implementation of one op at one size on one device. Cases that
compute the same thing on the same inputs share a :attr:`Case.group`; inside a group the
``reference`` case (fastequiv's pure-torch implementation, the ground truth the kernels are
tested against) is the baseline of every ratio, and ``peer`` cases are what a user would
run without fastequiv: e3nn (``Irreps.D_from_matrix``, ``o3.rand_matrix``,
``e3nn.util.test.equivariance_error``), or the plain
PyTorch loop over the K rotations (``torch.rot90`` / ``grid_sample`` loops for voxels).

Each case also states the memory traffic its op cannot avoid (``bytes``: compulsory reads
and writes of one call, so ``bytes / time`` is the bandwidth a roofline compares with the
device's peak) and, where the op has arithmetic worth counting, its ``flops``.

The same cases drive ``pytest benchmarks/ --benchmark-only`` and ``fastequiv bench``;
:func:`cases` selects them by mode (``smoke``: tiny sizes, every code path; ``quick``: two
sizes per public op; ``full``: a sweep of sizes plus the row-level kernels).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

import fastequiv as fe
from fastequiv.backends import registry
from fastequiv.ops import rotate_copies, twirl_reduce
from fastequiv.ops.random_rotations import random_rotations_seeded_reference
from fastequiv.ops.rotate_copies import rotate_rows_backward_reference, rotate_rows_reference
from fastequiv.ops.twirl_reduce import reduce_rows_backward_reference, reduce_rows_reference
from fastequiv.reps import as_rep

__all__ = ["Case", "cases", "SIZES", "IRREPS_L4"]

IRREPS_L4 = "0e + 1o + 2e + 3o + 4e"
VECTOR = as_rep("vector")
K_COPIES = 4  # copies per sample in the row ops (twirl_loss uses 2, monitors 8)
SAMPLES = 64  # samples per batch in the dense row ops
VOXEL_BATCH, VOXEL_CHANNELS, VOXEL_COPIES = 2, 4, 8

# Sizes per (device type, mode). "elements": of the stacked K-copy tensor (what a
# twirl_reduce reads); "rotations": matrices drawn or converted; "side": voxels per edge;
# "clusters": samples of the model measured by equivariance_error.
SIZES = {
    "cpu": {
        "smoke": {"elements": [3_000], "rotations": [200], "wigner": [200], "side": [6], "clusters": [8]},
        "quick": {"elements": [100_000, 1_000_000], "rotations": [10_000, 100_000], "wigner": [10_000, 100_000],
                  "side": [16, 24], "clusters": [32, 256]},
        "full": {"elements": [10_000, 100_000, 1_000_000, 4_000_000], "rotations": [1_000, 10_000, 100_000, 1_000_000],
                 "wigner": [100, 1_000, 10_000, 100_000], "side": [16, 24, 32], "clusters": [32, 256, 1024]},
    },
    "cuda": {
        "smoke": {"elements": [3_000], "rotations": [200], "wigner": [200], "side": [6], "clusters": [8]},
        "quick": {"elements": [1_000_000, 10_000_000], "rotations": [100_000, 10_000_000], "wigner": [10_000, 100_000],
                  "side": [32, 64], "clusters": [256, 4096]},
        "full": {"elements": [100_000, 1_000_000, 10_000_000, 100_000_000],
                 "rotations": [10_000, 100_000, 1_000_000, 10_000_000], "wigner": [1_000, 10_000, 100_000, 1_000_000],
                 "side": [32, 64, 96, 128], "clusters": [256, 4096, 16384]},
    },
}


@dataclass(frozen=True)
class Case:
    """One implementation of one op at one size (see module docs)."""

    op: str
    impl: str
    device: str
    size: int
    unit: str
    setup: Callable[[], Callable[[], object]] = field(compare=False, repr=False)
    bytes: int = 0
    flops: int = 0
    params: tuple = ()
    role: str = "fastequiv"  # "reference" | "fastequiv" | "peer"
    level: str = "op"  # "op": public API; "kernel": a row-level primitive
    # whether a call returns what the group's reference returns (tests compare them); False
    # for peers that draw other random numbers or order their copies differently
    check: bool = True

    @property
    def group(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.op} {extra} {self.size:,} {self.unit} {self.device}".replace("  ", " ")

    @property
    def name(self) -> str:
        return f"{self.group} | {self.impl}"

    def info(self) -> dict:
        """What a report records next to the time."""
        return dict(op=self.op, impl=self.impl, device=self.device, size=self.size, unit=self.unit, bytes=self.bytes,
                    flops=self.flops, role=self.role, level=self.level, **dict(self.params))


def _backends(kernel: str, device: str) -> list[str]:
    """Compiled backends of ``kernel`` that run on ``device``; the Triton interpreter on CPU
    is a test harness, not something to time."""
    return [b for b in registry.runnable(kernel, device) if b != "torch" and not (b == "triton" and device == "cpu")]


def _gen(seed=0):
    """Inputs are drawn on the CPU from a fixed seed, then moved: the same data on every device."""
    return torch.Generator(device="cpu").manual_seed(seed)


def _rotations(K: int, B: int, device, seed: int) -> torch.Tensor:
    """``(K, B, 3, 3)`` float32 Haar rotations, one per copy and sample."""
    return fe.random_rotations(K * B, seed=seed, device=device, dtype=torch.float32).reshape(K, B, 3, 3)


def _randn(shape, device, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=_gen(seed), dtype=dtype).to(device)


def _fe(backend: str) -> tuple[str, str]:
    """(impl label, role) of a fastequiv backend."""
    return (f"fastequiv {backend} (reference)", "reference") if backend == "torch" else (f"fastequiv {backend}", "fastequiv")


# ---------------------------------------------------------------------------- public ops


def _dense_shape(elements: int, copies: int, d: int = 3) -> tuple[int, int]:
    rows = max(1, elements // (copies * d))
    B = min(SAMPLES, rows)
    return B, max(1, rows // B)


def _rotate_copies_cases(device, sizes) -> Iterator[Case]:
    K = K_COPIES
    for elements in sizes["elements"]:
        B, P = _dense_shape(elements, K)
        n = K * B * P * 3

        def data(B=B, P=P):
            x = _randn((B, P, 3), device)
            R = _rotations(K, B, device, seed=1)
            return x, R

        common = dict(op="rotate_copies", device=device, size=n, unit="elements", bytes=4 * (n + n // K),
                      flops=6 * n, params=(("K", K), ("rep", "vector")))
        for b in ["torch"] + _backends("rotate_rows", device):
            impl, role = _fe(b)

            def setup(b=b, data=data):
                x, R = data()
                return lambda: rotate_copies(x, R, VECTOR, backend=b)

            yield Case(impl=impl, role=role, setup=setup, **common)

        def loop(data=data):
            x, R = data()
            return lambda: torch.cat([x @ R[k].transpose(-1, -2) for k in range(K)])

        yield Case(impl="torch loop over K", role="peer", setup=loop, **common)


def _twirl_reduce_inputs(device, B, P, K, grad):
    out = _randn((K, B, P, 3), device, seed=1).requires_grad_(grad)
    R = _rotations(K, B, device, seed=2)
    y = _randn((B, P, 3), device, seed=3)
    return out, R, y


def _loop_sums(out, R, y):
    """What users write today: back-rotate each copy, then the decomposition sums in torch."""
    K = out.shape[0]
    a = [out[k] @ R[k] for k in range(K)]
    abar = sum(a) / K
    total = sum(((ak - y) ** 2).mean((1, 2)) for ak in a) / K
    spread = sum(((ak - abar) ** 2).mean((1, 2)) for ak in a) / K
    return abar, total, spread


def _with_backward(sums, out, backward: bool):
    """``sums`` itself, or a call that also backpropagates ``total + spread`` to ``out`` and
    returns that gradient."""
    if not backward:
        return sums

    def step():
        total, spread = sums()
        (total.sum() + spread.sum()).backward()
        grad, out.grad = out.grad, None
        return grad
    return step


def _twirl_reduce_cases(device, sizes) -> Iterator[Case]:
    K = K_COPIES
    for backward in (False, True):
        op = "twirl_reduce fwd+bwd" if backward else "twirl_reduce"
        for elements in sizes["elements"]:
            B, P = _dense_shape(elements, K)
            n = K * B * P * 3
            # forward: read out and the target, write the float32 mean; backward: read out,
            # target and mean again, write the gradient of out
            moved = 4 * (n + 2 * n // K) + (4 * (2 * n + 2 * n // K) if backward else 0)
            common = dict(op=op, device=device, size=n, unit="elements", bytes=moved,
                          flops=(18 if backward else 10) * n, params=(("K", K), ("rep", "vector")))

            for b in ["torch"] + _backends("reduce_rows", device):
                impl, role = _fe(b)

                def setup(b=b, B=B, P=P, backward=backward):
                    out, R, y = _twirl_reduce_inputs(device, B, P, K, backward)

                    def sums():
                        s = twirl_reduce(out, R, y, VECTOR, backend=b)
                        return s.total, s.spread
                    return _with_backward(sums, out, backward)

                yield Case(impl=impl, role=role, setup=setup, **common)

            def loop(B=B, P=P, backward=backward):
                out, R, y = _twirl_reduce_inputs(device, B, P, K, backward)
                return _with_backward(lambda: _loop_sums(out, R, y)[1:], out, backward)

            yield Case(impl="torch loop over K", role="peer", setup=loop, **common)


def _wigner_cases(device, sizes) -> Iterator[Case]:
    dim = sum(2 * l + 1 for l in range(5))
    for n in sizes["wigner"]:
        common = dict(op="wigner_D", device=device, size=n, unit="rotations", bytes=4 * n * (9 + dim * dim),
                      params=(("irreps", "l<=4"),))

        def rotations(n=n):
            return fe.random_rotations(n, seed=1, device=device, dtype=torch.float32)

        for b in ["torch"] + _backends("wigner_blocks", device):
            impl, role = _fe(b)

            def setup(b=b, rotations=rotations):
                R = rotations()
                return lambda: fe.wigner_D(IRREPS_L4, R, backend=b)

            yield Case(impl=impl, role=role, setup=setup, **common)

        def e3nn(rotations=rotations):
            from e3nn import o3

            R, irreps = rotations(), o3.Irreps(IRREPS_L4)
            return lambda: irreps.D_from_matrix(R)

        yield Case(impl="e3nn Irreps.D_from_matrix", role="peer", setup=e3nn, **common)


def _random_rotations_cases(device, sizes) -> Iterator[Case]:
    for n in sizes["rotations"]:
        common = dict(op="random_rotations", device=device, size=n, unit="rotations", bytes=4 * 9 * n,
                      params=(("group", "SO3"),))
        for b in ["torch"] + _backends("random_rotations_seeded", device):
            impl, role = _fe(b)
            yield Case(impl=impl, role=role, **common,
                       setup=lambda b=b, n=n: lambda: fe.random_rotations(n, seed=3, device=device, backend=b))

        def e3nn(n=n):
            from e3nn import o3

            return lambda: o3.rand_matrix(n, device=device)

        yield Case(impl="e3nn o3.rand_matrix", role="peer", setup=e3nn, check=False, **common)


@functools.lru_cache(maxsize=None)
def _demo_model_flops() -> int:
    """FLOPs of one forward of the demo transformer on one (padded) cluster, counted by
    torch's FlopCounterMode (matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastequiv.demo import ForceTask, PointTransformer

    inputs, _ = ForceTask().batch(1, torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        PointTransformer()(**inputs)
    return int(counter.get_total_flops())


def _equivariance_error_cases(device, sizes) -> Iterator[Case]:
    """Measuring a model: fastequiv's one stacked call over K=8 copies against e3nn's
    ``equivariance_error`` (8 rotations, two forwards each). The model is the demo's
    transformer (width 64) on clusters of 5-8 atoms; both run under no_grad. They report
    different statistics (fastequiv the decomposition, e3nn the largest deviation), so the
    ratio is of the cost of an answer, and the outputs are not compared."""
    from fastequiv.demo import SPEC, ForceTask, PointTransformer

    K = 8
    for clusters in sizes["clusters"]:
        # the model's forwards dominate: FLOPs are those of the K * clusters forwards the
        # measurement needs (e3nn's loop runs twice as many); no bytes of fastequiv's own
        common = dict(op="equivariance_error", device=device, size=clusters, unit="clusters",
                      flops=K * clusters * _demo_model_flops(), params=(("K", K), ("model", "demo transformer")))

        def data(clusters=clusters):
            torch.manual_seed(0)
            model = PointTransformer().to(device).eval()
            inputs, forces = ForceTask(device=device).batch(clusters, _gen(4))
            return model, inputs, forces

        for b in ["torch"] + _backends("reduce_rows", device):
            impl, role = _fe(b)

            def setup(b=b, data=data):
                model, inputs, forces = data()
                return lambda: fe.equivariance_error(model, inputs, forces, spec=SPEC, samples=K, seed=0, backend=b,
                                                     check_finite=False).total

            yield Case(impl=impl, role=role, setup=setup, **common)

        def e3nn(data=data):
            from e3nn.util.test import equivariance_error

            model, inputs, _ = data()
            args = [inputs["pos"], inputs["species"], inputs["mask"]]

            def run():
                with torch.no_grad():
                    return equivariance_error(model, args, irreps_in=["cartesian_points", None, None],
                                              irreps_out=["1x1o"], ntrials=K, do_parity=False, do_translation=False)
            return run

        yield Case(impl="e3nn equivariance_error", role="peer", setup=e3nn, check=False, **common)


def _trivial_model_cases(device, sizes) -> Iterator[Case]:
    """fastequiv's own cost end to end: equivariance_error of a trivial model (``1.5 v``)
    on ``elements`` vectors (1e6 in the quick CPU run) with K=4, against the torch reference and the memory-traffic
    floor (the copies written, the model's read and write, one read of the outputs and the
    target, done with plain tensor ops)."""
    K, spec = 4, fe.Spec(inputs="vector", output="vector")
    for elements in sizes["elements"]:
        B, P = _dense_shape(3 * elements, 1)
        n = B * P * 3
        # copies written; model reads and writes them; the reduction reads them and the target
        moved = 4 * (n + K * n + 2 * K * n + K * n + n)
        common = dict(op="equivariance_error trivial model", device=device, size=n, unit="elements", bytes=moved,
                      params=(("K", K), ("model", "1.5 v")))

        def data(B=B, P=P):
            return _randn((B, P, 3), device), _randn((B, P, 3), device, seed=1)

        for b in ["torch"] + _backends("reduce_rows", device):
            def setup(b=b, data=data):
                x, y = data()
                return lambda: fe.equivariance_error(lambda v: 1.5 * v, x, y, spec=spec, samples=K, seed=0,
                                                     backend=b).per_sample.total

            impl, role = _fe(b)
            yield Case(impl=impl, role=role, setup=setup, **common)

        def floor(data=data):
            x, y = data()
            return lambda: ((1.5 * x.expand(K, *x.shape).contiguous()) - y).square().sum((2, 3)).mean(0)

        yield Case(impl="memory-traffic floor (plain copies, model, one read)", role="peer", setup=floor, check=False,
                   **common)


# -------------------------------------------------------------------------------- voxels


def _grid_sample_loop(x, R):
    """One ``affine_grid`` + ``grid_sample`` per rotation; grid_sample orders axes (W, H, D)."""
    F = torch.nn.functional
    flip = torch.eye(3, dtype=R.dtype, device=R.device).flip(0)
    out = []
    for Rk in R:
        theta = torch.cat([flip @ Rk.transpose(1, 2) @ flip, Rk.new_zeros(Rk.shape[0], 3, 1)], dim=2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        out.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
    return torch.cat(out)


def _rot90_orbit(x):
    """The 24 rotations of a grid by ``torch.rot90``: each face to the front, four turns."""
    faces = [x, torch.rot90(x, 1, (2, 4)), torch.rot90(x, 2, (2, 4)), torch.rot90(x, 3, (2, 4)),
             torch.rot90(x, 1, (2, 3)), torch.rot90(x, 3, (2, 3))]
    return torch.cat([torch.rot90(f, q, (3, 4)) for f in faces for q in range(4)])


def _voxel_cases(device, sizes) -> Iterator[Case]:
    from fastequiv import voxels as V

    B, C, K = VOXEL_BATCH, VOXEL_CHANNELS, VOXEL_COPIES
    impls = ["torch"] + _backends("voxels_resample", device)
    for side in sizes["side"]:
        cells = B * C * side ** 3

        def data(side=side, copies=K):
            x = _randn((B, C, side, side, side), device)
            R = _rotations(copies, B, device, seed=1)
            return x, R

        # SO(3) copies: trilinear resampling, K grids written
        common = dict(op="voxels rotate_copies", device=device, size=side, unit="side", bytes=4 * cells * (1 + K),
                      params=(("K", K), ("B", B), ("C", C)))
        for b in impls:
            impl, role = _fe(b)

            def setup(b=b, data=data):
                x, R = data()
                return lambda: V.rotate_copies(x, R, backend=b)

            yield Case(impl=impl, role=role, setup=setup, **common)

        def loop(data=data):
            x, R = data()
            return lambda: _grid_sample_loop(x, R)

        yield Case(impl="grid_sample loop over K", role="peer", setup=loop, **common)

        # the 24 rotations of the cube: exact permutations, 24 grids written
        common = dict(op="voxels cube copies", device=device, size=side, unit="side", bytes=4 * cells * 25,
                      params=(("K", 24), ("B", B), ("C", C)))
        for b in impls:
            impl, role = _fe(b)

            def setup(b=b, data=data):
                x, _ = data()
                G = fe.group_elements("octahedral", device=device)[:, None].expand(24, B, 3, 3)
                return lambda: V.rotate_copies(x, G, backend=b)

            yield Case(impl=impl, role=role, setup=setup, **common)

        def rot90(data=data):
            x, _ = data()
            return lambda: _rot90_orbit(x)

        yield Case(impl="torch.rot90 loop", role="peer", setup=rot90, check=False, **common)

        # back-rotation of K outputs fused with the decomposition sums
        common = dict(op="voxels twirl_reduce", device=device, size=side, unit="side", bytes=4 * cells * (K + 2),
                      params=(("K", K), ("B", B), ("C", C)))
        for b in ["torch"] + _backends("voxels_reduce", device):
            impl, role = _fe(b)

            def setup(b=b, data=data):
                x, R = data()
                out = _randn((K,) + tuple(x.shape), device, seed=5)
                return lambda: V.twirl_reduce(out, R, x, backend=b)[:4]

            yield Case(impl=impl, role=role, setup=setup, **common)

        def sums_loop(data=data):
            x, R = data()
            out = _randn((K,) + tuple(x.shape), device, seed=5)

            def run():
                a = _grid_sample_loop(out.flatten(0, 1), R.transpose(-1, -2).reshape(1, -1, 3, 3)).reshape(out.shape)
                abar = a.mean(0)
                per = [((a - x) ** 2).mean(0), (abar - x) ** 2, ((a - abar) ** 2).mean(0)]
                return (abar, *(p.flatten(1).mean(1) for p in per))
            return run

        yield Case(impl="grid_sample loop + torch sums", role="peer", setup=sums_loop, **common)


# --------------------------------------------------------------------- row-level kernels


def _kernel(backend: str) -> tuple[str, str]:
    """(impl label, role) of a backend's row kernel."""
    return ("torch (reference)", "reference") if backend == "torch" else (f"{backend} kernel", "fastequiv")


_REFERENCES = {
    "rotate_rows": rotate_rows_reference,
    "rotate_rows_backward": rotate_rows_backward_reference,
    "reduce_rows": reduce_rows_reference,
    "reduce_rows_backward": reduce_rows_backward_reference,
    "random_rotations_seeded": random_rotations_seeded_reference,
}


def _row_impl(op: str, backend: str, device: str):
    return _REFERENCES[op] if backend == "torch" else registry.resolve(op, backend, device)[1]


def _row_data(device, elements, K=K_COPIES, d=3, graph=False, P=1000):
    N = max(1, elements // (K * d))
    P = min(P, N)
    B = max(1, N // P)
    N = B * P
    M = _rotations(K, B, device, seed=0)
    sample = (torch.arange(N, device=device) // P) if graph else None
    return N, B, (0 if graph else P), sample, M


def _kernel_cases(device, sizes) -> Iterator[Case]:
    """The row-level primitives (the row contract of :mod:`fastequiv.ops.layout`) on every compiled backend, in
    float32 and bfloat16 (read as such, accumulated in float32)."""
    K, d = K_COPIES, 3
    for elements in sizes["elements"]:
        N = max(1, elements // (K * d))
        rows = N // min(1000, N) * min(1000, N)
        n = K * rows * d
        for dtype in (torch.float32, torch.bfloat16):
            e = torch.empty((), dtype=dtype).element_size()
            # bytes: the stacked copies and the rows in ``dtype``; means in float32; masks and
            # graph indices (1 and 8 bytes a row)
            specs = [
                ("rotate_rows", False, e * (n + n // K)),
                ("rotate_rows_backward", False, e * n + 4 * n // K),
                ("reduce_rows", False, e * (n + n // K) + 4 * n // K + rows),
                ("reduce_rows", True, e * (n + n // K) + 4 * n // K + 9 * rows),
                ("reduce_rows_backward", False, e * (2 * n + n // K) + 4 * n // K + rows),
            ]
            for op, graph, moved in specs:
                common = dict(op=op, device=device, size=n, unit="elements", bytes=moved, level="kernel",
                              params=(("K", K), ("layout", "graph" if graph else "dense"),
                                      ("dtype", str(dtype).replace("torch.", ""))))

                def setup(op=op, graph=graph, b="torch", elements=elements, dtype=dtype):
                    N, B, P, sample, M = _row_data(device, elements, graph=graph)
                    fn = _row_impl(op, b, device)
                    if op == "rotate_rows":
                        args = (_randn((N, d), device, dtype), M, sample, P, None)
                    elif op == "rotate_rows_backward":
                        args = (_randn((K, N, d), device, dtype), M, sample, P)
                    else:
                        out, target = _randn((K, N, d), device, dtype, seed=1), _randn((N, d), device, dtype, seed=2)
                        valid = torch.rand(N, generator=_gen(3)).to(device) > 0.1
                        args = (out, M, target, sample, P, valid, None, B)
                        if op == "reduce_rows_backward":
                            mean, _ = reduce_rows_reference(*args)
                            grad_sums = _randn((3, B), device, seed=4)
                            args = (None, grad_sums, out, M, target, sample, P, valid, None, mean)
                    return lambda: fn(*args)

                for b in ["torch"] + _backends(op, device):
                    impl, role = _kernel(b)
                    yield Case(impl=impl, role=role, setup=lambda s=setup, b=b: s(b=b), **common)

    for n in sizes["rotations"]:
        for op, moved in (("random_rotations_seeded", 4 * 9 * n),):
            common = dict(op=op, device=device, size=n, unit="rotations", bytes=moved, level="kernel")
            for b in ["torch"] + _backends(op, device):
                impl, role = _kernel(b)

                def setup(b=b, n=n):
                    seed = torch.tensor(7, device=device)
                    fn = _row_impl("random_rotations_seeded", b, device)
                    return lambda: fn(seed, n, 0, False, torch.float32)

                yield Case(impl=impl, role=role, setup=setup, **common)


IRREPS_WIDE = "32x0e + 16x1o + 8x2e + 4x3o"  # dim 148: blocks cost 572 a row, the dense matrix 21904


def _dense_irreps(fn):
    """``fn`` run on the dense block-diagonal Wigner-D path (the only path before the ops
    applied irreps block by block), to time both in one run."""
    from fastequiv.ops import layout

    def call():
        layout.PER_IRREP = False
        try:
            return fn()
        finally:
            layout.PER_IRREP = True

    return call


def _irreps_cases(device, sizes) -> Iterator[Case]:
    """rotate_copies and twirl_reduce of a wide irreps: per-irrep blocks against the dense
    block-diagonal matrix (the previous path) and the reference."""
    K, rep = K_COPIES, as_rep(IRREPS_WIDE)
    d = rep.dim
    for elements in sizes["elements"]:
        B = min(SAMPLES, max(1, elements // (K * d)))
        P = max(1, elements // (K * d * B))
        n = K * B * P * d

        def data(B=B, P=P):
            return (_randn((B, P, d), device), _randn((K, B, P, d), device, seed=1), _randn((B, P, d), device, seed=2),
                    _rotations(K, B, device, seed=3))

        for op in ("rotate_copies", "twirl_reduce"):
            common = dict(op=op, device=device, size=n, unit="elements", bytes=4 * (n + n // K),
                          params=(("K", K), ("rep", IRREPS_WIDE.replace(" ", ""))))
            for b in ["torch"] + _backends("rotate_rows", device):
                def setup(b=b, op=op, data=data):
                    x, out, y, R = data()
                    if op == "rotate_copies":
                        return lambda: rotate_copies(x, R, rep, backend=b)
                    return lambda: twirl_reduce(out, R, y, rep, backend=b)[1:4]

                impl, role = _fe(b)
                yield Case(impl=impl, role=role, setup=setup, **common)
                yield Case(impl=f"{impl.replace(' (reference)', '')}, dense D (previous path)", role="peer",
                           setup=lambda s=setup: _dense_irreps(s()), **common)


OPS = {
    "rotate_copies": _rotate_copies_cases,
    "irreps": _irreps_cases,
    "twirl_reduce": _twirl_reduce_cases,
    "wigner_D": _wigner_cases,
    "random_rotations": _random_rotations_cases,
    "equivariance_error": _equivariance_error_cases,
    "trivial_model": _trivial_model_cases,
    "voxels": _voxel_cases,
    "kernels": _kernel_cases,
}


def cases(mode: str = "quick", device=None, ops: Optional[list[str]] = None) -> list[Case]:
    """The cases of ``mode`` on ``device`` (default: CUDA if torch sees one, else CPU).

    ``ops`` selects among :data:`OPS` (default: all public ops, plus ``"kernels"`` in the
    ``full`` and ``smoke`` modes)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device).type
    if mode not in SIZES[device]:
        raise ValueError(f"mode must be one of {sorted(SIZES[device])}, got {mode!r}")
    if ops is None:
        ops = [op for op in OPS if op != "kernels" or mode != "quick"]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"ops must be among {sorted(OPS)}, got unknown {unknown}")
    sizes = SIZES[device][mode]
    return [case for op in ops for case in OPS[op](device, sizes)]
