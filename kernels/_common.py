"""Host-side helpers shared by the Triton kernel modules: argument checks and output allocation.

Kept free of ``@triton.jit`` code so that the checks read the same in every op.
"""

import contextlib

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests switch this on (tests/conftest.py): every output buffer that a kernel must fully overwrite is
# then allocated filled with NaN (float), True (bool) or -2**30 (int), so an element the kernel forgets
# to write shows up as a mismatch instead of reading back whatever torch.empty happened to hold.
POISON_OUTPUTS = False
_INT_POISON = -(2 ** 30)


def new_output(shape, dtype, device):
    """torch.empty(shape), or a poisoned buffer when POISON_OUTPUTS is set."""
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        fill = float("nan")
    elif dtype == torch.bool:
        fill = True
    else:
        fill = _INT_POISON
    return torch.full(shape, fill, dtype=dtype, device=device)


def check_tensor(name, t, *, dtypes=None, device=None, shape=None, ndim=None, contiguous=True):
    """Raise TypeError/ValueError naming `name` if tensor `t` breaks one of the given requirements."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides "
                         f"{t.stride()}")


def check_same_dtype(name, t, ref_name, ref):
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def on_device(t):
    """Context that makes t's CUDA device current around a Triton launch; a no-op for CPU tensors.

    Triton launches on the *current* device (and its current stream), not on the tensors' device: a
    call with tensors on cuda:1 while cuda:0 is current would run the kernel on cuda:0 with cuda:1
    pointers. The CUDA extension uses a CUDAGuard for the same reason.
    """
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
