"""A model of the all-reduce cost per training step on N GPUs, and the scaling efficiency it predicts.

    python -m rwp_fast.bench.comm_model [--tflops 150] [--batch 128] [--json out.json]

NOTHING HERE IS MEASURED: no multi-GPU machine has run rwp-fast. The model:

* traffic per step (rwp_fast.train.distributed): one all-reduce of every gradient after the training
  backward (all P parameters, fp32: 4·P bytes), and per RWP/AWP probe one of the flat weight gradient
  (the P_w conv/linear weights: 4·P_w bytes) plus one 8-byte mask count (latency only);
* ring all-reduce time: bytes × 2(N − 1)/N / bandwidth + latency per all-reduce. Bandwidth (bus bandwidth
  NCCL reaches, assumed): NVLink 4 on H100/H200 ≈ 400 GB/s; 100 Gb/s Ethernet = 12.5 GB/s raw, taken whole
  (optimistic; RoCE reaches ≈ 90 %). Latency assumed 10 µs (NVLink), 50 µs (Ethernet) per all-reduce.
  On Ethernet every GPU is taken to sit on its own 100 Gb/s link (a flat ring: the pessimistic case for
  several GPUs per node, where NCCL's hierarchical rings keep most traffic on NVLink);
* compute per step, unmeasured on GPU, so a parameter: forward units per step (SPEC.md §6: attack K1·2
  with input-only gradients, 3 per probe, 3 for the training step) × forward FLOPs per image (counted
  here with torch's FlopCounterMode on the meta device) × global batch B ÷ achieved FLOP/s (--tflops,
  default 150 TFLOP/s of bf16 per GPU: an assumption, ≈ 15 % of an H100/H200's dense bf16 peak, as small
  CIFAR convolutions reach); the N-GPU step computes B/N images per GPU in 1/N of that time (per-GPU
  efficiency at the smaller per-GPU batch is not modelled: it only lowers the figures);
* no overlap of the all-reduce with the backward (the manual all-reduce runs after it):
  efficiency = (T_compute/N) / (T_compute/N + T_comm).
"""

import argparse
import functools
import json

import torch

LINKS = {"NVLink (400 GB/s)": (400e9, 10e-6), "100 Gb/s Ethernet": (12.5e9, 50e-6)}
MODELS = ("preact_resnet18", "wrn-34-10")
# (label, probes per step): AT none; AWP one; AT-RWP all K2 = 10 probes (the worst case, no early break)
METHODS = (("at", 0), ("at-awp", 1), ("at-rwp K2=10", 10))


@functools.lru_cache(maxsize=None)
def model_sizes(name):
    """(parameters P, perturbed weights P_w, forward FLOPs per 32×32 image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rwp_fast.models import build_network
    from rwp_fast.core import perturbed_parameters
    with torch.device("meta"):  # the network without Normalize (which checks its std on the host)
        model = build_network(name, 10, 3).eval()
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.empty(1, 3, 32, 32))
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() for _, p in perturbed_parameters(model))
    return params, weights, counter.get_total_flops()


def allreduce_seconds(nbytes, n, bandwidth, latency):
    return nbytes * 2 * (n - 1) / n / bandwidth + latency


def predict(name, probes, n, link, batch, tflops, k1=10):
    params, weights, flops = model_sizes(name)
    bandwidth, latency = LINKS[link]
    units = 2 * k1 + 3 * probes + 3
    t_compute = units * flops * batch / (tflops * 1e12)
    t_comm = allreduce_seconds(4 * params, n, bandwidth, latency) + probes * (
        allreduce_seconds(4 * weights, n, bandwidth, latency) + latency)
    return dict(model=name, probes=probes, nproc=n, link=link, batch=batch, tflops=tflops,
                grad_mb=4 * params / 1e6, compute_ms_1gpu=1e3 * t_compute, comm_ms=1e3 * t_comm,
                efficiency=(t_compute / n) / (t_compute / n + t_comm))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rwp_fast.bench.comm_model", description=__doc__.splitlines()[0])
    p.add_argument("--tflops", type=float, default=150.0, help="achieved TFLOP/s per GPU (assumed; unmeasured)")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--nprocs", default="2,4,8")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = [predict(m, k, n, link, a.batch, a.tflops) for m in MODELS for _, k in METHODS for link in LINKS
            for n in map(int, a.nprocs.split(","))]
    labels = dict((k, lab) for lab, k in METHODS)
    print(f"Predicted, not measured: global batch {a.batch}, {a.tflops:g} TFLOP/s per GPU assumed, no overlap.\n")
    print("| model | method | link | N | all-reduce MB | compute ms (1 GPU) | comm ms/step | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {labels[r['probes']]} | {r['link']} | {r['nproc']} | {r['grad_mb']:.0f} | "
              f"{r['compute_ms_1gpu']:.1f} | {r['comm_ms']:.2f} | {r['efficiency']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
