"""DALI's index files (`.idx` beside each tar): where each sample's components are, and which are images.

Both loaders find samples through these: `reading.BatchReading` parses them and reads each sample's bytes,
which it hands to DALI's external source or to the reference loader's workers, so both read exactly the samples
the index lists. DALI itself never opens the index or the tar.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from colorize_dist.files import atomic_write

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DALI_INDEX_VERSION = "v1.2"


def image_extension(extension: str) -> bool:
    return extension.lower() in IMAGE_EXTENSIONS


def dali_index(tar_path: Path) -> str:
    """The text of DALI's index file (v1.2) for a tar: per sample, `ext offset size name` per component.

    Same grouping as WebDataset and DALI's `wds2idx` (consecutive members sharing the name before the
    first dot form a sample), computed with `tarfile` so that it needs neither DALI nor GNU tar.
    """
    samples: list[list[str]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            directory, _, filename = member.name.rpartition("/")
            stem, dot, extension = filename.partition(".")
            if not stem or not dot:  # hidden files, files without extension
                continue
            key = f"{directory}/{stem}" if directory else stem
            entry = f"{extension} {member.offset_data} {member.size} {member.name}"
            if key == last_key:
                samples[-1].append(entry)
            else:
                samples.append([entry])
                last_key = key
    return f"{DALI_INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def index_images(index_text: str) -> list[tuple[str, int, int, str]]:
    """(extension, data offset, size, member name) of the first image component of each sample that has one,
    in index order: the samples the loaders yield."""
    images = []
    for line in index_text.splitlines()[1:]:
        fields = line.split(" ")
        for start in range(0, len(fields) - 3, 4):
            if image_extension(fields[start]):
                images.append((fields[start], int(fields[start + 1]), int(fields[start + 2]), fields[start + 3]))
                break
    return images


def count_images(index_text: str) -> int:
    """Samples with an image component, i.e. the samples the loaders yield."""
    return len(index_images(index_text))


def write_index(tar_path: Path) -> str:
    text = dali_index(tar_path)
    atomic_write(tar_path.with_suffix(".idx"), text)
    return text


