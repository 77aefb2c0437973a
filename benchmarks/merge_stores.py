"""Merge the finished runs of other stores into one store (the results of GPU calls that resumed different copies).

A grid on the lent GPU resumes from the store carried into each call; when two calls started from different copies
(round 8: a warm machine kept its own older store), each returned store holds runs the other lacks. This copies
every run that is finished in a source and not finished in the target (missing, failed or withdrawn there), with its
per-example rows, and nothing else: a run finished in the target is never replaced (the same run id means the same
configuration, weights, data and scoring, so either copy is the result). With ``--all`` (joining the committed
per-model stores of ``benchmarks/split_store.py`` back into one), a source's run of any other status (withdrawn,
failed) is copied too where the target has no run of that id. With ``--absent`` only runs whose id the target
lacks are copied, whatever their status, and a run the target holds in any status (a withdrawn one above all) is
never touched: what ``benchmarks/export_paper.sh`` does with the committed export before replacing it, so a device
store that resumed an older copy cannot drop a run from the published tables (session 20: 4 runs).

    python -m benchmarks.merge_stores TARGET.sqlite SOURCE.sqlite [SOURCE.sqlite ...] [--dry-run] [--all | --absent]
"""

from __future__ import annotations

import argparse
import sqlite3

TABLES = ("runs", "examples")  # runs first: examples reference them


def _columns(db: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA {schema}.table_info({table})")]


MODES = ("finished", "all", "absent")


def _to_copy(status: str, present_status: str | None, mode: str) -> bool:
    """Whether a source run of ``status`` is copied where the target holds that id with ``present_status``
    (None: the target lacks it). ``finished``: a finished run the target has not finished; ``all``: that, or any run
    whose id the target lacks; ``absent``: only a run whose id the target lacks, never touching the target's runs."""
    if mode == "absent":
        return present_status is None
    return (status == "finished" and present_status != "finished") or (mode == "all" and present_status is None)


def merge(target: str, source: str, dry_run: bool = False, mode: str = "finished") -> list[str]:
    """Copy ``source``'s runs chosen by ``mode`` (:func:`_to_copy`) into ``target``, with their per-example rows;
    returns their run ids."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    db = sqlite3.connect(target)
    try:
        db.execute("ATTACH DATABASE ? AS src", (source,))
        present = dict(db.execute("SELECT run_id, status FROM main.runs"))
        new = [r for r, status in db.execute("SELECT run_id, status FROM src.runs ORDER BY run_id")
               if _to_copy(status, present.get(r), mode)]
        if new and not dry_run:
            with db:
                db.execute("CREATE TEMP TABLE merge_ids (run_id TEXT PRIMARY KEY)")
                db.executemany("INSERT INTO merge_ids VALUES (?)", [(r,) for r in new])
                db.execute("DELETE FROM main.examples WHERE run_id IN (SELECT run_id FROM merge_ids)")
                db.execute("DELETE FROM main.runs WHERE run_id IN (SELECT run_id FROM merge_ids)")
                for table in TABLES:
                    shared = [c for c in _columns(db, "main", table) if c in _columns(db, "src", table)]
                    names = ", ".join(shared)
                    db.execute(f"INSERT INTO main.{table} ({names}) SELECT {names} FROM src.{table} "
                               "WHERE run_id IN (SELECT run_id FROM merge_ids)")
        return new
    finally:
        db.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target")
    p.add_argument("sources", nargs="+")
    p.add_argument("--dry-run", action="store_true", help="count, change nothing")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--all", action="store_true", help="also copy runs of other statuses whose id the target lacks")
    how.add_argument("--absent", action="store_true",
                     help="copy only runs whose id the target lacks (any status); never touch the target's runs")
    args = p.parse_args()
    mode = "all" if args.all else "absent" if args.absent else "finished"
    for source in args.sources:
        new = merge(args.target, source, args.dry_run, mode=mode)
        print(f"{source}: {len(new)} run(s) {'to copy' if args.dry_run else 'copied'} into {args.target}")


if __name__ == "__main__":
    main()
