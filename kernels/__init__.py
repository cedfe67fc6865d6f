"""Triton kernels of rwp-fast, installed as ``rwp_fast.kernels`` (setup.py ``package_dir``).

One module per fused op: ``pgd_step``, ``lsc_loss``, ``weight_perturb``. Each module exposes the
backend-level functions that ``rwp_fast.ops`` dispatches to (the CUDA extension wrapper
``rwp_fast.ops.cuda_ops`` exposes the same names and signatures). Importing a kernel module registers
its launches as ``torch.ops.rwp_triton.<name>`` library ops with the CUDA extension's schemas and fake
impls, so compiled code holds them without a graph break. Importing a kernel module needs Triton;
importing this package does not.
"""
