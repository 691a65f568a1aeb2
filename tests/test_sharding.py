"""FSDP and DeepSpeed requests: what an accelerate config or fsdp=/fsdp_config asks for becomes an FSDP plan,
or a clear error naming the option. (Sharded training itself: tests/test_distributed.py and
tests/test_accelerate_launch.py, which run 2 processes.)"""

import pytest

from rlhf_ext import GRPOConfig, GRPOTrainer, PPOConfig, SFTConfig, SFTTrainer
from rlhf_ext.trainers.sharding import FSDPPlan, fsdp_plan
from tests.trainer_helpers import target_fraction

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def accelerate_env(monkeypatch):
    """Set the variables `accelerate launch --config_file` exports (and remove any left from the shell)."""
    import os

    for name in list(os.environ):
        if name.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.delenv(name)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_no_request_means_no_plan(cpu_args, accelerate_env):
    assert fsdp_plan(GRPOConfig(**cpu_args), "GRPOTrainer") is None


@pytest.mark.parametrize(
    "env, reshard",
    [
        (dict(FSDP_VERSION="2"), True),  # accelerate's FSDP2 default: reshard after forward (FULL_SHARD)
        (dict(FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="false"), False),
        (dict(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="FULL_SHARD"), True),
        (dict(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="SHARD_GRAD_OP"), False),
        (dict(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="2"), False),  # strategies may come as their enum numbers
    ],
)
def test_accelerate_fsdp_config_becomes_a_plan(cpu_args, accelerate_env, env, reshard):
    accelerate_env(
        ACCELERATE_USE_FSDP="true",
        FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
        FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer",
        FSDP_ACTIVATION_CHECKPOINTING="true",
        **env,
    )
    plan = fsdp_plan(PPOConfig(**cpu_args), "PPOTrainer")
    assert plan == FSDPPlan(
        reshard_after_forward=reshard,
        wrap_layers=True,
        layer_classes=("LlamaDecoderLayer",),
        activation_checkpointing=True,
        source=plan.source,
    )
    assert "accelerate config" in plan.source


def test_fsdp_config_field_becomes_a_plan(cpu_args, accelerate_env):
    args = GRPOConfig(
        fsdp=True, fsdp_config={"reshard_after_forward": False, "auto_wrap_policy": "NO_WRAP"}, **cpu_args
    )
    plan = fsdp_plan(args, "GRPOTrainer")
    assert plan.reshard_after_forward is False and plan.wrap_layers is False and plan.layer_classes is None


def test_no_shard_is_plain_data_parallel(cpu_args, accelerate_env):
    accelerate_env(ACCELERATE_USE_FSDP="true", FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="NO_SHARD")
    assert fsdp_plan(PPOConfig(**cpu_args), "PPOTrainer") is None


@pytest.mark.parametrize(
    "env, named",
    [
        (dict(FSDP_VERSION="1", FSDP_SHARDING_STRATEGY="HYBRID_SHARD"), "HYBRID_SHARD"),
        (dict(FSDP_VERSION="2", FSDP_OFFLOAD_PARAMS="true"), "CPU offload"),
        (dict(FSDP_VERSION="1", FSDP_OFFLOAD_PARAMS="true"), "CPU offload"),
        (dict(FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="SIZE_BASED_WRAP", FSDP_MIN_NUM_PARAMS="1000"), "size_based"),
    ],
)
def test_unsupported_fsdp_options_are_refused_by_name(cpu_args, accelerate_env, env, named):
    accelerate_env(ACCELERATE_USE_FSDP="true", **env)
    with pytest.raises(ValueError, match=named) as info:
        fsdp_plan(GRPOConfig(**cpu_args), "GRPOTrainer")
    assert "GRPOTrainer" in str(info.value)


def test_deepspeed_config_is_refused_with_the_fsdp_alternative(
    cpu_args, accelerate_env, make_lm, tiny_tokenizer, prompt_rows
):
    accelerate_env(ACCELERATE_USE_DEEPSPEED="true")
    with pytest.raises(ValueError, match="DeepSpeed.*FSDP config"):
        GRPOTrainer(
            make_lm(),
            target_fraction,
            args=GRPOConfig(**cpu_args),
            train_dataset=prompt_rows,
            processing_class=tiny_tokenizer,
        )


def test_single_process_trainers_refuse_fsdp(cpu_args, accelerate_env, make_lm, tiny_tokenizer):
    accelerate_env(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    with pytest.raises(ValueError, match="SFTTrainer.*FSDP.*single process"):
        SFTTrainer(
            make_lm(), args=SFTConfig(**cpu_args), train_dataset=[{"text": "a b c"}], processing_class=tiny_tokenizer
        )


def test_fsdp_with_a_prebuilt_optimizer_is_refused(cpu_args, accelerate_env, make_lm, tiny_tokenizer, prompt_rows):
    """Checked in one process too, so a config that would fail once launched on N processes fails at once."""
    import torch

    accelerate_env(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2")
    model = make_lm()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizers: .*FSDP"):
        GRPOTrainer(
            model,
            target_fraction,
            args=GRPOConfig(**cpu_args),
            train_dataset=prompt_rows,
            processing_class=tiny_tokenizer,
            optimizers=(optimizer, None),
        )


def test_accelerate_mixed_precision_is_honoured(cpu_args, accelerate_env):
    """`mixed_precision: bf16` in an accelerate config turns on the trainers' bf16 autocast; fp16 is refused."""
    assert GRPOConfig(**cpu_args).bf16 is False
    accelerate_env(ACCELERATE_MIXED_PRECISION="bf16")
    assert GRPOConfig(**cpu_args).bf16 is True and PPOConfig(**cpu_args).bf16 is True
    accelerate_env(ACCELERATE_MIXED_PRECISION="fp16")
    with pytest.raises(ValueError, match="mixed_precision=fp16"):
        SFTConfig(**cpu_args)
