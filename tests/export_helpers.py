"""What the export test modules share (not a test module): a saved checkpoint of a briefly built run."""

import torch

from rwp_fast.config import RunConfig
from rwp_fast.train import Trainer
from rwp_fast.train.checkpoint import save_checkpoint


def saved_checkpoint(tmp_path, model):
    """(path of tmp_path/run/best.pt, the model in eval mode): an untrained `model` run on synthetic data, with
    non-trivial BatchNorm statistics."""
    cfg = RunConfig(dataset="synthetic", model=model, train_examples=64, eval_examples=8, batch_size=16,
                    device="cpu", backend="torch", quiet=True, out_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, log=lambda *a: None)
    with torch.no_grad():                       # non-trivial BN statistics and weights
        for m in trainer.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "best.pt"
    save_checkpoint(str(path), trainer.state_dict())
    return path, trainer.model.eval()
