"""RunConfig validation and the paper presets."""

import math

import pytest

from rwp_fast.config import PRESETS, ConfigError, RunConfig, preset


@pytest.mark.parametrize("field,value,needle", [
    ("epsilon_255", -1.0, "epsilon_255: must be a finite number >= 0"),
    ("gamma", -0.01, "gamma: must be a finite number >= 0"),
    ("c_min", -1.0, "c_min: must be a number >= 0 (inf allowed: no upper bound)"),
    ("c_min", math.nan, "c_min: must be a number >= 0 (inf allowed"),
    ("k2", 0, "k2: must be a finite number >= 1"),
    ("lr_decay", math.inf, "lr_decay: must be a finite number >= 1"),
    ("method", "mart", "method: 'mart' is not one of at, trades, rst"),
    ("perturb", "sam", "perturb: 'sam' is not one of none, awp, rwp"),
    ("norm", "l1", "norm: 'l1' is not one of linf, l2"),
    ("lsc_low", 2.0, "lsc_low: the LSC range [lsc_low, c_min) needs lsc_low <= c_min"),
    ("epsilon_255", math.nan, "epsilon_255: must be a finite number >= 0"),
    # infinity makes no sense for any of these (an infinite radius, step, weight perturbation, lr, ...)
    *[(f, math.inf, f"{f}: must be a finite number >= 0") for f in
      ("epsilon_255", "alpha_255", "gamma", "lsc_low", "trades_beta", "lr", "momentum", "weight_decay")],
])
def test_invalid_values_name_the_field_and_the_allowed_range(field, value, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{field: value}).validate()
    assert needle in str(err.value)


def test_table1_presets_follow_the_spec():
    c = preset("cifar10-linf-at-rwp")
    assert (c.model, c.norm, c.eps, c.step_size) == ("preact_resnet18", "linf", 8 / 255, 2 / 255)
    assert (c.perturb, c.gamma, c.c_min, c.k2, c.warmup_epochs) == ("rwp", 0.01, 1.7, 10, 0)
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs, c.lr_milestones) == \
        (0.1, 0.9, 5e-4, 128, 200, (100, 150))
    assert c.lsc_range == (0.0, 1.7) and c.effective_k2 == 10
    assert preset("cifar100-linf-at-rwp").c_min == 4.0
    svhn = preset("svhn-linf-at-rwp")
    assert (svhn.step_size, svhn.warmup_epochs) == (1 / 255, 5)
    l2 = preset("cifar10-l2-at-awp")
    assert (l2.eps, l2.step_size, l2.effective_k2, l2.lsc_range) == (128 / 255, 15 / 255, 1, (-math.inf, math.inf))


def test_table2_presets_follow_the_spec():
    t = preset("cifar10-wrn34-trades-rwp")
    assert (t.model, t.method, t.gamma, t.c_min, t.k2, t.warmup_epochs, t.trades_beta) == \
        ("wrn-34-10", "trades", 0.005, 1.7, 10, 10, 6.0)
    r = PRESETS["cifar10-wrn28-rst-rwp"]
    assert (r["model"], r["batch_size"], r["lr_schedule"], r["nesterov"]) == ("wrn-28-10", 256, "cosine", True)
    assert preset("cifar10-wrn34-at-rwp").model == "wrn-34-10"


def test_every_preset_validates_and_overrides_apply():
    for name in PRESETS:
        if PRESETS[name].get("method") == "rst":
            preset(name, rst_extra="extra.npz")
        else:
            preset(name)
    assert preset("cifar10-linf-at-rwp", c_min=2.0).c_min == 2.0
    with pytest.raises(ConfigError, match="preset: unknown preset 'nope'"):
        preset("nope")


def test_config_round_trips_through_a_dict():
    c = preset("cifar10-linf-at-rwp")
    assert RunConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="unknown field"):
        RunConfig.from_dict({**c.to_dict(), "bogus": 1})


def test_c_min_may_be_infinite_no_upper_bound():
    assert RunConfig(perturb="rwp", c_min=math.inf).validate().lsc_range == (0.0, math.inf)


def test_retired_num_workers_is_gone_but_old_configs_still_load():
    assert "num_workers" not in RunConfig().to_dict()
    old = {**RunConfig().to_dict(), "num_workers": 2}  # a checkpoint written before the field was removed
    assert RunConfig.from_dict(old) == RunConfig()


def test_a_config_saved_with_the_old_names_loads_under_the_new_ones():
    """config.json and checkpoints written before the unit rename say epsilon/alpha (in /255)."""
    old = {k: v for k, v in RunConfig().to_dict().items() if k not in ("epsilon_255", "alpha_255")}
    cfg = RunConfig.from_dict({**old, "epsilon": 16.0, "alpha": 4.0, "num_workers": 2})
    assert (cfg.epsilon_255, cfg.alpha_255, cfg.eps, cfg.step_size) == (16.0, 4.0, 16 / 255, 4 / 255)
    assert RunConfig.from_dict({"epsilon": 8.0, "epsilon_255": 8.0}).epsilon_255 == 8.0
    with pytest.raises(ConfigError, match=r"config: epsilon \(the old name of epsilon_255\) is 4.0 but "
                                          r"epsilon_255 is 8.0; give one"):
        RunConfig.from_dict({"epsilon": 4.0, "epsilon_255": 8.0})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epsilonn'\]"):
        RunConfig.from_dict({"epsilonn": 4.0})


def test_the_cli_flags_keep_their_names_and_set_the_unit_fields():
    import argparse

    from rwp_fast.cli_args import add_config_flags, config_from_args
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=None)
    add_config_flags(parser)
    cfg = config_from_args(parser.parse_args(["--epsilon", "16", "--alpha", "4", "--k2", "3"]))
    assert (cfg.epsilon_255, cfg.alpha_255, cfg.k2) == (16.0, 4.0, 3)
    text = parser.format_help()
    assert "--epsilon EPSILON_255" in text and "attack radius, /255" in text and "PGD step size, /255" in text
    assert "--epsilon-255" not in text and "--alpha-255" not in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--epsilon-255", "16"])


def test_an_linf_radius_over_255_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"epsilon_255 \(--epsilon\): 300 is over 255; it is in 1/255 units"):
        RunConfig(epsilon_255=300.0).validate()
    RunConfig(epsilon_255=255.0).validate()
    RunConfig(norm="l2", epsilon_255=300.0).validate()  # an L2 radius may pass 1 pixel unit on large images


def test_the_backend_is_the_flag_else_rwp_fast_backend_else_the_default(monkeypatch):
    import argparse

    from rwp_fast.cli_args import add_config_flags, config_from_args
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=None)
    add_config_flags(parser)
    monkeypatch.delenv("RWP_FAST_BACKEND", raising=False)
    assert config_from_args(parser.parse_args([])).backend == "auto"
    monkeypatch.setenv("RWP_FAST_BACKEND", "torch")
    assert config_from_args(parser.parse_args([])).backend == "torch"   # the flag keeps its default
    assert config_from_args(parser.parse_args(["--backend", "reference"])).backend == "reference"
    assert config_from_args(parser.parse_args(["--backend", "auto"])).backend == "auto"  # given explicitly


def test_rwp_fast_backend_reference_runs_the_ops_on_torch(monkeypatch):
    """RWP_FAST_BACKEND=reference makes a run use the reference step (the flag's default); the same variable
    then also reaches the ops' dispatch (the per-epoch PGD-20), where 'reference' means the torch ops."""
    from rwp_fast.ops import dispatch
    monkeypatch.setattr(dispatch, "_override", None)  # an earlier in-process run's set_backend wins over the variable
    monkeypatch.setenv("RWP_FAST_BACKEND", "reference")
    assert dispatch.requested_backend() == "torch"
    assert dispatch.choose_backend("pgd_step", "cpu") == "torch"


def test_momentum_of_one_or_more_is_refused():
    for value in (1.0, 1.5):
        with pytest.raises(ConfigError, match=r"momentum: must be in \[0, 1\)"):
            RunConfig(momentum=value).validate()
    RunConfig(momentum=0.0).validate()
    with pytest.raises(ConfigError, match="nesterov: Nesterov momentum needs --momentum in"):
        RunConfig(momentum=0.0, nesterov=True).validate()
