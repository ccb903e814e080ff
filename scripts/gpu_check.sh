#!/usr/bin/env bash
# One-shot GPU check (a lent CUDA machine, run from the repository root), in well under 8 minutes:
#   1. build the extension with its CUDA kernels (for this GPU's architecture only, to save time);
#   2. run the CUDA tests (fused-op properties and errors against the oracle, on the GPU) and the attack and
#      adversarial-training tests (which then also exercise the CUDA op through the attacks);
#   3. run bench_ops.py, bench_attack.py, bench_train.py and bench_eval.py on the GPU;
# then print one summary: each step's status and its key lines. Logs go to $OUT (or ./gpu_check_logs).
# Nothing here installs from the network: missing Python packages are reported, and the steps that need
# them are marked as skipped.
#
#     bash scripts/gpu_check.sh            # device tool: run(command="bash scripts/gpu_check.sh", timeout_s=560)
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS="${OUT:-gpu_check_logs}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
declare -a SUMMARY

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, record the status
  local name=$1 limit=$2
  shift 2
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
python - <<'EOF' | tee "$LOGS/env.txt"
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
missing = [m for m in ("numpy", "PIL", "scipy", "tqdm", "pandas", "pyarrow", "matplotlib", "yaml", "hypothesis",
                       "pytest", "ninja") if importlib.util.find_spec(m) is None]
print("missing python packages:", ", ".join(missing) or "none")
EOF

ARCH=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
step build 300 env MTROBUST_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" python setup.py build_ext --inplace
python -c "import torch, mtrobust_fast.ops; print('CUDA kernels registered:', torch._C._dispatch_has_kernel_for_dispatch_key('mtrobust_fast::attack_step', 'CUDA'))" \
  | tee -a "$LOGS/build.log"

step cuda_tests 240 python -m pytest -q -p no:cacheprovider -rs python_tests/test_ops_properties.py \
  python_tests/test_ops_errors.py python_tests/test_ops_reference.py python_tests/test_attacks.py \
  python_tests/test_attacks_wgd_apgd.py
step bench_ops 120 python scripts/bench_ops.py --device cuda --repeats 20
step bench_attack 150 python scripts/bench_attack.py --device cuda --size 256 --batch 64 --autocast bf16 --repeats 5 --steps 4
step bench_train 150 python scripts/bench_train.py --device cuda --batch 256 --autocast bf16 --channels-last --repeats 5
step bench_eval 100 python scripts/bench_eval.py --device cuda --work "$LOGS/bench_eval" --images 128 --classifier-epochs 4

echo
echo "================ GPU check summary ================"
cat "$LOGS/gpu.txt" "$LOGS/env.txt"
for line in "${SUMMARY[@]}"; do echo "$line"; done
echo "-- tests:"; tail -n 3 "$LOGS/cuda_tests.log"
echo "-- bench_ops:"; tail -n 14 "$LOGS/bench_ops.log"
echo "-- bench_attack:"; tail -n 14 "$LOGS/bench_attack.log"
echo "-- bench_train:"; tail -n 10 "$LOGS/bench_train.log"
echo "-- bench_eval:"; tail -n 16 "$LOGS/bench_eval.log"
