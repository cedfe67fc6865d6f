"""Build and install rwp-fast.

Environment knobs (all optional):

  RWP_FAST_SKIP_CUDA_BUILD=1   do not build the CUDA extension ``rwp_fast._C``; the package then
                               runs on its Triton and torch backends only.
  RWP_FAST_REQUIRE_CUDA_EXT=1  make a missing or failed build of ``rwp_fast._C`` an error (CI on a GPU
                               machine, bench/device_run.sh). Without it the install never fails because of
                               the extension: it prints one warning line and installs without it.
  RWP_FAST_CUDA_ARCHS="80;90"  SM architectures to compile for (default ``80;90``: A100 and H100/H200);
                               ``;`` or ``,`` separated, e.g. ``80,90``.
  CUDA_HOME=/usr/local/cuda    CUDA toolkit root. If unset we look at /usr/local/cuda and at the
                               directory of ``nvcc`` on PATH.
  MAX_JOBS=N                   parallel compile jobs for ninja (default: torch's choice, i.e. #cores).

The extension is built when there are sources in csrc/, torch is importable in the build environment
(install with ``--no-build-isolation``), nvcc is found, and nvcc's CUDA major version is torch's
(``torch.version.cuda``; torch's cpp_extension would raise on a mismatch). Otherwise, or when the build
itself fails, one warning line is printed and only the Python backends are installed. A machine does not
need a GPU to *compile* the extension.

The top-level ``kernels/`` folder (Triton kernels) ships as ``rwp_fast.kernels``: a top-level
``kernels`` module would clash with an unrelated PyPI package of that name. Likewise ``bench/`` (the
throughput suite behind ``rwp-fast bench``) ships as ``rwp_fast.bench``; ``python -m bench`` still runs
it from a checkout.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The CUDA toolkit root with a working nvcc, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


REQUIRE_ENV = "RWP_FAST_REQUIRE_CUDA_EXT"


def _skip_cuda_extension(reason):
    """Install without rwp_fast._C: one warning line, or an error under RWP_FAST_REQUIRE_CUDA_EXT=1."""
    if os.environ.get(REQUIRE_ENV, "0") == "1":
        raise RuntimeError(f"rwp-fast: {reason}; {REQUIRE_ENV}=1 makes this an error")
    print(f"rwp-fast: WARNING: {reason}; installing without rwp_fast._C (the Triton and torch backends "
          "still work)", file=sys.stderr)


def _nvcc_cuda_version(cuda_home):
    """(major, minor) of `cuda_home`/bin/nvcc from ``nvcc --version``, or None if it does not say."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60, check=False).stdout
    except OSError:
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cuda_version_mismatch(torch_cuda, nvcc_version):
    """Why torch (built for CUDA `torch_cuda`, e.g. '12.8' or None) cannot build with an nvcc of
    `nvcc_version` (major, minor), or None if it can. torch's cpp_extension raises on a different
    major version and only warns on a different minor one, so the major version decides."""
    if torch_cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    if nvcc_version is None:
        return "cannot read nvcc's CUDA version from `nvcc --version`"
    torch_major = int(str(torch_cuda).split(".")[0])
    if torch_major != nvcc_version[0]:
        return (f"nvcc is CUDA {nvcc_version[0]}.{nvcc_version[1]} but torch was built for CUDA {torch_cuda} "
                "(the major versions must match)")
    return None


def _parse_archs(archs):
    """'80;90' or '80,90' -> (['80', '90'], nvcc -gencode flags, TORCH_CUDA_ARCH_LIST '8.0;9.0')."""
    names = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not names:
        raise ValueError(f"RWP_FAST_CUDA_ARCHS: expected SM numbers such as 80;90, got {archs!r}")
    flags = []
    for arch in names:
        if not arch.isdigit() or len(arch) < 2:
            raise ValueError(f"RWP_FAST_CUDA_ARCHS: {arch!r} is not an SM number such as 80 or 90")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return names, flags, ";".join(f"{a[:-1]}.{a[-1]}" for a in names)


def _tolerant_build_ext(build_ext_cls):
    """`build_ext_cls` whose failure (compiler error, ninja error, …) installs without rwp_fast._C."""
    class TolerantBuildExt(build_ext_cls):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  any build failure: warn (or raise) and go on
                first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                _skip_cuda_extension(f"building rwp_fast._C failed ({type(exc).__name__}: {first_line})")
                self.extensions = []  # so that the install step looks for no .so

    return TolerantBuildExt


def _cuda_extension():
    """Return ([ext_modules], cmdclass) for rwp_fast._C, or ([], {}) with a warning why not."""
    if os.environ.get("RWP_FAST_SKIP_CUDA_BUILD", "0") == "1":
        print("rwp-fast: RWP_FAST_SKIP_CUDA_BUILD=1, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        _skip_cuda_extension("nvcc not found (set CUDA_HOME)")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so set it first.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        _skip_cuda_extension(f"torch is not importable in the build environment ({exc}); install with "
                             "--no-build-isolation to build rwp_fast._C")
        return [], {}
    mismatch = _cuda_version_mismatch(torch.version.cuda, _nvcc_cuda_version(cuda_home))
    if mismatch:
        _skip_cuda_extension(mismatch)
        return [], {}

    _, arch_flags, torch_arch_list = _parse_archs(os.environ.get("RWP_FAST_CUDA_ARCHS", "80;90"))
    # cpp_extension would otherwise add flags for the (absent) local GPU or every known arch.
    os.environ["TORCH_CUDA_ARCH_LIST"] = torch_arch_list

    # rpath: the .so links libc10, libtorch* and libcudart.so.N. Without an rpath it loads only
    # after `import torch` has loaded them, and `import rwp_fast._C` as a first import fails with
    # "libc10.so: cannot open shared object file". torch's lib/ comes first. For libcudart, the copy
    # that torch itself uses (the pip nvidia-*-runtime package next to torch) is preferred, so the
    # process loads a single cudart; the toolkit's lib64 is the fallback.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    bundled_cudart = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcudart.so*")))
    rpath = [os.path.join(os.path.dirname(torch.__file__), "lib"),
             os.path.dirname(bundled_cudart[0]) if bundled_cudart else os.path.join(cuda_home, "lib64")]

    # No -std flag: cpp_extension adds the C++ standard that this torch's headers need (C++20 for
    # torch 2.14; a -std=c++17 from us would override it).
    # No --use_fast_math: it implies --ftz=true and approximate div/sqrt/exp/log, which break the
    # fp32 bit-exactness of the L∞ PGD step and perturb_axpy_ against the reference (subnormals
    # flushed to zero) and cost accuracy in lsc_loss; the kernels are memory-bound, so it buys no
    # speed. See csrc/rwp_device.cuh.
    ext = CUDAExtension(
        name="rwp_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"] + arch_flags,
        },
        extra_link_args=[f"-Wl,-rpath,{d}" for d in rpath],
    )
    return [ext], {"build_ext": _tolerant_build_ext(BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="rwp-fast",
    version="0.1.0",
    description="Fast, verified adversarial training with Robust Weight Perturbation (RWP)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rwp_fast", "rwp_fast.*"]) + ["rwp_fast.kernels", "rwp_fast.bench"],
    package_dir={"rwp_fast.kernels": "kernels", "rwp_fast.bench": "bench"},
    install_requires=[
        # 2.11 is the GPU machine's torch, 2.14.1 the CI machine's; both must satisfy these.
        "torch>=2.11,<2.15",
        "torchvision>=0.26,<0.30",
        "numpy",
        "scikit-learn",  # ships the UCI digits: the built-in offline dataset
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        # tensorboard: test_tensorboard.py; pyautoattack: CI runs AutoAttack (tests/test_autoattack.py)
        "dev": ["pytest", "pytest-benchmark", "ruff", "ninja", "tensorboard", "pyautoattack"],
        "eval": ["pyautoattack"],
        "tensorboard": ["tensorboard"],   # --tensorboard (torch.utils.tensorboard's SummaryWriter needs it)
    },
    entry_points={"console_scripts": ["rwp-fast=rwp_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
