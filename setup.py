"""Build and install rwp-fast.

Environment knobs (all optional):

  RWP_FAST_SKIP_CUDA_BUILD=1   do not build the CUDA extension ``rwp_fast._C``; the package then
                               runs on its Triton and torch backends only.
  RWP_FAST_CUDA_ARCHS="80;90"  SM architectures to compile for (default ``80;90``: A100 and H100/H200).
  CUDA_HOME=/usr/local/cuda    CUDA toolkit root. If unset we look at /usr/local/cuda and at the
                               directory of ``nvcc`` on PATH.
  MAX_JOBS=N                   parallel compile jobs for ninja (default: torch's choice, i.e. #cores).

The extension is built when there are sources in csrc/, torch is importable in the build environment
(install with ``--no-build-isolation``), and nvcc is found. Otherwise a warning is printed and only the
Python backends are installed. A machine does not need a GPU to *compile* the extension.

The top-level ``kernels/`` folder (Triton kernels) ships as ``rwp_fast.kernels``: a top-level
``kernels`` module would clash with an unrelated PyPI package of that name. Likewise ``bench/`` (the
throughput suite behind ``rwp-fast bench``) ships as ``rwp_fast.bench``; ``python -m bench`` still runs
it from a checkout.
"""

import glob
import os
import shutil
import sys
import warnings

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
        warnings.warn("rwp-fast: nvcc not found (set CUDA_HOME); installing the Triton and torch "
                      "backends only, without rwp_fast._C")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, so set it first.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        warnings.warn(f"rwp-fast: torch is not importable in the build environment ({exc}); "
                      "install with --no-build-isolation to build rwp_fast._C")
        return [], {}

    archs = os.environ.get("RWP_FAST_CUDA_ARCHS", "80;90")
    arch_flags = []
    for arch in [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]:
        if not arch.isdigit():
            raise ValueError(f"RWP_FAST_CUDA_ARCHS: {arch!r} is not an SM number such as 80 or 90")
        arch_flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # cpp_extension would otherwise add flags for the (absent) local GPU or every known arch.
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs.split(";") if a)

    # rpath: the .so links libc10, libtorch* and libcudart.so.N. Without an rpath it loads only
    # after `import torch` has loaded them, and `import rwp_fast._C` as a first import fails with
    # "libc10.so: cannot open shared object file". torch's lib/ comes first. For libcudart, the copy
    # that torch itself uses (the pip nvidia-*-runtime package next to torch) is preferred, so the
    # process loads a single cudart; the toolkit's lib64 is the fallback.
    import torch

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
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


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
        "dev": ["pytest", "pytest-benchmark", "ruff", "ninja"],
        "eval": ["pyautoattack"],
    },
    entry_points={"console_scripts": ["rwp-fast=rwp_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
