"""Which demonstrations an in-context run shows, in what order, with which labels (issue 15: order, label noise,
balanced demonstrations). Pure functions of the rows and the seed: no model, no tokenizer.

- **Source** (``RunSpec.demos``): ``tfew`` (default) takes the first k rows of the seed's few-shot subset
  (:func:`harness.data.few_shot_examples`); ``balanced`` draws them class-balanced from the train split
  (:func:`balanced_examples`): at every prefix length the classes' counts differ by at most one.
- **Label noise** (``RunSpec.label_noise``): ``None`` (default) keeps the gold labels; a fraction ``p`` in [0, 1]
  gives exactly ``round(p * k)`` seeded demonstrations a different label, chosen uniformly from the other labels
  (``p = 1``: every label wrong); ``"random"`` draws every label uniformly from all labels (Min et al. 2022,
  "Rethinking the Role of Demonstrations", whose random labels are right about 1/C of the time).
- **Order** (``RunSpec.order``): 0 (default) keeps the source's order; ``i >= 1`` is the i-th seeded
  permutation, each different from the original order and from the permutations before it (so at most
  ``k! - 1`` of them exist: :func:`n_orders`). Noise is applied before the permutation, so the permutations of
  one (seed, p) show the same demonstrations with the same labels.

Every random choice uses a ``random.Random`` seeded by a string naming the choice and the data seed, so a run
draws the same demonstrations on every machine and under every PYTHONHASHSEED.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from harness.errors import HarnessError

DEMO_SOURCES = ("tfew", "balanced")
RANDOM_LABELS = "random"


def check_source(source: str) -> str:
    if source not in DEMO_SOURCES:
        raise HarnessError(f"--demos must be one of {', '.join(DEMO_SOURCES)}, got {source!r}")
    return source


def check_noise(value) -> float | str | None:
    """A label-noise level: None, a float in [0, 1] or ``"random"``; anything else is a one-line error."""
    if value is None or value == RANDOM_LABELS:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise HarnessError(f"--label-noise takes fractions in [0, 1] or 'random', got {value!r}")
    return float(value)


def parse_noise_list(text: str | None) -> list[float | str | None]:
    """``"0,0.5,1,random"`` -> ``[None, 0.5, 1.0, "random"]`` (0 is the clean run: None, the default)."""
    if text is None or str(text).strip() == "":
        return [None]
    out: list[float | str | None] = []
    for item in (x.strip() for x in str(text).split(",")):
        if not item:
            continue
        if item.lower() == RANDOM_LABELS:
            value = RANDOM_LABELS
        else:
            try:
                value = float(item)
            except ValueError:
                raise HarnessError(f"--label-noise takes fractions in [0, 1] or 'random', got {item!r}") from None
            value = check_noise(value) or None  # 0.0 is the clean run
        out.append(value)
    if not out:
        raise HarnessError("--label-noise takes fractions in [0, 1] or 'random', e.g. 0,0.5,1.0,random")
    return list(dict.fromkeys(out))


def parse_source_list(text: str | None) -> list[str]:
    """``"tfew,balanced"`` -> ``["tfew", "balanced"]`` (checked)."""
    items = [x.strip() for x in str(text or "tfew").split(",") if x.strip()]
    if not items:
        raise HarnessError(f"--demos must be one of {', '.join(DEMO_SOURCES)}")
    return list(dict.fromkeys(check_source(x) for x in items))


def n_orders(k: int, wanted: int) -> int:
    """How many orders (the original one included) exist for k demonstrations, at most ``wanted``."""
    return min(wanted, math.factorial(k))


def permutation(k: int, order: int, seed: int) -> list[int]:
    """The ``order``-th seeded permutation of ``range(k)``; 0 is the identity, every other one differs from the
    identity and from the permutations with a smaller index (the first ``order`` drawn without repeats)."""
    if order < 0 or order >= math.factorial(k):
        raise HarnessError(f"order {order} does not exist for k = {k} demonstrations (0 .. {math.factorial(k) - 1})")
    identity = list(range(k))
    if order == 0:
        return identity
    rng = random.Random(f"order:{seed}:{k}")
    seen = {tuple(identity)}
    while True:
        perm = identity[:]
        rng.shuffle(perm)
        if tuple(perm) in seen:
            continue
        seen.add(tuple(perm))
        if len(seen) - 1 == order:
            return perm


def corrupt_labels(labels: list[int], n_choices: list[int], noise, seed: int) -> list[int]:
    """``labels`` with ``noise`` applied (module docstring); seeded by the data seed and the noise level."""
    noise = check_noise(noise)
    if noise is None:
        return list(labels)
    rng = random.Random(f"label-noise:{seed}:{noise}")
    if noise == RANDOM_LABELS:
        return [rng.randrange(n) for n in n_choices]
    out = list(labels)
    for i in sorted(rng.sample(range(len(labels)), math.floor(noise * len(labels) + 0.5))):
        others = [c for c in range(n_choices[i]) if c != labels[i]]
        if not others:
            raise HarnessError(f"demonstration {i} has a single choice: no other label to give it")
        out[i] = rng.choice(others)
    return out


def balanced_examples(task, seed: int, data_dir: Path | None, k: int) -> list[dict]:
    """``k`` labelled train rows, class-balanced at every prefix: per round every class (in a seeded order)
    gives its next row from a seeded shuffle of its rows. Unlabelled rows (label -1 or missing) are skipped."""
    from harness.data import load_split

    if k == 0:
        return []
    by_class: dict[str, list[dict]] = {}
    for row in load_split(task, task.train_split, data_dir):
        label = row.get(task.label_field)
        if label is None or label == -1 or label == "-1":
            continue
        by_class.setdefault(str(label), []).append(row)
    classes = sorted(by_class)
    if not classes:
        raise HarnessError(f"task {task.name!r}: the {task.train_split!r} split has no labelled rows for "
                           "--demos balanced")
    rng = random.Random(f"balanced:{seed}")
    for name in classes:
        rng.shuffle(by_class[name])
    per_class = -(-k // len(classes))
    small = [f"{name} ({len(by_class[name])})" for name in classes if len(by_class[name]) < per_class]
    if small:
        raise HarnessError(f"task {task.name!r}: --demos balanced with k = {k} needs {per_class} train rows per "
                           f"class; too few for {', '.join(small)}")
    out: list[dict] = []
    for r in range(per_class):
        for name in rng.sample(classes, len(classes)):
            out.append(by_class[name][r])
    return out[:k]


def select_examples(task, seed: int, data_dir: Path | None, k: int, source: str = "tfew") -> list[dict]:
    """The k demonstration rows of ``source`` for data seed ``seed``, in their source order."""
    from harness.data import few_shot_examples

    if check_source(source) == "balanced":
        return balanced_examples(task, seed, data_dir, k)
    return few_shot_examples(task, seed, data_dir, n=k) if k else []


def arrange(task, template, rows: list[dict], *, seed: int, order: int = 0, label_noise=None
            ) -> tuple[list[dict], list[int]]:
    """The demonstrations as shown: (rows, labels) after the label noise and then the permutation."""
    prompts = [task.render(template, row, role="demonstration") for row in rows]
    for prompt in prompts:
        if prompt.label < 0:
            raise task._unlabelled(template, prompt, "demonstration")
    labels = corrupt_labels([p.label for p in prompts], [len(p.choices) for p in prompts], label_noise, seed)
    perm = permutation(len(rows), order, seed)
    return [rows[i] for i in perm], [labels[i] for i in perm]
