"""Training: the loop, checkpoints and resume. See ``Trainer``."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .trainer import Trainer, resolve_device

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "Trainer", "resolve_device"]
