"""benchmarks/grid_plan.py: the cells the committed results store lacks and the device calls planned for them."""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import grid_plan
from benchmarks.grid_plan import Cell, call_seconds, estimate, gib_per_training, memory_note, plan_calls

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
    # AdaLoRA and FishMask are both HEAVY: never side by side (round 19 lost a call to the pair)
    assert [[c.method for c in call] for call in calls] == [["dora", "lokr"], ["oft"], ["adalora"], ["fishmask"]]
    assert all(max(c.seconds for c in call) + 40 <= 545 for call in calls)
    assert 'SRC=$PWD/.gpu/src_fix GRID_JOBS="--methods adalora --tasks rte --workers 5"`' in \
        grid_plan.render(cells, calls, left, 10, 545, 40)


def test_one_tree_for_every_cell_lets_a_heavy_method_share_a_call_with_a_light_one():
    """--tree: every call runs from that tree (AdaLoRA beside a light job, still never beside FishMask)."""
    import dataclasses

    cells = [dataclasses.replace(c, code_tree=".gpu/src_new2")
             for c in (_cell("adalora", seconds=300), _cell("oft", seconds=200), _cell("fishmask", seconds=250))]
    calls, left = plan_calls(cells, width=10, deadline=545, overhead=40)
    assert [[c.method for c in call] for call in calls] == [["adalora", "oft"], ["fishmask"]]
    text = grid_plan.render(cells, calls, left, 10, 545, 40)
    assert text.count("SRC=$PWD/.gpu/src_new2 GRID_JOBS=") == 2 and "src_fix" not in text


def test_a_job_beside_others_is_slowed_and_a_pair_that_would_pass_the_deadline_splits():
    dora, lokr, oft = _cell("dora", seconds=400), _cell("lokr", seconds=390), _cell("oft", seconds=200)
    assert call_seconds([dora], 40, slowdown=1.3) == pytest.approx(440)  # alone: as recorded
    assert call_seconds([dora, oft], 40, slowdown=1.3) == pytest.approx(560)  # 400 x 1.3 + 40
    calls, left = plan_calls([dora, lokr, oft], width=10, deadline=545, overhead=40, slowdown=1.3)
    assert not left and [[c.method for c in call] for call in calls] == [["dora"], ["lokr"], ["oft"]]
    calls, _ = plan_calls([dora, lokr, oft], width=10, deadline=545, overhead=40, slowdown=1.0)
    assert [[c.method for c in call] for call in calls] == [["dora", "lokr"], ["oft"]]


def test_a_job_counts_its_evaluations_scaled_like_prompt_tuning_for_uncached_methods():
    """Round 19's P-tuning wic job, planned from its training alone, ran past the deadline: methods scored without
    the KV cache (prompt learning, MAM) evaluate one row at a time, so their evaluation scales with prompt
    tuning's between tasks."""
    rows = [("ia3", "wsc", 270, 1.0), ("ia3", "wic", 270, 2.0), ("prompt_tuning", "wsc", 180, 12.0),
            ("prompt_tuning", "wic", 270, 48.0), ("ptuning", "wsc", 220, 13.0), ("lora", "wsc", 230, 1.0),
            ("mam", "wsc", 250, 3.0)]
    runs = pd.DataFrame([{"model": "smollm2-135m", "task": t, "label": m, "train_seconds": tr, "eval_seconds": ev}
                         for m, t, tr, ev in rows])
    cells = {c.method: c for c in grid_plan.missing_cells(runs, {"wsc": 4, "wic": 4}, models=("smollm2-135m",),
                                                          tasks=("wic",), grid={"ptuning": "", "lora": "", "mam": ""})}
    assert cells["ptuning"].train == pytest.approx(220)  # 220 x 270/270 ((IA)3's training ratio)
    assert cells["ptuning"].evaluation == pytest.approx(52)  # 13 x 48/12 (prompt tuning's), not 13 x 2/1
    assert cells["ptuning"].seconds == pytest.approx(220 + 4 * 52)
    assert cells["lora"].evaluation == pytest.approx(2)  # 1 x 2/1 ((IA)3's)
    assert cells["mam"].evaluation == pytest.approx(12)  # 3 x 48/12: MAM carries a prefix, no cache


def test_plan_of_the_committed_store(tmp_path, capsys):
    """The committed SmolLM2 export: copa (round 17) and wsc (round 21) are complete for every family, wic lacks
    only P-tuning and UniPELT (rounds 21, 25 and 27), and the bottleneck methods count only their
    scale_parameter=false runs."""
    store = tmp_path / "smollm2.sqlite"
    with lzma.open(ROOT / "results/paper/smollm2-135m.sqlite.xz") as src, open(store, "wb") as dst:
        shutil.copyfileobj(src, dst)
    from harness.report.tables import with_groups
    from harness.results import runs

    cells = grid_plan.missing_cells(with_groups(runs(str(store), status="finished")),
                                    dict.fromkeys(grid_plan.TASKS, 4), models=("smollm2-135m",))
    by_task = {t: {c.label for c in cells if c.task == t} for t in grid_plan.TASKS}
    assert by_task["copa"] == set()
    assert by_task["wsc"] == set()
    assert by_task["wic"] == {"ptuning", "unipelt scale_parameter=false"}
    assert "ia3" not in by_task["cb"] and "adapter scale_parameter=false" in by_task["cb"]
    assert all(c.seconds and c.seconds > 100 for c in cells if c.task == "wic")  # every family has a record
    rte = {c.method: c for c in cells if c.task == "rte"}
    assert rte["ptuning"].evaluation > 10 * rte["dora"].evaluation > 0  # one row at a time against cached
    assert grid_plan.main([str(store), "--model", "smollm2-135m", "--restarting", "adalora"]) == 0
    assert "smollm2-135m cb adalora (restarts when killed" in capsys.readouterr().out  # a tree before it
    assert grid_plan.main([str(store), "--model", "smollm2-135m"]) == 0
    out = capsys.readouterr().out
    assert '--methods fishmask --tasks cb --workers 5"`' in out  # alone: HEAVY
    # over one call: AdaLoRA saves its allocator's state since session 29 (MethodInfo.step_state), VeRA always did
    assert "smollm2-135m cb adalora (resumes in a later call from a tree at session 29's step_state" in out
    assert "smollm2-135m cb vera (resumes in a later call from a tree at bde8a16" in out
    with pytest.raises(SystemExit) as exit_:
        grid_plan.main([str(tmp_path / "absent.sqlite")])
    assert exit_.value.code == 2 and "no results store" in capsys.readouterr().err


def test_the_pipeline_keeps_the_slots_full_across_calls_and_leaves_restarting_methods_to_calls():
    """--pipeline: resumable cells as one queue, 2 jobs at a time; a job longer than a call runs on into the next
    (carried, paying its loading again and losing the grace before the kill); FishMask (restarts) is not queued,
    nor AdaLoRA for a tree before its saved state (``restarting``)."""
    cells = [_cell("dora", seconds=700), _cell("lokr", seconds=300), _cell("oft", seconds=300),
             _cell("vera", seconds=200), _cell("adalora", seconds=300), _cell("fishmask", seconds=250),
             _cell("mam", seconds=None, settings="scale_parameter=false")]
    calls, left = grid_plan.plan_pipeline(cells, width=10, deadline=545, overhead=30, slowdown=1.0, grace=15,
                                          min_start=120, restarting=frozenset({"adalora"}))
    assert {c.method for c in left} == {"adalora", "fishmask", "mam"}
    starts = [job.cell.method for jobs, _ in calls for job in jobs if not job.carried]
    assert sorted(starts) == ["dora", "lokr", "oft", "vera"]  # each queued once
    first, second = calls[0][0], calls[1][0]
    # call 1: dora (730 s with loading) runs on; lokr ends at 330 s and oft takes its slot (330 + 330 > 545: on)
    assert [(j.cell.method, j.start, j.finishes) for j in first] == [("dora", 0, False), ("lokr", 0, True),
                                                                     ("oft", 330, False)]
    assert calls[0][1] == 545 and all(seconds <= 545 for _, seconds in calls)
    # call 2: both carried first; dora kept 545 - 15 - 30 = 500 s of its 700 and needs 30 + 200 more
    assert [(j.cell.method, j.carried) for j in second[:2]] == [("dora", True), ("oft", True)]
    assert all(j.finishes for j in second)
    assert [j.cell.method for j in second if not j.carried] == ["vera"]
    text = grid_plan.render_pipeline(calls, left, 10, 545)
    assert 'GRID_SLOTS=2 GRID_JOBS="--methods dora --tasks rte --workers 5; --methods lokr' in text
    calls, left = grid_plan.plan_pipeline(cells, width=10, deadline=545, overhead=30, slowdown=1.0)
    assert {c.method for c in left} == {"fishmask", "mam"}  # AdaLoRA resumes from this code's trees
    # AdaLoRA's frozen tree (.gpu/src_fix without --tree) never runs in a call of .gpu/src's jobs: a call has one SRC
    assert [(j.cell.method, j.start) for j in calls[1][0] if not j.carried] == [("vera", 160)]
    assert [(j.cell.method, j.start) for j in calls[2][0]] == [("adalora", 0)] and len(calls) == 3


def test_the_pipeline_never_starts_a_heavy_job_beside_another_when_it_can_wait():
    cells = [_cell("unipelt", seconds=400, settings="scale_parameter=false"),
             _cell("unipelt", task="cb", seconds=390, settings="scale_parameter=false"), _cell("lora", seconds=100)]
    calls, _ = grid_plan.plan_pipeline(cells, width=10, deadline=545, overhead=30, slowdown=1.0)
    jobs = calls[0][0]
    assert [(j.cell.method, j.cell.task) for j in jobs[:2]] == [("unipelt", "rte"), ("lora", "rte")]


def test_each_call_says_the_gpu_memory_a_training_takes_and_warns_when_its_width_does_not_fit():
    import dataclasses

    light = dataclasses.replace(_cell("vera", task="wic"), memory=1.3e9)
    heavy = dataclasses.replace(_cell("adalora", task="cb"), memory=10.5e9)
    assert gib_per_training([light]) == 4  # 1.21 GiB + 2, rounded up
    assert gib_per_training([light, heavy]) == 12  # the largest of the call: the queue admits by one figure
    assert gib_per_training([light, _cell("oft")]) is None  # a cell without a record: say nothing
    assert memory_note([light] * 3, 15, 79.6) == ""  # 15 x 4 GiB fit an H100
    assert memory_note([heavy], 15, 79.6) == " [memory: 15 trainings x 12 GiB > 79.6 GiB; 6 fit at once]"
    calls, left = plan_calls([light, heavy], width=10, deadline=545, overhead=40)
    text = grid_plan.render([light, heavy], calls, left, 10, 545, 40)
    assert "`GRID_GIB_PER_TRAINING=12 SRC=$PWD/.gpu/src_fix GRID_JOBS=\"--methods adalora --tasks cb" in text
    assert "[memory: 10 trainings x 12 GiB > 79.6 GiB" not in text  # adalora is HEAVY: alone, 5 x 12 fit


def test_the_committed_records_size_light_wic_jobs_small_and_adalora_on_cb_large(tmp_path):
    """From the committed SmolLM2 export: memory estimates scale a family's recorded peak on another task by
    (IA)3's ratio between the tasks (cb's rows are ~3x wic's)."""
    store = tmp_path / "smollm2.sqlite"
    with lzma.open(ROOT / "results/paper/smollm2-135m.sqlite.xz") as src, open(store, "wb") as dst:
        shutil.copyfileobj(src, dst)
    from harness.report.tables import with_groups
    from harness.results import runs

    cells = {(c.task, c.method): c for c in grid_plan.missing_cells(
        with_groups(runs(str(store), status="finished")), dict.fromkeys(grid_plan.TASKS, 4),
        models=("smollm2-135m",))}
    wic, cb = gib_per_training([cells["wic", "unipelt"]]), gib_per_training([cells["cb", "adalora"]])
    assert wic is not None and cb is not None and wic <= 6 < 10 <= cb
