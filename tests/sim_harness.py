"""Runs the framework-free CUDA launchers of csrc/cuda/*.cuh on the GPU simulator (../shared/gpusim), no GPU.

Each op family has a harness library, tests/cuda_sim/<family>_sim.cu: `extern "C"` entry points that take host
arrays, copy them to the device, run a launcher and copy the outputs back (tests/cuda_sim/sim_common.cuh). It is
built with nvcc as compute_75 PTX against `-cudart shared`, cached under build/cuda_sim/ (or
$RLHF_EXT_SIM_CACHE) by a hash of the sources, flags and nvcc version, and loaded in a worker process of its own
(tests/cuda_sim/worker.py) whose libcudart is the simulator. A call sends the arguments to the worker and
copies the arrays back into the caller's arrays, so a test reads like C:

    lib = sim_harness.library("gae")
    adv = np.full((B, T), np.nan, np.float32)          # outputs are in/out: unwritten entries stay NaN
    lib.call("sim_gae_f32", rewards, values, mask, None, adv, ret, B, T, 0.99, 0.95)

Arguments: numpy arrays or CPU torch tensors (C-contiguous; passed as pointers; bfloat16 tensors travel as
their bits), None (NULL), int (int64_t), float (double). `call` raises CudaError when the entry point returns a
non-zero cudaError_t (10001: a kernel wrote into a buffer's guard zone), and SimulatorError, with the tail of
the simulator's log, when the worker dies (the simulator may exit() or abort) or exceeds the timeout
($RLHF_EXT_SIM_TIMEOUT seconds, default 600); the next call starts a fresh worker.

Where the simulator comes from: $GPUSIM_PREFIX (what `eval "$(bash ../shared/gpusim/setup.sh)"` exports),
else ../shared/gpusim/setup.sh next to the repository, run here. `unavailable_reason()` says why the tests
must skip (no nvcc, no simulator) or returns None.
"""

import atexit
import glob
import hashlib
import os
import pickle
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIM_SOURCES = os.path.join(REPO, "tests", "cuda_sim")
SHARED_GPUSIM = os.path.normpath(os.path.join(REPO, "..", "shared", "gpusim"))
CACHE = os.environ.get("RLHF_EXT_SIM_CACHE") or os.path.join(REPO, "build", "cuda_sim")
TIMEOUT = float(os.environ.get("RLHF_EXT_SIM_TIMEOUT", "600"))
# compute_75 PTX only: the simulator ignores SASS, and sm_80+ PTX has bf16 conversions it cannot parse.
NVCC_FLAGS = [
    "-std=c++17",
    "-cudart",
    "shared",
    "-gencode",
    "arch=compute_75,code=compute_75",
    "-Xcompiler",
    "-fPIC",
    "-shared",
    "-I",
    os.path.join(REPO, "csrc", "cuda"),
    "-I",
    SIM_SOURCES,
]

# The simulator traces instructions of the thread whose uid matches these (0 = every thread): its option
# -gpgpu_ptx_inst_debug_to_file is an OPT_BOOL stored in an int, so it reads as on, and the env default 0 records
# every register write of every thread. A uid no thread reaches turns both off (several times faster, and no
# ~100 MB inst_debug.txt per worker).
QUIET_CONFIG = "\n-gpgpu_ptx_inst_debug_thread_uid 2000000000\n"
QUIET_ENV = {"PTX_SIM_DEBUG_THREAD_UID": "2000000000"}


class SimulatorError(RuntimeError):
    """The simulator worker died, hung or could not start; the message carries the tail of its log."""


class CudaError(RuntimeError):
    """An entry point returned a non-zero cudaError_t."""

    def __init__(self, symbol: str, code: int, message: str):
        super().__init__(f"{symbol} returned CUDA error {code}: {message}")
        self.code = code


def families() -> list[str]:
    """Op families that have a harness library (tests/cuda_sim/<family>_sim.cu)."""
    return sorted(os.path.basename(p)[: -len("_sim.cu")] for p in glob.glob(os.path.join(SIM_SOURCES, "*_sim.cu")))


def nvcc_path() -> Optional[str]:
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


_prefix_cache: dict[str, tuple] = {}


def _find_simulator():
    """-> (prefix, None) or (None, why not)."""
    if "result" in _prefix_cache:
        return _prefix_cache["result"]
    prefix, reason = os.environ.get("GPUSIM_PREFIX"), None
    setup = os.path.join(SHARED_GPUSIM, "setup.sh")
    if prefix:
        if not os.path.isfile(os.path.join(prefix, "env.sh")):
            prefix, reason = None, f"GPUSIM_PREFIX={prefix} holds no env.sh (run the simulator's setup.sh)"
    elif os.path.isfile(setup):
        proc = subprocess.run(["bash", setup], capture_output=True, text=True)
        line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode == 0 and line.startswith("export GPUSIM_PREFIX="):
            prefix = line.split("=", 1)[1].strip().strip('"')
        else:
            reason = f"{setup} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}"
    else:
        reason = (
            f'no GPU simulator: set GPUSIM_PREFIX (eval "$(bash ../shared/gpusim/setup.sh)") or provide {SHARED_GPUSIM}'
        )
    _prefix_cache["result"] = (prefix, reason)
    return prefix, reason


def unavailable_reason() -> Optional[str]:
    """None when nvcc and the simulator are both here, else why the cuda_sim tests skip."""
    if nvcc_path() is None:
        return "nvcc not found (put it on PATH or set CUDA_HOME)"
    return _find_simulator()[1]


def simulator_prefix() -> str:
    prefix, reason = _find_simulator()
    if prefix is None:
        raise SimulatorError(reason)
    return prefix


# ---- building ----


def _local_includes(path: str, seen: set) -> None:
    """Adds path and every file it includes with #include "..." (searched as nvcc does with NVCC_FLAGS)."""
    if path in seen:
        return
    seen.add(path)
    with open(path) as f:
        names = re.findall(r'^\s*#\s*include\s+"([^"]+)"', f.read(), re.M)
    for name in names:
        for folder in (os.path.dirname(path), os.path.join(REPO, "csrc", "cuda"), SIM_SOURCES):
            candidate = os.path.normpath(os.path.join(folder, name))
            if os.path.isfile(candidate):
                _local_includes(candidate, seen)
                break


def _source_hash(family: str, nvcc: str) -> str:
    """Hash of the family's source, the project headers it includes, the flags and the nvcc version."""
    files: set = set()
    _local_includes(os.path.join(SIM_SOURCES, f"{family}_sim.cu"), files)
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(os.path.relpath(path, REPO).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(NVCC_FLAGS).replace(REPO, "").encode())
    digest.update(subprocess.run([nvcc, "--version"], capture_output=True).stdout)
    return digest.hexdigest()[:16]


def build(family: str) -> str:
    """Path of the family's harness library, compiled unless the cache already holds this version."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise SimulatorError(unavailable_reason())
    source = os.path.join(SIM_SOURCES, f"{family}_sim.cu")
    if not os.path.isfile(source):
        raise ValueError(f"family: no harness source {source}; have {families()}")
    os.makedirs(CACHE, exist_ok=True)
    target = os.path.join(CACHE, f"{family}_sim-{_source_hash(family, nvcc)}.so")
    if os.path.exists(target):
        return target
    partial = f"{target}.{os.getpid()}.tmp"
    cmd = [nvcc, *NVCC_FLAGS, source, "-o", partial]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed for {family} ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    for stale in glob.glob(os.path.join(CACHE, f"{family}_sim-*.so")):
        os.remove(stale)
    os.replace(partial, target)
    return target


def build_all(names: Optional[list[str]] = None) -> dict[str, str]:
    """Builds every family's library (two nvcc at a time: CI has 2 cores) -> {family: path}."""
    names = families() if names is None else names
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        return dict(zip(names, pool.map(build, names)))


# ---- host arrays ----


def host_array(x) -> np.ndarray:
    """A numpy view (same memory) of a C-contiguous numpy array or CPU torch tensor; bfloat16 as uint16 bits."""
    if type(x).__module__.startswith("torch"):
        import torch

        if x.device.type != "cpu" or not x.is_contiguous():
            raise ValueError(f"expected a contiguous CPU tensor, got device {x.device}, strides {x.stride()}")
        return (x.view(torch.uint16) if x.dtype == torch.bfloat16 else x).numpy()
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous:
            raise ValueError("expected a C-contiguous array")
        return x
    raise TypeError(f"expected a numpy array or torch tensor, got {type(x).__name__}")


# ---- worker processes ----


def _read_exactly(stream, size: int, deadline: float, describe) -> bytes:
    chunks, got = [], 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([stream], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(stream.fileno(), size - got)
        if not chunk:
            raise EOFError(describe())
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class SimLibrary:
    """One family's harness library, running in a simulator worker process (started on first use)."""

    def __init__(self, family: str, path: str):
        self.family, self.path = family, path
        self._proc = None
        self._scratch = None
        self.calls = 0
        self.cpu_seconds = 0.0  # of the worker processes, start-up included (what CI pays for)
        self._cpu_before_start = 0.0

    def _start(self):
        self._cpu_before_start = self.cpu_seconds
        prefix = simulator_prefix()
        env_dump = subprocess.run(
            ["bash", "-c", 'source "$1/env.sh" && env -0', "_", prefix], capture_output=True, check=True
        ).stdout.decode()
        env = dict(item.split("=", 1) for item in env_dump.split("\0") if "=" in item)
        self._scratch = tempfile.mkdtemp(prefix=f"rlhf-ext-sim-{self.family}-")
        for name in os.listdir(env["GPUSIM_CONFIG_DIR"]):
            shutil.copy(os.path.join(env["GPUSIM_CONFIG_DIR"], name), self._scratch)
        with open(os.path.join(self._scratch, "gpgpusim.config"), "a") as config:
            config.write(QUIET_CONFIG)
        env.update(QUIET_ENV)
        env.update(
            GPUSIM_PREFIX=prefix,
            PYTORCH_BIN=self.path,  # the binary the simulator reads the PTX of
            GPUSIM_WORKER_LOG=os.path.join(self._scratch, "simulator.log"),
        )
        self._proc = subprocess.Popen(
            [sys.executable, os.path.join(SIM_SOURCES, "worker.py"), self.path],
            cwd=self._scratch,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        reply = self._receive("start-up")
        if reply[0] != "ready":
            self._fail("start-up", f"worker could not load {self.path}:\n{reply[1]}")

    def log_tail(self, lines: int = 40) -> str:
        path = os.path.join(self._scratch or "", "simulator.log")
        if not os.path.exists(path):
            return "(no log)"
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def _fail(self, what: str, why: str):
        scratch = self._scratch
        tail = self.log_tail()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # hung: nothing left to wait for
        self.close(keep_scratch=True)
        error = SimulatorError(
            f"cuda_sim {self.family}: {why} during {what}; simulator log {scratch}/simulator.log ends with:\n{tail}"
        )
        error.scratch = scratch  # kept for a look; the caller may remove it
        raise error

    def _receive(self, what: str):
        deadline = time.monotonic() + TIMEOUT

        def died():
            return f"worker exited with code {self._proc.wait()}"

        try:
            (size,) = struct.unpack("<Q", _read_exactly(self._proc.stdout, 8, deadline, died))
            return pickle.loads(_read_exactly(self._proc.stdout, size, deadline, died))
        except TimeoutError:
            self._fail(what, f"no reply within {TIMEOUT:.0f} s (RLHF_EXT_SIM_TIMEOUT)")
        except EOFError as e:
            self._fail(what, str(e))

    def call(self, symbol: str, *args, check: bool = True) -> int:
        """Runs `symbol(*args)` in the worker; arrays are copied back into the caller's. -> the cudaError_t."""
        wire, views = [], []
        for a in args:
            if a is None or isinstance(a, (bool, int, float)):
                wire.append(a)
            else:
                view = host_array(a)
                views.append(view)
                wire.append(view)
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        data = pickle.dumps(("call", symbol, wire), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._fail(symbol, f"worker exited with code {self._proc.wait()}")
        reply = self._receive(symbol)
        if reply[0] != "ok":
            raise SimulatorError(f"cuda_sim {self.family}: {symbol} raised in the worker:\n{reply[1]}")
        _, code, message, arrays = reply
        self.calls += 1
        self.cpu_seconds = self._cpu_before_start + _process_cpu_seconds(self._proc.pid)
        for view, result in zip(views, arrays):
            np.copyto(view, result)
        if check and code != 0:
            raise CudaError(symbol, code, message)
        return code

    def close(self, keep_scratch: bool = False):
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._scratch and not keep_scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None


def _process_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


_libraries: dict[str, SimLibrary] = {}


def summary() -> str:
    """One line per family used: calls and simulator CPU seconds (for the test log)."""
    return "\n".join(
        f"cuda_sim {name}: {lib.calls} calls, {lib.cpu_seconds:.1f} s simulator CPU"
        for name, lib in sorted(_libraries.items())
    )


def library(family: str) -> SimLibrary:
    """The family's SimLibrary (built if needed; one worker per family for the whole session)."""
    if family not in _libraries:
        _libraries[family] = SimLibrary(family, build(family))
    return _libraries[family]


@atexit.register
def shutdown():
    """Ends every worker and removes its scratch folder (a later call starts a fresh worker)."""
    for lib in _libraries.values():
        lib.close()
