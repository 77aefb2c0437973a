"""``--executor ray``: the real model's runs as Ray tasks on a local Ray instance give the serial run's numbers, a
killed worker's task is re-run without duplicate rows, a killed driver's grid resumes, and bad options stop the
command before any model loads.

The Ray tests share one local instance (``ray.init(num_cpus=2)``, this machine's cores) and are skipped when Ray
is not installed (``pip install 'harness[ray]'``); the option checks run without Ray."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.errors import HarnessError
from harness.executors import LocalProcessExecutor, make_executor, ray_available
from harness.store import Store

needs_ray = pytest.mark.skipif(not ray_available(), reason="Ray is not installed (pip install 'harness[ray]')")

# Two training groups (2 steps without warmup at the quick preset's rates: the adapters move) and one in-context
# batch, on the first 4 cb examples.
GRID = ["run", "--methods", "lora,ia3,icl", "--tasks", "cb", "--seeds", "0", "--templates", "gpt3_style",
        "--preset", "quick", "--steps", "2", "--method-args", "warmup_ratio=0", "--train-batch-size", "2",
        "--limit", "4", "--k", "2", "--quiet"]
TASK_TITLE = "ray::harness_job"  # the process title of a Ray worker running harness.ray_executor.harness_job


def _invoke(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def _file(path: Path):
    """A saved adapter file's content: bytes, or for peft's JSON config its fields (``target_modules`` is written
    from a set, in an order that varies with each process's hash seed)."""
    if path.suffix != ".json":
        return path.read_bytes()
    config = json.loads(path.read_text())
    return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else v for k, v in config.items()}


def _rows(path: Path) -> dict:
    """Per run: status, accuracies, losses, adapter bytes and every example's exact log-probs and token counts."""
    store = Store(path)
    runs = {r["run_id"]: r for r in store.runs()}
    examples: dict = {}
    for e in store.examples(list(runs)):
        examples.setdefault(e["run_id"], []).append(
            (e["example_id"], [(c["logprob"], c["n_tokens"]) for c in e["choices"]]))
    out = {}
    for rid, r in runs.items():
        folder = Path(r["artifact_path"]) if r["artifact_path"] else None
        files = {p.name: _file(p) for p in sorted(folder.iterdir())} if folder else None
        out[rid] = (r["status"], r["accuracy"], r["accuracy_norm"], r["accuracy_norm_char"], r.get("loss_last"),
                    r["train_flops"], r["infer_flops_per_example"], files, examples.get(rid))
    return out


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'harness[ray]')")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def serial(tmp_path_factory, data_dir):
    """The grid run serially (the local executor, this process): the reference numbers, on one torch thread like
    the Ray tasks (--cpus-per-run 1): on CPU, float32 sums depend on the thread count (about 1e-5 in log-prob)."""
    import torch

    path = tmp_path_factory.mktemp("serial") / "serial.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = _invoke(GRID + ["--data-dir", str(data_dir), "--store", str(path)])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return path


@needs_ray
@pytest.mark.slow
def test_ray_grid_equals_the_serial_run(local_ray, serial, tmp_path, data_dir):
    path = tmp_path / "ray.sqlite"
    result = _invoke(GRID + ["--data-dir", str(data_dir), "--store", str(path), "--executor", "ray",
                             "--workers", "2"])
    assert result.exit_code == 0, result.output
    one, two = _rows(serial), _rows(path)
    assert len(one) == 3 and set(one) == set(two)
    assert all(row[0] == "finished" for row in two.values())
    assert one == two  # CPU float32, one thread each: bit-identical log-probs, losses and adapter files
    envs = [r["env"] for r in Store(path).runs()]
    assert {e["executor"] for e in envs} == {"ray"} and all(e.get("ray_node") for e in envs)
    assert {e["torch_threads"] for e in envs} == {1}
    # the project's own gate says the same: every cell equal, log-probs to the baseline's 6 decimals
    baseline = tmp_path / "serial.json"
    assert _invoke(["baseline", "save", str(baseline), "--store", str(serial)]).exit_code == 0
    check = _invoke(["check", "--baseline", str(baseline), "--store", str(path), "--exact", "--logprob-atol", "0",
                     "--flops-rtol", "0"])
    assert check.exit_code == 0, check.output


def _kill_first_task(killed: list, stop: threading.Event, after: float = 1.5) -> None:
    """SIGKILL the first Ray worker seen running a harness job, ``after`` seconds into its task."""
    import psutil

    while not stop.is_set():
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if " ".join(proc.info["cmdline"] or []).strip() == TASK_TITLE:
                time.sleep(after)
                if " ".join(proc.cmdline()).strip() == TASK_TITLE:  # still on a task (it may have finished)
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.05)


@needs_ray
@pytest.mark.slow
def test_a_killed_worker_is_retried_and_every_run_is_stored_once(local_ray, serial, tmp_path, data_dir, caplog):
    pytest.importorskip("psutil", reason="the test finds the Ray worker's process with psutil")
    from harness.api import plan, run
    from harness.ray_executor import RayExecutor

    specs = plan(["cb"], ["lora", "ia3", "icl"], seeds=[0], templates="gpt3_style", preset="quick", limit=4, k=2,
                 data_dir=str(data_dir), train_overrides={"steps": 2, "batch_size": 2},
                 method_args={"warmup_ratio": 0})
    path = tmp_path / "ray.sqlite"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_task, args=(killed, stop), daemon=True)
    killer.start()
    # ship_artifacts: the adapters come back as files through Ray, as from another node
    try:
        produced = run(specs, store=path, data_dir=str(data_dir), progress=False,
                       executor=RayExecutor(ship_artifacts=True))
    finally:
        stop.set()
        killer.join(10)
    assert len(killed) == 1, "no Ray worker was killed mid-task"
    assert sorted(r.run_id for r in produced) == sorted(s.run_id for s in specs)  # each once
    assert all(r.status == "finished" for r in produced), [r.error for r in produced]
    with Store(path)._connect() as db:  # one row per run, one per example, in the store
        assert tuple(db.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM runs").fetchone()) == (3, 3)
        assert db.execute("SELECT COUNT(*) FROM examples").fetchone()[0] == 3 * 4
    assert _rows(path) == _rows(serial)  # the retried task's numbers (and adapter files) are the serial run's
    assert not [r for r in caplog.records if "second result" in r.getMessage()]


def _ray_session_processes(pgid: int) -> list:
    import psutil

    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


@needs_ray
@pytest.mark.slow
def test_the_grid_resumes_after_the_driver_is_killed(local_ray, serial, tmp_path, data_dir):
    pytest.importorskip("psutil", reason="the test cleans up the killed driver's Ray processes with psutil")
    path = tmp_path / "ray.sqlite"
    # the driver in its own session, with its own local Ray instance running one job at a time
    args = GRID + ["--data-dir", str(data_dir), "--store", str(path), "--executor", "ray", "--workers", "1"]
    driver = subprocess.Popen([sys.executable, "-m", "harness.cli", *args], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and driver.poll() is None:
            if path.exists() and Store(path).finished_ids():
                break
            time.sleep(0.1)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies after its first stored run
        driver.wait(10)
    finally:
        for proc in _ray_session_processes(driver.pid):  # what Ray leaves of a killed driver's local instance
            proc.kill()
    first = Store(path).finished_ids()
    assert 1 <= len(first) < 3
    result = _invoke(args[:-2] + ["--workers", "2"])  # the same command, on the shared instance
    assert result.exit_code == 0, result.output
    assert f"3 run(s) planned, {3 - len(first)} executed, {len(first)} already in" in result.output
    assert _rows(path) == _rows(serial)


# ------------------------------------------------------------------------------------------------ option checks

@pytest.mark.parametrize("args, message", [
    (["--ray-address", "auto"], "--ray-address needs --executor ray"),
    (["--gpus-per-run", "0.25"], "--gpus-per-run needs --executor ray"),
    (["--cpus-per-run", "2"], "--cpus-per-run needs --executor ray"),
    (["--executor", "ray", "--gpus-per-run", "0"], "--gpus-per-run must be a fraction in (0, 1]"),
    (["--executor", "ray", "--gpus-per-run", "-1"], "--gpus-per-run must be"),
    (["--executor", "ray", "--gpus-per-run", "1.5"], "or a whole number of GPUs, got 1.5"),
    (["--executor", "ray", "--cpus-per-run", "0"], "--cpus-per-run must be > 0"),
    (["--executor", "ray", "--ray-address", " "], "--ray-address is empty"),
    (["--executor", "ray", "--ray-address", "auto", "--workers", "2"], "--workers sizes a local Ray instance"),
    (["--executor", "ray", "--workers", "0"], "--workers must be >= 1"),
    (["--executor", "dask"], "Invalid value for '--executor'"),
])
def test_bad_executor_options_fail_before_anything_loads(args, message, monkeypatch):
    monkeypatch.setattr("harness.api.plan", lambda *a, **k: pytest.fail("planned despite a bad option"))
    result = CliRunner().invoke(main, ["run", "--methods", "lora", "--tasks", "cb", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_ray_missing_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setattr("harness.executors.ray_available", lambda: False)
    monkeypatch.setattr("harness.api.plan", lambda *a, **k: pytest.fail("planned without Ray"))
    result = CliRunner().invoke(main, ["run", "--methods", "lora", "--tasks", "cb", "--executor", "ray"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: --executor ray needs Ray, which is not installed: pip install 'harness[ray]'"


@needs_ray
def test_gpus_per_run_needs_runs_planned_on_cuda(data_dir, tmp_path):
    from harness.api import plan, run

    specs = plan(["cb"], ["lora"], seeds=[0], templates="gpt3_style", preset="quick", device="cpu",
                 data_dir=str(data_dir))
    with pytest.raises(HarnessError, match="--gpus-per-run 0.25: the runs are planned on cpu"):
        run(specs, store=tmp_path / "s.sqlite", executor=make_executor("ray", gpus_per_run=0.25))
    with pytest.raises(HarnessError, match="the ray executor loads models in its workers: a custom loader"):
        run(specs, store=":memory:", executor=make_executor("ray"), loader=lambda spec: None)
    with pytest.raises(HarnessError, match="either workers or an executor"):
        run(specs, store=":memory:", executor=LocalProcessExecutor(2), workers=2)


def test_no_module_imports_ray():
    code = ("import sys, harness.cli, harness.api, harness.executors, harness.ray_executor, harness.jobs; "
            "sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
                          ).returncode == 0


def test_a_node_with_other_inputs_refuses_the_runs(data_dir, tmp_path):
    """What every Ray task checks before it loads anything (harness.api.check_inputs)."""
    import dataclasses
    import shutil

    from harness.api import check_inputs, plan

    specs = plan(["cb"], ["lora", "icl"], seeds=[0], templates="gpt3_style", preset="quick", limit=4, k=2,
                 data_dir=str(data_dir))
    check_inputs(specs, data_dir)  # the driver's own inputs pass
    other = tmp_path / "data"
    shutil.copytree(data_dir / "cb", other / "cb")
    rows = (other / "cb" / "validation.jsonl").read_text().splitlines()
    row = json.loads(rows[0])
    row["hypothesis"] += " (edited)"
    (other / "cb" / "validation.jsonl").write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")
    with pytest.raises(HarnessError, match="the cb rows read here .* differ from the ones the runs were planned"):
        check_inputs(specs, other)
    with pytest.raises(HarnessError, match="model 'smollm2-135m' here has fingerprint"):
        check_inputs([dataclasses.replace(specs[0], model_fingerprint="sha256:0000")], data_dir)
    with pytest.raises(HarnessError, match="SCORING_VERSION"):
        check_inputs([dataclasses.replace(specs[0], scoring_version=0)], data_dir)


def test_where_data_and_gpus_travel(data_dir):
    import dataclasses

    from harness.api import plan
    from harness.data import builtin_data_dir
    from harness.ray_executor import BUILTIN, HUB, RayExecutor, data_location, worker_data_dir

    assert data_location(builtin_data_dir()) == BUILTIN and worker_data_dir(BUILTIN) == builtin_data_dir()
    assert data_location(None) == HUB and worker_data_dir(HUB) is None
    assert worker_data_dir(data_location(data_dir)) == data_dir
    with pytest.raises(HarnessError, match="does not exist on Ray node"):
        worker_data_dir("/nonexistent/data")
    (spec,) = plan(["cb"], ["lora"], seeds=[0], templates="gpt3_style", preset="quick", data_dir=str(data_dir))
    on_gpu = dataclasses.replace(spec, device="cuda")
    assert RayExecutor()._gpus(spec) == 0 and RayExecutor()._gpus(on_gpu) == 1
    assert RayExecutor(gpus_per_run=0.25)._gpus(on_gpu) == 0.25  # four runs per GPU
