#!/usr/bin/env bash
# The first run of fastequiv on a GPU machine, in one go (at most 8 minutes: every step has a limit).
#
#   benchmarks/gpu_check.sh OUT_DIR [--dry-run]
#
# Needs a Python that already has torch (CUDA build), triton, cupy, e3nn, nanobind,
# scikit-build-core, cmake and pytest-benchmark; no network (nothing is downloaded:
# pip runs with --no-index --no-build-isolation --no-deps). Set PYTHON to pick one.
# Steps, each with its own time limit, each logged to OUT_DIR/<step>.log:
#
#   versions   python, torch, triton, cupy, e3nn, nvcc, the GPU and its driver (nvidia-smi)
#   build      fastequiv for the GPU's architecture (sm_90 on an H100/H200) with
#              FASTEQUIV_CUDA=ON when nvcc is there (else the CPU build: the CuPy backend
#              still runs the .cu kernels through NVRTC), editable, into this Python
#   check      fastequiv check --device cuda (every GPU backend against the reference;
#              the table in check.log, the report in check.json)
#   tests      pytest on the GPU: the tests marked gpu, and the files that run on CUDA
#              tensors when there is a GPU (tests/test_gpu_readiness.py and the per-op files,
#              the weighted reductions of rotation designs among them)
#   sanitizer  compute-sanitizer memcheck of one small call of every GPU kernel (skipped
#              when compute-sanitizer is not installed)
#   past_2^31  one row op and one voxel reduction whose flat index passes 2^31 elements,
#              checked against torch on slices and chunked sums
#   bench      fastequiv bench (quick) of the ops with GPU targets on the GPU:
#              OUT_DIR/bench/{results.json,ops.png,...}
#
# The last lines printed are a table: step, result (ok / FAIL / TIMEOUT / skipped), seconds,
# and a detail (the check summary, the pytest tally, ...). The exit status is 1 when a step
# failed or timed out. The limits add up to 8 minutes; TIME_SCALE=2 doubles each of them.
#
# --dry-run runs the same steps end to end on a machine without a GPU: the CPU build (as a
# wheel into OUT_DIR, this Python's install untouched), fastequiv check on the CPU with
# Triton's interpreter, the GPU tests (they skip), the sanitizer script and the 2^31 case
# at tiny sizes without the sanitizer, and fastequiv bench --smoke.
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--dry-run]" >&2; exit 2; }
OUT="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    -*) usage ;;
    *) [ -z "$OUT" ] && OUT="$arg" || usage ;;
  esac
done
[ -n "$OUT" ] || usage

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
SCALE=${TIME_SCALE:-$([ "$DRY" = 1 ] && echo 3 || echo 1)}  # a 2-core CPU is slower at all of it
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi

STEPS=() RESULTS=() TIMES=() DETAILS=()
FAILED=0
START=$(date +%s)

# step NAME LIMIT_SECONDS COMMAND...: run COMMAND (a bash string) with a time limit,
# its output to OUT/NAME.log; the detail of the table is the log's last line starting with
# "detail:" (or its last line).
step() {
  local name=$1 limit=$(( $2 * SCALE )) cmd=$3 log="$OUT/$1.log" t0 rc result detail
  printf '[gpu_check] %-10s (limit %ss) ... ' "$name" "$limit"
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  case $rc in
    0) result=ok ;;
    124|137) result=TIMEOUT; FAILED=1 ;;
    77) result=skipped ;;
    *) result=FAIL; FAILED=1 ;;
  esac
  detail=$(grep -E '^detail: ' "$log" | tail -n 1 | sed 's/^detail: //')
  [ -n "$detail" ] || detail=$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-110)
  [ "$result" = ok ] || [ "$result" = skipped ] || detail="exit $rc: $detail"
  STEPS+=("$name") RESULTS+=("$result") TIMES+=("$(( $(date +%s) - t0 ))") DETAILS+=("$detail")
  echo "$result ($(( $(date +%s) - t0 )) s)"
}

# --- versions ----------------------------------------------------------------------------
step versions 15 "
  echo 'mode: $([ "$DRY" = 1 ] && echo 'dry run (no GPU steps)' || echo GPU)'
  $PY - <<'EOF'
import importlib.metadata as md, platform, torch
dists = md.packages_distributions()
print('python', platform.python_version(), platform.machine())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu:', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ('triton', 'cupy', 'e3nn', 'nanobind', 'scikit_build_core', 'cmake', 'pytest_benchmark', 'numpy'):
    found = dists.get(name) or dists.get(name.replace('_', '-')) or []
    print(name, md.version(found[0]) if found else 'missing')
EOF
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo 'nvcc: not on PATH'
  command -v compute-sanitizer >/dev/null && echo \"compute-sanitizer: \$(command -v compute-sanitizer)\" || echo 'compute-sanitizer: not on PATH'
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader | sed 's/^/detail: /'
  else
    echo 'detail: no nvidia-smi: no GPU driver on this machine'
  fi
"
cat "$OUT/versions.log"

# --- build -------------------------------------------------------------------------------
ARCH=90
if command -v nvidia-smi >/dev/null; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  [[ "$cap" =~ ^[0-9]+$ ]] && ARCH=$cap
fi
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)
if [ "$DRY" = 1 ]; then
  # the CPU build as a wheel into OUT: the same command line, this Python's install untouched
  BUILD="FASTEQUIV_CUDA=OFF $PY -m pip wheel --no-index --no-build-isolation --no-deps -w '$OUT/wheel' . \
         && echo 'detail: CPU wheel built (dry run; not installed)'"
elif [ -n "$NVCC" ]; then
  BUILD="export PATH=\"$(dirname "$NVCC"):\$PATH\" FASTEQUIV_CUDA=ON CMAKE_ARGS='-DCMAKE_CUDA_ARCHITECTURES=$ARCH' \
         && $PY -m pip install --no-index --no-build-isolation --no-deps -e . -Cbuild-dir=build/gpu-sm$ARCH \
         && $PY -m fastequiv info && echo 'detail: built with CUDA for sm_$ARCH'"
  export FASTEQUIV_EXPECT_CUDA=1
else
  BUILD="FASTEQUIV_CUDA=OFF $PY -m pip install --no-index --no-build-isolation --no-deps -e . -Cbuild-dir=build/gpu-cpu \
         && $PY -m fastequiv info && echo 'detail: no nvcc: built without CUDA (cuda backend absent; cupy runs the .cu)'"
fi
step build 120 "$BUILD"

# --- fastequiv check ---------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  CHECK_ARGS="--device cpu --skip opcheck,compile"
else
  CHECK_ARGS="--device cuda"
fi
step check 120 "
  $PY -m fastequiv check $CHECK_ARGS --seed 20261129 --json > '$OUT/check.json'; rc=\$?
  $PY - '$OUT/check.json' <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f\"{'check':<17} {'backend':<7} {'device':<7} {'cases':>5}  {'max rel err':>11}  {'tolerance':>9}  result\")
fmt = lambda v: v if isinstance(v, str) else (f'{v:.1e}' if v else '0')
for x in r['results']:
    print(f\"{x['check']:<17} {x['backend']:<7} {x['device']:<7} {x['cases']:>5}  {fmt(x['max_rel_err']):>11}  {fmt(x['tolerance']):>9}  {x['result']} {x['note']}\")
s = r['summary']
print(f\"detail: {s['passed']}/{s['checks']} PASS ({', '.join(s['backends'])}) in {s['seconds']:.0f} s\")
EOF
  exit \$rc
"

# --- tests on the GPU --------------------------------------------------------------------
# the files whose cases run on CUDA tensors when there is a GPU (Triton's included, which
# is not marked gpu: it also runs in the interpreter), then every other test marked gpu
DEVICE_TESTS="" IGNORE=""
for f in tests/test_gpu.py tests/test_gpu_readiness.py tests/test_rotate_copies.py tests/test_twirl_reduce.py \
         tests/test_twirl_reduce_weights.py tests/test_random_rotations.py tests/test_wigner_d.py tests/test_voxels.py tests/test_backends.py; do
  [ -f "$f" ] && DEVICE_TESTS="$DEVICE_TESTS $f" && IGNORE="$IGNORE --ignore=$f"
done
if [ "$DRY" = 1 ]; then
  # the GPU-marked tests skip here; a quick slice of the readiness file shows pytest runs
  TESTS="$PY -m pytest -q -p no:cacheprovider -m gpu tests/ ; a=\$?; [ \$a -eq 5 ] && a=0
         $PY -m pytest -q -p no:cacheprovider tests/test_gpu_readiness.py -k 'flat_index or philox or bounded'; b=\$?
         echo \"detail: pytest -m gpu exit \$a (all skip: no GPU), readiness slice exit \$b\"; exit \$(( a || b ))"
else
  TESTS="$PY -m pytest -q -p no:cacheprovider --maxfail=20 $DEVICE_TESTS; a=\$?
         $PY -m pytest -q -p no:cacheprovider --maxfail=20 -m gpu tests/ $IGNORE; b=\$?; [ \$b -eq 5 ] && b=0
         echo \"detail: \$(grep -E '^[0-9]+ (passed|failed)|, [0-9]+ (passed|failed)' '$OUT/tests.log' | tr '\\n' ' ')(exit \$a, \$b)\"
         exit \$(( a || b ))"
fi
step tests 90 "$TESTS"

# --- compute-sanitizer memcheck of one small call of every GPU kernel --------------------
cat >"$OUT/sanitizer_case.py" <<'EOF'
"""One small call of every kernel on the GPU backends (the sanitizer looks for out-of-bounds
and misaligned accesses; PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every tensor its own
allocation, so an overrun is not hidden inside a cached block)."""
import os
import torch
import fastequiv as fe
from fastequiv.backends import registry

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
backends = [b for b in ("triton", "cuda", "cupy", "cpu") if b in registry.runnable("reduce_rows", device)]
g = torch.Generator().manual_seed(0)
ran = []
for b in backends:
    for d in (3, 40):  # 40: more than one column chunk in the Triton kernels
        K, B, P = 2, 3, 5
        N = B * P
        M = torch.randn(K, B, d, d, generator=g).to(device)
        x = torch.randn(N, d, generator=g).to(device)
        sample = torch.randint(0, B, (N,), generator=g).to(device)
        for smp, p in ((None, P), (sample, 0)):
            out = registry.implementation("rotate_rows", b)(x, M, smp, p, None)
            registry.implementation("rotate_rows_backward", b)(out, M, smp, p)
            mean, sums = registry.implementation("reduce_rows", b)(out, M, x, smp, p, None, None, B)
            registry.implementation("reduce_rows_backward", b)(mean, sums, out, M, x, smp, p, None, None, mean)
    seed = torch.full((), 7, dtype=torch.int64, device=device)
    R = registry.implementation("random_rotations_seeded", b)(seed, 33, 2**32 - 3, True, torch.float32)
    registry.implementation("wigner_blocks", b)(R * torch.linalg.det(R)[:, None, None], 4)
    ran.append(b)
for b in ("triton",):
    if b in registry.runnable("voxels_reduce", device):
        R = fe.group_elements("octahedral", dtype=torch.float32)[:4].to(device)
        grids = torch.randn(2, 5, 6, 6, 6, generator=g).to(device)
        vec = torch.tensor([1], dtype=torch.int32, device=device)
        out = registry.implementation("voxels_resample", b)(grids, R, vec, False)
        registry.implementation("voxels_reduce", b)(out.reshape(2, 2, 5, 6, 6, 6), R.reshape(2, 2, 3, 3), grids,
                                                    None, vec, True)
        ran.append(b + " voxels")
if device.type == "cuda":
    torch.cuda.synchronize()
print("detail: ran", ", ".join(ran), "on", device)
EOF
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ "$DRY" = 1 ]; then
  step sanitizer 45 "$PY '$OUT/sanitizer_case.py' && echo 'detail: dry run: the case without the sanitizer (no GPU)'"
elif [ -n "$SAN" ]; then
  step sanitizer 45 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SAN' --tool memcheck --error-exitcode 1 --print-limit 20 \
       --target-processes all $PY '$OUT/sanitizer_case.py' && echo \"detail: memcheck clean; \$(grep -E '^detail: ' '$OUT/sanitizer.log' | sed 's/^detail: //')\""
else
  step sanitizer 10 "echo 'detail: compute-sanitizer not installed'; exit 77"
fi

# --- one case past 2^31 elements ---------------------------------------------------------
cat >"$OUT/past_2_31.py" <<'EOF'
"""Row and voxel kernels whose flat index passes 2^31 (int32 would wrap), on the GPU
backends, checked against torch on slices and chunked sums. Argument: 'full' (about 40 GB
of GPU memory) or 'tiny' (the same code at toy sizes, for the dry run)."""
import sys
import time
import torch
from fastequiv import grid
from fastequiv.backends import registry
from fastequiv.ops.rotate_copies import rotate_rows_reference

full = sys.argv[1] == "full"
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
lines = []

# rotate_rows: K * N * d = 3 * 2.5e8 * 3 > 2^31 output elements (bfloat16: 4.5 GB)
K, B, d = 3, 4, 3
N = 250_000_000 if full else 4_000
P = N // B
x = torch.randn(N, d, device=device, dtype=torch.bfloat16)
M = torch.linalg.qr(torch.randn(K, B, d, d, device=device))[0].contiguous()
for b in ("triton", "cuda", "cupy", "cpu"):
    if b not in registry.runnable("rotate_rows", device):
        continue
    t = time.perf_counter()
    out = registry.implementation("rotate_rows", b)(x, M, None, P, None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter() - t
    # rows of the last sample; in the last copy their elements sit past 2^31 (full size)
    tail = slice(N - min(P // 2, 4096), N)
    want = rotate_rows_reference(x[tail].contiguous(), M[:, -1:].contiguous(), None, 10**9, None)
    # relative to the largest value: bfloat16 rounding is 2^-9 of each value
    err = ((out[:, tail].float() - want.float()).abs().max() / want.float().abs().max()).item()
    ok = err < 1e-2
    lines.append(f"rotate_rows {b}: {K * N * d / 2**31:.2f} x 2^31 elements, {t:.2f} s, tail rel err {err:.1e}"
                 f" {'ok' if ok else 'WRONG'}")
    assert ok, lines[-1]
    del out
del x

# voxels twirl_reduce: B * n^3 = 2 * 1024^3 = 2^31 exactly (an int32 product is 0)
if "triton" in registry.runnable("voxels_reduce", device):
    Bv, n = (2, 1024) if full else (2, 8)
    V = n ** 3
    out = torch.randn(2, Bv, 1, n, n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(Bv, 1, n, n, n, device=device, dtype=torch.bfloat16)
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], device=device))
    Mv = torch.stack([torch.eye(3, device=device).expand(Bv, 3, 3), flip.expand(Bv, 3, 3)]).contiguous()
    vec = torch.zeros(0, dtype=torch.int32, device=device)
    t = time.perf_counter()
    mean, sums = registry.implementation("voxels_reduce", "triton")(out, Mv, y, None, vec, True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter() - t
    b = Bv - 1  # the last sample: every flat index past (B - 1) n^3
    got_mean = mean[b, 0].reshape(n, n, n)
    err_mean, want_total, c = 0.0, 0.0, max(1, n // 8)
    for i in range(0, n, c):  # in slabs of x: the whole sample in float32 would take 13 GB more
        a0 = out[0, b, 0, i:i + c].float()
        a1 = out[1, b, 0, n - i - c:n - i].float().flip(0, 1)  # diag(-1, -1, 1): x and y reversed
        yb = y[b, 0, i:i + c].float()
        err_mean = max(err_mean, (got_mean[i:i + c] - (a0 + a1) / 2).abs().max().item())
        want_total += (((a0 - yb) ** 2).sum(dtype=torch.float64) + ((a1 - yb) ** 2).sum(dtype=torch.float64)).item() / 2
    err_total = abs(sums[0, b].item() - want_total) / want_total
    ok = err_mean < 1e-5 and err_total < 1e-4
    lines.append(f"voxels_reduce triton: B n^3 = {Bv * V / 2**31:.2f} x 2^31, {t:.2f} s, mean err {err_mean:.1e}, "
                 f"total rel err {err_total:.1e} {'ok' if ok else 'WRONG'}")
    assert ok, lines[-1]
print("\n".join(lines))
print("detail:", "; ".join(line.split(":")[0] + (" ok" if line.endswith("ok") else " WRONG") for line in lines),
      "past 2^31" if full else "(tiny sizes)")
EOF
if [ "$DRY" = 1 ]; then
  step past_2^31 30 "$PY '$OUT/past_2_31.py' tiny"
else
  step past_2^31 30 "$PY '$OUT/past_2_31.py' full"
fi

# --- fastequiv bench (quick) on the GPU --------------------------------------------------
# the ops with GPU targets (HBM bandwidth, x e3nn); the training-step overheads take
# minutes of their own: run `fastequiv bench --device cuda` for them
BENCH_OPS=rotate_copies,twirl_reduce,wigner_D,random_rotations
if [ "$DRY" = 1 ]; then
  BENCH="$PY -m fastequiv bench --smoke --ops $BENCH_OPS --device cpu --quiet --out '$OUT/bench'"
else
  BENCH="$PY -m fastequiv bench --ops $BENCH_OPS --device cuda --quiet --out '$OUT/bench'"
fi
step bench 60 "$BENCH && test -s '$OUT/bench/results.json' && $PY - '$OUT/bench/results.json' <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))['machine']
print('detail: results.json on', m.get('gpu') or m.get('cpu') or m['device'], '(' + m['device'] + ')')
EOF"

# --- the table ---------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
{
  echo
  echo "gpu_check $([ "$DRY" = 1 ] && echo '(dry run) ')summary, $TOTAL s, logs in $OUT"
  printf '%-10s %-8s %6s  %s\n' step result seconds detail
  for i in "${!STEPS[@]}"; do
    printf '%-10s %-8s %6s  %s\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}" "${DETAILS[$i]}"
  done
} | tee "$OUT/summary.txt"
exit "$FAILED"
