"""Every collective colorize_dist makes, and its only use of torch.distributed: the places where ranks must agree,
and so where a run hangs when one rank does not come.

The rule. A function marked EVERY RANK must be called by every rank of the job, the same number of times, in the
same order, with tensors of the same shape and dtype on each; one rank that skips it (an early return, an
exception, an `if accelerator.is_main_process:` around it) leaves the others waiting until
train.collective_timeout_s ends the run. Decide on every rank alike first (`any_rank`, `broadcast_from_rank0`),
then branch. Functions marked LOCAL read this process's view and communicate nothing. Without a process group (one
process), every function does what a lone rank would, without communicating.

Where they run, in the order of a training run (all EVERY RANK):
- training/peers.py `reporting_lost_peers`: `all_gather_objects` of each rank's address, once at the start;
- training/rundir.py, training/resume.py: `broadcast_from_rank0` of rank 0's decision (lock, resume point,
  conversion problem), so that every rank raises alike;
- training/build.py `build_accelerator`: `open_control_group`, once;
- training/telemetry.py: `all_gather_objects` of each rank's host name, once at the start;
- training/loop.py `log_interval`, every train.log_every steps: `all_gather_rows` (on the control group) of each
  rank's stop flags (stop signal, dead launcher, time) and its figures of the interval (training/telemetry.py);
  training/divergence.py `DivergenceWatch.losses`, on the same steps: `mean_over_ranks_` of the loss magnitude;
- training/loop.py `next_micro_batches` and eval/metrics.py `evaluate` (validation), when the shards are at a
  URL, through data/loader.py `agree_on_outage`: `agree` whether any rank's server stopped answering, before
  each step and after a validation pass's batches; if so `all_gather_objects` of the reason, then the stop
  checkpoint (training/loop.py `stop_for_outage`);
- training/ema.py: `mean_over_ranks_` of floating-point buffers, every step (only for norms that have them);
- training/milestones.py: `any_rank` of NaN weights before each step checkpoint; training/checkpoint.py:
  `agree` on a failed write, twice per checkpoint;
- eval/metrics.py `compute_metrics`, at each validation: `sum_over_ranks`, `gather_to_rank0`,
  `broadcast_from_rank0` of FID/KID/IS;
- training/summary.py `write_summary`: `max_over_ranks` of peak memory, once at the end;
- commands/train.py: `leave`, the barrier before the process group is destroyed.
Accelerate makes the others, also on every rank: `prepare` (DDP's or DeepSpeed's broadcast of the weights),
each DDP/engine backward's gradient reduction, `save_state`/`load_state` and `wait_for_everyone` (checkpoint.py,
resume.py, build.py `synthetic_shards`, eval/evaluate.py).

data/failure.py reaches the job's c10d store through `store_client` (LOCAL: a client of the store, no
collective), so that a rank's data error reaches the others while they wait in a collective.

Control decisions (`agree`: stop, a failed checkpoint write) travel on a CPU (gloo) group beside an NCCL one. When
a peer is lost, an NCCL collective waits until NCCL's watchdog aborts the process (train.collective_timeout_s),
before any line of ours; gloo sees the peer's closed connection and raises at once, so the one-line lost-rank
report of training/peers.py is printed. Under gloo the control group is the main group.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """LOCAL: whether a process group is up (`torch.distributed` initialised)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """LOCAL: this process's rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """LOCAL: the number of ranks; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_collective_error(exc: BaseException) -> bool:
    """LOCAL: an error of torch.distributed: NCCL's and the store's are DistErrors, gloo's plain RuntimeErrors."""
    return isinstance(exc, dist.DistError) or "gloo" in str(exc).lower()


def store_client(host: str, port: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """LOCAL: a new client of the job's c10d store (RuntimeError, ValueError or OSError when it cannot connect)."""
    return dist.TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timeout)


_control_groups: dict[int, Any] = {}  # id of the main group → its control group (gloo), where it is not gloo


def open_control_group(timeout: datetime.timedelta) -> None:
    """EVERY RANK, once, before the first step: the CPU (gloo) group of `agree`, beside a main group that is not
    gloo (NCCL); under gloo, or without a process group, nothing."""
    if is_distributed() and dist.get_backend() != "gloo":
        _control_groups[id(dist.group.WORLD)] = dist.new_group(backend="gloo", timeout=timeout)


def control_group() -> Any:
    """LOCAL: the group `agree` uses: the gloo group beside an NCCL one, else the main group (None)."""
    return _control_groups.get(id(dist.group.WORLD)) if is_distributed() else None


def agree(*flags: bool) -> list[bool]:
    """EVERY RANK: each host flag OR-ed over all ranks on the control group (CPU, gloo; see the module's docstring),
    for the run's control decisions."""
    values = torch.tensor([bool(flag) for flag in flags], dtype=torch.int32)
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=control_group())
    return [bool(value) for value in values.tolist()]


def any_rank(*flags: bool | torch.Tensor, device: torch.device) -> list[bool]:
    """EVERY RANK: each flag OR-ed over all ranks, in one all-reduce; tensors may be 0-d booleans still on the
    device."""
    values = torch.stack([torch.as_tensor(flag, device=device).reshape(()) for flag in flags]).to(torch.int32)
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def max_over_ranks(value: float, device: torch.device) -> float:
    """EVERY RANK: the largest of each rank's `value` (float64)."""
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def sum_over_ranks(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EVERY RANK: every tensor of `sums` summed over ranks, in one all-reduce of a flat buffer (one dtype)."""
    if not is_distributed():
        return sums
    flat = torch.cat([value.reshape(-1) for value in sums.values()])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    reduced, offset = {}, 0
    for name, value in sums.items():
        reduced[name] = flat[offset:offset + value.numel()].view_as(value)
        offset += value.numel()
    return reduced


def mean_over_ranks_(tensors: list[torch.Tensor]) -> None:
    """EVERY RANK: each tensor replaced, in place, by its mean over ranks (one all-reduce; one dtype)."""
    if not tensors or world_size() == 1:
        return
    flat = torch.cat([tensor.flatten() for tensor in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    torch._foreach_copy_(tensors, [part.view_as(tensor) for part, tensor in
                                   zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)])


def gather_to_rank0(rows: torch.Tensor) -> torch.Tensor | None:
    """EVERY RANK: every rank's rows (n_r, ...), concatenated in rank order on rank 0 (None on the others): exact,
    whatever the n_r. A gather, not an all-gather: only rank 0 uses them, and at 70,000 images the Inception rows
    alone are 1.4 GB. The ranks' rows are padded to the longest (their shares differ by less than a micro-batch).
    """
    if not is_distributed():
        return rows
    count = torch.tensor([len(rows)], dtype=torch.int64, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[:len(rows)] = rows
    if rank() != 0:
        dist.gather(padded, dst=0)
        return None
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.gather(padded, parts, dst=0)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def broadcast_from_rank0(values: list[Any]) -> list[Any]:
    """EVERY RANK: rank 0's list of picklable values on every rank (the list is filled in place and returned)."""
    if is_distributed():
        dist.broadcast_object_list(values, src=0)
    return values


def all_gather_rows(values: list[float]) -> list[list[float]]:
    """EVERY RANK: every rank's host `values` (float64, the same length on each), in rank order, on every rank; on
    the control group, as they carry the stop decision."""
    row = torch.tensor(values, dtype=torch.float64)
    if not is_distributed():
        return [row.tolist()]
    rows = [torch.empty_like(row) for _ in range(world_size())]
    dist.all_gather(rows, row, group=control_group())
    return torch.stack(rows).tolist()


def all_gather_objects(value: Any) -> list[Any]:
    """EVERY RANK: every rank's picklable `value`, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def leave() -> None:
    """EVERY RANK: wait for every rank, once every collective of the run is done, then release the process group
    (NCCL warns of a leak otherwise)."""
    if is_distributed():
        dist.barrier()
        _control_groups.pop(id(dist.group.WORLD), None)
        dist.destroy_process_group()
