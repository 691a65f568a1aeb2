"""Installing the way users install (issue: `pip install .` with build isolation on, any torch 2.4 … 2.15).

Fast (in `make test`):
- the loader's check of the build record: a core built for another torch is refused in one line naming what
  was found, what was expected and the rebuild command, before the shared library is loaded;
- `pip wheel .` for a Python without torch stops at once with one line, not a compiler log;
- the C++ sources compile as C++17 as well (old torch releases ask for it; the real build here is C++20).
Slow (`pytest -m slow tests/test_install.py`): real installs into fresh virtual environments, with and
without build isolation, and against the newest torch on the package index.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import types

import pytest

from rlhf_ext._loader import CompiledCoreError, check_build_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(torch_version, cuda_version=None):
    return types.SimpleNamespace(TORCH_VERSION=torch_version, CUDA_VERSION=cuda_version)


@pytest.mark.parametrize(
    "running, running_cuda, built, built_cuda, words",
    [
        ("2.15.0", None, "2.13.0", None, ["built against torch 2.13.0", "torch 2.15.0 is installed", "2.13.*"]),
        ("2.13.0+cu130", "13.0", "2.13.0+cu126", "12.6", ["CUDA 12.6", "uses CUDA 13.0"]),
        ("2.13.0", None, "2.13.0+cu130", "13.0", ["CUDA kernels", "is a CPU build"]),
    ],
)
def test_mismatched_build_is_refused_in_one_line(running, running_cuda, built, built_cuda, words):
    with pytest.raises(CompiledCoreError) as err:
        check_build_record(running, running_cuda, _record(built, built_cuda))
    message = str(err.value)
    assert "\n" not in message
    assert "pip install --no-build-isolation ." in message
    for word in words:
        assert word in message


def test_missing_build_is_refused_with_the_fix():
    with pytest.raises(CompiledCoreError, match=r"was not built.*pip install --no-build-isolation \."):
        check_build_record("2.13.0", None, None)


@pytest.mark.parametrize(
    "running, running_cuda, built, built_cuda",
    [
        ("2.13.1", None, "2.13.0", None),
        ("2.13.0+cu130", "13.0", "2.13.0+cu130", "13.0"),
        ("2.13.0+cu130", "13.0", "2.13.0", None),  # a CPU-only core beside a CUDA torch runs (CPU kernels)
    ],
)
def test_matching_build_is_accepted(running, running_cuda, built, built_cuda):
    check_build_record(running, running_cuda, _record(built, built_cuda))


def test_import_with_a_core_built_for_another_torch_fails_before_loading_it():
    """The real import path: a build record saying torch 2.4.1 makes `import rlhf_ext` fail with the
    one-line message (the .so is never loaded)."""
    code = (
        "import sys, types\n"
        "record = types.ModuleType('rlhf_ext._build_record')\n"
        "record.TORCH_VERSION, record.CUDA_VERSION = '2.4.1', None\n"
        "sys.modules['rlhf_ext._build_record'] = record\n"
        "import rlhf_ext\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rlhf_ext._loader.CompiledCoreError: rlhf_ext: the compiled core was built against")
    assert "torch 2.4.1" in last
    assert "expected torch 2.4.*" in last and "pip install --no-build-isolation ." in last
    assert "undefined symbol" not in proc.stderr


def _copy_sources(dest):
    """The tracked sources only (a build writes into its source tree: never into the developer's)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)
    return dest


def _venv(path):
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return os.path.join(path, "bin", "python")


@pytest.fixture
def sources(tmp_path):
    """A copy per test: pip builds a local folder in place (build/, rlhf_ext/_build_record.py), so two builds
    must never share one."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout of rlhf_ext (the tracked files are copied)")
    return _copy_sources(str(tmp_path / "src"))


def _cuda_home_env(env):
    """torch finds the CUDA toolkit from CUDA_HOME, else from `which nvcc`'s grandparent folder, which is wrong
    where nvcc on PATH is a wrapper or a symlink (here /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc:
    torch would link against /usr/local/lib, `cannot find -lcudart`). Point it at a real toolkit (one with
    lib64/libcudart.so), as a user on such a machine sets CUDA_HOME."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or "CUDA_HOME" in env or "CUDA_PATH" in env:
        return env
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.exists(os.path.join(home, "lib64", "libcudart.so")):
            env["CUDA_HOME"] = home
            break
    return env


def test_isolated_build_without_torch_stops_at_once_in_one_line(tmp_path, sources):
    """A user who forgot torch: `pip wheel .` (build isolation on) ends with our one line, no compile."""
    python = _venv(tmp_path / "venv")
    proc = subprocess.run(
        [python, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "wheels"), sources],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    if "rlhf_ext build:" not in output and ("No matching distribution" in output or "NewConnectionError" in output):
        pytest.skip("the package index is not reachable for pip's isolated build environment")
    assert proc.returncode != 0
    assert f"rlhf_ext build: torch is not installed for {python}" in output
    assert "pip install --no-build-isolation ." in output
    assert "g++" not in output and "-O3" not in output  # nothing was compiled


def _cxx17_syntax_check(sources, workdir):
    """g++ -std=c++17 -fsyntax-only over ONE translation unit that includes every source: torch's headers are
    parsed once instead of once per file (~30 s each on CI's cores). The real build (C++20) still compiles each
    file on its own, so a missing include cannot hide behind another file's here."""
    from torch.utils.cpp_extension import include_paths

    unity = os.path.join(str(workdir), "all_sources.cpp")
    with open(unity, "w") as fh:
        fh.writelines(f'#include "{path}"\n' for path in sources)
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = [
        "g++",
        "-std=c++17",
        "-fsyntax-only",
        "-fopenmp",
        "-w",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *includes,
        unity,
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cpu_sources_compile_as_cxx17(tmp_path):
    """torch < 2.13 builds extensions as C++17, current torch as C++20 (the real build here). The per-ISA
    variants (_avx2 / _avx512) are the _default file's kernels under another target and are left out."""
    sources = [
        path
        for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
        if not path.endswith(("_avx2.cpp", "_avx512.cpp"))
    ]
    assert len(sources) >= 10, sources
    proc = _cxx17_syntax_check(sources, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cxx17_check_catches_cxx20_only_code(tmp_path):
    """The check above fails on C++20-only code (here `consteval`), so its passing means something."""
    source = tmp_path / "cxx20_only.cpp"
    source.write_text("consteval int answer() { return 42; }\nint use() { return answer(); }\n")
    proc = _cxx17_syntax_check([str(source)], tmp_path)
    assert proc.returncode != 0 and "consteval" in proc.stderr


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


SMOKE = (
    "import torch, rlhf_ext\n"
    "from rlhf_ext.ops import reference\n"
    "r, v, m = torch.randn(3, 7), torch.randn(3, 7), torch.ones(3, 7, dtype=torch.bool)\n"
    "a, ret = rlhf_ext.ops.gae(r, v, m, 0.99, 0.95)\n"
    "ra, rret = reference.gae_reference(r, v, m, 0.99, 0.95)\n"
    "torch.testing.assert_close(a, ra)\n"
    "print(torch.__version__, rlhf_ext.build_info()['torch_version'])\n"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "isolation, newest_pip",
    [(True, False), (True, True), (False, False)],
    ids=["isolated", "isolated-newest-pip", "no-isolation"],
)
def test_pip_install_into_a_fresh_venv_with_torch_2_13(tmp_path, sources, isolation, newest_pip):
    python = _venv(tmp_path / "venv")
    if newest_pip:
        _run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"])
    flags = [] if isolation else ["--no-build-isolation"]
    if not isolation:
        _run([python, "-m", "pip", "install", "-q", "setuptools", "wheel", "ninja"])
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([python, "-m", "pip", "install", "-q", *flags, sources], env=env)
    out = _run([python, "-c", SMOKE], cwd=str(tmp_path)).stdout.split()
    assert out[0] == out[1]  # built against the torch it runs with
    requires = _run([python, "-m", "pip", "show", "rlhf_ext"]).stdout
    assert "torch" in requires


@pytest.mark.slow
def test_python_m_build_makes_an_sdist_and_a_wheel_that_pins_torch(tmp_path, sources):
    import torch

    python = _venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "-q", "torch==2.13.0", "build", "setuptools", "wheel", "ninja"])
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    _run([python, "-m", "build", "--no-isolation", "-o", str(tmp_path / "dist"), sources], env=env)
    dist = sorted(os.listdir(tmp_path / "dist"))
    sdist = [name for name in dist if name.endswith(".tar.gz")]
    wheel = [name for name in dist if name.endswith(".whl")]
    assert len(sdist) == 1 and len(wheel) == 1, dist
    import tarfile
    import zipfile

    with tarfile.open(tmp_path / "dist" / sdist[0]) as tar:
        names = tar.getnames()
    for header in (
        "csrc/cuda/logprobs.cuh",
        "csrc/cuda/logprobs/forward.cuh",
        "csrc/cuda/common.cuh",
        "csrc/cpu/logprobs_rows.h",
        "csrc/checks/checks.h",
        "csrc/maths/acc_type.h",
    ):
        assert any(name.endswith(header) for name in names), header
    with zipfile.ZipFile(tmp_path / "dist" / wheel[0]) as whl:
        metadata = next(whl.read(n).decode() for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        assert any(n.startswith("rlhf_ext/_C") for n in whl.namelist())
        assert "rlhf_ext/_build_record.py" in whl.namelist()
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert f"Requires-Dist: torch=={major_minor}.*" in metadata
    _run([python, "-m", "pip", "install", "-q", str(tmp_path / "dist" / wheel[0])])
    out = _run([python, "-c", SMOKE], cwd=str(tmp_path)).stdout.split()
    assert out[0] == out[1]


@pytest.mark.slow
def test_build_against_the_newest_torch(tmp_path, sources):
    """The newest torch on the index (lifting this machine's local pip cap), built without isolation."""
    python = _venv(tmp_path / "venv")
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    _cuda_home_env(env)
    start = time.time()
    _run([python, "-m", "pip", "install", "-q", "--upgrade", "torch", "setuptools", "wheel", "ninja"], env=env)
    installed = time.time()
    _run([python, "-m", "pip", "install", "-q", "--no-build-isolation", sources], env=env)
    built = time.time()
    out = _run([python, "-c", SMOKE], cwd=str(tmp_path)).stdout.split()
    assert out[0] == out[1]
    info = _run([python, "-c", "import rlhf_ext; print(rlhf_ext.build_info())"], cwd=str(tmp_path)).stdout.strip()
    print(f"\nnewest torch {out[0]}: install {installed - start:.0f} s, build {built - installed:.0f} s; {info}")
