#!/usr/bin/env bash
# Make a device call's results the next call's checkpoint (issue 11's grid, benchmarks/run_device_real.sh):
#
#   bash benchmarks/pull_device_store.sh FILES_AT      (the run reply's files_at, e.g. /work/.device/6)
#
# joins the store's parts (paper.sqlite.gz.part.*, or takes paper.sqlite.gz) into .gpu/store/paper.sqlite.gz and
# removes the older .gpu/store/paper.sqlite.xz (the grid stage prefers .xz), and replaces
# .gpu/store/train_states.tar.gz with the call's (killed trainings' states) or removes it when none came back.
# Run it at once after a call: the machine goes back 30 s after a call, and what the next call carries is what it
# resumes. Keep the last call's store as .gpu/full/paper.sqlite.gz for the export (docs/benchmarks.md (d)).
set -euo pipefail
from=${1:?usage: pull_device_store.sh FILES_AT}
store=${GPU_DIR:-.gpu}/store
mkdir -p "$store"
if compgen -G "$from/paper.sqlite.gz.part.*" > /dev/null; then
  cat "$from"/paper.sqlite.gz.part.* > "$store/paper.sqlite.gz.tmp"
else
  cp "$from/paper.sqlite.gz" "$store/paper.sqlite.gz.tmp"
fi
gzip -t "$store/paper.sqlite.gz.tmp"
mv "$store/paper.sqlite.gz.tmp" "$store/paper.sqlite.gz" && rm -f "$store/paper.sqlite.xz"
if [ -f "$from/train_states.tar.gz" ]; then
  cp "$from/train_states.tar.gz" "$store/train_states.tar.gz"
else
  rm -f "$store/train_states.tar.gz"
fi
ls -l "$store"
