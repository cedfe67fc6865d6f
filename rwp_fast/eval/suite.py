"""The final evaluation suite of the paper's Table 2 (SPEC.md §4), with the model in eval mode.

    natural   clean accuracy
    fgsm      x + ε·sign(∇ₓ CE), no random start (L∞ only)
    fgm       x + ε·∇ₓ CE/‖∇ₓ CE‖₂, no random start: the one-step attack of an L2 threat model
    pgd20     PGD-20 on CE, random start
    pgd100    PGD-100 on CE, random start
    cw        C&W∞: PGD-100 on the margin max_{j≠y} z_j − z_y, random start
    autoattack  AutoAttack 'standard' (APGD-CE, APGD-T, FAB-T, Square) through ``pyautoattack``

AutoAttack runs its four stages one at a time, each on the points that are still robust, exactly as
its 'standard' version does (same attacks, parameters, seed and batches; ``run_standard_evaluation``
returns ``(x_adv, y_adv)`` in pyautoattack 0.2.0), so that the suite can report how many points each
stage flipped and how long it took, as AutoAttack's own log does. The reported robust accuracy is, like
every other row and like RobustBench's benchmark, from a re-run forward pass: the model's prediction on
the final adversarial images (the clean image where no stage succeeded) against the true label. AA's
own verdicts (its ``y_adv``) are kept as ``autoattack_own``; ``autoattack_disagreements`` counts the
points where the two differ (FAB leaves points on the decision boundary, where a forward pass in a
different batch can round the other way).

PGD and C&W run the fast attack (fused ``pgd_step``, weights frozen; with the torch backend it is
exactly the reference's ``pgd_attack_ref``) with the run's step size α (2/255 for the CIFAR L∞
presets, as SPEC.md §4 prescribes; 15/255 for L2). AutoAttack is the reference implementation
from the ``pyautoattack`` package (the ``eval`` extra); it is never skipped silently: without the
package, asking for it raises AutoAttackUnavailable with the install command.
"""

import json
import time

import torch

from .._fs import atomic_write
from ..attacks import pgd_attack
from ..config import EVAL_ATTACKS

ATTACKS = EVAL_ATTACKS  # natural, fgsm, fgm, pgd20, pgd100, cw, autoattack (config.py: readers read it too)
# The default list per threat model: every attack in the checkpoint's own norm. FGSM is an L∞ attack;
# an L2 checkpoint gets FGM, its one-step L2 counterpart, in that place.
DEFAULT_ATTACKS = {"linf": ("natural", "fgsm", "pgd20", "pgd100", "cw", "autoattack"),
                   "l2": ("natural", "fgm", "pgd20", "pgd100", "cw", "autoattack")}


def default_attacks(norm):
    """(attack names, note or None) of the default evaluation for a threat model 'linf' or 'l2'."""
    if norm not in DEFAULT_ATTACKS:
        raise ValueError(f"norm: {norm!r} is not one of {', '.join(DEFAULT_ATTACKS)}")
    note = ("L2 checkpoint: FGSM (an L∞ attack) is replaced by FGM, one L2 step of size ε; PGD, C&W and "
            "AutoAttack run in L2" if norm == "l2" else None)
    return list(DEFAULT_ATTACKS[norm]), note
INSTALL_HINT = "pip install 'rwp-fast[eval]'   (or: pip install pyautoattack)"


class AutoAttackUnavailable(RuntimeError):
    """The ``pyautoattack`` package, needed for the AutoAttack row, is not installed."""


def require_autoattack(norm="linf"):
    """Import pyautoattack.AutoAttack or raise AutoAttackUnavailable saying how to install it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:
        raise AutoAttackUnavailable(
            f"autoattack: the AutoAttack evaluation needs the package 'pyautoattack' ({exc}). "
            f"Install it with:  {INSTALL_HINT}  — or leave it out explicitly with "
            f"--attacks {','.join(a for a in DEFAULT_ATTACKS.get(norm, ATTACKS) if a != 'autoattack')}") from None
    return AutoAttack


def parse_attacks(text):
    names = [a.strip() for a in text.split(",") if a.strip()] if isinstance(text, str) else list(text)
    bad = [a for a in names if a not in ATTACKS]
    if bad or not names:
        raise ValueError(f"attacks: {bad or text!r} not in {', '.join(ATTACKS)}")
    return names


# The attacks defined for one threat model only: FGSM is the L∞ sign step, FGM its L2 counterpart.
SINGLE_NORM = {"fgsm": "linf", "fgm": "l2"}


def check_attacks(text, norm):
    """The attack names of `text` (names or a comma-separated string), refused as a whole, before any
    attack runs, when one does not fit the threat model `norm`: an L2 eval with FGSM, an L∞ one with FGM."""
    names = parse_attacks(text)
    wrong = [a for a in names if SINGLE_NORM.get(a, norm) != norm]
    if wrong:
        allowed = [a for a in ATTACKS if SINGLE_NORM.get(a, norm) == norm]
        raise ValueError(f"attacks: {', '.join(wrong)} is defined for norm {SINGLE_NORM[wrong[0]]!r} only and this "
                         f"checkpoint's norm is {norm!r}; allowed: {', '.join(allowed)}")
    return names


def _adversarial(name, model, x, y, eps, alpha, norm, gen):
    if name == "natural":
        return x
    params = list(model.parameters())  # frozen during the attack: input gradients only (norms: check_attacks)
    if name in ("fgsm", "fgm"):  # one step of length ε from x itself, no random start (SPEC.md §4)
        return pgd_attack(model, x, y, eps, eps, 1, norm, False, "ce", None, params)
    if name in ("pgd20", "pgd100"):
        return pgd_attack(model, x, y, eps, alpha, int(name[3:]), norm, True, "ce", gen, params)
    if name == "cw":
        return pgd_attack(model, x, y, eps, alpha, 100, norm, True, "cw", gen, params)
    raise AssertionError(name)


def run_eval_suite(model, x_all, y_all, eps, alpha, norm="linf", attacks=None, batch_size=256,
                   device="cpu", seed=0, log=None):
    """Robust accuracy under each attack; returns {attack: accuracy in [0, 1]} plus 'n' and timings.

    x_all: (N, C, H, W) uint8 or float in [0, 1]; y_all: (N,) int64. The model is put in eval mode and
    restored afterwards. attacks: names or a comma-separated string; None is default_attacks(norm).
    """
    attacks = check_attacks(default_attacks(norm)[0] if attacks is None else attacks, norm)
    AutoAttack = require_autoattack(norm) if "autoattack" in attacks else None
    was_training = model.training
    model.eval()
    device = torch.device(device)
    x_all = x_all.float() / 255 if x_all.dtype == torch.uint8 else x_all.float()
    results = {"n": len(x_all)}
    for name in attacks:
        start = time.perf_counter()
        correct = 0
        if name == "autoattack":
            aa = run_autoattack(AutoAttack, model, x_all, y_all, eps, norm, batch_size, device, seed, log)
            correct = aa.pop("correct")
            results.update({f"autoattack_{k}": v for k, v in aa.items()})
        else:
            gen = torch.Generator(device=device).manual_seed(seed)
            for i in range(0, len(x_all), batch_size):
                x, y = x_all[i:i + batch_size].to(device), y_all[i:i + batch_size].to(device)
                x_adv = _adversarial(name, model, x, y, eps, alpha, norm, gen)
                with torch.no_grad():
                    correct += (model(x_adv).argmax(1) == y).sum().item()
        results[name] = correct / max(len(x_all), 1)
        results[f"{name}_seconds"] = time.perf_counter() - start
        if log:
            log(f"{name:>10}: {100 * results[name]:6.2f}%  ({results[f'{name}_seconds']:.1f} s)")
    model.train(was_training)
    return results


AUTOATTACK_STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


def run_autoattack(AutoAttack, model, x_all, y_all, eps, norm, batch_size, device, seed, log=None):
    """AutoAttack 'standard', stage by stage; returns correct (re-run forward), own, disagreements, stages.

    x_all: (N, C, H, W) float in [0, 1] (any device); y_all: (N,) int64. stages: one dict per stage with
    'attack', 'flipped' (points it turned from robust to wrong), 'robust' (robust after it, of N) and
    'seconds'. A stage is skipped, as in AutoAttack, when no robust point is left.
    """
    device = torch.device(device)
    x_all, y_all = x_all.to(device), y_all.to(device)
    adversary = AutoAttack(model, eps=eps, norm={"linf": "Linf", "l2": "L2"}[norm], version="standard",
                           device=device, seed=seed)
    adversary.verbose = False
    x_adv, y_pred = x_all.clone(), torch.empty_like(y_all)
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            y_pred[i:i + batch_size] = model(x_all[i:i + batch_size]).argmax(1)
    robust = y_pred == y_all
    stages = []
    start = time.perf_counter()
    for attack in AUTOATTACK_STAGES:
        idx = robust.nonzero().flatten()
        if idx.numel() == 0:
            break
        t0 = time.perf_counter()
        # Only the still-robust points, in order and batches of batch_size: what 'standard' runs for this
        # stage. Its attack list is set after construction, which keeps the 'standard' parameters.
        adversary.attacks_to_run = [attack]
        out = adversary.run_standard_evaluation(x_all[idx], y_all[idx], batch_size=batch_size)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise RuntimeError(f"autoattack: run_standard_evaluation returned {type(out).__name__}; expected "
                               f"(x_adv, y_adv) as pyautoattack 0.2.0 does")
        stage_x, stage_y = out
        stage_x = stage_x.to(device)
        # a flip is a changed label on a changed image: pyautoattack re-runs its own clean pass in other
        # batches, and a point on the decision boundary can come back "wrong" with its image untouched
        changed = (stage_x != x_all[idx]).flatten(1).any(1)
        flipped = (stage_y.to(device) != y_all[idx]) & changed
        x_adv[idx[flipped]] = stage_x[flipped]
        y_pred[idx[flipped]] = stage_y.to(device)[flipped]
        robust[idx[flipped]] = False
        stages.append({"attack": attack, "flipped": int(flipped.sum()), "robust": int(robust.sum()),
                       "seconds": time.perf_counter() - t0})
        if log:
            log(f"{'':>10}  {attack.upper():>8}: flipped {stages[-1]['flipped']:4d}, robust "
                f"{stages[-1]['robust']}/{len(y_all)}  (total time {time.perf_counter() - start:.1f} s)")
    correct_mask = torch.zeros_like(robust)
    with torch.no_grad():
        for i in range(0, len(x_adv), batch_size):
            correct_mask[i:i + batch_size] = model(x_adv[i:i + batch_size]).argmax(1) == y_all[i:i + batch_size]
    return {"correct": int(correct_mask.sum()), "own": int(robust.sum()) / max(len(y_all), 1),
            "disagreements": int((correct_mask != robust).sum()), "stages": stages}


def markdown_table(results, attacks=None, title="model"):
    attacks = [a for a in (attacks or ATTACKS) if a in results]
    head = "| " + " | ".join([title] + attacks) + " |"
    rule = "|" + "---|" * (len(attacks) + 1)
    row = "| " + " | ".join([f"n={results['n']}"] + [f"{100 * results[a]:.2f}" for a in attacks]) + " |"
    return "\n".join([head, rule, row])


def write_json(path, results, extra=None):
    """The eval report (rwp_fast.readers.read_eval_report reads it), written atomically."""
    atomic_write(path, lambda f: json.dump({**(extra or {}), "results": results}, f, indent=2), mode="w")
