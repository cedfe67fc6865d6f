"""rwp-fast: adversarial training with Robust Weight Perturbation (Yu et al., IJCAI 2022).

Imports and works without a GPU, without Triton and without the compiled extension ``rwp_fast._C``:
those only add backends to ``rwp_fast.ops``.
"""

__version__ = "0.1.0"
