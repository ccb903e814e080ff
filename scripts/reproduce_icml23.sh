#!/usr/bin/env bash
# The ICML'23 (GAT) study in miniature on the synthetic object set, limited data, CPU: Madry adversarial training
# (the GAT code's "MADRY": half clean, half adversarial main loss) against GAT with one self-supervised auxiliary
# task each (rotation, jigsaw, autoencoder, HOG, depth), equal weights (EW) vs MGDA, and the curvature regulariser
# on/off (its Houdini surrogate on the outputs; XI=1 adds the exact-gradient one). Every model is then attacked on
# the test split (clean, PGD-10 and APGD-10 accuracy at the training budget, each image's result kept), and the
# script ends with a table (Markdown + CSV) and a figure: every accuracy with its 95 % bootstrap interval over
# test images, each variant against Madry AT by the exact McNemar test on the same images, and a verdict per
# claim. Re-running reuses finished models and evaluations; the run time of the defaults is in the README.
# The models are CPU-scale: resnet18_cpu (a quarter-width ResNet-18, the 32-px stem), 7000 images (1050 test,
# enough to resolve a 3-point difference), 4 epochs of PGD-2 training; the paper's ResNet-18 with
# ENCODER=resnet18. Scale up with the variables below, e.g. IMAGES=20000 EPOCHS=30 bash scripts/reproduce_icml23.sh.
#
#   bash scripts/reproduce_icml23.sh [OUT]        (default OUT: icml23-repro)
set -euo pipefail

OUT=${1:-icml23-repro}
IMAGES=${IMAGES:-7000}      # synthetic object images (70 % train, 15 % val, 15 % test)
SIZE=${SIZE:-32}
ENCODER=${ENCODER:-resnet18_cpu}
EPOCHS=${EPOCHS:-4}
SCHEDULE=${SCHEDULE:-0:2e-3,3:5e-4}
BATCH=${BATCH:-64}
STEPS=${STEPS:-2}           # PGD steps of adversarial training (the paper: 10)
EVAL_STEPS=${EVAL_STEPS:-10}
EPS=${EPS:-8/255}
XI=${XI:-0}                 # 1: also the exact-gradient curvature variant (about 3x the cost of the others)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

mkdir -p "$OUT"
[ -f "$OUT/data/objects.json" ] || mtrobust-fast data synth-objects --out "$OUT/data" --images "$IMAGES" --size "$SIZE"

# name | extra training flags
VARIANTS=(
  "madry|"
  "rotation_ew|--aux rotation --weighting ew"
  "jigsaw_ew|--aux jigsaw --weighting ew"
  "autoencoder_ew|--aux autoencoder --weighting ew"
  "hog_ew|--aux hog --weighting ew"
  "depth_ew|--aux depth --weighting ew"
  "rotation_mgda|--aux rotation --weighting mgda"
  "rotation_mgda_houdini|--aux rotation --weighting mgda --curvature houdini-out"
)
[ "$XI" = 1 ] && VARIANTS+=("rotation_mgda_xi|--aux rotation --weighting mgda --curvature xi")

for variant in "${VARIANTS[@]}"; do
  name=${variant%%|*}
  flags=${variant#*|}
  run="$OUT/runs/$name"
  echo "== $name: $flags ($(date +%T), ${SECONDS} s so far)"
  # shellcheck disable=SC2086
  mtrobust-fast train --data "$OUT/data" --out "$run" --encoder "$ENCODER" --epochs "$EPOCHS" \
    --batch-size "$BATCH" --schedule "$SCHEDULE" --augment flip --adversarial madry_mix --attack-tasks main \
    --eps "$EPS" --steps "$STEPS" --robust-val 0 --workers 0 --seed 0 --save-every 0 --no-progress --resume $flags
  for attack in pgd apgd; do  # both at the training budget (--eps train)
    [ -f "$OUT/eval/$name/$attack/per_sample.csv" ] || mtrobust-fast attack --checkpoint "$run/last.pt" \
      --data "$OUT/data" --split test --attack "$attack" --eps train --steps "$EVAL_STEPS" --target class \
      --no-gradients --no-progress --per-sample --overwrite --out "$OUT/eval/$name/$attack" >/dev/null
  done
done

python "$(dirname "$0")/summarize_icml23.py" "$OUT"
echo "reproduce_icml23: ${SECONDS} s in all"
