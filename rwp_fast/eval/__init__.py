"""Evaluation: the paper's Table 2 suite (natural, FGSM, PGD-20/100, C&W∞, AutoAttack)."""

from .suite import (ATTACKS, AutoAttackUnavailable, markdown_table, parse_attacks, require_autoattack,
                    run_eval_suite, write_json)

__all__ = ["ATTACKS", "AutoAttackUnavailable", "markdown_table", "parse_attacks", "require_autoattack",
           "run_eval_suite", "write_json"]
