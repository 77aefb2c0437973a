"""benchmarks/carry_states.py: killed trainings' states packed off a lent machine (smallest first, within a size)
and unpacked on a fresh one, byte for byte; nothing but state files comes out of an archive."""

from __future__ import annotations

import io
import tarfile

from benchmarks.carry_states import choose, pack, unpack


def test_choose_packs_smallest_first_within_the_limit():
    chosen, left = choose([("big.train_state.pt", 900), ("a.train_state.pt", 300), ("b.train_state.pt", 400)], 800)
    assert chosen == ["a.train_state.pt", "b.train_state.pt"] and left == ["big.train_state.pt"]
    assert choose([], 10) == ([], [])


def test_pack_then_unpack_restores_the_states(tmp_path):
    adapters = tmp_path / "paper.artifacts" / "adapters"
    adapters.mkdir(parents=True)
    (adapters / "g1.train_state.pt").write_bytes(b"1" * 1000)
    (adapters / "g2.train_state.pt").write_bytes(b"2" * 3000)
    (adapters / "g3").mkdir()  # a finished adapter's folder: not a state
    archive = tmp_path / "train_states.tar.gz"
    chosen, left = pack(adapters, archive, max_mb=2000 / 2**20)
    assert chosen == ["g1.train_state.pt"] and left == ["g2.train_state.pt"]
    fresh = tmp_path / "fresh" / "adapters"
    assert unpack(archive, fresh) == ["g1.train_state.pt"]
    assert (fresh / "g1.train_state.pt").read_bytes() == b"1" * 1000
    assert sorted(p.name for p in fresh.iterdir()) == ["g1.train_state.pt"]


def test_pack_without_states_writes_nothing(tmp_path):
    assert pack(tmp_path / "missing", tmp_path / "s.tar.gz", 15) == ([], [])
    assert not (tmp_path / "s.tar.gz").exists()


def test_unpack_takes_only_plain_state_files(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("ok.train_state.pt", "../evil.train_state.pt", "notes.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"xy"))
    out = tmp_path / "adapters"
    assert unpack(archive, out) == ["ok.train_state.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["ok.train_state.pt"]
    assert not (tmp_path / "evil.train_state.pt").exists()
