"""``rwp-fast export CKPT --format robustbench --out DIR``: weights and a model card for a submission.

Writes
  * ``DIR/model.pt``: a plain ``state_dict`` (tensors only; ``torch.load(weights_only=True)`` reads it)
    of the bare network with the architecture's standard parameter names, as RobustBench's model zoo
    and the released training code use them: PreAct ResNet-18 ``conv1``, ``layer1.0.bn1``, …, ``bn``,
    ``linear`` (Rice et al.); WideResNet ``conv1``, ``block1.layer.0.convShortcut``, …, ``bn1``, ``fc``
    (TRADES / RobustBench). Our ``Normalize`` first layer is not in it: RobustBench models take images in
    [0, 1] and normalise inside ``forward`` with constants, so the card gives the mean and std.
  * ``DIR/model_card.json``: what a RobustBench submission asks for: architecture, threat model, ε,
    clean / PGD-20 / AutoAttack accuracy with the number of test examples (from the checkpoint's
    ``*_eval.json`` if there is one; a ``missing`` list says what is not measured and how to measure it),
    extra data, training method and hyperparameters, and the rwp-fast commits (training and export).
  * ``DIR/model_info/<dataset>/<threat>/<Name>.json``: RobustBench's own model-info file (link, name,
    authors, additional_data, number_forward_passes, dataset, venue, architecture, eps, clean_acc,
    reported, autoattack_acc, unreliable), filled from the checkpoint and its eval JSON. What only the
    user knows comes from --link, --paper-name, --authors, --venue (and --model-name for <Name>); each one
    not given is an explicit "TODO: ..." placeholder, and the command lists them.

``load_exported(DIR)`` rebuilds the model (Normalize + network) from the two files.
"""

import json
import os
import re

import torch

from ._fs import atomic_write, check_output_dir
from .config import ConfigError, RunConfig
from .readers import read_eval_report, read_run_config

FORMATS = ("robustbench",)
WEIGHTS_FILE = "model.pt"
CARD_FILE = "model_card.json"

# Our module names → the standard ones, per architecture (the rest already match).
_RENAMES = {
    "wrn-34-10": ((".conv_shortcut.", ".convShortcut."),),
    "wrn-28-10": ((".conv_shortcut.", ".convShortcut."),),
}


def standard_state_dict(model, arch):
    """The bare network's state_dict under the standard names: ``net.`` dropped, architecture renames."""
    out = {}
    for key, value in model.state_dict().items():
        if not key.startswith("net."):
            continue                       # normalize.mean / normalize.std go to the model card
        key = "." + key[len("net."):]
        for ours, theirs in _RENAMES.get(arch, ()):
            key = key.replace(ours, theirs)
        out[key[1:]] = value.detach().cpu().clone()
    return out


def _ours(state, arch):
    """Inverse of ``standard_state_dict``: the network's own (not ``net.``-prefixed) names."""
    out = {}
    for key, value in state.items():
        key = "." + key
        for ours, theirs in _RENAMES.get(arch, ()):
            key = key.replace(theirs, ours)
        out[key[1:]] = value
    return out


def _eval_report(checkpoint, eval_json, cfg):
    """(the eval report or None, its path): --eval-json must be an rwp-fast eval report of this model; the
    default CHECKPOINT_eval.json is optional (the card then lists what is not measured)."""
    path = eval_json or os.path.splitext(checkpoint)[0] + "_eval.json"
    if eval_json is None and not os.path.lexists(path):
        return None, path
    try:
        report = read_eval_report(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"eval_json: {exc}") from None
    # a report of another model's evaluation would put its accuracies on this one's card
    theirs = report.get("config") or {}
    differ = [k for k in ("dataset", "model", "norm", "epsilon_255") if k in theirs and theirs[k] != getattr(cfg, k)]
    if differ:
        raise ConfigError(f"eval_json: {path} reports an evaluation of "
                          + ", ".join(f"{k} {theirs[k]!r}" for k in differ) + f", but {checkpoint} is of "
                          + ", ".join(f"{k} {getattr(cfg, k)!r}" for k in differ))
    return report, path


# RobustBench's model_info/<dataset>/<threat>/<Name>.json (e.g. cifar10/Linf/Wu2020Adversarial.json):
# accuracies are strings in percent with 2 decimals; eps a string, "8/255" under Linf and a decimal under
# L2 ("0.5", e.g. cifar10/L2/Augustin2020Adversarial.json), whose leaderboard is evaluated at ε = 0.5.
ROBUSTBENCH_L2_EPS = 0.5
MODEL_INFO_DIR = "model_info"
ARCHITECTURE_NAMES = {"preact_resnet18": "PreActResNet-18", "wrn-34-10": "WideResNet-34-10",
                      "wrn-28-10": "WideResNet-28-10"}
# What only the user knows: field → the flag that fills it; without the flag an explicit placeholder.
USER_FIELDS = {"link": "--link", "name": "--paper-name", "authors": "--authors", "venue": "--venue"}


def placeholder(flag):
    return f"TODO: fill in (rwp-fast export {flag} ...)"


def model_info(cfg, results, subset, user=None, reported=None):
    """RobustBench's model-info dict and the fields left as placeholders, as [(field, flag)].

    results: the eval JSON's 'results' (or None); subset: its 'test_subset' (or None); user: {field: text}
    for the USER_FIELDS; reported: the robust accuracy the paper reports, in % (default: the measured
    AutoAttack accuracy, which is what a run of rwp-fast has to report).
    """
    user = user or {}
    todo = [(k, flag) for k, flag in USER_FIELDS.items() if not user.get(k)]
    pct = lambda name: f"{100 * results[name]:.2f}" if results and name in results else None
    measured = {"clean_acc": pct("natural"), "autoattack_acc": pct("autoattack")}
    for field, value in measured.items():
        if value is None:
            todo.append((field, f"rwp-fast eval CHECKPOINT --attacks natural,autoattack (no {field} measured)"))
    info = {k: user.get(k) or placeholder(flag) for k, flag in USER_FIELDS.items() if k in ("link", "name", "authors")}
    info.update({
        "additional_data": bool(cfg.extra_file) or cfg.method == "rst",
        "number_forward_passes": 1,
        "dataset": cfg.dataset,
        "venue": user.get("venue") or placeholder(USER_FIELDS["venue"]),
        "architecture": ARCHITECTURE_NAMES.get(cfg.model, cfg.model),
        "eps": f"{cfg.epsilon_255:g}/255" if cfg.norm == "linf" else f"{cfg.eps:.3g}",
        "clean_acc": measured["clean_acc"] or "TODO: not measured",
        "reported": f"{reported:.2f}" if reported is not None else (measured["autoattack_acc"] or "TODO: not measured"),
        "autoattack_acc": measured["autoattack_acc"] or "TODO: not measured",
        "unreliable": False,
    })
    if cfg.norm == "l2" and f"{cfg.eps:.3g}" != f"{ROBUSTBENCH_L2_EPS:g}":
        # the paper's L2 radius, 128/255 = 0.502, is not the leaderboard's 0.5; rwp-fast eval measures at the
        # training radius, so the accuracies here are at this run's ε
        todo.append(("eps", f"measured at L2 ε = {cfg.eps:.4g} ({cfg.epsilon_255:g}/255); RobustBench's L2 "
                     f"leaderboard evaluates at ε = {ROBUSTBENCH_L2_EPS:g}"))
    if subset and subset.get("stratified"):
        todo.append(("clean_acc/autoattack_acc", f"measured on {subset['n']} of {subset['of']} test images; "
                     "RobustBench reports the whole test set: rwp-fast eval without --n-examples"))
    return info, todo


def _run_commit(checkpoint):
    info = read_run_config(os.path.dirname(os.path.abspath(checkpoint)))
    if info is None:
        return "unknown (no config.json next to the checkpoint)"
    return info.get("git_commit", "unknown")


def export(checkpoint, out_dir, fmt="robustbench", eval_json=None, model_name=None, user=None, reported=None):
    """Write DIR/model.pt, DIR/model_card.json and RobustBench's DIR/model_info/<dataset>/<threat>/<Name>.json;
    returns the card (a dict), with 'model_info' (its path) and 'placeholders' ([(field, flag)])."""
    from .models import build_model
    from .train import load_checkpoint
    from .train.ema import select_weights
    from .train.trainer import git_commit

    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if model_name is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", model_name):
        raise ConfigError(f"model_name: {model_name!r} is not a RobustBench name; allowed: letters, digits, "
                          "- and _, e.g. Yu2022Robust")
    state = load_checkpoint(checkpoint)
    cfg = RunConfig.from_dict(state["config"])
    name = model_name or default_model_name(checkpoint)
    info_path = os.path.join(MODEL_INFO_DIR, cfg.dataset, {"linf": "Linf", "l2": "L2"}[cfg.norm], f"{name}.json")
    # every output, before any work: a file there that an earlier export did not write is not replaced
    check_output_dir(out_dir, "out", [(WEIGHTS_FILE, "export_weights"), (CARD_FILE, "export_card"),
                                      (info_path, "model_info")])
    report, eval_path = _eval_report(checkpoint, eval_json, cfg)
    # The weights the accuracies were measured on: the eval JSON's, else what `rwp-fast eval` takes by
    # default (the EMA weights of best_ema.pt). Shipping the raw weights of best_ema.pt beside the EMA's
    # accuracy would submit one model's numbers for another.
    weights, which = select_weights(state, None if report is None else report.get("weights"), checkpoint)
    mean = weights["normalize.mean"].flatten().tolist()
    std = weights["normalize.std"].flatten().tolist()
    # The classifier is the last 2-D weight (convolutions are 4-D): its rows are the classes.
    num_classes = [v for k, v in weights.items() if k.startswith("net.") and v.dim() == 2][-1].shape[0]
    model = build_model(cfg.model, num_classes, len(mean), mean, std)
    model.load_state_dict(weights)
    sd = standard_state_dict(model, cfg.model)

    results = None if report is None else report.get("results", {})
    accuracy, missing = {}, []
    for key, name in (("clean", "natural"), ("pgd20", "pgd20"), ("autoattack", "autoattack")):
        if results is not None and name in results:
            accuracy[key] = {"accuracy": results[name], "n_examples": results["n"]}
        else:
            accuracy[key] = None
            missing.append(name)
    if results is not None and "autoattack_stages" in results:
        accuracy["autoattack_stages"] = results["autoattack_stages"]
    card = {
        "format": fmt,
        "architecture": {"name": cfg.model, "num_classes": num_classes, "in_channels": len(mean),
                         "parameters": sum(v.numel() for k, v in sd.items() if "running" not in k
                                           and "num_batches" not in k)},
        "input": {"range": [0.0, 1.0], "normalization": {"mean": mean, "std": std},
                  "note": "forward(x) = net((x - mean) / std); the state_dict holds net only"},
        "dataset": cfg.dataset,
        "threat_model": {"linf": "Linf", "l2": "L2"}[cfg.norm],
        "eps": cfg.eps,
        "eps_text": f"{cfg.epsilon_255:g}/255",
        "accuracy": accuracy,
        "eval_json": os.path.abspath(eval_path) if results is not None else None,
        "extra_data": ({"file": cfg.extra_file, "fraction_per_batch": cfg.extra_mix} if cfg.extra_file
                       else ({"file": "synthetic (generated)", "fraction_per_batch": cfg.extra_mix}
                             if cfg.method == "rst" else None)),
        "training": {"method": cfg.method, "weight_perturbation": cfg.perturb,
                     "epochs_trained": state["epoch"], "hyperparameters": cfg.to_dict()},
        "rwp_fast_commit": {"training": _run_commit(checkpoint), "export": git_commit()},
        "checkpoint": os.path.abspath(checkpoint),
        "weights": which,  # 'ema' or 'raw': the ones in model.pt and behind the accuracies
    }
    if missing:
        card["missing"] = (f"not measured: {', '.join(missing)} (no {os.path.basename(eval_path)} with them next "
                           f"to the checkpoint); run: rwp-fast eval {checkpoint} --attacks "
                           f"natural,pgd20,autoattack, then export again")
    info, todo = model_info(cfg, results, (report or {}).get("test_subset"), user, reported)
    # the card first: model.pt is recognised as an export's by the card beside it
    atomic_write(os.path.join(out_dir, CARD_FILE), lambda f: f.write(json.dumps(card, indent=2) + "\n"), mode="w")
    atomic_write(os.path.join(out_dir, WEIGHTS_FILE), lambda f: torch.save(sd, f))
    atomic_write(os.path.join(out_dir, info_path), lambda f: f.write(json.dumps(info, indent=2) + "\n"), mode="w")
    if not model_name:
        todo.insert(0, ("<Name>", f"--model-name (RobustBench's Surname2022Word; used: {name})"))
    return {**card, "model_info": os.path.join(out_dir, info_path), "placeholders": todo}


def default_model_name(checkpoint):
    """RWPFast_<run directory>_<checkpoint>, e.g. RWPFast_at-rwp_best: a valid file name until --model-name."""
    run = os.path.basename(os.path.dirname(os.path.abspath(checkpoint))) or "run"
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return "RWPFast_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{run}_{stem}")


def load_exported(out_dir):
    """Normalize + network with the exported weights, in eval mode: the same logits as the checkpoint."""
    from .models import build_model

    with open(os.path.join(out_dir, CARD_FILE)) as f:
        card = json.load(f)
    arch, norm = card["architecture"], card["input"]["normalization"]
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], norm["mean"], norm["std"])
    sd = torch.load(os.path.join(out_dir, WEIGHTS_FILE), weights_only=True)
    model.net.load_state_dict(_ours(sd, arch["name"]))
    return model.eval()


def cmd_export(args):
    user = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in USER_FIELDS.items()}
    card = export(args.checkpoint, args.out, args.format, args.eval_json, args.model_name, user, args.reported)
    print(f"wrote {os.path.join(args.out, WEIGHTS_FILE)}, {os.path.join(args.out, CARD_FILE)} and "
          f"{card['model_info']}")
    if "missing" in card:
        print(f"note: {card['missing']}")
    for field, how in card["placeholders"]:
        print(f"placeholder: {field}: {how}")


def add_export_parser(sub):
    x = sub.add_parser("export", help="export a checkpoint for RobustBench: plain state_dict, model card and "
                                      "RobustBench's model-info JSON")
    x.add_argument("checkpoint", help="e.g. RUN_DIR/best.pt")
    x.add_argument("--format", default="robustbench", choices=FORMATS)
    x.add_argument("--out", required=True,
                   help="output directory (model.pt, model_card.json, model_info/<dataset>/<threat>/<Name>.json)")
    x.add_argument("--eval-json", default=None, help="eval results (default: CHECKPOINT_eval.json)")
    x.add_argument("--model-name", default=None,
                   help="RobustBench's <Name> of model_info/<dataset>/<threat>/<Name>.json, e.g. Yu2022Robust "
                        "(letters, digits, - and _; default RWPFast_<run dir>_<checkpoint>)")
    x.add_argument("--paper-name", default=None, help="model info 'name': the paper's title")
    x.add_argument("--link", default=None, help="model info 'link': the paper's URL")
    x.add_argument("--authors", default=None, help="model info 'authors', e.g. 'Chaojian Yu, Bo Han, ...'")
    x.add_argument("--venue", default=None, help="model info 'venue', e.g. 'IJCAI 2022'")
    x.add_argument("--reported", type=float, default=None,
                   help="model info 'reported': the robust accuracy (%%) the paper reports (default: the "
                        "measured AutoAttack accuracy)")
    x.set_defaults(func=cmd_export)
    return x
