"""The SGD update of a ``torch.optim.SGD`` as plain tensor ops, so that a compiled or captured phase holds it.

``optimizer.step()`` cannot sit in one: it graph-breaks on entry and exit (torch/optim/optimizer.py, to keep
AOT's no-grad epilogue), reads a float lr that a captured graph would freeze at capture time, and makes
its momentum buffers at the first step. ``SGDUpdate`` does the same arithmetic as torch's foreach SGD
(weight decay, momentum, Nesterov) over buffers that exist from the start and keep their addresses:

* the momentum buffers live in ``optimizer.state[p]["momentum_buffer"]``, so checkpoints and
  ``load_state_dict`` see them as torch's own. A zero buffer gives exactly torch's first step
  (0·μ + g = g) because dampening is 0; other dampening is refused.
* the lr is a 0-d device tensor, set from ``param_groups[0]["lr"]`` before each step (one fill, no sync),
  so the schedule that ``LambdaLR`` writes there every iteration reaches the captured update.
"""

import torch


class SGDUpdate:
    """update(): p ← p − lr·d with d = g + λp, m ← μm + d, d ← d + μm (Nesterov) or m."""

    def __init__(self, optimizer, params):
        if type(optimizer) is not torch.optim.SGD:
            raise ValueError(f"optimizer: the fast step updates with SGD (torch.optim.SGD); got "
                             f"{type(optimizer).__name__}")
        if len(optimizer.param_groups) != 1:
            raise ValueError(f"optimizer: expected one param group, got {len(optimizer.param_groups)}")
        group = optimizer.param_groups[0]
        if group["dampening"] != 0 or group["maximize"]:
            raise ValueError("optimizer: dampening must be 0 and maximize False for the fast step's SGD "
                             f"(got dampening={group['dampening']}, maximize={group['maximize']})")
        ids = {id(p) for p in group["params"]}
        if ids != {id(p) for p in params}:
            raise ValueError("optimizer: must hold exactly the model's parameters")
        self.optimizer, self.params = optimizer, list(params)
        self.grads = [p.grad for p in self.params]  # the persistent .grad tensors (FlatWeights)
        self.momentum, self.weight_decay = group["momentum"], group["weight_decay"]
        self.nesterov = group["nesterov"]
        # fp64 for fp64 weights (the equivalence tests), else fp32: the lr multiplies fp32 master weights
        self.lr = torch.zeros((), dtype=torch.float64 if self.params[0].dtype == torch.float64 else torch.float32,
                              device=self.params[0].device)
        self.buffers = []
        if self.momentum != 0:
            for p in self.params:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)
                self.buffers.append(state["momentum_buffer"])

    def load_lr(self):
        """Before each step, outside the phases: the lr the schedule set, and the momentum buffers back in
        place if ``optimizer.load_state_dict`` replaced them (identity checks; a copy only then)."""
        group = self.optimizer.param_groups[0]
        settings = (group["momentum"], group["weight_decay"], group["nesterov"])
        if settings != (self.momentum, self.weight_decay, self.nesterov):  # e.g. a load_state_dict of another run
            raise ValueError(f"optimizer: momentum, weight_decay, nesterov changed to {settings} from "
                             f"{(self.momentum, self.weight_decay, self.nesterov)} since the fast step was built")
        lr = group["lr"]
        self.optimizer._opt_called = True  # what optimizer.step() sets: the lr scheduler checks it was stepped
        if isinstance(lr, torch.Tensor):
            self.lr.copy_(lr)
        else:
            self.lr.fill_(lr)
        state = self.optimizer.state
        for p, buf in zip(self.params, self.buffers):
            current = state[p].get("momentum_buffer")
            if current is not buf:
                with torch.no_grad():
                    buf.copy_(current) if current is not None else buf.zero_()
                state[p]["momentum_buffer"] = buf

    @torch.no_grad()
    def update(self):
        """One SGD step in place, from the persistent gradients. Traceable and capturable."""
        params, grads = self.params, self.grads
        if self.weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.buffers:
            torch._foreach_mul_(self.buffers, self.momentum)
            torch._foreach_add_(self.buffers, grads)
            if self.nesterov:
                grads = torch._foreach_add(grads, self.buffers, alpha=self.momentum)
            else:
                grads = self.buffers
        torch._foreach_add_(params, torch._foreach_mul(grads, -self.lr))
