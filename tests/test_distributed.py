"""Two CPU processes on gloo: GRPO and PPO weights after N steps match a one-process run with the same global
batch, and a checkpoint written mid generation round by the two-process run resumes to the same weights."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import tests.conftest  # noqa: F401  (a spawned process imports this module first; stand-ins before rlhf_ext.trainers)
from tests.test_ppo import target_fraction

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD = 2
# Same global batch either way: 2 processes x per_device rows, or 1 process x 2 * per_device rows. Sampling is
# keyed by global row, so equal generation chunks make the two runs draw the same completions.
GRPO = dict(num_generations=4, max_completion_length=6, learning_rate=1e-2, beta=0.05, num_iterations=2,
            generation_chunk_size=8, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=3)
PPO = dict(num_mini_batches=1, num_ppo_epochs=2, response_length=5, learning_rate=1e-2, stop_token=None,
           local_rollout_forward_batch_size=4, lr_scheduler_type="constant", save_strategy="no", num_sample_generations=0)


def _models():
    from rlhf_ext.models.tiny import build_tokenizer, default_corpus, tiny_causal_lm

    tok = build_tokenizer()
    rows = [{"prompt": " ".join(line.split(" ")[:2])} for line in default_corpus(256, seed=1)[:64]]
    return tok, tiny_causal_lm("llama", tokenizer=tok), rows


def run_grpo(out, per_device, max_steps, resume=None):
    from rlhf_ext import GRPOConfig, GRPOTrainer

    tok, model, rows = _models()
    args = GRPOConfig(output_dir=out, use_cpu=True, disable_tqdm=True, report_to="none", seed=0, max_steps=max_steps,
                      per_device_train_batch_size=per_device, **GRPO)
    trainer = GRPOTrainer(model, [target_fraction], args=args, train_dataset=rows, processing_class=tok)
    state = trainer.train(resume_from_checkpoint=resume)
    return trainer, state


def run_ppo(out, per_device, max_steps):
    from rlhf_ext import PPOConfig, PPOTrainer

    tok, model, rows = _models()
    args = PPOConfig(output_dir=out, use_cpu=True, disable_tqdm=True, report_to="none", seed=0, max_steps=max_steps,
                     per_device_train_batch_size=per_device, **PPO)
    trainer = PPOTrainer(args, tok, model, reward_funcs=[target_fraction], train_dataset=rows)
    return trainer, trainer.train()


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)

    grpo, state = run_grpo(os.path.join(folder, "grpo"), 8, 4)
    assert state.global_step == 4 and state.log_history[-1]["step"] == 4
    resumed, _ = run_grpo(os.path.join(folder, "grpo"), 8, 4, resume=os.path.join(folder, "grpo", "checkpoint-3"))
    ppo, _ = run_ppo(os.path.join(folder, "ppo"), 4, 2)
    if rank == 0:
        torch.save({"grpo": weights(grpo.policy), "resumed": weights(resumed.policy), "ppo": weights(ppo.policy),
                    "ppo_critic": weights(ppo.critic), "grpo_logs": state.log_history}, os.path.join(folder, "result.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_training(one: dict, two: dict, start: dict, tolerance: float):
    """Two runs agree to `tolerance`, far below how far training moved the weights."""
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert moved > 100 * tolerance, moved
    assert gap < tolerance, (gap, moved)


def test_two_processes_match_one_and_resume(tmp_path):
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + 240
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process run did not finish in 240 s")
    two = torch.load(tmp_path / "result.pt", weights_only=False)
    _, start, _ = _models()
    start = weights(start)

    grpo, state = run_grpo(str(tmp_path / "one_grpo"), 16, 4)
    assert_same_training(weights(grpo.policy), two["grpo"], start, 5e-5)
    for key in ("reward", "kl", "loss"):  # rank 0 logged the global metrics the single process computes
        assert two["grpo_logs"][0][key] == pytest.approx(state.log_history[0][key], rel=1e-4, abs=1e-6)
    for k, v in two["grpo"].items():  # the checkpoint at step 3 (mid-round: it carries the samples) resumes exactly
        torch.testing.assert_close(two["resumed"][k], v, rtol=0, atol=0)
    assert os.path.exists(tmp_path / "grpo" / "checkpoint-3" / "rollout_buffer.pt")
    lines = open(tmp_path / "grpo" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 4  # one writer (rank 0), one line per logged step, none from the resumed run's rank 1

    ppo, _ = run_ppo(str(tmp_path / "one_ppo"), 8, 2)
    assert_same_training(weights(ppo.policy), two["ppo"], start, 5e-5)
    critic = weights(ppo.critic)
    assert max(float((critic[k] - two["ppo_critic"][k]).abs().max()) for k in critic) < 5e-5
