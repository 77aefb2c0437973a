#!/usr/bin/env bash
# Issue 15 closing-note measurement (CPU, embedded SmolLM2-135M): demonstration order, label noise and balanced
# demonstrations on cb and rte, k = 8, the first LIMIT (default 8) validation examples, the 5 T-Few seeds.
# Sized for a shared 2-core CPU in about an hour:
#   base      T-Few demonstrations, original order, gold labels: template gpt3_style x 5 seeds (the seed spread)
#             and every template x seeds 0 and 1 (the template spread);
#   orders    --orders 5 on gpt3_style x 5 seeds (the order spread);
#   noise     --label-noise 0,0.5,1.0,random on gpt3_style x 5 seeds;
#   balanced  --demos balanced on gpt3_style x 5 seeds.
# One `harness run` per (stage, task), so what finished survives an interruption (finished runs are skipped when
# the script is started again). Wall time of each command goes to $STORE_DIR/times.tsv.
#   bash benchmarks/icl_variants.sh [STORE_DIR]      (default /tmp/i15measure)
#   harness report --store STORE_DIR/i15.sqlite --out STORE_DIR/report
set -u
STORE_DIR=${1:-/tmp/i15measure}
LIMIT=${LIMIT:-8}
mkdir -p "$STORE_DIR"
PY=${PYTHON:-python}
COMMON=(--methods icl --k 8 --limit "$LIMIT" --device cpu --dtype float32 --store "$STORE_DIR/i15.sqlite" --quiet)
ONE=(--templates gpt3_style --seeds 0,1,32,42,1024)
step() {  # name, then the extra options
  local name=$1; shift
  local start=$(date +%s)
  nice -n 10 $PY -m harness.cli run "${COMMON[@]}" "$@" > "$STORE_DIR/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$(( $(date +%s) - start ))" "$rc" "$*" >> "$STORE_DIR/times.tsv"
}
for task in cb rte; do
  step "base-$task" --tasks "$task" "${ONE[@]}"
  step "base-templates-$task" --tasks "$task" --templates all --seeds 0,1
done
for task in cb rte; do step "orders-$task" --tasks "$task" "${ONE[@]}" --orders 5; done
for task in cb rte; do step "noise-$task" --tasks "$task" "${ONE[@]}" --label-noise 0,0.5,1.0,random; done
for task in cb rte; do step "balanced-$task" --tasks "$task" "${ONE[@]}" --demos balanced; done
