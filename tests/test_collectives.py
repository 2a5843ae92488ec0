"""The one module of collectives: nothing else in the package uses torch.distributed, and each collective gives
every rank the same answer (two gloo ranks)."""

from __future__ import annotations

import ast
import datetime
import multiprocessing
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

import colorize_dist
from colorize_dist import collectives

PACKAGE = Path(colorize_dist.__file__).parent
WORLD_SIZE = 2


def torch_distributed_uses(source: str) -> list[int]:
    """Lines that import torch.distributed or reach it as an attribute (`torch.distributed.x`); text in strings
    (a `python -m torch.distributed.run` command line) is not a use."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            if any(alias.name.startswith("torch.distributed") for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("torch.distributed") or (
                    module == "torch" and any(alias.name == "distributed" for alias in node.names)):
                lines.append(node.lineno)
        elif (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
              and node.value.id == "torch"):
            lines.append(node.lineno)
    return lines


def test_the_search_finds_every_way_in() -> None:
    source = ("import torch.distributed as dist\nfrom torch import distributed\nfrom torch.distributed import barrier\n"
              "import torch\ntorch.distributed.barrier()\ncommand = ['-m', 'torch.distributed.run']\n")
    assert torch_distributed_uses(source) == [1, 2, 3, 5]


def test_only_collectives_uses_torch_distributed() -> None:
    """Every place where ranks must agree is in colorize_dist/collectives.py, where its rule is written."""
    found = {f"{path.relative_to(PACKAGE.parent)}:{line}"
             for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "collectives.py"
             for line in torch_distributed_uses(path.read_text())}
    assert not found, f"torch.distributed used outside colorize_dist/collectives.py: {sorted(found)}"


def test_only_errors_of_torch_distributed_make_ranks_ask_who_is_left() -> None:
    """Errors every rank raises alike (NaN losses, a full disk) must stay what they are."""
    assert collectives.is_collective_error(
        RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error"))
    assert collectives.is_collective_error(dist.DistNetworkError("Connection reset by peer"))
    assert not collectives.is_collective_error(RuntimeError("20 batches in a row had a NaN/inf loss"))


def test_one_process_communicates_nothing() -> None:
    cpu = torch.device("cpu")
    assert not collectives.is_distributed()
    assert (collectives.rank(), collectives.world_size()) == (0, 1)
    assert collectives.any_rank(False, torch.tensor(True), device=cpu) == [False, True]
    assert collectives.agree(False, True) == [False, True]
    assert collectives.max_over_ranks(2.5, cpu) == 2.5
    rows = torch.arange(6.0).reshape(3, 2)
    assert collectives.gather_to_rank0(rows) is rows
    assert collectives.all_gather_objects("x") == ["x"]
    assert collectives.broadcast_from_rank0([1, "a"]) == [1, "a"]


def _rank_results(rank: int) -> dict:
    """What each collective gives this rank, ranks holding different values (rank r: r + 1 rows)."""
    cpu = torch.device("cpu")
    buffers = [torch.full((2,), float(rank)), torch.full((1, 1), 10.0 * rank)]
    collectives.mean_over_ranks_(buffers)
    sums = collectives.sum_over_ranks({"a": torch.tensor([1.0, rank], dtype=torch.float64),
                                       "b": torch.tensor([[rank + 1.0]], dtype=torch.float64)})
    gathered = collectives.gather_to_rank0(torch.full((rank + 1, 2), float(rank)))
    return {
        "rank": collectives.rank(), "world_size": collectives.world_size(),
        "any": collectives.any_rank(rank == 1, torch.tensor(False), device=cpu),
        "agree": collectives.agree(rank == 1, False),
        "max": collectives.max_over_ranks(float(rank), cpu),
        "sums": {name: value.tolist() for name, value in sums.items()},
        "mean": [buffer.tolist() for buffer in buffers],
        "gathered": None if gathered is None else gathered.tolist(),
        "broadcast": collectives.broadcast_from_rank0([f"from {rank}"]),
        "objects": collectives.all_gather_objects({"rank": rank}),
    }


def _control_results() -> dict:
    """The control group: under gloo, the main group itself; beside a main group of another backend (NCCL, which
    this machine lacks: only `get_backend`'s answer is played), a gloo group of its own that `agree` uses."""
    collectives.open_control_group(datetime.timedelta(seconds=60))
    under_gloo = collectives.control_group()
    with mock.patch.object(dist, "get_backend", lambda group=None: "nccl" if group is None else "gloo"):
        collectives.open_control_group(datetime.timedelta(seconds=60))
    control = collectives.control_group()
    used = []
    all_reduce = dist.all_reduce

    def recorded(tensor, *args, group=None, **kwargs):
        used.append(group)
        return all_reduce(tensor, *args, group=group, **kwargs)

    with mock.patch.object(dist, "all_reduce", recorded):
        flags = collectives.agree(collectives.rank() == 0, False)
    return {"under_gloo": under_gloo is None, "control": dist.get_backend(control), "separate": control is not None,
            "used": used == [control], "control_agree": flags}


def _run_rank(rank: int, init_file: str, results: multiprocessing.Queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
        results.put((rank, _rank_results(rank) | _control_results()))
        collectives.leave()
        results.put((rank, {"left": not collectives.is_distributed()}))
    except Exception:
        results.put((rank, {"error": traceback.format_exc()}))


def test_each_collective_gives_every_rank_the_same_answer(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")  # no re-import: the ranks start in a moment
    results = context.Queue()
    ranks = [context.Process(target=_run_rank, args=(rank, str(tmp_path / "init"), results))
             for rank in range(WORLD_SIZE)]
    for process in ranks:
        process.start()
    answers: dict[int, dict] = {rank: {} for rank in range(WORLD_SIZE)}
    try:
        for _ in range(2 * WORLD_SIZE):
            rank, answer = results.get(timeout=60)
            assert "error" not in answer, answer["error"]
            answers[rank] |= answer
    finally:
        for process in ranks:
            process.join(10)
            if process.is_alive():
                process.kill()
    for rank, answer in answers.items():
        assert (answer["rank"], answer["world_size"]) == (rank, WORLD_SIZE)
        assert answer["any"] == answer["agree"] == [True, False]
        assert answer["under_gloo"] and answer["separate"] and answer["control"] == "gloo" and answer["used"]
        assert answer["control_agree"] == [True, False]
        assert answer["max"] == 1.0
        assert answer["sums"] == {"a": [2.0, 1.0], "b": [[3.0]]}
        assert answer["mean"] == [[0.5, 0.5], [[5.0]]]
        assert answer["broadcast"] == ["from 0"]
        assert answer["objects"] == [{"rank": 0}, {"rank": 1}]
        assert answer["left"]
    assert answers[0]["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # rank order, padding dropped
    assert answers[1]["gathered"] is None
