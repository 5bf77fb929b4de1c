"""``fastequiv check``: every backend that can run here against the torch reference.

On fresh random inputs (the seed is printed; ``--seed`` repeats a run), for each backend
that can run on this machine (``torch``; ``cpu`` with the extension; ``triton`` on a GPU
or under ``TRITON_INTERPRET=1``; ``cuda``; ``cupy``) and each device it runs on::

    random_rotations   seeded Haar rotations, several seeds and offsets (past 2^32), SO3/O3,
                       float32/float64: against the reference stream, no NaN, the same
                       seed twice gives the same rotations, other seeds other ones
    rotate_rows        the row kernels of rotate_copies / twirl_reduce, forward and
    rotate_rows_bwd    backward, d = 1, 3, 9, 25 and a wide irreps (288; 1152 on a GPU),
    reduce_rows        dense and graph layouts, masks, centres, float16/bfloat16/float32/
    reduce_rows_bwd    float64; the reductions also with weighted copies (a rotation
                       design's weights: positive, summing to one, far from uniform),
                       with and without the mask and centres
    graph_atomics      the graph-layout reduction repeated: run-to-run spread of its sums
    wigner_blocks      Wigner-D blocks to lmax 10, float32/float64
    voxels             the voxel resampling and fused reduction, exact and trilinear
    opcheck            torch.library.opcheck of every torch.ops.fastequiv op (the
                       reductions also with weights)
    compile            torch.compile(fullgraph=True) of a twirl_loss step on its first call
                       against the eager step (loss, L_equiv, gradients)
    cuda_graph         (CUDA) a forward+backward twirl_loss step captured in a CUDA graph
                       and replayed: equal to eager with an int seed, new rotations on
                       every replay with seed=None

One line per (check, backend, device): the cases run, the largest error relative to the
reference's magnitude, the tolerance it was held to (the table of
:mod:`fastequiv.tolerances`, which the tests use too), PASS or FAIL; then a summary. The
row-kernel cases come from :mod:`fastequiv.ops.row_cases`, as the tests' do. The
exit status is 1 when any check fails. ``--json`` prints the same as JSON.

Examples::

    fastequiv check                          # every backend that can run here
    TRITON_INTERPRET=1 fastequiv check       # ... including Triton's kernels on the CPU
    fastequiv check --backend triton --device cuda --json > check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .tolerances import MANY_ROW_SUMS, ROTATIONS, STEP, check_bound

BACKENDS = ("torch", "cpu", "triton", "cuda", "cupy")
CHECKS = ("random_rotations", "rotate_rows", "rotate_rows_bwd", "reduce_rows", "reduce_rows_bwd", "graph_atomics",
          "wigner_blocks", "voxels", "opcheck", "compile", "cuda_graph")
# the op of the registry whose availability decides whether a check runs for a backend
_OP_OF = {"random_rotations": "random_rotations_seeded", "rotate_rows": "rotate_rows",
          "rotate_rows_bwd": "rotate_rows_backward", "reduce_rows": "reduce_rows",
          "reduce_rows_bwd": "reduce_rows_backward", "graph_atomics": "reduce_rows", "wigner_blocks": "wigner_blocks",
          "voxels": "voxels_resample", "opcheck": "rotate_rows", "compile": "reduce_rows", "cuda_graph": "reduce_rows"}


@dataclass
class Result:
    check: str
    backend: str
    device: str
    cases: int = 0
    max_rel_err: float = 0.0
    tolerance: float = 0.0
    result: str = "PASS"
    seconds: float = 0.0
    note: str = ""


@dataclass
class Case:
    label: str
    error: float
    tolerance: float


@dataclass
class Context:
    device: torch.device
    gen: torch.Generator
    interpreter: bool
    repeat: int = 5
    notes: list = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).to(dtype).to(self.device)

    def randint(self, high: int, shape) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=self.gen).to(self.device)


def rel_err(got, want) -> float:
    """``max |got - want| / max |want|`` over every tensor of the (nested) results, in float64
    on the CPU; inf for a shape mismatch or a non-finite value where the reference is finite."""
    if isinstance(want, (tuple, list)):
        return max((rel_err(g, w) for g, w in zip(got, want)), default=0.0)
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    if got.numel() == 0:
        return 0.0
    finite = torch.isfinite(want)
    if not bool(torch.isfinite(got[finite]).all()):
        return float("inf")
    scale = float(want[finite].abs().max()) if bool(finite.any()) else 0.0
    diff = float((got - want)[finite].abs().max()) if bool(finite.any()) else 0.0
    return diff / max(scale, 1e-300) if diff else 0.0


def _cpu(args):
    return tuple(a.detach().cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _impl(op: str, backend: str) -> Callable:
    from .backends import registry

    return registry.implementation(op, backend)


def _ref(op: str) -> Callable:
    return _impl(op, "torch")


# --------------------------------------------------------------------------- row kernels


def _row_shapes(ctx: Context) -> Iterator[tuple[int, torch.dtype, str]]:
    """``(d, dtype, layout)``: every dtype at d = 3 (and 9 on the CPU: on a GPU each case
    is a Triton compile), float32/float64 elsewhere, one float32 case per layout for the
    wide irreps."""
    wide = (288, 1152) if ctx.gpu else (288,)
    for d in (1, 3, 9, 25) + wide:
        if d > 100:
            dtypes = (torch.float32,)
        elif d == 3 or (d == 9 and not ctx.gpu):
            dtypes = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
        else:
            dtypes = (torch.float64, torch.float32)
        for dtype in dtypes:
            for layout in ("dense", "graph"):
                yield d, dtype, layout


def _row_case(ctx: Context, d: int, dtype: torch.dtype, layout: str):
    """A :class:`~fastequiv.ops.row_cases.RowCase` on the checked device (centres only for
    d = 3, as positions have them; a fully masked sample, an empty one in a graph)."""
    from .ops.row_cases import RowCase

    P = 1 if d > 100 else (16 if ctx.gpu else 4)
    seed = int(torch.randint(0, 2**62, (), generator=ctx.gen))
    return RowCase(K=3, B=3, P=P, d=d, dtype=dtype, layout=layout, center=d == 3, mask=True, device=ctx.device,
                   seed=seed)


def _label(d, dtype, layout, extra=""):
    return f"d={d} {str(dtype).replace('torch.', '')} {layout}{extra}"


def check_rotate_rows(ctx: Context, backend: str) -> Iterator[Case]:
    for d, dtype, layout in _row_shapes(ctx):
        c = _row_case(ctx, d, dtype, layout)
        for center in (None,) if c.center_x is None else (None, c.center_x):
            args = (c.x, c.M, c.sample, c.P, center)
            got = _impl("rotate_rows", backend)(*args)
            yield Case(_label(d, dtype, layout), rel_err(got, _ref("rotate_rows")(*_cpu(args))), check_bound(dtype))


def check_rotate_rows_bwd(ctx: Context, backend: str) -> Iterator[Case]:
    for d, dtype, layout in _row_shapes(ctx):
        c = _row_case(ctx, d, dtype, layout)
        args = (c.grad_rot, c.M, c.sample, c.P)
        got = _impl("rotate_rows_backward", backend)(*args)
        yield Case(_label(d, dtype, layout), rel_err(got, _ref("rotate_rows_backward")(*_cpu(args))),
                   check_bound(c.acc))


def design_weights(ctx: Context, K: int, dtype: torch.dtype) -> torch.Tensor:
    """``(K,)`` positive weights summing to one, as a rotation design's, on the checked
    device, far from uniform (so that a kernel ignoring them is far off): before
    normalising, one is 1.1 to 1.6 and the others 0.1 to 0.6 (at K = 3 the large one is at
    least 0.48 against the uniform 1/3)."""
    w = 0.1 + 0.5 * torch.rand(K, generator=ctx.gen, dtype=torch.float64)
    w[int(torch.randint(0, K, (), generator=ctx.gen))] += 1.0
    return (w / w.sum()).to(dtype).to(ctx.device)


def _reduce_variants(ctx: Context, c):
    """``(label, valid, center, grad_mean, weights)``: nothing optional, everything but the
    weights (the uniform ``1/K``), then both again with weights."""
    w = design_weights(ctx, c.K, c.acc)
    yield "", None, None, None, None
    yield " masked", c.valid, c.center, c.grad_mean, None
    yield " weighted", None, None, None, w
    yield " masked weighted", c.valid, c.center, c.grad_mean, w


def _weights(w) -> tuple:
    """The trailing ``weights`` argument of the reduce kernels: none for the uniform average
    (the call every backend had before weights), ``(w,)`` otherwise."""
    return () if w is None else (w,)


def check_reduce_rows(ctx: Context, backend: str) -> Iterator[Case]:
    for d, dtype, layout in _row_shapes(ctx):
        c = _row_case(ctx, d, dtype, layout)
        for extra, valid, center, _, w in _reduce_variants(ctx, c):
            args = (c.out, c.M, c.target, c.sample, c.P, valid, center, c.B) + _weights(w)
            got = _impl("reduce_rows", backend)(*args)
            # sums of squares in acc over rows of dtype: the inputs' rounding is the reference's too
            yield Case(_label(d, dtype, layout, extra), rel_err(got, _ref("reduce_rows")(*_cpu(args))),
                       check_bound(c.acc))


def check_reduce_rows_bwd(ctx: Context, backend: str) -> Iterator[Case]:
    for d, dtype, layout in _row_shapes(ctx):
        c = _row_case(ctx, d, dtype, layout)
        for extra, valid, center, grad_mean, w in _reduce_variants(ctx, c):
            fwd = (c.out, c.M, c.target, c.sample, c.P, valid, center)
            mean, _ = _ref("reduce_rows")(*_cpu(fwd + (c.B,) + _weights(w)))
            args = (grad_mean, c.grad_sums) + fwd + (mean.to(ctx.device),) + _weights(w)
            got = _impl("reduce_rows_backward", backend)(*args)
            want = _ref("reduce_rows_backward")(*_cpu(args))
            yield Case(_label(d, dtype, layout, extra), rel_err(got, want), check_bound(dtype))


def check_graph_atomics(ctx: Context, backend: str) -> Iterator[Case]:
    """The graph layout adds rows into per-sample sums with atomics on a GPU, in no fixed
    order: repeated runs differ by rounding. The spread of the sums over the runs, relative
    to their size (and each run against the reference)."""
    N = 200_000 if ctx.gpu else 512
    for dtype in (torch.float32, torch.float64):
        for d in (1, 3):
            B, K = 7, 3
            sample = ctx.randint(B, (N,))  # unsorted: per-row atomics
            for order, s in (("unsorted", sample), ("sorted", sample.sort().values)):
                args = (ctx.randn(K, N, d, dtype=dtype), ctx.randn(K, B, d, d, dtype=dtype), ctx.randn(N, d, dtype=dtype),
                        s, 0, None, None, B)
                runs = [_impl("reduce_rows", backend)(*args)[1] for _ in range(ctx.repeat)]
                want = _ref("reduce_rows")(*_cpu(args))[1]
                spread = max(rel_err(r, runs[0]) for r in runs)
                label = f"d={d} {str(dtype).replace('torch.', '')} {order} N={N} x{ctx.repeat}"
                yield Case(label + " spread", spread, check_bound(dtype))
                yield Case(label + " vs reference", max(rel_err(r, want) for r in runs),
                           check_bound(dtype, MANY_ROW_SUMS))


# --------------------------------------------------------------------------- other ops


def check_random_rotations(ctx: Context, backend: str) -> Iterator[Case]:
    from .ops.random_rotations import random_rotations_seeded_reference

    impl = _impl("random_rotations_seeded", backend)
    n = 4099 if ctx.gpu else 37
    draws = {}
    for seed in (0, 7, 2**40 + 5, 2**63 - 1):
        for offset in (0, 2**32 - 5, 2**40 + 3):
            for improper in (False, True):
                key = torch.full((), seed, dtype=torch.int64, device=ctx.device)
                want = random_rotations_seeded_reference(key.cpu(), n, offset, improper, torch.float64)
                for dtype in (torch.float32, torch.float64):
                    got = impl(key, n, offset, improper, dtype)
                    again = impl(key, n, offset, improper, dtype)
                    label = f"seed={seed} offset={offset} {'O3' if improper else 'SO3'} {str(dtype)[6:]}"
                    if not torch.equal(got, again):
                        yield Case(label + ": the same seed gave other rotations", float("inf"), 0.0)
                    draws[(seed, offset, improper, dtype)] = got
                    # entries are at most 1: the absolute error is the relative one
                    err = float((got.double().cpu() - want).abs().max()) if n else 0.0
                    if not bool(torch.isfinite(got).all()):
                        err = float("inf")
                    yield Case(label, err, check_bound(dtype, ROTATIONS))
    first = draws[(0, 0, False, torch.float32)]
    if torch.equal(first, draws[(7, 0, False, torch.float32)]) or torch.equal(first, draws[(0, 2**32 - 5, False, torch.float32)]):
        yield Case("other seeds and offsets give other rotations", float("inf"), 0.0)


def check_wigner_blocks(ctx: Context, backend: str) -> Iterator[Case]:
    from . import random_rotations

    impl = _impl("wigner_blocks", backend)
    R = random_rotations(64 if ctx.gpu else 16, seed=int(torch.randint(0, 2**62, (), generator=ctx.gen)),
                         dtype=torch.float64)
    for lmax in (0, 1, 2, 5, 10):
        want = _ref("wigner_blocks")(R, lmax)
        for dtype in (torch.float64, torch.float32):
            got = impl(R.to(dtype).to(ctx.device), lmax)
            yield Case(f"lmax={lmax} {str(dtype)[6:]}", rel_err(got, want), check_bound(dtype))


def _voxel_inputs(ctx: Context, exact: bool, dtype: torch.dtype):
    from . import groups

    B, K, n, C = 2, 2, 5, 8  # channels: 2 scalars, then two vectors (2-4, 5-7)
    if exact:
        G = groups.group_elements("octahedral", dtype=torch.float64)
        R = G[torch.randint(0, 24, (K * B,), generator=ctx.gen)]
    else:
        from . import random_rotations

        R = random_rotations(K * B, seed=int(torch.randint(0, 2**62, (), generator=ctx.gen)), dtype=torch.float64)
    M = R.float().to(ctx.device)
    vec = torch.tensor([2, 5], dtype=torch.int32).to(ctx.device)  # first channel of each vector
    return {"x": ctx.randn(B, C, n, n, n, dtype=dtype), "M": M, "vec": vec, "B": B, "K": K, "C": C, "n": n,
            "out": ctx.randn(K, B, C, n, n, n, dtype=dtype), "y": ctx.randn(B, C, n, n, n, dtype=dtype),
            "w": torch.rand(B, C, n**3, generator=ctx.gen).to(ctx.device)}


def check_voxels(ctx: Context, backend: str) -> Iterator[Case]:
    from .backends import registry

    for exact in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            v = _voxel_inputs(ctx, exact, dtype)
            label = f"{'exact' if exact else 'trilinear'} {str(dtype)[6:]}"
            args = (v["x"], v["M"], v["vec"], exact)
            yield Case("resample " + label, rel_err(_impl("voxels_resample", backend)(*args),
                                                    _ref("voxels_resample")(*_cpu(args))), check_bound(dtype))
            if backend not in registry.implemented("voxels_reduce"):
                continue  # the cpu backend has the copies only
            Mk = v["M"].reshape(v["K"], v["B"], 3, 3).transpose(-1, -2).contiguous()
            for w in (None, v["w"]):
                args = (v["out"], Mk, v["y"], w, v["vec"], exact)
                yield Case(f"reduce {label}{' weighted' if w is not None else ''}",
                           rel_err(_impl("voxels_reduce", backend)(*args), _ref("voxels_reduce")(*_cpu(args))),
                           check_bound(torch.float32))


# --------------------------------------------------------------------------- the library ops


def _opcheck_args(ctx: Context, backend: str) -> Iterator[tuple[str, tuple]]:
    c = _row_case(ctx, 3, torch.float32, "dense")
    g = _row_case(ctx, 9, torch.float32, "graph")
    x = c.x.clone().requires_grad_()
    yield "rotate_rows", (x, c.M, None, c.P, c.center_x.clone().requires_grad_(), backend)
    if ctx.gpu:  # the graph layout: the same schema, other kernels
        yield "rotate_rows", (g.x.clone().requires_grad_(), g.M, g.sample, 0, None, backend)
    yield "rotate_rows_backward", (c.grad_rot, c.M, None, c.P, backend)
    yield "reduce_rows", (c.out.clone().requires_grad_(), c.M, c.target.clone().requires_grad_(), None, c.P,
                          c.valid, c.center.clone().requires_grad_(), c.B, backend)
    if ctx.gpu:
        yield "reduce_rows", (g.out.clone().requires_grad_(), g.M, g.target, g.sample, 0, None, None, g.B, backend)
    mean, _ = _ref("reduce_rows")(*_cpu((c.out, c.M, c.target, None, c.P, c.valid, c.center, c.B)))
    yield "reduce_rows_backward", (c.grad_mean, c.grad_sums, c.out, c.M, c.target, None, c.P, c.valid, c.center,
                                   mean.to(ctx.device), backend)
    w = design_weights(ctx, c.K, c.acc)
    yield "reduce_rows weighted", (c.out.clone().requires_grad_(), c.M, c.target.clone().requires_grad_(), None,
                                   c.P, c.valid, c.center.clone().requires_grad_(), c.B, backend, w)
    mean, _ = _ref("reduce_rows")(*_cpu((c.out, c.M, c.target, None, c.P, c.valid, c.center, c.B, w)))
    yield "reduce_rows_backward weighted", (c.grad_mean, c.grad_sums, c.out, c.M, c.target, None, c.P, c.valid,
                                            c.center, mean.to(ctx.device), backend, w)
    from . import random_rotations

    R = random_rotations(5, seed=1, dtype=torch.float32, device=ctx.device)
    yield "wigner_blocks", (R, 3, backend)
    yield "random_rotations_seeded", (torch.full((), 5, dtype=torch.int64, device=ctx.device), 7, 2**32 - 3, True,
                                      torch.float32, backend)


def check_opcheck(ctx: Context, backend: str) -> Iterator[Case]:
    """``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch)
    of every ``torch.ops.fastequiv`` op this backend implements (the reductions also with
    weights)."""
    from .backends import registry

    cases = list(_opcheck_args(ctx, backend))
    if backend in registry.implemented("voxels_resample"):
        # trilinear only: the exact path reads its cube elements on the host, which tracing
        # with fake tensors (opcheck's AOT tests) cannot
        v = _voxel_inputs(ctx, False, torch.float32)
        cases.append(("voxels_resample", (v["x"].clone().requires_grad_(), v["M"], v["vec"], False, backend)))
    if backend in registry.implemented("voxels_reduce"):
        v = _voxel_inputs(ctx, False, torch.float32)
        Mk = v["M"].reshape(v["K"], v["B"], 3, 3).transpose(-1, -2).contiguous()
        cases.append(("voxels_reduce", (v["out"].clone().requires_grad_(), Mk, v["y"].clone().requires_grad_(),
                                        v["w"], v["vec"], False, backend)))
    for name, args in cases:
        try:
            torch.library.opcheck(getattr(torch.ops.fastequiv, name.split()[0]), args)
            yield Case(name, 0.0, 0.0)
        except Exception as err:  # noqa: BLE001 (opcheck raises OpCheckError, or the op's own error)
            yield Case(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:300]}", float("inf"), 0.0)


def _step_model(ctx: Context, dtype: torch.dtype):
    import fastequiv as fe

    spec = fe.Spec(inputs={"pos": "position", "f": "2x0e + 1x1o + 1x2e"},
                   output={"forces": "vector", "h": "1x1o + 1x2e"}, mask=None)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=ctx.gen)))
    lin = torch.nn.Linear(3 + 10, 3 + 8).to(device=ctx.device, dtype=dtype)

    def model(pos, f):
        h = lin(torch.cat([pos, f[:, None, :].expand(-1, pos.shape[1], -1)], dim=-1))
        return {"forces": h[..., :3], "h": torch.tanh(h[..., 3:]).mean(1)}

    B, n = 4, 5
    inputs = {"pos": ctx.randn(B, n, 3, dtype=dtype), "f": ctx.randn(B, 10, dtype=dtype)}
    target = {"forces": ctx.randn(B, n, 3, dtype=dtype), "h": ctx.randn(B, 8, dtype=dtype)}
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[1, 3:] = False
    return spec, lin, model, inputs, target, mask.to(ctx.device)


def _eager_step(model, spec, mask, backend: str) -> Callable:
    """``step(pos, f, y_forces, y_h) -> (loss, L_equiv)``: the twirl_loss step that
    :func:`check_compile` compiles and also runs eagerly."""
    import fastequiv as fe

    def step(pos, f, y_forces, y_h):
        loss, d = fe.twirl_loss(model, {"pos": pos, "f": f}, {"forces": y_forces, "h": y_h}, spec=spec,
                                samples=3, seed=11, mask=mask, equiv_weight=0.5, backend=backend, check_finite=False)
        return loss, d.equiv

    return step


def check_compile(ctx: Context, backend: str) -> Iterator[Case]:
    """``torch.compile(fullgraph=True)`` of a twirl_loss step (positions, irreps, a mask) on
    its first call, against the eager step: loss, L_equiv and the gradients. Inductor in
    float32 on a GPU; on the CPU the aot_eager backend (the same trace, without inductor's
    C++ build) in float64."""
    for dtype in (torch.float32,) if ctx.gpu else (torch.float64,):
        spec, lin, model, inputs, target, mask = _step_model(ctx, dtype)
        step = _eager_step(model, spec, mask, backend)
        args = (inputs["pos"], inputs["f"], target["forces"], target["h"])
        compiled = torch.compile(step, fullgraph=True, backend="inductor" if ctx.gpu else "aot_eager")
        loss, equiv = compiled(*args)
        loss.backward()
        grads = [p.grad.clone() for p in lin.parameters()]
        lin.zero_grad()
        want_loss, want_equiv = step(*args)
        want_loss.backward()
        err = max(rel_err(loss, want_loss), rel_err(equiv, want_equiv),
                  *(rel_err(g, p.grad) for g, p in zip(grads, lin.parameters())))
        yield Case(f"twirl_loss step {str(dtype)[6:]}", err, check_bound(dtype, STEP))


def check_cuda_graph(ctx: Context, backend: str) -> Iterator[Case]:
    """A forward+backward twirl_loss step captured in a CUDA graph (after fe.warmup and
    eager warm-up steps on a side stream) and replayed: with an int seed it equals the
    eager step; with seed=None every replay draws new rotations (finite, different)."""
    import fastequiv as fe

    spec, lin, model, inputs, target, mask = _step_model(ctx, torch.float32)
    args = (inputs["pos"], inputs["f"], target["forces"], target["h"])

    def step(seed):
        loss, d = fe.twirl_loss(model, {"pos": args[0], "f": args[1]}, {"forces": args[2], "h": args[3]}, spec=spec,
                                samples=3, seed=seed, mask=mask, equiv_weight=0.5, backend=backend)
        loss.backward()
        return loss.detach(), d.equiv.detach()

    fe.warmup(spec, ctx.device, backend=backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for seed in (11, None, None):  # warm-up: kernels compiled, caches filled, allocator settled
            lin.zero_grad(set_to_none=True)
            step(seed)
    torch.cuda.current_stream().wait_stream(side)

    lin.zero_grad(set_to_none=True)
    want_loss, want_equiv = step(11)
    want_grads = [p.grad.clone() for p in lin.parameters()]

    fixed, fresh = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    lin.zero_grad(set_to_none=True)
    with torch.cuda.graph(fixed):
        fixed_out = step(11)
    fixed.replay()
    torch.cuda.synchronize()
    err = max(rel_err(fixed_out[0], want_loss), rel_err(fixed_out[1], want_equiv),
              *(rel_err(p.grad, g) for p, g in zip(lin.parameters(), want_grads)))
    yield Case("seed=11 replay vs eager", err, check_bound(torch.float32, STEP))

    lin.zero_grad(set_to_none=True)
    with torch.cuda.graph(fresh):
        fresh_out = step(None)
    seen = []
    for _ in range(3):
        fresh.replay()
        torch.cuda.synchronize()
        seen.append((float(fresh_out[0]), float(fresh_out[1])))
    finite = all(torch.isfinite(torch.tensor(s)).all() for s in seen)
    distinct = len(set(seen)) == len(seen)
    yield Case(f"seed=None: 3 replays, new rotations each ({'finite' if finite else 'NOT finite'}, "
               f"{'distinct' if distinct else 'REPEATED'})", 0.0 if finite and distinct else float("inf"), 0.0)


CHECK_FUNCS = {
    "random_rotations": check_random_rotations,
    "rotate_rows": check_rotate_rows,
    "rotate_rows_bwd": check_rotate_rows_bwd,
    "reduce_rows": check_reduce_rows,
    "reduce_rows_bwd": check_reduce_rows_bwd,
    "graph_atomics": check_graph_atomics,
    "wigner_blocks": check_wigner_blocks,
    "voxels": check_voxels,
    "opcheck": check_opcheck,
    "compile": check_compile,
    "cuda_graph": check_cuda_graph,
}


# --------------------------------------------------------------------------- the command


def plan(backends, devices, checks) -> list[tuple[str, str, torch.device]]:
    """``(check, backend, device)`` for every check a backend can run on a device here."""
    from .backends import registry

    todo = []
    for device in devices:
        for backend in backends:
            for check in checks:
                if check == "cuda_graph" and device.type != "cuda":
                    continue
                if check == "opcheck" and backend == "torch":
                    continue  # backend="torch" calls the references directly, never torch.ops.fastequiv
                op = _OP_OF[check]
                if backend in registry.implemented(op) and backend in registry.runnable(op, device):
                    todo.append((check, backend, device))
    return todo


def run_one(check: str, backend: str, device: torch.device, seed: int, repeat: int, interpreter: bool) -> Result:
    gen = torch.Generator().manual_seed(seed)
    ctx = Context(device, gen, interpreter, repeat)
    res = Result(check, backend, str(device))
    start = time.perf_counter()
    worst = -1.0
    try:
        for case in CHECK_FUNCS[check](ctx, backend):
            res.cases += 1
            ok = case.error <= case.tolerance
            ratio = case.error / case.tolerance if case.tolerance > 0 else (0.0 if ok else float("inf"))
            if ratio > worst or (not ok and res.result == "PASS"):
                worst = ratio
                res.max_rel_err, res.tolerance = case.error, case.tolerance
            if not ok:
                if res.result == "PASS":
                    res.note = case.label
                res.result = "FAIL"
    except Exception as err:  # noqa: BLE001 (a crash is a failure of this check, not of the command)
        res.result = "FAIL"
        res.max_rel_err = float("inf")
        frame = traceback.extract_tb(err.__traceback__)[-1]
        res.note = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''} " \
                   f"({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    res.seconds = time.perf_counter() - start
    return res


def _versions(interpreter: bool) -> dict:
    import importlib.metadata as md

    import fastequiv as fe

    out = {"fastequiv": fe.__version__, "torch": torch.__version__, "python": platform.python_version()}
    dists = md.packages_distributions()
    for name in ("triton", "cupy", "e3nn"):  # cupy's distribution is cupy-cuda12x and the like
        found = dists.get(name, [])
        out[name] = md.version(found[0]) if found else None
    out["triton_interpreter"] = interpreter
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda_runtime"] = torch.version.cuda
    info = fe.build_info()
    out["extension"] = info["extension"]
    out["extension_cuda"] = info["cuda"]
    out["cuda_archs"] = info["cuda_archs"]
    return out


def _fmt(x: float) -> str:
    return "0" if x == 0 else ("inf" if x == float("inf") else f"{x:.1e}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as JSON (nothing else on stdout)")
    parser.add_argument("--backend", action="append", choices=BACKENDS, default=None,
                        help="check only this backend (repeatable; default: every backend that can run here)")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"], default=None,
                        help="check only this device (repeatable; default: the CPU, and the GPU when torch sees one)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of the checks: {','.join(CHECKS)}")
    parser.add_argument("--skip", default=None, help="comma-separated checks to leave out")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the graph-atomics reduction (default 5)")


def main(args: argparse.Namespace) -> int:
    from .backends import triton as triton_backend

    interpreter = triton_backend.INTERPRET
    checks = list(CHECKS)
    for flag, keep in (("only", True), ("skip", False)):
        value = getattr(args, flag)
        if value:
            names = [c.strip() for c in value.split(",") if c.strip()]
            unknown = sorted(set(names) - set(CHECKS))
            if unknown:
                raise SystemExit(f"fastequiv check: --{flag} got unknown {unknown}; choose from {list(CHECKS)}")
            checks = [c for c in checks if (c in names) == keep]
    devices = [torch.device(d) for d in (args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]))]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        raise SystemExit("fastequiv check: --device cuda, but torch sees no CUDA device")
    devices = [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" else d for d in devices]
    backends = list(args.backend or BACKENDS)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    versions = _versions(interpreter)
    todo = plan(backends, devices, checks)
    runnable_backends = sorted({b for _, b, _ in todo}, key=BACKENDS.index)
    out = sys.stdout
    if not args.json:
        gpu = f", {versions['gpu']}" if "gpu" in versions else ""
        print(f"fastequiv check: fastequiv {versions['fastequiv']}, torch {versions['torch']}, triton "
              f"{versions['triton'] or '-'}{' (interpreter)' if interpreter else ''}, cupy {versions['cupy'] or '-'}"
              f"{gpu}; inputs seed {seed}", file=out)
        print(f"backends that can run here: {', '.join(runnable_backends) or 'none'} on "
              f"{', '.join(str(d) for d in devices)}", file=out)
        print(f"{'check':<17} {'backend':<7} {'device':<7} {'cases':>5}  {'max rel err':>11}  {'tolerance':>9}  "
              f"{'result':<6} {'time':>6}", file=out, flush=True)
    start = time.perf_counter()
    results = []
    for check, backend, device in todo:
        res = run_one(check, backend, device, seed, args.repeat, interpreter)
        results.append(res)
        if not args.json:
            note = f"  {res.note}" if res.result != "PASS" and res.note else ""
            print(f"{res.check:<17} {res.backend:<7} {res.device:<7} {res.cases:>5}  {_fmt(res.max_rel_err):>11}  "
                  f"{_fmt(res.tolerance):>9}  {res.result:<6} {res.seconds:>5.1f}s{note}", file=out, flush=True)
    seconds = time.perf_counter() - start
    failed = [r for r in results if r.result != "PASS"]
    summary = {"checks": len(results), "passed": len(results) - len(failed), "failed": len(failed),
               "backends": runnable_backends, "devices": [str(d) for d in devices], "seconds": round(seconds, 2),
               "seed": seed, "ok": not failed and bool(results)}
    if args.json:
        def clean(r):
            d = asdict(r)
            for k in ("max_rel_err", "tolerance"):
                d[k] = d[k] if d[k] != float("inf") else "inf"
            d["seconds"] = round(d["seconds"], 3)
            return d

        json.dump({"versions": versions, "summary": summary, "results": [clean(r) for r in results]}, out, indent=1)
        out.write("\n")
    else:
        verdict = "all PASS" if summary["ok"] else (f"{len(failed)} FAIL: " + ", ".join(
            f"{r.check}/{r.backend}/{r.device}" for r in failed) if failed else "nothing ran")
        print(f"summary: {len(results)} checks of {', '.join(runnable_backends)} on "
              f"{', '.join(str(d) for d in devices)}: {summary['passed']} PASS, {summary['failed']} FAIL in "
              f"{seconds:.1f} s ({verdict})", file=out)
    return 0 if summary["ok"] else 1
