#!/usr/bin/env bash
# Join results stores (.sqlite, .xz or .gz) into one new .sqlite: the first is copied, each later one merged in with
# benchmarks/merge_stores.py --all (its finished runs, and runs of any status whose id the joined store lacks).
#   bash benchmarks/join_stores.sh OUT.sqlite [STORE ...]
#   bash benchmarks/join_stores.sh --list        (the default STOREs, one line)
# Without STOREs: the committed export of issue 11's grid (benchmarks/split_store.py's per-model stores and the
# withdrawn runs), SmolLM2's first — what benchmarks/results_doc.sh reports and benchmarks/prepare_gpu_dir.sh
# carries (this order compresses best: 11.2 MB as .xz, 13.2 MB with Gemma's first). Prints merge_stores' line per store.
set -eu
COMMITTED_EXPORT="results/paper/smollm2-135m.sqlite.xz results/paper/gemma3-270m.sqlite.xz results/paper/withdrawn.sqlite.xz"
if [ "${1:-}" = --list ]; then echo "$COMMITTED_EXPORT"; exit 0; fi
out=${1:?usage: bash benchmarks/join_stores.sh OUT.sqlite [STORE ...]}
shift
# shellcheck disable=SC2086
[ $# -eq 0 ] && set -- $COMMITTED_EXPORT
PYTHON=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
i=0
for store in "$@"; do
  i=$((i + 1)); part=$tmp/part$i.sqlite
  case $store in *.xz) xz -dc "$store" > "$part" ;; *.gz) gunzip -c "$store" > "$part" ;; *) cp "$store" "$part" ;; esac
  if [ $i -eq 1 ]; then
    mv "$part" "$out"
  else
    "$PYTHON" -m benchmarks.merge_stores --all "$out" "$part" | sed "s|$part|$store|"
    rm -f "$part"
  fi
done
