#!/usr/bin/env bash
# Run the benchmarks on a lent GPU machine (see docs/benchmarks.md): bash benchmarks/run_device.sh STAGE...
# Stages: setup (wheels, versions), checks, icl, train, compiled, identity, loopprof, paper. Expects .whl/ (transformers, peft wheels) and
# .benchdata/ (data/rte, cache/tokenizers/smollm2-135m) carried beside the checkout, and $OUT for results.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export HARNESS_CACHE_DIR=$PWD/.benchdata/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
DATA=$PWD/.benchdata/data
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    setup)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
      python3 -c "import torch, transformers, peft, tokenizers; print(torch.__version__, torch.version.cuda, \
transformers.__version__, peft.__version__, tokenizers.__version__)" ;;
    checks) timeout 60 python3 -m benchmarks.gpu_checks --out "$OUT/checks.json" 2>&1 | grep -v Warn | tail -15 ;;
    icl) timeout 300 python3 -m benchmarks.icl_throughput --device cuda --data-dir "$DATA" --ablations --profile \
           --identity 24 --out "$OUT/icl.json" > "$OUT/icl.log" 2>&1; echo "rc $?"; grep -v -i warn "$OUT/icl.log" | tail -60 ;;
    train) timeout 210 python3 -m benchmarks.train_throughput --device cuda --data-dir "$DATA" --profile \
           --out "$OUT/train.json" > "$OUT/train.log" 2>&1; echo "rc $?"; grep -v -i warn "$OUT/train.log" | tail -30 ;;
    compiled) timeout 180 python3 -m benchmarks.train_throughput --device cuda --data-dir "$DATA" --models llama-1b \
           --methods lora,full --kinds compiled --out "$OUT/train_compiled.json" > "$OUT/train_compiled.log" 2>&1
           echo "rc $?"; grep -v -i warn "$OUT/train_compiled.log" | tail -8 ;;
    identity) timeout 80 python3 -m benchmarks.icl_throughput --device cuda --data-dir "$DATA" --models llama-1b \
           --ks 32 --identity 24 --identity-only --out "$OUT/identity.json" 2>&1 | grep "^# identity" ;;
    loopprof) timeout 90 python3 -m benchmarks.train_throughput --device cuda --data-dir "$DATA" \
           --models smollm2-135m --methods lora,ia3 --kinds harness --harness-steps 10 --profile \
           --out "$OUT/loop_profile.json" 2>&1 | grep "^# " ;;
    paper) rm -rf /tmp/paper; mkdir -p /tmp/paper  # adapters land beside the store: keep them out of $OUT
           python3 -m benchmarks.paper_run --device cuda --data-dir "$DATA" --store /tmp/paper/paper.sqlite \
             --timeout "${PAPER_TIMEOUT:-560}" --extra "${PAPER_EXTRA:-}" --out "$OUT/paper.json" 2>&1 | grep -v -i warn | tail -20
           cp /tmp/paper/paper.sqlite "$OUT/" ;;
  esac
done
