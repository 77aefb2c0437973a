#!/usr/bin/env bash
# Run the benchmarks on a lent GPU machine (see docs/benchmarks.md): bash benchmarks/run_device.sh STAGE...
# Stages: setup (wheels, versions), checks, icl, train, compiled, identity, loopprof, paper, paperpack, packprof,
# graphsprobe, capturedprobe, nanprobe, mfu, loop, t5.
# Expects .whl/ (transformers, peft wheels) and .benchdata/ (data/rte, cache/tokenizers/smollm2-135m, and for t5
# cache/tokenizers/smollm2-135m-32128) carried beside the checkout, and $OUT for results.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export HARNESS_CACHE_DIR=$PWD/.benchdata/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
DATA=$PWD/.benchdata/data
# after a command that wrote $OUT/NAME.log: its exit status, then the log's last lines (default 6) without warnings
show() { echo "rc $? ($1)"; grep -v -i warn "$OUT/$1.log" | grep -v 'it/s' | tail -"${2:-6}" | cut -c1-300; }
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
    nanprobe) timeout 150 python3 -m benchmarks.nan_probe --data-dir "$DATA" --steps "${PROBE_STEPS:-70}" \
           --out "$OUT/nan_probe.json" 2>&1 | grep -v -i warn | tail -12 ;;
    compileprobe) TORCH_LOGS=recompiles timeout "${CPROBE_TIMEOUT:-200}" python3 -m benchmarks.nan_probe --data-dir "$DATA" \
           --cells "${CPROBE_CELLS:-lora:0,ia3:0}" --paddings right --compile "${CPROBE_COMPILE:-on}" --steps 30 \
           --out "$OUT/compile_probe.json" > "$OUT/compile_probe.log" 2>&1; echo "rc $?"
           grep -v -i warn "$OUT/compile_probe.log" | tail -25 ;;
    mfu) timeout "${MFU_TIMEOUT:-270}" python3 -m benchmarks.train_throughput --device cuda --data-dir "$DATA" \
           --models llama-1b --methods "${MFU_METHODS:-lora,full}" --kinds "${MFU_KINDS:-synthetic,compiled}" \
           --out "$OUT/train_mfu${MFU_TAG:-}.json" > "$OUT/train_mfu${MFU_TAG:-}.log" 2>&1; echo "rc $?"
           grep -v -i warn "$OUT/train_mfu${MFU_TAG:-}.log" | grep -E "^#|^\|" | tail -12 ;;
    loop) TORCH_LOGS=recompiles timeout "${LOOP_TIMEOUT:-240}" python3 -m benchmarks.train_throughput --device cuda --data-dir "$DATA" \
           --models smollm2-135m --methods lora,ia3 --kinds "${LOOP_KINDS:-harness,harness_eager}" \
           --harness-steps 40 --out "$OUT/train_loop.json" > "$OUT/train_loop.log" 2>&1; echo "rc $?"
           grep -v -i warn "$OUT/train_loop.log" | grep -E "^#|^\||ecompil" | tail -20 ;;
    t5) # issue 17: random:t0-3b (T-Few's backbone) beside random:llama-1b, rte scoring at k = 0 and 32 (cached =
        # encoder once per query, naive, the lm-eval seq2seq loop), then the T-Few step of t0-3b (synthetic batch
        # 8 x 256 encoder / 32 decoder tokens; the harness's own loop on rte, compiled blocks and eager)
        timeout "${T5_ICL_TIMEOUT:-300}" python3 -m benchmarks.icl_throughput --device cuda --data-dir "$DATA" \
           --models llama-1b,t0-3b --ks 0,32 --identity 24 --out "$OUT/icl_t5.json" > "$OUT/icl_t5.log" 2>&1
        echo "rc $?"; grep -v -i warn "$OUT/icl_t5.log" | grep -E "^#|^\|" | tail -24
        timeout "${T5_TRAIN_TIMEOUT:-240}" python3 -m benchmarks.train_throughput --device cuda --data-dir "$DATA" \
           --models t0-3b --methods tfew,lora --kinds synthetic,harness,harness_eager --harness-steps 20 \
           --out "$OUT/train_t5.json" > "$OUT/train_t5.log" 2>&1
        echo "rc $?"; grep -v -i warn "$OUT/train_t5.log" | grep -E "^#|^\||ecompil" | tail -12 ;;
    paper) rm -rf /tmp/paper; mkdir -p /tmp/paper  # adapters land beside the store: keep them out of $OUT
           python3 -m benchmarks.paper_run --device cuda --data-dir "$DATA" --store /tmp/paper/paper.sqlite \
             --timeout "${PAPER_TIMEOUT:-560}" --extra "${PAPER_EXTRA:-}" --out "$OUT/paper.json" 2>&1 | grep -v -i warn | tail -20
           cp /tmp/paper/paper.sqlite "$OUT/" ;;
    packprof) # issue 16: where a packed step's time goes on the GPU (random:smollm2-135m, rte, batch 8), each run at
        # most PACKPROF_TIMEOUT (default 100) s (the compiled packs PACKPROF_COMPILED_TIMEOUT, 200), each run's log
        # kept under $OUT (a crash shows its stack: PYTHONFAULTHANDLER): eager, 1 and 5 separate trainings against
        # packs of 1 and 5, lora and ia3 (PACKPROF_EAGER=0 skips them); lora packs of 5 and 10 under compiled blocks
        # (--compile on, packs only); with PACKPROF_GRAPHS=1 a pack of 5 and one separate lora training under CUDA
        # graphs (--compile graphs: on the H100 in session 36 both died of a segfault in the first compiled
        # backward, torch 2.11); with PACKPROF_PROFILE=1 torch.profiler's device busy time against wall per step.
        P="python3 -m benchmarks.packed_training --device cuda --data-dir $DATA --repeats 1"
        T="timeout ${PACKPROF_TIMEOUT:-100}"
        TC="timeout ${PACKPROF_COMPILED_TIMEOUT:-200}"
        export PYTHONFAULTHANDLER=1
        if [ "${PACKPROF_EAGER:-1}" = 1 ]; then
          $T $P --methods lora,ia3 --ns 1,5 --steps 10 --warmup 3 --out "$OUT/packed_training_cuda_eager.json" \
            > "$OUT/packprof_eager.log" 2>&1; show packprof_eager 7
        fi
        $TC $P --methods lora --ns 5,10 --steps 12 --warmup 8 --only packed --compile on \
          --out "$OUT/packed_training_cuda_on.json" > "$OUT/packprof_on.log" 2>&1; show packprof_on
        if [ "${PACKPROF_GRAPHS:-0}" = 1 ]; then
          $TC $P --methods lora --ns 5 --steps 12 --warmup 8 --only packed --compile graphs \
            --out "$OUT/packed_training_cuda_graphs.json" > "$OUT/packprof_graphs.log" 2>&1; show packprof_graphs 30
          $T $P --methods lora --ns 1 --steps 12 --warmup 8 --only separate --compile graphs \
            --out "$OUT/packed_training_cuda_graphs_separate.json" > "$OUT/packprof_graphs_sep.log" 2>&1
          show packprof_graphs_sep 30
        fi
        if [ "${PACKPROF_PROFILE:-0}" = 1 ]; then
          $T $P --methods lora --ns 1,5 --steps 3 --warmup 2 --profile --out "$OUT/packed_profile_cuda.json" \
            > "$OUT/packprof_profile.log" 2>&1; show packprof_profile
        fi ;;
    graphsprobe) # issue 16: does any other way of compiling under CUDA graphs train without the segfault of
        # --compile graphs (benchmarks/graphs_variants.py)? A lora pack of 5 (random:smollm2-135m, rte, 12 timed
        # steps after 8) per variant, each in its own process (a crash ends only it) at most GRAPHSPROBE_TIMEOUT
        # (default 220) s, the whole model's 70 more; compare with packprof's compiled-blocks pack (23.6
        # group-steps/s on the H100, session 36). GRAPHSPROBE_VARIANTS picks (space-separated). Session 37 (H100):
        # blocks-static and model-static finished no step in 110 / 180 s, blocks-no-trees failed an assertion
        # (eager fallback), so the default is now blocks-fixed (one padded width: one graph per block kind) and
        # blocks-static with more time, each logging dynamo's recompiles (a compile storm, not a hang, if they grow).
        export PYTHONFAULTHANDLER=1 TORCH_LOGS=recompiles
        for v in ${GRAPHSPROBE_VARIANTS:-blocks-fixed blocks-static}; do
          t=${GRAPHSPROBE_TIMEOUT:-220}; [ "$v" = model-static ] && t=$((t + 70))
          timeout "$t" python3 -m benchmarks.packed_training --device cuda --data-dir "$DATA" --repeats 1 \
            --methods lora --ns 5 --steps 12 --warmup 8 --only packed --compile graphs --graphs-variant "$v" \
            --out "$OUT/graphs_$v.json" > "$OUT/graphs_$v.log" 2>&1; show "graphs_$v" 4
        done ;;
    capturedprobe) # issue 16: the eager packed step recorded whole in one CUDA graph (benchmarks/captured_pack.py,
        # no compiler) against the same pack eager: a lora pack of 5 (random:smollm2-135m, rte, 12 timed steps after
        # 8), each in its own process at most CAPTUREDPROBE_TIMEOUT (default 150) s; compare with packprof's
        # compiled-blocks pack (23.6 group-steps/s on the H100, session 36)
        export PYTHONFAULTHANDLER=1
        for v in eager captured; do
          extra=(); [ "$v" = captured ] && extra=(--captured)
          timeout "${CAPTUREDPROBE_TIMEOUT:-150}" python3 -m benchmarks.packed_training --device cuda --data-dir "$DATA" \
            --repeats 1 --methods lora --ns 5 --steps 12 --warmup 8 --only packed --compile off "${extra[@]}" \
            --out "$OUT/captured_$v.json" > "$OUT/captured_$v.log" 2>&1; show "captured_$v" 5
        done ;;
    paperpack) # issue 16: the paper-preset rte run packed (--pack 5 --workers 2: the 5 lora and the 5 ia3 groups,
        # two packs side by side) against --workers 10, one after the other on one machine, each at
        # PAPERPACK_STEPS steps (the full preset's time extrapolated: benchmarks.paper_run.steps_extrapolation);
        # PAPERPACK_PACK / PAPERPACK_BASE replace the two runs' options (e.g. PAPERPACK_PACK="--pack 5 --workers 2
        # --compile on": the first step's compile is kept out of the extrapolation)
        for c in "pack|${PAPERPACK_PACK:---pack 5 --workers 2}" "w10|${PAPERPACK_BASE:---workers 10}"; do
          t=${c%%|*}; rm -rf "/tmp/pp_$t"; mkdir -p "/tmp/pp_$t"; echo "--- $t $(date -u +%H:%M:%S)"
          python3 -m benchmarks.paper_run --device cuda --data-dir "$DATA" --store "/tmp/pp_$t/paper.sqlite" \
            --timeout "${PAPER_TIMEOUT:-250}" --extra "${c#*|} --steps ${PAPERPACK_STEPS:-300}" \
            --out "$OUT/paper_$t.json" 2>&1 | grep -v -i warn | tail -9
          cp "/tmp/pp_$t/paper.sqlite" "$OUT/paper_$t.sqlite"
        done ;;
  esac
done
