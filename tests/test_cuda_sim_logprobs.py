"""csrc/cuda/logprobs.cuh's launchers (forward, split-row + combine, backward, entropy, in-place backward) run on
the GPU simulator (tests/sim_harness.py, entry points in tests/cuda_sim/logprobs_sim.cu), against the CPU kernels
(torch.ops.rlhf_ext.* on CPU tensors, same inputs) and the float64 oracle (reference.gather_logprobs_reference).

Tolerances: forward values accumulate in float32 (float64 for float64 logits) on both devices, in a different
order and with __expf on the simulator (a few ulps for the terms that matter), so 1e-5 as in test_logprobs.py.
Gradients are written in the logits' dtype: test_logprobs.GRAD_TOL, with 1e-4 relative for float32 (__expf).
Rows at +-1e4: the float32 product x / T is rounded (ulp(1.4e4) ~ 1e-3) before the max or lse is subtracted,
differently on each device (fused or not), so their values and gradients get 2e-3 absolute, as
test_logprobs.test_gradients_at_extremes.
"""

import pytest
import torch

from rlhf_ext.ops.reference import gather_logprobs_reference
from tests.logprobs_helpers import GRAD_TOL

pytestmark = pytest.mark.cuda_sim

SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SENTINEL = 12345.0  # outputs start here, so an entry the kernel never wrote shows up as a mismatch
NAN, INF = float("nan"), float("inf")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(storage, view, table):
    """Entry-point arguments describing `view` (a view of the contiguous 1-D `storage`)."""
    assert view.stride(-1) == 1 and storage.dim() == 1 and storage.is_contiguous()
    offset = view.storage_offset() - storage.storage_offset()
    sizes = torch.tensor(view.shape[:-1], dtype=torch.int64)
    strides = torch.tensor(view.stride()[:-1], dtype=torch.int64)
    return (
        storage,
        storage.numel(),
        offset,
        len(view.shape) - 1,
        sizes,
        strides,
        _row_offsets(view) if table else None,
    )


def _row_offsets(view):
    """Each row's element offset from the view's first element, row-major over the leading dims (what the
    binding builds on the device for layouts with more than kMaxRowLevels levels)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(view.shape[:-1], view.stride()[:-1]):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return offsets.reshape(-1).contiguous()


def sim_forward(
    sim, storage, view, labels, temperature=1.0, ignore_index=-100, with_entropy=True, splits=0, table=False
):
    """launch_forward on the simulator -> (logprobs, entropy, lse) shaped like labels."""
    acc = _acc(view.dtype)
    out = [torch.full(labels.shape, SENTINEL, dtype=acc) for _ in range(3)]
    sim.library("logprobs").call(
        f"sim_logprobs_forward_{SUFFIX[view.dtype]}",
        *_layout(storage, view, table),
        labels.contiguous(),
        *out,
        view.shape[-1],
        float(temperature),
        ignore_index,
        int(with_entropy),
        splits,
    )
    return tuple(out)


def sim_backward(
    sim,
    storage,
    view,
    labels,
    lse,
    entropy,
    grad_logprobs,
    grad_entropy,
    temperature=1.0,
    ignore_index=-100,
    inplace=False,
    table=False,
):
    """launch_backward on the simulator -> the gradient shaped like view. In place, `storage` itself is updated."""
    grad = None if inplace else torch.full(view.shape, SENTINEL, dtype=view.dtype)
    sim.library("logprobs").call(
        f"sim_logprobs_backward_{SUFFIX[view.dtype]}",
        *_layout(storage, view, table),
        grad,
        labels.contiguous(),
        None if grad_logprobs is None else grad_logprobs.contiguous(),
        None if grad_entropy is None else grad_entropy.contiguous(),
        lse.contiguous(),
        entropy.contiguous(),
        view.shape[-1],
        float(temperature),
        ignore_index,
    )
    if inplace:
        return storage.as_strided(view.shape, view.stride(), view.storage_offset())
    return grad


def cpu_forward(view, labels, temperature=1.0, ignore_index=-100, with_entropy=True):
    return torch.ops.rlhf_ext.logprobs_forward(view, labels, float(temperature), ignore_index, with_entropy, False)


def _assert_same_nans(got, want):
    differ = (got.isnan() != want.isnan()).nonzero()
    assert differ.numel() == 0, (
        f"NaN differs at {differ.shape[0]} entries, first {differ[:5].tolist()}: "
        f"got {got[tuple(differ[0])]}, expected {want[tuple(differ[0])]}"
    )


def _close(got, want, **tol):
    _assert_same_nans(got, want)
    torch.testing.assert_close(got, want, equal_nan=True, **tol)


def _special_rows(dtype, V=1003, seed=0):
    """(logits [12, V], labels [12], rows whose values are at +-1e4): normal rows, +-1e4, a flat +1e4 row, one
    possible entry, a masked vocabulary with the label on a masked entry, NaN / +inf entries, an all -inf row,
    an ignored row holding NaN, an all-NaN row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, V, generator=g) * 3
    labels = torch.randint(0, V, (12,), generator=g)
    x[1] = (torch.rand(V, generator=g) * 2 - 1) * 1e4
    x[2] = 1e4
    x[3, 1:] = -INF
    labels[3] = 0
    x[4, ::3] = -INF
    labels[4] = min(3, V - 1)
    x[5, V // 2] = NAN
    x[6, 7 % V] = INF
    x[7] = -INF
    x[8, 2 % V] = NAN
    labels[8] = -100
    x[9] = NAN
    x[11, V - 1] = NAN  # in the V % vec tail
    return x.to(dtype), labels, [1, 2]


def _contiguous(x):
    storage = x.reshape(-1).clone()
    return storage, storage.view(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_cpu_and_oracle(cuda_sim, dtype):
    """One-block rows, forced split + combine, with and without entropy; special rows; odd V and tiny V."""
    for V in (1003, 5, 1):
        x, labels, extreme = _special_rows(dtype, V, seed=V)
        storage, view = _contiguous(x)
        want = cpu_forward(view, labels, 0.7)
        ref_lp, ref_ent = gather_logprobs_reference(view, labels, 0.7, return_entropy=True, dtype=torch.float64)
        finite = torch.isfinite(ref_lp) & torch.isfinite(ref_ent)
        finite[extreme] = False
        normal = torch.tensor([r not in extreme for r in range(12)])
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        for splits in (0, 3) if V > 100 else (0, 2):
            lp, ent, lse = sim_forward(cuda_sim, storage, view, labels, 0.7, splits=splits)
            assert lp.dtype == _acc(dtype)
            for got, w in zip((lp, ent, lse), want):
                _close(got[normal], w[normal], **tol)
                _close(got[~normal], w[~normal], rtol=1e-5, atol=2e-3 if dtype != torch.float64 else 1e-10)
            torch.testing.assert_close(lp[finite].double(), ref_lp[finite], **tol)
            torch.testing.assert_close(ent[finite].double(), ref_ent[finite], **tol)
            assert lp[8] == ent[8] == lse[8] == 0  # the ignored row, NaN inside
            if V < 100:
                continue  # the no-entropy variant once per path, on the long rows (each launch costs ~1-2 s)
            lp_only, zero_ent, lse_only = sim_forward(
                cuda_sim, storage, view, labels, 0.7, with_entropy=False, splits=splits
            )
            assert torch.equal(lp_only.nan_to_num(), lp.nan_to_num()) and torch.all(zero_ent == 0)
            assert torch.equal(lse_only.nan_to_num(), lse.nan_to_num())


def _grad_args(rows, acc, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, generator=g).to(acc), torch.randn(rows, generator=g).to(acc)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_cpu_and_oracle(cuda_sim, dtype):
    """Out-of-place and in-place, gradient through the log-probs, the entropy or both; special rows."""
    x, labels, extreme = _special_rows(dtype, 1003)
    lp, ent, lse = cpu_forward(x, labels, 0.7)
    a, b = _grad_args(12, lp.dtype)
    normal = torch.tensor([r not in extreme for r in range(12)])
    for gl, gh, inplace in [(a, b, False), (a, None, False), (None, b, True), (a, b, True)]:
        want = torch.ops.rlhf_ext.logprobs_backward(gl, gh, x, labels, lse, ent, 0.7, -100)
        storage, view = _contiguous(x)
        got = sim_backward(cuda_sim, storage, view, labels, lse, ent, gl, gh, 0.7, inplace=inplace)
        assert got.dtype == dtype
        tol = GRAD_TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-6)
        _close(got[normal], want[normal], **tol)
        _close(got[~normal], want[~normal], rtol=0, atol=2e-3 if dtype != torch.float64 else 1e-10)
        assert torch.all(got[8] == 0)  # ignored row
        # the oracle on the finite rows (labels on an allowed entry)
        rows = [0, 10]
        ref = x[rows].double().requires_grad_()
        rlp, rent = gather_logprobs_reference(ref, labels[rows], 0.7, return_entropy=True, dtype=torch.float64)
        loss = (rlp * (a[rows].double() if gl is not None else 0)).sum()
        loss = loss + (rent * (b[rows].double() if gh is not None else 0)).sum()
        loss.backward()
        torch.testing.assert_close(got[rows].double(), ref.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_propagates_like_cpu(cuda_sim, dtype):
    """A NaN logit anywhere (first entry, middle, the V % vec tail, the label) or a +inf one makes the row's
    log-prob, entropy, lse and every gradient entry NaN on CUDA as on CPU; other rows stay finite."""
    V = 37
    x = torch.randn(6, V, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([3, 3, 3, 3, 3, 3])
    x[0, 0], x[1, 17], x[2, V - 1], x[3, 3], x[4, 20] = NAN, NAN, NAN, NAN, INF
    x = x.to(dtype)
    want = cpu_forward(x, labels)
    a, b = _grad_args(6, torch.float32)
    want_grad = torch.ops.rlhf_ext.logprobs_backward(a, b, x, labels, want[2], want[1], 1.0, -100)
    assert want[0][:5].isnan().all() and want_grad[:5].isnan().all() and torch.isfinite(want_grad[5]).all()
    for splits in (1, 2):
        storage, view = _contiguous(x)
        got = sim_forward(cuda_sim, storage, view, labels, splits=splits)
        for g, w in zip(got, want):
            _close(g, w, rtol=1e-5, atol=1e-5)
    got_grad = sim_backward(cuda_sim, storage, view, labels, want[2], want[1], a, b)
    _close(got_grad, want_grad, **(GRAD_TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-6)))
    # a NaN logit with a finite saved lse (a backward fed from elsewhere): that entry's gradient is NaN
    finite_lse = want[2].nan_to_num(1.0)
    got_grad = sim_backward(cuda_sim, storage, view, labels, finite_lse, want[1].nan_to_num(1.0), a, b)
    assert got_grad[1, 17].isnan() and torch.isfinite(got_grad[1, :17]).all()


def _views(dtype, V=97):
    """(name, storage, view, table) for leading layouts of 1 to 7 strided levels; odd V, so most rows start
    off a 16-byte boundary. Views with more than kMaxRowLevels (6) levels need the offset table."""
    g = torch.Generator().manual_seed(7)

    def base(*shape):
        storage = (torch.randn(int(torch.tensor(shape).prod()), generator=g) * 3).to(dtype)
        return storage, storage.view(*shape)

    def gapped(levels):
        """[2] * levels + [V] rows with a one-element gap after each level: no two levels merge, and the
        storage stays small (the simulator's copies cost per byte)."""
        strides = [V + 1]
        for _ in range(levels - 1):
            strides.append(2 * strides[-1] + 1)
        storage, _ = base(1 + sum(strides) + V)
        return storage, storage.as_strided([2] * levels + [V], strides[::-1] + [1], 1)

    out = []
    s, b = base(3, 5, V)
    out.append(("contiguous", s, b, False))
    s, b = base(3, 7, V)
    out.append(("sliced [:, 1:-1]", s, b[:, 1:-1], False))
    s, b = base(3, 4, V)
    out.append(("transposed", s, b.transpose(0, 1), False))
    s, b = base(2, 3, 4, V)
    out.append(("three levels", s, b[:, 1:, 1:3], False))
    out.append(("six levels", *gapped(6), False))
    out.append(("seven levels, table", *gapped(7), True))
    return out


# float32 walks every layout; bfloat16 (2-byte rows: other 16-byte phases) the few-level ones, whose rows are
# cheap to simulate. float64 goes through the same row-layout code and is covered by the forward/backward tests.
LAYOUT_CASES = [(torch.float32, None), (torch.bfloat16, ("contiguous", "sliced [:, 1:-1]", "transposed"))]


@pytest.mark.parametrize("dtype, names", LAYOUT_CASES, ids=["float32", "bfloat16"])
def test_any_leading_layout_in_place(cuda_sim, dtype, names):
    """Forward, backward and in-place backward read (and write) any strided view in place, like the CPU
    kernels: the launcher's row layout (up to 6 levels) or an offset table; nothing outside the view changes."""
    for name, storage, view, table in _views(dtype):
        if names is not None and name not in names:
            continue
        labels = torch.randint(0, view.shape[-1], view.shape[:-1], generator=torch.Generator().manual_seed(1))
        labels.view(-1)[1] = -100
        want = cpu_forward(view, labels, 1.3)
        got = sim_forward(cuda_sim, storage, view, labels, 1.3, table=table)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        a, b = _grad_args(labels.numel(), want[0].dtype)
        a, b = a.view(labels.shape), b.view(labels.shape)
        tol = GRAD_TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-6)
        want_grad = torch.ops.rlhf_ext.logprobs_backward(a, b, view, labels, want[2], want[1], 1.3, -100)
        got_grad = sim_backward(cuda_sim, storage, view, labels, want[2], want[1], a, b, 1.3, table=table)
        torch.testing.assert_close(got_grad, want_grad, **tol, msg=lambda m: f"{name}: {m}")
        outside = torch.ones(storage.shape, dtype=torch.bool)
        outside.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(False)
        before = storage.clone()
        got_inplace = sim_backward(
            cuda_sim, storage, view, labels, want[2], want[1], a, b, 1.3, inplace=True, table=table
        )
        torch.testing.assert_close(got_inplace, want_grad, **tol, msg=lambda m: f"{name} in place: {m}")
        assert torch.equal(storage[outside], before[outside]), f"{name}: the in-place backward wrote outside the view"


def test_row_layout_levels_fall_back_to_a_table_beyond_six(cuda_sim):
    """make_row_layout refuses a layout needing 7 levels (the binding then builds the table), accepts 6."""
    _, storage, seven, _ = _views(torch.float32)[5]
    labels = torch.zeros(seven.shape[:-1], dtype=torch.int64)
    with pytest.raises(cuda_sim.CudaError, match="cudaErrorInvalidValue"):
        sim_forward(cuda_sim, storage, seven, labels, table=False)


@pytest.mark.parametrize(
    "dtype, V", [(torch.float32, 8209), (torch.bfloat16, 16411), (torch.float64, 4099), (torch.float16, 1001)], ids=str
)
def test_row_bits_do_not_depend_on_batch(cuda_sim, dtype, V):
    """The same row computed alone and inside batches of 2, 3 and 4 rows (at the last position, so at every
    16-byte phase: V is odd) gives bit-identical log-prob, entropy, lse and gradient; V is past one split
    (float16: one block per row, phases only)."""
    splits = torch.zeros(1, dtype=torch.int64)
    cuda_sim.library("logprobs").call("sim_logprobs_splits", V, torch.finfo(dtype).bits // 8, splits)
    assert (splits.item() > 1) == (dtype != torch.float16)  # the split + combine path, except float16 here
    g = torch.Generator().manual_seed(11)
    row = (torch.randn(V, generator=g) * 4).to(dtype)
    label = torch.tensor([5])
    results = []
    for batch in (1, 2, 3, 4):
        x = (torch.randn(batch, V, generator=g) * 4).to(dtype)
        x[-1] = row
        labels = torch.randint(0, V, (batch,), generator=g)
        labels[-1] = label
        storage, view = _contiguous(x)
        lp, ent, lse = sim_forward(cuda_sim, storage, view, labels, 0.9)
        a, b = torch.ones(batch, dtype=lp.dtype), torch.full((batch,), 0.5, dtype=lp.dtype)
        grad = sim_backward(cuda_sim, storage, view, labels, lse, ent, a, b, 0.9)
        results.append((lp[-1], ent[-1], lse[-1], grad[-1]))
    for batch, other in zip((2, 3, 4), results[1:]):
        for name, x, y in zip(("logprob", "entropy", "lse", "grad"), results[0], other):
            assert torch.equal(x, y), f"{name} of the row differs between batch 1 and batch {batch}: {x} vs {y}"
    want = cpu_forward(row.unsqueeze(0), label, 0.9)
    torch.testing.assert_close(results[0][0].reshape(1), want[0], rtol=1e-5, atol=1e-5)
