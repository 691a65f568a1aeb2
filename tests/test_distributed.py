"""Two CPU processes on gloo, data parallel (DDP-style) and fully sharded (FSDP as an accelerate config asks
for it): GRPO and PPO weights after N steps match a one-process run with the same global batch, and a
checkpoint written mid generation round by the two-process run resumes to the same weights."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from tests.trainer_helpers import target_fraction, target_ppo

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD = 2
# Same global batch either way: 2 processes x per_device rows, or 1 process x 2 * per_device rows. Sampling is
# keyed by global row, so equal generation chunks make the two runs draw the same completions.
GRPO = dict(
    num_generations=4,
    max_completion_length=6,
    learning_rate=1e-2,
    beta=0.05,
    num_iterations=2,
    generation_chunk_size=8,
    lr_scheduler_type="constant",
    logging_steps=1,
    save_strategy="steps",
    save_steps=3,
)
PPO = dict(
    # Adam's first steps move a weight by about +-lr whatever its gradient's size, so a gradient within float noise
    # of 0 (whose bits depend on how the batch is split and reduced) would move it by +-lr in one run and -+lr in the
    # other. eps 1e-4 keeps the updates of such gradients small; the others move ~lr as before. Measured (max |one
    # process - two| over the policy's weights after 2 steps, seeds 0 / 1 / 3): default eps 1.4e-5 / 4.1e-5 /
    # 1.1e-4 with the eager decode step and 1.1e-4 / 1.3e-4 / 5e-5 with the fused one; eps 1e-4: 2e-7 to 5e-7 both.
    # (Seeds 2 and 4 sample batches whose rewards are all 0: their only signal is the KL of rounding noise.)
    adam_epsilon=1e-4,
    num_mini_batches=1,
    num_ppo_epochs=2,
    response_length=5,
    learning_rate=1e-2,
    stop_token=None,
    local_rollout_forward_batch_size=4,
    lr_scheduler_type="constant",
    save_strategy="no",
    num_sample_generations=0,
)


def _models():
    from rlhf_ext.models.tiny import build_tokenizer, default_corpus, tiny_causal_lm

    tok = build_tokenizer()
    rows = [{"prompt": " ".join(line.split(" ")[:2])} for line in default_corpus(256, seed=1)[:64]]
    return tok, tiny_causal_lm("llama", tokenizer=tok), rows


def lora_config():
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def quiet(out, per_device, max_steps) -> dict:
    """The CPU settings both runs share (one process or two), with this run's folder, batch and length."""
    return dict(
        output_dir=out,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        seed=0,
        max_steps=max_steps,
        per_device_train_batch_size=per_device,
    )


def run_grpo(out, per_device, max_steps, resume=None, eval_rows=None, lora=False, **overrides):
    from rlhf_ext import GRPOConfig, GRPOTrainer

    tok, model, rows = _models()
    args = GRPOConfig(**quiet(out, per_device, max_steps), **{**GRPO, **overrides})
    trainer = GRPOTrainer(
        model,
        [target_fraction],
        args=args,
        train_dataset=rows,
        processing_class=tok,
        eval_dataset=rows[:eval_rows] if eval_rows else None,
        peft_config=lora_config() if lora else None,
    )
    state = trainer.train(resume_from_checkpoint=resume)
    return trainer, state


def run_ppo(out, per_device, max_steps, eval_rows=None, **overrides):
    from rlhf_ext import PPOConfig

    tok, model, rows = _models()
    args = PPOConfig(**quiet(out, per_device, max_steps), **{**PPO, **overrides})
    trainer = target_ppo(
        args,
        tok,
        model,
        train_dataset=rows,
        eval_dataset=rows[:eval_rows] if eval_rows else None,
    )
    return trainer, trainer.train()


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def full_weights(trainer, module) -> dict:
    """Every rank calls this: FSDP-sharded weights are gathered (to rank 0; other ranks get {})."""
    sharded = trainer.sharded(module)
    return sharded.full_state_dict() if sharded is not None else weights(module)


def local_fraction(module) -> float:
    """Elements this rank holds / elements of the model (1.0 unsharded, about 1/world under FSDP)."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    return local / sum(p.numel() for p in params)


# FSDP as `accelerate launch --config_file` asks for it: GRPO with FULL_SHARD (weights resharded after forward),
# PPO with SHARD_GRAD_OP; both with accelerate's default TRANSFORMER_BASED_WRAP on the model's decoder layers.
FSDP_ENV = {
    "grpo": dict(
        ACCELERATE_USE_FSDP="true",
        FSDP_VERSION="2",
        FSDP_RESHARD_AFTER_FORWARD="true",
        FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
    ),
    "ppo": dict(
        ACCELERATE_USE_FSDP="true",
        FSDP_VERSION="1",
        FSDP_SHARDING_STRATEGY="SHARD_GRAD_OP",
        FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
    ),
}


def _worker(rank, port, folder, mode):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    fsdp = mode == "fsdp"

    os.environ.update(FSDP_ENV["grpo"] if fsdp else {})
    grpo, state = run_grpo(os.path.join(folder, "grpo"), 8, 4)
    assert state.global_step == 4 and state.log_history[-1]["step"] == 4
    resumed, _ = run_grpo(os.path.join(folder, "grpo"), 8, 4, resume=os.path.join(folder, "grpo", "checkpoint-3"))
    os.environ.update(FSDP_ENV["ppo"] if fsdp else {})
    ppo, _ = run_ppo(os.path.join(folder, "ppo"), 4, 2)
    extra = {}
    if fsdp:
        # Work whose collectives could fall out of step under FSDP: evaluation over 3 prompts split unevenly
        # (ranks sample different numbers of chunks and tokens), PPO's eval and samples (every rank gathers,
        # rank 0 writes), and the shared critic (a replicated value head next to the sharded policy).
        _, grpo_eval = run_grpo(
            os.path.join(folder, "grpo_eval"),
            8,
            1,
            eval_rows=3,
            eval_strategy="steps",
            eval_steps=1,
            per_device_eval_batch_size=4,
            num_iterations=1,
        )
        _, ppo_eval = run_ppo(
            os.path.join(folder, "ppo_eval"),
            4,
            1,
            eval_rows=3,
            eval_strategy="steps",
            eval_steps=1,
            shared_critic=True,
            num_sample_generations=1,
            per_device_eval_batch_size=2,
        )
        # LoRA under FSDP: the frozen base is sharded with the adapter, the reference is the adapter switched off.
        lora, _ = run_grpo(os.path.join(folder, "lora"), 8, 4, lora=True)
        lora_resumed, _ = run_grpo(
            os.path.join(folder, "lora"), 8, 4, lora=True, resume=os.path.join(folder, "lora", "checkpoint-3")
        )
        lora.save_model(os.path.join(folder, "lora_merged"), merge_adapter=True)
        extra = {
            "grpo_eval": grpo_eval.log_history,
            "ppo_eval": ppo_eval.log_history,
            "lora": full_weights(lora, lora.policy),
            "lora_resumed": full_weights(lora_resumed, lora_resumed.policy),
            "lora_fraction": local_fraction(lora.policy),
        }
    result = {
        **extra,
        "grpo": full_weights(grpo, grpo.policy),
        "resumed": full_weights(resumed, resumed.policy),
        "ppo": full_weights(ppo, ppo.policy),
        "ppo_critic": full_weights(ppo, ppo.critic),
        "grpo_logs": state.log_history,
        "fractions": [local_fraction(m) for m in (grpo.policy, grpo.ref_model, ppo.policy, ppo.critic, ppo.ref_model)],
    }
    if rank == 0:
        torch.save(result, os.path.join(folder, "result.pt"))
    torch.distributed.barrier()  # leave together, with the process group torn down (see examples/multi_process_grpo.py)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_training(one: dict, two: dict, start: dict, tolerance: float):
    """Two runs agree to `tolerance`, far below how far training moved the weights."""
    assert set(one) == set(two), set(one) ^ set(two)
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert moved > 100 * tolerance, moved
    assert gap < tolerance, (gap, moved)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process runs with the same global batch (16 GRPO rows, 8 PPO prompts)."""
    folder = tmp_path_factory.mktemp("one")
    grpo, state = run_grpo(str(folder / "grpo"), 16, 4)
    ppo, _ = run_ppo(str(folder / "ppo"), 8, 2)
    lora, _ = run_grpo(str(folder / "lora"), 16, 4, lora=True)
    _, start, _ = _models()
    return {
        "grpo": weights(grpo.policy),
        "grpo_logs": state.log_history,
        "ppo": weights(ppo.policy),
        "ppo_critic": weights(ppo.critic),
        "start": weights(start),
        "lora": weights(lora.policy),
    }


def run_two_processes(folder, mode: str) -> dict:
    context = mp.start_processes(
        _worker, args=(_free_port(), str(folder), mode), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.time() + 300
    while not context.join(timeout=5):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2-process {mode} run did not finish in 300 s")
    return torch.load(folder / "result.pt", weights_only=False)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_and_resume(tmp_path, one_process, mode):
    two = run_two_processes(tmp_path, mode)
    one, start = one_process, one_process["start"]
    if mode == "fsdp":  # each rank held about half of every trained model (and of the frozen reference)
        assert all(0.45 < f < 0.6 for f in two["fractions"]), two["fractions"]
        assert any("eval_reward" in h for h in two["grpo_eval"]), two["grpo_eval"]
        assert any("eval/scores" in h for h in two["ppo_eval"]), two["ppo_eval"]
        assert len(open(tmp_path / "ppo_eval" / "samples.jsonl").read().splitlines()) == 3
        check_lora(one_process["lora"], two, start, tmp_path)
    else:
        assert two["fractions"] == [1.0] * 5

    assert_same_training(one["grpo"], two["grpo"], start, 5e-5)
    for key in ("reward", "kl", "loss"):  # rank 0 logged the global metrics the single process computes
        assert two["grpo_logs"][0][key] == pytest.approx(one["grpo_logs"][0][key], rel=1e-4, abs=1e-6)
    for k, v in two["grpo"].items():  # the checkpoint at step 3 (mid-round: it carries the samples) resumes exactly
        torch.testing.assert_close(two["resumed"][k], v, rtol=0, atol=0)
    assert os.path.exists(tmp_path / "grpo" / "checkpoint-3" / "rollout_buffer.pt")
    lines = open(tmp_path / "grpo" / "metrics.jsonl").read().splitlines()
    assert len(lines) == 4  # only rank 0 writes: one line per step, the resumed run replacing step 4

    assert_same_training(one["ppo"], two["ppo"], start, 5e-5)
    critic = one["ppo_critic"]
    assert set(critic) == set(two["ppo_critic"])
    assert max(float((critic[k] - two["ppo_critic"][k]).abs().max()) for k in critic) < 5e-5


def check_lora(one: dict, two: dict, start: dict, folder):
    """LoRA + FSDP: matches LoRA in one process, trains only the adapter, resumes exactly, merges on save."""
    from transformers import AutoModelForCausalLM

    assert 0.45 < two["lora_fraction"] < 0.6
    assert set(one) == set(two["lora"])
    adapter = [k for k in one if "lora_" in k]
    assert adapter and max(float((one[k] - two["lora"][k]).abs().max()) for k in one) < 5e-5
    assert max(float(one[k].abs().max()) for k in adapter if "lora_B" in k) > 1e-3  # the adapter trained
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in two["lora"].items()
        if "lora_" not in k
    }
    assert all(torch.equal(base[k], start[k]) for k in start)  # the base (and so the reference) never moved
    for k, v in two["lora"].items():
        torch.testing.assert_close(two["lora_resumed"][k], v, rtol=0, atol=0)
    merged = AutoModelForCausalLM.from_pretrained(folder / "lora_merged").state_dict()
    assert set(merged) == set(start)
    moved = [k for k in start if not torch.equal(merged[k], start[k])]
    assert moved and all("q_proj" in k or "v_proj" in k for k in moved), moved
