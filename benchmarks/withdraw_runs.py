"""Withdraw the runs of a store that trained bfloat16/float16 parameters without float32 master weights.

Before commit b3431cc, methods that train parameters in the model's own dtype (``MethodInfo.trains_model_dtype``:
full fine-tuning, LayerNorm tuning, BitFit, FishMask, the bottleneck adapters, ``peft:ln_tuning``) stepped
those bfloat16 tensors directly, and every update below half the bfloat16 spacing of its weight was rounded away
(97% of SmolLM2-135M's weights for one AdamW step at lr 1e-5; every LayerNorm weight at Adafactor 3e-4): the runs
barely trained. Such runs now get new run ids (``RunSpec.master_weights``), so a new plan never reuses them; this
script marks the old ones ``withdrawn`` with the reason (kept in the store, left out of every report table).

    python -m benchmarks.withdraw_runs STORE.sqlite [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sqlite3

from harness.methods import get_method

REASON = ("trained {dtype} parameters without float32 master weights (updates below bfloat16 resolution "
          "were rounded away; fixed in b3431cc, where such runs get new ids); re-run")


def stale(config: dict) -> bool:
    """Whether a run's config is a low-precision run of a model-dtype method made without master weights."""
    if config.get("dtype") not in ("bfloat16", "float16") or config.get("master_weights"):
        return False
    try:
        return get_method(config["method"]).trains_model_dtype
    except Exception:  # noqa: BLE001 - a method this code no longer knows: leave its runs alone
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    db = sqlite3.connect(args.store)
    rows = db.execute("SELECT run_id, config_json FROM runs WHERE status = 'finished'").fetchall()
    hits = [(run_id, json.loads(cfg)) for run_id, cfg in rows if stale(json.loads(cfg))]
    counts: dict[tuple, int] = {}
    for _, cfg in hits:
        counts[(cfg["task"], cfg["method"])] = counts.get((cfg["task"], cfg["method"]), 0) + 1
    for (task, method), n in sorted(counts.items()):
        print(f"{task} {method}: {n} run(s)")
    if not args.dry_run:
        with db:
            db.executemany("UPDATE runs SET status = 'withdrawn', error = ? WHERE run_id = ?",
                           [(REASON.format(dtype=cfg["dtype"]), run_id) for run_id, cfg in hits])
    print(f"{'would withdraw' if args.dry_run else 'withdrew'} {len(hits)} of {len(rows)} finished runs")


if __name__ == "__main__":
    main()
