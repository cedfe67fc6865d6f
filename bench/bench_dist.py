"""``python -m bench --nproc N``: images/s of the fast training step on N processes (torchrun) vs 1.

MULTI-GPU SPEED IS UNMEASURED: no machine with more than one GPU has run this yet. This mode exists so
that the first one measures it:

    python -m bench --nproc 8 --models preact_resnet18,wrn-34-10 --batch-sizes 128 --json out/dist.json

What it times: ``FastTrainStep`` with the trainer's settings (the ``fast`` variant of e2e_configs) but never
captured (``capture=False``): N processes cannot capture their all-reduces (``capture_refusal``), so the
1-process run compiles its phases too and the efficiency compares like with like (the 1-process captured
step is ``python -m bench``'s ``fast`` row; each row says its ``mode``). The global batch B is split over N
processes exactly as ``rwp-fast train`` splits it, all-reduces included (one flat gradient per step + one
per RWP probe + the 8-byte mask counts), for AT and AT-RWP with all K2 probes.
Synthetic CIFAR-shaped data on the device. Each configuration runs once with 1 process and once with N,
both launched through torchrun; the row gives global images/s for each and the scaling efficiency
ips_N / (N · ips_1). bench/comm_model.py predicts what to expect.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from rwp_fast.bench.common import REPO
from rwp_fast.bench.e2e_configs import METHODS, SMOKE_BATCH, SMOKE_MODEL, make_batches, make_cfg

DIST_METHODS = ("at", "at-rwp-all")


def _worker(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--device")
    p.add_argument("--models")
    p.add_argument("--batch-sizes")
    p.add_argument("--steps", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    from rwp_fast.core import BatchSlice
    from rwp_fast.data import dataset_stats
    from rwp_fast.models import build_model
    from rwp_fast.ops import dispatch
    from rwp_fast.train import distributed
    from rwp_fast.train.fast_step import FastTrainStep
    if a.smoke:
        torch.set_num_threads(1)
    rows = []
    dist = None
    for model_name in a.models.split(","):
        for batch in map(int, a.batch_sizes.split(",")):
            for key in DIST_METHODS:
                cfg = make_cfg(model_name, batch, key, "fast", a.device, smoke=a.smoke)
                dist, device = distributed.setup(cfg, torch.device(a.device))
                torch.manual_seed(0)
                model = build_model(model_name, 10, 3, *dataset_stats("synthetic", 3)).to(device)
                opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay)
                dispatch.set_backend(cfg.backend)
                step = FastTrainStep(model, opt, cfg, device, capture=False, dist=dist)  # as N processes run
                lo, hi = dist.rows(batch)
                batches = [(x[lo:hi], y[lo:hi]) for x, y in make_batches(batch, device)]
                gen = torch.Generator(device=device)

                def one(i):
                    x, y = batches[i % len(batches)]
                    g = BatchSlice(gen.manual_seed(i), slice(lo, hi), batch) if dist.enabled else gen.manual_seed(i)
                    step(model, opt, x, y, cfg, generator=g)

                for i in range(a.warmup):
                    one(i)
                times = []
                for _ in range(a.repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dist.any_(False)  # a barrier: every process starts the block together
                    t0 = time.perf_counter()
                    for i in range(a.steps):
                        one(i)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    dist.any_(False)
                    times.append(time.perf_counter() - t0)
                t = sorted(times)[len(times) // 2]
                rows.append(dict(model=model_name, batch=batch, method=METHODS[key][0], regime=METHODS[key][1],
                                 nproc=dist.world_size, mode=step.mode, images_per_s=batch * a.steps / t,
                                 ms_per_step=1e3 * t / a.steps))
    if dist is not None and dist.is_main:
        with open(a.out, "w") as f:
            json.dump(rows, f)
    if dist is not None:
        dist.close()


def _launch(nproc, args, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rwp_fast.bench.bench_dist", "--worker", "--out", out, "--device", args.device,
           "--models", ",".join(args.models), "--batch-sizes", ",".join(map(str, args.batch_sizes)),
           "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.smoke:
        cmd.append("--smoke")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    with open(out) as f:
        return json.load(f)


def run(args):
    """bench_e2e's args with args.nproc > 1: rows for 1 and N processes, with the scaling efficiency."""
    import tempfile
    if args.models is None:
        args.models = [SMOKE_MODEL] if args.smoke else ["preact_resnet18"]
    if args.batch_sizes is None:
        args.batch_sizes = [SMOKE_BATCH] if args.smoke else [128]
    bad = [b for b in args.batch_sizes if b % args.nproc]
    if bad:
        raise SystemExit(f"--batch-sizes: {bad} not divisible by --nproc {args.nproc} (global batches)")
    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(1, args, os.path.join(tmp, "one.json"))
        many = _launch(args.nproc, args, os.path.join(tmp, "many.json"))
    rows = []
    for r1, rn in zip(one, many):
        rows.append({**rn, "images_per_s_1proc": r1["images_per_s"],
                     "scaling_efficiency": rn["images_per_s"] / (args.nproc * r1["images_per_s"]),
                     "note": "smoke, not a measurement" if args.smoke else f"{args.device}, measured here"})
    print(f"| model | batch | method | regime | img/s 1 proc | img/s {args.nproc} proc | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['method']} | {r['regime']} | {r['images_per_s_1proc']:.0f} | "
              f"{r['images_per_s']:.0f} | {r['scaling_efficiency']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.argv.remove("--worker")
    _worker(sys.argv[1:])
