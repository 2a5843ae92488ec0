"""Every decode path gives the same pixels: the GPU graph's arguments (checked without a GPU, from the operator specs
DALI records when it defines the graph) and DALI's CPU decoding of real photos against PIL's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from colorize_dist.data import DataConfig, build_loader
from tests.data.helpers import needs_dali


def recorded_arguments(pipe) -> dict[str, dict[str, str]]:
    """Each operator of a defined (not built) DALI pipeline → the arguments DALI recorded for it."""
    pipe._build_graph()  # defines the graph in Python; nothing runs, so a `mixed` graph needs no GPU
    recorded = {}
    for op in pipe._ops:
        head, _, arguments = str(op.spec).partition("Arguments:")
        name = head.splitlines()[0].removeprefix("OpSpec for ").rstrip(":")
        recorded[name] = dict(line.strip().split(": ", 1) for line in arguments.splitlines() if ": " in line)
    return recorded


@needs_dali
@pytest.mark.parametrize("device", [torch.device("cuda", 1), torch.device("cpu")])
def test_every_dali_graph_upsamples_jpeg_chroma_as_libjpeg_turbo(synth_shards, device):
    """nvJPEG (`mixed`) upsamples chroma its own way unless asked for libjpeg-turbo's "fancy" upsampling, which
    DALI's CPU decoder and PIL use; the ab targets are what chroma upsampling changes."""
    from colorize_dist.data.dali import DaliSource

    cfg = DataConfig(shards=str(synth_shards), resolution=24, hw_decoder_load=0.5)
    with build_loader(cfg, "val", batch_size=4) as loader:
        source = DaliSource(loader.source.reading, loader.layout, cfg, device=device)
        pipe = source.graph()
        decoders = {name: arguments for name, arguments in recorded_arguments(pipe).items() if "ImageSlice" in name}
    assert pipe.device_id == device.index  # the rank's GPU (None: a CPU-only pipeline)
    ((name, arguments),) = decoders.items()
    assert arguments["jpeg_fancy_upsampling"] == "True", (name, arguments)
    assert arguments["device"] == ("mixed" if device.type == "cuda" else "cpu")
    if device.type == "cuda":
        assert float(arguments["hw_decoder_load"]) == 0.5


@needs_dali
def test_dali_decodes_jpeg_windows_of_photos_exactly_as_pil(tmp_path):
    """The CPU graph's window decoding of real 4:2:0 JPEG photos equals PIL's full decode cropped, value for value
    (measured on six scikit-image photos: no value differs, full images or windows)."""
    from colorize_dist.data.dali import crop_pipeline

    data = pytest.importorskip("skimage.data")
    encoded, boxes = [], []
    for name in ("astronaut", "coffee", "chelsea"):
        pixels = getattr(data, name)()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)  # 4:2:0 chroma, as `shards make` writes
        encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        height, width = pixels.shape[:2]
        boxes.append((13, 17, width * 4 // 5, height * 5 // 6))  # odd offsets: windows between chroma samples
    batch = (encoded, np.array([b[:2] for b in boxes], dtype=np.int32), np.array([b[2:] for b in boxes],
             dtype=np.int32), np.zeros(len(boxes), dtype=np.int32))
    pipe = crop_pipeline(lambda: batch, decode_device="cpu", hw_decoder_load=0.0, resize_to=None,
                         batch_size=len(boxes), num_threads=1, device_id=None, prefetch_queue_depth=1, seed=0)
    pipe.build()
    (windows,) = pipe.run()
    for i, (left, top, width, height) in enumerate(boxes):
        with Image.open(io.BytesIO(encoded[i].tobytes())) as image:
            expected = np.asarray(image.convert("RGB"))[top:top + height, left:left + width]
        np.testing.assert_array_equal(np.asarray(windows[i]), expected)
