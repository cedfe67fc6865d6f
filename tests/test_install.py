"""setup.py never fails the install because of the CUDA extension (issue 10 §3).

The helpers of setup.py are tested directly: setup.py is loaded with ``setuptools.setup`` replaced by a
no-op, so no build runs (CI has 2 cores; a pip build of the extension takes minutes).
"""

import importlib.util
import os
import shutil
import stat
from pathlib import Path

import pytest
import setuptools
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module, without running setup() or building anything."""
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("RWP_FAST_SKIP_CUDA_BUILD", "1")
    monkeypatch.delenv("RWP_FAST_REQUIRE_CUDA_EXT", raising=False)
    monkeypatch.chdir(ROOT)
    spec = importlib.util.spec_from_file_location("rwp_fast_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("RWP_FAST_SKIP_CUDA_BUILD")
    return module


def _other_cuda_major():
    torch_major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else 12
    return torch_major - 1 if torch_major > 11 else torch_major + 1


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    """A CUDA_HOME whose bin/nvcc reports a CUDA major version other than torch's, first on PATH too."""
    major = _other_cuda_major()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {major}.8, V{major}.8.89'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", f"{nvcc.parent}{os.pathsep}{os.environ['PATH']}")
    return major


def test_nvcc_of_another_cuda_major_installs_without_the_extension(setup_py, fake_nvcc, capsys):
    assert setup_py._nvcc_cuda_version(os.environ["CUDA_HOME"]) == (fake_nvcc, 8)
    assert setup_py._cuda_extension() == ([], {})
    # One line of ours (torch's cpp_extension may log its own "No CUDA runtime is found" when imported).
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rwp-fast")]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] and f"{fake_nvcc}.8" in lines[0] and "without rwp_fast._C" in lines[0]


def test_require_cuda_ext_turns_the_mismatch_into_an_error(setup_py, fake_nvcc, monkeypatch):
    monkeypatch.setenv("RWP_FAST_REQUIRE_CUDA_EXT", "1")
    with pytest.raises(RuntimeError, match=rf"CUDA {fake_nvcc}\.8.*RWP_FAST_REQUIRE_CUDA_EXT=1"):
        setup_py._cuda_extension()


@pytest.mark.parametrize("torch_cuda,nvcc,ok", [
    ("13.0", (13, 0), True), ("12.8", (12, 4), True), ("12.8", (13, 0), False), (None, (13, 0), False),
    ("12.8", None, False)])
def test_cuda_version_mismatch(setup_py, torch_cuda, nvcc, ok):
    assert (setup_py._cuda_version_mismatch(torch_cuda, nvcc) is None) == ok


class _FailingBuild:
    def __init__(self):
        self.extensions = ["rwp_fast._C"]

    def run(self):
        raise RuntimeError("Error compiling objects for extension\nninja: build stopped: subcommand failed.")


def test_a_failed_build_installs_without_the_extension(setup_py, capsys):
    build = setup_py._tolerant_build_ext(_FailingBuild)()
    build.run()
    assert build.extensions == []
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rwp-fast")]
    assert len(lines) == 1 and "Error compiling objects" in lines[0], lines


def test_require_cuda_ext_makes_a_failed_build_an_error(setup_py, monkeypatch):
    monkeypatch.setenv("RWP_FAST_REQUIRE_CUDA_EXT", "1")
    with pytest.raises(RuntimeError, match="building rwp_fast._C failed"):
        setup_py._tolerant_build_ext(_FailingBuild)().run()


@pytest.mark.parametrize("archs", ["80,90", "80;90", " 80 , 90 ", "80;90;"])
def test_arch_list_accepts_commas_and_semicolons(setup_py, archs):
    names, flags, torch_list = setup_py._parse_archs(archs)
    assert names == ["80", "90"] and torch_list == "8.0;9.0"
    assert flags == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


@pytest.mark.parametrize("archs", ["sm_90", "9.0", "", "8"])
def test_arch_list_rejects_what_is_not_an_sm_number(setup_py, archs):
    with pytest.raises(ValueError, match="RWP_FAST_CUDA_ARCHS"):
        setup_py._parse_archs(archs)


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="no nvcc: _cuda_extension returns before it reads the arch list")
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch: no extension is configured")
def test_comma_separated_archs_reach_torch_cuda_arch_list(setup_py, monkeypatch):
    """The bug: "80,90" gave TORCH_CUDA_ARCH_LIST="80,9.0" because one place split on ';' only."""
    monkeypatch.setenv("RWP_FAST_CUDA_ARCHS", "80,90")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "unset")
    ext_modules, cmdclass = setup_py._cuda_extension()
    if not ext_modules:
        pytest.skip("this machine's nvcc does not match torch's CUDA; the extension is not configured")
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0"
    # and a failing build of it only warns (test_a_failed_build_installs_without_the_extension)
    assert cmdclass["build_ext"].__name__ == "TolerantBuildExt"
