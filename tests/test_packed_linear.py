"""packed_linear / pack_linear_weight (CPU only): the packed layout against its twin, the products against F.linear
in float64, rows independent of their batch and of the thread count, opcheck, torch.compile, bad inputs."""

import os
import subprocess
import sys

import pytest
import torch

from rlhf_ext.ops import pack_linear_weight, packed_linear
from rlhf_ext.ops.reference import pack_linear_weight_reference, packed_linear_reference


def _data(M, K, N, seed=0, bias=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * scale
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b


def _oracle(x, w, b):
    """F.linear in float64, as float32: the exact product to one rounding."""
    return torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double()).float()


@pytest.mark.parametrize("N", [1, 15, 16, 17, 41, 1000])
@pytest.mark.parametrize("K", [1, 7, 256])
def test_pack_is_its_reference_exactly(N, K):
    _, w, _ = _data(1, K, N)
    packed = pack_linear_weight(w)
    assert packed.shape == (-(-N // 16), K, 16)
    assert torch.equal(packed, pack_linear_weight_reference(w))
    assert not packed[-1, :, N - 16 * (packed.shape[0] - 1) :].any()  # the padded outputs are zeros


@pytest.mark.parametrize(
    "M, K, N",
    [
        (1, 1, 1),
        (5, 7, 41),
        (9, 7, 41),
        (6, 33, 16),
        (7, 33, 17),
        (16, 256, 1000),
        (17, 64, 513),
        (40, 20, 33),
        (700, 100, 50),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_values_match_float64_linear(M, K, N, bias):
    x, w, b = _data(M, K, N, bias=bias)
    out = packed_linear(x, pack_linear_weight(w), N, b)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out, _oracle(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, packed_linear_reference(x, pack_linear_weight(w), N, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M, K, N", [(3, 423, 32000), (16, 256, 50257), (2, 64, 128256)])
def test_vocabulary_sized_outputs(M, K, N):
    x, w, b = _data(M, K, N, bias=True)
    torch.testing.assert_close(packed_linear(x, pack_linear_weight(w), N, b), _oracle(x, w, b), rtol=1e-5, atol=2e-5)


def test_leading_dimensions_are_kept():
    x, w, b = _data(12, 24, 40, bias=True)
    out = packed_linear(x.view(3, 4, 24), pack_linear_weight(w), 40, b)
    assert out.shape == (3, 4, 40)
    torch.testing.assert_close(out.view(12, 40), _oracle(x, w, b), rtol=1e-5, atol=1e-5)
    empty = packed_linear(torch.empty(0, 24), pack_linear_weight(w), 40)
    assert empty.shape == (0, 40)


def test_non_contiguous_input_and_weight():
    x, w, _ = _data(10, 48, 35)
    x_strided = x.t().contiguous().t()  # the same values, column-major
    assert not x_strided.is_contiguous()
    w_strided = w.t().contiguous().t()
    out = packed_linear(x_strided, pack_linear_weight(w_strided), 35)
    assert torch.equal(out, packed_linear(x, pack_linear_weight(w), 35))


def test_a_rows_logits_do_not_depend_on_the_rows_beside_it_or_the_threads():
    """Each output is one k-ordered sum: the same bits for any batch split (processes, chunks) and thread count."""
    x, w, b = _data(40, 96, 300, bias=True)
    packed = pack_linear_weight(w)
    full = packed_linear(x, packed, 300, b)
    for start, stop in [(0, 1), (3, 4), (0, 5), (7, 23), (16, 40), (39, 40)]:
        assert torch.equal(packed_linear(x[start:stop], packed, 300, b), full[start:stop]), (start, stop)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = packed_linear(x, packed, 300, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, full)


def test_extreme_and_non_finite_inputs_follow_linear():
    x, w, _ = _data(6, 16, 20)
    x = x * 1e4
    x[1, 3] = float("inf")
    x[4, 0] = float("nan")
    out = packed_linear(x, pack_linear_weight(w), 20)
    expected = _oracle(x, w, None)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-1)


def test_opcheck():
    x, w, b = _data(5, 7, 41, bias=True)
    packed = pack_linear_weight(w)
    torch.library.opcheck(torch.ops.rlhf_ext.pack_linear_weight, (w,))
    torch.library.opcheck(torch.ops.rlhf_ext.packed_linear, (x, packed, 41, b))
    torch.library.opcheck(torch.ops.rlhf_ext.packed_linear, (x, packed, 33, None))


def test_torch_compile_fullgraph():
    x, w, b = _data(4, 8, 20, bias=True)
    packed = pack_linear_weight(w)

    def head(hidden):
        return packed_linear(hidden, packed, 20, b) * 2

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), head(x))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda x, p: pack_linear_weight(torch.randn(4, 3, dtype=torch.float64)),
            TypeError,
            "weight: expected a float32",
        ),
        (lambda x, p: pack_linear_weight(torch.randn(4)), RuntimeError, r"weight: expected a 2-d tensor"),
        (lambda x, p: pack_linear_weight(torch.randn(0, 3)), RuntimeError, r"weight: expected out_features and"),
        (lambda x, p: pack_linear_weight([[1.0]]), TypeError, "weight: expected a torch.Tensor"),
        (lambda x, p: packed_linear(x.double(), p, 20), TypeError, "input: expected a float32"),
        (lambda x, p: packed_linear(x, p, 20, torch.randn(20).half()), TypeError, "bias: expected a float32"),
        (lambda x, p: packed_linear(x, p, 33), RuntimeError, r"out_features: expected a value .* \(17 to 32\), got 33"),
        (lambda x, p: packed_linear(x, p, 16), RuntimeError, r"out_features: .*got 16"),
        (lambda x, p: packed_linear(x, p, 20.0), TypeError, "out_features: expected an int"),
        (lambda x, p: packed_linear(x[:, :7], p, 20), RuntimeError, r"packed: expected in_features 7"),
        (lambda x, p: packed_linear(x, p.view(-1, 16), 20), RuntimeError, r"packed: expected a 3-d tensor"),
        (lambda x, p: packed_linear(x, p[..., :8], 20), RuntimeError, r"packed: expected shape \[panels"),
        (lambda x, p: packed_linear(x, p, 20, torch.randn(21)), RuntimeError, r"bias: expected shape \[20\]"),
        (lambda x, p: packed_linear(x, p.to("meta"), 20), RuntimeError, r"packed: expected a tensor on cpu"),
        (lambda x, p: packed_linear(x.requires_grad_(), p, 20), RuntimeError, r"input: requires grad, but"),
    ],
)
def test_bad_inputs_name_the_argument(call, error, match):
    x, w, _ = _data(3, 8, 20)
    with pytest.raises(error, match=match):
        call(x, pack_linear_weight(w))


def test_no_grad_call_with_parameters_works():
    layer = torch.nn.Linear(8, 20)
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = packed_linear(x, pack_linear_weight(layer.weight), 20, layer.bias)
    torch.testing.assert_close(out, _oracle(x, layer.weight.detach(), layer.bias.detach()), rtol=1e-5, atol=1e-5)


_ISA_SCRIPT = """
import sys, torch
from rlhf_ext.ops import pack_linear_weight, packed_linear
x, w, b = torch.load(sys.argv[1]).values()
torch.save(packed_linear(x, pack_linear_weight(w), w.shape[0], b), sys.argv[2])
"""


def test_baseline_kernel_agrees(tmp_path):
    """The portable tiles (no AVX2): what ATEN_CPU_CAPABILITY=default runs, in a fresh process."""
    x, w, b = _data(17, 70, 300, bias=True)
    torch.save({"x": x, "w": w, "b": b}, tmp_path / "case.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "case.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        timeout=120,
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), _oracle(x, w, b), rtol=1e-5, atol=1e-5)
