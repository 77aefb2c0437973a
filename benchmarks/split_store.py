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
    python -m benchmarks.split_store --digest FILE.sqlite ...   (content digest: equal files hold equal rows)

SQLite's page layout (and so the bytes, and the .xz) depends on the order rows were written, so two exports of the same
runs differ as files; :func:`content_digest` hashes the rows themselves, and ``benchmarks/export_paper.sh`` keeps a
committed file whose rows did not change (no multi-MB binary churn in git for a model no run touched).
"""

from __future__ import annotations

import argparse
import hashlib
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


def content_digest(path: str | Path) -> str:
    """sha256 of every row of every table (columns in schema order, rows sorted by all columns): independent of the
    file's page layout, so equal for two files that hold the same rows."""
    digest = hashlib.sha256()
    db = sqlite3.connect(path)
    try:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        for table in tables:
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            digest.update(repr((table, columns)).encode())
            order = ", ".join(str(i + 1) for i in range(len(columns)))
            for row in db.execute(f"SELECT * FROM {table} ORDER BY {order}"):
                digest.update(repr(row).encode())
    finally:
        db.close()
    return digest.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digest", nargs="+", metavar="FILE", help="print each file's content digest and exit")
    p.add_argument("store", nargs="?")
    p.add_argument("out_dir", nargs="?")
    args = p.parse_args()
    if args.digest:
        for path in args.digest:
            print(content_digest(path), path)
        return
    if not (args.store and args.out_dir):
        p.error("STORE and OUT_DIR are required (or --digest FILE...)")
    for name, n in split(args.store, args.out_dir).items():
        print(f"{Path(args.out_dir) / name}: {n} run(s)")


if __name__ == "__main__":
    main()
