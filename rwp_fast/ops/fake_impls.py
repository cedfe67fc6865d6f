"""Fake (meta) implementations of the CUDA extension's ops ``torch.ops.rwp_fast.*`` (csrc/bindings.cpp).

Output shapes and dtypes only, for FakeTensor tracing (torch.compile, torch.export) and meta tensors.
They allocate exactly what the C++ functions return, with no output aliasing an input or another output.

Loading ``rwp_fast._C`` imports this module (its PyInit, csrc/bindings.cpp), and the library names it
with ``m.set_python_module``: torch then checks that the fakes are registered from here. So it must not
import ``rwp_fast._C`` itself (it runs while the extension is being loaded).
"""

import torch

@torch.library.register_fake("rwp_fast::pgd_step")
def _pgd_step_fake(x_adv, grad, x_nat, alpha, eps, norm, out):
    return None


@torch.library.register_fake("rwp_fast::pgd_step_")
def _pgd_step_inplace_fake(x_adv, grad, x_nat, alpha, eps, norm):
    return None


@torch.library.register_fake("rwp_fast::pgd_random_init")
def _pgd_random_init_fake(x_nat, noise, eps, norm, radius, out):
    return None


def _lsc_outputs_fake(logits):
    batch = logits.shape[0]
    return (logits.new_empty((batch,), dtype=torch.float32),  # loss
            logits.new_empty((batch,), dtype=torch.bool),     # mask
            logits.new_empty((1,), dtype=torch.int64),        # count
            logits.new_empty((1,), dtype=torch.float32))      # masked_mean


@torch.library.register_fake("rwp_fast::lsc_loss_fwd")
def _lsc_loss_fwd_fake(logits, target, p, q):
    lse = logits.new_empty((logits.shape[0],), dtype=torch.float32)
    return (*_lsc_outputs_fake(logits), lse)


@torch.library.register_fake("rwp_fast::lsc_loss_bwd")
def _lsc_loss_bwd_fake(grad_out, logits, target, lse, mask):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("rwp_fast::lsc_loss_trades_fwd")
def _lsc_loss_trades_fwd_fake(logits_nat, logits_adv, target, beta, p, q):
    batch = logits_nat.shape[0]
    rows = [logits_nat.new_empty((batch,), dtype=torch.float32) for _ in range(3)]  # lse_nat, lse_adv, kl
    return (*_lsc_outputs_fake(logits_nat), *rows)


@torch.library.register_fake("rwp_fast::lsc_loss_trades_bwd")
def _lsc_loss_trades_bwd_fake(grad_out, logits_nat, logits_adv, target, lse_nat, lse_adv, kl, mask,
                              beta):
    return (torch.empty_like(logits_nat, memory_format=torch.contiguous_format),
            torch.empty_like(logits_adv, memory_format=torch.contiguous_format))


@torch.library.register_fake("rwp_fast::segment_sq_norm")
def _segment_sq_norm_fake(x, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk):
    return x.new_empty((offsets.shape[0] - 1,), dtype=torch.float32)


@torch.library.register_fake("rwp_fast::accumulate_sq_norm_")
def _accumulate_sq_norm_fake(a, g, beta, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk):
    return a.new_empty((offsets.shape[0] - 1,), dtype=torch.float32)


@torch.library.register_fake("rwp_fast::perturb_axpy_")
def _perturb_axpy_fake(w, a, scale, offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, sign):
    return None
