"""colorize_dist/training/peers.py without a network: which interface gloo gets, the lost-peer line, the timeout.

The same code on two emulated machines, with real failures, is tests/multinode/test_two_nodes.py.
"""

from __future__ import annotations

import pytest

from colorize_dist.config import ConfigError
from colorize_dist.training import peers
from colorize_dist.training.build import process_group_kwargs
from colorize_dist.training.config import load_training_config

TWO_NODES = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29500"}


def test_a_single_node_or_a_chosen_interface_is_left_alone() -> None:
    one_node = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    assert peers.choose_gloo_interface(one_node) is None and "GLOO_SOCKET_IFNAME" not in one_node
    chosen = TWO_NODES | {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "ib0"}
    assert peers.choose_gloo_interface(chosen) is None and chosen["GLOO_SOCKET_IFNAME"] == "ib0"
    assert peers.choose_gloo_interface({"MASTER_ADDR": "127.0.0.1"}) is None  # not launched by torchrun or Slurm


def test_a_loopback_master_addr_on_another_node_is_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        peers.choose_gloo_interface(TWO_NODES | {"MASTER_ADDR": "127.0.0.1", "GROUP_RANK": "1"})
    assert str(error.value) == (
        "MASTER_ADDR=127.0.0.1 is a loopback address, but this is node 1 of a job that spans nodes: set it "
        "(accelerate launch --main_process_ip, torchrun --master-addr) to the first node's address that every node "
        "reaches")


def test_the_master_node_whose_name_is_loopback_uses_its_only_network(monkeypatch, capsys) -> None:
    """Debian's /etc/hosts maps the host's own name to 127.0.1.1: the first node then routes MASTER_ADDR to lo."""
    monkeypatch.setattr(peers, "interface_addresses", lambda: {"lo": "127.0.0.1", "eth0": "192.0.2.10"})
    environ = TWO_NODES | {"MASTER_ADDR": "127.0.0.1", "RANK": "1", "LOCAL_RANK": "1"}
    assert peers.choose_gloo_interface(environ) == "eth0" and environ["GLOO_SOCKET_IFNAME"] == "eth0"
    assert capsys.readouterr().err == ""  # said once per node, by local rank 0

    monkeypatch.setattr(peers, "interface_addresses",
                        lambda: {"lo": "127.0.0.1", "eth0": "192.0.2.10", "ib0": "198.51.100.4"})
    with pytest.raises(ConfigError, match=r"which has 2 other interfaces \(eth0, ib0\): set GLOO_SOCKET_IFNAME"):
        peers.choose_gloo_interface(TWO_NODES | {"MASTER_ADDR": "127.0.0.1", "GROUP_RANK": "0"})


def test_the_interface_that_holds_the_route_to_master_addr(monkeypatch, capsys) -> None:
    monkeypatch.setattr(peers, "_route_source", lambda host: "192.0.2.10")
    monkeypatch.setattr(peers, "interface_addresses", lambda: {"lo": "127.0.0.1", "eth1": "192.0.2.10"})
    environ = TWO_NODES | {"MASTER_ADDR": "node0", "LOCAL_RANK": "0"}
    assert peers.choose_gloo_interface(environ) == "eth1"
    assert capsys.readouterr().err == ("gloo: interface eth1 (192.0.2.10) towards MASTER_ADDR=node0; set "
                                       "GLOO_SOCKET_IFNAME to choose another\n")
    monkeypatch.setattr(peers, "interface_addresses", lambda: {"lo": "127.0.0.1"})
    with pytest.raises(ConfigError, match=r"no interface holds 192\.0\.2\.10, .* set GLOO_SOCKET_IFNAME"):
        peers.choose_gloo_interface(TWO_NODES | {"MASTER_ADDR": "node0"})


def test_the_lost_peer_line_names_ranks_nodes_and_the_error() -> None:
    lost = [peers.Peer(rank, "node7", "10.0.0.7", 5000 + rank) for rank in (4, 5, 6, 9)]
    error = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                         "[10.0.0.7]:41234: Connection reset by peer. This is typically caused by a remote worker "
                         "crashing. Check the logs of the remote worker before reporting an error. GLHF!")
    assert peers._describe(lost, 16, error) == (
        "lost ranks 4-6, 9 (node node7, 10.0.0.7) of 16 ranks: no answer (crashed, killed, frozen or cut off from the "
        "network); the collective here failed with: Read error [10.0.0.7]:41234: Connection reset by peer")
    timeout = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv "
                           "operation to complete")
    assert peers._describe(lost[:1], 2, timeout).startswith("lost rank 4 (node node7, 10.0.0.7) of 2 ranks")
    assert peers._gist(timeout) == "Timed out waiting 20000ms for recv operation to complete"


@pytest.mark.parametrize("seconds", [20, 600, 1800])
def test_the_collective_timeout_reaches_the_process_group(seconds: int) -> None:
    """Accelerate drops handler values equal to its defaults; 600 s must still reach init_process_group."""
    cfg = load_training_config(None, [f"train.collective_timeout_s={seconds}"])
    kwargs = process_group_kwargs(cfg, None).to_kwargs()
    assert round(kwargs["timeout"].total_seconds()) == seconds
    assert kwargs.get("backend") is None  # Accelerate's choice
    with pytest.raises(ConfigError, match=r"train\.collective_timeout_s must be positive"):
        load_training_config(None, ["train.collective_timeout_s=0"])
