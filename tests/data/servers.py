"""nginx for the remote-shard tests: skipped with the reason where it is missing, required where CI says so."""

from __future__ import annotations

import os

import pytest

from colorize_dist.bench.serve import NGINX


def require_nginx() -> None:
    """Skip (with the reason) where nginx is not installed, unless COLORIZE_DIST_REQUIRE_NGINX=1 (CI) fails."""
    if not os.path.exists(NGINX):
        if os.environ.get("COLORIZE_DIST_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is required (COLORIZE_DIST_REQUIRE_NGINX=1) but not installed: apt-get install -y nginx")
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
