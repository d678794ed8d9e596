"""A run directory's integrity: what a checkpoint's COMPLETE record vouches for."""

from __future__ import annotations

import json


def test_the_complete_record_vouches_for_itself(tmp_path):
    """A flipped byte in the COMPLETE record that leaves it valid JSON with every file matching (its time, its
    step) is caught as well: the record carries its own sha256."""
    from offline_kd.train.checkpoint import MARKER, damage, write_marker

    tag = tmp_path / "step00000003"
    tag.mkdir()
    (tag / "states.pt").write_bytes(b"states")
    write_marker(tag, 3)
    assert damage(tag) is None
    record = json.loads((tag / MARKER).read_text())
    record["step"] = 8
    (tag / MARKER).write_text(json.dumps(record))
    assert damage(tag) == f"its {MARKER} record does not match its own sha256"
