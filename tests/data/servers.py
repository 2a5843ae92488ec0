"""nginx for the remote-shard tests: skipped with the reason where it is missing, required where CI says so."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from colorize_dist.bench.serve import NGINX, Nginx
from tests.data.helpers import flip_sample


def require_nginx() -> None:
    """Skip (with the reason) where nginx is not installed, unless COLORIZE_DIST_REQUIRE_NGINX=1 (CI) fails."""
    if not os.path.exists(NGINX):
        if os.environ.get("COLORIZE_DIST_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is required (COLORIZE_DIST_REQUIRE_NGINX=1) but not installed: apt-get install -y nginx")
        pytest.skip("nginx is not installed (apt-get install -y nginx)")


@contextlib.contextmanager
def good_and_bad_sets(shards: Path, www: Path, run: Path, *, damaged_key: str,
                      access_log: bool = False) -> Iterator[tuple[Nginx, Path]]:
    """nginx serving `www`, which holds a copy of `shards` (`good/`) and a copy with sample `damaged_key` of the
    second train shard flipped (`bad/`)."""
    require_nginx()
    shutil.copytree(shards, www / "good")
    shutil.copytree(shards, www / "bad")
    flip_sample(www / "bad", "train/train-000001.tar", key=damaged_key)
    server = Nginx(www, run, access_log=access_log).start()
    try:
        yield server, www
    finally:
        server.stop()
