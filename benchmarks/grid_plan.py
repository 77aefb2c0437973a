"""Plan the device calls that finish the results grid of issue 11: the cells a store lacks and, from the training
seconds the store recorded, calls of side-by-side trainings that fit a call's deadline. Markdown on stdout.

A cell is (model, task, method with its grid settings): 5 data seeds x the task's templates, finished runs counted
under the report's labels (``adapter scale_parameter=false``). Each missing trained cell is one job of
``benchmarks/run_device_real.sh grid`` (``--methods M --tasks T --workers 5``: five trainings, each then evaluated
once per template); a call holds ``--width / 5`` jobs of one model and one code tree. A job's seconds are

    longest training (x --slowdown when the call has other jobs)  +  templates x seconds evaluating a run
    +  --overhead (loading)

each term estimated from the store's record of that model and label on another task, scaled by a reference
method's ratio between the two tasks (or from the other model's record, scaled the same way): (IA)3 for training
and for most evaluations, prompt tuning for the evaluation of methods scored without the KV cache
(``MethodInfo.supports_kv_cache`` false: prompt learning, MAM, UniPELT), which score one row at a time (``ia3``
and ``prompt_tuning`` ran every task of both models). Round 19 lost a P-tuning
wic job planned at 235 s to the evaluation the first planner left out: P-tuning evaluates a wic run in about
50 s, four templates 200 s. The records were taken with 5 to 15 trainings side by side, so ``--slowdown``
(default 1.3: round 18 measured 1.0-1.4x between neighbours, round 19 1.27x for UniPELT beside P-tuning, against
its record alone) covers other neighbours, and the GPU-heavy methods (``HEAVY``: round 19's AdaLoRA beside FishMask, each under 400 s
with a light neighbour, passed 500 s together) never share a call. An estimate is a guide for choosing
GRID_TIMEOUT, not a promise: keep the deadline's margin. Each call also gets GRID_GIB_PER_TRAINING, its largest
estimated memory peak (``peak_memory_bytes``, scaled the same way) + 2 GiB, with a warning where its width outgrows
``--gpu-gib`` (the queue would hold jobs back).

    python -m benchmarks.grid_plan STORE.sqlite --model smollm2-135m --width 10 --deadline 545

With ``--pipeline`` the resumable cells are planned instead as one queue run two jobs at a time
(``run_device_real.sh grid`` with ``GRID_SLOTS=2``: a job that ends frees its slot for the next; a job killed at
the deadline continues in the next call from its trainings' saved state), so cells longer than a call need no
call of their own and no slot idles while a call has time left; FishMask, which restarts when killed, is planned
as calls that must fit (:func:`plan_pipeline`), and so is AdaLoRA with ``--restarting adalora`` for a tree before
its saved allocator state (session 29; ``.gpu/src_new2`` is one). Session 29 counted 33 resumable SmolLM2 cells at about
11,300 s this way, where the calls that fit held 25 of them in about 10,100 s and left the other 11 over a call.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
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
# The reference for the evaluation of methods scored without the KV cache, one row at a time (docs/results.md,
# prompt tuning): their evaluation scales with the task's rows as prompt tuning's does, not as (IA)3's.
EVAL_REFERENCE_UNCACHED = "prompt_tuning"
# Methods that fill the GPU by themselves (round 19: AdaLoRA beside FishMask passed 500 s where each took under
# 400 s beside a light job or alone; UniPELT has the most launches a step, benchmarks/count_ops.py): one a call.
HEAVY = {"adalora", "fishmask", "unipelt"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One missing cell of the grid and its job's estimated seconds without the loading overhead (None: nothing
    recorded to estimate from): ``train`` seconds of the longest training as recorded, ``evaluation`` seconds of
    one run (one template), ``templates`` runs a training."""

    model: str
    task: str
    method: str
    settings: str
    done: int
    train: float | None
    evaluation: float = 0.0
    templates: int = 4
    code_tree: str | None = None  # one tree for every cell (--tree); None: the frozen trees by method
    memory: float | None = None  # estimated GPU memory peak of a training, bytes (None: nothing recorded)

    @property
    def seconds(self) -> float | None:
        return self.job_seconds(1.0)

    def job_seconds(self, slowdown: float) -> float | None:
        """The job without loading: its trainings (side by side) slowed by ``slowdown``, then its evaluations."""
        return None if self.train is None else self.train * slowdown + self.templates * self.evaluation

    @property
    def label(self) -> str:
        return f"{self.method} {self.settings}".strip()

    @property
    def job(self) -> str:
        args = f" --method-args {self.settings}" if self.settings else ""
        return f"--methods {self.method} --tasks {self.task} --workers 5{args}"

    @property
    def tree(self) -> str:
        if self.code_tree:
            return self.code_tree
        return ".gpu/src_fix" if self.method in FIX_TREE else ".gpu/src"


def estimate(longest: dict[tuple[str, str, str], float], model: str, task: str, label: str,
             reference: str = REFERENCE) -> float | None:
    """Seconds of ``label`` on ``task`` for ``model``: its own record on another task (the longest after scaling)
    scaled by the reference method's ratio between the tasks, else the other model's record scaled by the
    reference's ratio between the models and tasks. ``longest``: (model, task, label) -> recorded seconds (the
    longest training, or a run's evaluation)."""
    def scaled(src_model: str) -> float | None:
        best = None
        for (m, t, lab), secs in longest.items():
            ref_from, ref_to = longest.get((m, t, reference)), longest.get((model, task, reference))
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
    from harness.methods import get_method

    trained = runs[runs["train_seconds"].notna() & (runs["train_seconds"] > 0)]
    by_label = trained.groupby(["model", "task", "label"])
    longest = {key: float(v) for key, v in by_label["train_seconds"].max().items()}
    peak = ({key: float(v) for key, v in by_label["peak_memory_bytes"].max().dropna().items()}
            if "peak_memory_bytes" in trained else {})
    evaluation = {key: float(v) for key, v in by_label["eval_seconds"].mean().dropna().items()}
    done = runs.groupby(["model", "task", "label"]).size().to_dict()
    cells = []
    for model in models:
        for task in tasks:
            for method, settings in grid.items():
                label = f"{method} {settings}".strip()
                n = int(done.get((model, task, label), 0))
                if n < SEEDS * templates[task]:
                    train = estimate(longest, model, task, label)
                    ref = REFERENCE if get_method(method).supports_kv_cache else EVAL_REFERENCE_UNCACHED
                    evals = estimate(evaluation, model, task, label, reference=ref)
                    cells.append(Cell(model, task, method, settings, n, train, evals or 0.0, templates[task],
                                      memory=estimate(peak, model, task, label)))
    return cells


def gib_per_training(cells: list[Cell], margin: float = 2.0) -> int | None:
    """GRID_GIB_PER_TRAINING for a call of ``cells``: the largest estimated memory peak of a training in GiB plus
    ``margin`` (a process holds its CUDA context and the allocator's cache beside the peak: round 25's wic
    trainings, peaks 1.1-1.4 GB, held 2.4 GiB each, 15 at once in 36.6 GiB; round 22's AdaLoRA cb processes held
    9.3-10.9 GiB, its estimated peak here ~10 GB), rounded up; None when a cell has no estimate."""
    peaks = [c.memory for c in cells]
    if not peaks or None in peaks:
        return None
    return math.ceil(max(peaks) / 2**30 + margin)


def _gib(cells: list[Cell]) -> str:
    gib = gib_per_training(cells)
    return "" if gib is None else f"GRID_GIB_PER_TRAINING={gib} "


def memory_note(cells: list[Cell], trainings: int, gpu_gib: float) -> str:
    """A warning when ``trainings`` side by side at the call's GRID_GIB_PER_TRAINING exceed ``gpu_gib``: the queue
    then starts a job only when its five fit, so the call runs fewer at once than planned (and takes longer)."""
    gib = gib_per_training(cells)
    if gib is None or gib * trainings <= gpu_gib:
        return ""
    return f" [memory: {trainings} trainings x {gib} GiB > {gpu_gib:g} GiB; {int(gpu_gib // gib)} fit at once]"


def plan_calls(cells: list[Cell], width: int, deadline: float, overhead: float,
               slowdown: float = 1.0) -> tuple[list[list[Cell]], list[Cell]]:
    """Calls of at most ``width // 5`` jobs of one model and code tree, at most one of them ``HEAVY``, that fit
    ``deadline`` (:func:`call_seconds`: a job beside others slowed by ``slowdown``, a job alone as recorded);
    jobs of similar length share a call (longest first, each into the first open call that still fits with it).
    Returns the calls and the cells left out (no estimate, or too long for one call even alone)."""
    jobs_a_call = max(1, width // 5)
    fits = [c for c in cells if c.seconds is not None and c.seconds + overhead <= deadline]
    left = [c for c in cells if c not in fits]
    calls: list[list[Cell]] = []
    for (model, tree) in sorted({(c.model, c.tree) for c in fits}, key=lambda k: (MODELS.index(k[0]), k[1])):
        group_calls: list[list[Cell]] = []
        for cell in sorted((c for c in fits if (c.model, c.tree) == (model, tree)), key=lambda c: -c.seconds):
            heavy = cell.method in HEAVY
            home = next((call for call in group_calls if len(call) < jobs_a_call
                         and not (heavy and any(c.method in HEAVY for c in call))
                         and call_seconds(call + [cell], overhead, slowdown) <= deadline), None)
            if home is None:
                group_calls.append([cell])
            else:
                home.append(cell)
        calls += group_calls
    return calls, left


def call_seconds(call: list[Cell], overhead: float, slowdown: float = 1.0) -> float:
    """A call's estimated seconds: its longest job (slowed when it has neighbours) plus loading."""
    factor = slowdown if len(call) > 1 else 1.0
    return max(c.job_seconds(factor) for c in call) + overhead


@dataclasses.dataclass
class QueuedJob:
    """A job of :func:`plan_pipeline`'s queue in one call: its cell, the call-relative second it starts, whether it
    started in an earlier call (carried: a killed job resumes), and whether it ends in this call."""

    cell: Cell
    start: float
    carried: bool = False
    finishes: bool = True


def plan_pipeline(cells: list[Cell], width: int, deadline: float, overhead: float, slowdown: float = 1.0,
                  grace: float = 15.0, min_start: float = 120.0,
                  restarting: frozenset[str] = frozenset()) -> tuple[list[tuple[list[QueuedJob], float]], list[Cell]]:
    """The resumable cells as one queue run ``width // 5`` jobs at a time (``run_device_real.sh grid`` with
    GRID_SLOTS): a job that ends frees its slot for the next while ``min_start`` seconds of the call are left, and
    a job killed at the deadline continues in the next call from the state its trainings saved ``grace`` seconds
    before (``harness.train_state``), paying ``overhead`` (loading) again. A job's seconds are
    :meth:`Cell.job_seconds` with ``slowdown`` (it always has neighbours); a ``HEAVY`` one does not start beside
    another (the next job in the queue goes first). Methods that restart when killed (FishMask) are left
    to :func:`plan_calls`, and so are the methods in ``restarting`` (resumable in this code but not in the tree
    the calls run: AdaLoRA before session 29's ``step_state``). Returns [(the call's jobs in start order, the call's
    seconds)] and the cells not queued."""
    from harness.methods import get_method

    if min_start >= deadline:
        raise ValueError(f"min_start ({min_start:g} s) must be below the deadline ({deadline:g} s)")
    queue = sorted((c for c in cells if c.seconds is not None and get_method(c.method).resumable
                    and c.method not in restarting),
                   key=lambda c: (MODELS.index(c.model), c.tree, -c.seconds))
    left = [c for c in cells if c not in queue]
    slots = max(1, width // 5)
    calls: list[tuple[list[QueuedJob], float]] = []
    running: list[tuple[Cell, float]] = []  # (cell, work left in seconds, slowed) carried into the next call
    while queue or running:
        jobs = [QueuedJob(cell, 0.0, carried=True) for cell, _ in running]
        ends = [overhead + work for _, work in running]
        home = jobs[0].cell if jobs else queue[0]  # a call runs one model from one code tree (SRC)
        running = []
        now = 0.0
        while True:
            free = len([e for e in ends if e > now]) < slots
            if free and queue and deadline - now >= min_start:
                busy = [j.cell for j, e in zip(jobs, ends) if e > now]
                same = [c for c in queue if c.model == home.model and c.tree == home.tree]
                pick = next((c for c in same if not (c.method in HEAVY and any(b.method in HEAVY for b in busy))),
                            same[0] if same else None)
                if pick is not None:
                    queue.remove(pick)
                    jobs.append(QueuedJob(pick, now))
                    ends.append(now + overhead + pick.job_seconds(slowdown))
                    continue
            if not jobs:  # nothing of this call's model and tree could start: the next call takes the queue's head
                break
            later = [e for e in ends if e > now]
            if not later:
                break
            now = min(later)
            if now >= deadline:
                break
        for job, end in zip(jobs, ends):
            job.finishes = end <= deadline
            if not job.finishes:  # progress kept: up to the save `grace` before the kill, after its loading
                kept = max(0.0, deadline - grace - job.start - overhead)
                running.append((job.cell, end - job.start - overhead - kept))
        calls.append((jobs, min(deadline, max(ends))))
    return calls, left


def render_pipeline(calls: list[tuple[list[QueuedJob], float]], left: list[Cell], width: int, deadline: float,
                    spare: int = 2, gpu_gib: float = 79.6) -> str:
    """Each call's GRID_JOBS: the jobs the plan starts in it (those carried first) and ``spare`` more of the queue
    (they start only if a slot frees in time: estimates are guides)."""
    order = [job.cell for jobs, _ in calls for job in jobs if not job.carried]
    total, lines = 0.0, []
    for n, (jobs, seconds) in enumerate(calls, 1):
        total += seconds
        started = [job.cell for job in jobs]
        new = [job.cell for job in jobs if not job.carried]
        after = order.index(new[-1]) + 1 if new else next(
            (order.index(c) + 1 for c in reversed(started) if c in order), 0)
        extra = [c for c in order[after:after + spare] if c not in started]
        tree = jobs[0].cell.tree
        src = "" if tree == ".gpu/src" else f"SRC=$PWD/{tree} "
        ends = ", ".join(f"{j.cell.task} {j.cell.label}{' (carried)' if j.carried else ''}: "
                         f"{'ends' if j.finishes else 'runs on'}" for j in jobs)
        lines.append(f"{n}. {jobs[0].cell.model}, ~{seconds:.0f} s (total ~{total:,.0f} s): "
                     f"`{_gib(started + extra)}{src}GRID_SLOTS="
                     f"{max(1, width // 5)} GRID_JOBS=\"{'; '.join(c.job for c in started + extra)}\"` ({ends})"
                     + memory_note(started + extra, 5 * max(1, width // 5), gpu_gib))
    head = [f"Pipeline of the resumable cells, {max(1, width // 5)} jobs at a time as a queue, GRID_TIMEOUT="
            f"{deadline:.0f}: {len(calls)} calls, about {total:,.0f} s of device time (back to back on one warm "
            "machine; between machines only 2-3 trainings' states travel, benchmarks/carry_states.py: end a "
            "session on a call whose jobs all end). If a call ends otherwise than planned, pass its unfinished "
            "jobs first in the next call.", ""]
    tail = ["", "Left to the calls above (restart when killed, or no estimate): "
            + ", ".join(f"{c.model} {c.task} {c.label}" for c in left) + "."] if left else []
    return "\n".join(head + lines + tail)


def render(cells: list[Cell], calls: list[list[Cell]], left: list[Cell], width: int, deadline: float,
           overhead: float, slowdown: float = 1.0, restarting: frozenset[str] = frozenset(),
           gpu_gib: float = 79.6) -> str:
    def sec(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [f"Missing trained cells: {len(cells)} ({5 * len(cells)} trainings).", "",
             "| model | task | method | finished runs | est. s a training | est. s evaluating a run | est. s a job |",
             "|:---|:---|:---|---:|---:|---:|---:|"]
    lines += [f"| {c.model} | {c.task} | {c.label} | {c.done} | {sec(c.train)} | {sec(c.evaluation)} | "
              f"{sec(None if c.seconds is None else c.seconds + overhead)} |" for c in cells]
    total = sum(call_seconds(call, overhead, slowdown) for call in calls)
    lines += ["", f"Calls of {width} trainings side by side at most, GRID_TIMEOUT={deadline:.0f}: {len(calls)} calls, "
              f"about {total:,.0f} s of device time (machine start and parts not counted).", ""]
    for n, call in enumerate(calls, 1):
        src = "" if call[0].tree == ".gpu/src" else f"SRC=$PWD/{call[0].tree} "
        jobs = "; ".join(c.job for c in call)
        lines.append(f"{n}. {call[0].model}, ~{call_seconds(call, overhead, slowdown):.0f} s: "
                     f'`{_gib(call)}{src}GRID_JOBS="{jobs}"`' + memory_note(call, 5 * len(call), gpu_gib))
    if left:
        from harness.methods import get_method

        def why(c: Cell) -> str:
            if c.seconds is None:
                return "nothing recorded to estimate from"
            if not get_method(c.method).resumable or c.method in restarting:
                return "restarts when killed: needs a longer call"
            since = "session 29's step_state" if get_method(c.method).step_state else "bde8a16"
            return f"resumes in a later call from a tree at {since} or later"
        lines += ["", "Not planned (longer than one call, or no estimate): "
                  + ", ".join(f"{c.model} {c.task} {c.label} ({why(c)})" for c in left) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a results store (.sqlite; gunzip/unxz it first)")
    parser.add_argument("--model", action="append", choices=MODELS, help="only this model (repeatable)")
    parser.add_argument("--width", type=int, default=10, help="trainings side by side in a call (default 10)")
    parser.add_argument("--deadline", type=float, default=545, help="a call's GRID_TIMEOUT in seconds (545)")
    parser.add_argument("--overhead", type=float, default=30,
                        help="seconds a job adds to its trainings and evaluations: loading (30)")
    parser.add_argument("--slowdown", type=float, default=1.3,
                        help="factor on recorded training seconds for a job with neighbours in its call (1.3)")
    parser.add_argument("--tree", help="one code tree for every call (e.g. .gpu/src_new2, a tree at bde8a16 or later, "
                        "once the rerun check passed on the GPU: docs/benchmarks.md (d), round 20); default: the "
                        "frozen trees, .gpu/src_fix for AdaLoRA and FishMask, .gpu/src for the others")
    parser.add_argument("--gpu-gib", type=float, default=79.6,
                        help="GPU memory in GiB, for the GRID_GIB_PER_TRAINING warnings (79.6: an H100 80GB; H200 139)")
    parser.add_argument("--pipeline", action="store_true",
                        help="keep the width full and let resumable jobs run on across calls (plan_pipeline)")
    parser.add_argument("--grace", type=float, default=15,
                        help="with --pipeline: seconds of progress a killed job loses (SAVE_GRACE, 15)")
    parser.add_argument("--restarting", default="",
                        help="methods to plan as restarting when killed though this code resumes them: the tree "
                        "the calls run predates their saved state (e.g. adalora with .gpu/src_new2, bde8a16)")
    args = parser.parse_args(argv)
    require_store(args.store)
    restarting = frozenset(m for m in args.restarting.split(",") if m)
    from harness.report.tables import with_groups
    from harness.results import runs
    from harness.tasks import load_task

    finished = with_groups(runs(args.store, status="finished"))
    templates = {t: len(load_task(t).templates) for t in TASKS}
    cells = missing_cells(finished, templates, models=tuple(args.model or MODELS))
    if args.tree:
        cells = [dataclasses.replace(c, code_tree=args.tree.rstrip("/")) for c in cells]
    if args.pipeline:  # the resumable cells as a queue; the others as calls that must fit
        queued, rest = plan_pipeline(cells, args.width, args.deadline, args.overhead, args.slowdown, args.grace,
                                     restarting=restarting)
        calls, left = plan_calls(rest, args.width, args.deadline, args.overhead, args.slowdown)
        print(render_pipeline(queued, rest, args.width, args.deadline, gpu_gib=args.gpu_gib) + "\n")
        print(render(rest, calls, left, args.width, args.deadline, args.overhead, args.slowdown, restarting,
                     args.gpu_gib))
        return 0
    calls, left = plan_calls(cells, args.width, args.deadline, args.overhead, args.slowdown)
    print(render(cells, calls, left, args.width, args.deadline, args.overhead, args.slowdown, restarting,
                 args.gpu_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
