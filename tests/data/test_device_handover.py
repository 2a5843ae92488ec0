"""How a GPU batch passes from the loader to the kernel, checked without a GPU: the CUDA stream and events are
recorded stand-ins, everything else is the loader's own code."""

from __future__ import annotations

import weakref
from typing import ClassVar

import numpy as np
import pytest
import torch

from colorize_dist.data import DataConfig, build_loader
from colorize_dist.data.loader import DeviceHold, upload
from colorize_dist.data.sharding import micro_batches
from tests.data.helpers import needs_dali

CUDA = torch.device("cuda", 0)


class RecordedEvent:
    """torch.cuda.Event as the hold uses it: recorded on a stream, done when the test says so."""

    events: ClassVar[list[RecordedEvent]] = []

    def __init__(self):
        self.stream, self.done, self.waited = None, False, False
        RecordedEvent.events.append(self)

    def record(self, stream) -> None:
        self.stream = stream

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


@pytest.fixture
def recorded_stream(monkeypatch):
    RecordedEvent.events = []
    monkeypatch.setattr(torch.cuda, "Event", RecordedEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("current stream", device))
    return RecordedEvent.events


def test_a_held_batch_lives_until_the_event_after_its_kernel_has_passed(recorded_stream):
    hold = DeviceHold()
    batches = [torch.zeros(2, 4, 4, 3, dtype=torch.uint8) for _ in range(3)]
    alive = [weakref.ref(batch) for batch in batches]
    hold.keep(batches[0])
    hold.keep(batches[1])
    third = batches.pop()
    batches.clear()
    assert all(ref() is not None for ref in alive[:2])  # the events have not passed: both still held
    assert [event.stream for event in recorded_stream] == [("current stream", torch.device("cpu"))] * 2
    recorded_stream[0].done = True
    hold.keep(third)  # each keep lets go of the batches whose events have passed, in order, without waiting
    assert alive[0]() is None and alive[1]() is not None and alive[2]() is not None
    assert not any(event.waited for event in recorded_stream)
    del third
    hold.release()  # closing: waits for each remaining event, then lets go
    assert all(ref() is None for ref in alive) and all(event.waited for event in recorded_stream[1:])


def test_uploads_to_a_gpu_are_pinned_and_do_not_block(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: calls.append(
        (torch.device(device), non_blocking)) or self)
    upload(np.ones(4, dtype=bool), CUDA)
    assert calls == ["pin", (CUDA, True)]
    calls.clear()
    upload(np.ones(4, dtype=bool), torch.device("cpu"))
    assert calls == [(torch.device("cpu"), False)]


@needs_dali
def test_the_gpu_pipeline_hands_its_batch_over_on_torchs_current_stream(synth_shards, recorded_stream):
    """Run with a stream, DALI makes that stream wait for the batch; without one, the host waits for the device."""
    from colorize_dist.data.dali import DaliSource

    class RecordedPipeline:
        def __init__(self):
            self.streams = []

        def run(self, *stream):
            self.streams.append(stream)
            return ("decoded batch",)

    cfg = DataConfig(shards=str(synth_shards), resolution=24)
    with build_loader(cfg, "val", batch_size=4) as loader:
        pipe = RecordedPipeline()
        for device, stream in ((CUDA, ("current stream", CUDA)), (torch.device("cpu"), None)):
            source = DaliSource(loader.source.reading, loader.layout, cfg, device=device)
            slots = next(micro_batches(loader.layout, loader.samples, 0, 0))
            source.in_flight.append(source._prepare(slots))
            images, prepared = source._run(pipe)
            assert images == "decoded batch" and prepared.batch.slots is slots
            assert pipe.streams[-1] == (() if stream is None else (stream,))
