"""Command line: parse options, check names before any model loads, call :mod:`harness.api`, print.

Every user error is one line on stderr and exit code 2; nothing already stored is touched by a failed command.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from harness.errors import HarnessError
from harness.spec import parse_int_list, parse_name_list
from harness.store import DEFAULT_STORE, Store


class HarnessGroup(click.Group):
    """Turns :class:`HarnessError` into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HarnessError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=HarnessGroup)
@click.version_option(package_name="harness")
@click.option("-v", "--verbose", is_flag=True, help="Log more (debug level).")
def main(verbose: bool):
    """harness: when does PEFT beat k-shot in-context learning, and what does each cost?"""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)


def _existing_store(path: str) -> Store:
    if not Path(path).exists():
        raise HarnessError(f"no results store at {path}; run `harness run ...` first or pass --store PATH")
    return Store(path)


@main.command()
@click.option("--methods", default="icl,zeroshot", show_default=True, help="Comma-separated methods (see `harness methods`).")
@click.option("--tasks", default="rte,cb,copa,wic,wsc", show_default=True, help="Comma-separated tasks or task YAML paths.")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Embedded name (smollm2-135m, gemma3-270m), Hub id, local folder, .gguf file or random:NAME.")
@click.option("--k", "k", default="32", show_default=True,
              help="Demonstrations for ICL (reduced to fit the context); several, comma-separated (e.g. "
                   "0,1,2,4,8,16,32), make a k-curve: one run per k, the demonstrations' KV cache encoded once.")
@click.option("--seeds", default=None, help="Data seeds, comma-separated [default: 0,1,32,42,1024; quick preset: 0].")
@click.option("--templates", default="all", show_default=True, help="Template names (comma-separated) or `all`.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N validation examples.")
@click.option("--preset", default="paper", show_default=True, help="paper (T-Few settings) or quick (CPU smoke run).")
@click.option("--data-dir", envvar="HARNESS_DATA_DIR", default=None,
              help="Local data folder (<task>/train.jsonl ...), or 'hub' for the Hugging Face Hub; default: the data "
                   "shipped with harness (rte, cb, copa, wic, wsc). Env: HARNESS_DATA_DIR.")
@click.option("--store", default=str(DEFAULT_STORE), show_default=True, help="SQLite results store.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32 or bfloat16.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Evaluation batch size (queries per batch).")
@click.option("--calibrate", is_flag=True,
              help="In-context runs: also store accuracy_calibrated (contextual calibration, Zhao et al. 2021) and "
                   "accuracy_mutual_info (lm-eval's acc_mutual_info), their extra FLOPs counted apart.")
@click.option("--demos", "demos", default="tfew", show_default=True,
              help="ICL demonstrations: tfew (the seed's T-Few few-shot subset) or balanced (class-balanced, seeded, "
                   "from the train split); both, comma-separated, plan each.")
@click.option("--orders", default="1", show_default=True,
              help="ICL: N orders of the same demonstrations per (task, template, seed): the original and N-1 "
                   "seeded permutations (at most k!), each its own run.")
@click.option("--label-noise", default=None,
              help="ICL: label-noise levels, comma-separated: a fraction p in [0, 1] of the demonstrations gets a "
                   "random other label (1.0: all wrong), 'random': uniformly random labels (Min et al. 2022); "
                   "e.g. 0,0.5,1.0,random [default: gold labels].")
@click.option("--no-kv-cache", is_flag=True, help="Score the full prompt for every query x choice (the naive path).")
@click.option("--method-args", default=None, help="key=value,... for the PEFT methods (e.g. r=16,alpha=32).")
@click.option("--steps", type=int, default=None, help="Training steps (PEFT; default from the preset).")
@click.option("--train-batch-size", type=int, default=None, help="Training batch size (PEFT; default from the preset).")
@click.option("--grad-accum", type=int, default=None, help="Gradient accumulation steps (PEFT).")
@click.option("--lr", type=float, default=None, help="Learning rate (PEFT; default per method).")
@click.option("--losses", default=None, help="Training losses, comma-separated from lm,ul,ln (PEFT).")
@click.option("--n-train", type=int, default=None, help="Training examples when no few-shot file exists (PEFT).")
@click.option("--train-template", default=None, help="Fix the training template (default: random per example, as T-Few).")
@click.option("--compile", "compile_", type=click.Choice(["auto", "on", "model", "graphs", "off"]), default="auto",
              show_default=True, help="PEFT training forwards: auto/off eager, on = torch.compile each transformer "
              "block, model = the whole model (slow to compile), graphs = the blocks under CUDA graphs "
              "(experimental: refused for GPU training, where it crashed; on the CPU as on).")
@click.option("--workers", default=None, type=int,
              help="Local executor: PEFT trainings run at once, one process each (several small-model trainings "
                   "share a GPU) [default: 1]. Ray without --ray-address: runs at once on the local Ray instance "
                   "[default: one per CPU].")
@click.option("--pack", default="1", show_default=True, metavar="N",
              help="Local executor: train up to N PEFT groups of one method (ia3, tfew, lora; different seeds or "
                   "tasks) in one model at once, one forward and backward for all (same results; other methods "
                   "train alone). Combines with --workers.")
@click.option("--executor", "executor_kind", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine (--workers); ray: every training group and in-context batch is a Ray task "
                   "(pip install 'harness[ray]').")
@click.option("--ray-address", default=None,
              help="Ray: a running cluster (auto, or HOST:PORT of its head); default: start a local Ray instance.")
@click.option("--gpus-per-run", type=float, default=None,
              help="Ray: GPUs each task (a training group or an in-context batch) asks for, e.g. 0.25 packs four "
                   "small trainings per GPU [default: 1 for CUDA runs].")
@click.option("--cpus-per-run", type=float, default=None,
              help="Ray: CPUs (and torch threads) each task asks for [default: 1].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(methods, tasks, model, k, seeds, templates, limit, preset, data_dir, store, device, dtype, batch_size,
        calibrate, demos, orders, label_noise, no_kv_cache, method_args, steps, train_batch_size, grad_accum, lr, losses, n_train, train_template, compile_,
        workers, pack, executor_kind, ray_address, gpus_per_run, cpus_per_run, quiet):
    """Evaluate METHODS on TASKS for every template and seed; store one result per run.

    Finished runs already in the store are skipped, so an interrupted command resumes where it stopped.
    """
    from harness import api
    from harness.demos import parse_noise_list
    from harness.executors import make_executor
    from harness.methods import parse_method_args

    if batch_size < 1:
        raise HarnessError("--batch-size must be >= 1")
    executor = make_executor(executor_kind, workers=workers, ray_address=ray_address, gpus_per_run=gpus_per_run,
                             cpus_per_run=cpus_per_run, pack=_parse_pack(pack))
    overrides = {"steps": steps, "batch_size": train_batch_size, "grad_accum": grad_accum, "lr": lr,
                 "losses": parse_name_list(losses) if losses else None, "n_train": n_train,
                 "train_template": train_template}
    specs = api.plan(
        parse_name_list(tasks), parse_name_list(methods), templates=templates, seeds=parse_int_list(seeds, "--seeds") if seeds is not None else None,
        k=_parse_k(k), model=model, preset=preset, limit=limit, data_dir=data_dir, device=device, dtype=dtype,
        kv_cache=not no_kv_cache, calibrate=calibrate, demos=demos, orders=_parse_orders(orders),
        label_noise=parse_noise_list(label_noise), method_args=parse_method_args(method_args),
        train_overrides={k_: v for k_, v in overrides.items() if v is not None})
    results = api.run(specs, store=store, data_dir=data_dir, batch_size=batch_size, progress=not quiet,
                      compile=compile_, executor=executor)
    failed = [r for r in results if r.status != "finished"]
    click.echo(f"{len(specs)} run(s) planned, {len(results)} executed, {len(specs) - len(results)} already in "
               f"{store}, {len(failed)} failed.", err=True)
    for r in failed:
        click.echo(f"failed {r.run_id} {r.config['task']}/{r.config['method']}/{r.config['template']}/"
                   f"{r.config['seed']}: {r.error}", err=True)
    if results:
        from harness.results import frame, text_table

        click.echo(text_table(frame(_flat(r) for r in results)), nl=False)
    if failed:
        sys.exit(1)


def _parse_k(text: str) -> int | list[int]:
    """``--k``: one integer, or comma-separated integers (a k-curve)."""
    values = parse_int_list(text, "--k")
    if not values:
        raise HarnessError("--k must be an integer or comma-separated integers, e.g. 32 or 0,1,2,4,8,16,32")
    return values[0] if len(values) == 1 and "," not in str(text) else values


def _parse_pack(text: str) -> int:
    """``--pack``: one integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise HarnessError(f"--pack must be an integer >= 1, got {text!r}")
    return value


def _parse_orders(text: str) -> int:
    """``--orders``: one integer >= 1."""
    values = parse_int_list(text, "--orders")
    if len(values) != 1 or values[0] < 1:
        raise HarnessError(f"--orders must be one integer >= 1, got {text!r}")
    return values[0]


def _flat(result) -> dict:
    return {**result.config, **result.metrics, "run_id": result.run_id, "status": result.status}


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "parquet"]), default="table",
              show_default=True, help="parquet is binary: it needs --out (and pyarrow).")
@click.option("--store", default=str(DEFAULT_STORE), show_default=True, help="SQLite results store.")
@click.option("--status", default=None, help="Only runs with this status (finished, failed).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output file (default: stdout).")
def results(fmt, store, status, out):
    """List the runs in the store: a table, or the columns of harness.results.RESULT_FIELDS as csv, json or
    parquet (in Python, harness.results.runs(store) gives every column as a pandas DataFrame)."""
    from harness import results as tables

    text = tables.render(tables.runs(_existing_store(store), status=status), fmt, out)
    if text is not None:
        click.echo(text, nl=False)


@main.command()
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option("--store", default=str(DEFAULT_STORE), show_default=True, help="SQLite results store.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Output file (default: stdout).")
@click.option("--run", "run_ids", multiple=True, help="Only these run ids (repeatable).")
def export(fmt, store, out, run_ids):
    """Write per-example rows: run_id, example_id, label, prediction, prediction_norm, prediction_norm_char and
    per choice logprob, n_tokens and n_chars (characters without the target delimiter; docs/metrics.md)."""
    db = _existing_store(store)
    stream = open(out, "w") if out else sys.stdout
    try:
        for row in db.examples(run_ids or None):
            stream.write(json.dumps(row) + "\n")
    finally:
        if out:
            stream.close()


@main.command(name="tasks")
@click.option("--tasks", "names", default=None,
              help="Comma-separated task names or task YAML paths [default: every built-in task and every task in "
                   "the folders of HARNESS_TASKS_DIR].")
@click.option("--data-dir", envvar="HARNESS_DATA_DIR", default=None,
              help="Local data folder, or 'hub'; default: the data shipped with harness. Env: HARNESS_DATA_DIR.")
def tasks_command(names, data_dir):
    """List tasks with their templates, example counts and whether data was found."""
    from harness.data import data_status, resolve_data_dir
    from harness.tasks import list_tasks, load_task

    folder = resolve_data_dir(data_dir)
    for name in parse_name_list(names) if names else list_tasks():
        task = load_task(name)
        st = data_status(task, folder)
        counts = ", ".join(f"{k} {v}" for k, v in st.get("counts", {}).items()) or "-"
        where = {"local": "found", "hub": "Hub (online)", "missing": "MISSING"}.get(st["source"], st["source"])
        click.echo(f"{task.name}: {task.description}")
        click.echo(f"  file: {task.path}")
        click.echo(f"  templates: {', '.join(t.name for t in task.templates)}")
        click.echo(f"  data: {where}; {counts}; few-shot seeds: {st.get('few_shot_seeds') or '-'}")


@main.command(name="methods")
@click.option("--model", default=None, help="Count trainable parameters and FLOPs/token overhead on this model "
                                            "(loads it; default with --params: smollm2-135m).")
@click.option("--params", is_flag=True, help="Count trainable parameters and overhead on the default model.")
def methods_command(model, params):
    """List the methods: family, merges, mixed-task batches (with a model: trainable parameters, overhead)."""
    from harness.methods.describe import describe_methods

    loaded = None
    if model or params:
        from harness.models import DEFAULT_MODEL, load_model

        model = model or DEFAULT_MODEL
        loaded = load_model(model, "cpu", "float32").model
    click.echo(describe_methods(loaded, model))


@main.command(name="eval")
@click.option("--run", "run_id", required=True, help="Run id (or unique prefix) of a PEFT run with a saved adapter.")
@click.option("--store", default=str(DEFAULT_STORE), show_default=True, help="SQLite results store.")
@click.option("--data-dir", envvar="HARNESS_DATA_DIR", default=None,
              help="Local data folder, or 'hub'; default: the data shipped with harness. Env: HARNESS_DATA_DIR.")
@click.option("--batch-size", default=8, show_default=True, type=int)
def eval_command(run_id, store, data_dir, batch_size):
    """Re-score a saved adapter without training and compare with the stored scores."""
    from harness.peft_runner import eval_saved_command

    db = _existing_store(store)
    run_row = db.get_run(run_id)
    if run_row is None:
        raise HarnessError(f"no run {run_id!r} in {store}; see `harness results`")
    click.echo(eval_saved_command(db, run_row, data_dir, batch_size))


def _add_report_commands() -> None:
    try:
        from harness.report import COMMANDS
    except ImportError:  # pragma: no cover - reports are optional during development
        return
    for command in COMMANDS:
        main.add_command(command)


_add_report_commands()


def _add_mixed_command() -> None:
    from harness.mixed.command import mixed

    main.add_command(mixed)


_add_mixed_command()

if __name__ == "__main__":  # pragma: no cover
    main()
