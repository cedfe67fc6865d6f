"""The plain-PyTorch oracle: every fused op and the whole training step, written for reading.

One module per fused op (``pgd_step``, ``lsc_loss``, ``weight_perturb``), each function suffixed
``_ref``; plus the attacks, the weight-perturbation search and the training step built from them.
"""

from .attacks import fgm_ref, fgsm_ref, margin_loss, pgd_attack_ref, trades_attack_ref
from .lsc_loss import lsc_loss_ref, lsc_loss_trades_ref, lsc_mask_ref, trades_per_example_ref
from .perturbation_search import (SearchInfo, add_perturbation, perturbed_parameters,
                                  weight_perturbation_search_ref)
from .pgd_step import draw_random_init_noise, pgd_random_init_ref, pgd_step_ref
from .train_step import StepResult, adversarial_examples_ref, train_step_ref
from .weight_perturb import (accumulate_sq_norm_ref, perturb_axpy_ref, perturb_scale_ref,
                             segment_sq_norm_ref)

__all__ = [
    "fgm_ref", "fgsm_ref", "margin_loss", "pgd_attack_ref", "trades_attack_ref",
    "lsc_loss_ref", "lsc_loss_trades_ref", "lsc_mask_ref", "trades_per_example_ref",
    "SearchInfo", "add_perturbation", "perturbed_parameters", "weight_perturbation_search_ref",
    "draw_random_init_noise", "pgd_random_init_ref", "pgd_step_ref",
    "StepResult", "adversarial_examples_ref", "train_step_ref",
    "accumulate_sq_norm_ref", "perturb_axpy_ref", "perturb_scale_ref", "segment_sq_norm_ref",
]
