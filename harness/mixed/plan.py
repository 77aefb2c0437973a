"""Which stored runs ``harness mixed`` serves, checked before any model loads.

Per method and task: the finished runs of the store (withdrawn and failed ones never), narrowed by ``seed`` and
``template`` when given; of several, the lowest seed, then the first template by name, then the newest. A PEFT
run's adapter is the folder ``harness run`` saved (``artifact_path``), its peft type checked against the method;
an ICL run's demonstrations are drawn again from its stored config at execution. Errors (:class:`HarnessError`,
one line): unknown or unmixable methods, tasks without finished runs (naming the ``harness run`` command that
makes them), missing adapters, runs of different models or dtypes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from harness.errors import HarnessError, suggest
from harness.store import Store

# method -> the peft type of its adapter (None: in-context learning, nothing to load)
MIXABLE_METHODS = {"lora": "LORA", "ia3": "IA3", "tfew": "IA3", "prompt_tuning": "PROMPT_TUNING", "icl": None}


@dataclasses.dataclass
class MethodPlan:
    """One method's part of a mixed run: its stored runs, one per task (in the order of the tasks asked for)."""

    method: str
    kind: str  # a peft type of MIXABLE_METHODS, or "ICL"
    runs: list[dict]


def check_methods(methods: list[str]) -> None:
    """Unknown names suggest the closest; a known method that cannot share a batch names those that can."""
    from harness.methods import get_method, list_methods

    if not methods:
        raise HarnessError("--methods is empty; give some of: " + ", ".join(MIXABLE_METHODS))
    for name in methods:
        if name not in MIXABLE_METHODS:
            try:
                get_method(name)
            except HarnessError:
                raise suggest(name, [m.name for m in list_methods()], "method") from None
            raise HarnessError(f"method {name!r} cannot be mixed by `harness mixed`; mixable: "
                               f"{', '.join(MIXABLE_METHODS)}")


def _pick(candidates: list[dict]) -> dict:
    return sorted(candidates, key=lambda r: (r.get("seed") or 0, str(r.get("template")),
                                             -(r.get("finished_at") or 0)))[0]


def select_runs(runs: list[dict], method: str, tasks: list[str], seed: int | None = None,
                template: str | None = None, store: str = "the store") -> list[dict]:
    """One finished run of ``method`` per task (see the module docstring); a task without one is an error naming
    the ``harness run`` command that makes it."""
    chosen, missing = [], []
    for task in tasks:
        candidates = [r for r in runs if r.get("status") == "finished" and r.get("method") == method
                      and r.get("task") == task and (seed is None or r.get("seed") == seed)
                      and (template is None or r.get("template") == template)]
        if candidates:
            chosen.append(_pick(candidates))
        else:
            missing.append(task)
    if missing:
        which = ", ".join(f"{what} {value}" for what, value in (("seed", seed), ("template", template))
                          if value is not None)
        flags = "".join(f" {flag} {value}" for flag, value in (("--seeds", seed), ("--templates", template))
                        if value is not None)
        raise HarnessError(f"no finished {method} runs for {', '.join(missing)} in {store}"
                           f"{' with ' + which if which else ''}; make them with `harness run --methods {method} "
                           f"--tasks {','.join(missing)}{flags} --store {store}`")
    return chosen


def _model_key(run: dict) -> tuple:
    config = run.get("config") or {}
    return (config.get("model_fingerprint") or run.get("model"), config.get("dtype"))


def plan_mixed(store: Store, methods: list[str], tasks: list[str], seed: int | None = None,
               template: str | None = None) -> list[MethodPlan]:
    """Check everything that can be checked without a model and pick the runs (:class:`HarnessError` else)."""
    check_methods(methods)
    if not tasks:
        raise HarnessError("--tasks is empty")
    if len(set(tasks)) != len(tasks):
        raise HarnessError(f"--tasks names a task twice: {','.join(tasks)}")
    finished = store.runs(status="finished")
    plans = []
    for method in methods:
        runs = select_runs(finished, method, tasks, seed, template, str(store.path))
        expected = MIXABLE_METHODS[method]
        for run in runs:
            if expected is None:
                continue
            folder = run.get("artifact_path")
            if not folder or not Path(folder).is_dir():
                raise HarnessError(f"run {run['run_id']} ({method}/{run['task']}) has no saved adapter at {folder}; "
                                   f"run `harness run --methods {method} --tasks {run['task']}` again")
            from harness.mixed.serving import peft_type

            found = peft_type(folder)
            if found != expected:
                raise HarnessError(f"{folder}: a {found} adapter, but {method} runs save {expected}")
        plans.append(MethodPlan(method, expected or "ICL", runs))
    keys = {_model_key(r) for p in plans for r in p.runs}
    if len(keys) > 1:
        raise HarnessError("the chosen runs were made with different models or dtypes "
                           f"({'; '.join(sorted(f'{m} {d}' for m, d in keys))}); narrow with --seed/--template "
                           "or use a store of one model")
    return plans
