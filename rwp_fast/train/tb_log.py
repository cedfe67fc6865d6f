"""``--tensorboard``: every scalar of metrics.jsonl, per epoch, to RUN_DIR/tb/ with torch's SummaryWriter.

The step of every scalar is the epoch (1-based), as in metrics.jsonl. Lists become one scalar per element:
``lsc_mask_fraction`` (the LSC mask fraction at each RWP probe) is written as
``lsc_mask_fraction/probe_1``, ``/probe_2``, ...; the learning rate is the row's ``lr`` (the lr of the
epoch's last step). Booleans are written as 0/1. A resumed run opens the writer with
``purge_step = next epoch``, so that events of epochs logged after the last checkpoint (a crash between
the two) are dropped, as the trainer drops their metrics lines.

tensorboard is an optional extra (``pip install -e .[tensorboard]``); without it ``--tensorboard`` is a
one-line error before any training starts.
"""

import os

from ..config import ConfigError

TB_DIR = "tb"


def scalars(row):
    """{tag: float} of one metrics row: numbers and booleans as they are, lists one tag per element, dicts
    (step_modes: steps by mode) one tag per key; text (phase_fallbacks) stays in metrics.jsonl only."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"{key}/probe_{i + 1}"] = float(v)
        elif isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
    return out


class TensorBoardLog:
    def __init__(self, run_dir, next_epoch):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard: --tensorboard needs the tensorboard package, which is not installed; "
                              "pip install -e .[tensorboard] (or pip install tensorboard), or drop --tensorboard") \
                from None
        self.writer = SummaryWriter(os.path.join(run_dir, TB_DIR), purge_step=next_epoch)

    def log_row(self, row):
        step = int(row["epoch"])
        for tag, value in scalars(row).items():
            if tag != "epoch":
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()   # an epoch is minutes: flushing per epoch costs nothing and survives a kill

    def close(self):
        self.writer.close()


def open_log(trainer):
    """The run's TensorBoardLog, or None without --tensorboard."""
    if not trainer.cfg.tensorboard:
        return None
    return TensorBoardLog(trainer.out_dir, trainer.epoch + 1)
