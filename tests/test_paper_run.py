"""benchmarks.paper_run's ``--steps`` extrapolation: trainings side by side count once per unit, not summed."""

import pytest

from benchmarks.paper_run import option, steps_extrapolation


def test_serial_trainings_add_all_their_time():
    seconds = {("lora", s): 10.0 for s in range(5)}
    assert steps_extrapolation(seconds, steps=100, full_steps=1000) == pytest.approx(9 * 50.0)


def test_workers_side_by_side_count_once():
    seconds = {(m, s): 30.0 for m in ("lora", "ia3") for s in range(5)}  # 10 trainings, 10 processes at once
    assert steps_extrapolation(seconds, 200, 1000, workers=10) == pytest.approx(4 * 30.0)
    assert steps_extrapolation(seconds, 200, 1000, workers=20) == pytest.approx(4 * 30.0)  # only 10 units
    assert steps_extrapolation(seconds, 200, 1000, workers=5) == pytest.approx(4 * 60.0)  # two waves


def test_packs_are_units():
    # two packs of five: each group stores its pack's time / 5 (12 s packs)
    seconds = {(m, s): 12.0 / 5 for m in ("lora", "ia3") for s in range(5)}
    assert steps_extrapolation(seconds, 100, 1000, workers=2, pack=5) == pytest.approx(9 * 12.0)
    assert steps_extrapolation(seconds, 100, 1000, workers=1, pack=5) == pytest.approx(9 * 24.0)
    # packs hold one method's groups: --pack 3 cuts 5 lora and 5 ia3 groups into 3 + 2 and 3 + 2, four units
    assert steps_extrapolation(seconds, 100, 1000, workers=4, pack=3) == pytest.approx(9 * 24.0 / 4)
    assert steps_extrapolation({("lora", 0): 1.0, ("ia3", 0): 1.0}, 100, 1000, workers=2, pack=5) == \
        pytest.approx(9 * 1.0)  # two methods, one group each: two packs of one side by side


def test_option_reads_integers():
    assert option("--pack 5 --workers 2 --compile off".split(), "--workers") == 2
    assert option(["--compile", "off"], "--pack") is None


def test_the_first_step_is_not_scaled():
    # a compiled pack of five: the first step held a 60 s compile, the 99 later steps 40 s in all
    seconds = {("lora", s): 100.0 / 5 for s in range(5)}
    first = {("lora", s): 60.0 / 5 for s in range(5)}
    added = steps_extrapolation(seconds, 100, 1000, workers=1, pack=5, first_step_seconds=first)
    assert added == pytest.approx(900 / 99 * 40.0)  # 999 later steps at 40 / 99 s each, less the 99 measured
    assert steps_extrapolation(seconds, 100, 1000, workers=1, pack=5) == pytest.approx(9 * 100.0)  # errs high
