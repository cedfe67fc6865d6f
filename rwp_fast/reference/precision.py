"""The accumulator dtype of every op and of the training step: max(float32, the inputs' dtype).

fp16/bf16 storage computes in fp32 (their 8/11-bit significands cannot hold a reduction); fp32 stays
fp32; fp64 stays fp64. The last case is what the equivalence tests rely on: an fp64 model is then fp64
end to end (losses, norms, scales), so the fast path and the reference agree to ~1e-12 on any machine,
where a hidden fp32 cast would cap the agreement at fp32 rounding (~1e-7) and make it depend on the
CPU's summation order.
"""

import torch


def accumulate_dtype(dtype):
    """float32 for fp16/bf16/fp32 (and integer/bool) inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(t):
    """`t` in its accumulator dtype (no copy when it already is)."""
    return t.to(accumulate_dtype(t.dtype))
