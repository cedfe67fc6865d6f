"""Run under torchrun by tests/test_distributed.py (not collected by pytest: no test_ prefix).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py trace OUT_DIR
    ... tests/dist_worker.py preempt STEP -- <rwp-fast train arguments>

trace: every scenario of ``scenarios()`` for a few steps; writes OUT_DIR/rank{R}.pt with the weights after
every step, the per-example losses every LSC probe saw (and the empty-mask search results). The runs that
tests/test_distributed.py compares with one process are float64 end to end (``Trainer(dtype=...)``): 2
processes vs 1 differ in the order of sums only, which fp32 rounds per machine (ISA, thread count) and training
amplifies; fp64 leaves ~1e-15, far inside any tolerance. The BatchNorm scenario, compared across ranks bit
for bit only, stays fp32, so the fp32 collectives are exercised too.
preempt: ``rwp-fast train`` whose rank 1 sends itself SIGTERM after global step STEP.
"""

import math
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)
os.environ.setdefault("TRITON_INTERPRET", "1")

from rwp_fast.config import RunConfig  # noqa: E402
from equivalence import Records, record_probe_losses  # noqa: E402 (tests/ is on sys.path)


def base_cfg(**kw):
    cfg = dict(dataset="digits", model="small_cnn_gn", epsilon_255=32.0, alpha_255=8.0, attack_steps=2,
               eval_attack_steps=2, perturb="none", gamma=0.01, c_min=2.3, k2=3, epochs=1, batch_size=32, lr=0.05,
               train_examples=128, eval_examples=64, quiet=True, device="cpu", backend="torch", out_dir="/nonexistent")
    cfg.update(kw)
    return RunConfig(**cfg).validate()


def scenarios():
    """name -> config."""
    return {
        "at": base_cfg(),
        "at-awp": base_cfg(perturb="awp"),
        "at-rwp-accumulate": base_cfg(perturb="rwp"),
        "at-rwp-paper": base_cfg(perturb="rwp", rwp_update="paper"),
        "trades-rwp": base_cfg(perturb="rwp", method="trades", c_min=0.5),
        "bn-at-rwp": base_cfg(perturb="rwp", model="small_cnn"),
    }


FP32_SCENARIOS = ("bn-at-rwp",)  # compared across ranks only (bit for bit): fp32, the dtype training uses


def trace(cfg, dtype=torch.float64):
    """Weights after every step of one epoch, the epoch's (reduced) training metrics and evaluation, and
    the (B,) losses of every LSC probe (this process's rows)."""
    from rwp_fast.train import Trainer
    trainer = Trainer(cfg, log=lambda *a: None, dtype=dtype)
    probes = Records(cfg.lsc_range)
    record_probe_losses(trainer.step_fn, probes)
    weights = []
    trainer.after_step = lambda t: weights.append(
        torch.cat([p.detach().reshape(-1) for p in t.model.parameters()]).clone())
    metrics = trainer.train_epoch()
    evaluation = trainer.evaluate()
    return {"weights": weights, "metrics": metrics, "eval": evaluation, "probe_losses": probes.probe_losses}


def empty_mask_batch(seed=0, dtype=torch.float64):
    """A small_cnn_gn whose logits are spread wide, a global batch of 16 and labels such that rows 0–7
    (rank 0) have loss < ln 10 and rows 8–15 (rank 1) loss > ln 10 by a wide margin: with c_min = ln 10
    the LSC mask is empty on rank 1 only."""
    from rwp_fast.models import build_model
    torch.manual_seed(seed)
    model = build_model("small_cnn_gn", 10, 1, [0.5], [0.25]).to(dtype)
    with torch.no_grad():
        model.net.linear.weight.mul_(50)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        logits = model(x)
    y = torch.cat([logits[:8].argmax(1), logits[8:].argmin(1)])
    return model, x, y


def empty_mask_search(rows):
    """One AT-RWP step (attack skipped: x_adv = x) on `rows` of the empty-mask batch, in float64; v, the
    weights and every probe's losses."""
    from rwp_fast.train import distributed
    from rwp_fast.train.fast_step import FastTrainStep
    cfg = base_cfg(perturb="rwp", c_min=math.log(10), k2=3)
    model, x, y = empty_mask_batch()
    dist, _ = distributed.setup(cfg, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = FastTrainStep(model, opt, cfg, torch.device("cpu"), dist=dist)
    step.keep_v = True
    probes = Records(cfg.lsc_range)
    record_probe_losses(step, probes)
    x, y = x[rows], y[rows]
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    result = step(model, opt, x, y, cfg, x_adv=x)
    return {"v": result.v, "steps": int(result.search.steps_taken),
            "mask": [float(f) for f in result.search.mask_fractions], "local_count": int((losses < cfg.c_min).sum()),
            "weights": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "probe_losses": probes.probe_losses, "lsc_range": cfg.lsc_range}


def main():
    mode = sys.argv[1]
    if mode == "trace":
        out = sys.argv[2]
        rank = int(os.environ["RANK"])
        results = {name: trace(cfg, torch.float32 if name in FP32_SCENARIOS else torch.float64)
                   for name, cfg in scenarios().items()}
        lo, hi = 8 * rank, 8 * (rank + 1)
        results["empty-mask"] = empty_mask_search(slice(lo, hi))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        from rwp_fast.train import distributed
        ctx, _ = distributed.setup(base_cfg(), torch.device("cpu"))  # the group exists: a handle on it
        ctx.close()
        # A thread left here outlives the group into interpreter shutdown, where it aborted 1 exit in ~20
        # (distributed.setup): after close, nothing may hold the group.
        # Freeing the group joins its threads, but Linux may list a joined thread in /proc for a moment
        # more: allow it 2 s to go (a leaked thread stays for good).
        deadline = time.monotonic() + 2.0
        while (left := ctx.collective_threads()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not left, f"gloo threads alive after DistContext.close: {left}"
    elif mode == "preempt":
        kill_after = int(sys.argv[2])
        from rwp_fast import cli
        from rwp_fast.train import Trainer
        original = Trainer.__init__

        def init(self, *a, **kw):
            original(self, *a, **kw)
            if self.dist.rank == 1:  # the signal reaches one process only: the others must stop too
                def hook(t):
                    if t.step == kill_after:
                        os.kill(os.getpid(), signal.SIGTERM)
                self.after_step = hook
        Trainer.__init__ = init
        sys.exit(cli.main(sys.argv[sys.argv.index("--") + 1:]))


if __name__ == "__main__":
    main()
