"""Training on several machines: the network interface gloo uses, and one line naming a rank or node that is lost.

Interface. Without GLOO_SOCKET_IFNAME, gloo binds to the address its host name resolves to, and to 127.0.0.1 when
that is a loopback address or does not resolve: it then advertises 127.0.0.1, the other nodes dial their own
loopback ("Connection refused") and the rest wait. `choose_gloo_interface` sets GLOO_SOCKET_IFNAME, for a gloo job
that spans nodes, to the interface that holds this node's address on its route to MASTER_ADDR, and raises a
one-line ConfigError naming the variable to set when there is no such interface.

Lost peers. A rank that dies (kill -9, a crashed node) breaks the others' next collective ("Connection reset by
peer"); one that stops answering (a frozen node, a cut network) makes it time out after train.collective_timeout_s.
Inside `reporting_lost_peers`, every rank answers on a small TCP port of its own (its address and port are
exchanged once, at the start). When a collective fails, each rank asks every other rank whether it is there
(PROBE_TIMEOUT_S at most) and raises PeerLostError naming the ranks, and their nodes, that did not answer. A rank
that has given up leaves a stand-in answering for it for a while, so that ranks which notice the failure later do
not count it as lost. The lowest remaining rank of each node reports the error (`PeerLostError.report`).

Why a probe of our own: torch's means answer other questions. `monitored_barrier(wait_all_ranks=True)` names the
ranks that miss a barrier, but it runs on a gloo group over the job's c10d store, which lives with rank 0 (the
agent of node 0): when node 0 is the one lost there is no store to build that group on, and the group that just
failed is broken. The launcher's failure handling (torch elastic) reports only its own node's workers, and
`srun --kill-on-bad-exit` ends the job without saying who. Peer-to-peer answers need neither rank 0 nor a working
group, which is the case to report.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil

from colorize_dist import collectives
from colorize_dist.config import ConfigError

PROBE_TIMEOUT_S = 3.0  # how long a rank that gave up waits for each other rank to answer
STAND_IN_S = 30.0  # how long a rank that gave up keeps answering (through a stand-in process) after it exits


class PeerLostError(RuntimeError):
    """A collective failed because other ranks no longer answer; the message names them and their nodes."""

    def __init__(self, message: str, report: bool, lost: str = "", first: bool = False):
        super().__init__(message)
        self.report = report  # True on the lowest remaining rank of each node: it prints the message
        self.lost = lost  # who: "rank 1 (node n1, 10.0.0.2)"
        self.first = first  # True on the lowest remaining rank of all: it records the loss (elastic.record_loss)


@dataclass(frozen=True)
class Peer:
    rank: int
    node: str  # host name
    address: str  # its node's address on the job's network
    port: int  # where it answers


# ---------------------------------------------------------------------------------------------- the interface

def choose_gloo_interface(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set GLOO_SOCKET_IFNAME in `environ` for a job whose processes span several nodes, unless already set.

    Returns the interface chosen (None: single node, not launched by torchrun/Accelerate/Slurm, or set by the user);
    ConfigError with one line when no interface can be chosen.
    """
    if environ.get("GLOO_SOCKET_IFNAME") or not _spans_nodes(environ):
        return None
    master = environ.get("MASTER_ADDR", "")
    source = _route_source(master)
    if source is None:
        raise ConfigError(f"MASTER_ADDR={master!r} does not resolve to an IPv4 address this node can reach; set it to "
                          "the first node's address, or set GLOO_SOCKET_IFNAME to the interface the nodes share")
    interfaces = interface_addresses()
    if ipaddress.ip_address(source).is_loopback:
        node = _node_rank(environ)
        if node != 0:
            raise ConfigError(f"MASTER_ADDR={master} is a loopback address, but this is node {node} of a job that "
                              "spans nodes: set it (accelerate launch --main_process_ip, torchrun --master-addr) to "
                              "the first node's address that every node reaches")
        # The master's own node, whose name resolves to 127.0.x.x: the others reach it on its only network, if any.
        others = {name: address for name, address in interfaces.items()
                  if not ipaddress.ip_address(address).is_loopback}
        if len(others) != 1:
            raise ConfigError(f"MASTER_ADDR={master} resolves to a loopback address on its own node, which has "
                              f"{len(others)} other interfaces ({', '.join(others) or 'none'}): set "
                              "GLOO_SOCKET_IFNAME to the one the other nodes reach it on")
        (name,) = others
    else:
        name = next((name for name, address in interfaces.items() if address == source), None)
        if name is None:
            raise ConfigError(f"no interface holds {source}, this node's address towards MASTER_ADDR={master}: set "
                              "GLOO_SOCKET_IFNAME to the interface the nodes share")
    environ["GLOO_SOCKET_IFNAME"] = name
    if environ.get("LOCAL_RANK", "0") == "0":
        print(f"gloo: interface {name} ({interfaces[name]}) towards MASTER_ADDR={master}; set GLOO_SOCKET_IFNAME to "
              "choose another", file=sys.stderr, flush=True)
    return name


def interface_addresses() -> dict[str, str]:
    """Each network interface's (first) IPv4 address, by interface name; interfaces without one are left out."""
    addresses = {}
    for name, entries in psutil.net_if_addrs().items():
        ipv4 = [entry.address for entry in entries if entry.family == socket.AF_INET]
        if ipv4:
            addresses[name] = ipv4[0]
    return addresses


def _spans_nodes(environ: MutableMapping[str, str]) -> bool:
    """torchrun (so `accelerate launch`) and our Slurm launcher set WORLD_SIZE and LOCAL_WORLD_SIZE."""
    try:
        return int(environ["WORLD_SIZE"]) > int(environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return False


def _node_rank(environ: MutableMapping[str, str]) -> int:
    if "GROUP_RANK" in environ:  # torchrun's node rank
        return int(environ["GROUP_RANK"])
    return int(environ.get("RANK", 0)) // max(1, int(environ.get("LOCAL_WORLD_SIZE", 1)))


def _route_source(host: str) -> str | None:
    """The source address this node uses to reach `host` (a route lookup: nothing is sent), or None."""
    try:
        target = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((target, 9))
            return sock.getsockname()[0]
    except (OSError, IndexError, UnicodeError):
        return None


def _node_address(environ: MutableMapping[str, str] = os.environ) -> str:
    """Where the other ranks reach this process: the gloo interface's address, else the route to MASTER_ADDR."""
    interface = environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
    address = interface_addresses().get(interface) if interface else None
    return address or _route_source(environ.get("MASTER_ADDR", "127.0.0.1")) or "127.0.0.1"


# ---------------------------------------------------------------------------------------------- lost peers

@contextlib.contextmanager
def reporting_lost_peers() -> Iterator[None]:
    """Within the block, a RuntimeError while other ranks no longer answer becomes PeerLostError (see the module).

    Call on every rank once the process group is up; it exchanges addresses in one collective.
    """
    if collectives.world_size() == 1:
        yield
        return
    responder = _Responder(_node_address(), collectives.rank())
    roster: list[Peer] = collectives.all_gather_objects(
        Peer(collectives.rank(), socket.gethostname(), responder.address, responder.port))
    try:
        yield
    except RuntimeError as exc:
        if not collectives.is_collective_error(exc):  # e.g. NonFiniteLossError, which every rank raises alike
            raise
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            # The launcher may stop this process once another rank has failed; finish the report first (seconds).
            on_sigterm = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        me = roster[collectives.rank()]
        lost = _unanswered([peer for peer in roster if peer != me])
        if not lost:
            if main_thread:
                signal.signal(signal.SIGTERM, on_sigterm)
            raise
        responder.hand_over(STAND_IN_S)
        present = [peer.rank for peer in roster if peer not in lost]
        on_node = [rank for rank in present if roster[rank].node == me.node]
        raise PeerLostError(_describe(lost, len(roster), exc), report=me.rank == min(on_node), lost=_who(lost),
                            first=me.rank == min(present)) from exc
    finally:
        responder.close()


def _unanswered(peers: list[Peer]) -> list[Peer]:
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(peers)))) as pool:
        answered = list(pool.map(_answers, peers))
    return [peer for peer, ok in zip(peers, answered, strict=True) if not ok]


def _answers(peer: Peer) -> bool:
    try:
        with socket.create_connection((peer.address, peer.port), timeout=PROBE_TIMEOUT_S) as sock:
            return sock.recv(64).startswith(b"rank")  # a frozen process's kernel accepts; only a live one answers
    except OSError:
        return False


def _describe(lost: list[Peer], world: int, exc: BaseException) -> str:
    return (f"lost {_who(lost)} of {world} ranks: no answer (crashed, killed, frozen or cut off from the network); "
            f"the collective here failed with: {_gist(exc)}")


def _who(lost: list[Peer]) -> str:
    """'rank 1 (node n1, 10.0.0.2)', 'ranks 2-3 (node n1, 10.0.0.2) and rank 5 (node n2, 10.0.0.3)'."""
    by_node: dict[tuple[str, str], list[int]] = {}
    for peer in lost:
        by_node.setdefault((peer.node, peer.address), []).append(peer.rank)
    return " and ".join(f"{'ranks' if len(ranks) > 1 else 'rank'} {_ranges(ranks)} (node {node}, {address})"
                        for (node, address), ranks in by_node.items())


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    spans: list[list[int]] = []
    for number in sorted(numbers):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _gist(exc: BaseException) -> str:
    """gloo's message without its source location and advice: 'Read error [10.0.0.2]:41234: Connection reset'."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return text.split(". This is typically caused")[0].rstrip(".")


class _Responder:
    """Answers 'rank N' on a TCP port from a daemon thread; `hand_over` leaves a stand-in process answering."""

    def __init__(self, address: str, rank: int):
        self.rank = rank
        self.sock = socket.create_server((address, 0), backlog=128)
        self.address, self.port = self.sock.getsockname()[:2]
        self._handed_over = False
        self._thread = threading.Thread(target=self._serve, name="colorize-peer-responder", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        reply = f"rank {self.rank}\n".encode()
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:  # closed
                return
            with contextlib.suppress(OSError), connection:
                connection.sendall(reply)

    def hand_over(self, seconds: float) -> None:
        """Keep answering for `seconds` after this process exits: the ranks that notice the failure later must not
        take this one, which saw it first, for lost."""
        with contextlib.suppress(OSError):
            self._handed_over = True
            subprocess.Popen([sys.executable, "-S", "-c", _STAND_IN, str(self.sock.fileno()), str(self.rank),
                              str(seconds)], pass_fds=(self.sock.fileno(),), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self) -> None:
        if self._handed_over:
            return  # the stand-in shares the socket: shutting it down would silence it too; exit closes ours
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
        self.sock.close()


_STAND_IN = """
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
sock.settimeout(0.5)
reply, end = f"rank {sys.argv[2]}\\n".encode(), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        connection, _ = sock.accept()
    except OSError:
        continue
    with connection:
        connection.sendall(reply)
"""
