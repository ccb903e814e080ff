#!/usr/bin/env bash
# The AAAI'22 study in miniature on synthetic Taskonomy, at CPU scale with models that learn: every one-task and
# two-task model over TASKS (uniform weights: the Baseline A), every two-task model trained with Zamir et al.'s
# weights for each of its tasks as the main task (Weighted B), each attacked on every subset of its tasks by PGD,
# APGD and WGD with each image's values kept; the uniform models again with fewer epochs (the early-stopping
# surrogate); then tables with 95 % bootstrap intervals over images and a verdict per claim from paired tests on
# the same images (scripts/summarize_aaai22.py: Table 1 A/B, Table 2, Table 3), the auxiliary-task ranking (RQ4)
# and the report; then the analyses: every model under Vanilla (pgd), Weighted (wgd) and Cyclic (cyclic_step)
# attacks at two budgets (factor boxplots with Wilcoxon tests, strategy differences), model complexity,
# adversarial-example panels, CKA between the two epoch budgets' models and a loss landscape.
# Models: resnet18_cpu (a quarter-width ResNet-18, stride 16) at 64 px on the 'large' scene preset, as in the
# quickstart. The run time of the defaults is in the README; re-running resumes (finished models and cells are
# reused). Scale up with the variables below, e.g. TASKS=sdDnE IMAGES=2000 EPOCHS=30 bash scripts/reproduce_aaai22.sh.
#
#   bash scripts/reproduce_aaai22.sh [OUT]        (default OUT: aaai22-repro)
set -euo pipefail

OUT=${1:-aaai22-repro}
IMAGES=${IMAGES:-480}       # synthetic images of 16 buildings: 12 train / 2 val / 2 test (360 / 60 / 60)
SIZE=${SIZE:-64}            # image side (a multiple of 32)
ENCODER=${ENCODER:-resnet18_cpu}
EPOCHS=${EPOCHS:-8}         # full-cost training (Adam 2e-3, then 5e-4 for the last third)
FEW_EPOCHS=${FEW_EPOCHS:-3} # the early-stopping surrogate
STEPS=${STEPS:-10}          # attack steps (the paper: 25)
TASKS=${TASKS:-sdn}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no OpenMP spin-waiting if the machine is shared
HERE=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$OUT"
if [ ! -f "$OUT/data/train_val_test_synthetic.csv" ]; then
  buildings=$(for b in $(seq 0 15); do printf 'synth%03d ' "$b"; done)
  # shellcheck disable=SC2086
  mtrobust-fast data synth --out "$OUT/data" --images "$IMAGES" --size "$SIZE" --seed 0 --scene large \
    --buildings $buildings
fi

schedule() {  # $1 = epochs: Adam 2e-3, then 5e-4 for the last third
  local decay=$(( (2 * $1 + 1) / 3 ))
  if [ "$decay" -ge "$1" ] || [ "$decay" -lt 1 ]; then echo "0:2e-3"; else echo "0:2e-3,$decay:5e-4"; fi
}

# One sweep settings file per cost level: every one-task model {m} and pair {m, a} of TASKS (and, for the full
# level, each pair weighted for each of its tasks), attacked on every subset of its tasks.
settings() {  # $1 = epochs, $2 = 1 to add the weighted models, $3 = attacks
  local letters=$TASKS i j spec
  spec="encoder: $ENCODER, size: $SIZE, epochs: $1, schedule: '$(schedule "$1")', batch_size: 16, seed: 0"
  echo "data: $OUT/data"
  echo "models:"
  for ((i = 0; i < ${#letters}; i++)); do
    echo "  - {name: ${letters:i:1}, train: {tasks: ${letters:i:1}, $spec}}"
    for ((j = i + 1; j < ${#letters}; j++)); do
      pair=${letters:i:1}${letters:j:1}
      echo "  - {name: $pair, train: {tasks: $pair, $spec}}"
      if [ "$2" = 1 ]; then
        for main in ${letters:i:1} ${letters:j:1}; do
          echo "  - {name: ${pair}_zamir_$main, main: $main, train: {tasks: $pair, weights: zamir, main: $main, $spec}}"
        done
      fi
    done
  done
  cat <<YAML
attacks: [$3]
norms: [linf]
eps: [8/255]
alpha: [2/255]
steps: [$STEPS]
sets: [subsets]
split: val
batch_size: 16
gradients: false
deterministic: true
per_sample: true
YAML
}

settings "$EPOCHS" 1 "pgd, apgd, wgd" > "$OUT/full.yaml"
settings "$FEW_EPOCHS" 0 "pgd" > "$OUT/few_epochs.yaml"
echo "== full-cost models ($(date +%T), ${SECONDS} s so far)"
mtrobust-fast sweep --config "$OUT/full.yaml" --out "$OUT/full" --no-progress
echo "== early-stopping surrogates ($(date +%T), ${SECONDS} s so far)"
mtrobust-fast sweep --config "$OUT/few_epochs.yaml" --out "$OUT/few_epochs" --no-progress
echo "== tables and verdicts ($(date +%T), ${SECONDS} s so far)"
python "$HERE/summarize_aaai22.py" "$OUT" "$TASKS"

mtrobust-fast select --main "$TASKS" --full "$OUT/full/results.parquet" --attack pgd --task-weights uniform \
  --surrogate few_epochs="$OUT/few_epochs/results.parquet" --clean clean_error --out "$OUT/selection"
mtrobust-fast report "$OUT/full/results.parquet" --selection "$OUT/selection" --out "$OUT/report"

# ---- analyses: factor boxplots, strategy differences, complexity, panels, CKA, landscape ----
echo "== analyses ($(date +%T), ${SECONDS} s so far)"
ANALYSIS_LIMIT=${ANALYSIS_LIMIT:-8}     # val images per analysis cell
ANALYSIS_NORMS=${ANALYSIS_NORMS:-linf}  # "linf,l2" adds the norm boxplot (the eps are then L2 radii too)
{
  echo "data: $OUT/data"
  echo "models:"
  for checkpoint in "$OUT"/full/models/*/last.pt "$OUT"/few_epochs/models/*/last.pt; do
    echo "  - $checkpoint"
  done
  echo "attacks: [pgd, wgd, cyclic_step]"
  echo "norms: [$ANALYSIS_NORMS]"
  echo "eps: [4/255, 8/255]"
  echo "steps: [$STEPS]"
  echo "sets: [all]"
  echo "split: val"
  echo "limit: $ANALYSIS_LIMIT"
  echo "batch_size: 16"
  echo "gradients: false"
  echo "deterministic: true"
} > "$OUT/analysis.yaml"
mtrobust-fast sweep --config "$OUT/analysis.yaml" --out "$OUT/analysis" --no-progress
mtrobust-fast report "$OUT/analysis/results.parquet" --out "$OUT/report-analysis"
mtrobust-fast complexity --encoders "$ENCODER,resnet18" --tasks "$TASKS" --size "$SIZE" --out "$OUT/complexity.csv"

# The first pair model of each budget: panels, CKA between the budgets, a loss landscape.
pair=${TASKS:0:2}
checkpoint_of() {  # $1 = sweep folder; prints the last.pt of its uniformly weighted model with tasks $pair
  python - "$1" "$pair" <<'PY'
import sys
from pathlib import Path
from mtrobust_fast.models import read_checkpoint
from mtrobust_fast.task_names import letters
for path in sorted(Path(sys.argv[1]).glob("models/*/last.pt")):
    payload = read_checkpoint(path)
    weights = (payload["meta"].get("train_config") or {}).get("weights", "uniform")
    if weights == "uniform" and "".join(sorted(payload["config"]["tasks"])) == "".join(sorted("".join(letters(sys.argv[2])))):
        print(path)
        break
PY
}
full_pair=$(checkpoint_of "$OUT/full")
few_pair=$(checkpoint_of "$OUT/few_epochs")
mtrobust-fast attack --checkpoint "$full_pair" --data "$OUT/data" --target "${pair:0:1},$pair" --steps "$STEPS" \
  --limit 4 --panels 2 --out "$OUT/panels" --overwrite --no-progress --no-gradients
mtrobust-fast analyze cka --checkpoints "$full_pair,$few_pair" --data "$OUT/data" --limit 48 --out "$OUT/cka" --no-progress
mtrobust-fast analyze landscape --checkpoint "$full_pair" --data "$OUT/data" --limit 8 --points 11 --out "$OUT/landscape" --no-progress
echo "tables and verdicts: $OUT/aaai22_tables.md; report: $OUT/report/summary.md; analyses:"
echo "  $OUT/report-analysis/summary.md, $OUT/complexity.csv, $OUT/panels/panels/, $OUT/cka/, $OUT/landscape/"
echo "reproduce_aaai22: ${SECONDS} s in all"
