"""Withdraw the runs of a store that trained bfloat16/float16 parameters without float32 master weights.

Before commit b3431cc, methods that train parameters in the model's own dtype (``MethodInfo.trains_model_dtype``:
full fine-tuning, LayerNorm tuning, BitFit, FishMask, the bottleneck adapters, ``peft:ln_tuning``) stepped
those bfloat16 tensors directly, and every update below half the bfloat16 spacing of its weight was rounded away
(97% of SmolLM2-135M's weights for one AdamW step at lr 1e-5; every LayerNorm weight at Adafactor 3e-4): the runs
barely trained. Such runs now get new run ids (``RunSpec.master_weights``), so a new plan never reuses them; this
script marks the old ones ``withdrawn`` with the reason (kept in the store, left out of every report table).

    python -m benchmarks.withdraw_runs STORE.sqlite [--dry-run]

With ``--model NAME --transformers VERSION`` it withdraws instead every finished run of that model made under that
transformers version (the version each run recorded in its environment), for a tokenizer that version converted
wrongly: transformers 5.17.0 turns the Gemma 3 GGUF's tokenizer into one that splits text per character (round 7,
docs/benchmarks.md (d); :mod:`harness.tokenizer_check` now refuses such a tokenizer at load).

    python -m benchmarks.withdraw_runs STORE.sqlite --model gemma3-270m --transformers 5.17.0

With ``--fishmask-sparse`` it withdraws instead every finished FishMask run trained as zero-initialised sparse
deltas under Adafactor with ``scale_parameter`` (the only FishMask update before ``update=dense``; no ``update`` key
in the stored settings, or ``update=sparse``): Adafactor scales each step by ``max(1e-3, RMS(param))``, so deltas
starting at zero moved at most ``lr x 1e-3`` a step and never trained (round 15, docs/benchmarks.md (d): the 20
SmolLM2 copa runs ended at loss 1.7-3.1 with zero-shot's accuracy). T-Few masks the full tensor's gradient instead.

    python -m benchmarks.withdraw_runs STORE.sqlite --fishmask-sparse

With ``--commit SHA`` it withdraws instead every finished run made by a code tree at that commit (the commit each
run recorded in its environment): 292a898 scored one-token choices without a prefix (an adapter's evaluation,
zero-shot) on the right-padded path of 8817784, which gives other bfloat16 log-probs than the grid's trees under
the same run ids (round 20, docs/results_rounds.md; reverted in bde8a16). A re-run from a fixed tree replaces them
(same run ids); ``results/paper/rerun_scoring_path.sqlite.xz`` keeps a copy.

    python -m benchmarks.withdraw_runs STORE.sqlite --commit 292a898
"""

from __future__ import annotations

import argparse
import json
import sqlite3

from harness.methods import get_method

TOKENIZER_REASON = ("transformers {version} converted this model's tokenizer wrongly (one token per character; "
                    "harness.tokenizer_check now refuses it); re-run with a transformers that converts it correctly")
REASON = ("trained {dtype} parameters without float32 master weights (updates below bfloat16 resolution "
          "were rounded away; fixed in b3431cc, where such runs get new ids); re-run")


FISHMASK_REASON = ("FishMask trained zero-initialised sparse deltas under Adafactor scale_parameter=True (steps of at "
                   "most lr x 1e-3: the masked entries barely moved, so the model stayed the base model); T-Few masks "
                   "the full tensor's gradient (update=dense, new run ids); re-run")


COMMIT_REASON = ("scored at {commit}, whose evaluation of one-token choices without a prefix (8817784's right-padded "
                 "path) gives other bfloat16 log-probs than the grid's trees under the same run ids; reverted in "
                 "bde8a16: re-run from bde8a16 or later")


def fishmask_sparse(config: dict) -> bool:
    """Whether a run is FishMask with zero-initialised sparse deltas stepped by Adafactor with scale_parameter."""
    train = config.get("train") or {}
    return (config.get("method") == "fishmask" and train.get("optimizer") == "adafactor"
            and bool(train.get("scale_parameter")) and train.get("update", "sparse") == "sparse")


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
    parser.add_argument("--model", help="with --transformers: withdraw this model's runs made under that version")
    parser.add_argument("--transformers", help="the transformers version whose tokenizer conversion was wrong")
    parser.add_argument("--fishmask-sparse", action="store_true",
                        help="withdraw FishMask runs of sparse zero-initialised deltas under Adafactor scale_parameter")
    parser.add_argument("--commit", help="withdraw the runs made by the code at this commit (a prefix of its hash)")
    parser.add_argument("--reason", help="with --commit: why (default: the reason of 292a898's runs, 8817784's "
                        "scoring path)")
    args = parser.parse_args()
    if sum(map(bool, (args.model, args.fishmask_sparse, args.commit))) > 1:
        parser.error("--model, --fishmask-sparse and --commit are separate withdrawals: run them one at a time")
    if args.reason and not args.commit:
        parser.error("--reason goes with --commit")
    if bool(args.model) != bool(args.transformers):
        parser.error("--model and --transformers go together")
    db = sqlite3.connect(args.store)
    rows = db.execute("SELECT run_id, config_json, env_json FROM runs WHERE status = 'finished'").fetchall()
    if args.model:
        def hit(cfg: dict, env: dict) -> bool:
            return cfg.get("model") == args.model and env.get("packages", {}).get("transformers") == args.transformers

        reason = TOKENIZER_REASON.format(version=args.transformers)
    elif args.commit:
        def hit(cfg: dict, env: dict) -> bool:
            return str(env.get("git_commit") or "").startswith(args.commit)

        reason = args.reason or COMMIT_REASON.format(commit=args.commit)
    elif args.fishmask_sparse:
        def hit(cfg: dict, env: dict) -> bool:
            return fishmask_sparse(cfg)

        reason = FISHMASK_REASON
    else:
        def hit(cfg: dict, env: dict) -> bool:
            return stale(cfg)

        reason = None
    hits = [(run_id, json.loads(cfg)) for run_id, cfg, env in rows if hit(json.loads(cfg), json.loads(env or "{}"))]
    counts: dict[tuple, int] = {}
    for _, cfg in hits:
        counts[(cfg["task"], cfg["method"])] = counts.get((cfg["task"], cfg["method"]), 0) + 1
    for (task, method), n in sorted(counts.items()):
        print(f"{task} {method}: {n} run(s)")
    if not args.dry_run:
        with db:
            db.executemany("UPDATE runs SET status = 'withdrawn', error = ? WHERE run_id = ?",
                           [(reason or REASON.format(dtype=cfg["dtype"]), run_id) for run_id, cfg in hits])
    print(f"{'would withdraw' if args.dry_run else 'withdrew'} {len(hits)} of {len(rows)} finished runs")


if __name__ == "__main__":
    main()
