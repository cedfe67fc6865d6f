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

``load_exported(DIR)`` rebuilds the model (Normalize + network) from the two files.
"""

import json
import os

import torch

from .config import RunConfig

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


def _eval_results(checkpoint, eval_json):
    path = eval_json or os.path.splitext(checkpoint)[0] + "_eval.json"
    if not os.path.isfile(path):
        return None, path
    with open(path) as f:
        return json.load(f).get("results", {}), path


def _run_commit(checkpoint):
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.json")
    try:
        with open(path) as f:
            return json.load(f).get("git_commit", "unknown")
    except (OSError, ValueError):
        return "unknown (no config.json next to the checkpoint)"


def export(checkpoint, out_dir, fmt="robustbench", eval_json=None):
    """Write DIR/model.pt and DIR/model_card.json; returns the card (a dict)."""
    from .cli import check_writable_dir
    from .models import build_model
    from .train import load_checkpoint
    from .train.trainer import git_commit

    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    state = load_checkpoint(checkpoint)
    check_writable_dir(out_dir, "out")  # a parent that is a file, no permission: one line, before any work
    cfg = RunConfig.from_dict(state["config"])
    weights = state["model"]
    mean = weights["normalize.mean"].flatten().tolist()
    std = weights["normalize.std"].flatten().tolist()
    # The classifier is the last 2-D weight (convolutions are 4-D): its rows are the classes.
    num_classes = [v for k, v in weights.items() if k.startswith("net.") and v.dim() == 2][-1].shape[0]
    model = build_model(cfg.model, num_classes, len(mean), mean, std)
    model.load_state_dict(weights)
    sd = standard_state_dict(model, cfg.model)

    results, eval_path = _eval_results(checkpoint, eval_json)
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
        "eps_text": f"{cfg.epsilon:g}/255",
        "accuracy": accuracy,
        "eval_json": os.path.abspath(eval_path) if results is not None else None,
        "extra_data": ({"file": cfg.extra_file, "fraction_per_batch": cfg.extra_mix} if cfg.extra_file
                       else ({"file": "synthetic (generated)", "fraction_per_batch": cfg.extra_mix}
                             if cfg.method == "rst" else None)),
        "training": {"method": cfg.method, "weight_perturbation": cfg.perturb,
                     "epochs_trained": state["epoch"], "hyperparameters": cfg.to_dict()},
        "rwp_fast_commit": {"training": _run_commit(checkpoint), "export": git_commit()},
        "checkpoint": os.path.abspath(checkpoint),
    }
    if missing:
        card["missing"] = (f"not measured: {', '.join(missing)} (no {os.path.basename(eval_path)} with them next "
                           f"to the checkpoint); run: rwp-fast eval {checkpoint} --attacks "
                           f"natural,pgd20,autoattack, then export again")
    for name, write in ((WEIGHTS_FILE, lambda p: torch.save(sd, p)),
                        (CARD_FILE, lambda p: open(p, "w").write(json.dumps(card, indent=2) + "\n"))):
        path = os.path.join(out_dir, name)
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    return card


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
    card = export(args.checkpoint, args.out, args.format, args.eval_json)
    print(f"wrote {os.path.join(args.out, WEIGHTS_FILE)} and {os.path.join(args.out, CARD_FILE)}")
    if "missing" in card:
        print(f"note: {card['missing']}")


def add_export_parser(sub):
    x = sub.add_parser("export", help="export a checkpoint for RobustBench: plain state_dict + model card")
    x.add_argument("checkpoint", help="e.g. RUN_DIR/best.pt")
    x.add_argument("--format", default="robustbench", choices=FORMATS)
    x.add_argument("--out", required=True, help="output directory (model.pt, model_card.json)")
    x.add_argument("--eval-json", default=None, help="eval results (default: CHECKPOINT_eval.json)")
    x.set_defaults(func=cmd_export)
    return x
