"""What one run is: :class:`RunSpec`, its config hash, and the presets.

A run is one (task, method, template, seed, k, model) cell plus the settings that change its numbers (dtype,
device type, evaluation limit, KV-cache on/off, training settings) and the fingerprints of its inputs (the task
definition, the example rows it reads, the model's weights, the scoring code's version: :mod:`harness.identity`).
Its ``run_id`` is a hash of exactly those fields, so running the same command again finds finished runs and skips
them, and changing any input runs again. Settings that cannot change a number (batch size, progress bars, store
path) are left out of the hash, and so are the fields that only say where things were found
(:data:`NOT_HASHED`: the task's YAML text, whose normalized form ``task_hash`` is hashed; the path the model was
loaded from, whose content ``model_fingerprint`` is hashed; the data folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from harness.errors import HarnessError
from harness.identity import SCORING_VERSION

DEFAULT_SEEDS = (0, 1, 32, 42, 1024)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Training/evaluation defaults. ``paper`` follows T-Few; ``quick`` is a CPU smoke run."""

    name: str
    steps: int
    batch_size: int
    eval_limit: int | None  # evaluation examples per run (None: the whole split)
    n_train: int  # few-shot training examples when no T-Few subset file exists
    seeds: tuple[int, ...]  # data seeds when --seeds is not given


PRESETS = {
    "paper": Preset("paper", steps=1000, batch_size=8, eval_limit=None, n_train=32, seeds=DEFAULT_SEEDS),
    "quick": Preset("quick", steps=20, batch_size=4, eval_limit=32, n_train=32, seeds=(0,)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        from harness.errors import suggest

        raise suggest(name, list(PRESETS), "preset")
    return PRESETS[name]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One cell of the grid. ``train`` holds the training settings of PEFT methods (empty for ICL)."""

    task: str
    method: str
    template: str
    seed: int
    k: int
    model: str
    preset: str = "paper"
    limit: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    kv_cache: bool = True
    template_fingerprint: str = ""
    train: tuple[tuple[str, object], ...] = ()  # sorted (key, value) pairs, hashable
    task_hash: str = ""  # Task.fingerprint(): the normalized definition
    data_hash: str = ""  # identity.data_fingerprint of the rows this run reads and their source
    train_data_hash: str = ""  # the training rows alone (PEFT; shared by the group's templates)
    model_fingerprint: str = ""  # identity.model_fingerprint: weights, Hub revision or random config + seed
    scoring_version: int = SCORING_VERSION
    # PEFT runs in bfloat16/float16 of a method that trains parameters in the model's dtype
    # (MethodInfo.trains_model_dtype): trained through float32 master weights (harness.master_weights). Hashed
    # only when True, so every other run keeps its id; runs of such methods made before the master weights
    # (parameters updated in bfloat16, most updates rounded away) never match a new plan.
    master_weights: bool = False
    # MethodInfo.costs_version: the version of the method's FLOPs formula. Hashed only when nonzero, so runs of
    # methods whose formula never changed keep their ids; runs stored with an older formula's FLOPs never match.
    costs_version: int = 0
    # identity.SEQ2SEQ_COSTS_VERSION for a PEFT run on an encoder-decoder model (0 otherwise): the version of the
    # encoder-decoder FLOPs accounting. Hashed only when nonzero, so causal models' runs keep their ids.
    seq2seq_costs: int = 0
    # identity.optimizer_version: harness.optim's Adafactor version for a training by Adafactor on CUDA (0
    # otherwise). Hashed only when nonzero, so CPU runs and other optimizers' runs keep their ids.
    optimizer_version: int = 0
    # in-context runs: also compute accuracy_calibrated and accuracy_mutual_info (harness.calibration). Not hashed
    # (it adds figures and changes none): a run stored without them is not finished for a --calibrate plan
    # (Store.finished_ids(calibrated=True)), so it is re-run and replaced by one with them.
    calibrate: bool = False
    # in-context demonstrations (harness.demos, issue 15): where they come from ("tfew": the seed's few-shot
    # subset; "balanced": class-balanced from the train split), their permutation (0: the source's order) and
    # their label noise (None: gold labels; a fraction p in (0, 1]; "random"). Each is hashed only when it is not
    # its default (VARIANT_DEFAULTS), so every run made before the fields existed keeps its id.
    demos: str = "tfew"
    order: int = 0
    label_noise: float | str | None = None
    # recorded, not hashed (NOT_HASHED):
    task_source: str = ""  # the task file's YAML text, so eval/report never need to find the file again
    model_path: str = ""  # the --model string the weights are loaded from (``model`` is its display name)
    data_source: str = ""  # where the rows were read (folder or Hub dataset)

    def __post_init__(self):
        if self.k < 0:
            raise HarnessError(f"k must be >= 0, got {self.k}")
        if self.limit is not None and self.limit <= 0:
            raise HarnessError(f"--limit must be a positive integer, got {self.limit}")
        from harness.demos import check_noise, check_source

        check_source(self.demos)
        check_noise(self.label_noise)
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 0:
            raise HarnessError(f"order must be an integer >= 0, got {self.order!r}")
        if self.label_noise == 0:
            object.__setattr__(self, "label_noise", None)  # p = 0 is the clean run: one id for both

    def config(self) -> dict:
        """All fields as a JSON-ready dict (``train`` as a dict)."""
        out = dataclasses.asdict(self)
        out["train"] = dict(self.train)
        return out

    def identity(self) -> dict:
        """The fields the run id hashes: :meth:`config` without :data:`NOT_HASHED`."""
        out = {key: value for key, value in self.config().items() if key not in NOT_HASHED}
        if not out["master_weights"]:
            del out["master_weights"]  # run ids made before the field existed stay the same
        if not out["costs_version"]:
            del out["costs_version"]  # likewise
        if not out["seq2seq_costs"]:
            del out["seq2seq_costs"]  # likewise
        if not out["optimizer_version"]:
            del out["optimizer_version"]  # likewise
        for key, default in VARIANT_DEFAULTS.items():  # likewise (issue 15)
            if out[key] == default:
                del out[key]
        return out

    @property
    def run_id(self) -> str:
        """16 hex digits of sha256 over the canonical JSON of :meth:`identity`."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def load_from(self) -> str:
        """The --model string to load the weights from."""
        return self.model_path or self.model

    def load_task(self):
        """This run's task, from the recorded YAML text (by name only for specs made without it)."""
        from harness.tasks import load_task, task_from_text

        return task_from_text(self.task_source, f"{self.task}.yaml") if self.task_source else load_task(self.task)

    @property
    def train_group(self) -> tuple:
        """Runs sharing this key share one trained adapter (all templates of a task/method/seed)."""
        return (self.task, self.method, self.seed, self.model, self.preset, self.dtype, self.device, self.train,
                self.task_hash, self.train_data_hash, self.model_fingerprint, self.scoring_version)


# RunSpec fields of the demonstration variants (harness.demos) and their defaults: hashed only when different.
VARIANT_DEFAULTS = {"demos": "tfew", "order": 0, "label_noise": None}

NOT_HASHED = ("task_source", "model_path", "data_source", "calibrate")


def parse_int_list(text: str | None, what: str) -> list[int]:
    """Parse ``"0,1,32"`` into ints with a clear error."""
    if text is None or str(text).strip() == "":
        return []
    try:
        return [int(x) for x in str(text).split(",") if x.strip() != ""]
    except ValueError as exc:
        raise HarnessError(f"{what} must be comma-separated integers, got {text!r}") from exc


def parse_name_list(text: str | None) -> list[str]:
    return [x.strip() for x in str(text or "").split(",") if x.strip()]
