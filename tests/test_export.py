"""`rwp-fast export --format robustbench`: standard names, same logits, a model card that says what it lacks."""

import json

import pytest
import torch

from export_helpers import saved_checkpoint
from rwp_fast.cli import main
from rwp_fast.export import load_exported, standard_state_dict
from rwp_fast.models import build_model
from rwp_fast.train.checkpoint import save_checkpoint


@pytest.mark.parametrize("arch", ["small_cnn", "preact_resnet18"])
def test_exported_state_dict_gives_the_same_logits(tmp_path, arch):
    path, model = saved_checkpoint(tmp_path, arch)
    out = tmp_path / "export"
    assert main(["export", str(path), "--format", "robustbench", "--out", str(out)]) == 0
    sd = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith(("net.", "normalize.")) for k in sd)
    if arch == "preact_resnet18":
        assert {"conv1.weight", "layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "bn.weight",
                "linear.weight"} <= set(sd)
    # A freshly built network takes the plain state_dict as is; with the card's normalisation in front,
    # its logits are the checkpoint's.
    card = json.loads((out / "model_card.json").read_text())
    fresh = build_model(arch, 10, 3, card["input"]["normalization"]["mean"], card["input"]["normalization"]["std"])
    fresh.net.load_state_dict(sd, strict=True)
    # Compared in float64 (the weights cast exactly): the three models hold the same values but are separate
    # objects (the trainer's weights are views into one flat buffer), and CPU kernels may sum in another order
    # for another alignment. Error model: the forwards can differ in summation order only. A conv/linear
    # output of fan-in n ≤ 4,608 (512·3·3) is within n·u of Σ|w·x| in any order (u = 1.1e-16: 5e-13); the
    # whole forward's rounding, as fp32 against fp64 for these two networks, is ≤ 1.4e-7 ≈ 2.4·u₃₂ of the
    # largest logit, so in fp64 two orders differ by ~5e-16 of it. 1e-9 of the largest logit is far above
    # both, and one BN running_var exported 1e-6 relative off fails it by ≥ 19×.
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(x)
        atol = 1e-9 * float(want.abs().max())
        torch.testing.assert_close(fresh.eval().double()(x), want, rtol=0, atol=atol)
        torch.testing.assert_close(load_exported(str(out)).double()(x), want, rtol=0, atol=atol)
    assert card["threat_model"] == "Linf" and card["eps"] == pytest.approx(8 / 255)
    assert card["accuracy"]["autoattack"] is None and "rwp-fast eval" in card["missing"]
    assert card["training"]["hyperparameters"]["model"] == arch and card["rwp_fast_commit"]["export"]


def test_model_card_takes_the_eval_json(tmp_path):
    path, _ = saved_checkpoint(tmp_path, "small_cnn")
    results = {"n": 40, "natural": 0.5, "pgd20": 0.25, "autoattack": 0.15,
               "autoattack_stages": [{"attack": "apgd-ce", "flipped": 10, "robust": 6, "seconds": 1.0}]}
    (tmp_path / "run" / "best_eval.json").write_text(json.dumps({"results": results}))
    out = tmp_path / "export"
    assert main(["export", str(path), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["accuracy"]["clean"] == {"accuracy": 0.5, "n_examples": 40}
    assert card["accuracy"]["autoattack"] == {"accuracy": 0.15, "n_examples": 40}
    assert "missing" not in card


def test_wide_resnet_uses_the_standard_shortcut_name():
    model = build_model("wrn-28-10", 10, 3, (0.5,) * 3, (0.25,) * 3)
    sd = standard_state_dict(model, "wrn-28-10")
    assert "block1.layer.0.convShortcut.weight" in sd and not any("conv_shortcut" in k for k in sd)


def test_a_checkpoint_chosen_by_its_ema_exports_the_ema_weights(tmp_path):
    """best_ema.pt (selected_by: ema) is evaluated on its EMA weights by default, so those are the weights
    the export ships beside the accuracies; `rwp-fast eval --weights raw` makes it ship the raw ones."""
    path, model = saved_checkpoint(tmp_path, "small_cnn")
    state = torch.load(path, weights_only=True)
    ema = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in state["model"].items()}
    state.update(ema={"model": ema}, selected_by="ema")
    save_checkpoint(str(path), state)
    out = tmp_path / "export"
    assert main(["export", str(path), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    shipped = torch.load(out / "model.pt", weights_only=True)
    model.load_state_dict(ema)
    want = standard_state_dict(model, "small_cnn")
    assert card["weights"] == "ema" and all(torch.equal(shipped[k], want[k]) for k in want)
    raw_report = {"weights": "raw", "results": {"n": 8, "natural": 0.5}}
    (tmp_path / "run" / "best_eval.json").write_text(json.dumps(raw_report))
    assert main(["export", str(path), "--out", str(tmp_path / "raw")]) == 0
    assert json.loads((tmp_path / "raw" / "model_card.json").read_text())["weights"] == "raw"


@pytest.mark.parametrize("epsilon_255, eps, flagged", [(128, "0.502", True), (127.5, "0.5", False)])
def test_l2_model_info_writes_eps_as_robustbench_does(epsilon_255, eps, flagged):
    """Under L2 RobustBench's model-info eps is a decimal ("0.5"), not "x/255"; a radius other than its 0.5
    (the paper's 128/255) is flagged, since rwp-fast eval measured the accuracies at the training radius."""
    from rwp_fast.config import RunConfig
    from rwp_fast.export import model_info
    cfg = RunConfig(norm="l2", epsilon_255=epsilon_255, alpha_255=15.0)
    info, todo = model_info(cfg, {"natural": 0.7, "autoattack": 0.4}, None)
    assert info["eps"] == eps and info["clean_acc"] == "70.00"
    assert any(field == "eps" for field, _ in todo) == flagged
    linf, _ = model_info(RunConfig(), None, None)
    assert linf["eps"] == "8/255"
