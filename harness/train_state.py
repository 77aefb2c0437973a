"""A training's state between steps, on disk, so that an interrupted training continues at the step it reached.

:func:`harness.training.train` writes a :class:`TrainState` file after a step when enough time has passed since
the last write (at least ``min_seconds``, and at least ``cost_factor`` times the last write's duration, so writing
costs at most about 1/``cost_factor`` of the training: a large model's state is large), and reads it back at the
start of a training whose file exists. The file holds everything the next step depends on: the trainable
parameters and their float32 masters, the optimizer's and the schedule's states, the example sampler (Python RNG
and queue), torch's CPU and CUDA RNG states, the micro-batching after any out-of-memory halving, and the stats of
the steps so far, and what a method keeps between steps (``MethodInfo.step_state``: AdaLoRA's importance
scores and rank pattern). So the resumed training computes the same steps as an uninterrupted one (bit for bit on the
CPU: ``tests/test_train_state.py``). Its figures: the losses, tokens and FLOPs of all steps (the saved stats carry
on), ``seconds`` (``train_seconds``) the sum of both parts' training wall time (neither part's model loading), and
peak memory that of the process that finished it (the same model, batches and optimizer as the first part's).

A caller that is about to kill the trainings (the device script at its deadline) asks them to write their
state now: :func:`request_save` touches ``SAVE_REQUEST`` in the states' folder, and every training there writes
its state after its next step (once per request: a request older than a training's last write or start is
ignored), so a killed training loses the seconds after the request instead of up to ``min_seconds``.

A training that ran at least as long as that wait also writes its state after the last step, and the runner names
the file after the training group (``ADAPTERS/<group hash>.train_state.pt``, beside the adapter folder it will
write) and removes it only once every run of the group is stored: a run killed while it evaluates (P-tuning's
evaluation, one row at a time, outlasted a grid call's deadline in round 27) continues with the trained adapter
restored from that state, no step redone. The file also records the training settings,
seed and example count; one that does not match is ignored (with a warning) and overwritten. Methods with state
outside these that they cannot save (FishMask's Fisher masks) are not resumed: the runner passes no state
file for them, and they start again from step 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMAT = 1
SAVE_REQUEST = "SAVE_NOW"  # a file in the states' folder: every training there writes its state after its next step


@dataclasses.dataclass
class TrainState:
    """Where a training keeps its state (``path``) and how often it writes it."""

    path: Path
    min_seconds: float = 60.0  # wall seconds between writes at least (0: after every step; tests)
    cost_factor: float = 20.0  # and at least this many times the last write's duration
    _last: float = dataclasses.field(default_factory=time.perf_counter, init=False, repr=False)
    _cost: float = dataclasses.field(default=0.0, init=False, repr=False)
    _last_wall: float = dataclasses.field(default_factory=time.time, init=False, repr=False)  # for requests' mtimes

    def interval(self) -> float:
        """Seconds between two writes at least: ``min_seconds``, and ``cost_factor`` times the last write's
        duration (a large state is written less often)."""
        return max(self.min_seconds, self.cost_factor * self._cost)

    def due(self) -> bool:
        """Whether :meth:`interval` has passed since the last write (or the training's start), or a save was
        requested after it (:func:`request_save`)."""
        if time.perf_counter() - self._last >= self.interval():
            return True
        try:
            return (self.path.parent / SAVE_REQUEST).stat().st_mtime > self._last_wall
        except FileNotFoundError:
            return False

    def save(self, key: dict, step: int, *, params, masters, optimizer, schedule, rng: random.Random, queue: list,
             stats, micro: int, accum: int, method_state: dict | None = None) -> None:
        """Write the state after ``step`` (0-based, done) atomically: a killed write leaves the previous file."""
        start = time.perf_counter()
        state = {
            "format": FORMAT, "key": _key_text(key), "next_step": step + 1,
            "params": [p.detach().cpu().clone() for p in params],
            "masters": [p.detach().cpu().clone() for p in masters.params],
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "rng": rng.getstate(), "queue": list(queue), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "stats": stats, "micro": micro, "accum": accum,
            "method_state": method_state,  # MethodInfo.step_state's (AdaLoRA's allocator), else None
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self._last = time.perf_counter()
        self._last_wall = time.time()
        self._cost = self._last - start

    def load(self, key: dict) -> dict | None:
        """The saved state when the file exists and was written for ``key``; else None."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)  # a file this module wrote
        except Exception as exc:  # noqa: BLE001 - a damaged file: train from the start
            log.warning("ignoring the training state %s (%s: %s); training from step 0", self.path,
                        type(exc).__name__, exc)
            return None
        if state.get("format") != FORMAT or state.get("key") != _key_text(key):
            log.warning("ignoring the training state %s: written for another training; training from step 0",
                        self.path)
            return None
        self._last = time.perf_counter()
        self._last_wall = time.time()
        return state

    def remove(self) -> None:
        """Delete the state file and any half-written copy a killed write left (``<name>.<pid>.tmp``)."""
        self.path.unlink(missing_ok=True)
        for stale in self.path.parent.glob(self.path.name + ".*.tmp"):
            stale.unlink(missing_ok=True)


@torch.no_grad()
def restore(state: dict, *, params, masters, optimizer, schedule, rng: random.Random) -> None:
    """Put ``state`` (from :meth:`TrainState.load`) back into a freshly set-up training."""
    for p, saved in zip(params, state["params"], strict=True):
        p.copy_(saved)
    for p, saved in zip(masters.params, state["masters"], strict=True):
        p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def request_save(folder: str | Path) -> Path:
    """Ask every training keeping its state in ``folder`` to write it after its next step (see the module
    docstring); returns the request file. ``python -m harness.train_state --request-save FOLDER``."""
    request = Path(folder) / SAVE_REQUEST
    request.parent.mkdir(parents=True, exist_ok=True)
    request.touch()  # an existing file gets a new mtime: a new request
    return request


def saved_progress(folder: str | Path) -> dict[str, tuple[int, int]]:
    """The training states in ``folder`` (an adapters folder, ``<store>.artifacts/adapters``): file name -> (the
    step its training continues at, the training's steps). What a killed run leaves for the next one: a state
    with the two equal is a finished training whose runs were being scored."""
    progress = {}
    for path in sorted(Path(folder).glob("*.train_state.pt")):
        # mmap: only the step and key are read, not a full fine-tuning's parameters and optimizer state
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        progress[path.name] = (int(state["next_step"]), int(json.loads(state["key"])["settings"]["steps"]))
    return progress


def saved_steps(folder: str | Path) -> dict[str, int]:
    """File name -> the step its training continues at, of :func:`saved_progress`."""
    return {name: step for name, (step, _) in saved_progress(folder).items()}


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


if __name__ == "__main__":  # python -m harness.train_state [--request-save] ADAPTERS_FOLDER
    import sys

    if sys.argv[1] == "--request-save":  # before a kill: every training there writes its state after its next step
        print(f"requested a state save: {request_save(sys.argv[2])}")
        sys.exit(0)
    found = saved_progress(sys.argv[1])
    print(f"saved training states: {len(found)} (a killed training without one starts again from step 0)")
    for name, (step, steps) in found.items():
        print(f"  {name}: trained ({step} steps); scoring its runs continues" if step >= steps
              else f"  {name}: continues at step {step}")
