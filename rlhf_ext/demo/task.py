"""The demo's world: short restaurant reviews of mixed sentiment, a hidden "true preference" that
scores them, and a simulated annotator that compares two completions with Bradley–Terry noise.

The reward model never sees `true_score`; it only learns from the annotator's noisy comparisons.
The final evaluation uses `true_score` directly, so a policy that games the reward model without
pleasing the hidden judge shows up as a low win rate.
"""

import math
import random

SUBJECTS = [
    "pizza",
    "pasta",
    "soup",
    "burger",
    "salad",
    "coffee",
    "cake",
    "curry",
    "bread",
    "noodles",
    "staff",
    "service",
    "room",
    "music",
    "menu",
    "table",
    "waiter",
    "dessert",
    "tea",
    "steak",
]
POSITIVE = [
    "great",
    "delicious",
    "friendly",
    "lovely",
    "fresh",
    "amazing",
    "tasty",
    "perfect",
    "warm",
    "excellent",
    "wonderful",
    "cosy",
]
NEGATIVE = [
    "awful",
    "cold",
    "rude",
    "bland",
    "stale",
    "terrible",
    "slow",
    "dirty",
    "noisy",
    "soggy",
    "greasy",
    "boring",
]
NEUTRAL = ["okay", "average", "plain", "normal", "fine", "usual"]
CONNECTORS = ["and", "but", "also", "really", "very", "quite"]
PROMPT_TEMPLATES = ["review : the {s} was", "review : i thought the {s} was", "review : our {s} was"]


def vocabulary() -> list[str]:
    """Every word the generated corpus can contain (the demo's tokenizer is trained on the corpus)."""
    words = set(
        SUBJECTS
        + POSITIVE
        + NEGATIVE
        + NEUTRAL
        + CONNECTORS
        + ["the", "was", "review", ":", "i", "thought", "our", "."]
    )
    return sorted(words)


def true_score(completion: str) -> float:
    """The hidden preference: positive words count +1, negative words -1; a review that rambles past
    twelve words or never ends its sentence loses a point, as a human reader would mark it down."""
    words = completion.replace(".", " . ").split()
    score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    if len(words) > 12 or "." not in words:
        score -= 1.0
    return float(score)


def make_prompt(rng: random.Random) -> str:
    return rng.choice(PROMPT_TEMPLATES).format(s=rng.choice(SUBJECTS))


def make_completion(rng: random.Random) -> str:
    """A completion of mixed quality: 1-3 clauses, each an adjective drawn from a sentiment that leans
    negative on average, so the SFT policy starts out mediocre and there is room to improve."""
    lean = rng.choice([-0.6, -0.3, 0.0, 0.2])
    parts = []
    for i in range(rng.randint(1, 3)):
        u = rng.random() + lean
        adjective = rng.choice(POSITIVE if u > 0.6 else NEGATIVE if u < 0.25 else NEUTRAL)
        if i == 0:
            parts.append(adjective)
        else:
            parts += [rng.choice(CONNECTORS[:3]), "the", rng.choice(SUBJECTS), "was", adjective]
    return " " + " ".join(parts) + " ."


def sft_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (prompt, completion) pairs for supervised fine-tuning."""
    rng = random.Random(seed)
    return [(make_prompt(rng), make_completion(rng)) for _ in range(n)]


def held_out_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed + 10_000)
    return [make_prompt(rng) for _ in range(n)]


def annotate(completion_a: str, completion_b: str, rng: random.Random, beta: float = 1.0) -> int:
    """A noisy human: prefers A with probability sigmoid(beta * (score_A - score_B)). Returns 0 if A
    is preferred, 1 if B is."""
    p_a = 1.0 / (1.0 + math.exp(-beta * (true_score(completion_a) - true_score(completion_b))))
    return 0 if rng.random() < p_a else 1
