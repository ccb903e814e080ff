#!/usr/bin/env bash
# The AAAI'22 study in miniature on synthetic Taskonomy: train every single-task and two-task model over the
# paper's five tasks (s, d, D, n, E), attack each on every subset of its tasks (single- and multi-task PGD),
# repeat with cheap surrogates (fewer epochs), rank auxiliary tasks (RQ4) and write the report; then the analyses:
# every trained model (both epoch budgets) under Vanilla (pgd), Weighted (wgd) and Cyclic (cyclic_step) attacks at two
# budgets, for the factor boxplots with Wilcoxon tests and the strategy difference heatmaps, plus model complexity,
# adversarial-example panels, CKA between the two epoch budgets' models and a loss landscape.
# On a 2-core CPU shared with other work the defaults took about 50 minutes in all (the analyses' 180-cell sweep
# about 10 of them); re-running resumes (finished models and cells are reused). Scale up with the variables below, e.g. IMAGES=2000 SIZE=128 EPOCHS=30 bash scripts/reproduce_aaai22.sh.
#
#   bash scripts/reproduce_aaai22.sh [OUT]        (default OUT: aaai22-repro)
set -euo pipefail

OUT=${1:-aaai22-repro}
IMAGES=${IMAGES:-240}       # synthetic images (10 buildings: 6 train / 2 val / 2 test)
SIZE=${SIZE:-64}            # image side (a multiple of 32)
EPOCHS=${EPOCHS:-5}         # full-cost training
FEW_EPOCHS=${FEW_EPOCHS:-2} # surrogate training
STEPS=${STEPS:-10}          # PGD steps (the paper: 25)
TASKS=${TASKS:-sdDnE}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # no OpenMP spin-waiting if the machine is shared

mkdir -p "$OUT"
if [ ! -f "$OUT/data/train_val_test_synthetic.csv" ]; then
  buildings=$(for b in $(seq 0 9); do printf 'synth%03d ' "$b"; done)
  # shellcheck disable=SC2086
  mtrobust-fast data synth --out "$OUT/data" --images "$IMAGES" --size "$SIZE" --seed 0 --buildings $buildings
fi

# One sweep settings file per cost level: every single-task model {m} and pair {m, a} of TASKS, attacked on
# every subset of its tasks, so each pair gives both (m, a) and (a, m) cells of Table 1.
settings() {  # $1 = epochs
  local letters=$TASKS i j
  echo "data: $OUT/data"
  echo "models:"
  for ((i = 0; i < ${#letters}; i++)); do
    echo "  - {train: {tasks: ${letters:i:1}, encoder: resnet18, size: $SIZE, epochs: $1, lr: 0.001, batch_size: 16, seed: 0}}"
    for ((j = i + 1; j < ${#letters}; j++)); do
      echo "  - {train: {tasks: ${letters:i:1}${letters:j:1}, encoder: resnet18, size: $SIZE, epochs: $1, lr: 0.001, batch_size: 16, seed: 0}}"
    done
  done
  cat <<EOF
attacks: [pgd]
norms: [linf]
eps: [8/255]
alpha: [2/255]
steps: [$STEPS]
sets: [subsets]
split: val
batch_size: 16
deterministic: true
EOF
}

settings "$EPOCHS" > "$OUT/full.yaml"
settings "$FEW_EPOCHS" > "$OUT/few_epochs.yaml"
mtrobust-fast sweep --config "$OUT/full.yaml" --out "$OUT/full"
mtrobust-fast sweep --config "$OUT/few_epochs.yaml" --out "$OUT/few_epochs"

mtrobust-fast select --main s --candidates dDnE --full "$OUT/full/results.parquet" \
  --surrogate few_epochs="$OUT/few_epochs/results.parquet" --clean clean_error --out "$OUT/selection"
mtrobust-fast report "$OUT/full/results.parquet" --selection "$OUT/selection" --out "$OUT/report"

# ---- analyses: factor boxplots, strategy differences, complexity, panels, CKA, landscape ----
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
mtrobust-fast sweep --config "$OUT/analysis.yaml" --out "$OUT/analysis"
mtrobust-fast report "$OUT/analysis/results.parquet" --out "$OUT/report-analysis"
mtrobust-fast complexity --encoders resnet18,resnet50 --tasks "$TASKS" --size "$SIZE" --out "$OUT/complexity.csv"

# The first pair model of each budget: panels, CKA between the budgets, a loss landscape.
pair=${TASKS:0:2}
checkpoint_of() {  # $1 = sweep folder; prints the last.pt of its model with tasks $pair
  python - "$1" "$pair" <<'PY'
import sys
from pathlib import Path
from mtrobust_fast.models import read_checkpoint
from mtrobust_fast.task_names import letters
for path in sorted(Path(sys.argv[1]).glob("models/*/last.pt")):
    if "".join(sorted(read_checkpoint(path)["config"]["tasks"])) == "".join(sorted("".join(letters(sys.argv[2])))):
        print(path)
        break
PY
}
full_pair=$(checkpoint_of "$OUT/full")
few_pair=$(checkpoint_of "$OUT/few_epochs")
mtrobust-fast attack --checkpoint "$full_pair" --data "$OUT/data" --target "${pair:0:1},$pair" --steps "$STEPS" \
  --limit 4 --panels 2 --out "$OUT/panels" --no-progress --no-gradients
mtrobust-fast analyze cka --checkpoints "$full_pair,$few_pair" --data "$OUT/data" --limit 48 --out "$OUT/cka"
mtrobust-fast analyze landscape --checkpoint "$full_pair" --data "$OUT/data" --limit 8 --points 11 --out "$OUT/landscape"
echo "report: $OUT/report/summary.md; analyses: $OUT/report-analysis/summary.md, $OUT/complexity.csv,"
echo "  $OUT/panels/panels/, $OUT/cka/, $OUT/landscape/"
