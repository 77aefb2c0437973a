#!/usr/bin/env bash
# Export the paper grid's store (the device store of benchmarks/run_device_real.sh, .sqlite or .gz) as the committed
# results/paper/<model>.sqlite.xz and results/paper/withdrawn.sqlite.xz (issue 11), then docs/results.md:
#   join the committed export's runs the store lacks (benchmarks/merge_stores.py --absent),
#   compact (benchmarks/compact_store.py: float32 values as their shortest decimal, lossless), split per model
#   (benchmarks/split_store.py), xz -9 each whose rows changed (a file with the same rows keeps its bytes), and
#   bash benchmarks/results_doc.sh.
#   bash benchmarks/export_paper.sh .gpu/store/paper.sqlite.gz
set -eu
STORE=${1:?usage: bash benchmarks/export_paper.sh STORE(.sqlite|.gz)}
PYTHON=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
case $STORE in *.gz) gunzip -c "$STORE" > "$tmp/paper.sqlite" ;; *) cp "$STORE" "$tmp/paper.sqlite" ;; esac
# The committed export may hold runs the device store lacks (a call that resumed an older carried copy): join them
# in (only ids the store lacks; its own runs, withdrawn ones included, stay as they are) so none leaves the tables.
for old in results/paper/*.sqlite.xz; do
  case $(basename "$old") in rerun_*) continue ;; esac  # reruns into fresh stores (bf16 spread): not the grid's
  [ -f "$old" ] || continue
  xz -dc "$old" > "$tmp/committed.sqlite"
  "$PYTHON" -m benchmarks.merge_stores --absent "$tmp/paper.sqlite" "$tmp/committed.sqlite" |
    sed "s|$tmp/committed.sqlite|$old (committed; runs the device store lacked)|"
  rm -f "$tmp/committed.sqlite"
done
"$PYTHON" -m benchmarks.compact_store "$tmp/paper.sqlite"
"$PYTHON" -m benchmarks.split_store "$tmp/paper.sqlite" "$tmp/split"
for f in "$tmp"/split/*.sqlite; do
  dest="results/paper/$(basename "$f").xz"
  if [ -f "$dest" ]; then  # same rows as the committed file: keep its bytes (the page layout differs, not the data)
    xz -dc "$dest" > "$tmp/committed.sqlite"
    same=$("$PYTHON" -m benchmarks.split_store --digest "$f" "$tmp/committed.sqlite" | cut -d' ' -f1 | uniq | wc -l)
    rm -f "$tmp/committed.sqlite"
    if [ "$same" = 1 ]; then echo "$dest: unchanged (same rows)"; continue; fi
  fi
  xz -9 -T1 -c "$f" > "$dest"
  echo "$dest: $(stat -c %s "$dest") bytes"
done
rm -rf "$tmp"
bash "$(dirname "$0")/results_doc.sh"
