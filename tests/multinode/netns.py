"""Several "machines" on one host, for tests: Linux network namespaces joined by a switch, each with its own
hostname and address, sharing this host's file system as a cluster shares its shared file system.

    with Machines(2) as machines:              # needs root and iproute2; everything is deleted on exit
        machines[0].address                    # "10.231.0.1" (machine i: SUBNET.<i+1>, interface eth0)
        machines[1].popen([...], log=path)     # runs inside machine 1's namespace, hostname colorize-node1
        machines[1].kill()                     # SIGKILL to every process of machine 1

Each machine is a namespace with a veth interface whose other end sits on a bridge inside a hub namespace that
only the machines reach: no address is added to this host's own namespace and no route leads out, so nothing
the machines send can leave them. Names carry this process's pid, so test sessions running side by side do not
collide, and tests that need machines of their own at the same time take another prefix and subnet; namespaces left
by a session that was killed (its pid gone) are deleted by the next one. `problem()`
says why machines cannot be made here (not root, no `ip netns`), for a skip reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.231.0"  # private; it exists only inside the namespaces made here
INTERFACE = "eth0"  # the machines' interface (inside each namespace), as on a real node


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def problem() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, e.g. in CI)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, util-linux)"
    name = f"colorize-probe-{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "delete", name, check=False)
    return None


def sweep_stale(prefix: str) -> None:
    """Delete the namespaces of sessions that ended without cleaning up (killed), with what still runs in them."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for name in (line.split()[0] for line in listed if line.strip()):
        match = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-(?:hub|node\d+)", name)
        if match is None or _alive(int(match.group(1))):
            continue
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "delete", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Machine:
    index: int
    namespace: str
    hostname: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this machine: its network namespace, and a UTS namespace with its hostname."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.hostname, *argv]

    def popen(self, argv: list[str], *, log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start `argv` on this machine, stdout and stderr to `log`."""
        with log.open("ab") as out:
            return subprocess.Popen(self.command(argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True)

    def pids(self) -> list[int]:
        """Every process running on this machine (in its network namespace)."""
        listed = _ip("netns", "pids", self.namespace, check=False).stdout
        return [int(pid) for pid in listed.split()]

    def signal(self, signum: int) -> list[int]:
        """Send `signum` to every process of this machine; returns their pids."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return pids

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL every process of this machine, as when it loses power, until none is left."""
        deadline = time.monotonic() + timeout
        while self.signal(signal.SIGKILL):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of {self.hostname} survive SIGKILL: {self.pids()}")
            time.sleep(0.1)


class Machines:
    """`count` machines on one switch; a context manager that deletes every namespace and link it made."""

    def __init__(self, count: int, prefix: str = "colorize", subnet: str = SUBNET):
        if not 2 <= count <= 200:
            raise ValueError(f"count must be 2..200, got {count}")
        self.prefix = prefix
        tag = f"{prefix}-{os.getpid()}"
        self.hub = f"{tag}-hub"
        self.machines = [Machine(i, f"{tag}-node{i}", f"{prefix}-node{i}", f"{subnet}.{i + 1}") for i in range(count)]

    def __enter__(self) -> Machines:
        sweep_stale(self.prefix)
        try:
            self._create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.delete()

    def __getitem__(self, index: int) -> Machine:
        return self.machines[index]

    def __iter__(self):
        return iter(self.machines)

    def __len__(self) -> int:
        return len(self.machines)

    def _create(self) -> None:
        _ip("netns", "add", self.hub)
        _ip("-n", self.hub, "link", "add", "switch", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "switch", "up")
        for machine in self.machines:
            # Made in the hub (so no link ever appears in this host's namespace), then one end moved to the machine.
            port, nic = f"port{machine.index}", f"nic{machine.index}"
            _ip("netns", "add", machine.namespace)
            _ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", nic)
            _ip("-n", self.hub, "link", "set", nic, "netns", machine.namespace)
            _ip("-n", self.hub, "link", "set", port, "master", "switch", "up")
            _ip("-n", machine.namespace, "link", "set", nic, "name", INTERFACE)
            _ip("-n", machine.namespace, "addr", "add", f"{machine.address}/24", "dev", INTERFACE)
            _ip("-n", machine.namespace, "link", "set", INTERFACE, "up")
            _ip("-n", machine.namespace, "link", "set", "lo", "up")
        self._wait_until_connected()

    def _wait_until_connected(self, timeout: float = 10) -> None:
        """Until machine 0 reaches every other machine over TCP (links come up asynchronously)."""
        check = ("import socket, sys\n"
                 "for address in sys.argv[1:]:\n"
                 "    try:\n"
                 "        socket.create_connection((address, 9), timeout=1).close()\n"
                 "    except ConnectionRefusedError:\n"
                 "        pass  # the machine answered: nothing listens on port 9\n")
        others = [machine.address for machine in self.machines[1:]]
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run(self.machines[0].command([sys.executable, "-c", check, *others]),
                                   capture_output=True, text=True, timeout=timeout + 5)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"machines not connected after {timeout:.0f} s: {probe.stderr.strip()[-500:]}")
            time.sleep(0.2)

    def delete(self) -> None:
        """Kill every process left on the machines and delete their namespaces (their links go with them)."""
        for machine in self.machines:
            with contextlib.suppress(TimeoutError):
                machine.kill()
        for namespace in [machine.namespace for machine in self.machines] + [self.hub]:
            _ip("netns", "delete", namespace, check=False)
