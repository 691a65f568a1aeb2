"""The compiled core's layout (csrc/, see README "Ops"): every op family under one name in each folder, the
framework-free headers free of torch, one registration table per device that binds every op, and every source
file short enough to read."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FAMILIES = ("gae", "whiten", "logprobs", "ppo_loss", "sampling")
# Op families with a CPU kernel only, and why: their ops are in the CPU table, never in the CUDA one.
CPU_ONLY_FAMILIES = {
    "packed_linear": "a CPU GEMM layout for the decode's few-row products; on CUDA they stay with cuBLAS",
    "decode_step": "removes a CPU decode step's per-op overhead; on CUDA a captured CUDA graph replays the step",
}
CPU_ONLY_OPS = {"pack_linear_weight", "packed_linear", "decode_step"}  # the schemas of CPU_ONLY_FAMILIES
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](ATen|c10|torch|pybind11)/', re.M)
SCHEMA = re.compile(r'\bm\.def\(\s*"(\w+)\(')
IMPL = re.compile(r'\bm\.impl\(\s*"(\w+)"')
IMPL_BLOCK = re.compile(r"\bTORCH_LIBRARY_IMPL\(\s*rlhf_ext\s*,\s*(\w+)\s*,")
# Where each dispatch key's one registration table lives.
TABLES = {"CPU": "csrc/cpu/register.cpp", "CUDA": "csrc/cuda/register.cu"}


def _csrc_files(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(CSRC, "**", pattern), recursive=True))


def _cuda_files(family):
    return [f"csrc/cuda/{family}.cuh", f"csrc/cuda/{family}.cu"]


def _family_files(family, cuda=True):
    """The files an op family has under its one name, in every layer (without the CUDA pair for a CPU-only one)."""
    return [
        f"csrc/checks/{family}.cpp",
        f"csrc/cpu/{family}.cpp",
        *(_cuda_files(family) if cuda else []),
        f"rlhf_ext/ops/{family}.py",
        f"tests/test_{family}.py",
        f"benchmarks/bench_{family}.py",
    ]


def _absent(paths):
    return [path for path in paths if not os.path.exists(os.path.join(ROOT, path))]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_op_family_keeps_one_name_across_the_layers(family):
    missing = _absent(_family_files(family))
    assert not missing, f"op family {family!r} lacks {missing}"


@pytest.mark.parametrize("family", sorted(CPU_ONLY_FAMILIES))
def test_each_cpu_only_family_keeps_one_name_and_has_no_cuda_files(family):
    missing = _absent(_family_files(family, cuda=False))
    assert not missing, f"op family {family!r} lacks {missing}"
    cuda = sorted(set(_cuda_files(family)) - set(_absent(_cuda_files(family))))
    assert not cuda, f"op family {family!r} is CPU-only ({CPU_ONLY_FAMILIES[family]}) but has {cuda}"


def test_framework_free_headers_include_nothing_from_torch():
    """The CUDA kernel headers and the shared maths compile with plain nvcc (CI has no CUDA torch)."""
    headers = _csrc_files("*.cuh") + glob.glob(os.path.join(CSRC, "maths", "*.h"))
    assert len(headers) >= len(FAMILIES) + 2
    offenders = {}
    for path in headers:
        with open(path) as f:
            found = TORCH_INCLUDE.findall(f.read())
        if found:
            offenders[os.path.relpath(path, ROOT)] = found
    assert not offenders, f"framework-free headers include torch: {offenders}"


def _read(relpath):
    with open(os.path.join(ROOT, relpath)) as f:
        return f.read()


def _schema_ops():
    ops = SCHEMA.findall(_read("csrc/ops.cpp"))
    assert len(ops) >= 10, f"csrc/ops.cpp: expected the op schemas (m.def), found {ops}"
    return ops


@pytest.mark.parametrize("device", sorted(TABLES))
def test_every_schema_has_exactly_one_kernel_in_the_device_table(device):
    """A new op cannot be forgotten on one device, nor registered twice."""
    impls = IMPL.findall(_read(TABLES[device]))
    ops = [op for op in _schema_ops() if device == "CPU" or op not in CPU_ONLY_OPS]
    counts = {op: impls.count(op) for op in ops}
    wrong = {op: n for op, n in counts.items() if n != 1}
    assert not wrong, f"{TABLES[device]}: expected one m.impl per schema of csrc/ops.cpp, got counts {wrong}"
    unknown = sorted(set(impls) - set(counts))
    assert not unknown, f"{TABLES[device]}: m.impl of ops without a schema in csrc/ops.cpp: {unknown}"


def test_each_device_registers_in_its_one_table_only():
    blocks = {}
    for path in _csrc_files("*.cpp", "*.cu", "*.h", "*.cuh"):
        for key in IMPL_BLOCK.findall(_read(path)):
            blocks.setdefault(key, []).append(os.path.relpath(path, ROOT))
    assert blocks == {key: [path] for key, path in TABLES.items()}, f"TORCH_LIBRARY_IMPL blocks: {blocks}"


def test_every_source_file_is_under_400_lines():
    lengths = {}
    for path in _csrc_files("*.cpp", "*.h", "*.cu", "*.cuh"):
        with open(path) as f:
            lengths[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
    assert lengths, "no sources found under csrc/"
    too_long = {path: n for path, n in lengths.items() if n > 400}
    assert not too_long, f"split these along a natural seam: {too_long}"
