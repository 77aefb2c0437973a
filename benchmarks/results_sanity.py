"""The sanity tables of docs/results.md (issue 11), read from a results store: the majority-class share of each
task, the constant predictors per cell, the first and last training loss of every trained group, the runs that did
not finish, and the environment the runs recorded. Markdown on stdout. A cell is the report's: runs of one method
whose training settings differ (``adapter scale_parameter=false``) are separate rows, labelled as in the tables.

    python -m benchmarks.results_sanity STORE.sqlite
"""

from __future__ import annotations

import collections
import json
import sqlite3
import statistics
import sys

from benchmarks.store_arg import store_path


def cell_labels(path: str) -> dict[str, str]:
    """run id -> the label of its report cell (``lora``, ``adapter scale_parameter=false``) for finished runs."""
    from harness.report.tables import with_groups
    from harness.results import runs

    df = with_groups(runs(path, status="finished"))
    return dict(zip(df["run_id"], df["label"]))


def main(path: str) -> None:
    db = sqlite3.connect(path)
    label = cell_labels(path)

    def column(run_id: str, name: str) -> list:
        return [r[0] for r in db.execute(f"SELECT {name} FROM examples WHERE run_id = ? ORDER BY position", (run_id,))]

    print("Majority class share of each task's validation split (what a constant predictor scores):\n")
    print("| Task | Examples | Labels (index: count) | Majority share |\n|:---|---:|:---|---:|")
    for (task,) in db.execute("SELECT DISTINCT task FROM runs WHERE status = 'finished' ORDER BY task").fetchall():
        (run_id,) = db.execute("SELECT run_id FROM runs WHERE task = ? AND status = 'finished' LIMIT 1",
                               (task,)).fetchone()
        labels = collections.Counter(column(run_id, "label"))
        n = sum(labels.values())
        print(f"| {task} | {n} | {', '.join(f'{k}: {v}' for k, v in sorted(labels.items()))} | "
              f"{100 * max(labels.values()) / n:.1f} |")

    print("\nConstant predictors: per cell, the runs whose most frequent prediction (metric accuracy) covers at least "
          "95% of the examples, and the median over runs of the most frequent prediction's share:\n")
    print("| Task | Model | Method | Runs | Runs >= 95% one class | Median top-prediction share |\n"
          "|:---|:---|:---|---:|---:|---:|")
    cells: dict[tuple, list[float]] = collections.defaultdict(list)
    for run_id, task, model, method in db.execute("SELECT run_id, task, model, method FROM runs "
                                                  "WHERE status = 'finished'").fetchall():
        counts = collections.Counter(column(run_id, "prediction"))
        cells[(task, model, label.get(run_id, method))].append(max(counts.values()) / sum(counts.values()))
    for (task, model, method), shares in sorted(cells.items()):
        print(f"| {task} | {model} | {method} | {len(shares)} | {sum(s >= 0.95 for s in shares)} | "
              f"{100 * statistics.median(shares):.0f}% |")

    print("\nTraining: the first and last logged loss of every trained group (one adapter per task, method and seed; "
          "range over the seeds) and its training seconds (wall, while 5 to 15 trainings "
          "shared the GPU, as each round ran them: docs/benchmarks.md (d)):\n")
    print("| Task | Model | Method | Groups | Steps | Loss first | Loss last | Train seconds |\n"
          "|:---|:---|:---|---:|---:|:---|:---|:---|")
    groups: dict[tuple, dict] = collections.defaultdict(dict)
    for run_id, task, model, method, extra, seconds in db.execute(
            "SELECT run_id, task, model, method, extra_json, train_seconds FROM runs WHERE status = 'finished' "
            "AND train_seconds > 0"):
        e = json.loads(extra or "{}")
        groups[(task, model, label.get(run_id, method))][e.get("group")] = (e.get("steps"), e.get("loss_first"), e.get("loss_last"), seconds)

    def span(values: list) -> str:
        return f"{min(values):.2f} to {max(values):.2f}" if values else "-"

    for (task, model, method), g in sorted(groups.items()):
        vals = list(g.values())
        print(f"| {task} | {model} | {method} | {len(vals)} | {', '.join(sorted({str(v[0]) for v in vals}))} | "
              f"{span([v[1] for v in vals if v[1] is not None])} | {span([v[2] for v in vals if v[2] is not None])} | "
              f"{min(v[3] for v in vals):.0f} to {max(v[3] for v in vals):.0f} |")

    bad = db.execute("SELECT task, model, method, status, COUNT(*), substr(error, 1, 300) FROM runs "
                     "WHERE status != 'finished' GROUP BY task, model, method, status, error "
                     "ORDER BY task, model, method").fetchall()
    total = sum(r[4] for r in bad)
    print(f"\nRuns not finished (left out of every table above): {total}."
          + "".join(f"\n- {task} {model} {method}: {n} run(s) {status}: {error}"
                    for task, model, method, status, n, error in bad))
    commits = sorted(str(r[0]) for r in db.execute("SELECT DISTINCT json_extract(env_json, '$.git_commit') FROM runs "
                                                  "WHERE status = 'finished'"))
    envs = db.execute("SELECT DISTINCT json_extract(env_json, '$.gpu'), json_extract(env_json, '$.python'), "
                      "json_extract(env_json, '$.packages') FROM runs WHERE status = 'finished'").fetchall()
    described = "; ".join(f"{gpu}, Python {py}, " + ", ".join(f"{k} {v}" for k, v in json.loads(pk).items() if v)
                          for gpu, py, pk in envs)
    print(f"\nEnvironment the finished runs recorded: commit {', '.join(commits)}; {described}.")
    tokenizers = db.execute("SELECT model, json_extract(env_json, '$.tokenizer'), COUNT(*) FROM runs "
                            "WHERE status = 'finished' GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    per_model: dict[str, list[str]] = {}
    for model, fingerprint, n in tokenizers:
        per_model.setdefault(model, []).append(f"{fingerprint or 'not recorded (runs before it was)'}: {n} run(s)")
    print("\nTokenizer fingerprints of the finished runs (harness.tokenizer_check.tokenizer_fingerprint; two "
          "fingerprints of one model mean two tokenizations):"
          + "".join(f"\n- {model}: {'; '.join(fps)}" for model, fps in per_model.items()))


if __name__ == "__main__":
    main(store_path(sys.argv, __doc__))
