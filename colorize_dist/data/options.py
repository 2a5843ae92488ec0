"""How `shards make` and `shards synth` write a set, checked when made — no heavy imports, so that the command line
shows these defaults without loading the image libraries; `data.make` writes with them."""

from __future__ import annotations

from dataclasses import dataclass

from colorize_dist.errors import UserError

IMAGE_FORMATS = ("jpg", "png")
# Residual chroma (`images.residual_chroma`) under which an image counts as grayscale, and from which it counts as
# colour without review. Measured (tests/data/test_clean_sets.py, README "What `shards make` leaves out") on face
# crops of the portraits and the cat that skimage and matplotlib ship, 96-256 px: as shot 14.3 and more, with their
# chroma scaled by 0.6 8.6 and more, by 0.4 5.8, by 0.25 3.6; gray, sepia, cyanotype and faintly tinted prints of
# them 1.0 and less (2.8 and less as JPEGs of quality 90 for the faint tint), JPEGs of the strongly toned prints up
# to 11.8 (quality 50, 96 px). Between the two, muted colour faces and compressed toned prints overlap: kept, listed.
GRAY_RESIDUAL_CHROMA = 4.0
COLOUR_RESIDUAL_CHROMA = 12.0


class ShardError(UserError, ValueError):
    """A shard set cannot be written as asked (bad options, no readable images, an existing output, a full
    disk); the message is one line saying what to change."""


@dataclass(frozen=True)
class ShardOptions:
    """How `write_shard_set` stores images and cuts them into shards; checked when made."""

    image_format: str = "jpg"  # stored format: jpg | png
    quality: int = 95  # JPEG quality (1-100)
    shard_size: int = 1000  # samples per shard
    val_fraction: float = 0.05  # share of images in val/ (by a hash of their path)
    workers: int | None = None  # encoding processes; None: one per CPU core
    force: bool = False  # replace the shards of an existing output directory

    def __post_init__(self):
        if self.image_format not in IMAGE_FORMATS:
            raise ShardError(f"--format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        if self.shard_size < 1 or not 0.0 <= self.val_fraction <= 1.0 or not 1 <= self.quality <= 100:
            raise ShardError("need --shard-size >= 1, 0 <= --val-fraction <= 1 and 1 <= --quality <= 100")


@dataclass(frozen=True)
class SkipRules:
    """Which readable images `shards make` leaves out of a set; checked when made."""

    keep_gray: bool = False  # keep images whose residual chroma is under GRAY_RESIDUAL_CHROMA
    min_size: int | None = None  # shorter side, pixels; None: half the resolution (no minimum when kept original)

    def __post_init__(self):
        if self.min_size is not None and self.min_size < 0:
            raise ShardError(f"--min-size must be at least 0, got {self.min_size}")

    def minimum_side(self, resolution: int | None) -> int:
        if self.min_size is not None:
            return self.min_size
        return resolution // 2 if resolution is not None else 0
