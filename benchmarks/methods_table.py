"""The table of docs/methods.md: one row per method of a results store (its latest run per method), with the
figures a smoke run gives: trainable parameters, checkpoint bytes, training loss first -> last, accuracy on the
evaluated examples, training FLOPs.

    python -m benchmarks.methods_table STORE.sqlite [--task cb]

Failed runs are listed with their error. The numbers are whatever the store holds: for a quick-preset CPU run
they are smoke figures, not results.
"""

from __future__ import annotations

import argparse

from harness.report.format import fmt_flops, fmt_params
from harness.results import runs


def table(store: str, task: str | None = None) -> str:
    df = runs(store)
    if task:
        df = df[df["task"] == task]
    lines = ["| method | trainable | checkpoint bytes | loss first -> last | accuracy (n) | train FLOPs | status |",
             "|---|---|---|---|---|---|---|"]
    for method, group in df.groupby("method", sort=True):
        r = group.iloc[-1]
        if r["status"] != "finished":
            lines.append(f"| {method} | - | - | - | - | - | {r['status']}: {str(r.get('error') or '')[:90]} |")
            continue
        m = lambda key: r[key] if key in r.index else r["extra"].get(key)  # noqa: E731
        lines.append(f"| {method} | {fmt_params(m('trainable_params'))} | {int(m('checkpoint_bytes')):,} | "
                     f"{m('loss_first'):.3f} -> {m('loss_last'):.3f} | {m('accuracy'):.3f} ({int(m('n_eval'))}) | "
                     f"{fmt_flops(m('train_flops'))} | finished |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--task", default=None)
    args = parser.parse_args()
    print(table(args.store, args.task))


if __name__ == "__main__":
    main()
