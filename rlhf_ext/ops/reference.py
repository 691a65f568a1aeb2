"""Plain-PyTorch twins of every rlhf_ext op: the test oracle and the benchmark baseline.

These are written the way RLHF frameworks write them today (Python loops over time, full
log-softmax, composed elementwise losses), for clarity, not speed. Never import them on a hot path.
"""

from typing import Optional

import torch

# ---- gae / whiten ----


def gae_reference(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    last_values: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Python reverse loop over time that TRL/veRL/OpenRLHF use, extended to skip masked
    positions (the next value and running advantage carry across them; outputs there are 0)."""
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r, v = rewards.to(out_dtype), values.to(out_dtype)
    m = mask.bool() if mask.dtype != torch.bool else mask
    B, T = r.shape
    next_value = last_values.to(out_dtype) if last_values is not None else r.new_zeros(B)
    running = r.new_zeros(B)
    advantages = torch.zeros_like(r)
    for t in reversed(range(T)):
        valid = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        new_running = delta + gamma * lam * running
        running = torch.where(valid, new_running, running)
        next_value = torch.where(valid, v[:, t], next_value)
        advantages[:, t] = torch.where(valid, running, torch.zeros_like(running))
    returns = torch.where(m, advantages + v, torch.zeros_like(v))
    return advantages, returns


def _masked_float(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as float32 (float64 for float64) with masked-out positions selected to 0 (never multiplied:
    inf * 0 there would be NaN), and the bool mask."""
    m = mask.bool() if mask.dtype != torch.bool else mask
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.where(m, xf, torch.zeros((), dtype=xf.dtype)), m


def masked_mean_reference(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    xf, m = _masked_float(x, mask)
    if dim is None:
        # Summed as deviations from one selected value: a constant input then has an exact mean (a rounded
        # one would leave deviations whose squares overflow in the variance).
        pivot = xf[m][0] if bool(m.any()) else xf.new_zeros(())
        return pivot + torch.where(m, xf - pivot, torch.zeros_like(xf)).sum() / m.sum()
    return xf.sum(dim) / m.to(xf.dtype).sum(dim)


def masked_var_reference(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    xf, m = _masked_float(x, mask)
    mean = masked_mean_reference(xf, m)
    var = torch.where(m, (xf - mean) ** 2, torch.zeros_like(xf)).sum()
    n = m.sum()
    return var / (n - 1) if unbiased else var / n


def masked_whiten_reference(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = True
) -> torch.Tensor:
    xf, m = _masked_float(x, mask)
    mean = masked_mean_reference(xf, m)
    var = masked_var_reference(xf, m, unbiased)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(m, y, torch.zeros((), dtype=y.dtype))


# ---- logprobs ----


def gather_logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    dtype: Optional[torch.dtype] = None,
):
    """Full log-softmax, gather, entropy from the same [..., V] log-probs, computed in `dtype`
    (default: float32, or float64 for float64 logits; pass torch.float64 for an oracle).
    ignore_index rows give 0. Differentiable; materialises several [..., V] temporaries."""
    dtype = dtype or (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    # An ignored row's logits never reach the maths (a NaN there would come back through log_softmax's backward
    # as a NaN gradient, 0 * NaN): it gives 0 and a zero gradient, like the kernels.
    x = torch.where(valid.unsqueeze(-1), logits.to(dtype), torch.zeros((), dtype=dtype, device=logits.device))
    logp = torch.log_softmax(x / temperature, dim=-1)  # (..., V)
    logprobs = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    if not return_entropy:
        return logprobs
    # p * log p with p = 0 (a -inf logit) contributes 0, not 0 * -inf (in value and in gradient).
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logprobs, entropy


def gather_logprobs_eager(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """What most RLHF code writes today: a full [..., V] float32 log_softmax, then one gather
    (float32 logits at temperature 1 are not copied first)."""
    x = logits.float()
    logp = torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def gather_logprobs_rowloop(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The memory-saving approach TRL uses (`selective_log_softmax`): the label logit minus a
    logsumexp taken one row at a time, so only one [V] temporary is alive beyond the logits
    (for bf16/fp16 a per-row log_softmax, where logsumexp would lose precision)."""
    x = logits / temperature if temperature != 1.0 else logits
    if x.dtype in (torch.float32, torch.float64):
        label_logits = x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in x])
        return label_logits - lse
    out = []
    for row_logits, row_labels in zip(x, labels):
        row_logp = torch.log_softmax(row_logits.float(), dim=-1)
        out.append(row_logp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    dtype: Optional[torch.dtype] = None,
):
    """`gather_logprobs_reference(hidden @ weight.T + bias, ...)` with the full logits materialised."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return gather_logprobs_reference(logits, labels, temperature, ignore_index, return_entropy, dtype)


# ---- ppo_loss ----


def _ppo_dtype(*tensors) -> torch.dtype:
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}:
        return dtypes.pop()
    return torch.float64 if torch.float64 in dtypes else torch.float32


def k3_reference(e: torch.Tensor) -> torch.Tensor:
    """exp(e) - 1 - e, computed in float64 and returned in e's dtype. (exp(e) - e) - 1, and even expm1(e) - e,
    cancel for small |e| (about log2(2 / |e|) bits lost: all of float32's near 1e-7), so below |e| = 1e-2 the
    series e^2 (1/2 + e/6 + e^2/24 + ...) is used (truncation < 1e-16 relative there)."""
    e64 = e.double()
    series = e64 * e64 * (1 / 2 + e64 * (1 / 6 + e64 * (1 / 24 + e64 * (1 / 120 + e64 * (1 / 720 + e64 / 5040)))))
    return torch.where(e64.abs() < 1e-2, series, torch.expm1(e64) - e64).to(e.dtype)


class _SaturatingCast(torch.autograd.Function):
    """`x.to(dtype)` whose backward saturates the gradient at the largest finite value of x's dtype instead of
    overflowing to inf (a float16 log-prob's gradient can exceed 65504 where the float32 loss is finite), as
    the fused kernels do; infinite gradients stay infinite."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        if grad.dtype != ctx.dtype:
            big = torch.finfo(ctx.dtype).max
            grad = torch.where(grad.isinf(), grad, grad.clamp(-big, big))
        return grad.to(ctx.dtype), None


def kl_penalty_reference(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", *, max_log_ratio: float = 20.0
) -> torch.Tensor:
    """k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (with -d clamped), d = logprobs - ref_logprobs."""
    dt = _ppo_dtype(logprobs, ref_logprobs)
    lp, ref = logprobs.to(dt), ref_logprobs.to(dt)
    if estimator == "k1":
        return lp - ref
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    if estimator == "k3":
        return k3_reference(torch.clamp(ref - lp, -max_log_ratio, max_log_ratio))
    raise ValueError(f"estimator: expected one of 'k1', 'k2', 'k3', got {estimator!r}")


def ppo_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: Optional[torch.Tensor] = None,
    old_values: Optional[torch.Tensor] = None,
    returns: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    cliprange: float = 0.2,
    cliprange_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    cliprange_value: Optional[float] = 0.2,
    vf_coef: float = 0.1,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    loss_agg: str = "token-mean",
    loss_agg_norm: Optional[float] = None,
    max_log_ratio: float = 20.0,
):
    """The elementwise composition TRL / veRL / OpenRLHF write, with the semantics of
    `rlhf_ext.ops.ppo_loss` (same signature and output; autograd gives the gradients)."""
    from rlhf_ext.ops.ppo_loss import PPOLossOutput

    dt = _ppo_dtype(logprobs, old_logprobs, advantages, values, old_values, returns, ref_logprobs, entropy)
    m = mask.bool() if mask.dtype != torch.bool else mask
    mf = m.to(dt)
    n_tokens = mf.sum()
    row_tokens = mf.sum(-1)
    n_seqs = (row_tokens > 0).to(dt).sum()

    def agg(x):  # (B, T) -> 0-dim, masked positions selected away
        x = torch.where(m, x, torch.zeros_like(x))
        if loss_agg == "token-mean":
            return x.sum() / n_tokens.clamp(min=1)
        if loss_agg == "seq-mean-token-mean":
            per_row = x.sum(-1) / row_tokens.clamp(min=1)
        elif loss_agg == "seq-mean-token-sum":
            per_row = x.sum(-1)
        elif loss_agg == "seq-mean-token-sum-norm":
            per_row = x.sum(-1) / (loss_agg_norm if loss_agg_norm is not None else m.shape[-1])
        else:
            raise ValueError(f"loss_agg: unknown {loss_agg!r}")
        return per_row.sum() / n_seqs.clamp(min=1)

    def token_mean(x):
        return torch.where(m, x.to(dt), torch.zeros((), dtype=dt)).sum() / n_tokens.clamp(min=1)

    # Masked positions (padding, possibly inf/NaN) are replaced before any arithmetic, so that no 0 * inf
    # reaches a value or a gradient (the kernels never read them).
    def valid(t):
        return torch.where(m, t, torch.zeros((), dtype=dt))

    lp = valid(_SaturatingCast.apply(logprobs, dt))
    old, adv = valid(old_logprobs.to(dt)), valid(advantages.to(dt))
    log_ratio = torch.clamp(lp - old, -max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    low, high = 1 - cliprange, 1 + (cliprange if cliprange_high is None else cliprange_high)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, low, high)
    pg = torch.maximum(pg1, pg2)
    zero = torch.zeros((), dtype=dt)
    dual_capped = torch.zeros_like(m)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        dual_capped = (adv < 0) & (pg > pg3)
        pg = torch.where(adv < 0, torch.minimum(pg3, pg), pg)
    clipped = pg2 > pg1
    policy_loss = agg(pg)

    value_loss, value_clipped = zero, torch.zeros_like(m)
    if values is not None:
        v, v_old, ret = valid(_SaturatingCast.apply(values, dt)), valid(old_values.to(dt)), valid(returns.to(dt))
        if cliprange_value is None:
            vf = 0.5 * (v - ret) ** 2
        else:
            vf1 = (v - ret) ** 2
            vf2 = (torch.clamp(v, v_old - cliprange_value, v_old + cliprange_value) - ret) ** 2
            vf = 0.5 * torch.maximum(vf1, vf2)
            value_clipped = vf2 > vf1
        value_loss = agg(vf)

    kl = (
        agg(kl_penalty_reference(lp, valid(ref_logprobs.to(dt)), kl_estimator, max_log_ratio=max_log_ratio))
        if ref_logprobs is not None
        else zero
    )
    ent = agg(valid(_SaturatingCast.apply(entropy, dt))) if entropy is not None else zero
    loss = policy_loss + vf_coef * value_loss + kl_coef * kl - entropy_coef * ent

    with torch.no_grad():
        stats = {
            "clipfrac": token_mean(clipped),
            "clipfrac_low": token_mean(clipped & (ratio < low)),
            "clipfrac_high": token_mean(clipped & (ratio > high)),
            "dual_clipfrac": token_mean(dual_capped),
            "approxkl": token_mean(0.5 * log_ratio**2),
            "approxkl_k3": token_mean(k3_reference(log_ratio)),
            "ratio_mean": token_mean(ratio),
            "ratio_max": torch.where(m, ratio, zero).max() if m.numel() else zero,
            "value_clipfrac": token_mean(value_clipped),
            "num_tokens": n_tokens,
            "num_seqs": n_seqs,
        }
    return PPOLossOutput(
        loss,
        policy_loss.detach(),
        value_loss.detach(),
        kl.detach(),
        ent.detach(),
        {k: v.detach() for k, v in stats.items()},
    )


# ---- sampling ----


def _per_row(value, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return (
            value.to(device=device, dtype=dtype).reshape(-1).expand(batch)
            if value.dim() == 0
            else value.to(device, dtype)
        )
    return torch.full((batch,), value, dtype=dtype, device=device)


def filtered_probs_reference(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Renormalised sampling distribution `[B, V]` (float64) after temperature, top-k, top-p and min-p, with
    full sorts as Hugging Face's warpers do, and the documented tie rule of `rlhf_ext.ops.sample`: every token
    tied with the last kept one stays. Greedy rows (temperature 0) are a point mass on the first argmax."""
    B, V = logits.shape
    device = logits.device
    temps = _per_row(temperature, B, torch.float32, device)
    ks = _per_row(top_k, B, torch.long, device)
    ps = _per_row(top_p, B, torch.float64, device)
    mps = _per_row(min_p, B, torch.float32, device)
    greedy = temps == 0
    z = logits.float() / torch.where(greedy, torch.ones_like(temps), temps)[:, None]  # (B, V) float32
    neg_inf = torch.tensor(float("-inf"), device=device)
    # top-k: keep z >= the k-th largest value
    k_on = (ks > 0) & (ks < V)
    if bool(k_on.any()):
        kth = torch.sort(z, dim=-1, descending=True).values.gather(1, (ks.clamp(1, V) - 1)[:, None])
        z = torch.where(k_on[:, None] & (z < kth), neg_inf, z)
    # top-p on the renormalised top-k set: keep i iff the mass strictly above it is < top_p
    p_on = ps < 1
    if bool(p_on.any()):
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z.double(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        kept_sorted = mass_before < ps[:, None]
        last_kept = kept_sorted.sum(-1, keepdim=True) - 1  # kept_sorted is a prefix
        tau = sorted_z.gather(1, last_kept)
        z = torch.where(p_on[:, None] & (z < tau), neg_inf, z)
    # min-p relative to the most likely token
    m_on = mps > 0
    if bool(m_on.any()):
        rel = torch.exp(z - z.max(dim=-1, keepdim=True).values)
        z = torch.where(m_on[:, None] & (rel < mps[:, None]), neg_inf, z)
    probs = torch.softmax(z.double(), dim=-1)
    if bool(greedy.any()):
        point = torch.zeros_like(probs).scatter_(1, logits.float().argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], point, probs)
    return probs


def sample_reference(
    logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """What HF sampling does: sort-based filtering, then torch.multinomial. Returns (tokens [B], logprobs [B])
    with logprobs = log_softmax(logits / T)[token] (T = 1 for greedy rows)."""
    B = logits.shape[0]
    probs = filtered_probs_reference(logits, temperature, top_k, top_p, min_p)
    tokens = torch.multinomial(probs.float(), 1, generator=generator).squeeze(1)
    temps = _per_row(temperature, B, torch.float32, logits.device)
    z = logits.float() / torch.where(temps == 0, torch.ones_like(temps), temps)[:, None]
    logprobs = torch.log_softmax(z, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


# ---- packed_linear ----


def pack_linear_weight_reference(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> [ceil(N / 16), K, 16]: panels of 16 output features, k-major, the last one zero-padded."""
    N, K = weight.shape
    panels = -(-N // 16)
    padded = weight.new_zeros(panels * 16, K)
    padded[:N] = weight
    return padded.view(panels, 16, K).transpose(1, 2).contiguous()


def packed_linear_reference(
    input: torch.Tensor, packed: torch.Tensor, out_features: int, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """F.linear with the weight unpacked from `packed` (rows beyond out_features dropped)."""
    panels, K, width = packed.shape
    weight = packed.transpose(1, 2).reshape(panels * width, K)[:out_features]
    return torch.nn.functional.linear(input, weight, bias)


# ---- decode_step ----


def pack_decoder_layer_reference(
    input_norm: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    post_norm: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> list:
    """[input_norm, pack(q; k; v), pack(o), post_norm, pack(gate; up), pack(down)], packed by the reference."""
    return [
        input_norm,
        pack_linear_weight_reference(torch.cat([q, k, v])),
        pack_linear_weight_reference(o),
        post_norm,
        pack_linear_weight_reference(torch.cat([gate, up])),
        pack_linear_weight_reference(down),
    ]


def decode_step_reference(
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_mask: torch.Tensor,
    slot: int,
    weights: list,
    final_norm: torch.Tensor,
    num_heads: int,
    eps: float,
    scaling: float,
) -> torch.Tensor:
    """transformers' Llama decoder layers for one token per row, as eager ops: RMSNorm, q/k/v, rotary embedding,
    the cache write at `slot`, softmax attention over the slots 0 .. slot that key_mask keeps (grouped-query heads
    repeated), o and the residual, RMSNorm, down(silu(gate) * up) and the residual; then the final RMSNorm."""
    B, H = hidden.shape
    D = cos.shape[1]
    layers, _, kv_heads = key_cache.shape[:3]
    inter = weights[5].shape[1]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotary(x):  # (B, heads, D)
        rotated = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1)
        return x * cos[:, None] + rotated * sin[:, None]

    h = hidden
    for layer in range(layers):
        norm1, qkv_w, o_w, norm2, gate_up_w, down_w = weights[6 * layer : 6 * layer + 6]
        qkv = packed_linear_reference(rms(h, norm1), qkv_w, (num_heads + 2 * kv_heads) * D)
        q, k, v = qkv.split([num_heads * D, kv_heads * D, kv_heads * D], dim=1)
        q, k = rotary(q.view(B, num_heads, D)), rotary(k.view(B, kv_heads, D))
        key_cache[layer, :, :, slot] = k
        value_cache[layer, :, :, slot] = v.view(B, kv_heads, D)
        keys = key_cache[layer, :, :, : slot + 1].repeat_interleave(num_heads // kv_heads, dim=1)
        values = value_cache[layer, :, :, : slot + 1].repeat_interleave(num_heads // kv_heads, dim=1)
        scores = torch.einsum("bhd,bhnd->bhn", q, keys) * scaling
        attend = key_mask[:, None, : slot + 1].clone()
        attend[..., slot] = True
        probs = torch.softmax(scores.masked_fill(~attend, float("-inf")), dim=-1)
        attn = torch.einsum("bhn,bhnd->bhd", probs, values).reshape(B, num_heads * D)
        h = h + packed_linear_reference(attn, o_w, H)
        gate, up = packed_linear_reference(rms(h, norm2), gate_up_w, 2 * inter).split([inter, inter], dim=1)
        h = h + packed_linear_reference(torch.nn.functional.silu(gate) * up, down_w, H)
    return rms(h, final_norm)
