"""Fused sampler: distributions against the sort-based reference, membership of the kept set, log-probs,
reproducibility, greedy, and bad inputs."""

import math

import pytest
import torch

import rlhf_ext  # noqa: F401  (loads the kernels)
from rlhf_ext.ops import sample
from rlhf_ext.ops.reference import filtered_probs_reference, sample_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tv_bound(probs: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """A (1 - delta) upper bound on the total-variation distance between the empirical distribution of n draws
    and probs: E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n) (Jensen), and TV moves by at most 1/n when one draw
    changes, so McDiarmid adds sqrt(ln(1/delta) / (2 n))."""
    p = probs.double()
    expected = 0.5 * torch.sqrt(p * (1 - p) / n).sum().item()
    return expected + math.sqrt(math.log(1 / delta) / (2 * n))


def draw(row: torch.Tensor, n: int, seed: int, **settings) -> torch.Tensor:
    logits = row[None].expand(n, -1).contiguous()
    tokens, _ = sample(logits, generator=torch.Generator().manual_seed(seed), **settings)
    return tokens


# Distribution cases: (settings, logits). 10 cases x 150k draws = 1.5M draws in total.
_base = torch.randn(24, generator=torch.Generator().manual_seed(3)) * 1.5
_ties = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.5, 0.0, -1.0, -2.0, float("-inf"), -0.5])
_peaked = torch.tensor([4.0, 3.5, 1.0, 0.9, 0.2, 0.0, -0.3, -1.0, -2.0, -3.0, float("-inf"), float("-inf")] * 3)
# V = 256 (four blocks of 64) with the high tokens in different blocks: the kernel bounds the kept set from
# block maxima here, while the V <= 64 rows above take its histogram route.
_spread = torch.randn(256, generator=torch.Generator().manual_seed(4)) * 0.5 - 4.0
_spread[[5, 70, 140, 200, 201, 30]] = torch.tensor([3.0, 2.6, 2.2, 2.0, 1.0, 1.5])
DIST_CASES = [
    ("top-k block bound", dict(top_k=3), _spread),
    ("top-p block bound", dict(top_p=0.6, temperature=1.2), _spread),
    ("plain T=1", dict(), _base),
    ("plain T=0.5", dict(temperature=0.5), _base),
    ("plain T=2 with -inf", dict(temperature=2.0), _peaked),
    ("top-k ties", dict(top_k=2), _ties),
    ("top-k", dict(top_k=7, temperature=0.8), _base),
    ("top-p", dict(top_p=0.7), _base),
    ("min-p", dict(min_p=0.15, temperature=1.3), _peaked),
    ("combined", dict(top_k=9, top_p=0.8, min_p=0.05, temperature=0.7), _base),
]


@pytest.mark.parametrize("name,settings,row", DIST_CASES, ids=[c[0] for c in DIST_CASES])
def test_distribution_matches_reference(name, settings, row):
    n = 150_000
    tokens = draw(row, n, seed=11, **settings)
    probs = filtered_probs_reference(row[None], **settings)[0]
    freq = torch.bincount(tokens, minlength=row.numel()).double() / n
    assert freq[probs == 0].sum().item() == 0, f"{name}: drew a token the filters remove"
    tv = 0.5 * (freq - probs).abs().sum().item()
    assert tv < tv_bound(probs, n), f"{name}: TV {tv:.4f} >= bound {tv_bound(probs, n):.4f}"


def test_per_row_settings_distribution():
    # Two halves of one batch with different per-row settings, checked against their own references.
    n = 100_000
    row = _base
    logits = row[None].expand(2 * n, -1).contiguous()
    temps = torch.cat([torch.full((n,), 0.6), torch.full((n,), 1.5)])
    ks = torch.cat([torch.full((n,), 5), torch.zeros(n, dtype=torch.long)])
    ps = torch.cat([torch.ones(n), torch.full((n,), 0.6)])
    tokens, _ = sample(logits, temps, ks, ps, generator=torch.Generator().manual_seed(5))
    for half, settings in (
        (slice(0, n), dict(temperature=0.6, top_k=5)),
        (slice(n, 2 * n), dict(temperature=1.5, top_p=0.6)),
    ):
        probs = filtered_probs_reference(row[None], **settings)[0]
        freq = torch.bincount(tokens[half], minlength=row.numel()).double() / n
        assert freq[probs == 0].sum() == 0
        assert 0.5 * (freq - probs).abs().sum().item() < tv_bound(probs, n)


@pytest.mark.parametrize(
    "settings",
    [
        dict(top_k=50),
        dict(top_p=0.9),
        dict(min_p=0.05),
        dict(top_k=50, top_p=0.9, temperature=0.7),
        dict(top_k=1000, top_p=0.95, min_p=0.01, temperature=1.3),
        dict(top_p=0.5, temperature=3.0),
    ],
)
def test_membership_large_vocab(settings):
    gen = torch.Generator().manual_seed(7)
    B, V = 64, 32000
    for _ in range(4):
        logits = torch.randn(B, V, generator=gen) * 3
        banned = torch.rand(B, V, generator=gen) < 0.3
        logits[banned] = float("-inf")
        logits[0, 0], logits[0, 1:] = 0.5, float("-inf")  # a row with a single finite logit
        tokens, logprobs, filtered = sample(logits, generator=gen, return_filtered_logprobs=True, **settings)
        probs = filtered_probs_reference(logits, **settings)
        picked = probs.gather(1, tokens[:, None]).squeeze(1)
        assert (picked > 0).all(), "a token outside the reference's kept set was drawn"
        assert torch.isfinite(logits.gather(1, tokens[:, None])).all(), "a -inf logit was drawn"
        assert tokens[0] == 0
        torch.testing.assert_close(filtered, picked.log().float(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 2.5])
def test_logprobs_equal_reference(dtype, temperature):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(9, 50257, generator=gen) * 4).to(dtype)
    tokens, logprobs, filtered = sample(
        logits, temperature, top_k=40, top_p=0.95, generator=gen, return_filtered_logprobs=True
    )
    t = temperature if temperature > 0 else 1.0
    ref = torch.log_softmax(logits.float() / t, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, ref, atol=2e-5, rtol=1e-5)
    assert logprobs.dtype == torch.float32 and tokens.dtype == torch.long
    if temperature == 0:
        assert torch.equal(tokens, logits.float().argmax(-1))
        assert (filtered == 0).all()
    else:
        probs = filtered_probs_reference(logits, temperature, 40, 0.95)
        torch.testing.assert_close(
            filtered, probs.gather(1, tokens[:, None]).squeeze(1).log().float(), atol=2e-5, rtol=1e-5
        )


def test_greedy_ties_and_per_row_temperature():
    logits = torch.tensor([[1.0, 5.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 9.0, 9.0]])
    temps = torch.tensor([0.0, 0.0, 0.0])
    tokens, logprobs = sample(logits, temps)
    assert tokens.tolist() == [1, 0, 2]  # first argmax, as torch.argmax
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))
    # top_k = 1 samples among the tokens tied for the max; temperature 0 in one row only
    tokens, _ = sample(logits.repeat(200, 1), torch.tensor([0.0, 1.0, 1.0] * 200), top_k=1)
    assert set(tokens[0::3].tolist()) == {1}
    assert set(tokens[2::3].tolist()) == {2, 3}


def test_reproducible_and_thread_independent():
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(0)) * 2
    kw = dict(temperature=0.9, top_k=100, top_p=0.9)
    a, la = sample(logits, generator=torch.Generator().manual_seed(123), **kw)
    b, lb = sample(logits, generator=torch.Generator().manual_seed(123), **kw)
    c, _ = sample(logits, generator=torch.Generator().manual_seed(124), **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        d, _ = sample(logits, generator=torch.Generator().manual_seed(123), **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(a, d)
    assert not torch.equal(a, c)
    torch.manual_seed(9)
    e, _ = sample(logits, **kw)
    torch.manual_seed(9)
    f, _ = sample(logits, **kw)
    assert torch.equal(e, f)
    # The generator advances: two successive draws differ.
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(sample(logits, generator=g, **kw)[0], sample(logits, generator=g, **kw)[0])


def test_strided_logits_and_empty_batch():
    full = torch.randn(4, 3, 1000)
    last = full[:, -1, :]  # (B, V) with a row stride of 3000
    a, _ = sample(last, 0.0)
    assert torch.equal(a, last.argmax(-1))
    tokens, logprobs = sample(torch.randn(0, 10))
    assert tokens.shape == (0,) and logprobs.shape == (0,)


def test_matches_sort_based_reference_sampler_marginals():
    # The baseline (sort + multinomial) and the op agree in distribution on the same logits.
    row = _base
    n = 100_000
    kw = dict(temperature=0.8, top_k=10, top_p=0.9)
    ref_tokens, ref_lp = sample_reference(row[None].expand(n, -1), generator=torch.Generator().manual_seed(2), **kw)
    op_tokens = draw(row, n, seed=3, **kw)
    f_ref = torch.bincount(ref_tokens, minlength=row.numel()).double() / n
    f_op = torch.bincount(op_tokens, minlength=row.numel()).double() / n
    probs = filtered_probs_reference(row[None], **kw)[0]
    assert 0.5 * (f_ref - f_op).abs().sum().item() < 2 * tv_bound(probs, n)


def test_opcheck_and_compile():
    logits = torch.randn(5, 300)
    # Greedy is deterministic, so every opcheck utility applies; sampling runs the schema and fake-tensor checks.
    torch.library.opcheck(torch.ops.rlhf_ext.sample.default, (logits, 0.0, 0, 1.0, 0.0, None, None, None, None, None))
    torch.library.opcheck(
        torch.ops.rlhf_ext.sample.default,
        (logits, 0.8, 20, 0.9, 0.0, None, None, None, None, torch.Generator().manual_seed(0)),
        test_utils=("test_schema", "test_faketensor"),
    )
    compiled = torch.compile(lambda x: sample(x, 0.0), fullgraph=True)
    assert torch.equal(compiled(logits)[0], logits.argmax(-1))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: sample(x.unsqueeze(0)), "2-d tensor"),
        (lambda x: sample(x.long()), "float32/bfloat16/float16"),
        (lambda x: sample(x, top_p=0.0), "top_p"),
        (lambda x: sample(x, top_p=1.5), "top_p"),
        (lambda x: sample(x, top_k=-1), "top_k"),
        (lambda x: sample(x, top_k=2.5), "top_k"),
        (lambda x: sample(x, min_p=1.5), "min_p"),
        (lambda x: sample(x, temperature=-1.0), "temperature"),
        (lambda x: sample(x, temperature=float("nan")), "temperature"),
        (lambda x: sample(x, top_p=torch.tensor([0.5, 0.0, 1.0])), "top_p.*row 1"),
        (lambda x: sample(x, top_k=torch.tensor([1.0, 2.0, 3.0])), "integer"),
        (lambda x: sample(x, temperature=torch.ones(4)), r"shape \[3\]"),
        (lambda x: sample(x, min_p=torch.tensor([0.0, 0.1, -0.1])), "min_p.*row 2"),
    ],
)
def test_bad_inputs(call, match):
    x = torch.randn(3, 10)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        call(x)


@pytest.mark.parametrize("value,match", [(float("nan"), "row 1 contains NaN"), (float("inf"), r"row 1 contains \+inf")])
def test_non_finite_rows_raise(value, match):
    x = torch.randn(3, 10)
    x[1, 4] = value
    with pytest.raises(RuntimeError, match=match):
        sample(x)
    with pytest.raises(RuntimeError, match=match):
        sample(x, 0.0)
    x = torch.randn(3, 10)
    x[2] = float("-inf")
    with pytest.raises(RuntimeError, match="row 2 has no finite logit"):
        sample(x, top_k=3)


@pytest.mark.parametrize("top_k", [2**63, 10**30, -(2**63) - 1])
def test_top_k_beyond_int64_is_named(top_k):
    with pytest.raises(ValueError, match=r"top_k: expected an integer in \[0, 2\*\*63 - 1\] \(0 = off\), got"):
        sample(torch.randn(3, 10), top_k=top_k)
    tokens, _ = sample(torch.randn(3, 10), top_k=2**63 - 1)  # the largest valid value: top-k off
    assert tokens.shape == (3,)


@pytest.mark.parametrize("temperature", [1e-45, 1e-46, torch.tensor([1.0, 1e-45, 1.0])])
def test_overflowing_temperature_is_blamed_not_the_logits(temperature):
    # logits / 1e-45 overflows float32 (1e-46 even rounds to 0): the logits are fine, the temperature is not.
    row = 1 if isinstance(temperature, torch.Tensor) else 0
    with pytest.raises((RuntimeError, ValueError), match=rf"^temperature: .*in row {row}"):
        sample(torch.randn(3, 10), temperature)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_distribution_and_membership(dtype):
    row = _base
    n = 200_000
    for settings in (dict(), dict(top_k=7, temperature=0.8), dict(top_p=0.7), dict(top_k=9, top_p=0.8, min_p=0.05)):
        logits = row[None].expand(n, -1).to("cuda", dtype)
        tokens, logprobs = sample(logits, generator=torch.Generator("cuda").manual_seed(1), **settings)
        probs = filtered_probs_reference(row[None].to(dtype), **settings)[0]
        freq = torch.bincount(tokens.cpu(), minlength=row.numel()).double() / n
        assert freq[probs == 0].sum() == 0
        assert 0.5 * (freq - probs).abs().sum().item() < tv_bound(probs, n)
        t = settings.get("temperature", 1.0)
        ref = torch.log_softmax(logits.float() / t, -1).gather(1, tokens[:, None]).squeeze(1)
        torch.testing.assert_close(logprobs, ref, atol=1e-4, rtol=1e-4)
    big = torch.randn(64, 128256, device="cuda") * 3
    tokens, _ = sample(big, top_k=50, top_p=0.9, generator=torch.Generator("cuda").manual_seed(0))
    assert (filtered_probs_reference(big, 1.0, 50, 0.9).gather(1, tokens[:, None]) > 0).all()
    a, _ = sample(big, top_p=0.9, generator=torch.Generator("cuda").manual_seed(4))
    b, _ = sample(big, top_p=0.9, generator=torch.Generator("cuda").manual_seed(4))
    assert torch.equal(a, b)
    assert torch.equal(sample(big, 0.0)[0], big.argmax(-1))


@pytest.mark.cuda
def test_cuda_graph_capture_replays_fresh_draws():
    logits = torch.randn(32, 32000, device="cuda") * 2
    gen = torch.Generator("cuda").manual_seed(0)
    sample(logits, top_k=50, top_p=0.9, generator=gen)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, _ = sample(logits, top_k=50, top_p=0.9)
    graph.replay()
    first = tokens.clone()
    graph.replay()
    assert not torch.equal(first, tokens), "replays must advance the Philox offset"
    assert (filtered_probs_reference(logits, 1.0, 50, 0.9).gather(1, tokens[:, None]) > 0).all()
