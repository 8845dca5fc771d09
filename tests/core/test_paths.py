"""``vlmkit.core.paths``: folders written under a temporary name, and the ones a killed writer left."""

from __future__ import annotations

import os
import subprocess

from vlmkit.core.paths import staged_folder


def test_a_staged_folder_names_its_writer_and_removes_only_the_leftovers_of_dead_writers(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer runs: a writer killed with -9
    dead = tmp_path / f".model.{gone.pid}-k1ll3d_x.partial"
    live = tmp_path / f".model.{os.getppid()}-runn1ng0.partial"  # another writer, still running
    other = tmp_path / f".model.v2.{gone.pid}-0th3rtgt.partial"  # a dead writer of "model.v2"
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "half.bin").write_bytes(b"half")

    with staged_folder(tmp_path / "model") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".model.{os.getpid()}-")
        assert tmp.name.endswith(".partial")
        (tmp / "whole.bin").write_bytes(b"whole")

    assert (tmp_path / "model" / "whole.bin").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "model"])
