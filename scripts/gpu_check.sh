#!/usr/bin/env bash
# One-shot GPU check (a lent CUDA machine, run from the repository root), in well under 8 minutes:
#   1. build the extension with its CUDA kernels (for this GPU's architecture only, to save time);
#   2. run the CUDA tests: fused-op properties and errors against the oracle on the GPU, every attack run on CPU
#      and on CUDA side by side (test_attacks_cuda.py), and the CPU attack tests next to them;
#   3. run bench_ops.py, bench_attack.py, bench_train.py and bench_eval.py on the GPU (bench_eval's early-exit and
#      fast-screen parts as a step of their own), then bench_speedrun.py (bf16, channels_last) with what is left;
# then print one summary: each step's status and its key lines. Logs go to $OUT (or ./gpu_check_logs).
# The whole run keeps to BUDGET seconds (default 540, under the device tool's 600-s call limit): each step's own
# limit is cut to what is left, and a step that would start with under 20 s left is skipped, so the summary is
# always printed. Nothing here installs from the network: wheels in ./.whl (git-ignored; carried to the device)
# are installed to /tmp/site first. torchattacks is the one package the comparisons need that the device image
# lacks; fetch it here once with
#     echo /.whl/ >> .git/info/exclude
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl torchattacks==3.5.1
# Without it the comparisons with torchattacks are reported as skipped.
#
#     bash scripts/gpu_check.sh   # device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-gpu_check_logs}"
BUDGET="${BUDGET:-540}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
declare -a SUMMARY
PY=$(command -v python3 || command -v python)
WORK=/tmp/gpu_check_work   # bench_eval's data and classifier: large, so kept out of $LOGS (which comes back)
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit (cut to the budget left), keep the log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    SUMMARY+=("$name: SKIPPED (${left}s of the ${BUDGET}s budget left)")
    echo "== $name: skipped, budget spent"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local took=$((SECONDS - start))
  local status=ok
  [ $rc -eq 124 ] && status="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
  SUMMARY+=("$name: $status in ${took}s")
  echo "== $name: $status in ${took}s"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
"$PY" - <<'EOF' | tee "$LOGS/env.txt"
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
missing = [m for m in ("numpy", "PIL", "scipy", "tqdm", "pandas", "pyarrow", "matplotlib", "yaml", "hypothesis",
                       "pytest", "ninja", "torchattacks") if importlib.util.find_spec(m) is None]
print("missing python packages:", ", ".join(missing) or "none")
EOF

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
step build 300 env MTROBUST_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" "$PY" setup.py build_ext --inplace
"$PY" -c "import torch, mtrobust_fast.ops; print('CUDA kernels registered:', torch._C._dispatch_has_kernel_for_dispatch_key('mtrobust_fast::attack_step', 'CUDA'))" \
  | tee -a "$LOGS/build.log"

step cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs python_tests/test_ops_properties.py \
  python_tests/test_ops_errors.py python_tests/test_ops_reference.py python_tests/test_attacks.py \
  python_tests/test_attacks_wgd_apgd.py python_tests/test_attacks_cuda.py python_tests/test_early_exit.py \
  python_tests/test_folding.py
step bench_ops 120 "$PY" scripts/bench_ops.py --device cuda --repeats 20
step bench_attack 150 "$PY" scripts/bench_attack.py --device cuda --size 256 --batch 64 --autocast bf16 --repeats 5 --steps 4
step bench_train 150 "$PY" scripts/bench_train.py --device cuda --batch 256 --autocast bf16 --channels-last --repeats 5
step bench_eval 100 "$PY" scripts/bench_eval.py --device cuda --work "$WORK/bench_eval" --images 128 --classifier-epochs 4 \
  --parts autoattack,dense
step bench_exit 90 "$PY" scripts/bench_eval.py --device cuda --work "$WORK/bench_eval" --images 128 --classifier-epochs 4 \
  --parts early-exit,fast
step speedrun 150 "$PY" scripts/bench_speedrun.py --device cuda --images 3000 --epochs 6 --batch 128 --autocast bf16 \
  --channels-last --val-images 256 --test-images 300 --aa-images 32

echo
echo "================ GPU check summary ================"
cat "$LOGS/gpu.txt" "$LOGS/env.txt"
for line in "${SUMMARY[@]}"; do echo "$line"; done
echo "-- tests:"; tail -n 3 "$LOGS/cuda_tests.log"
echo "-- bench_ops:"; tail -n 14 "$LOGS/bench_ops.log"
echo "-- bench_attack:"; tail -n 14 "$LOGS/bench_attack.log"
echo "-- bench_train:"; tail -n 10 "$LOGS/bench_train.log"
echo "-- bench_eval:"; tail -n 16 "$LOGS/bench_eval.log"
echo "-- bench_exit:"; tail -n 22 "$LOGS/bench_exit.log"
echo "-- speedrun (if the budget allowed):"; tail -n 14 "$LOGS/speedrun.log" 2>/dev/null
