"""The DALI pipeline: WebDataset shards → decoded, cropped uint8 NHWC RGB batches, on CPU or GPU.

One pipeline definition serves both devices: on a GPU images decode with `device="mixed"` (a share
`hw_decoder_load` on the hardware JPEG decoder, the rest with CUDA) and later operators follow the
data onto the GPU; without one the pipeline runs with `device_id=None` and CPU decoding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from colorize_dist.data.config import ASPECT_RATIO_RANGE, DataConfig
from colorize_dist.data.sharding import RankSlice, epoch_seed
from colorize_dist.data.shards import IMAGE_EXTENSIONS, batch_key

IMAGE_COMPONENTS = ";".join(IMAGE_EXTENSIONS + tuple(ext.upper() for ext in IMAGE_EXTENSIONS))


@pipeline_def(enable_conditionals=False)
def color_pipeline(paths: list[str], index_paths: list[str], *, train: bool, resolution: int,
                   crop_scale: tuple[float, float], flip: bool, decode_device: str, hw_decoder_load: float,
                   shuffle_buffer: int, shard_id: int, num_shards: int):
    encoded = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=[IMAGE_COMPONENTS], missing_component_behavior="skip",
        shard_id=shard_id, num_shards=num_shards, pad_last_batch=True,
        random_shuffle=train, initial_fill=shuffle_buffer,
    )
    decoder_options = {"device": decode_device, "output_type": types.RGB}
    if decode_device == "mixed":
        decoder_options["hw_decoder_load"] = hw_decoder_load
    if train:
        images = fn.decoders.image_random_crop(
            encoded, random_area=list(crop_scale), random_aspect_ratio=list(ASPECT_RATIO_RANGE), **decoder_options,
        )
        images = fn.resize(images, size=[resolution, resolution])
        if flip:
            images = fn.flip(images, horizontal=fn.random.coin_flip())
    else:
        images = fn.decoders.image(encoded, **decoder_options)
        images = fn.resize(images, resize_shorter=resolution)
        images = fn.crop(images, crop=[resolution, resolution])
    return images, fn.get_property(encoded, key="source_info")


class DaliSource:
    """One rank's batches of one epoch from a pipeline built for that epoch, so its order depends on
    (seed, epoch) only; resuming runs the pipeline through the batches already consumed, which yields
    the same samples and augmentations as an uninterrupted epoch at the cost of decoding them once."""

    def __init__(self, ranks: RankSlice, cfg: DataConfig, *, train: bool, seed: int, device: torch.device):
        self.ranks, self.cfg, self.train, self.seed, self.device = ranks, cfg, train, seed, device

    def batches(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        on_gpu = self.device.type == "cuda"
        pipe = color_pipeline(
            [str(shard.path) for shard in self.ranks.shards],
            [str(shard.index_path) for shard in self.ranks.shards],
            train=self.train, resolution=self.cfg.resolution, crop_scale=tuple(self.cfg.crop_scale),
            flip=self.cfg.flip, decode_device="mixed" if on_gpu else "cpu",
            hw_decoder_load=self.cfg.hw_decoder_load, shuffle_buffer=self.cfg.shuffle_buffer,
            shard_id=self.ranks.rank, num_shards=self.ranks.world_size,
            batch_size=self.ranks.batch_size, num_threads=self.cfg.num_threads,
            device_id=_cuda_index(self.device) if on_gpu else None,
            seed=epoch_seed(self.seed, epoch, self.ranks.rank), prefetch_queue_depth=self.cfg.prefetch,
        )
        pipe.build()
        stream = torch.cuda.current_stream(self.device) if on_gpu else None
        for batch_index in range(self.ranks.batches_per_epoch):
            images, source_info = pipe.run()
            if batch_index < start_batch:
                continue
            images = images.as_tensor()
            rgb = feed_ndarray(images, torch.empty(images.shape(), dtype=torch.uint8, device=self.device), stream)
            yield rgb, [_key(source_info.at(i)) for i in range(len(source_info))]


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _key(source_info) -> str:
    """`<tar path>:<offset>:<member name>` (DALI's source info) → the batch key of that sample."""
    tar_path, _, member = bytes(source_info).decode().rsplit(":", 2)
    directory, _, filename = member.rpartition("/")
    stem = filename.partition(".")[0]
    return batch_key(tar_path, f"{directory}/{stem}" if directory else stem)
