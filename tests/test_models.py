"""Models: shapes on 8×8 and 32×32 inputs, parameter counts, which tensors get perturbed, Normalize."""

import pytest
import torch

from rwp_fast.config import MODELS, RunConfig
from rwp_fast.data import DATASET_STATS, dataset_stats
from rwp_fast.models import Normalize, WideResNet, build_model, count_parameters, model_for
from rwp_fast.reference import perturbed_parameters

# Exact counts for 10 classes (3 input channels; small_cnn with 1). PreAct ResNet-18 as in Rice et al.
# (with the final BN); WRN as in TRADES/AWP without the unused sub_block1.
PARAM_COUNTS = {"small_cnn": 56_554, "preact_resnet18": 11_172_170, "wrn-34-10": 46_160_474,
                "wrn-28-10": 36_479_194}
# conv/linear weights: stem + 2 per block + 1×1 shortcuts + classifier.
PERTURBED_TENSORS = {"small_cnn": 4, "preact_resnet18": 1 + 16 + 3 + 1, "wrn-34-10": 1 + 30 + 3 + 1,
                     "wrn-28-10": 1 + 24 + 3 + 1}


def _model(name, num_classes=10, in_channels=3):
    return build_model(name, num_classes, in_channels, *dataset_stats("synthetic", in_channels))


@pytest.fixture(scope="module")
def wrn34():
    return _model("wrn-34-10")


def test_parameter_counts_match_the_papers_networks(wrn34):
    counts = {"wrn-34-10": count_parameters(wrn34)}
    for name in ("small_cnn", "preact_resnet18", "wrn-28-10"):
        counts[name] = count_parameters(_model(name, in_channels=1 if name == "small_cnn" else 3))
    assert counts == PARAM_COUNTS
    # The figures usually quoted: PreAct ResNet-18 ≈ 11.17M, WRN-34-10 ≈ 46.2M.
    assert abs(counts["preact_resnet18"] / 11.17e6 - 1) < 0.01
    assert abs(counts["wrn-34-10"] / 46.2e6 - 1) < 0.01
    # The released code's WRN also builds an unused copy of block1 (5 blocks of 160 channels).
    assert count_parameters(WideResNet(34, 10, sub_block1=True)) == 48_262_586


@pytest.mark.parametrize("name", [m for m in MODELS if m != "wrn-34-10"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_logits_shape(name, shape):
    torch.manual_seed(0)
    model = _model(name, num_classes=7, in_channels=shape[0]).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_wrn34_forward_32x32(wrn34):
    wrn34.eval()
    with torch.no_grad():
        out = wrn34(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18"])
def test_every_parameter_gets_a_gradient_in_train_mode(name):
    torch.manual_seed(0)
    model = _model(name, in_channels=1).train()
    loss = model(torch.rand(4, 1, 8, 8)).logsumexp(1).sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_perturbed_tensors_are_conv_and_linear_weights_only(wrn34):
    small = _model("small_cnn", in_channels=1)
    names = [n for n, _ in perturbed_parameters(small)]
    assert names == ["net.conv1.weight", "net.conv2.weight", "net.conv3.weight", "net.linear.weight"]
    # BN affine parameters and biases exist and are dim 1, so they are left alone.
    others = sorted(n for n, p in small.named_parameters() if n not in names)
    assert others == ["net.bn1.bias", "net.bn1.weight", "net.bn2.bias", "net.bn2.weight", "net.bn3.bias",
                      "net.bn3.weight", "net.linear.bias"]
    assert {n for n, _ in small.named_buffers()} >= {"normalize.mean", "normalize.std",
                                                     "net.bn1.running_mean"}
    counts = {"small_cnn": len(names), "wrn-34-10": len(perturbed_parameters(wrn34))}
    for name in ("preact_resnet18", "wrn-28-10"):
        counts[name] = len(perturbed_parameters(_model(name)))
    assert counts == PERTURBED_TENSORS


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model: 'resnet50' is not one of small_cnn, preact_resnet18, "
                                         r"wrn-34-10, wrn-28-10"):
        _model("resnet50")


@pytest.mark.parametrize("depth", [8, 30, 4])
def test_wrn_depth_must_be_6n_plus_4(depth):
    with pytest.raises(ValueError, match="depth: must be 6n \\+ 4"):
        WideResNet(depth, 1)


def test_normalize_is_per_channel_mean_std():
    mean, std = (0.1, 0.5, 0.9), (0.5, 0.25, 0.125)
    layer = Normalize(mean, std)
    x = torch.rand(3, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    expected = torch.empty_like(x)
    for c in range(3):
        expected[:, c] = (x[:, c] - mean[c]) / std[c]
    assert torch.equal(layer(x), expected)
    # Spot value computed by hand: (0.3 − 0.5) / 0.25 = −0.8 in channel 1.
    assert layer(torch.full((1, 3, 1, 1), 0.3))[0, 1, 0, 0].item() == pytest.approx(-0.8, abs=1e-6)
    # Persistent buffers: a checkpoint carries the normalisation it was trained with.
    assert set(layer.state_dict()) == {"mean", "std"} and list(layer.parameters()) == []


def test_normalize_rejects_bad_std():
    with pytest.raises(ValueError, match="std: every channel must be > 0"):
        Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="std: expected 3 channels like mean"):
        Normalize((0.5, 0.5, 0.5), (0.2,))


def test_build_model_puts_normalize_first():
    model = build_model("small_cnn", 10, 1, (0.25,), (0.5,))
    assert list(dict(model.named_children())) == ["normalize", "net"]
    assert model.normalize.mean.flatten().tolist() == [0.25] and model.normalize.std.flatten().tolist() == [0.5]
    with pytest.raises(ValueError, match="mean, std: expected 1 channel values each, got 3 and 3"):
        build_model("small_cnn", 10, 1, (0.5,) * 3, (0.25,) * 3)


def test_model_for_uses_the_datasets_statistics():
    class Info:  # the fields of a DatasetBundle that model_for reads
        num_classes, in_channels = 10, 1
        mean, std = DATASET_STATS["digits"]

    model = model_for(RunConfig(model="small_cnn"), Info)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.30531])
    assert model.normalize.std.flatten().tolist() == pytest.approx([0.37589])
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_dataset_stats_broadcast_and_errors():
    assert dataset_stats("synthetic", 1) == ((0.5,), (0.25,))
    assert dataset_stats("cifar10") == ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    with pytest.raises(ValueError, match="in_channels: 'cifar10' statistics have 3 channels, got 1"):
        dataset_stats("cifar10", 1)
    with pytest.raises(ValueError, match="dataset: no normalisation statistics for 'mnist'"):
        dataset_stats("mnist")
