"""What the kernel test modules share (not a test module): inputs at unaligned addresses, and a CUDA
caching allocator whose free blocks hold NaN."""

import torch


def unaligned(t):
    """A contiguous copy of t whose data starts one element past an allocation, so no pointer is 16-byte
    aligned: the kernels' scalar path."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


def poison_cuda_allocator(device):
    """Best effort, on CUDA only (the Triton host functions poison their own outputs; conftest): fill the
    caching allocator's free blocks with 0xFF bytes, which is NaN for floats, True for bools and -1 for ints.
    The outputs that the CUDA extension allocates next (at::empty) then start as garbage, so an element a
    kernel forgets to write shows up in the comparisons. Call it right before the op."""
    if torch.device(device).type != "cuda":
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in (512, 4096, 1 << 16, 1 << 20)]
    del blocks
