"""``harness mixed``: the click command (registered on the main group by :mod:`harness.cli`); the work is
:func:`harness.mixed.api.run_mixed`."""

from __future__ import annotations

import sys

import click

from harness.errors import HarnessError
from harness.mixed.plan import MIXABLE_METHODS
from harness.spec import parse_name_list
from harness.store import DEFAULT_STORE

COLUMNS = ("method", "mode", "tasks", "examples/s", "latency median", "latency p90", "peak memory", "state",
           "FLOPs/example", "max |d log-prob|")


def format_rows(rows: list[dict]) -> str:
    """The terminal table of ``harness mixed``: one line per (method, mode)."""
    from tabulate import tabulate

    from harness.report.format import fmt_bytes, fmt_flops

    def ms(x):
        return "n/a" if x is None else f"{1000 * x:.1f} ms"

    cells = [(r["method"], r["mode"], r["n_tasks"], "n/a" if r["examples_per_second"] is None else
              f"{r['examples_per_second']:.2f}", ms(r["latency_median_s"]), ms(r["latency_p90_s"]),
              fmt_bytes(r["peak_memory_bytes"]), fmt_bytes(r["state_bytes"]), fmt_flops(r["flops_per_example"]),
              f"{r['max_abs_diff']:.2g}") for r in rows]
    return tabulate([COLUMNS, *cells], tablefmt="plain", stralign="left", disable_numparse=True) + "\n"


@click.command(name="mixed")
@click.option("--methods", default="lora,ia3,prompt_tuning,icl", show_default=True,
              help=f"Comma-separated methods to serve mixed; mixable: {', '.join(MIXABLE_METHODS)}.")
@click.option("--tasks", default="rte,cb", show_default=True,
              help="Comma-separated tasks whose finished runs (of every method) are in the store.")
@click.option("--store", default=str(DEFAULT_STORE), show_default=True, help="SQLite results store.")
@click.option("--seed", type=int, default=None, help="Serve the runs of this data seed [default: the lowest].")
@click.option("--template", default=None, help="Serve the runs of this template [default: the first by name].")
@click.option("--limit", type=int, default=None, help="Queries per task: the first N its run evaluated.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Queries per batch.")
@click.option("--device", default=None, help="cpu or cuda [default: the device the runs were made on].")
@click.option("--data-dir", envvar="HARNESS_DATA_DIR", default=None,
              help="Local data folder, or 'hub'; default: the data shipped with harness. Env: HARNESS_DATA_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def mixed(methods, tasks, store, seed, template, limit, batch_size, device, data_dir, quiet):
    """Serve the queries of finished runs in mixed-task batches (each row with its own task's adapter or
    demonstrations), task by task, and for LoRA/IA3 from merged weights; store throughput, batch latency, peak
    memory, FLOPs per example and the largest |log-prob| difference from the single-task runs (table
    mixed_runs, one row per method and mode).

    The adapters are those `harness run` saved beside the store. Exits 1 when a float32 mixed or task-by-task
    score differs from its single-task run by more than 1e-4.
    """
    from harness.mixed.api import run_mixed
    from harness.mixed.execute import failed_checks

    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HarnessError(f"unknown --device {device!r}; use cpu or cuda")
    rows = run_mixed(store, parse_name_list(methods), parse_name_list(tasks), seed=seed, template=template,
                     limit=limit, batch_size=batch_size, device=device, data_dir=data_dir, progress=not quiet)
    click.echo(format_rows(rows), nl=False)
    click.echo(f"{len(rows)} row(s) written to {store} (mixed_runs, id {rows[0]['mixed_id']}).", err=True)
    failed = failed_checks(rows)
    for line in failed:
        click.echo(f"check failed: {line}", err=True)
    if failed:
        sys.exit(1)
