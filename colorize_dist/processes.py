"""Child processes that end with their parent: loader workers, a study's point trainers."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def dies_with_parent(signum: int, parent: int) -> Callable[[], None]:
    """What a child runs first (a `preexec_fn`, a worker's init): `signum` to it when the thread that started it
    ends (PR_SET_PDEATHSIG, which survives exec), and an exit at once if `parent` died before that call. The libc
    lookup happens here, before the fork. Without prctl (not Linux) the returned call does nothing."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:
            os._exit(1)

    return arm
