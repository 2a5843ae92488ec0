"""`bench checkpoint` measures both variants on real saves and leaves complete, pruned checkpoints behind."""

from __future__ import annotations

from pathlib import Path

from colorize_dist.bench.checkpoint import measure
from colorize_dist.training import checkpoint


def test_both_variants_save_complete_checkpoints(tmp_path: Path) -> None:
    rows = measure("tiny", tmp_path, repeats=1)
    assert [row[0] for row in rows] == ["on the step", "background"]
    for _, size, blocked, complete in rows:
        assert size > 0.1 and 0 < blocked <= complete
    kept = checkpoint.step_checkpoints(tmp_path)
    assert [folder.name for folder in kept] == ["step-0000001", "step-0000002"]
    assert all(checkpoint.check(folder) is None for folder in kept)
