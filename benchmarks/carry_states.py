"""Carry killed trainings' states off a lent GPU machine and back onto a fresh one (issue 11's grid).

A training killed at a call's deadline leaves its state (``<group>.train_state.pt``, :mod:`harness.train_state`)
beside the store's adapters, and the same job continues it at that step; but the files live under /tmp on the
machine, which goes back 30 s after a call. ``benchmarks/run_device_real.sh`` therefore packs them into
``$OUT/train_states.tar.gz`` beside the store (smallest first, up to ``--max-mb``: a file that comes back is at most
16 MiB, and a call carries at most 64 MiB in all), and a later call that carries the archive in
(``.gpu/store/train_states.tar.gz``) unpacks it before its jobs start, on a fresh machine or in a later session:

    python -m benchmarks.carry_states pack ADAPTERS_DIR OUT.tar.gz [--max-mb 15]
    python -m benchmarks.carry_states unpack ARCHIVE.tar.gz ADAPTERS_DIR

A state that does not match its training's settings is ignored by the runner (and overwritten), and a finished
training's state is never read, so an archive older than the store costs nothing but its unpacking.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

SUFFIX = ".train_state.pt"


def choose(states: list[tuple[str, int]], max_bytes: int) -> tuple[list[str], list[str]]:
    """Names to pack (smallest first while the total stays within ``max_bytes``) and names left behind."""
    chosen, left, total = [], [], 0
    for name, size in sorted(states, key=lambda s: (s[1], s[0])):
        if total + size <= max_bytes:
            chosen.append(name)
            total += size
        else:
            left.append(name)
    return chosen, left


def pack(adapters: Path, archive: Path, max_mb: float) -> tuple[list[str], list[str]]:
    """Pack the states under ``adapters`` that fit into ``archive`` (none: no archive written)."""
    states = [(p.name, p.stat().st_size) for p in sorted(adapters.glob(f"*{SUFFIX}"))] if adapters.is_dir() else []
    chosen, left = choose(states, int(max_mb * 2**20))
    if chosen:
        with tarfile.open(archive, "w:gz") as tar:
            for name in chosen:
                tar.add(adapters / name, arcname=name)
    return chosen, left


def unpack(archive: Path, adapters: Path) -> list[str]:
    """Extract the states of ``archive`` into ``adapters`` (plain state files only), replacing any there."""
    adapters.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(SUFFIX) and "/" not in m.name]
        tar.extractall(adapters, members=members, filter="data")
    return [m.name for m in members]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack the states of an adapters folder into an archive")
    p.add_argument("adapters", type=Path)
    p.add_argument("archive", type=Path)
    p.add_argument("--max-mb", type=float, default=15.0)
    u = sub.add_parser("unpack", help="unpack an archive of states into an adapters folder")
    u.add_argument("archive", type=Path)
    u.add_argument("adapters", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        chosen, left = pack(args.adapters, args.archive, args.max_mb)
        print(f"training states packed into {args.archive}: {len(chosen)}" if chosen else "no training state packed")
        for name in left:
            print(f"training state left on the machine (over --max-mb {args.max_mb:g}): {name}")
    else:
        names = unpack(args.archive, args.adapters)
        print(f"training states restored into {args.adapters}: {len(names)}")


if __name__ == "__main__":
    main()
