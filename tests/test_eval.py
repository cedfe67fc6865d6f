"""The evaluation suite on models whose robust accuracy is known in closed form."""

import pytest
import torch
from torch import nn

from rwp_fast.eval import markdown_table, parse_attacks, run_eval_suite

NO_AA = ("natural", "fgsm", "pgd20", "pgd100", "cw")


class Constant(nn.Module):
    """Predicts class 0 whatever the input: no attack can change its accuracy."""

    def __init__(self, classes=3):
        super().__init__()
        self.classes = classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        z = torch.zeros(x.shape[0], self.classes) + 0 * self.dummy + 0 * x.flatten(1).sum(1, keepdim=True)
        z[:, 0] = 1.0
        return z


def test_constant_classifier_accuracy_is_the_class_frequency():
    y = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 0, 1])
    x = torch.rand(10, 1, 2, 2)
    res = run_eval_suite(Constant(), x, y, eps=8 / 255, alpha=2 / 255, attacks=NO_AA, batch_size=4)
    for name in NO_AA:
        assert res[name] == pytest.approx(0.4), name


def linear_binary(d=4):
    """z1 − z0 = Σx − d/2: class 1 iff the mean pixel exceeds 1/2."""
    lin = nn.Linear(d, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(d), torch.ones(d)]))
        lin.bias.copy_(torch.tensor([0.0, -d / 2]))
    return nn.Sequential(nn.Flatten(), lin)


def test_linf_attacks_reach_the_analytic_robust_accuracy_of_a_linear_model():
    # Pixels in [0.3, 0.7] and ε = 0.05: the box never binds, and the worst case moves every pixel by ε
    # against the margin, i.e. the margin by ε·d. An example survives iff |Σx − d/2| > ε·d.
    g = torch.Generator().manual_seed(0)
    d, eps = 4, 0.05
    x = 0.3 + 0.4 * torch.rand(400, 1, 2, 2, generator=g)
    margin = x.flatten(1).sum(1) - d / 2
    keep = margin.abs() > 1e-3  # avoid ties on the decision boundary
    x, margin = x[keep], margin[keep]
    y = (margin > 0).long()
    expected = (margin.abs() > eps * d).float().mean().item()
    assert 0.2 < expected < 0.9  # the case is informative: some survive, some do not
    res = run_eval_suite(linear_binary(d), x, y, eps=eps, alpha=eps / 4, attacks=NO_AA, batch_size=128)
    assert res["natural"] == 1.0
    for name in ("fgsm", "pgd20", "pgd100", "cw"):
        assert res[name] == pytest.approx(expected, abs=1e-6), name


def test_l2_pgd_reaches_the_analytic_robust_accuracy_of_a_linear_model():
    # L2: the worst case moves the margin by ε·‖w‖₂ = ε·√d.
    g = torch.Generator().manual_seed(1)
    d, eps = 4, 0.1
    x = 0.3 + 0.4 * torch.rand(400, 1, 2, 2, generator=g)
    margin = x.flatten(1).sum(1) - d / 2
    keep = (margin.abs() - eps * d ** 0.5).abs() > 1e-3
    x, margin = x[keep], margin[keep]
    y = (margin > 0).long()
    expected = (margin.abs() > eps * d ** 0.5).float().mean().item()
    res = run_eval_suite(linear_binary(d), x, y, eps=eps, alpha=eps / 4, norm="l2",
                         attacks=("natural", "pgd20", "cw"), batch_size=128)
    assert res["pgd20"] == pytest.approx(expected, abs=1e-6)
    assert res["cw"] == pytest.approx(expected, abs=1e-6)


def test_suite_restores_train_mode_and_validates_names():
    model = linear_binary()
    model.train()
    run_eval_suite(model, torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long), 0.1, 0.1,
                   attacks=("natural",))
    assert model.training
    with pytest.raises(ValueError, match="attacks"):
        parse_attacks("natural,pgd7")
    table = markdown_table({"n": 4, "natural": 0.5, "pgd20": 0.25}, title="m")
    assert table.splitlines()[2] == "| n=4 | 50.00 | 25.00 |"
