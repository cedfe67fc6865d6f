"""All perturbed weights of a model as views into one flat buffer, and their gradients likewise.

The ``weight_perturb`` op works on one contiguous (N,) buffer split into L segments (SegmentTable).
``FlatWeights`` moves every perturbed parameter (``*weight`` with dim > 1, in ``named_parameters``
order: the reference's ``perturbed_parameters``) into such a buffer, and points each ``.grad`` into a
second buffer of the same layout:

    param.data = flat_w[off:off + n].as_strided(param.shape, param.stride())
    param.grad = flat_g[off:off + n].as_strided(param.shape, param.stride())

A segment holds its tensor's elements in memory order, so channels-last strides survive, and norms and
elementwise updates over the flat buffer equal those over the tensors. Autograd accumulates into an
existing ``.grad`` in place, so a backward writes the flat gradient directly, with no concatenation.
Addresses never change afterwards, which is what CUDA graphs need.

The model's other parameters (biases, norm affine) get persistent ``.grad`` tensors too, so every
gradient a captured step writes has a fixed address. Zero them all with ``FlatWeights.zero_grad()``. A
``.grad`` set to None or replaced anyway (``optimizer.zero_grad()``'s default) is pointed back at its
buffer by ``attach_grads``, which ``FastTrainStep`` calls at every step: the search reads the flat
gradient, so a ``.grad`` outside it would leave v = 0 (RWP silently becoming AT).
Convert the model's memory format (``channels_last``) *before*
building FlatWeights.
"""

import torch

from ..ops.weight_perturb import SegmentTable
from ..core import perturbed_parameters


def _check_dense(name, p):
    # as_strided over a segment of exactly numel elements needs a dense, non-overlapping layout
    if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{name}: parameter with strides {p.stride()} is neither contiguous nor "
                         "channels-last; FlatWeights needs a dense layout")


class FlatWeights:
    """Flat weight and gradient buffers for the perturbed parameters of `model`.

    Attributes: names (L,), params (L,), w (N,) and g (N,) flat buffers in the parameters' dtype,
    table (SegmentTable on the parameters' device); other_params and their persistent other_grads.
    """

    def __init__(self, model):
        named = perturbed_parameters(model)
        if not named:
            raise ValueError("model: has no perturbable weight (a '*weight' parameter with dim > 1)")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"model: perturbed weights must share one dtype and device, got {dtypes}, {devices}")
        for n, p in named:
            _check_dense(n, p)
        (dtype,), (device,) = dtypes, devices
        numels = [p.numel() for p in self.params]
        self.table = SegmentTable.from_numels(numels).to(device)
        self.w = torch.empty(self.table.numel, dtype=dtype, device=device)
        self.g = torch.zeros(self.table.numel, dtype=dtype, device=device)
        offsets = self.table.offsets.tolist()
        self.grad_views = []
        with torch.no_grad():
            for p, start, n in zip(self.params, offsets, numels):
                w_view = self.w[start:start + n].as_strided(p.shape, p.stride())
                w_view.copy_(p)
                p.data = w_view
                self.grad_views.append(self.g[start:start + n].as_strided(p.shape, p.stride()))
                p.grad = self.grad_views[-1]
        flat_ids = {id(p) for p in self.params}
        self.other_params = [p for p in model.parameters() if id(p) not in flat_ids]
        self.other_grads = [torch.zeros_like(p) for p in self.other_params]
        for p, grad in zip(self.other_params, self.other_grads):
            p.grad = grad

    def zero_grad(self):
        """Zero every gradient in place (two launches), keeping each .grad where it is."""
        self.g.zero_()
        if self.other_grads:
            torch._foreach_zero_(self.other_grads)

    def attach_grads(self):
        """Point every .grad that left its buffer back at it, keeping its values. One pointer comparison
        per tensor and no aten op while they are in place (62 for PreAct-18)."""
        for p, home in zip(self.params + self.other_params, self.grad_views + self.other_grads):
            grad = p.grad
            if grad is not home:
                with torch.no_grad():
                    if grad is None:
                        home.zero_()
                    else:
                        home.copy_(grad)
                p.grad = home

    def grads_are_views(self):
        """True while every perturbed parameter's .grad still lives in the flat gradient buffer."""
        base = self.g.untyped_storage().data_ptr()
        return all(p.grad is not None and p.grad.untyped_storage().data_ptr() == base for p in self.params)
