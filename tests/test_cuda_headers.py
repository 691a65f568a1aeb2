"""The CUDA sources must compile even where no GPU exists (CI has nvcc but no GPU):
- every framework-free header csrc/cuda/<name>.cuh alone, with its self-test instantiations, for sm_80
  and sm_90 as C++17, and as C++20 (what torch's cpp_extension passes nvcc from torch 2.13 on; PTX only);
- every thin torch binding csrc/cuda/<name>.cu (and the registration table csrc/cuda/register.cu) against the
  CUDA headers the CPU torch wheel ships, as C++20 like the real build (a compile check only: not linked here)."""

import glob
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")))
BINDINGS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)

pytestmark = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not found (set CUDA_HOME)")


STANDARDS = {
    "c++17": ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"],
    "c++20": ["-gencode", "arch=compute_90,code=compute_90"],
}


def _header_cmd(header, workdir, std):
    # A one-line translation unit that includes the header, with the header's own explicit
    # instantiations switched on so all device code is generated.
    unit = os.path.join(workdir, f"{os.path.basename(header)}.{std}.cu")
    with open(unit, "w") as f:
        f.write(f'#include "{os.path.basename(header)}"\n')
    return [
        NVCC,
        f"-std={std}",
        "-c",
        "-DRLHF_EXT_HEADER_SELFTEST",
        "-I",
        os.path.dirname(header),
        *STANDARDS[std],
        unit,
        "-o",
        unit + ".o",
    ]


def _binding_cmd(binding, workdir):
    from torch.utils.cpp_extension import include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    # c10's generated CUDA macro header only exists in CUDA builds of torch; the flag skips it.
    return [
        NVCC,
        "-std=c++20",
        "-c",
        "-x",
        "cu",
        "-DRLHF_EXT_WITH_CUDA",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        *includes,
        "-gencode",
        "arch=compute_90,code=compute_90",
        binding,
        "-o",
        os.path.join(workdir, os.path.basename(binding) + ".o"),
    ]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every compile runs once, two at a time (nvcc over torch headers is slow), keyed by source path."""
    workdir = str(tmp_path_factory.mktemp("nvcc"))
    headers = [h for h in HEADERS if not h.endswith("common.cuh")]
    jobs = {(h, std): _header_cmd(h, workdir, std) for h in headers for std in STANDARDS}
    jobs.update({b: _binding_cmd(b, workdir) for b in BINDINGS})
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        results = dict(
            zip(jobs, pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs.values()))
        )
    return {path: (jobs[path], proc) for path, proc in results.items()}


def _assert_compiled(compiled, path):
    cmd, proc = compiled[path]
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"


def test_every_op_family_has_a_cuda_header():
    names = {os.path.basename(p)[: -len(".cuh")] for p in HEADERS} - {"common"}
    bindings = {os.path.basename(p)[: -len(".cu")] for p in BINDINGS} - {"register"}
    assert {"gae", "whiten"} <= names
    assert names == bindings, f"each csrc/cuda/<name>.cuh needs a binding <name>.cu and back: {names ^ bindings}"


@pytest.mark.parametrize("header", [p for p in HEADERS if not p.endswith("common.cuh")], ids=os.path.basename)
def test_header_compiles_for_sm80_and_sm90(header, compiled):
    _assert_compiled(compiled, (header, "c++17"))


@pytest.mark.parametrize("header", [p for p in HEADERS if not p.endswith("common.cuh")], ids=os.path.basename)
def test_header_compiles_as_cxx20(header, compiled):
    _assert_compiled(compiled, (header, "c++20"))


def test_header_check_fails_on_broken_header(tmp_path):
    """The check above can fail: a header with a device-code error does not compile."""
    bad = tmp_path / "bad.cuh"
    bad.write_text("#pragma once\n__global__ void k(float* x) { x[0] = undefined_symbol; }\n")
    unit = tmp_path / "unit.cu"
    unit.write_text('#include "bad.cuh"\n')
    proc = subprocess.run(
        [NVCC, "-std=c++17", "-c", "-I", str(tmp_path), str(unit), "-o", str(tmp_path / "u.o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0


@pytest.mark.parametrize("binding", BINDINGS, ids=os.path.basename)
def test_binding_compiles_against_torch_headers(binding, compiled):
    _assert_compiled(compiled, binding)
