"""Side by side on the CPU: the real lm-evaluation-harness and harness on the same model, prompts and demonstrations.

Setting (issue 14): CB validation (56 examples x 3 choices) with lm-evaluation-harness's ``cb`` prompt
(``{{premise}}\\nQuestion: {{hypothesis}}. True, False, or Neither?\\nAnswer:``, choices True / False / Neither,
which is harness's ``cb`` template ``gpt3_style``), SmolLM2-135M-Instruct in float32 (the folder harness converts
from the embedded GGUF, loaded by both tools), batch size 8, demonstrations = the first K rows of the T-Few seed-0
subset (``<data>/cb/few_shot/0_seed.jsonl``; lm-eval's ``first_n`` sampler), for each K of ``--ks``.

Each tool runs as a whole command in a subprocess, timed from start to exit, peak RSS from ``os.wait4`` (the
child's own ``ru_maxrss``, its waited-for children included):

- ``lm_eval --model hf --model_args pretrained=<folder>,dtype=float32 --tasks cb_harness --include_path <dir>
  --num_fewshot K --batch_size 8 --device cpu --log_samples`` with a task file written here (the lm-eval ``cb``
  prompt on the local JSONL files; ``fewshot_split`` = the seed-0 subset, ``sampler: first_n``);
- ``python -m harness.cli run --methods icl --tasks cb --templates gpt3_style --seeds 0 --k K --device cpu
  --dtype float32 --batch-size 8`` into a fresh store.

lm-evaluation-harness is a benchmark-only dependency, imported only in its subprocess: ``--lmeval-path`` (or
``$LMEVAL_PATH``) is put on its PYTHONPATH (e.g. a ``pip install --target`` folder of ``lm-eval==0.4.13``), so
the project's environment is not changed. Per K both commands run back to back (same load); the JSON records the
load average around each. Per example it compares the contexts (lm-eval's request text vs harness's prefix +
prompt), the summed log-likelihood of every choice (max |difference|) and the predictions.

    LMEVAL_PATH=/work/lmeval-site nice python -m benchmarks.vs_lmeval --data-dir ../shared/data \\
        --out benchmarks/results/vs_lmeval_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import print_table, write_json

TASK_NAME = "cb_harness"
LMEVAL_PROMPT = "{{premise}}\\nQuestion: {{hypothesis}}. True, False, or Neither?\\nAnswer:"  # lm-eval's cb
CHOICES = ("True", "False", "Neither")
GB = 1e9


def task_yaml(data_dir: Path, seed: int) -> str:
    """lm-evaluation-harness task file: its cb prompt on the local CB files, demonstrations = first K of the seed."""
    return "\n".join([
        f"task: {TASK_NAME}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    validation: {data_dir / 'cb' / 'validation.jsonl'}",
        f"    train: {data_dir / 'cb' / 'few_shot' / f'{seed}_seed.jsonl'}",
        "output_type: multiple_choice",
        "validation_split: validation",
        "fewshot_split: train",
        f'doc_to_text: "{LMEVAL_PROMPT}"',
        "doc_to_target: label",
        f"doc_to_choice: {list(CHOICES)}",
        "fewshot_config:",
        "  sampler: first_n",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "",
    ])


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd`` to its exit: wall seconds, peak RSS (bytes, ``os.wait4``), exit status, load before/after."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = load_avg()
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "returncode": proc.returncode,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "load_before": before, "load_after": load_avg(),
            "command": " ".join(cmd), "log": str(log)}


def run_lmeval(args, folder: str, k: int, work: Path) -> tuple[dict, dict]:
    """One lm-eval command; returns (timing, {doc idx: (context, [loglik per choice])})."""
    out = work / f"lmeval_k{k}"
    cmd = [args.lmeval_python, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={folder},dtype=float32", "--tasks", TASK_NAME,
           "--include_path", str(work / "tasks"), "--num_fewshot", str(k), "--batch_size", str(args.batch_size),
           "--device", "cpu", "--output_path", str(out), "--log_samples", "--seed", "0"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args.lmeval_path, env.get("PYTHONPATH", "")) if p)
    res = timed(cmd, env, work / f"lmeval_k{k}.log")
    scores = {}
    for path in out.rglob("samples_*.jsonl"):
        for line in path.read_text().splitlines():
            s = json.loads(line)
            lls = [float(r[0]) for r in s["filtered_resps"]]
            scores[int(s["doc"]["idx"])] = (s["arguments"]["gen_args_0"]["arg_0"], lls)
    for path in out.rglob("results_*.json"):
        data = json.loads(path.read_text())
        res["accuracy"] = data["results"][TASK_NAME].get("acc,none")
        res["evaluation_seconds"] = float(data.get("total_evaluation_time_seconds", "nan"))
    return res, scores


def run_harness(args, k: int, work: Path) -> tuple[dict, dict]:
    """One ``harness run`` command; returns (timing, {example idx: [loglik per choice]})."""
    store = work / f"harness_k{k}.sqlite"
    cmd = [sys.executable, "-m", "harness.cli", "run", "--methods", "icl", "--tasks", "cb", "--templates",
           "gpt3_style", "--seeds", str(args.seed), "--k", str(k), "--model", args.model, "--device", "cpu",
           "--dtype", "float32", "--batch-size", str(args.batch_size), "--data-dir", str(args.data_dir),
           "--store", str(store), "--quiet"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (str(Path.cwd()), os.environ.get("PYTHONPATH", ""))
                                                      if p)}
    res = timed(cmd, env, work / f"harness_k{k}.log")
    from harness import results

    scores = {}
    if store.exists():
        for r in results.records(results.examples(str(store))):
            scores[int(r["example_id"])] = [float(x) for x in r["logprobs"]]
        for run in results.records(results.runs(str(store))):
            res["accuracy"] = run.get("accuracy")
            res["evaluation_seconds"] = run.get("eval_seconds")
    return res, scores


def harness_contexts(args, k: int) -> dict:
    """What harness scores for each example: demonstrations + prompt (the string lm-eval's request must equal)."""
    from harness.data import few_shot_examples, load_split
    from harness.tasks import load_task

    task = load_task("cb")
    template = task.template("gpt3_style")
    examples = load_split(task, task.eval_split, args.data_dir)[: args.limit or None]
    prefix = task.demonstrations(template, few_shot_examples(task, args.seed, args.data_dir, n=k) if k else [])
    return {int(ex["idx"]): prefix + task.render(template, ex).context for ex in examples}


def compare(k: int, lm: dict, ours: dict, contexts: dict) -> dict:
    """Per example: same context text, max |d loglik| over the choices, same prediction (argmax)."""
    ids = sorted(set(lm) & set(ours))
    diffs = {i: max(abs(a - b) for a, b in zip(lm[i][1], ours[i])) for i in ids}
    argmax = lambda v: max(range(len(v)), key=lambda j: (v[j], -j))  # noqa: E731 - first of ties
    return {"k": k, "n_compared": len(ids), "n_lmeval": len(lm), "n_harness": len(ours),
            "same_context": sum(lm[i][0].rstrip() == contexts.get(i, "").rstrip() for i in ids),
            "same_prediction": sum(argmax(lm[i][1]) == argmax(ours[i]) for i in ids),
            "max_abs_dloglik": max(diffs.values(), default=None),
            "dloglik_per_example": {str(i): diffs[i] for i in ids}}


def environment(args) -> dict:
    import tokenizers
    import torch
    import transformers

    lmeval_version = subprocess.run(
        [args.lmeval_python, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
        env=os.environ | {"PYTHONPATH": args.lmeval_path or ""}, capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "lm_eval": lmeval_version, "harness_commit": commit, "cpu": cpu, "cpu_count": os.cpu_count(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1),
            "device": "cpu", "niceness": os.nice(0)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", default="0,8,32")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N validation examples (smoke runs)")
    p.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR", "../shared/data"))
    p.add_argument("--lmeval-path", default=os.environ.get("LMEVAL_PATH", ""),
                   help="folder put on lm-eval's PYTHONPATH only (a pip --target install of lm-eval==0.4.13)")
    p.add_argument("--lmeval-python", default=sys.executable)
    p.add_argument("--tools", default="lmeval,harness", help="order of the two commands at each K")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed 2-example run of each tool")
    p.add_argument("--work-dir", default=None, help="logs, stores, lm-eval outputs (default: a temp folder)")
    p.add_argument("--out", default="benchmarks/results/vs_lmeval_cpu.json")
    args = p.parse_args(argv)
    args.data_dir = Path(args.data_dir).resolve()
    ks = [int(x) for x in args.ks.split(",")]
    tools = args.tools.split(",")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vs_lmeval_"))
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    (work / "tasks" / f"{TASK_NAME}.yaml").write_text(task_yaml(args.data_dir, args.seed))
    from harness.models import model_source

    folder, _ = model_source(args.model)  # converts the GGUF once (untimed); both tools load this folder
    env = environment(args) | {"model_folder": folder, "work_dir": str(work)}
    payload = {"env": env, "args": {k: str(v) for k, v in vars(args).items()},
               "task_yaml": task_yaml(args.data_dir, args.seed), "results": [], "comparison": []}
    if not args.no_warmup:  # disk caches, .pyc files, the datasets cache of the JSON files: not part of the figures
        warm = argparse.Namespace(**(vars(args) | {"limit": 2}))
        run_lmeval(warm, folder, 0, work / "warmup") if "lmeval" in tools else None
        run_harness(warm, 0, work / "warmup") if "harness" in tools else None
    for k in ks:
        scores = {}
        for tool in tools:
            res, scores[tool] = run_lmeval(args, folder, k, work) if tool == "lmeval" else run_harness(args, k, work)
            row = {"tool": tool, "k": k, **res, "peak_rss_gb": res["peak_rss_bytes"] / GB}
            payload["results"].append(row)
            print(f"# k={k} {tool}: {res['seconds']:.1f} s, {row['peak_rss_gb']:.2f} GB, rc {res['returncode']}, "
                  f"load {res['load_before']} -> {res['load_after']}", flush=True)
            write_json(args.out, payload)
        if len(scores) == 2:
            cmp = compare(k, scores["lmeval"], scores["harness"], harness_contexts(args, k))
            by = {r["tool"]: r for r in payload["results"] if r["k"] == k}
            cmp["speedup"] = by["lmeval"]["seconds"] / by["harness"]["seconds"]
            cmp["rss_ratio"] = by["harness"]["peak_rss_bytes"] / by["lmeval"]["peak_rss_bytes"]
            payload["comparison"].append(cmp)
            print(f"# k={k}: harness {cmp['speedup']:.1f}x faster, RSS {cmp['rss_ratio']:.2f} of lm-eval's, "
                  f"max |d loglik| {cmp['max_abs_dloglik']}, same prediction {cmp['same_prediction']}/"
                  f"{cmp['n_compared']}, same context {cmp['same_context']}", flush=True)
            write_json(args.out, payload)
    print_table(payload["results"], ["tool", "k", "seconds", "peak_rss_gb", "accuracy", "evaluation_seconds",
                                     "returncode"])
    print_table(payload["comparison"], ["k", "speedup", "rss_ratio", "max_abs_dloglik", "same_prediction",
                                        "same_context", "n_compared"])


if __name__ == "__main__":
    main()
