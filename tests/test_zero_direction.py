"""An all-zero perturbation direction gives v = 0, never NaN, on every backend (SPEC.md §2).

A segment's direction a_l is exactly zero when a layer gets no gradient (unused in the forward, or a
probe whose mask is empty under the 'paper' rule: a ← s_old·a + g with s_old = 0 and g = 0). The rescale
s_l = γ‖w_l‖ / (‖a_l‖ + 1e-20) then stays finite (γ‖w_l‖·1e20 ≤ ~1e19 in fp32), and s_l·a_l = 0. Without
the 1e-20 it is γ‖w_l‖/0 = inf, and inf·0 = NaN would be written into the weights.
"""

import pytest
import torch
from torch import nn

from rwp_fast.ops.weight_perturb import (SegmentTable, accumulate_sq_norm_, perturb_axpy_, perturb_scale,
                                         segment_sq_norm)
from rwp_fast.reference import weight_perturbation_search_ref


def one_rwp_iteration(w, a, g, table, s_old, beta, gamma, scope, backend):
    """w −= s_old·a;  a ← β·a + g;  s = γ‖w‖/(‖a‖ + 1e-20);  w += s·a  — the fast path's sequence."""
    perturb_axpy_(w, a, s_old, table, -1, backend=backend)
    w_sq = segment_sq_norm(w, table, backend=backend)
    a_sq = accumulate_sq_norm_(a, g, table, beta, backend=backend)
    s = perturb_scale(w_sq, a_sq, gamma, scope)
    perturb_axpy_(w, a, s, table, +1, backend=backend)
    return s


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("update", ["accumulate", "paper"])
def test_a_layer_without_gradient_gets_v_zero(backend, device, scope, update):
    """Segment 1 of three gets g = 0: its v is exactly 0 (layer scope), and every weight stays finite."""
    numels = [300, 77, 5000]
    table = SegmentTable.from_numels(numels, chunk=1024).to(device)
    w0 = torch.randn(sum(numels), device=device)
    g = torch.randn_like(w0)
    g[300:377] = 0
    w, a = w0.clone(), torch.zeros_like(w0)
    s_old = torch.zeros(3, device=device)
    for _ in range(2):  # the second iteration starts from a perturbed w and a nonzero s_old
        beta = s_old.clone() if update == "paper" else None
        s_old = one_rwp_iteration(w, a, g, table, s_old, beta, 0.01, scope, backend)
        assert torch.isfinite(s_old).all(), s_old
        assert torch.isfinite(w).all()
        v = w - w0
        assert torch.equal(v[300:377], torch.zeros(77, device=device))
        if scope == "layer":
            for lo, hi in ((0, 300), (377, 5377)):  # the others are rescaled to γ‖w_l‖
                assert v[lo:hi].norm().item() == pytest.approx(0.01 * w0[lo:hi].norm().item(), rel=1e-4)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_an_all_zero_direction_leaves_the_weights_unchanged(backend, device, scope):
    """The first probe of the 'paper' rule with an empty mask: a = 0·0 + 0 everywhere, so v = 0."""
    table = SegmentTable.from_numels([64, 200], chunk=128).to(device)
    w0 = torch.randn(264, device=device)
    w, a = w0.clone(), torch.zeros_like(w0)
    zeros = torch.zeros(2, device=device)
    s = one_rwp_iteration(w, a, torch.zeros_like(w0), table, zeros, zeros.clone(), 0.01, scope, backend)
    assert torch.isfinite(s).all() and torch.equal(w, w0)


class WithUnusedLayer(nn.Module):
    """A linear model plus a linear layer the forward never uses: that layer gets no gradient."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(6, 3)
        self.unused = nn.Linear(6, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("update", ["accumulate", "paper"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_reference_search_gives_v_zero_for_a_layer_without_gradient(update, scope):
    model = WithUnusedLayer()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = lambda m: nn.functional.cross_entropy(m(x), y, reduction="none")
    v, info = weight_perturbation_search_ref(model, loss, 0.01, 3, update=update, scope=scope)
    assert info.steps_taken == 3
    assert torch.isfinite(v[0]).all() and v[0].norm() > 0
    assert torch.equal(v[1], torch.zeros_like(v[1]))
