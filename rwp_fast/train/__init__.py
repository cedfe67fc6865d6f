"""Training: the loop, checkpoints and resume. See ``Trainer``."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .trainer import Trainer, evaluate_natural_and_pgd, resolve_device

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "Trainer", "evaluate_natural_and_pgd",
           "resolve_device"]
