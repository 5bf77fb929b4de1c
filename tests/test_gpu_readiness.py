"""What would break on the first GPU, shown without one.

None of these need a GPU: the Triton kernels run in Triton's CPU interpreter (conftest.py
sets ``TRITON_INTERPRET=1`` on machines without one), and are compiled ahead of time for
sm_90 in a subprocess (Triton compiles for a named target with no driver), which is where
register use, spills and compile time show. With a GPU the same tests run on CUDA
tensors (``DEVICE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from fastequiv.kernels import rotate_copies as rotate_kernels  # noqa: E402
from fastequiv.kernels import triton_common  # noqa: E402
from fastequiv.kernels import twirl_reduce as reduce_kernels  # noqa: E402
from fastequiv.ops.rotate_copies import rotate_rows_backward_reference, rotate_rows_reference  # noqa: E402
from fastequiv.ops.row_cases import RowCase  # noqa: E402
from fastequiv.ops.twirl_reduce import reduce_rows_backward_reference, reduce_rows_reference  # noqa: E402
from fastequiv.tolerances import TOL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETER = not torch.cuda.is_available()


# --------------------------------------------------------------------------- wide rows


def _row_case(d: int, dtype: torch.dtype, graph: bool) -> RowCase:
    """Inputs of the four row kernels at ``d`` components: K = 2 copies of B = 3 samples,
    two rows each (one row each for d > 100, to keep the interpreter quick)."""
    return RowCase(K=2, B=3, P=1 if d > 100 else 2, d=d, dtype=dtype, layout="graph" if graph else "dense",
                   mask=True, device=DEVICE)


def _close(got, want, dtype):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), **TOL[dtype])


def _check_row_kernels(d: int, dtype: torch.dtype, graph: bool, every_variant: bool = True) -> None:
    """The four row kernels against their references; ``every_variant``: with and without
    centres, masks and grad_mean (else only with all of them)."""
    c = _row_case(d, dtype, graph)
    M, sample, P = c.M, c.sample, c.P
    for center in (None, c.center_x) if every_variant else (c.center_x,):
        _close(rotate_kernels.rotate_rows(c.x, M, sample, P, center),
               rotate_rows_reference(c.x, M, sample, P, center), dtype)
    _close(rotate_kernels.rotate_rows_backward(c.grad_rot, M, sample, P),
           rotate_rows_backward_reference(c.grad_rot, M, sample, P), dtype)
    variants = ((None, None, None), (c.valid, c.center, c.grad_mean))
    for valid, center, grad_mean in variants if every_variant else variants[1:]:
        args = (c.out, M, c.target, sample, P, valid, center)
        mean, sums = reduce_kernels.reduce_rows(*args, c.B)
        want_mean, want_sums = reduce_rows_reference(*args, c.B)
        _close(mean, want_mean, dtype)
        _close(sums, want_sums, dtype)
        _close(reduce_kernels.reduce_rows_backward(grad_mean, c.grad_sums, *args, want_mean),
               reduce_rows_backward_reference(grad_mean, c.grad_sums, *args, want_mean), dtype)


@pytest.mark.parametrize("d", [1, 3, 9, 25, 288, 1152])
def test_row_kernels_take_any_width(d):
    """Rows wider than one tile (d > BLOCK_D) are walked in column chunks of the matrix:
    the four row kernels equal the torch reference from d = 1 to d = 1152 (the width of
    a large irreps, e.g. 128x0e + 64x1o + ... ), dense and graph layout, centres, masks
    and grad_mean, float64, float32 and bfloat16 rows."""
    if d <= 25:
        for graph in (False, True):
            _check_row_kernels(d, torch.float64, graph)
        _check_row_kernels(d, torch.bfloat16, graph=True, every_variant=False)
    elif d == 288:
        _check_row_kernels(d, torch.float64, graph=False)
        _check_row_kernels(d, torch.float32, graph=True, every_variant=False)
    else:  # the interpreter is slow at this width: one layout, every option at once
        _check_row_kernels(d, torch.float64, graph=True, every_variant=False)


@pytest.mark.skipif(not INTERPRETER, reason="the GPU itself runs the GPU block sizes")
@pytest.mark.parametrize("d", [25, 40])
def test_row_kernels_with_the_gpu_block_sizes(d, monkeypatch):
    """The interpreter run with the blocks a GPU gets (BLOCK_D <= 32): d = 40 is 2 x 2
    chunks there, one chunk under the interpreter's own (larger) blocks."""
    monkeypatch.setattr(triton_common, "interpreting", lambda: False)
    assert triton_common.row_block(4, d)[1] == 32
    _check_row_kernels(d, torch.float64, graph=False)
    _check_row_kernels(d, torch.float32, graph=True, every_variant=False)


@pytest.mark.parametrize("d", [1, 3, 25, 33, 288, 1152, 100_000])
def test_row_tiles_are_bounded(d, monkeypatch):
    """The matrix tile a program holds, BLOCK_N * BLOCK_D^2, is at most 32 x 32 on a GPU
    whatever d is (d = 288 as one 512 x 512 tile spilled 4.6 kB a thread and took 10 s to
    compile; d > 1024 did not compile)."""
    monkeypatch.setattr(triton_common, "interpreting", lambda: False)
    for N in (1, 7, 10_000):
        block_n, block_d = triton_common.row_block(N, d)
        assert block_d <= 32 and block_n * block_d**2 <= 1024
        assert block_d >= min(d, 32)  # a row of up to 32 components is one chunk


# ------------------------------------------------------------------ ahead-of-time compiles

_AOT = r'''
import json, os, re, subprocess, sys, tempfile, time
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastequiv.kernels import random_rotations, rotate_copies, twirl_reduce, voxels, wigner_d

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
rows = {"N": "i32", "B": "i32", "K": "i32", "P": "i32"}


def compile_one(fn, sig, consts):
    sig = dict(sig, **{c: "constexpr" for c in consts})
    start = time.perf_counter()
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"seconds": seconds, "registers": int(m.group(1)), "stack": int(m.group(2))}


def row_kernels(d):
    block_n, block_d = max(1, min(128, 1024 // min(triton.next_power_of_2(d), 32) ** 2)), min(triton.next_power_of_2(d), 32)
    yield f"rotate_rows d={d}", rotate_copies._rotate_rows_kernel, dict(
        x_ptr="*fp32", M_ptr="*fp32", sample_ptr="*i64", center_ptr="*fp32", out_ptr="*fp32", **rows), dict(
        D=d, GRAPH=False, HAS_CENTER=d == 3, BLOCK_N=block_n, BLOCK_D=block_d)
    yield f"rotate_rows_backward d={d}", rotate_copies._rotate_rows_backward_kernel, dict(
        grad_ptr="*bf16", M_ptr="*fp32", sample_ptr="*i64", out_ptr="*fp32", **rows), dict(
        D=d, GRAPH=True, BLOCK_N=block_n, BLOCK_D=block_d)
    for weighted in (False, True):  # the copies' weights of a rotation design
        tag = " weighted" if weighted else ""
        yield f"reduce_rows{tag} d={d}", twirl_reduce._reduce_rows_kernel, dict(
            out_ptr="*bf16", M_ptr="*fp32", target_ptr="*bf16", sample_ptr="*i64", valid_ptr="*u8",
            center_ptr="*fp32", mean_ptr="*fp32", sums_ptr="*fp32", w_ptr="*fp32", **rows, n_chunks="i32"), dict(
            D=d, GRAPH=True, HAS_VALID=True, HAS_CENTER=d == 3, WEIGHTED=weighted, BLOCK_S=1, BLOCK_P=block_n,
            BLOCK_D=block_d)
        yield f"reduce_rows_backward{tag} d={d}", twirl_reduce._reduce_rows_backward_kernel, dict(
            grad_mean_ptr="*fp32", grad_sums_ptr="*fp32", out_ptr="*bf16", M_ptr="*fp32", target_ptr="*bf16",
            sample_ptr="*i64", valid_ptr="*u8", center_ptr="*fp32", mean_ptr="*fp32", grad_out_ptr="*bf16",
            work_ptr="*fp32", w_ptr="*fp32", rest_ptr="*fp32", **rows), dict(
            D=d, GRAPH=False, HAS_VALID=True, HAS_CENTER=d == 3, HAS_GRAD_MEAN=True, WEIGHTED=weighted,
            BLOCK_N=block_n, BLOCK_D=block_d)


def others():
    yield "random_rotations f32", random_rotations._random_rotations_kernel, dict(
        seed_ptr="*i64", out_ptr="*fp32", n="i64", offset="i64"), dict(IMPROPER=True, BLOCK=256)
    yield "wigner_blocks lmax=10", wigner_d._wigner_blocks_kernel, dict(
        R_ptr="*fp32", out_ptr="*fp32", coef_ptr="*fp32", ij_ptr="*i32", prev_ptr="*i32", N="i32"), dict(
        S=wigner_d.n_columns(10), LMAX=10, T=16, BLOCK_R=16, BLOCK_O=8)
    vox = dict(scal_ptr="*i32", vec_ptr="*i32", n_scal="i32", n_vec="i32")
    yield "voxels resample", voxels._resample_kernel, dict(
        x_ptr="*bf16", M_ptr="*fp32", out_ptr="*bf16", **vox, B="i32", C="i32", n="i32", V="i32", rows="i32"), dict(
        EXACT=False, BLOCK=128)
    yield "voxels twirl_reduce", voxels._reduce_kernel, dict(
        out_ptr="*bf16", M_ptr="*fp32", y_ptr="*bf16", w_ptr="*fp32", mean_ptr="*fp32", sums_ptr="*fp32", **vox,
        K="i32", B="i32", C="i32", n="i32", V="i32"), dict(HAS_W=True, EXACT=False, BLOCK=128)


cases = [c for d in (3, 288, 1152) for c in row_kernels(d)] + list(others())
print(json.dumps({name: compile_one(fn, sig, consts) for name, fn, sig, consts in cases}))
'''


@pytest.fixture(scope="module")
def sm90():
    """Compile the Triton kernels for sm_90 in one fresh process (the interpreter off, an
    empty cache): ``{kernel: {"seconds", "registers", "stack"}}``."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("this triton ships no NVIDIA toolchain (cuobjdump) to compile for sm_90 with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tempfile.gettempdir())  # the installed package, not the checkout
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_row_kernels_compile_for_sm90_without_spills(sm90):
    """Every row kernel compiles for sm_90 at d = 3, 288 and 1152 in well under a second or
    two, with no spill to local memory (STACK 0), the reductions with and without weights.
    Before the column chunks, d = 288 took 9.6 s and spilled 4664 bytes a thread, and
    d = 1152 did not compile."""
    usage = {name: u for name, u in sm90.items() if "_rows" in name}
    assert len(usage) == 18
    for name, u in usage.items():
        assert u["stack"] == 0, f"{name} spills: {u}"
        assert u["seconds"] < 5, f"{name} took {u['seconds']:.1f} s to compile"
        assert u["registers"] <= 168, f"{name}: {u}"


def test_every_other_triton_kernel_compiles_for_sm90(sm90):
    """The seeded rotations (Philox on uint32 words, sqrt_rn), wigner_blocks and both voxel
    kernels compile for sm_90. The voxel reduction is the one heavy kernel: all its
    registers (255) and some spill on sm_90 (recorded in benchmarks/RESULTS.md)."""
    usage = {name: u for name, u in sm90.items() if "_rows" not in name}
    assert set(usage) == {"random_rotations f32", "wigner_blocks lmax=10", "voxels resample", "voxels twirl_reduce"}
    for name, u in usage.items():
        assert u["seconds"] < 30, f"{name} took {u['seconds']:.1f} s to compile"
        if name != "voxels twirl_reduce":
            assert u["stack"] == 0, f"{name} spills: {u}"


# --------------------------------------------------------------------- Philox on every Triton

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastequiv import groups  # noqa: E402
from fastequiv.kernels import random_rotations as rotation_kernels  # noqa: E402


@triton.jit
def _randint4x_before_triton_3_4(seed, offset, n_rounds: tl.constexpr = 10):
    """``tl.randint4x`` as Triton 3.0 - 3.3 wrote it: an int64 offset is one 64-bit counter
    word, which selects Philox-4x64."""
    _0 = offset * 0
    return tl.philox(seed, offset, _0, _0, _0, n_rounds)


@triton.jit
def _words_kernel(seed_ptr, out_ptr, offset, OLD_RANDINT4X: tl.constexpr, BLOCK: tl.constexpr):
    i = offset + tl.arange(0, BLOCK).to(tl.int64)
    seed = tl.load(seed_ptr)
    if OLD_RANDINT4X:
        w0, w1, w2, w3 = _randint4x_before_triton_3_4(seed, i)
    else:
        w0, w1, w2, w3 = rotation_kernels.philox_words(seed, i)
    o = out_ptr + tl.arange(0, BLOCK) * 4
    tl.store(o, w0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(o + 1, w1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(o + 2, w2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(o + 3, w3.to(tl.int64) & 0xFFFFFFFF)


def _words(seed: int, offset: int, old: bool) -> torch.Tensor:
    out = torch.zeros(16, 4, dtype=torch.int64, device=DEVICE)
    _words_kernel[(1,)](torch.tensor(seed, device=DEVICE), out, offset, OLD_RANDINT4X=old, BLOCK=16)
    return out.cpu()


@pytest.mark.parametrize("seed", [0, 2**32 + 1, 2**63 - 1])
@pytest.mark.parametrize("offset", [0, 2**32 - 5, 2**40 + 9])
def test_philox_words_are_the_4x32_stream_on_any_triton(seed, offset):
    """The kernel hands ``tl.philox`` the counter as explicit uint32 words (offset mod 2^32,
    offset >> 32), which runs Philox-4x32-10 in every Triton since 3.0: the words equal the
    reference stream. ``tl.randint4x(seed, int64 offset)`` gives them only from Triton 3.4;
    before, it ran Philox-4x64 on the int64 counter (other words, and 64-bit values that
    made every rotation NaN), as its 3.0 - 3.3 form shows here."""
    want = groups.philox_words(16, torch.tensor(seed), offset).to(torch.int64)
    assert torch.equal(_words(seed, offset, old=False), want)
    assert not torch.equal(_words(seed, offset, old=True), want)


def test_no_kernel_calls_tritons_offset_based_rng():
    """No Triton kernel calls ``tl.randint4x`` / ``tl.rand*`` (their counter layout changed
    in Triton 3.4): the Philox words come from :func:`philox_words` only."""
    import ast

    calls = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "randint", "randint4x", "rand", "rand4x", "randn", "randn4x"):
                calls.append(f"{path.name}:{node.lineno} {node.func.attr}")
    assert not calls, calls


def test_seeded_rotations_match_the_reference_past_2_to_the_32():
    """The seeded kernel (sqrt_rn for a and b in float32) against the float64 reference,
    an offset range that crosses 2^32."""
    seed = torch.tensor(2**62 + 3, device=DEVICE)
    want = groups.elements_from_words(groups.philox_words(4096, seed.cpu(), 2**32 - 2048), "O3")
    got = rotation_kernels.random_rotations_seeded(seed, 4096, 2**32 - 2048, True, torch.float32)
    assert torch.isfinite(got).all()
    assert (got.cpu().double() - want.double()).abs().max().item() < 1e-6
    got64 = rotation_kernels.random_rotations_seeded(seed, 4096, 2**32 - 2048, True, torch.float64)
    torch.testing.assert_close(got64.cpu(), want.double(), rtol=0, atol=1e-12)


# --------------------------------------------------------------------- voxels: int64, devices

from fastequiv.kernels import voxels as voxel_kernels  # noqa: E402


@triton.jit
def _flat_probe(e_ptr, live_ptr, total_ptr, pid, count_a, count_b, BLOCK: tl.constexpr):
    e, live, total = voxel_kernels.flat_elements(pid, count_a, count_b, BLOCK)
    lane = tl.arange(0, BLOCK)
    tl.store(e_ptr + lane, e)
    tl.store(live_ptr + lane, live.to(tl.int8))
    tl.store(total_ptr, total)


@pytest.mark.parametrize("count_a, count_b, pid", [
    (16, 512**3, 2**31 // 128 - 1),  # 16 grids of 512^3: B * V = 2^31, the last block
    (2**16, 2**16, 2**31 // 128 + 5),  # B * V = 2^32: a block past 2^31
    (3, 100, 2),  # small: the last block is partly past the end
])
def test_voxel_flat_index_is_int64_past_2_to_the_31(count_a, count_b, pid):
    """The voxel kernels' flat (row, voxel) index and its bound ``B * V`` are int64: with
    ``B * V >= 2^31`` an int32 product wraps (to 0 at exactly 2^31 or 2^32), which masked
    off every lane, so nothing was computed. The index helper both kernels use, run on
    program ids past 2^31 / BLOCK (the grids themselves would need 8+ GB)."""
    BLOCK = 128
    e = torch.empty(BLOCK, dtype=torch.int64, device=DEVICE)
    live = torch.empty(BLOCK, dtype=torch.int8, device=DEVICE)
    total = torch.empty(1, dtype=torch.int64, device=DEVICE)
    _flat_probe[(1,)](e, live, total, pid, count_a, count_b, BLOCK=BLOCK)
    want_e = pid * BLOCK + torch.arange(BLOCK, dtype=torch.int64)
    assert int(total) == count_a * count_b
    assert torch.equal(e.cpu(), want_e)
    assert torch.equal(live.cpu().bool(), want_e < count_a * count_b)


def test_voxel_grids_past_int32_offsets_are_refused():
    """Offsets inside one grid stay int32 (n^3 < 2^31, n <= 1290): a larger grid raises
    rather than wrapping. (The flat index over grids is int64.)"""
    with pytest.raises(ValueError, match="n <= 1290"):
        voxel_kernels._check_grid(1291)
    voxel_kernels._check_grid(1290)


def test_voxel_launches_run_on_the_grids_device(monkeypatch):
    """Both voxel kernels launch under ``device_guard`` of their input (Triton launches on
    the current device: a grid on cuda:1 with cuda:0 current was computed on the wrong
    GPU), like the row kernels."""
    from fastequiv import grid

    seen = []
    real = voxel_kernels.device_guard

    def guard(t):
        seen.append(t.device)
        return real(t)

    monkeypatch.setattr(voxel_kernels, "device_guard", guard)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, 5, generator=g).to(DEVICE)
    R = groups.group_elements("octahedral", dtype=torch.float32)[:4].to(DEVICE)
    vec = torch.tensor([1], dtype=torch.int32, device=DEVICE)
    got = voxel_kernels.resample(x, R, vec, True)
    torch.testing.assert_close(got, grid.resample(x, R, vec, True))
    out = got.reshape(2, 2, 4, 5, 5, 5)
    M = R.reshape(2, 2, 3, 3).transpose(-1, -2).contiguous()
    mean, sums = voxel_kernels.twirl_reduce(out, M, x, None, vec, True)
    want_mean, want_sums = grid.reduce(out, M, x, None, vec, True)
    torch.testing.assert_close(mean, want_mean.reshape(mean.shape))
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-5)
    assert seen == [x.device, out.device]


def test_voxel_channel_tables_need_no_host_sync(monkeypatch):
    """The scalar-channel table is built without ``torch.nonzero`` (a host sync a CUDA
    graph cannot capture): a stable sort of the vector flags."""
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: pytest.fail("torch.nonzero syncs with the host"))
    for C, starts in ((7, [1, 4]), (3, [0]), (5, []), (9, [0, 6])):
        scal, vec = voxel_kernels._tables(torch.tensor(starts, dtype=torch.int32, device=DEVICE), C)
        vector_channels = {s + i for s in starts for i in range(3)}
        assert scal.tolist() == [c for c in range(C) if c not in vector_channels]
        assert scal.dtype == vec.dtype == torch.int32


# --------------------------------------------------------------------- CuPy, without CuPy

import types  # noqa: E402

import fastequiv.kernels  # noqa: E402
from fastequiv.backends import cupy as cupy_backend  # noqa: E402


def _stand_in_cupy() -> types.ModuleType:
    """A ``cupy`` whose ``from_dlpack`` takes the DLPack capsule the way CuPy does: through
    torch's own export, which refuses tensors that require grad (``BufferError``)."""
    fake = types.ModuleType("cupy")
    fake.from_dlpack = lambda t: torch.from_dlpack(t.__dlpack__())
    return fake


def test_cupy_kernel_arguments_of_tensors_that_require_grad(monkeypatch):
    """Inside a ``torch.library`` op the inputs keep ``requires_grad=True``, and DLPack
    refuses to export them: ``_arg`` detaches first. Shown on the whole path from
    ``torch.ops.fastequiv.rotate_rows(..., "cupy")`` to the kernel's arguments (the launch
    itself stubbed: there is no GPU), with the same memory handed over."""
    monkeypatch.setitem(sys.modules, "cupy", _stand_in_cupy())
    x = torch.randn(6, 3, requires_grad=True)
    with pytest.raises(BufferError, match="require gradient"):
        sys.modules["cupy"].from_dlpack(x)
    assert cupy_backend._arg(x).data_ptr() == x.data_ptr()
    assert cupy_backend._arg(x.detach().bfloat16().requires_grad_()).dtype == torch.int16

    handed = []

    def launch(op, kernel, device, blocks, *args):
        handed.extend(cupy_backend._arg(a) for a in args)

    monkeypatch.setattr(cupy_backend, "_launch", launch)
    M = torch.randn(2, 2, 3, 3, requires_grad=True)
    out = torch.ops.fastequiv.rotate_rows(x, M, None, 3, None, "cupy")
    out.sum().backward()  # the backward op hands its inputs over the same way
    tensors = [a for a in handed if isinstance(a, torch.Tensor)]
    assert any(t.data_ptr() == x.data_ptr() for t in tensors)
    assert not any(t.requires_grad for t in tensors)


def test_nvrtc_source_changes_with_every_header(tmp_path, monkeypatch):
    """CuPy caches NVRTC binaries keyed on the source text: the text handed to it ends
    with a hash of every ``*.cuh``, so editing a header compiles anew instead of reusing
    a stale binary, while the .cu text itself is unchanged."""
    (tmp_path / "k.cu").write_text('#include "a.cuh"\nextern "C" __global__ void k() {}\n')
    (tmp_path / "a.cuh").write_text("#define A 1\n")
    (tmp_path / "b.cuh").write_text("#define B 1\n")
    monkeypatch.setattr(fastequiv.kernels, "SOURCE_DIR", tmp_path)
    first = fastequiv.kernels.nvrtc_source("k.cu")
    assert first.startswith(fastequiv.kernels.cuda_source("k.cu"))
    assert fastequiv.kernels.nvrtc_source("k.cu") == first  # stable: the cache still hits
    (tmp_path / "a.cuh").write_text("#define A 2\n")
    second = fastequiv.kernels.nvrtc_source("k.cu")
    (tmp_path / "b.cuh").write_text("#define B 2\n")
    third = fastequiv.kernels.nvrtc_source("k.cu")
    assert len({first, second, third}) == 3


def test_the_cupy_backend_compiles_the_hashed_source(monkeypatch):
    """``_module`` hands ``RawModule`` the text of :func:`nvrtc_source` (the header hash
    included) and the kernels folder as the include path."""
    fake = _stand_in_cupy()
    seen = {}

    class RawModule:
        def __init__(self, code, options):
            seen.update(code=code, options=options)

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake.RawModule = RawModule
    fake.cuda = types.SimpleNamespace(Device=Device)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    cupy_backend._module.__wrapped__("twirl_reduce.cu", 0)
    assert seen["code"] == fastequiv.kernels.nvrtc_source("twirl_reduce.cu")
    assert "fastequiv headers: sha256" in seen["code"]
    assert f"-I{fastequiv.kernels.SOURCE_DIR}" in seen["options"]


# --------------------------------------------------------------------- torch.compile, Triton

_COMPILE_TRITON = r'''
import torch
import fastequiv as fe
from fastequiv.backends import registry, triton as triton_backend

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.compile(fullgraph=True)
def availability(x):
    # what every op asks first: constants to the trace, no import, no graph break
    name = registry.resolve_name("rotate_rows", "triton", x.device)
    why = triton_backend.available(x.device)
    return x + 1, name, why


_, name, why = availability(torch.zeros(2, device=device))
assert name == "triton" and why is None, (name, why)

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
spec = fe.Spec(inputs="position", output="vector")
pos, y = torch.randn(4, 5, 3, device=device), torch.randn(4, 5, 3, device=device)


def step(pos, y):
    loss, d = fe.twirl_loss(net, pos, y, spec=spec, samples=2, seed=3, equiv_weight=0.5, backend="triton",
                            check_finite=False)
    return loss, d.equiv


loss, equiv = torch.compile(step, fullgraph=True)(pos, y)  # the first call in this process
loss.backward()
grads = [p.grad.clone() for p in net.parameters()]
net.zero_grad()
want_loss, want_equiv = step(pos, y)
want_loss.backward()
torch.testing.assert_close(loss, want_loss)
torch.testing.assert_close(equiv, want_equiv)
for p, g in zip(net.parameters(), grads):
    torch.testing.assert_close(p.grad, g)
print("ok")
'''


def test_compiled_triton_step_runs_on_its_first_call():
    """In a fresh process (``TRITON_INTERPRET=1`` on CPU tensors, or on the GPU),
    ``torch.compile(fullgraph=True)`` of a ``twirl_loss`` step on ``backend="triton"``
    runs on its first call and equals the eager step, gradients included: Triton's
    availability is decided when ``fastequiv.backends.triton`` is imported, and
    ``resolve_name`` is a constant to the trace (shown on its own first)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if INTERPRETER:
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", _COMPILE_TRITON], capture_output=True, text=True, env=env,
                         cwd=tempfile.gettempdir(),
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]


# --------------------------------------------------------------------- CUDA-graph capture

import fastequiv as fe  # noqa: E402
from fastequiv import grid, wigner  # noqa: E402
from fastequiv.backends import host  # noqa: E402
from fastequiv.kernels import wigner_d as wigner_kernels  # noqa: E402
from fastequiv.ops.random_rotations import seed_tensor  # noqa: E402


def _forget_tables():
    """Empty every cache of device tables, as in a fresh process."""
    groups._ON_DEVICE.clear()
    wigner._TABLES.clear()
    host.wigner_tables.cache_clear()
    wigner_kernels._tables.cache_clear()


def _pretend_capturing(monkeypatch, on: bool):
    monkeypatch.setattr(groups, "capturing", lambda: on)
    monkeypatch.setattr(grid, "capturing", lambda: on)


def _irreps_step(backend: str, group: str, samples):
    torch.manual_seed(0)
    irreps = "1x0e + 1x1o + 1x2e"
    net = torch.nn.Linear(9, 9).double()
    spec = fe.Spec(inputs=irreps, output=irreps, group=group)
    x, y = torch.randn(3, 4, 9, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)
    loss, d = fe.twirl_loss(net, x.to(DEVICE), y.to(DEVICE), spec=spec, samples=samples, seed=5, backend=backend,
                            check_finite=False)
    return spec, loss


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("group, samples", [("SO3", 2), ("octahedral", None), ("icosahedral", 3)])
def test_tables_are_built_by_warmup_and_refused_during_capture(backend, group, samples, monkeypatch):
    """A step reads tables on its device (a finite group's elements, the Wigner-D tables
    of each backend, the block layout), copied from the host on first use. During a
    CUDA-graph capture that copy cannot be recorded: a first use there raises, naming
    ``fastequiv.warmup``; after ``fe.warmup(spec, device)`` the same step builds nothing.
    (Capture is simulated: ``groups.capturing`` answers True.)"""
    if backend == "cpu" and (DEVICE != "cpu" or not fe.build_info()["extension"]):
        pytest.skip("the cpu backend runs on CPU tensors of a built extension")
    if backend == "triton" and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1")
    _forget_tables()
    _pretend_capturing(monkeypatch, True)
    with pytest.raises(RuntimeError, match=r"fastequiv.warmup\(spec, device\)"):
        _irreps_step(backend, group, samples)
    _pretend_capturing(monkeypatch, False)
    spec, want = _irreps_step(backend, group, samples)
    _forget_tables()
    fe.warmup(spec, DEVICE, backend=backend)
    _pretend_capturing(monkeypatch, True)
    _, got = _irreps_step(backend, group, samples)
    torch.testing.assert_close(got, want)


def test_warmup_covers_every_rep_of_a_spec(monkeypatch):
    """``fe.warmup`` runs the step's ops on every rep of the spec (vectors, positions,
    pseudo-quantities, rank-2 tensors, wide irreps), so a step with all of them builds
    nothing while capturing."""
    irreps = "4x0e + 2x1o + 1x2e + 1x3o"
    spec = fe.Spec(inputs={"pos": "position", "v": "pseudovector", "s": "pseudoscalar", "t": "rank2", "f": irreps},
                   output={"forces": "vector", "h": irreps, "e": "scalar"})
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)

    inputs = {"pos": rand(3, 4, 3), "v": rand(3, 3), "s": rand(3, 1), "t": rand(3, 3, 3), "f": rand(3, 22)}
    target = {"forces": rand(3, 4, 3), "h": rand(3, 22), "e": rand(3, 1)}
    lin = torch.nn.Linear(3 + 3 + 1 + 9 + 22, 3 + 22 + 1).double().to(DEVICE)

    def model(pos, v, s, t, f):
        z = torch.cat([pos.mean(1), v, s, t.flatten(1), f], dim=1)
        h = lin(z)
        return {"forces": pos + h[:, None, :3], "h": h[:, 3:25], "e": h[:, 25:]}

    def step():
        return fe.twirl_loss(model, inputs, target, spec=spec, samples=2, seed=4, check_finite=False)[0]

    want = step()
    _forget_tables()
    fe.warmup(spec, DEVICE)
    _pretend_capturing(monkeypatch, True)
    torch.testing.assert_close(step(), want)


def test_seed_tensor_is_a_device_fill_not_a_host_copy(monkeypatch):
    """An int seed becomes the step's key with ``torch.full`` on the device (capturable;
    ``torch.tensor(seed, device=...)`` copies from the host)."""
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("torch.tensor copies from the host"))
    key = seed_tensor(2**62 + 1, None, torch.device(DEVICE))
    assert key.dtype == torch.int64 and key.dim() == 0 and int(key) == 2**62 + 1
    R = fe.random_rotations(3, seed=2**62 + 1, dtype=torch.float64, backend="torch")
    monkeypatch.undo()
    # the first rotation of that key's Philox stream, from the independent NumPy Philox and
    # Shoemake of tests/test_extension.py (rotations_numpy): a key that lost bits on the way
    # (a float round trip of 2**62 + 1, a truncation to 32 bits) gives another rotation
    first = torch.tensor([[0.964581370354, 0.225032752983, -0.137633716986],
                          [0.109437810326, -0.816131349374, -0.567409011419],
                          [-0.24001280307, 0.532249829172, -0.811852187106]], dtype=torch.float64)
    torch.testing.assert_close(R[0], first, rtol=0, atol=1e-11)


def test_voxels_take_the_trilinear_path_while_capturing(monkeypatch):
    """Choosing the exact cube path reads ``R`` on the host (a sync, not allowed during a
    capture): while capturing the trilinear path is taken, with the same values."""
    R = groups.group_elements("octahedral", dtype=torch.float32)[:6].to(DEVICE)
    x = torch.randn(6, 2, 5, 5, 5, device=DEVICE)
    exact = fe.voxels.rotate(x, R, backend="torch")
    assert grid.is_cube_element(R)
    _pretend_capturing(monkeypatch, True)
    assert not grid.is_cube_element(R)
    torch.testing.assert_close(fe.voxels.rotate(x, R, backend="torch"), exact, rtol=1e-5, atol=1e-5)


def test_capturing_is_true_only_inside_a_capture():
    """``groups.capturing()`` is False outside a capture (always, without a GPU) and while
    ``torch.compile`` traces, and True inside ``torch.cuda.graph`` (with a GPU)."""
    assert groups.capturing() is False
    seen = []

    def traced(x):
        seen.append(groups.capturing())
        return x + 1

    torch.compile(traced, backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen == [False]
    if torch.cuda.is_available():
        x = torch.zeros(2, device="cuda")
        x + 1  # noqa: B018 (warm-up outside the capture)
        graph, inside = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            inside.append(groups.capturing())
            x + 1  # noqa: B018
        assert inside == [True] and groups.capturing() is False
