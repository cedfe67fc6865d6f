"""Fast attacks on the fused ``pgd_step`` op (the reference versions live in ``rwp_fast.reference``)."""

from .pgd import frozen, pgd_attack, trades_attack

__all__ = ["frozen", "pgd_attack", "trades_attack"]
