"""The fast attacks (fused pgd_step, frozen weights) equal the reference attacks exactly."""

import pytest
import torch

from rwp_fast.attacks import pgd_attack, trades_attack
from rwp_fast.models import build_model
from rwp_fast.ops import dispatch
from rwp_fast.reference import pgd_attack_ref, trades_attack_ref


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("linf", "cw"), ("l2", "ce")])
def test_pgd_attack_matches_reference(backend, norm, loss):
    if backend == "triton" and not dispatch.triton_interpreting():
        pytest.skip("the triton backend runs on CPU tensors only under TRITON_INTERPRET=1")
    model = build_model("small_cnn", 10, 1, (0.3,), (0.37,)).eval()
    x, y = torch.rand(7, 1, 8, 8), torch.randint(0, 10, (7,))
    eps, alpha = (32 / 255, 8 / 255) if norm == "linf" else (0.5, 0.1)
    dispatch.set_backend(backend)
    try:
        fast = pgd_attack(model, x, y, eps, alpha, 5, norm, True, loss, torch.Generator().manual_seed(3),
                          params=list(model.parameters()))
    finally:
        dispatch.set_backend(None)
    ref = pgd_attack_ref(model, x, y, eps, alpha, 5, norm, True, loss, torch.Generator().manual_seed(3))
    if norm == "linf":
        assert torch.equal(fast, ref)
    else:  # L2: the kernel's row norms sum in another order; 1e-6 is ~10 ulp of a pixel
        assert torch.allclose(fast, ref, atol=1e-6, rtol=0)
    assert not torch.equal(fast, x)  # the attack moved
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards
    assert all(p.grad is None for p in model.parameters())  # input gradients only


def test_trades_attack_matches_reference():
    model = build_model("small_cnn", 10, 1, (0.3,), (0.37,)).eval()
    x = torch.rand(5, 1, 8, 8)
    fast = trades_attack(model, x, 32 / 255, 8 / 255, 4, "linf", torch.Generator().manual_seed(1),
                         params=list(model.parameters()))
    ref = trades_attack_ref(model, x, 32 / 255, 8 / 255, 4, "linf", torch.Generator().manual_seed(1))
    assert torch.equal(fast, ref)
