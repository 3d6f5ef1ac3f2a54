"""Training: config, loop (single process, DDP, FSDP2 under torchrun), checkpoints, telemetry."""
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from .config import TRAIN_PRESETS, TrainConfig
from .loop import RunDirError, evaluate, lr_at, train

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train", "evaluate", "lr_at", "RunDirError", "CheckpointError",
           "list_checkpoints", "load_checkpoint"]
