"""The README's own examples work as printed: every line of its Usage block that needs no dataset.

Lines that name --data-dir or a --preset (CIFAR/SVHN files) need a dataset and are skipped; `verify` and
`bench` lines are run by their own tests (COVERED_ELSEWHERE). The lines
that use a run directory (runs/default, runs/at, runs/rwp) find one made by a 1-epoch digits run, as a
reader's earlier `rwp-fast train` would have left it. Each line runs through the installed `rwp-fast`
console script, in a fresh working directory.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
NEEDS_DATASET = ("--data-dir", "--preset", "--download", "--rst-extra")
# Lines that need no dataset but are run by their own tests, because each takes minutes on a CPU (the
# Triton interpreter checks every kernel, the benchmark trains six configurations):
COVERED_ELSEWHERE = {"verify": "tests/test_verify.py", "bench": "tests/test_bench_e2e.py"}


def needs_no_dataset(line):
    return not any(flag in line for flag in NEEDS_DATASET)


def usage_lines():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## Usage\n.*?```bash\n(.*?)```", text, re.S | re.M)
    assert block, "README.md has no ```bash block under '## Usage'"
    lines = []
    for raw in block.group(1).splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def test_usage_block_is_found_and_has_runnable_lines():
    lines = usage_lines()
    runnable = [x for x in lines if needs_no_dataset(x)]
    assert all(x.startswith("rwp-fast ") for x in lines), lines
    assert {x.split()[1] for x in runnable} >= {"presets", "train", "eval", "plot"}, runnable
    for line in runnable:  # a line skipped here is run by the test named in COVERED_ELSEWHERE
        command = line.split()[1]
        if command in COVERED_ELSEWHERE:
            assert (ROOT / COVERED_ELSEWHERE[command]).exists(), COVERED_ELSEWHERE[command]


def tiny_run(cwd, out_dir, perturb, attack_steps=2):
    cmd = [sys.executable, "-m", "rwp_fast.cli", "train", "--dataset", "digits", "--perturb", perturb,
           "--epsilon", "32", "--alpha", "8", "--c-min", "2.0", "--k2", "2", "--epochs", "1", "--attack-steps",
           str(attack_steps), "--eval-attack-steps", "2", "--train-examples", "128", "--eval-examples", "64",
           "--batch-size", "64", "--quiet", "--device", "cpu", "--out-dir", out_dir]
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=600)


def test_every_usage_line_without_a_dataset_runs_as_printed(tmp_path):
    script = Path(sys.executable).with_name("rwp-fast")
    assert script.exists(), f"the console script {script} is not installed"
    # runs/default is what the eval line attacks with AutoAttack on all 360 test images. Trained without
    # attack steps, the model has next to no robust points after APGD-CE, so the later, costly stages
    # (APGD-T, FAB-T, Square: 5000 queries per point) have almost nothing left to run on. A robust
    # 1-epoch model made this test take 14 minutes on the shared 2-core machine.
    tiny_run(tmp_path, "runs/default", "none", attack_steps=0)
    for out_dir, perturb in (("runs/at", "none"), ("runs/rwp", "rwp")):
        tiny_run(tmp_path, out_dir, perturb)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    ran = []
    for line in usage_lines():
        if not needs_no_dataset(line) or line.split()[1] in COVERED_ELSEWHERE:
            continue
        argv = shlex.split(line)
        proc = subprocess.run([str(script), *argv[1:]], cwd=tmp_path, capture_output=True, text=True,
                              timeout=900, env=env)
        assert proc.returncode == 0, f"README line failed: {line}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
        ran.append((argv[1], proc.stdout))
    commands = [c for c, _ in ran]
    assert {"presets", "train", "eval", "plot"} <= set(commands), commands
    assert "cifar10-linf-at-rwp" in dict(ran)["presets"]
    assert (tmp_path / "runs/default/best_eval.json").exists()
    assert (tmp_path / "curves.png").stat().st_size > 10_000
