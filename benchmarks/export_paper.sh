#!/usr/bin/env bash
# Export the paper grid's store (the device store of benchmarks/run_device_real.sh, .sqlite or .gz) as the committed
# results/paper/<model>.sqlite.xz and results/paper/withdrawn.sqlite.xz (issue 11), then docs/results.md:
#   compact (benchmarks/compact_store.py: float32 values as their shortest decimal, lossless), split per model
#   (benchmarks/split_store.py), xz -9 each, and bash benchmarks/results_doc.sh.
#   bash benchmarks/export_paper.sh .gpu/store/paper.sqlite.gz
set -eu
STORE=${1:?usage: bash benchmarks/export_paper.sh STORE(.sqlite|.gz)}
PYTHON=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
case $STORE in *.gz) gunzip -c "$STORE" > "$tmp/paper.sqlite" ;; *) cp "$STORE" "$tmp/paper.sqlite" ;; esac
"$PYTHON" -m benchmarks.compact_store "$tmp/paper.sqlite"
"$PYTHON" -m benchmarks.split_store "$tmp/paper.sqlite" "$tmp/split"
for f in "$tmp"/split/*.sqlite; do
  xz -9 -T1 -c "$f" > "results/paper/$(basename "$f").xz"
  echo "results/paper/$(basename "$f").xz: $(stat -c %s "results/paper/$(basename "$f").xz") bytes"
done
rm -rf "$tmp"
bash "$(dirname "$0")/results_doc.sh"
