"""What the oracle (``rwp_fast.reference``), the kernels and the fast path share: the constants of the
method, the accumulator dtype, the attack objectives, the result types, which weights are perturbed, and
the random draws.

It imports nothing from rwp_fast, so every layer may import it (docs/ARCHITECTURE.md). The semantics
behind each name are in SPEC.md (§1 the attack, §2 the perturbation search).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------- constants
NORMS = ("linf", "l2")                  # threat models (SPEC.md §1)
UPDATE_RULES = ("accumulate", "paper")  # the RWP direction update: released code, or Algorithm 1 as printed
NORM_SCOPES = ("layer", "global")       # γ‖w‖ per tensor, or one norm over all perturbed tensors
L2_GRAD_EPS = 1e-10                     # added to the per-example gradient norm before the L2 step divides
SCALE_EPS = 1e-20                       # added to ‖a‖ before γ‖w‖/‖a‖ divides, for an all-zero direction


# ------------------------------------------------------------------------------------- precision
def accumulate_dtype(dtype):
    """max(float32, dtype): float32 for fp16/bf16/fp32 (and integer/bool) inputs, float64 for float64.

    fp16/bf16 cannot hold a reduction (8/11-bit significands); fp64 stays fp64 so that an fp64 model is
    fp64 end to end, which is what the float64 equivalence tests rely on (~1e-15 on any machine, where
    one hidden fp32 cast would cap the agreement at ~1e-7 and make it depend on the summation order)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(t):
    """`t` in its accumulator dtype (no copy when it already is)."""
    return t.to(accumulate_dtype(t.dtype))


# ------------------------------------------------------------------------------- attack objectives
TRADES_INIT_STD = 0.001  # the TRADES attack starts at x + 0.001·N(0, 1) (SPEC.md §1)


def margin_loss(logits, target):
    """C&W margin max_{j≠y} z_j − z_y per example, in the accumulator dtype, shape (B,)."""
    z = upcast(logits)
    z_y = z.gather(1, target[:, None]).squeeze(1)
    others = z.scatter(1, target[:, None], float("-inf"))
    return others.amax(dim=1) - z_y


def trades_kl_sum(logits_adv, p_nat):
    """Σ_i Σ_c p_nat (log p_nat − log p_adv): the TRADES KL, summed over the batch."""
    return F.kl_div(F.log_softmax(upcast(logits_adv), dim=1), p_nat, reduction="sum")


# ----------------------------------------------------------------------------------------- results
@dataclass
class SearchInfo:
    """What the weight-perturbation search did, for the LSC diagnostics (SPEC.md §2)."""
    steps_taken: int = 0                               # probes whose mask was non-empty (gradient steps)
    mask_fractions: list = field(default_factory=list)  # fraction of examples with V_i = 1, per probe
    v_norm_ratio: float = 0.0                           # ‖v‖ / ‖w‖ over all perturbed tensors


@dataclass
class StepResult:
    loss: float               # training loss at w + v (batch mean)
    logits_adv: torch.Tensor  # (B, C) logits on x_adv from that forward, detached
    x_adv: torch.Tensor       # (B, ...) the adversarial batch, detached
    v: list                   # the perturbation, one tensor per perturbed weight (zeros if none)
    search: SearchInfo        # LSC diagnostics of the search


def perturbed_parameters(model):
    """[(name, parameter)] of every ``*weight`` with dim > 1 (conv and linear), in ``named_parameters``
    order. BatchNorm affine parameters, biases and buffers are never perturbed."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]


# ------------------------------------------------------------------------------------- randomness
class BatchSlice:
    """A generator for a batch that is a share of a larger one: the rows ``rows`` (a slice or an index
    tensor) of a batch of ``total`` rows. Draws through it are made for all ``total`` rows and sliced, so
    each process of a multi-process run draws exactly its rows of what one process would draw for the
    whole batch (rwp_fast.train.distributed)."""

    def __init__(self, generator, rows, total):
        self.generator, self.rows, self.total = generator, rows, total


def draw(sampler, shape, generator, device):
    """``sampler(shape, generator=, device=)`` (torch.rand / torch.randn), through a BatchSlice if given."""
    if isinstance(generator, BatchSlice):
        full = sampler((generator.total, *shape[1:]), generator=generator.generator, device=device)
        rows = generator.rows
        return full[rows] if isinstance(rows, slice) else full.index_select(0, rows.to(device))
    return sampler(shape, generator=generator, device=device)


def draw_random_init_noise(x_nat, norm, generator=None):
    """The random draws that the PGD random start maps to a start (SPEC.md §1): (noise, radius or None).
    L∞: U(−1, 1) per pixel; L2: N(0, 1) per pixel and a U(0, 1) radius fraction per example."""
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")
    if norm == "linf":
        noise = draw(torch.rand, x_nat.shape, generator, x_nat.device) * 2 - 1
        return noise, None
    noise = draw(torch.randn, x_nat.shape, generator, x_nat.device)
    radius = draw(torch.rand, x_nat.shape[:1], generator, x_nat.device)
    return noise, radius


class PhaseFallbackWarning(RuntimeWarning):
    """A phase of the fast step left fullgraph (rwp_fast.train.phase_compile). The test suite turns it into an
    error (pyproject.toml), so that no compiled test passes on a fallback; the fallback's own tests expect it."""
