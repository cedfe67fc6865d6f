"""Run every op of the CUDA extension once, for ``compute-sanitizer``.

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_cuda_ops.py

tests/test_cuda_ext.py runs this line when compute-sanitizer is on PATH. The sizes are small and
odd on purpose, so the sanitizer checks the edges:
  * a numel that is not a multiple of the 16-byte pack, so the scalar tail runs;
  * a buffer offset by one element, so the unaligned path runs;
  * C = 1000 and C = 10;
  * a 1-element segment, and a segment that is not a multiple of the chunk.
Every run takes seconds, even under memcheck. Exit status 0 means every op ran and synchronized
without a CUDA error.
"""

import math
import sys

import torch


def _offset(t):
    """A contiguous copy of t that starts one element past a 16-byte boundary (unaligned path)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def main():
    if not torch.cuda.is_available():
        print("sanitize_cuda_ops: needs CUDA", file=sys.stderr)
        return 2
    from rwp_fast.ops import cuda_ops as c
    from rwp_fast.ops.weight_perturb import SegmentTable

    dev = torch.device("cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((7, 3, 5, 5), (129, 3, 32, 32), (1, 1)):
            x_nat = torch.rand(shape, device=dev).to(dtype)
            x_adv = (x_nat + 0.01 * torch.randn(shape, device=dev)).clamp(0, 1).to(dtype)
            grad = torch.randn(shape, device=dev).to(dtype)
            for norm in ("linf", "l2"):
                c.pgd_step(x_adv, grad, x_nat, 2 / 255, 8 / 255, norm, torch.empty_like(x_adv))
                c.pgd_step(_offset(x_adv), _offset(grad), _offset(x_nat), 2 / 255, 8 / 255, norm,
                           _offset(x_adv))
                noise = torch.randn(shape, device=dev)
                radius = torch.rand(shape[0], device=dev) if norm == "l2" else None
                c.pgd_random_init(x_nat, noise, 8 / 255, norm, radius, torch.empty_like(x_nat))
                c.pgd_random_init(_offset(x_nat), _offset(noise), 8 / 255, norm, radius,
                                  _offset(x_nat))

        for batch, classes in ((1, 10), (129, 1000), (7, 33)):
            logits = torch.randn(batch, classes, device=dev).to(dtype)
            logits_adv = torch.randn(batch, classes, device=dev).to(dtype)
            target = torch.randint(0, classes, (batch,), device=dev)
            grad_out = torch.ones((), device=dev)
            _, mask, _, _, lse = c.lsc_loss_fwd(logits, target, 0.0, math.inf)
            c.lsc_loss_bwd(grad_out, logits, target, lse, mask)
            _, mask, _, _, lse_nat, lse_adv, kl = c.lsc_loss_trades_fwd(logits, logits_adv, target, 6.0,
                                                                         0.0, 1.7)
            c.lsc_loss_trades_bwd(grad_out, logits, logits_adv, target, lse_nat, lse_adv, kl, mask,
                                  6.0)

        for numels, chunk in (([1, 37, 4101, 8192, 3], 4096), ([300, 1, 64, 65, 129], 64)):
            table = SegmentTable.from_numels(numels, chunk).to(dev)
            w = torch.randn(table.numel, device=dev).to(dtype)
            a = torch.randn(table.numel, device=dev).to(dtype)
            g = torch.randn(table.numel, device=dev).to(dtype)
            scale = torch.rand(table.num_segments, device=dev)
            c.segment_sq_norm(w, table)
            c.accumulate_sq_norm_(a, g, table, None)
            c.accumulate_sq_norm_(a, g, table, scale)
            c.perturb_axpy_(w, a, scale, table, 1)
            c.perturb_axpy_(w, a, scale, table, -1)
    torch.cuda.synchronize()
    print("sanitize_cuda_ops: all ops ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
