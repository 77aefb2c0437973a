"""Click commands of the report: ``report``, ``compare``, ``baseline save`` and ``check``.

The lead adds them to the main group (``for c in harness.report.COMMANDS: main.add_command(c)``). Read commands
never create a store: a missing store file is an error. User errors exit 2 with one line on stderr; ``check``
exits 1 when a baseline cell regressed or is missing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from harness.errors import HarnessError
from harness.report import check as checking
from harness.report import stats
from harness.report.format import fmt_acc, to_text
from harness.store import DEFAULT_STORE, Store

METRICS = checking.ACCURACY_FIELDS  # the --metric choices: tables.METRICS, without importing pandas at start-up


class UserError(click.ClickException):
    """A user error: one line on stderr, exit status 2."""

    exit_code = 2


@contextlib.contextmanager
def user_errors():
    """Turn :class:`HarnessError` into :class:`UserError` so the commands behave the same in any group."""
    try:
        yield
    except HarnessError as exc:
        raise UserError(str(exc)) from exc


def open_store(path: str | Path) -> Store:
    """Open an existing store (migrating an older schema); never create one. A newer schema is a user error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no results store at {path}: run some experiments first or pass --store PATH")
    with user_errors():
        return Store(path)


def store_option(f):
    return click.option("--store", "store_path", type=click.Path(dir_okay=False, path_type=Path),
                        default=DEFAULT_STORE, show_default=True, help="Results store (SQLite file) to read.")(f)


@click.command()
@click.option("--format", "fmt", type=click.Choice(["md", "latex", "both"]), default="both", show_default=True,
              help="Which report files to write.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True, help="Folder for report.md, report.tex and plots/.")
@store_option
@click.option("--metric", type=click.Choice(METRICS), default="accuracy", show_default=True,
              help="accuracy (summed log-prob), accuracy_norm (per token, T-Few) or accuracy_norm_char (per "
                   "character, lm-eval acc_norm); docs/metrics.md.")
@click.option("--include-random", is_flag=True, help="Include runs of random-init models (speed runs).")
@click.option("--no-plots", is_flag=True, help="Write the tables only.")
@click.option("--tasks", "task_names", default=None, help="Only these tasks: comma-separated names or task YAML paths.")
def report(fmt, out_dir, store_path, metric, include_random, no_plots, task_names):
    """Write the results report: T-Few style tables (Markdown and/or LaTeX) and figures (PNG and PDF).

    Of runs that repeat one experiment with changed inputs (task file, data, weights, scoring code), only the
    latest is reported."""
    from harness.report.document import render_latex, render_markdown
    from harness.report.tables import select_runs
    from harness.results import runs as runs_frame

    from harness.mixed.records import mixed_rows

    store = open_store(store_path)
    every = runs_frame(store)
    mixed = mixed_rows(store)  # harness mixed (issue 16): the section "Mixed-task batches" when there are rows
    runs = select_runs(every, include_random=include_random, tasks=_task_names(task_names))
    if runs.empty:
        raise UserError(f"no finished runs in {store_path}" + ("" if include_random else
                        " (random-init runs are left out; add --include-random to count them)"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots = None
    if not no_plots:
        from harness.report.plots import make_plots

        plots = make_plots(runs, out_dir / "plots", metric)
        for p in plots:
            written += p.paths
            if not p.paths:  # remove figures of an earlier report that this store can no longer support
                for ext in ("png", "pdf"):
                    (out_dir / "plots" / f"{p.name}.{ext}").unlink(missing_ok=True)
            for note in p.notes:
                click.echo(f"note: {p.name}: {note}", err=True)
    n_excluded = len(every) - len(runs)
    if fmt in ("md", "both"):
        path = out_dir / "report.md"
        path.write_text(render_markdown(runs, n_excluded, plots, out_dir, metric, mixed))
        written.insert(0, path)
    if fmt in ("latex", "both"):
        path = out_dir / "report.tex"
        path.write_text(render_latex(runs, n_excluded, plots, out_dir, metric, mixed))
        written.insert(1 if fmt == "both" else 0, path)
    for path in written:
        click.echo(str(path))


def _task_names(text: str | None) -> list[str] | None:
    """Task names from ``--tasks`` (names or YAML paths; a path is read for its ``name``)."""
    if not text:
        return None
    from harness.tasks import load_task

    with user_errors():
        return [load_task(item.strip()).name if item.strip().endswith((".yaml", ".yml")) else item.strip()
                for item in text.split(",") if item.strip()]


CELL = ["model", "task", "template", "seed"]  # compare pairs runs on these, and examples on their ids too
PREDICTION_FIELDS = {"accuracy": "prediction", "accuracy_norm": "prediction_norm",
                     "accuracy_norm_char": "prediction_norm_char"}


def _runs_by_cell(runs, method: str, k: int | None, train: dict):
    """The runs of ``method`` (with ``k`` and the ``train`` settings when given): one per cell, else a user error
    naming a shared cell and what tells its runs apart (k, preset, training settings)."""
    from harness.report.train_variants import select_train, train_variants

    rs = select_train(runs[runs["method"] == method], train)
    if k is not None:
        rs = rs[rs["k"] == k]
    for cell, same in rs.groupby(CELL, sort=True, dropna=False):
        if len(same) > 1:
            settings = train_variants(same)[0]
            variants = sorted({f"k={r.k} preset={r.preset}" + ("" if s is None else f" {s}")
                               for r, s in zip(same.itertuples(), settings)})
            raise UserError(f"method {method!r} has several runs for {'/'.join(map(str, cell))} "
                            f"({'; '.join(variants)}); narrow with --k-a/--k-b, --preset or --train-a/--train-b")
    return rs


def _correct(examples, runs, metric: str):
    """The examples of ``runs`` with ``correct`` by ``metric`` and ``occurrence`` (pairs duplicated ids in order)."""
    field = PREDICTION_FIELDS[metric]
    ex = examples[examples["run_id"].isin(runs["run_id"])].copy()
    lacking = runs[runs["run_id"].isin(ex.loc[ex[field].isna(), "run_id"])]
    if len(lacking):
        run = lacking.iloc[0]
        raise UserError(f"run {run['run_id']} ({run['task']}/{run['method']}/{run['template']}) has no {metric}: it "
                        "comes from a schema-1 store, whose character counts include the target delimiter; re-run "
                        "it into a new store, or compare another --metric")
    ex["occurrence"] = ex.groupby(["run_id", "example_id"]).cumcount()
    ex["correct"] = (ex[field] == ex["label"]).astype(bool)
    return ex[[*CELL, "example_id", "occurrence", "correct"]]


@click.command()
@click.argument("method_a")
@click.argument("method_b")
@click.option("--task", default=None, help="Only this task (default: all tasks).")
@click.option("--metric", type=click.Choice(METRICS), default="accuracy", show_default=True,
              help="Correctness by the raw (accuracy), per-token (accuracy_norm) or per-character "
                   "(accuracy_norm_char) prediction.")
@click.option("--k-a", type=int, default=None, help="Only runs of METHOD_A with this k.")
@click.option("--k-b", type=int, default=None, help="Only runs of METHOD_B with this k.")
@click.option("--preset", default=None, help="Only runs of this preset.")
@click.option("--variant-a", default=None,
              help="ICL demonstration variant of METHOD_A's runs, e.g. order=2, label_noise=0.5 or random, "
                   "demos=balanced (comma-separated; default: T-Few demonstrations, original order, gold labels).")
@click.option("--variant-b", default=None, help="The same for METHOD_B (e.g. icl icl --variant-b label_noise=1.0).")
@click.option("--train-a", default=None,
              help="Only runs of METHOD_A with these training settings, e.g. scale_parameter=false or "
                   "lr=0.0003,steps=150 (--method-args syntax; a setting a run does not store is at the method's "
                   "default).")
@click.option("--train-b", default=None, help="The same for METHOD_B (e.g. adapter adapter --train-b "
                                              "scale_parameter=false).")
@store_option
def compare(method_a, method_b, task, metric, k_a, k_b, preset, variant_a, variant_b, train_a, train_b, store_path):
    """Compare two methods on the same examples: paired bootstrap CI and McNemar's test.

    Predictions are paired on (model, task, template, seed, example id). Each side holds the runs of one
    demonstration variant (--variant-a/-b) and training settings (--train-a/-b), so one method can be compared
    with itself under another variant or setting.
    """
    from harness.methods import parse_method_args
    from harness.report.variants import parse_variant, select_variant
    from harness.report.tables import select_runs
    from harness.results import examples, runs as runs_frame

    with user_errors():
        chosen_a, chosen_b = parse_variant(variant_a), parse_variant(variant_b)
        settings_a, settings_b = parse_method_args(train_a), parse_method_args(train_b)
    store = open_store(store_path)
    runs = select_runs(runs_frame(store))
    for column, value in (("task", task), ("preset", preset)):
        if value is not None:
            runs = runs[runs[column] == value]
    methods = sorted(runs["method"].dropna().unique())
    for m in (method_a, method_b):
        if m not in methods:
            raise UserError(f"no finished runs of method {m!r}" + (f" on task {task!r}" if task else "")
                            + f"; methods in the store: {', '.join(methods) or 'none'}")
    cells_a = _runs_by_cell(select_variant(runs, chosen_a), method_a, k_a, settings_a)
    cells_b = _runs_by_cell(select_variant(runs, chosen_b), method_b, k_b, settings_b)
    for m, side, wanted in ((method_a, cells_a, train_a), (method_b, cells_b, train_b)):
        if wanted and side.empty:
            raise UserError(f"no finished runs of method {m!r} with training settings {wanted}")
    common = cells_a[CELL].merge(cells_b[CELL])
    if common.empty:
        raise UserError(f"{method_a!r} and {method_b!r} share no (model, task, template, seed) cell")
    cells_a, cells_b = cells_a.merge(common), cells_b.merge(common)
    rows = examples(store, [*cells_a["run_id"], *cells_b["run_id"]])
    pairs = _correct(rows, cells_a, metric).merge(_correct(rows, cells_b, metric),
                                                  on=[*CELL, "example_id", "occurrence"], suffixes=("_a", "_b"))
    a, b = pairs["correct_a"].to_numpy(), pairs["correct_b"].to_numpy()
    if not len(a):
        raise UserError(f"{method_a!r} and {method_b!r} share no evaluated example")
    if variant_a or variant_b or train_a or train_b:  # name the variants in the output
        method_a, method_b = (f"{m} [{', '.join(x for x in (v, t) if x) or 'default'}]"
                              for m, v, t in ((method_a, variant_a, train_a), (method_b, variant_b, train_b)))
    diff = stats.paired_bootstrap_diff(a, b)
    test = stats.mcnemar(a, b)
    click.echo(f"{method_a} vs {method_b}: {metric}" + (f" on {task}" if task else " on all tasks"))
    click.echo(f"paired cells (model/task/template/seed): {len(common)}")
    click.echo(f"pairs (examples): {len(a)}")
    click.echo(f"{metric} {method_a}: {fmt_acc(sum(a) / len(a))}")
    click.echo(f"{metric} {method_b}: {fmt_acc(sum(b) / len(b))}")
    click.echo(f"difference ({method_a} - {method_b}): {100 * diff.value:+.1f} points, 95% CI "
               f"[{100 * diff.lo:+.1f}, {100 * diff.hi:+.1f}] (paired bootstrap, {stats.DEFAULT_RESAMPLES} "
               f"resamples, seed {stats.DEFAULT_SEED})")
    click.echo(f"McNemar: {method_a} only right {test.a_only}, {method_b} only right {test.b_only}, "
               f"p = {test.p_value:.3g} ({test.method})")


@click.group()
def baseline():
    """Save baselines (accuracies, FLOPs, per-example log-probs) for `check`."""


def _examples_of(store: Store):
    return lambda run_id: store.examples([run_id])


@baseline.command("save")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@store_option
def baseline_save(path, store_path):
    """Write every finished run of the store to the baseline file PATH (JSON): per cell its accuracies, FLOPs and
    per-example, per-choice log-probs (rounded to 6 decimals), and this machine's float platform (CPU, torch's CPU
    kernels, torch, threads): save it on the machine that ran the store."""
    store = open_store(store_path)
    with user_errors():
        from harness.environment import float_platform

        n = checking.save_baseline(store.runs(status="finished"), path, _examples_of(store), float_platform())
    if n == 0:
        click.echo(f"warning: {store_path} has no finished runs with an accuracy; the baseline is empty", err=True)
    click.echo(f"wrote {n} cells to {path}")


@click.command()
@click.option("--baseline", "baseline_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Baseline file written by `baseline save`.")
@store_option
@click.option("--z", type=float, default=2.0, show_default=True,
              help="Tolerance in binomial standard errors of the baseline accuracy (at least one example).")
@click.option("--exact", is_flag=True, help="Fail on any accuracy difference.")
@click.option("--logprob-atol", type=float, default=checking.DEFAULT_LOGPROB_ATOL, show_default=True,
              help="Largest absolute difference allowed between a stored and a baseline log-prob (per example and "
                   "choice).")
@click.option("--flops-rtol", type=float, default=checking.DEFAULT_FLOPS_RTOL, show_default=True,
              help="Largest relative difference allowed in inference FLOPs per example and training FLOPs.")
@click.option("--cross-platform-atol", type=float, default=checking.DEFAULT_CROSS_PLATFORM_ATOL, show_default=True,
              help="The log-prob tolerance of trained cells when the baseline was saved on another CPU platform "
                   "(training amplifies GEMM rounding that differs across CPUs).")
@click.pass_context
def check(ctx, baseline_path, store_path, z, exact, logprob_atol, flops_rtol, cross_platform_atol):
    """Check the store against a baseline: exit 1 when a cell changed, regressed or is missing, else 0.

    Per cell (model, task, method, template, seed, preset, k): every example's per-choice log-prob within
    --logprob-atol of the baseline; FLOPs within --flops-rtol; accuracy, accuracy_norm and accuracy_norm_char not
    below the baseline by more than max(z * sqrt(p (1 - p) / n), 1 / n), p and n being the baseline's value and
    number of examples (--exact: equal). A version-1 baseline has accuracies only. Where the baseline was saved on
    another CPU platform, trained cells' log-probs are compared within --cross-platform-atol (a note says so).
    """
    with user_errors():
        data = checking.load_baseline(baseline_path)
        store = open_store(store_path)
        from harness.environment import float_platform

        result = checking.check(store.runs(status="finished"), data, z=z, exact=exact,
                                examples_of=_examples_of(store), logprob_atol=logprob_atol, flops_rtol=flops_rtol,
                                platform=float_platform(), cross_platform_atol=cross_platform_atol)
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)
    click.echo(to_text(checking.check_table(result)), nl=False)
    ctx.exit(0 if result.passed else 1)
