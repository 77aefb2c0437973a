"""benchmarks/grid_plan.py: the cells the committed results store lacks and the device calls planned for them."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest

from benchmarks import grid_plan
from benchmarks.grid_plan import Cell, estimate, plan_calls

ROOT = Path(__file__).resolve().parents[1]


def _cell(method, task="rte", seconds=300.0, model="smollm2-135m", settings=""):
    return Cell(model, task, method, settings, 0, seconds)


def test_estimate_scales_a_record_by_the_reference_method_between_tasks_and_models():
    longest = {("smollm2-135m", "copa", "ia3"): 200.0, ("smollm2-135m", "cb", "ia3"): 400.0,
               ("smollm2-135m", "copa", "dora"): 150.0, ("gemma3-270m", "cb", "ia3"): 600.0}
    assert estimate(longest, "smollm2-135m", "cb", "dora") == pytest.approx(300.0)  # 150 x 400/200
    assert estimate(longest, "gemma3-270m", "cb", "dora") == pytest.approx(450.0)  # 150 x 600/200
    assert estimate(longest, "smollm2-135m", "cb", "vera") is None  # nothing recorded for it


def test_calls_respect_width_deadline_and_code_tree():
    cells = [_cell("dora", seconds=400), _cell("lokr", seconds=390), _cell("oft", seconds=200),
             _cell("adalora", seconds=300), _cell("fishmask", seconds=250), _cell("vera", seconds=520),
             _cell("mam", seconds=None, settings="scale_parameter=false")]
    calls, left = plan_calls(cells, width=10, deadline=545, overhead=40)
    assert {c.method for c in left} == {"vera", "mam"}  # 520 + 40 > 545; no estimate
    assert all(len(call) <= 2 for call in calls)
    assert all(len({c.tree for c in call}) == 1 for call in calls)
    assert [[c.method for c in call] for call in calls] == [["dora", "lokr"], ["oft"], ["adalora", "fishmask"]]
    assert all(max(c.seconds for c in call) + 40 <= 545 for call in calls)
    assert 'SRC=$PWD/.gpu/src_fix GRID_JOBS="--methods adalora --tasks rte --workers 5; --methods fishmask' in \
        grid_plan.render(cells, calls, left, 10, 545, 40)


def test_plan_of_the_committed_store(tmp_path, capsys):
    """The committed SmolLM2 export: copa is complete for every family (round 17), wsc lacks exactly AdaLoRA,
    FishMask and UniPELT (round 18), and the bottleneck methods count only their scale_parameter=false runs."""
    store = tmp_path / "smollm2.sqlite"
    with lzma.open(ROOT / "results/paper/smollm2-135m.sqlite.xz") as src, open(store, "wb") as dst:
        shutil.copyfileobj(src, dst)
    from harness.report.tables import with_groups
    from harness.results import runs

    cells = grid_plan.missing_cells(with_groups(runs(str(store), status="finished")),
                                    dict.fromkeys(grid_plan.TASKS, 4), models=("smollm2-135m",))
    by_task = {t: {c.label for c in cells if c.task == t} for t in grid_plan.TASKS}
    assert by_task["copa"] == set()
    assert by_task["wsc"] == {"adalora", "fishmask", "unipelt scale_parameter=false"}
    assert "ia3" not in by_task["cb"] and "adapter scale_parameter=false" in by_task["cb"]
    assert all(c.seconds and c.seconds > 100 for c in cells if c.task == "wic")  # every family has a record
    assert grid_plan.main([str(store), "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert "--methods unipelt --tasks wsc --workers 5 --method-args scale_parameter=false" in out
    with pytest.raises(SystemExit) as exit_:
        grid_plan.main([str(tmp_path / "absent.sqlite")])
    assert exit_.value.code == 2 and "no results store" in capsys.readouterr().err
