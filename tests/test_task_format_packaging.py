"""Built-in task YAMLs ship as package data (harness.builtin_tasks, mapped from the top-level tasks/ folder), so a
non-editable install finds them; importing harness.tasks needs no torch. The embedded default data
(harness/builtin_data/) ships as package data too."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from harness.tasks import builtin_tasks_dir, list_tasks

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import sys; sys.path.insert(0, {where!r}); import harness.tasks as t; "
         "print(t.__file__); print(t.load_task('cb').path); print(','.join(t.list_tasks())); "
         "print('torch' in sys.modules)")


@pytest.fixture(autouse=True)
def _no_harness_env(monkeypatch):
    monkeypatch.delenv("HARNESS_TASKS_DIR", raising=False)


def test_pyproject_lists_every_package_and_maps_the_tasks_folder():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {f"harness.{p.name}" for p in (ROOT / "harness").iterdir()
               if p.is_dir() and p.name != "__pycache__" and (any(p.glob("*.py")) or any(p.glob("*.json")))}
    assert set(setuptools["packages"]) == {"harness", "harness.builtin_tasks", "harness.builtin_data"} | folders
    assert setuptools["package-dir"] == {"harness.builtin_tasks": "tasks"}
    assert setuptools["package-data"]["harness.builtin_tasks"] == ["*.yaml"]


def test_pyproject_ships_every_embedded_data_file():
    """harness/builtin_data/ holds no Python (the test above cannot find it by its .py files): its package-data
    patterns must match every file in it, the .jsonl rows and the provenance/licence notes."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "harness.builtin_data" in setuptools["packages"]
    assert setuptools["include-package-data"] is False  # else setuptools warns that cb/, cb/few_shot/... are packages
    folder = ROOT / "harness" / "builtin_data"
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    shipped = {p.relative_to(folder).as_posix() for pattern in setuptools["package-data"]["harness.builtin_data"]
               for p in folder.glob(pattern) if p.is_file()}
    assert {"README.md", "NOTICE.md", "cb/validation.jsonl", "rte/few_shot/0_seed.jsonl"} <= files
    assert shipped == files


def test_checkout_uses_the_tasks_folder():
    assert builtin_tasks_dir() == ROOT / "tasks"
    assert {"cb", "copa", "rte", "wic", "wsc"} <= set(list_tasks())


def probe(where: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(where=str(where))], capture_output=True, text=True,
                         cwd=where, check=True)
    return out.stdout.splitlines()


def test_installed_layout_finds_builtins_without_torch(tmp_path):
    """The wheel's layout (harness/builtin_tasks/*.yaml beside the modules), without building one."""
    shutil.copytree(ROOT / "harness", tmp_path / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tasks", tmp_path / "harness" / "builtin_tasks")
    module, cb_path, names, torch_loaded = probe(tmp_path)
    assert module == str(tmp_path / "harness" / "tasks.py")
    assert cb_path == str(tmp_path / "harness" / "builtin_tasks" / "cb.yaml")
    assert set(names.split(",")) == set(list_tasks())
    assert torch_loaded == "False"


@pytest.mark.slow
def test_built_wheel_holds_the_tasks(tmp_path):
    """Build the wheel from a copy of the sources (no network: the venv's setuptools) and import from it."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("harness", "tasks"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("harness-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"harness/builtin_tasks/{p.name}" for p in (ROOT / "tasks").glob("*.yaml")} <= set(names)
    data = ROOT / "harness" / "builtin_data"
    assert {f"harness/builtin_data/{p.relative_to(data).as_posix()}" for p in data.rglob("*") if p.is_file()} \
        <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    module, cb_path, _, torch_loaded = probe(tmp_path / "site")
    assert module == str(tmp_path / "site" / "harness" / "tasks.py")
    assert cb_path == str(tmp_path / "site" / "harness" / "builtin_tasks" / "cb.yaml")
    assert torch_loaded == "False"
