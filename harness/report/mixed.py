"""The report's section "Mixed-task batches": per method, whether one batch can hold queries of different tasks
and what serving them so costs against single-task serving, from the store's ``mixed_runs`` rows
(``harness mixed``, :mod:`harness.mixed.records`). Pure functions of those rows; no rows, no section.

Per method the newest mixed run is shown (its ``mixed``, ``task_by_task`` and, for LoRA/(IA)3, ``merged`` rows).
Ratios are mixed over task-by-task: examples per second above 1 means mixing serves faster; peak memory above 1
means mixing holds more.
"""

from __future__ import annotations

from harness.report.format import MISSING, Table, fmt_bytes, fmt_flops


def _ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return MISSING
    return f"{a / b:.2f}x"


def _rate(x) -> str:
    return MISSING if x is None else f"{x:.2f}"


def newest_per_method(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """method -> mode -> row of that method's newest mixed run (rows as :func:`harness.mixed.records.mixed_rows`
    gives them, newest first)."""
    out: dict[str, dict[str, dict]] = {}
    chosen: dict[str, str] = {}
    for r in rows:
        mid = chosen.setdefault(r["method"], r["mixed_id"])
        if r["mixed_id"] == mid:
            out.setdefault(r["method"], {})[r["mode"]] = r
    return out


def _can_mix(method: str) -> str:
    from harness.methods import get_method

    try:
        return "yes" if get_method(method).mixed_batches else "no"
    except Exception:  # noqa: BLE001 - a method this registry does not know
        return MISSING


def unmixable(methods) -> list[str]:
    """Of ``methods`` (names), those the registry says cannot share a batch across tasks."""
    return sorted({m for m in methods if m and _can_mix(str(m)) == "no"})


def mixed_table(rows: list[dict], methods=()) -> Table | None:
    """The section's table; None without mixed rows. ``methods``: the report's methods (those that cannot mix
    are named in a note)."""
    newest = newest_per_method(rows)
    if not newest:
        return None
    cells = []
    for method in sorted(newest):
        modes = newest[method]
        mixed, single, merged = modes.get("mixed"), modes.get("task_by_task"), modes.get("merged")
        ref = mixed or single or merged
        rate = {m: (r or {}).get("examples_per_second") for m, r in (("mixed", mixed), ("single", single),
                                                                      ("merged", merged))}
        memory = {m: (r or {}).get("peak_memory_bytes") for m, r in (("mixed", mixed), ("single", single))}
        cells.append((method, _can_mix(method), str(ref["n_tasks"]), f"{ref['device']} {ref['dtype']}",
                      _rate(rate["mixed"]), _rate(rate["single"]), _ratio(rate["mixed"], rate["single"]),
                      _ratio(rate["merged"], rate["single"]) if merged else MISSING,
                      fmt_bytes(memory["mixed"]), _ratio(memory["mixed"], memory["single"]),
                      fmt_bytes((mixed or {}).get("state_bytes")), fmt_flops((mixed or {}).get("flops_per_example")),
                      MISSING if not mixed or mixed.get("max_abs_diff") is None else f"{mixed['max_abs_diff']:.1e}"))
    notes = [
        "Mixed: one stream of queries of all tasks, each batch's rows served with their own task's adapter, soft "
        "prompt or demonstrations (`harness mixed`); task by task: each task's queries together, one adapter "
        "loaded at a time; merged (LoRA, (IA)3): each task's adapter merged into the base weights. Ratios: "
        "mixed (or merged) over task by task. Examples/s over the batches' wall time (loading and prefix "
        "encoding apart). Peak memory: CUDA max allocated, or the CPU process's resident high-water mark.",
        "State: per-task tensors held at once when mixing (adapters, soft prompts, prefix KV caches). max |d "
        "log-prob|: largest difference between the mixed scores and the stored single-task runs' (float32: "
        "expected <= 1e-4).",
    ]
    cannot = unmixable(methods)
    if cannot:
        notes.append(f"Cannot serve mixed-task batches (they change shared weights): {', '.join(cannot)}.")
    return Table("Mixed-task batches",
                 ("Method", "Mixes", "Tasks", "Device", "Mixed ex/s", "Task-by-task ex/s", "Mixed / task-by-task",
                  "Merged / task-by-task", "Peak memory (mixed)", "Memory mixed / task-by-task", "State (mixed)",
                  "FLOPs/example", "max |d log-prob|"),
                 tuple(cells), "lllllrrrrrrrr", tuple(notes), "tab:mixed")
