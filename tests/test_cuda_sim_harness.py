"""The simulator harness itself (tests/sim_harness.py): results come back, and every way a call can go wrong
ends in a readable failure rather than a hang or a silent pass."""
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.cuda_sim


def test_results_come_back_into_numpy_and_torch(cuda_sim):
    lib = cuda_sim.library("harness")
    x = np.arange(1000, dtype=np.float32)
    y = np.full(1000, np.nan, np.float32)
    assert lib.call("sim_harness_scale", x, y, 1000, 2.5, 0) == 0
    np.testing.assert_array_equal(y, x * 2.5)
    y_t = torch.full((1000,), float("nan"))
    lib.call("sim_harness_scale", torch.from_numpy(x), y_t, 1000, -1.0, 0)
    assert torch.equal(y_t, -torch.from_numpy(x))


def test_out_of_bounds_write_is_caught(cuda_sim):
    lib = cuda_sim.library("harness")
    x = np.ones(100, np.float32)
    y = np.zeros(100, np.float32)
    with pytest.raises(cuda_sim.CudaError, match="guard zone"):
        lib.call("sim_harness_scale", x, y, 100, 1.0, 1)


def test_error_codes_are_named(cuda_sim):
    with pytest.raises(cuda_sim.CudaError, match="error 1: cudaErrorInvalidValue"):
        cuda_sim.library("harness").call("sim_harness_return", 1)  # cudaErrorInvalidValue
    assert cuda_sim.library("harness").call("sim_harness_return", 1, check=False) == 1


def test_bad_arguments_are_refused(cuda_sim):
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda_sim.library("harness").call("sim_harness_scale", np.ones((4, 4), np.float32).T, None, 0, 1.0, 0)
    with pytest.raises(cuda_sim.SimulatorError, match="no_such_symbol"):
        cuda_sim.library("harness").call("no_such_symbol")


def test_crash_is_reported_and_the_next_call_restarts(cuda_sim):
    lib = cuda_sim.library("harness")
    with pytest.raises(cuda_sim.SimulatorError, match="exited with code -6 during sim_harness_abort") as crash:
        lib.call("sim_harness_abort")
    shutil.rmtree(crash.value.scratch)
    y = np.zeros(3, np.float32)
    lib.call("sim_harness_scale", np.ones(3, np.float32), y, 3, 3.0, 0)
    np.testing.assert_array_equal(y, 3.0)


def test_hang_times_out(cuda_sim, monkeypatch):
    monkeypatch.setattr(cuda_sim, "TIMEOUT", 2.0)
    with pytest.raises(cuda_sim.SimulatorError, match="no reply within 2 s") as hang:
        cuda_sim.library("harness").call("sim_harness_sleep", 60)
    shutil.rmtree(hang.value.scratch)
