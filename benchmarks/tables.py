"""Render the recorded benchmark JSON (``benchmarks/results/``) as the Markdown tables of docs/benchmarks.md.

    python -m benchmarks.tables [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import fmt

ICL_PATHS = ("cached", "naive", "lmeval", "cached_copy", "cached_b8")


def _num(value: float) -> str:
    """One decimal from 10 up, three significant digits below (CPU figures are small)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _table(rows: list[list], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in r) + " |" for r in rows]
    return "\n".join(lines)


def icl_table(data: dict) -> str:
    rows = []
    for r in data["results"]:
        if r["path"] not in ICL_PATHS:
            continue
        rows.append([r["model"], r["k"], r["path"], r["prefix_tokens"], f"{r['seconds']:.3f}",
                     _num(r["examples_per_s"]), f"{r['speedup_vs_naive']:.1f}x", f"{r['speedup_vs_lmeval']:.1f}x",
                     f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-",
                     f"{r['memory_vs_naive']:.2f}x" if r.get("memory_vs_naive") else "-",
                     f"{r['tflops']:.0f}" if r["tflops"] >= 1 else f"{r['tflops']:.3f}",
                     f"{100 * r['agree_vs_naive']:.1f}%",
                     f"{r['max_abs_dlogprob_vs_naive']:.3f}" if r["max_abs_dlogprob_vs_naive"] >= 1e-3
                     else f"{r['max_abs_dlogprob_vs_naive']:.1e}"])
    return _table(rows, ["model", "k", "path", "prefix tok", "s", "examples/s", "vs naive", "vs lm-eval loop",
                         "peak GiB", "mem vs naive", "TFLOP/s", "same prediction as naive", "max abs d logprob"])


def identity_table(*datas: dict) -> str:
    rows = []
    for data in datas:
        for r in data.get("identity", []):
            rows.append([r["model"], r["k"], r["n"]] + [
                f"{100 * r[p]['agree']:.0f}% / {r[p]['max_abs_dlogprob']:.1e}"
                for p in ("cached_shared", "cached_copy", "lmeval")] + ["yes" if r["identical"] else "NO"])
    return _table(rows, ["model", "k", "n", "cached (shared prefix)", "cached (copies)", "lm-eval loop",
                         "identical"])


def train_table(*datas: dict) -> str:
    rows = []
    for data in datas:
        for r in data["results"]:
            if "error" in r:
                rows.append([r["model"], r["kind"], r["method"], "error: " + r["error"][:60]] + ["-"] * 5)
                continue
            shape = f"{r['batch']}x{r['seq']}" if "seq" in r else f"{r['tokens_per_step']:.0f} tok/step"
            shape += f" + {r['batch']}x{r['dec_seq']} dec" if r.get("dec_seq") else ""  # encoder-decoder
            rows.append([r["model"], r["kind"], r["method"], shape, f"{r['step_ms']:.1f}",
                         f"{r['tokens_per_s']:.0f}", _num(r['model_tflops']), f"{100 * r['mfu']:.1f}%",
                         f"{r['peak_gib']:.1f}"])
    return _table(rows, ["model", "kind", "method", "step shape", "ms/step", "tokens/s", "model TFLOP/s",
                         "MFU (989 TFLOP/s)", "peak GiB"])


VS_LMEVAL_TARGETS = {0: 3.0, 8: 12.0, 32: 25.0}  # issue 14: harness >= this many times faster at K


def vs_lmeval_table(data: dict) -> str:
    """benchmarks/vs_lmeval.py: both whole commands per K, the ratios of that one run, per-example agreement."""
    by = {(r["tool"], r["k"]): r for r in data["results"]}
    rows = []
    for c in data.get("comparison", []):
        k = c["k"]
        lm, ours = by[("lmeval", k)], by[("harness", k)]
        target = VS_LMEVAL_TARGETS.get(k)
        speed_ok = "met" if target and c["speedup"] >= target else "missed"
        rss_ok = "met" if c["rss_ratio"] <= 0.2 else "missed"
        rows.append([k, f"{lm['seconds']:.1f}", f"{ours['seconds']:.1f}",
                     f"**{c['speedup']:.1f}x** (target {target:g}x: {speed_ok})" if target else f"{c['speedup']:.1f}x",
                     f"{lm['peak_rss_bytes'] / 1e9:.2f}", f"{ours['peak_rss_bytes'] / 1e9:.2f}",
                     f"{c['rss_ratio']:.2f} (target 0.20: {rss_ok})",
                     f"{c['max_abs_dloglik']:.1e}" if c["max_abs_dloglik"] is not None else "-",
                     f"{c['same_prediction']}/{c['n_compared']}", f"{c['same_context']}/{c['n_compared']}",
                     f"{lm.get('accuracy', 0):.3f} / {ours.get('accuracy', 0):.3f}",
                     f"{lm['load_before'][0]:.2f} / {ours['load_before'][0]:.2f}"])
    return _table(rows, ["K", "lm-eval s", "harness s", "harness faster by", "lm-eval peak RSS GB",
                         "harness peak RSS GB", "RSS harness / lm-eval", "max abs d loglik", "same prediction",
                         "same context text", "accuracy lm-eval / harness", "load avg (1 min) at start"])


def probe_table(data: dict) -> str:
    rows = [[r["method"], r["seed"], r["padding"], r["diverged_at"] if r["diverged_at"] is not None else "-",
             f"{r['loss_last']:.2f}" if r.get("loss_last") is not None else "-"] for r in data["results"]]
    return _table(rows, ["method", "seed", "padding", "NaN at step", "last loss"])


def paper_table(data: dict) -> str:
    rows = [[r["method"], r["expected_runs"], r["finished"], r["failed"], f"{r['train_seconds']:.0f}"]
            for r in data["runs"]]
    return _table(rows, ["method", "runs expected", "finished", "failed", "summed train_seconds of its runs"]) + (
        f"\n\nwall {data['wall_seconds']:.1f} s, return code {data['returncode']}, timed out {data['timed_out']}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default="benchmarks/results")
    args = p.parse_args(argv)
    folder = Path(args.results)
    load = lambda name: json.loads((folder / name).read_text()) if (folder / name).exists() else None  # noqa: E731
    if icl := load("icl.json"):
        print(icl_table(icl), "\n")
        print(identity_table(icl, load("identity.json") or {}), "\n")
    if icl_cpu := load("icl_cpu.json"):
        print(icl_table(icl_cpu), "\n")
    for name in ("icl_t5.json", "icl_t5_cpu.json"):  # issue 17: encoder-decoders beside a causal model
        if t5 := load(name):
            print(icl_table(t5), "\n")
            if t5.get("identity"):  # empty when the stage's --identity check ran out of time
                print(identity_table(t5), "\n")
    for name in ("train_t5.json", "train_t5_cpu.json"):
        if t5 := load(name):
            print(train_table(t5), "\n")
    trains = [d for d in (load("train.json"), load("train_compiled.json"), load("train_cpu.json")) if d]
    if trains:
        print(train_table(*trains), "\n")
    later = [d for d in (load("train_mfu_blocks.json"), load("train_loop_eager.json"), load("train_loop_blocks.json"))
             if d]
    if later:
        print(train_table(*later), "\n")
    if vs := load("vs_lmeval_cpu.json"):
        print(vs_lmeval_table(vs), "\n")
    if probe := load("nan_probe.json"):
        print(probe_table(probe), "\n")
    if paper := load("paper.json"):
        print(paper_table(paper), "\n")


if __name__ == "__main__":
    main()
