"""What `bench train` and `bench gpu` offer by name — no heavy imports, so that their `--help` answers at once."""

# Name → overrides of the training config.
VARIANTS: dict[str, list[str]] = {
    "fp32 eager": ["train.mixed_precision=fp32", "train.channels_last=false", "train.compile=false"],
    "bf16": ["train.mixed_precision=bf16", "train.channels_last=false", "train.compile=false"],
    "bf16 + channels_last": ["train.mixed_precision=bf16", "train.channels_last=true", "train.compile=false"],
    "bf16 + channels_last + compile": ["train.mixed_precision=bf16", "train.channels_last=true",
                                       "train.compile=true"],
}
GPU_STAGES = ("color", "data", "train", "memory")  # what `bench gpu --stages` chooses from; "env" always runs first
