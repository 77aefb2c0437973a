#!/usr/bin/env bash
# Issue 15 closing-note measurement (CPU, embedded SmolLM2-135M): demonstration order, label noise and balanced
# demonstrations on cb and rte, k = 8, the first 16 validation examples, the 5 T-Few seeds.
# The base runs (T-Few demonstrations, original order, gold labels) cover every template, so the template and seed
# spreads come from them; the variants run on one template (gpt3_style; TEMPLATES= to change) to fit a shared
# 2-core CPU in an hour. One `harness run` per (stage, task), so what finished survives an interruption (finished
# runs are skipped when the script is started again). Wall time of each command goes to $STORE_DIR/times.tsv.
#   bash benchmarks/icl_variants.sh [STORE_DIR]      (default /tmp/i15measure)
#   harness report --store STORE_DIR/i15.sqlite --out STORE_DIR/report
set -u
STORE_DIR=${1:-/tmp/i15measure}
VARIANT_TEMPLATES=${TEMPLATES:-gpt3_style}
mkdir -p "$STORE_DIR"
PY=${PYTHON:-python}
COMMON=(--methods icl --k 8 --limit 16 --seeds 0,1,32,42,1024 --device cpu --dtype float32
        --store "$STORE_DIR/i15.sqlite" --quiet)
step() {  # name, then the extra options
  local name=$1; shift
  local start=$(date +%s)
  nice -n 10 $PY -m harness.cli run "${COMMON[@]}" "$@" > "$STORE_DIR/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$(( $(date +%s) - start ))" "$rc" "$*" >> "$STORE_DIR/times.tsv"
}
for task in cb rte; do step "base-$task" --tasks "$task" --templates all; done
for task in cb rte; do step "balanced-$task" --tasks "$task" --templates "$VARIANT_TEMPLATES" --demos balanced; done
for task in cb rte; do step "orders-$task" --tasks "$task" --templates "$VARIANT_TEMPLATES" --orders 5; done
for task in cb rte; do
  step "noise-$task" --tasks "$task" --templates "$VARIANT_TEMPLATES" --label-noise 0,0.5,1.0,random
done
