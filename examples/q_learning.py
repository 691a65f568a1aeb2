"""The textbook tabular Q-learning agent on the environment protocol: the same `reset()/step()` text game the
language models are trained on (rlhf_ext.environments.games.GuessNumberEnv), played by a table of Q(s, a).

    python examples/q_learning.py            # a second or two
    python examples/q_learning.py --quick    # what the test suite runs

The state is the observation text ("higher 5 to 8 :" says everything that matters), the actions are the numbers
the game accepts, and the update is Q(s, a) <- Q(s, a) + alpha * (r + gamma * max_a' Q(s', a') - Q(s, a)), with
no bootstrap past a terminal state. Nothing here imports torch or the trainers: the protocol is plain gym.
Success rate and turns are measured with the greedy policy on held-out seeds, before and after training.
"""

import random
from collections import defaultdict

from example_common import before_after, parse_command_line

from rlhf_ext.environments.games import GuessNumberEnv, play

SETTINGS = {"full": dict(episodes=5000, held_out=500), "quick": dict(episodes=300, held_out=100)}
HELD_OUT_SEED = 1_000_000  # evaluation seeds start here; training seeds are 0, 1, 2, ...


class QLearningAgent:
    """Q(s, a) in a dict; epsilon-greedy behaviour; ties broken at random (seeded) so an empty table is a
    uniformly random policy rather than "always the first action"."""

    def __init__(self, actions, alpha=0.1, gamma=1.0, epsilon=0.2, seed=0):
        self.actions = list(actions)
        self.alpha, self.gamma, self.epsilon = alpha, gamma, epsilon
        self.q = defaultdict(float)  # (state, action) -> value
        self.rng = random.Random(seed)

    def greedy(self, state):
        best = max(self.q[(state, a)] for a in self.actions)
        return self.rng.choice([a for a in self.actions if self.q[(state, a)] == best])

    def act(self, state):
        if self.rng.random() < self.epsilon:
            return self.rng.choice(self.actions)
        return self.greedy(state)

    def update(self, state, action, reward, next_state, terminated):
        target = reward if terminated else reward + self.gamma * max(self.q[(next_state, a)] for a in self.actions)
        self.q[(state, action)] += self.alpha * (target - self.q[(state, action)])

    def train_episode(self, env, seed):
        state, _ = env.reset(seed=seed)
        while True:
            action = self.act(state)
            next_state, reward, terminated, truncated, _ = env.step(action)
            # A truncated episode was cut by the time limit, not ended by the game: its last state is bootstrapped.
            self.update(state, action, reward, next_state, terminated)
            if terminated or truncated:
                return
            state = next_state


def evaluate(env, agent, episodes):
    """Greedy success rate and mean turns on held-out seeds."""
    results = [play(env, agent.greedy, HELD_OUT_SEED + i) for i in range(episodes)]
    return {
        "success": sum(r["success"] for r in results) / episodes,
        "turns": sum(r["turns"] for r in results) / episodes,
        "return": sum(r["return"] for r in results) / episodes,
    }


def main(mode="full", seed=0):
    s = SETTINGS[mode]
    env = GuessNumberEnv(low=1, high=8, max_guesses=4)
    agent = QLearningAgent(env.actions, seed=seed)
    before = evaluate(env, agent, s["held_out"])
    for episode in range(s["episodes"]):
        agent.train_episode(env, seed * s["episodes"] + episode)
    after = evaluate(env, agent, s["held_out"])
    print(
        f"Q-learning on guess-the-number 1..8 ({s['episodes']} episodes, {len(agent.q)} table entries): held-out "
        + before_after(before, after, {"success": ".1%", "turns": ".2f"})
    )
    return {"before": before, "after": after}


if __name__ == "__main__":
    cli = parse_command_line(__doc__, "fewer episodes (what the test suite runs)", output_dir=False)
    main("quick" if cli.quick else "full", cli.seed)
