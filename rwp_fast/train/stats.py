"""Running sums over one training epoch: loss, accuracy and the LSC diagnostics of the search, kept on
the device until the epoch ends (no host sync per step), reducible over processes and checkpointable
mid-epoch."""

from dataclasses import dataclass, field

import torch


@dataclass
class EpochStats:
    """Running sums over one epoch's training steps."""
    images: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    search_calls: int = 0
    steps_taken: int = 0
    v_ratio_sum: float = 0.0
    mask_sums: list = field(default_factory=list)   # per probe index: Σ mask fraction
    mask_counts: list = field(default_factory=list)  # per probe index: batches that ran that probe

    def add(self, result, y):
        self.images += len(y)
        self.loss_sum += result.loss * len(y)
        self.correct += (result.logits_adv.argmax(1) == y).sum()  # device tensors: no sync per step
        info = result.search
        if info.mask_fractions:
            self.search_calls += 1
            self.steps_taken += info.steps_taken
            self.v_ratio_sum += info.v_norm_ratio
            for k, frac in enumerate(info.mask_fractions):
                if k == len(self.mask_sums):
                    self.mask_sums.append(0.0)
                    self.mask_counts.append(0)
                self.mask_sums[k] += frac
                self.mask_counts[k] += 1

    ADDITIVE = ("images", "loss_sum", "correct")  # per-process sums; the search fields are the same everywhere

    def reduce(self, dist):
        """Sum the per-process fields over all processes (one all-reduce); the search diagnostics are
        already global (global mask counts, same v everywhere)."""
        if not dist.enabled:
            return self
        ref = self.correct if isinstance(self.correct, torch.Tensor) else None
        device = ref.device if ref is not None else "cpu"
        summed = dist.sum_(torch.stack([torch.as_tensor(getattr(self, k), dtype=torch.float64, device=device)
                                        for k in self.ADDITIVE]))
        out = EpochStats(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        out.images, out.loss_sum, out.correct = int(summed[0]), summed[1], summed[2]
        return out

    def state(self):
        """Plain values and CPU tensors, for a mid-epoch checkpoint."""
        cpu = lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v
        return {k: ([cpu(x) for x in v] if isinstance(v, list) else cpu(v))
                for k, v in ((k, getattr(self, k)) for k in self.__dataclass_fields__)}

    @classmethod
    def from_state(cls, state, device, keep_sums=True):
        dev = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
        out = cls(**{k: ([dev(x) for x in v] if isinstance(v, list) else dev(v)) for k, v in state.items()})
        if not keep_sums:  # processes other than rank 0: the saved sums are global, rank 0 carries them
            out.images, out.loss_sum, out.correct = 0, 0.0, 0
        return out

    def summary(self):
        calls = max(self.search_calls, 1)
        return {
            "train_robust_loss": float(self.loss_sum) / max(self.images, 1),
            "train_robust_acc": float(self.correct) / max(self.images, 1),
            # LSC diagnostics: fraction of the batch inside [p, q) at probe k (averaged over the batches
            # that reached probe k), mean number of gradient probes before the break, and ‖v‖/‖w‖.
            "lsc_mask_fraction": [float(s) / c for s, c in zip(self.mask_sums, self.mask_counts)],
            "rwp_steps_mean": float(self.steps_taken) / calls if self.search_calls else 0.0,  # may be a tensor
            "v_norm_ratio": float(self.v_ratio_sum) / calls if self.search_calls else 0.0,
        }
