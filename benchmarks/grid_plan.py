"""Plan the device calls that finish the results grid of issue 11: the cells a store lacks and, from the training
seconds the store recorded, calls of side-by-side trainings that fit a call's deadline. Markdown on stdout.

A cell is (model, task, method with its grid settings): 5 data seeds x the task's templates, finished runs counted
under the report's labels (``adapter scale_parameter=false``). Each missing trained cell is one job of
``benchmarks/run_device_real.sh grid`` (``--methods M --tasks T --workers 5``: five trainings); a call holds
``--width / 5`` jobs of one model and one code tree. A job's seconds are estimated from the longest training the
store recorded for that model and label on another task, scaled by the (IA)3 training of the two tasks
(``ia3`` ran every task of both models), or from the other model's record scaled the same way; plus
``--overhead`` for loading and evaluation (rounds 17-18: a job took 25-35 s more than its longest training). The
records were taken with 5 to 15 trainings side by side, so an estimate is a guide for choosing GRID_TIMEOUT, not a
promise: keep the deadline's margin.

    python -m benchmarks.grid_plan STORE.sqlite --model smollm2-135m --width 10 --deadline 545
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from benchmarks.store_arg import require_store

SEEDS = 5  # the T-Few subsets' data seeds: 0, 1, 32, 42, 1024
MODELS = ("smollm2-135m", "gemma3-270m")
TASKS = ("wic", "copa", "wsc", "rte", "cb")  # planned in this order: the shorter rows first
# The trained methods of the grid with the settings they run under (docs/results.md, adapter families: the
# bottleneck methods whose up-projections start at zero run without Adafactor's scale_parameter).
GRID = {
    "ia3": "", "tfew": "", "lora": "", "prompt_tuning": "", "full": "", "ln_tuning": "",
    "dora": "", "lokr": "", "vera": "", "oft": "", "intrinsic_said": "", "adalora": "", "fishmask": "",
    "prefix_tuning": "", "ptuning": "",
    "adapter": "scale_parameter=false", "adapter_pfeiffer": "scale_parameter=false",
    "compacter": "scale_parameter=false", "mam": "scale_parameter=false", "unipelt": "scale_parameter=false",
}
# Methods whose launch cuts came after the frozen tree (docs/benchmarks.md (d), round 16): run from .gpu/src_fix.
FIX_TREE = {"adalora", "fishmask"}
REFERENCE = "ia3"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One missing cell of the grid and its job's estimated seconds (None: nothing recorded to estimate from)."""

    model: str
    task: str
    method: str
    settings: str
    done: int
    seconds: float | None

    @property
    def label(self) -> str:
        return f"{self.method} {self.settings}".strip()

    @property
    def job(self) -> str:
        args = f" --method-args {self.settings}" if self.settings else ""
        return f"--methods {self.method} --tasks {self.task} --workers 5{args}"

    @property
    def tree(self) -> str:
        return ".gpu/src_fix" if self.method in FIX_TREE else ".gpu/src"


def estimate(longest: dict[tuple[str, str, str], float], model: str, task: str, label: str) -> float | None:
    """Seconds of the longest training of ``label`` on ``task`` for ``model``: its own record on another task
    (the longest after scaling) scaled by the reference method's ratio between the tasks, else the other model's
    record scaled by the reference's ratio between the models and tasks. ``longest``: (model, task, label) ->
    the longest recorded training seconds."""
    def scaled(src_model: str) -> float | None:
        best = None
        for (m, t, lab), secs in longest.items():
            ref_from, ref_to = longest.get((m, t, REFERENCE)), longest.get((model, task, REFERENCE))
            if m == src_model and lab == label and ref_from and ref_to:
                value = secs * ref_to / ref_from
                best = value if best is None else max(best, value)
        return best

    own = scaled(model)
    if own is not None:
        return own
    for other in MODELS:
        if other != model and (value := scaled(other)) is not None:
            return value
    return None


def missing_cells(runs, templates: dict[str, int], models=MODELS, tasks=TASKS, grid=GRID) -> list[Cell]:
    """The grid's trained cells with fewer finished runs than seeds x templates, with their estimates. ``runs``:
    the store's finished runs with the report's ``label`` column (:func:`harness.report.tables.with_groups`)."""
    trained = runs[runs["train_seconds"].notna() & (runs["train_seconds"] > 0)]
    longest = {key: float(v) for key, v in trained.groupby(["model", "task", "label"])["train_seconds"].max().items()}
    done = runs.groupby(["model", "task", "label"]).size().to_dict()
    cells = []
    for model in models:
        for task in tasks:
            for method, settings in grid.items():
                label = f"{method} {settings}".strip()
                n = int(done.get((model, task, label), 0))
                if n < SEEDS * templates[task]:
                    cells.append(Cell(model, task, method, settings, n, estimate(longest, model, task, label)))
    return cells


def plan_calls(cells: list[Cell], width: int, deadline: float, overhead: float) -> tuple[list[list[Cell]], list[Cell]]:
    """Calls of at most ``width // 5`` jobs of one model and code tree whose longest job (estimate + overhead)
    fits ``deadline``; jobs of similar length share a call (longest first). Returns the calls and the cells left
    out (no estimate, or too long for one call)."""
    jobs_a_call = max(1, width // 5)
    fits = [c for c in cells if c.seconds is not None and c.seconds + overhead <= deadline]
    left = [c for c in cells if c not in fits]
    calls: list[list[Cell]] = []
    for (model, tree) in sorted({(c.model, c.tree) for c in fits}, key=lambda k: (MODELS.index(k[0]), k[1])):
        group = sorted((c for c in fits if (c.model, c.tree) == (model, tree)), key=lambda c: -c.seconds)
        calls += [group[i:i + jobs_a_call] for i in range(0, len(group), jobs_a_call)]
    return calls, left


def call_seconds(call: list[Cell], overhead: float) -> float:
    return max(c.seconds for c in call) + overhead


def render(cells: list[Cell], calls: list[list[Cell]], left: list[Cell], width: int, deadline: float,
           overhead: float) -> str:
    lines = [f"Missing trained cells: {len(cells)} ({5 * len(cells)} trainings).", "",
             "| model | task | method | finished runs | est. s a training |", "|:---|:---|:---|---:|---:|"]
    lines += [f"| {c.model} | {c.task} | {c.label} | {c.done} | "
              f"{'-' if c.seconds is None else f'{c.seconds:.0f}'} |" for c in cells]
    total = sum(call_seconds(call, overhead) for call in calls)
    lines += ["", f"Calls of {width} trainings side by side at most, GRID_TIMEOUT={deadline:.0f}: {len(calls)} calls, "
              f"about {total:,.0f} s of device time (machine start and parts not counted).", ""]
    for n, call in enumerate(calls, 1):
        src = "SRC=$PWD/.gpu/src_fix " if call[0].tree.endswith("src_fix") else ""
        jobs = "; ".join(c.job for c in call)
        lines.append(f"{n}. {call[0].model}, ~{call_seconds(call, overhead):.0f} s: "
                     f'`{src}GRID_JOBS="{jobs}"`')
    if left:
        lines += ["", "Not planned (no recorded training to estimate from, or longer than one call): "
                  + ", ".join(f"{c.model} {c.task} {c.label}" for c in left) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a results store (.sqlite; gunzip/unxz it first)")
    parser.add_argument("--model", action="append", choices=MODELS, help="only this model (repeatable)")
    parser.add_argument("--width", type=int, default=10, help="trainings side by side in a call (default 10)")
    parser.add_argument("--deadline", type=float, default=545, help="a call's GRID_TIMEOUT in seconds (545)")
    parser.add_argument("--overhead", type=float, default=40, help="seconds a job adds to its trainings (40)")
    args = parser.parse_args(argv)
    require_store(args.store)
    from harness.report.tables import with_groups
    from harness.results import runs
    from harness.tasks import load_task

    finished = with_groups(runs(args.store, status="finished"))
    templates = {t: len(load_task(t).templates) for t in TASKS}
    cells = missing_cells(finished, templates, models=tuple(args.model or MODELS))
    calls, left = plan_calls(cells, args.width, args.deadline, args.overhead)
    print(render(cells, calls, left, args.width, args.deadline, args.overhead))
    return 0


if __name__ == "__main__":
    sys.exit(main())
