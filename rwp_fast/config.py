"""One typed configuration for a run, the paper's presets, and validation.

The CLI (``rwp_fast.cli``) mirrors ``RunConfig`` field for field: each field becomes ``--field-name``
(``FLAGS`` names the exceptions) and its help text is the field's comment. Presets reproduce the rows
of the paper's Tables 1 and 2 with the hyperparameters of SPEC.md §2–§3; explicit flags override a preset.
"""

import dataclasses
import math
from dataclasses import dataclass

from .core import NORM_SCOPES, NORMS, UPDATE_RULES  # noqa: F401  defined once, for the oracle and kernels too

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "synthetic", "folder", "npz")
MODELS = ("small_cnn", "preact_resnet18", "wrn-34-10", "wrn-28-10", "small_cnn_gn")
METHODS = ("at", "trades", "rst")
PERTURBS = ("none", "awp", "rwp")
LR_SCHEDULES = ("piecewise", "cosine")
# 'reference' runs the plain oracle trainer; the others run the fast trainer with that ops backend.
BACKENDS = ("auto", "cuda", "triton", "torch", "reference")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
# rwp-fast eval's attacks (rwp_fast/eval/suite.py runs them; rwp_fast/readers.py reads their reports)
EVAL_ATTACKS = ("natural", "fgsm", "fgm", "pgd20", "pgd100", "cw", "autoattack")
# How the fast step runs its phases (rwp_fast.train.fast_step): 'auto' captures them as CUDA graphs where it
# can (CUDA, one process, not fp16) and compiles them otherwise; 'cuda-graphs' asks for the capture and warns
# where it cannot; the others are torch.compile modes without capture. The captured mode is the CUDA default
# from issue 22 on; it has not run on a GPU yet (the last GPU run measured the design before it).
COMPILE_MODES = ("auto", "default", "max-autotune-no-cudagraphs", "cuda-graphs")
# Retired modes, read from old configs: Inductor's own graph trees are superseded by the captured phases.
OLD_COMPILE_MODES = {"reduce-overhead": "cuda-graphs", "max-autotune": "max-autotune-no-cudagraphs"}


# num_workers: accepted and used nowhere (every dataset is a tensor moved to the device once, and
# batches are cut and augmented there, so there is no DataLoader to give workers to).
RETIRED_FIELDS = ("num_workers",)

# Fields renamed to carry their unit, old name -> new. The old names are still the CLI flags (--epsilon,
# --alpha: what users type) and still load from a config.json or checkpoint written before the rename.
RENAMED_FIELDS = {"epsilon": "epsilon_255", "alpha": "alpha_255"}
# The CLI flag of a field whose flag is not its name (--epsilon sets epsilon_255).
FLAGS = {new: old for old, new in RENAMED_FIELDS.items()}

# The LSC range that masks nothing: the plain batch mean.
FULL_RANGE = (-math.inf, math.inf)


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the allowed values."""


# Exit statuses of the command line (README, "Exit status"). 2 is argparse's own for a bad argument.
EXIT_USER_ERROR = 2     # bad input, refused before any work: one line on stderr naming the argument
EXIT_PREEMPTED = 75     # stopped by SIGTERM / SIGUSR1 with last.pt written: resume it (sysexits' EX_TEMPFAIL)


@dataclass
class RunConfig:
    # --- data and model
    dataset: str = "digits"            # one of DATASETS; digits ship with scikit-learn (offline)
    data_dir: str = "data"             # torchvision's CIFAR/SVHN dir; folder: DIR/train, DIR/test; npz: FILE or DIR
    download: bool = False             # let torchvision download the dataset (needs a network)
    rst_extra: str = ""                # RST: extra .npz as for extra_data, mixed with extra_fraction 0.5
    extra_data: str = ""               # .npz: 'images' (N, H, W, C) uint8, 'labels' (N,); memory-mapped
    extra_fraction: float = 0.0        # round(F·B) extra per batch; an epoch is one pass over the training set
    image_size: int = 0                # folder/npz: resize images to this square size (0 = keep)
    skip_bad_images: bool = False      # folder: skip and count unreadable images instead of stopping
    model: str = "small_cnn"           # one of MODELS
    # --- threat model (pixel values in [0, 1]; ε and α are given in units of 1/255)
    norm: str = "linf"                 # one of NORMS
    epsilon_255: float = 8.0           # attack radius, /255 (8 → 8/255 L∞; 128 → 128/255 L2)
    alpha_255: float = 2.0             # PGD step size, /255
    attack_steps: int = 10             # K1, PGD steps in training
    eval_attack_steps: int = 20        # PGD steps of the per-epoch test evaluation (PGD-20)
    # --- training method
    method: str = "at"                 # one of METHODS: AT (Madry), TRADES, RST
    trades_beta: float = 6.0           # TRADES/RST: weight of the KL term (dimensionless)
    # --- weight perturbation (SPEC.md §2)
    perturb: str = "none"              # one of PERTURBS
    gamma: float = 0.01                # ‖v_l‖ = γ‖w_l‖ (dimensionless, relative weight size)
    c_min: float = 1.7                 # RWP: LSC upper bound q, in nats of per-example loss
    lsc_low: float = 0.0               # LSC lower bound p, nats; the mask is p ≤ ℓ < q
    k2: int = 10                       # K2, RWP probe steps (AWP always uses 1; see effective_k2)
    rwp_update: str = "accumulate"     # one of UPDATE_RULES: released code or Algorithm 1 as printed
    norm_scope: str = "layer"          # one of NORM_SCOPES: per-tensor or one global norm
    warmup_epochs: int = 0             # epochs of plain training before the perturbation starts
    # --- optimisation
    epochs: int = 200
    batch_size: int = 128              # global batch: examples per step over all processes (RST: half extra)
    lr: float = 0.1                    # peak SGD learning rate, per step
    momentum: float = 0.9              # SGD momentum, in [0, 1)
    nesterov: bool = False
    weight_decay: float = 5e-4         # L2 coefficient, applied at w + v
    lr_schedule: str = "piecewise"     # one of LR_SCHEDULES; set per iteration
    lr_milestones: tuple = (100, 150)  # piecewise: epochs at which lr is divided by lr_decay
    lr_decay: float = 10.0
    ema_decay: float = 0.0             # EMA of the weights w (never w + v), per step, in [0, 1): 0 = off; e.g. 0.999
    ema_warmup_steps: int = 0          # the first N steps the EMA copies the weights instead of averaging
    # --- run control
    seed: int = 0
    device: str = "auto"               # one of DEVICES; auto picks CUDA when present
    backend: str = "auto"              # one of BACKENDS: fused-op backend of the fast trainer, or 'reference'
    # --- fast trainer only (None / 'auto': on for CUDA, off for CPU)
    precision: str = "auto"            # one of PRECISIONS; auto is bf16 autocast on CUDA, fp32 on CPU
    compile: bool | None = None        # torch.compile each phase, fullgraph (--no-compile to switch off)
    compile_mode: str = "auto"         # one of COMPILE_MODES: captured phases on CUDA, compiled where not
    channels_last: bool | None = None  # channels-last weights (convolutions then run NHWC)
    input_only_grads: bool = True      # freeze the weights during the attack (no weight-grad convs)
    eval_examples: int = 1000          # per-epoch PGD-20 test examples (0 = all): a class-stratified sample
    subset_seed: int = 0               # seed of the stratified eval subsets (not seed: every run sees these images)
    train_examples: int = 0            # use only the first N training examples (0 = all)
    out_dir: str = "runs/default"      # run directory: config, metrics, checkpoints, plots
    quiet: bool = False                # no progress bar
    deterministic: bool = False        # GPU: deterministic cuDNN and torch algorithms (README, "Resume and ...")
    tensorboard: bool = False          # also write the metrics to OUT_DIR/tb/ (needs the tensorboard extra)
    # --- many processes (torchrun; README "Many GPUs")
    sync_bn: bool = False              # SyncBatchNorm across processes (CUDA); default: per-process batch statistics
    checkpoint_every_steps: int = 0    # also write last.pt every N steps inside an epoch (0 = at epoch ends only)

    # derived values in pixel units
    @property
    def eps(self):
        return self.epsilon_255 / 255.0

    @property
    def step_size(self):
        return self.alpha_255 / 255.0

    @property
    def lsc_range(self):
        """[p, q) of the LSC mask: [lsc_low, c_min) for RWP; no mask, (−∞, ∞), for AWP (SPEC.md §2):
        a TRADES loss can round to −1e-8 and must not drop out of an unmasked objective."""
        return (self.lsc_low, self.c_min) if self.perturb == "rwp" else FULL_RANGE

    @property
    def extra_file(self):
        """The extra-data file mixed into the batches: extra_data, or rst_extra for method 'rst'."""
        return self.extra_data or (self.rst_extra if self.method == "rst" else "")

    @property
    def extra_mix(self):
        """The fraction F of each batch that is extra data: extra_fraction, 0.5 for RST by default."""
        return self.extra_fraction or (0.5 if self.method == "rst" else 0.0)

    @property
    def effective_k2(self):
        """K2 of this run, the probe count the perturbation search takes: 0 without one, 1 for AWP, k2 for RWP."""
        return {"none": 0, "awp": 1, "rwp": self.k2}[self.perturb]

    def validate(self):
        """Raise ConfigError naming the first invalid field and its allowed values; return self."""
        choices = dict(dataset=DATASETS, model=MODELS, method=METHODS, perturb=PERTURBS, norm=NORMS,
                       rwp_update=UPDATE_RULES, norm_scope=NORM_SCOPES, lr_schedule=LR_SCHEDULES,
                       backend=BACKENDS, device=DEVICES, precision=PRECISIONS,
                       compile_mode=COMPILE_MODES)
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        # Every float field must be a finite number >= 0, except c_min: q = inf is "no upper bound" (the
        # LSC mask then keeps every loss >= p), so c_min may be inf, never NaN.
        non_negative = ("epsilon_255", "alpha_255", "gamma", "c_min", "lsc_low", "trades_beta", "lr",
                        "momentum", "weight_decay")
        for name in non_negative:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 and \
                (math.isfinite(value) or (name == "c_min" and value == math.inf))
            if not ok:
                kind = "a number >= 0 (inf allowed: no upper bound)" if name == "c_min" else "a finite number >= 0"
                raise ConfigError(f"{name}: must be {kind}, got {value!r}")
        # /255 units: an L∞ radius past 255 (the whole [0, 1] box) is a pixel-unit or percent mix-up, caught
        # here, before anything is written, rather than by the op's pixel-unit check inside the attack
        if self.norm == "linf" and self.epsilon_255 > 255:
            raise ConfigError(f"epsilon_255 (--epsilon): {self.epsilon_255:g} is over 255; it is in 1/255 units "
                              "(8 means 8/255), allowed: 0 to 255")
        # a momentum of 1 or more never decays the velocity: the weights run off and the run trains to chance
        if not self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov: Nesterov momentum needs --momentum in (0, 1), got 0")
        at_least_one = ("k2", "epochs", "batch_size", "lr_decay")
        for name in at_least_one:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 1):
                raise ConfigError(f"{name}: must be a finite number >= 1, got {value!r}")
        at_least_zero = ("attack_steps", "eval_attack_steps", "warmup_epochs", "eval_examples",
                         "train_examples", "subset_seed")
        for name in at_least_zero:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}: must be an integer >= 0, got {getattr(self, name)!r}")
        if not self.subset_seed < 2 ** 32:  # numpy RandomState's seed range (rwp_fast/data/subset.py)
            raise ConfigError(f"subset_seed: must be an integer in [0, 2**32), got {self.subset_seed!r}")
        if not self.lsc_low <= self.c_min:
            raise ConfigError(f"lsc_low: the LSC range [lsc_low, c_min) needs lsc_low <= c_min, "
                              f"got lsc_low={self.lsc_low}, c_min={self.c_min}")
        if not (0 <= self.extra_fraction < 1):
            raise ConfigError(f"extra_fraction: must be in [0, 1), got {self.extra_fraction!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ConfigError(f"ema_decay: must be a number in [0, 1) (0 = off), got {self.ema_decay!r}")
        if not self.ema_warmup_steps >= 0:
            raise ConfigError(f"ema_warmup_steps: must be an integer >= 0, got {self.ema_warmup_steps!r}")
        if self.checkpoint_every_steps < 0:
            raise ConfigError(f"checkpoint_every_steps: must be an integer >= 0 (0 = off), got "
                              f"{self.checkpoint_every_steps!r}")
        if self.image_size < 0:
            raise ConfigError(f"image_size: must be an integer >= 0 (0 = keep), got {self.image_size!r}")
        if self.extra_data and self.rst_extra and self.extra_data != self.rst_extra:
            raise ConfigError("extra_data: --rst-extra and --extra-data name different files; give one")
        synthetic_rst = self.method == "rst" and self.dataset == "synthetic"   # generates its own extra data
        if self.extra_fraction > 0 and not self.extra_file and not synthetic_rst:
            raise ConfigError("extra_fraction: needs --extra-data FILE.npz (the extra examples to mix in)")
        if self.extra_data and not self.extra_mix:
            raise ConfigError("extra_fraction: --extra-data needs --extra-fraction F in (0, 1), e.g. 0.5")
        if self.method == "rst" and not self.extra_file and self.dataset != "synthetic":
            raise ConfigError("rst_extra: method 'rst' needs the .npz file of pseudo-labeled extra data "
                              "(see README, 'RST extra data')")
        if any(m < 0 for m in self.lr_milestones):
            raise ConfigError(f"lr_milestones: epochs must be >= 0, got {self.lr_milestones}")
        return self

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["lr_milestones"] = list(self.lr_milestones)
        return d

    @classmethod
    def from_dict(cls, d):
        """A RunConfig from a saved dict (config.json, a checkpoint), each value checked against its field's
        type; not validated (a run saved under older rules still loads). ConfigError names what is wrong."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: holds {type(d).__name__}, expected an object of RunConfig fields")
        names = {f.name for f in dataclasses.fields(cls)}
        # Fields that existed once and did nothing: dropped, so that older checkpoints still load.
        d = upgrade_dict({k: v for k, v in d.items() if k not in RETIRED_FIELDS})
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"config: unknown field(s) {unknown}")
        for name, value in d.items():
            _check_type(name, value)
        d = dict(d)
        d["compile_mode"] = OLD_COMPILE_MODES.get(d.get("compile_mode"), d.get("compile_mode", "auto"))
        if "lr_milestones" in d:
            d["lr_milestones"] = tuple(d["lr_milestones"])
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _check_type(name, value):
    """A ConfigError unless `value` has the JSON type of RunConfig field `name` (typed by its default)."""
    default = {f.name: f.default for f in dataclasses.fields(RunConfig)}[name]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if default is None:        # bool | None: on / off / auto
        ok, kind = value is None or isinstance(value, bool), "true, false or null"
    elif isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = number, "a number"
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        kind = "a list of integers"
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"config: field {name} is {value!r}, expected {kind}")


def upgrade_dict(d):
    """A saved config dict with the old field names (RENAMED_FIELDS) renamed to the new ones; a ConfigError
    if one holds both names with different values."""
    d = dict(d)
    for old, new in RENAMED_FIELDS.items():
        if old in d:
            value = d.pop(old)
            if new in d and d[new] != value:
                raise ConfigError(f"config: {old} (the old name of {new}) is {value!r} but {new} is {d[new]!r}; "
                                  "give one")
            d[new] = value
    return d


# ----------------------------------------------------------------------------------------- presets
# Table 1 of the paper: PreAct ResNet-18, 200 epochs, lr 0.1 ÷10 at 100 and 150, batch 128.
_DATASET_DEFAULTS = {
    "cifar10": dict(c_min=1.7, linf_alpha_255=2.0),
    "cifar100": dict(c_min=4.0, linf_alpha_255=2.0),
    # SVHN: α = 1/255 L∞ and 5 warm-up epochs of plain AT (SPEC.md §1–§2). SPEC.md is silent on the
    # SVHN learning rate; lr 0.1 is known to diverge on SVHN, and the AWP SVHN runs use 0.01.
    "svhn": dict(c_min=1.7, linf_alpha_255=1.0, warmup_epochs=5, lr=0.01),
}
_THREATS = {"linf": dict(norm="linf", epsilon_255=8.0),
            "l2": dict(norm="l2", epsilon_255=128.0, alpha_255=15.0)}
_PERTURB = {
    "at": dict(method="at", perturb="none"),
    "at-awp": dict(method="at", perturb="awp", gamma=0.01),
    "at-rwp": dict(method="at", perturb="rwp", gamma=0.01, k2=10),
}


def _table1_presets():
    out = {}
    for ds, dd in _DATASET_DEFAULTS.items():
        for threat, td in _THREATS.items():
            for name, md in _PERTURB.items():
                kw = dict(dataset=ds, model="preact_resnet18", **td, **md)
                kw.setdefault("alpha_255", dd["linf_alpha_255"])
                if md["perturb"] == "rwp":
                    kw["c_min"] = dd["c_min"]
                if md["perturb"] != "none" or ds == "svhn":
                    kw["warmup_epochs"] = dd.get("warmup_epochs", 0)
                if "lr" in dd:
                    kw["lr"] = dd["lr"]
                out[f"{ds}-{threat}-{name}"] = kw
    return out


# Table 2: CIFAR-10, L∞, WideResNet. TRADES/RST use γ = 0.005 and 10 warm-up epochs (SPEC.md §2);
# RST: WRN-28-10, batch 256, cosine lr, Nesterov (SPEC.md §3).
_WRN_LINF = dict(dataset="cifar10", norm="linf", epsilon_255=8.0, alpha_255=2.0)
_TRADES = dict(method="trades", trades_beta=6.0)
_RST = dict(method="rst", trades_beta=6.0, model="wrn-28-10", batch_size=256, lr_schedule="cosine",
            nesterov=True)
PRESETS = {
    **_table1_presets(),
    "cifar10-wrn34-at": dict(_WRN_LINF, model="wrn-34-10", method="at"),
    "cifar10-wrn34-at-awp": dict(_WRN_LINF, model="wrn-34-10", method="at", perturb="awp", gamma=0.01),
    "cifar10-wrn34-at-rwp": dict(_WRN_LINF, model="wrn-34-10", method="at", perturb="rwp", gamma=0.01,
                                 c_min=1.7, k2=10),
    "cifar10-wrn34-trades": dict(_WRN_LINF, model="wrn-34-10", **_TRADES),
    "cifar10-wrn34-trades-awp": dict(_WRN_LINF, model="wrn-34-10", **_TRADES, perturb="awp", gamma=0.005,
                                     warmup_epochs=10),
    "cifar10-wrn34-trades-rwp": dict(_WRN_LINF, model="wrn-34-10", **_TRADES, perturb="rwp", gamma=0.005,
                                     c_min=1.7, k2=10, warmup_epochs=10),
    "cifar10-wrn28-rst-awp": dict(_WRN_LINF, **_RST, perturb="awp", gamma=0.005, warmup_epochs=10),
    "cifar10-wrn28-rst-rwp": dict(_WRN_LINF, **_RST, perturb="rwp", gamma=0.005, c_min=1.7, k2=10,
                                  warmup_epochs=10),
}


def preset(name, **overrides):
    """The RunConfig of a named preset, with explicit overrides applied, validated."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return RunConfig(**{**PRESETS[name], **overrides}).validate()

