"""Worker process of tests/sim_harness.py: loads ONE harness library on the GPU simulator's libcudart and runs
the calls the parent sends. Run by the harness only: `python worker.py LIBRARY` in a scratch folder holding the
simulator's config, with the simulator's environment (LD_LIBRARY_PATH, PYTORCH_BIN = LIBRARY, ...).

Why a process of its own: the simulator prints to stdout, writes files into its cwd, reads the PTX of one
binary only (PYTORCH_BIN) and may exit() or abort on a PTX it cannot handle; here none of that reaches pytest.

Protocol on stdin / the original stdout (fd 1 is then pointed at the simulator log): length-prefixed pickles.
  request  ("call", symbol, args)  args: numpy arrays (passed as pointers), None (NULL), int (int64_t),
                                   float (double)
  reply    ("ok", return code, error string, [arrays after the call, in argument order])
           ("error", traceback text)
"""

import ctypes
import os
import pickle
import struct
import sys
import traceback

import numpy as np


def _read_message(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def _write_message(stream, message):
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def _c_arg(value):
    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, np.ndarray):
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, (bool, int)):
        return ctypes.c_int64(int(value))
    if isinstance(value, float):
        return ctypes.c_double(value)
    raise TypeError(f"unsupported argument type {type(value).__name__}")


def _loaded_cudart():
    with open("/proc/self/maps") as maps:
        return sorted({line.split()[-1] for line in maps if "libcudart" in line})


def main():
    library_path = sys.argv[1]
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    # From here on fd 1 and 2 are the simulator's log (the parent named it with GPUSIM_WORKER_LOG).
    log_fd = os.open(os.environ["GPUSIM_WORKER_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        library = ctypes.CDLL(library_path)
        library.sim_error_string.restype = ctypes.c_char_p
        library.sim_error_string.argtypes = [ctypes.c_int]
        expected = os.path.realpath(os.path.join(os.environ["GPUSIM_PREFIX"], "lib"))
        cudart = _loaded_cudart()
        if not cudart or not all(os.path.realpath(p).startswith(expected) for p in cudart):
            raise RuntimeError(f"expected the simulator's libcudart under {expected}, loaded {cudart}")
        _write_message(replies, ("ready", cudart))
    except Exception:
        _write_message(replies, ("error", traceback.format_exc()))
        return
    while True:
        request = _read_message(requests)
        if request is None:
            return
        try:
            _, symbol, args = request
            function = getattr(library, symbol)
            function.restype = ctypes.c_int
            code = function(*[_c_arg(a) for a in args])
            message = library.sim_error_string(code).decode() if code else ""
            reply = ("ok", code, message, [a for a in args if isinstance(a, np.ndarray)])
        except Exception:
            reply = ("error", traceback.format_exc())
        sys.stdout.flush()
        _write_message(replies, reply)


if __name__ == "__main__":
    main()
