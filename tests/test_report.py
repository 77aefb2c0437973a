"""Tests of harness.report: statistics, tables, LaTeX, plots, break-even, baselines and the click commands.

Stores are built in tmp_path with hand-made runs: model ``m``, tasks rte/cb, templates t0/t1, seeds 0/1,
methods icl (k=4), zeroshot (seed 0 only), lora and ia3; 25 examples per run, so every accuracy is a multiple of
4% and every median/quartile below is exact at one decimal.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats as sps

from harness.report import COMMANDS
from harness.report import check as checking
from harness.report import stats
from harness.report.format import (Table, fmt_acc, fmt_bytes, fmt_flops, fmt_params, latex_escape, to_latex,
                                   to_markdown, to_text)
from harness.report.breakeven import break_even, break_even_table
from harness.report.plots import make_plots
from harness.report.tables import cost_table, select_runs, summary_table, task_table
from harness.store import ExampleScore, RunResult, Store

N = 25
TEMPLATES, SEEDS = ("t0", "t1"), (0, 1)
# correct examples per run, in the order (t0,s0), (t0,s1), (t1,s0), (t1,s1)
CORRECT = {
    ("icl", "rte"): [10, 12, 11, 13], ("icl", "cb"): [12, 14, 13, 15],
    ("lora", "rte"): [14, 16, 15, 17], ("lora", "cb"): [16, 18, 17, 19],
    ("ia3", "rte"): [13, 13, 13, 13], ("ia3", "cb"): [16, 20, 18, 20],
    ("zeroshot", "rte"): [9, None, 9, None], ("zeroshot", "cb"): [8, None, 8, None],
}
COSTS = {  # infer FLOPs/example, train FLOPs, checkpoint bytes, trainable params, k
    "icl": (1e12, 0, 16_000, 0, 4), "zeroshot": (5e10, None, None, 0, 0),  # as icl_runner / a bare store
    "lora": (1e11, 1e15, 4_200_000, 460_800, 0), "ia3": (1.2e11, 5e14, 120_000, 12_000, 0),
}


def write_run(store, method, task, template, seed, n_correct, n=N, model="m", status="finished",
              is_random=False, preset="quick"):
    infer, train, ckpt, trainable, k = COSTS[method]
    config = {"task": task, "method": method, "model": model, "template": template, "seed": seed, "k": k,
              "preset": preset, "limit": None, "dtype": "float32", "device": "cpu", "kv_cache": True}
    run_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    order = list(range(n))[::-1] if method == "icl" else list(range(n))
    right = set(order[:n_correct])
    examples = []
    for i in range(n):
        label = i % 2
        lps = [-2.0, -2.0]
        lps[label if i in right else 1 - label] = -1.0
        examples.append(ExampleScore(f"ex{i:03d}", label, lps, [1, 1], [3, 3]))
    metrics = {"n_eval": n, "accuracy": n_correct / n, "accuracy_norm": n_correct / n,
               "accuracy_norm_char": n_correct / n,
               "infer_flops_per_example": infer, "infer_flops_per_example_uncached": 2 * infer,
               "train_flops": train, "checkpoint_bytes": ckpt, "trainable_params": trainable,
               "total_params": 135_000_000, "peak_memory_bytes": 2_000_000_000 if train else 1_000_000_000,
               "seconds": 12.0, "train_seconds": {None: None, 0: 0.0}.get(train, 60.0), "eval_seconds": 3.0}
    store.write(RunResult(run_id, config, status, metrics if status == "finished" else {}, examples,
                          error=None if status == "finished" else "boom", is_random=is_random))
    return run_id


def build_store(path, methods=("icl", "zeroshot", "lora", "ia3"), extras=True):
    store = Store(path)
    for (method, task), counts in CORRECT.items():
        if method not in methods:
            continue
        for (template, seed), c in zip([(t, s) for t in TEMPLATES for s in SEEDS], counts):
            if c is not None:
                write_run(store, method, task, template, seed, c)
    if extras:
        write_run(store, "lora", "rte", "t0", 5, 20, status="failed")
        write_run(store, "lora", "rte", "t0", 0, 3, model="random:m", is_random=True)
    return store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "harness.sqlite"
    build_store(path)
    return path


@pytest.fixture(scope="module")
def runs(store_path):
    return select_runs(Store(store_path).runs())


def cli():
    group = click.Group()
    for command in COMMANDS:
        group.add_command(command)
    return group


def invoke(*args):
    return CliRunner().invoke(cli(), [str(a) for a in args])


# ---- statistics ------------------------------------------------------------------------------------------

def test_median_iqr_hand_values():
    assert stats.median_iqr([4, 1, 3, 2]) == (2.5, 1.75, 3.25)
    assert stats.median_iqr([0.56, 0.64, 0.60, 0.68]) == pytest.approx((0.62, 0.59, 0.65))
    assert stats.median_iqr([7, None, float("nan")]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        stats.median_iqr([])


def test_mcnemar_exact_and_chi2_against_scipy():
    exact = stats.mcnemar_from_counts(3, 9)  # 12 discordant pairs < 25: exact binomial
    assert exact.method == "exact binomial"
    assert exact.p_value == pytest.approx(2 * (1 + 12 + 66 + 220) / 4096)
    assert exact.p_value == pytest.approx(sps.binomtest(3, 12, 0.5).pvalue)
    chi = stats.mcnemar_from_counts(30, 10)
    assert chi.method.startswith("chi-square") and chi.statistic == pytest.approx(19 ** 2 / 40)
    assert chi.p_value == pytest.approx(sps.chi2.sf(9.025, 1))
    assert stats.mcnemar_from_counts(0, 0).p_value == 1.0
    a = [True] * 5 + [False] * 2 + [True] * 10
    b = [False] * 5 + [True] * 2 + [True] * 10
    res = stats.mcnemar(a, b)
    assert (res.a_only, res.b_only) == (5, 2)
    assert res.p_value == pytest.approx(sps.binomtest(5, 7, 0.5).pvalue)


def test_bootstrap_ci_contains_mean_and_is_seeded():
    vals = [0.52, 0.6, 0.64, 0.7, 0.71, 0.8, 0.9]
    est = stats.bootstrap_mean_ci(vals)
    assert est.value == pytest.approx(np.mean(vals))
    assert est.lo < est.value < est.hi
    assert stats.bootstrap_mean_ci(vals) == est
    assert stats.bootstrap_mean_ci(vals, seed=1) != est
    assert stats.bootstrap_mean_ci([0.5]) == (0.5, 0.5, 0.5)


def test_paired_bootstrap_and_binomial_se():
    rng = np.random.default_rng(3)
    a, b = rng.random(200) < 0.7, rng.random(200) < 0.5
    est = stats.paired_bootstrap_diff(a, b)
    assert est.value == pytest.approx(a.mean() - b.mean())
    assert est.lo < est.value < est.hi and est == stats.paired_bootstrap_diff(a, b)
    assert stats.paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        stats.paired_bootstrap_diff([True], [True, False])
    assert stats.binomial_se(0.5, 100) == pytest.approx(0.05)


# ---- formatting and tables -------------------------------------------------------------------------------

def test_formatting_helpers():
    assert fmt_flops(1.1e12) == "1.1e12" and fmt_flops(123) == "1.2e2" and fmt_flops(0) == "0"
    assert fmt_flops(None) == "n/a"
    assert fmt_bytes(4_200_000) == "4.2 MB" and fmt_bytes(999) == "999 B" and fmt_bytes(999_960) == "1.0 MB"
    assert fmt_bytes(1_300_000_000) == "1.3 GB"
    assert fmt_acc(0.724) == "72.4" and fmt_acc(1.0) == "100.0"
    assert fmt_params(460_800) == "460.8K" and fmt_params(1_200_000) == "1.2M" and fmt_params(512) == "512"
    assert latex_escape("a_b 5% & {x}") == r"a\_b 5\% \& \{x\}"


def rows_of(table):
    return {row[:3] if table.columns[0] == "Task" else row[:2]: row for row in table.rows}


def test_summary_table_numbers(runs):
    table = summary_table(runs)
    rows = rows_of(table)
    assert [r[1] for r in table.rows] == ["icl", "zeroshot", "ia3", "lora"]  # in-context first, then a-z
    assert rows[("m", "ia3")] == ("m", "ia3", "1.2e11", "5.0e14", "120.0 kB", "58.0", "64.0", "2", "8")
    assert rows[("m", "lora")] == ("m", "lora", "1.0e11", "1.0e15", "4.2 MB", "66.0", "66.0", "2", "8")
    assert rows[("m", "icl")][2:5] == ("1.0e12", "0", "16.0 kB")
    assert rows[("m", "zeroshot")][3:5] == ("n/a", "n/a")
    assert rows[("m", "zeroshot")][-1] == "4"
    assert all(r[0] == "m" for r in table.rows)  # failed and random-init runs left out


def test_include_random_and_failed(store_path):
    every = Store(store_path).runs()
    assert len(select_runs(every)) == 28
    with_random = select_runs(every, include_random=True)
    assert len(with_random) == 29 and set(with_random["model"]) == {"m", "random:m"}


def test_task_and_cost_tables(runs):
    rows = rows_of(task_table(runs))
    row = rows[("rte", "m", "lora")]
    assert row[3:5] == ("62.0", "[59.0, 65.0]") and row[5].startswith("62.0 [") and row[6] == "4"
    assert rows[("cb", "m", "ia3")][3] == "76.0"
    assert rows[("rte", "m", "zeroshot")][6] == "2"
    cost = rows_of(cost_table(runs))
    assert cost[("m", "lora")][2:7] == ("460.8K", "0.341%", "2.0 GB", "60.0 s", "3.0 s")
    assert cost[("m", "icl")][5] == "0.00 s" and cost[("m", "zeroshot")][5] == "n/a"


def test_k_variants_are_not_pooled(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    write_run(store, "lora", "rte", "t0", 0, 10)
    write_run(store, "lora", "rte", "t0", 0, 20, preset="paper")
    labels = [r[1] for r in summary_table(select_runs(store.runs())).rows]
    assert labels == ["lora preset=paper", "lora preset=quick"]


def check_latex(tex: str) -> None:
    """Balanced braces, matched begin/end, and booktabs rules around every tabular with consistent columns."""
    depth = 0
    for ch in re.sub(r"\\[{}%&_#$]", "", tex):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    stack = []
    for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", tex):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack and stack.pop() == env
    assert not stack
    tabulars = re.findall(r"\\begin\{tabular\}\{(\w+)\}(.*?)\\end\{tabular\}", tex, re.S)
    assert tabulars
    for spec, body in tabulars:
        assert body.count(r"\toprule") == body.count(r"\midrule") == body.count(r"\bottomrule") == 1
        assert body.index(r"\toprule") < body.index(r"\midrule") < body.index(r"\bottomrule")
        for line in body.splitlines():
            if line.endswith(r"\\") and "multicolumn" not in line:
                assert len(re.split(r"(?<!\\)&", line)) == len(spec), line
    text = "\n".join(line for line in tex.splitlines() if "includegraphics" not in line)
    assert re.search(r"(?<!\\)[_%]", text) is None  # underscores and percent signs escaped


def squeeze(markdown: str) -> str:
    """Markdown with the padding of table cells collapsed to one space (tabulate pads cells to column width)."""
    return re.sub(r" {2,}", " ", markdown)


def test_latex_and_markdown_rendering(runs):
    table = summary_table(runs)
    tex = to_latex(table)
    check_latex(tex)
    md = to_markdown(table)
    assert "\\_" not in md and "| m | lora |" in squeeze(md)
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len({len(line) for line in rows}) == 1  # columns padded to one width
    assert rows[1].startswith("|:---") and rows[1].endswith("---:|")  # text left, numbers right


def test_empty_table_keeps_its_columns():
    table = Table("Nothing", ("Model", "n_x"), (), "lr", ("A note.",))
    md = to_markdown(table)
    assert md.splitlines()[2:] == ["| Model   |   n_x |", "|:--------|------:|", "", "_(no rows)_", "", "A note."]
    tex = to_latex(table)
    check_latex(tex)
    assert r"\begin{tabular}{lr}" in tex and r"\multicolumn{2}{l}{(no rows)} \\" in tex
    assert to_text(table) == "Model  n_x\n-----  ---\nA note.\n"


# ---- report command, plots ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report_dirs(store_path, tmp_path_factory):
    outs = [tmp_path_factory.mktemp(f"report{i}") for i in range(2)]
    results = [invoke("report", "--store", store_path, "--out", out) for out in outs]
    return outs, results


def test_report_writes_files_byte_identical(report_dirs):
    (out1, out2), (res1, res2) = report_dirs
    assert res1.exit_code == 0, res1.output
    assert str(out1 / "report.md") in res1.output and str(out1 / "report.tex") in res1.output
    names = sorted(p.relative_to(out1).as_posix() for p in out1.rglob("*") if p.is_file())
    for name in ("report.md", "report.tex", "plots/accuracy_vs_flops.png", "plots/break_even.pdf",
                 "plots/icl_accuracy_vs_k.png", "plots/accuracy_vs_checkpoint.pdf"):
        assert name in names
    for name in names:
        assert (out1 / name).stat().st_size > 0
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes(), name
    md = (out1 / "report.md").read_text()
    assert "| m | lora | 1.0e11 | 1.0e15 | 4.2 MB | 66.0 | 66.0 | 2 | 8 |" in squeeze(md)
    assert "break_even" in md and "Finished runs: 28" in md and "| m | lora | icl |" in squeeze(md) and "1,111" in md
    check_latex((out1 / "report.tex").read_text())


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_report_tex_compiles(report_dirs):
    out = report_dirs[0][0]
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"], cwd=out,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_report_formats_and_no_plots(store_path, tmp_path):
    res = invoke("report", "--store", store_path, "--out", tmp_path, "--format", "latex", "--no-plots")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.tex").exists() and not (tmp_path / "report.md").exists()
    assert not (tmp_path / "plots").exists()
    check_latex((tmp_path / "report.tex").read_text())


def test_plots_skip_without_icl(tmp_path):
    store = build_store(tmp_path / "s.sqlite", methods=("lora",), extras=False)
    results = {p.name: p for p in make_plots(select_runs(store.runs()), tmp_path / "plots")}
    assert results["accuracy_vs_flops"].paths and results["accuracy_vs_checkpoint"].paths
    assert not results["icl_accuracy_vs_k"].paths and "no ICL" in results["icl_accuracy_vs_k"].notes[0]
    assert not results["break_even"].paths and results["break_even"].notes
    assert results["accuracy_vs_params"].paths
    bare = select_runs(store.runs()).assign(infer_flops_per_example=None, checkpoint_bytes=None, trainable_params=None)
    assert all(not p.paths and p.notes for p in make_plots(bare, tmp_path / "bare"))


def test_break_even_hand_example():
    be = break_even(peft_train=1e15, peft_infer=1e11, icl_train=0, icl_infer=1e12)
    assert be.n == pytest.approx(1e15 / 9e11) and be.cheaper == "peft" and "1,111" in be.text
    assert break_even(1e15, 2e12, 0, 1e12) == (None, "icl", "no crossover: ICL cheaper at every n")
    assert break_even(0, 1e11, 0, 1e12).n is None and break_even(0, 1e11, 0, 1e12).cheaper == "peft"
    assert break_even(0, 2e12, 1e15, 1e12).n == pytest.approx(1e3)
    assert break_even(5, 5, 5, 5).cheaper == "equal"


def test_break_even_table(runs):
    rows = {row[1]: row for row in break_even_table(runs).rows}
    assert set(rows) == {"ia3", "lora"}  # zero-shot is not a comparison side
    assert rows["lora"][2:8] == ("icl", "cb, rte", "1.0e15", "1.0e11", "1.0e12", "1,111")
    assert rows["ia3"][7] == f"{5e14 / 8.8e11:,.0f}"


def test_break_even_compares_a_method_on_its_own_tasks(runs, tmp_path):
    """A method run on rte alone meets ICL's rte runs, not ICL's median over rte and cb (whose rows are 4x as
    long here): 1e15 / (1e12 - 1e11) queries, where the pooled ICL median would give 1e15 / (2.5e12 - 1e11)."""
    frame = runs.copy()
    icl_cb = (frame["method"] == "icl") & (frame["task"] == "cb")
    frame.loc[icl_cb, "infer_flops_per_example"] = 4e12
    frame = frame[~((frame["method"] == "lora") & (frame["task"] == "cb"))]
    rows = {row[1]: row for row in break_even_table(frame).rows}
    assert rows["lora"][3] == "rte" and rows["lora"][6] == "1.0e12"
    assert rows["lora"][7] == "1,111"
    assert rows["ia3"][3] == "cb, rte" and rows["ia3"][6] == "2.5e12"  # both tasks: ICL's median over both
    plots = {p.name: p for p in make_plots(frame, tmp_path / "plots")}
    assert plots["break_even"].paths  # ia3 against icl is drawn; lora is named in a note instead
    assert any("lora vs icl left out of the figure" in n for n in plots["break_even"].notes)
    frame = frame[~((frame["method"] == "icl") & (frame["task"] == "rte"))]
    table = break_even_table(frame)
    assert "lora" not in {row[1] for row in table.rows}
    assert any("lora and icl share no task" in n for n in table.notes)


def test_report_without_icl_and_only_random(tmp_path):
    store = build_store(tmp_path / "s.sqlite", methods=("lora",), extras=False)
    res = invoke("report", "--store", store.path, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "note: break_even: skipped" in res.output and not (tmp_path / "out/plots/break_even.png").exists()
    only_random = Store(tmp_path / "r.sqlite")
    write_run(only_random, "lora", "rte", "t0", 0, 3, model="random:m", is_random=True)
    res = invoke("report", "--store", only_random.path, "--out", tmp_path / "r")
    assert res.exit_code == 2 and "--include-random" in res.output
    res = invoke("report", "--store", only_random.path, "--out", tmp_path / "r", "--include-random")
    assert res.exit_code == 0, res.output


# ---- baselines -------------------------------------------------------------------------------------------

def test_tolerance_rule():
    assert checking.tolerance(0.7, 50) == pytest.approx(2 * np.sqrt(0.21 / 50))
    assert checking.tolerance(1.0, 50) == pytest.approx(1 / 50)  # floor: one example
    assert checking.tolerance(0.5, 100, z=0) == pytest.approx(0.01)


def test_check_pass_regression_missing_exact(tmp_path):
    path = tmp_path / "s.sqlite"
    store = build_store(path)
    write_run(store, "lora", "rte", "t0", 0, 35, n=50)  # 70% of 50
    base = json.loads(checking.baseline_json(store.runs(), lambda rid: store.examples([rid])))
    assert base["version"] == 2 and len(base["cells"]) == 28
    assert base["cells"] == sorted(base["cells"], key=checking.cell_key)
    ok = checking.check(store.runs(), base, examples_of=lambda rid: store.examples([rid]))
    assert ok.passed and {r.verdict for r in ok.rows} == {"ok"}
    # the accuracy rules alone (a baseline without log-probs, as version 1 was)
    base = {"version": 1, "cells": [{f: c[f] for f in checking.CELL_FIELDS_V1} for c in base["cells"]]}
    assert checking.check(store.runs(), base).passed

    write_run(store, "lora", "rte", "t0", 0, 34, n=50)  # one example less: within tolerance, not exact
    assert checking.check(store.runs(), base).passed
    exact = checking.check(store.runs(), base, exact=True)
    assert not exact.passed and [r.verdict for r in exact.rows if r.failed] == ["changed"]

    write_run(store, "lora", "rte", "t0", 0, 25, n=50)  # 20 points lower
    bad = checking.check(store.runs(), base)
    failed = [r for r in bad.rows if r.failed]
    assert not bad.passed and len(failed) == 1 and failed[0].verdict == "regressed"
    assert failed[0].delta == pytest.approx(-0.2) and "m/rte/lora/t0/0/quick" in failed[0].cell
    assert bad.notes and "make baseline" in bad.notes[0]

    fresh = tmp_path / "f.sqlite"
    build_store(fresh, methods=("icl", "lora", "ia3"))  # zeroshot cells missing
    write_run(Store(fresh), "lora", "rte", "t0", 0, 35, n=50)
    write_run(Store(fresh), "lora", "wic", "t0", 0, 12)  # a new cell
    res = checking.check(Store(fresh).runs(), base)
    assert not res.passed and res.counts() == {"missing": 4, "new": 1, "ok": 24}


def test_load_baseline_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(Exception, match="not valid JSON"):
        checking.load_baseline(bad)
    bad.write_text(json.dumps({"version": 3, "cells": []}))
    with pytest.raises(Exception, match="has version 3; this harness reads versions 1, 2"):
        checking.load_baseline(bad)
    bad.write_text(json.dumps({"version": 2, "cells": [{"model": "m"}]}))
    with pytest.raises(Exception, match="a cell lacks task"):
        checking.load_baseline(bad)
    bad.write_bytes(b"SQLite format 3\x00\xff\xfe")
    with pytest.raises(Exception, match="not valid JSON"):
        checking.load_baseline(bad)


# ---- CLI -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["report"], ["compare"], ["baseline"], ["baseline", "save"], ["check"]])
def test_help(args):
    res = invoke(*args, "--help")
    assert res.exit_code == 0 and "Usage" in res.output
    assert ("save" if args == ["baseline"] else "--store") in res.output


def test_compare_command(store_path):
    res = invoke("compare", "lora", "icl", "--store", store_path)
    assert res.exit_code == 0, res.output
    assert "pairs (examples): 200" in res.output and "paired cells (model/task/template/seed): 8" in res.output
    a = np.concatenate([np.arange(N) < c for c in CORRECT[("lora", "cb")] + CORRECT[("lora", "rte")]])
    b = np.concatenate([np.arange(N)[::-1] < c for c in CORRECT[("icl", "cb")] + CORRECT[("icl", "rte")]])
    assert f"accuracy lora: {fmt_acc(a.mean())}" in res.output and f"accuracy icl: {fmt_acc(b.mean())}" in res.output
    assert f"{100 * (a.mean() - b.mean()):+.1f} points" in res.output
    mc = stats.mcnemar(a, b)
    assert f"p = {mc.p_value:.3g} ({mc.method})" in res.output
    one = invoke("compare", "lora", "ia3", "--task", "rte", "--metric", "accuracy_norm", "--store", store_path)
    assert one.exit_code == 0 and "pairs (examples): 100" in one.output
    unknown = invoke("compare", "lora", "prompt", "--store", store_path)
    assert unknown.exit_code == 2 and "no finished runs of method 'prompt'" in unknown.output


def test_tables_name_their_metric(runs):
    from harness.report.tables import METRICS

    assert METRICS == ("accuracy", "accuracy_norm", "accuracy_norm_char") == checking.ACCURACY_FIELDS
    for metric in METRICS:
        for table in (summary_table(runs, metric), task_table(runs, metric, n_resamples=50)):
            assert f"(metric: {metric})" in table.title and any(c.startswith(metric) for c in table.columns)
            assert table.notes[0].startswith(f"Metric: {metric}: ")
    assert "lm-evaluation-harness acc_norm" in summary_table(runs, "accuracy_norm_char").notes[0]
    lacking = summary_table(runs.assign(accuracy_norm_char=runs["accuracy_norm_char"].mask(runs.index < 3)),
                            "accuracy_norm_char")
    assert f"3 of {len(runs)} runs have no accuracy_norm_char" in lacking.notes[1]


def test_compare_per_character_and_schema_1_runs(store_path, tmp_path):
    one = invoke("compare", "lora", "ia3", "--metric", "accuracy_norm_char", "--store", store_path)
    assert one.exit_code == 0 and "accuracy_norm_char lora:" in one.output
    old = tmp_path / "v1.sqlite"
    shutil.copyfile(Path(__file__).parent / "fixtures" / "store_v1.sqlite", old)
    Store(old)  # migrated: its runs have no per-character predictions
    import sqlite3

    db = sqlite3.connect(old)
    db.execute("UPDATE runs SET task='cb' WHERE method='lora'")  # pair the fixture's icl and lora runs
    db.commit()
    db.close()
    assert invoke("compare", "icl", "lora", "--store", old).exit_code == 0
    res = invoke("compare", "icl", "lora", "--metric", "accuracy_norm_char", "--store", old)
    assert res.exit_code == 2 and "schema-1 store" in res.output and "re-run it" in res.output


def test_baseline_and_check_commands(tmp_path):
    path = tmp_path / "s.sqlite"
    store = build_store(path)
    base = tmp_path / "baselines" / "b.json"
    res = invoke("baseline", "save", base, "--store", path)
    assert res.exit_code == 0 and "wrote 28 cells" in res.output
    first = base.read_bytes()
    invoke("baseline", "save", base, "--store", path)
    assert base.read_bytes() == first
    ok = invoke("check", "--baseline", base, "--store", path)
    assert ok.exit_code == 0 and "PASS" in ok.output and "m/rte/lora/t0/0/quick k=0" in ok.output
    write_run(store, "lora", "rte", "t0", 0, 5)  # 56% -> 20%
    bad = invoke("check", "--baseline", base, "--store", path)
    assert bad.exit_code == 1 and "REGRESSED" in bad.output and "FAIL" in bad.output
    assert "LOGPROBS CHANGED" in bad.output  # the planted run's log-probs moved too
    assert invoke("check", "--baseline", base, "--store", path, "--z", "100").exit_code == 1
    loose = invoke("check", "--baseline", base, "--store", path, "--z", "100", "--logprob-atol", "2")
    assert loose.exit_code == 0, loose.output


def test_missing_store_and_baseline_are_user_errors(tmp_path):
    missing = tmp_path / "nope.sqlite"
    for args in (["report", "--out", tmp_path / "r"], ["compare", "a", "b"], ["baseline", "save", tmp_path / "b.json"],
                 ["check", "--baseline", tmp_path / "b.json"]):
        res = invoke(*args, "--store", missing)
        assert res.exit_code == 2 and ("no results store" in res.output or "no baseline file" in res.output)
    assert not missing.exists()


def test_family_table_groups_by_the_registry_and_unknown_methods_are_other(tmp_path):
    from harness.report.families import family_table, method_family

    assert method_family("lora") == "reparametrization" and method_family("fishmask") == "selective"
    assert method_family("icl") == "in-context" and method_family("no_such_method") == "other"
    store = build_store(tmp_path / "s.sqlite", methods=("lora",), extras=False)
    runs = select_runs(store.runs())
    table = family_table(runs)
    assert table.columns[:3] == ("Family", "Model", "Method")
    assert {r[0] for r in table.rows} <= {"in-context", "reparametrization"}
    lora = next(r for r in table.rows if r[2] == "lora")
    assert lora[0] == "reparametrization" and lora[5] == "yes"
    renamed = runs.assign(method=["mystery" if m == "lora" else m for m in runs["method"]])
    assert any(r[0] == "other" and r[2] == "mystery" and r[5] == "n/a" for r in family_table(renamed).rows)


def test_scatter_with_two_models_gives_a_method_one_colour_and_a_model_one_marker():
    """Two models in one figure: the same method has the same colour for both, each model its own marker, and the
    legend sits beside the axes (it covered points)."""
    from types import SimpleNamespace

    from harness.report.canvas import new_figure
    from harness.report.plots import _scatter

    iqr = SimpleNamespace(median=50.0, q25=45.0, q75=55.0)
    points = [(SimpleNamespace(model=model, label=method), x, iqr)
              for model, x0 in (("a", 1e10), ("b", 2e10)) for method, x in (("icl", x0), ("ia3", 1.5 * x0))]
    fig, (ax,) = new_figure("t")
    _scatter(ax, points, n_models=2)
    bars = list(ax.containers)  # one ErrorbarContainer per point, in order
    colour = [c.lines[0].get_color() for c in bars]
    marker = [c.lines[0].get_marker() for c in bars]
    assert colour[0] == colour[2] and colour[1] == colour[3] and colour[0] != colour[1]  # per method
    assert marker[0] == marker[1] and marker[2] == marker[3] and marker[0] != marker[2]  # per model
    assert ax.get_legend()._loc == 6  # "center left", anchored outside the axes (bbox_to_anchor x > 1)


def test_pooled_tables_name_methods_that_ran_fewer_tasks(runs):
    """A median pooled over tasks is only comparable between methods that ran the same tasks: the summary and
    family tables say which ran which when they differ, and say nothing when every method ran every task."""
    from harness.report.families import family_table

    assert not any("ran different tasks" in n for n in summary_table(runs).notes)
    fewer = runs[~((runs["method"] == "lora") & (runs["task"] == "cb"))]
    for table in (summary_table(fewer), family_table(fewer)):
        notes = [n for n in table.notes if "ran different tasks" in n]
        assert notes == ["m: its methods ran different tasks (cb, rte: icl, zeroshot, ia3; rte: lora); medians "
                         "pooled over tasks compare only methods that ran the same tasks: compare the others per "
                         "task."], table.notes
