"""Evaluation: the paper's Table 2 suite (natural, FGSM, PGD-20/100, C&W∞, AutoAttack), and the per-epoch
natural/PGD evaluation of a training run."""

from .epoch import evaluate_natural_and_pgd
from .suite import (ATTACKS, AutoAttackUnavailable, markdown_table, parse_attacks, require_autoattack,
                    run_eval_suite, write_json)

__all__ = ["evaluate_natural_and_pgd", "ATTACKS", "AutoAttackUnavailable", "markdown_table", "parse_attacks",
           "require_autoattack", "run_eval_suite", "write_json"]
