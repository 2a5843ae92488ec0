"""The data path: image folders → WebDataset shards → (l, ab) batches on every rank (DALI or reference).

The names below load with their module on first use, so that importing one light module of the package (its config,
say) does not load torch, DALI and PIL with the loaders."""

import importlib

_HOMES = {
    "DataConfig": "config", "Batch": "loader", "ColorLoader": "loader", "build_loader": "loader",
    "first_batch": "loader", "ManifestError": "manifest", "MissingShardsError": "manifest",
    "ShardDataError": "manifest", "synth_image": "synth",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
