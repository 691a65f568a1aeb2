"""csrc/cuda/sampling.cuh's launch_sample on the GPU simulator (tests/sim_harness.py).

The draw is Gumbel-max with Philox4x32-10 noise keyed by (seed; vocabulary index, row, offset), so a host replica
(`expected_tokens`: the same Philox in numpy, the kept set of reference.filtered_probs_reference) predicts every
token exactly: each test checks every sampled row against it, which covers membership in the kept set, the
seed/offset handling and the tie rules at once. A chi-square test on the simulator's own draws (as many rows as
its speed allows) and on 200k draws of the replica checks the distribution itself.
"""

import numpy as np
import pytest
import torch

from rlhf_ext.ops.reference import filtered_probs_reference

pytestmark = pytest.mark.cuda_sim

SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
NAN = float("nan")
_M32 = np.uint64(0xFFFFFFFF)


def sim_sample(
    cuda_sim,
    logits,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seed=0,
    offset=0,
    rows=None,
    device_seed=None,
    offset_intragraph=0,
    first=0,
    row_stride=None,
):
    """launch_sample over logits [B, V] -> (tokens, logprobs, filtered_logprobs). rows: per-row setting arrays
    {"temperature", "top_k", "top_p", "min_p"}. first / row_stride place the rows in a larger flat buffer."""
    B, V = logits.shape
    row_stride = V if row_stride is None else row_stride
    flat = torch.zeros(first + max(B - 1, 0) * row_stride + V, dtype=logits.dtype)
    for b in range(B):
        flat[first + b * row_stride : first + b * row_stride + V] = logits[b]
    rows = rows or {}
    per_row = [rows.get("temperature"), rows.get("top_k"), rows.get("top_p"), rows.get("min_p")]
    kinds = [torch.float32, torch.int64, torch.float64, torch.float32]
    per_row = [None if r is None else torch.as_tensor(r, dtype=k).contiguous() for r, k in zip(per_row, kinds)]
    tokens = torch.full((B,), -7, dtype=torch.int64)
    logprobs = torch.full((B,), NAN)
    filtered = torch.full((B,), NAN)
    dev_seed = None if device_seed is None else torch.tensor(device_seed, dtype=torch.int64)
    cuda_sim.library("sampling").call(
        f"sim_sample_{SUFFIX[logits.dtype]}",
        flat,
        first,
        B,
        V,
        row_stride,
        *per_row,
        float(temperature),
        int(top_k),
        float(top_p),
        float(min_p),
        seed,
        offset,
        dev_seed,
        offset_intragraph,
        tokens,
        logprobs,
        filtered,
    )
    return tokens, logprobs, filtered


def philox_x(counter_i, row, offset, seed):
    """First output word of Philox4x32-10 at counter (i, row, offset lo, offset hi), key (seed lo, seed hi)."""
    c0 = np.asarray(counter_i, np.uint64) & _M32
    c1 = np.asarray(row, np.uint64) & _M32
    c2 = np.full_like(c0, np.uint64(offset) & _M32)
    c3 = np.full_like(c0, np.uint64(offset) >> np.uint64(32))
    k0, k1 = np.uint64(seed) & _M32, np.uint64(seed) >> np.uint64(32)
    for _ in range(10):
        p0, p1 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0


def _row_setting(value, rows, name, b):
    return rows[name][b] if rows and rows.get(name) is not None else value


def expected_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0, rows=None, first_row=0):
    """The host replica of the kernel's draw: argmax over the reference's kept set of z_i - log(-log(u_i)).
    Row b of logits was row first_row + b of the launch (the Philox counter holds the launch's row)."""
    B, V = logits.shape
    out = np.empty(B, np.int64)
    for b in range(B):
        t, k, p, m = (
            _row_setting(v, rows, n, b)
            for v, n in ((temperature, "temperature"), (top_k, "top_k"), (top_p, "top_p"), (min_p, "min_p"))
        )
        x = logits[b : b + 1].float()
        if t == 0:
            out[b] = int(x.argmax())
            continue
        kept = filtered_probs_reference(x, float(t), int(k), float(p), float(m))[0].numpy() > 0
        z = (x[0] / torch.tensor(float(t), dtype=torch.float32)).numpy().astype(np.float64)
        u = (philox_x(np.arange(V), first_row + b, offset, seed).astype(np.float64) + 0.5) * 2.3283064365386963e-10
        score = np.where(kept, z - np.log(-np.log(u)), -np.inf)
        out[b] = int(np.argmax(score))
    return torch.from_numpy(out)


def _check_logprobs(logits, tokens, logprobs, filtered, temperature, top_k, top_p, min_p, rows=None):
    for b in range(logits.shape[0]):
        t, k, p, m = (
            _row_setting(v, rows, n, b)
            for v, n in ((temperature, "temperature"), (top_k, "top_k"), (top_p, "top_p"), (min_p, "min_p"))
        )
        z = logits[b].double() / (float(t) if t > 0 else 1.0)
        assert abs(logprobs[b].item() - torch.log_softmax(z, -1)[tokens[b]].item()) < 2e-5, f"row {b}: logprob"
        want = (
            0.0
            if t == 0
            else filtered_probs_reference(logits[b : b + 1], float(t), int(k), float(p), float(m))[0, tokens[b]]
            .log()
            .item()
        )
        assert abs(filtered[b].item() - want) < 2e-5, f"row {b}: filtered logprob {filtered[b].item()} != {want}"


def _settings_rows(V):
    """One row per setting: greedy, temperatures, top-k (1, 5, = V, > V), top-p (0.9, 1), min-p, combined."""
    table = [  # temperature, top_k, top_p, min_p
        (0.0, 0, 1.0, 0.0),
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 1.0, 0.0),
        (1.5, 1, 1.0, 0.0),
        (1.0, 5, 1.0, 0.0),
        (1.0, V, 1.0, 0.0),
        (1.0, V + 7, 1.0, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.2, 0, 1.0, 0.0),
        (1.0, 0, 1.0, 0.1),
        (0.8, 50, 0.9, 0.02),
        (3.0, 0, 0.5, 0.0),
    ]
    cols = list(zip(*table))
    return {"temperature": list(cols[0]), "top_k": list(cols[1]), "top_p": list(cols[2]), "min_p": list(cols[3])}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_setting_per_row_matches_the_host_replica(cuda_sim, dtype):
    """V = 203 (not a multiple of the 4- or 8-wide loads: vector body + scalar tail), 10% -inf logits."""
    V = 203
    rows = _settings_rows(V)
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(len(rows["top_k"]), V, generator=g) * 3
    logits[torch.rand(logits.shape, generator=g) < 0.1] = float("-inf")
    logits = logits.to(dtype)
    tokens, logprobs, filtered = sim_sample(cuda_sim, logits, rows=rows, seed=1234, offset=8, row_stride=208)
    assert torch.equal(tokens, expected_tokens(logits, rows=rows, seed=1234, offset=8))
    _check_logprobs(logits.float(), tokens, logprobs, filtered, 1.0, 0, 1.0, 0.0, rows=rows)


def test_scalar_settings_unaligned_rows_and_ties(cuda_sim):
    """Scalar settings, a row start that is not 16-byte aligned (scalar loads), ties at the k-th value (all kept)
    and at the maximum (top_k = 1 keeps every tied token)."""
    ties = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.5, 0.0, -1.0, -2.0, float("-inf"), -0.5])
    logits = ties.repeat(6, 1)
    for first, settings in ((1, dict(top_k=2)), (0, dict(top_k=2, temperature=0.5)), (3, dict(top_p=0.6))):
        tokens, logprobs, filtered = sim_sample(cuda_sim, logits, seed=5, first=first, row_stride=13, **settings)
        assert torch.equal(tokens, expected_tokens(logits, seed=5, **settings))
        assert set(tokens.tolist()) <= {0, 1, 2, 3}
        _check_logprobs(
            logits,
            tokens,
            logprobs,
            filtered,
            settings.get("temperature", 1.0),
            settings.get("top_k", 0),
            settings.get("top_p", 1.0),
            0.0,
        )
    tied_max = torch.tensor([[1.0, 5.0, 5.0, 2.0, 5.0]]).repeat(10, 1)
    tokens, _, _ = sim_sample(cuda_sim, tied_max, top_k=1, seed=9)
    assert torch.equal(tokens, expected_tokens(tied_max, top_k=1, seed=9))
    assert set(tokens.tolist()) == {1, 2, 4}
    greedy, _, _ = sim_sample(cuda_sim, tied_max[:1], temperature=0.0)
    assert greedy.tolist() == [1]  # the first argmax


def test_non_finite_extreme_rows_and_bad_settings(cuda_sim):
    """NaN, +inf or no finite logit: token -1 and NaN log-probs (the wrapper raises on them); ±1e4 logits and a
    single finite logit sample normally; settings out of range give -1 per row."""
    V = 40
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(3))
    logits[0, 7] = NAN
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3] = float("-inf")
    logits[3, 21] = -5.0  # the only finite logit
    logits[4] = torch.where(torch.arange(V) % 2 == 0, torch.tensor(1e4), torch.tensor(-1e4))
    logits[4, 10] = 1e4 - 0.5
    logits[5] = torch.linspace(-1e4, 1e4, V)
    tokens, logprobs, filtered = sim_sample(cuda_sim, logits, top_p=0.9, seed=77)
    assert tokens[:3].tolist() == [-1, -1, -1] and torch.isnan(logprobs[:3]).all() and torch.isnan(filtered[:3]).all()
    assert torch.equal(tokens[3:], expected_tokens(logits[3:], top_p=0.9, seed=77, first_row=3))
    assert tokens[3] == 21 and tokens[5] == V - 1
    assert int(tokens[4]) % 2 == 0 or int(tokens[4]) == 10
    _check_logprobs(logits[3:], tokens[3:], logprobs[3:], filtered[3:], 1.0, 0, 0.9, 0.0)
    bad = {
        "temperature": [-1.0, float("inf"), 1.0, 1.0, 1.0, 1.0, 1.0],
        "top_k": [0, 0, -1, 0, 0, 0, 0],
        "top_p": [1.0, 1.0, 1.0, 0.0, 1.5, 1.0, 1.0],
        "min_p": [0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0],
    }
    tokens, logprobs, _ = sim_sample(cuda_sim, torch.randn(7, 16), rows=bad)
    assert tokens[:6].tolist() == [-1] * 6 and torch.isnan(logprobs[:6]).all() and tokens[6] >= 0


def test_seed_and_offset(cuda_sim):
    """Same seed and offset: same tokens; the device-pointer seed (CUDA-graph path) adds offset_intragraph;
    another seed or offset draws other tokens, each as the replica predicts."""
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    a, _, _ = sim_sample(cuda_sim, logits, seed=2**40 + 17, offset=12)
    b, _, _ = sim_sample(cuda_sim, logits, seed=2**40 + 17, offset=12)
    c, _, _ = sim_sample(cuda_sim, logits, seed=0, offset=999, device_seed=[2**40 + 17, 4], offset_intragraph=8)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a, expected_tokens(logits, seed=2**40 + 17, offset=12))
    d, _, _ = sim_sample(cuda_sim, logits, seed=2**40 + 18, offset=12)
    e, _, _ = sim_sample(cuda_sim, logits, seed=2**40 + 17, offset=2**33 + 12)
    assert torch.equal(d, expected_tokens(logits, seed=2**40 + 18, offset=12))
    assert torch.equal(e, expected_tokens(logits, seed=2**40 + 17, offset=2**33 + 12))
    assert not torch.equal(a, d) and not torch.equal(a, e)


def _chi_square_p_value(counts, probs):
    """P(chi2 >= statistic) with len(probs) - 1 degrees of freedom."""
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(probs) - 1) / 2.0), torch.tensor(stat / 2.0)))


DIST_LOGITS = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5, float("-inf")])


def test_distribution_of_simulated_draws(cuda_sim):
    """160 rows in one launch (the simulator runs ~6 sampled rows a second), chi-square against the softmax at
    T = 1.3 (every expected count >= 8); the -inf token is never drawn. Fixed seed: deterministic."""
    n, t = 160, 1.3
    logits = DIST_LOGITS.repeat(n, 1)
    tokens, _, _ = sim_sample(cuda_sim, logits, temperature=t, seed=2024)
    probs = torch.softmax(DIST_LOGITS.double() / t, -1)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[5] == 0
    assert torch.equal(tokens, expected_tokens(logits, temperature=t, seed=2024))
    assert _chi_square_p_value(counts[:5], probs[:5]) > 1e-3


def test_distribution_of_the_replicated_draw():
    """200k draws of the host replica (the same draw as the kernel, checked above) against the softmax."""
    n, t = 200_000, 1.3
    z = (DIST_LOGITS / t).numpy().astype(np.float64)
    u = (
        philox_x(np.tile(np.arange(6), n), np.repeat(np.arange(n), 6), 3, 99).astype(np.float64) + 0.5
    ) * 2.3283064365386963e-10
    tokens = np.argmax((z[None, :] - np.log(-np.log(u)).reshape(n, 6)), axis=1)
    counts = torch.from_numpy(np.bincount(tokens, minlength=6)).double()
    probs = torch.softmax(DIST_LOGITS.double() / t, -1)
    assert counts[5] == 0
    assert _chi_square_p_value(counts[:5], probs[:5]) > 1e-3
