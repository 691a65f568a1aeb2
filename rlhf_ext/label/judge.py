"""`label judge`: a local causal LM as an AI labeller.

For each pair the template is filled twice: completion_a as response A and completion_b as B, then the
other way round. In each order we read the judge's log-probability of answering "A" and "B" (the whole
answer continuation, so multi-token answers work too). With

    d_ab = logp(A) - logp(B)   when completion_a is shown as A   (> 0 favours completion_a)
    d_ba = logp(B) - logp(A)   when completion_b is shown as A   (> 0 favours completion_a)

the judge's preference is s = (d_ab + d_ba) / 2 and P(completion_a better) = sigmoid(s). A constant pull
towards one slot adds +c to d_ab and -c to d_ba, so it cancels exactly; (d_ab - d_ba) / 2 is reported as
the measured position bias.
"""

import math

DEFAULT_TEMPLATE = (
    "Below are a prompt and two responses to it. Decide which response is better: more helpful, "
    "correct and harmless.\n\n"
    "Prompt:\n{prompt}\n\n"
    "Response A:\n{response_a}\n\n"
    "Response B:\n{response_b}\n\n"
    "Which response is better? Answer with A or B.\nAnswer:"
)
PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")


def check_template(template: str) -> str:
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise ValueError(f"the judge template must contain {', '.join(PLACEHOLDERS)}; missing {', '.join(missing)}")
    return template


def fill(template: str, prompt: str, response_a: str, response_b: str) -> str:
    # plain replacement in one pass, not str.format: templates and completions may hold braces, and a
    # completion containing "{response_b}" must not be expanded
    parts = {"{prompt}": prompt, "{response_a}": response_a, "{response_b}": response_b}
    out, i = [], 0
    while i < len(template):
        for key, value in parts.items():
            if template.startswith(key, i):
                out.append(value)
                i += len(key)
                break
        else:
            out.append(template[i])
            i += 1
    return "".join(out)


def answer_logprobs(model, tokenizer, texts, answers, *, max_length=None):
    """(len(texts), len(answers)) float64 tensor: log p(answer | text) summed over the answer's tokens,
    NaN rows for texts longer than `max_length` tokens. One left-padded forward pass over
    every (text, answer) sequence; only the last logits are kept, never (B, T, V)."""
    import torch

    from rlhf_ext.models import position_ids_from_mask

    device = next(model.parameters()).device
    answer_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    if any(len(ids) == 0 for ids in answer_ids):
        raise ValueError(f"every answer must encode to at least one token, got {answers!r}")
    keep = max(len(ids) for ids in answer_ids) + 1
    text_ids = [tokenizer(t)["input_ids"] for t in texts]
    result = torch.full((len(texts), len(answers)), float("nan"), dtype=torch.float64)
    seqs, where = [], []
    for row, ids in enumerate(text_ids):
        if max_length is not None and len(ids) + keep - 1 > max_length:
            continue
        for col, ans in enumerate(answer_ids):
            seqs.append(ids + ans)
            where.append((row, col, len(ans)))
    if not seqs:
        return result
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)  # (N, T)
    attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    position_ids = position_ids_from_mask(attention_mask)  # left padding must not shift positions
    with torch.no_grad():
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
        ).logits[:, -keep:]  # (N, keep, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    for n, (row, col, length) in enumerate(where):
        # the answer fills the last `length` positions; position t's token is predicted at t - 1
        targets = input_ids[n, width - length :]  # (length,)
        predicted = logp[n, keep - 1 - length : keep - 1]  # (length, V)
        result[row, col] = predicted.gather(-1, targets[:, None]).sum().double().item()
    return result


def judge_pairs(
    model,
    tokenizer,
    items,
    *,
    template: str = DEFAULT_TEMPLATE,
    answers=(" A", " B"),
    batch_size: int = 4,
    tie_band: float = 0.0,
    max_length=None,
):
    """Yield (item, verdict) per item; verdict is None when the item is too long for `max_length`, else a
    dict: choice ('a'|'b'|'tie'), confidence (probability of that choice; for a tie 1 - 2|p_a - 0.5|),
    p_a, and the per-order
    log-odds (`logodds_a_first`, `logodds_b_first`) and `position_bias`."""
    check_template(template)
    if not 0.0 <= tie_band < 0.5:
        raise ValueError(f"tie_band must be in [0, 0.5), got {tie_band}")
    if len(answers) != 2 or answers[0] == answers[1]:
        raise ValueError(f"answers must be two different strings, got {answers!r}")
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        texts = []
        for item in batch:
            texts.append(fill(template, item["prompt"], item["completion_a"], item["completion_b"]))
            texts.append(fill(template, item["prompt"], item["completion_b"], item["completion_a"]))
        logp = answer_logprobs(model, tokenizer, texts, answers, max_length=max_length)  # (2 * items, 2)
        for i, item in enumerate(batch):
            a_first, b_first = logp[2 * i], logp[2 * i + 1]
            if math.isnan(a_first[0]) or math.isnan(b_first[0]):
                yield item, None
                continue
            d_ab = float(a_first[0] - a_first[1])
            d_ba = float(b_first[1] - b_first[0])
            score = (d_ab + d_ba) / 2
            p_a = 1.0 / (1.0 + math.exp(-score)) if score > -700 else 0.0
            if abs(p_a - 0.5) <= tie_band:
                choice, confidence = "tie", 1.0 - abs(p_a - 0.5) * 2
            else:
                choice, confidence = ("a", p_a) if p_a > 0.5 else ("b", 1.0 - p_a)
            yield (
                item,
                {
                    "choice": choice,
                    "confidence": confidence,
                    "p_a": p_a,
                    "logodds_a_first": d_ab,
                    "logodds_b_first": d_ba,
                    "position_bias": (d_ab - d_ba) / 2,
                    "orders_agree": (d_ab > 0) == (d_ba > 0),
                },
            )
