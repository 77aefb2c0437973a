"""Split a results store into the committed export: one store per model of its finished runs, one of its withdrawn runs.

The paper grid's store (issue 11) grows with every model; committed as one file it would pass 10 MB. Split, each
file stays a few MB and a model's file changes only when that model's runs do:

    OUT/<model>.sqlite   the model's finished runs and their per-example rows (``/`` in a model name becomes ``_``)
    OUT/withdrawn.sqlite every withdrawn run (kept for the record; no table or figure reads them)

Runs of any other status (failed, interrupted) are not exported: a rerun replaces them, and the device store
keeps them. Each output is a copy of the input's schema (the same ``Store`` reads it), vacuumed.
``python -m benchmarks.merge_stores --all JOINED OUT/*.sqlite`` joins them back into one store (what
``benchmarks/results_doc.sh`` reports on); the join holds exactly the exported runs and rows
(``tests/test_merge_stores.py``).

    python -m benchmarks.split_store STORE.sqlite OUT_DIR      (then xz -9 each: benchmarks/results_doc.sh reads .xz)
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
from pathlib import Path

WITHDRAWN = "withdrawn"


def _keep_only(path: Path, where: str, params: tuple) -> int:
    """Delete every run (and its rows) of ``path`` not matching ``where``; returns the runs kept."""
    db = sqlite3.connect(path)
    try:
        with db:
            keep = f"SELECT run_id FROM runs WHERE {where}"
            db.execute(f"DELETE FROM examples WHERE run_id NOT IN ({keep})", params)
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "mixed_runs" in tables:  # serving measurements of issue 16: not part of the paper grid's export
                db.execute("DELETE FROM mixed_runs")
            db.execute(f"DELETE FROM runs WHERE NOT ({where})", params)
        db.execute("VACUUM")
        return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    finally:
        db.close()


def split(store: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write ``out_dir/<model>.sqlite`` per model (finished runs) and ``out_dir/withdrawn.sqlite``; returns the
    number of runs in each file, by file name."""
    store, out_dir = Path(store), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(store)
    try:
        models = [m for (m,) in db.execute("SELECT DISTINCT model FROM runs WHERE status = 'finished' ORDER BY model")]
        has_withdrawn = db.execute("SELECT COUNT(*) FROM runs WHERE status = ?", (WITHDRAWN,)).fetchone()[0] > 0
    finally:
        db.close()
    parts = [(f"{m.replace('/', '_')}.sqlite", "status = 'finished' AND model = ?", (m,)) for m in models]
    if has_withdrawn:
        parts.append((f"{WITHDRAWN}.sqlite", "status = ?", (WITHDRAWN,)))
    counts = {}
    for name, where, params in parts:
        if (out_dir / name).resolve() == store.resolve():
            raise SystemExit(f"{out_dir / name} would overwrite the input store")
        shutil.copyfile(store, out_dir / name)
        counts[name] = _keep_only(out_dir / name, where, params)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("out_dir")
    args = p.parse_args()
    for name, n in split(args.store, args.out_dir).items():
        print(f"{Path(args.out_dir) / name}: {n} run(s)")


if __name__ == "__main__":
    main()
