"""The trainers: `<algo>_config.py` (the config dataclass) + `<algo>.py` (the trainer) for sft, reward, ppo, grpo and
rloo; import them from `rlhf_ext` (`from rlhf_ext import PPOConfig, PPOTrainer`).

One PPO step, in the order a reader meets it: ppo.py (`train` -> `make_experience` -> `ppo_update`) -> experience.py
(`Experience`, `sample_completions`, `policy_logprobs`) -> rlhf_ext.generation -> reward_sources.py
(`RewardSources.score`) -> advantages.py (`assemble_rewards`, `global_masked_whiten`) -> base.py (`clip_and_step`,
`end_step`) -> rollout_metrics.py (what a step logs about its completions). GRPO and RLOO share critic_free.py.
The rest: base_config.py (TrainingArguments fields we support), evaluation.py (eval completions and metrics),
checkpoint.py (checkpoint folders and what a trainer's checkpoint holds), data.py, distributed.py / sharding.py
(several processes, FSDP), loading.py (models, tokenizers, PPO's critic), lora.py, reporting.py, trl_compat.py.
"""
