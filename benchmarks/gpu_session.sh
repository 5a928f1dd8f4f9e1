#!/usr/bin/env bash
# The whole GPU visit in one device call: versions, an offline install, `fastvq check`, the test
# suite on CUDA, the bench grid and the VQ-VAE training run, each under `timeout` within one overall
# budget (a hang cannot eat the visit) and each run even when the one before failed.
# RESULTS_DIR gets one log per step and summary.txt: versions, then each step's exit code
# (124: stopped at its time limit). Exit status: 0 when every step exited 0.
#   --wheels DIR  (or FASTVQ_WHEELS; default the repository's .whl) wheels installed offline first,
#                 when DIR has any: vector-quantize-pytorch and its deps einx, torch-einops-utils,
#                 frozendict, loguru (the device has no network; see docs/check.md).
#   --dry-run     (or FASTVQ_GPU_DRY_RUN=1) print the steps, run and write nothing.
#   FASTVQ_GPU_BUDGET  seconds for all steps together (default 540: a device call allows 600).
set -u
usage() { echo "usage: benchmarks/gpu_session.sh [--dry-run] [--wheels DIR] RESULTS_DIR" >&2; exit 2; }
dry=${FASTVQ_GPU_DRY_RUN:-0} wheels=${FASTVQ_WHEELS:-} budget=${FASTVQ_GPU_BUDGET:-540} out=
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1 ;;
    --wheels) [ $# -ge 2 ] || usage; wheels=$2; shift ;;
    -*) usage ;;
    *) [ -z "$out" ] || usage; out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || usage
case $out in /*) ;; *) out=$PWD/$out ;; esac  # relative to the caller, not to the repository root
case $wheels in /* | '') ;; *) wheels=$PWD/$wheels ;; esac
cd "$(dirname "$0")/.." || exit 2  # the repository root
wheels=${wheels:-$PWD/.whl}
py=${PYTHON:-python3} failed=0 stamp=$(date +%Y-%m-%d)
[ "$dry" = 1 ] || mkdir -p "$out" || exit 2

step() {  # step NAME SECONDS CMD...: run CMD under timeout into NAME.log, record its exit code
  local name=$1 limit=$2 left=$((budget - SECONDS)) rc start=$SECONDS
  shift 2
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$dry" = 1 ]; then echo "[dry-run] $name (${limit}s): $*"; return 0; fi
  if [ "$limit" -lt 10 ]; then rc=skipped; else
    echo "== $name (${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    tail -n 3 "$out/$name.log"
  fi
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  [ "$rc" = 0 ] || failed=1
}

if [ "$dry" != 1 ]; then
  { echo "fastvq GPU session $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$py" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available())' 2>&1
  } | tee "$out/summary.txt"
fi
if compgen -G "$wheels/*.whl" >/dev/null; then
  step wheels 60 "$py" -m pip install -q --no-index --find-links "$wheels" "$wheels"/*.whl
else
  echo "no wheels in $wheels: vector-quantize-pytorch is benchmarked only if already installed"
fi
step install 60 "$py" -m pip install -q --no-deps --no-build-isolation -e .
step check 150 "$py" -m fastvq check --json "$out/check.json"
step tests 120 "$py" -m pytest -q --benchmark-disable -p no:cacheprovider --durations=15
for op in search forward train_step ema_update vqvae_step; do  # one run per op: a timeout loses one op
  step "bench-$op" 40 "$py" -m fastvq bench --device cuda --ops "$op" --shapes A B C --dtypes fp32 bf16 \
    --max-gib 32 --out "$out" --tag "gpu-$op-$stamp"
done
step train 120 "$py" -m fastvq train vqvae --device cuda --no-progress --out "$out/vqvae-run" \
  --quantizer-kwargs '{"backend": "triton"}'
[ "$dry" = 1 ] && exit 0
cat "$out/check.log" 2>/dev/null
echo "== summary ($out/summary.txt)"
cat "$out/summary.txt"
exit "$failed"
