"""`rlhf-ext train ppo|grpo --env package.module:Factory`: training on an environment from the command line
(no dataset needed), and a bad spec ends in one line naming it, exit code 2."""

import json

import pytest

from rlhf_ext.cli import main
from tests.test_cli_errors import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("single_thread")

GAME = "rlhf_ext.environments.games:GuessNumberEnv"


def env_argv(algorithm, workspace, out, env=GAME, *extra):
    common = ["--use_cpu", "true", "--disable_tqdm", "true", "--save_strategy", "no", "--max_steps", "1"]
    return ["train", algorithm, "--model_name_or_path", str(workspace / "policy"), "--env", env, "--output_dir",
            str(out), *common, *extra]  # fmt: skip


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("rlhf_ext.environments.games", ["env: expected 'package.module:Factory'", "rlhf_ext.environments.games"]),
        ("no_such_package.envs:Game", ["env: cannot import module 'no_such_package.envs'"]),
        ("rlhf_ext.environments.games:NoSuchGame", ["has no attribute 'NoSuchGame'"]),
        ("rlhf_ext.environments.games:_NUMBER", ["is a Pattern, expected a callable"]),
    ],
)
def test_bad_env_spec_is_one_line_exit_2(workspace, tmp_path, capsys, spec, fragments):
    code, err = run_cli(capsys, env_argv("ppo", workspace, tmp_path / "out", spec))
    assert_one_line_error(code, err, "rlhf-ext train ppo: env:", *fragments)


def test_env_is_for_on_policy_algorithms_only(workspace, tmp_path, capsys):
    code, err = run_cli(capsys, env_argv("sft", workspace, tmp_path / "out"))
    assert_one_line_error(code, err, "env: only used by `rlhf-ext train ppo`")


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("ppo", ["--per_device_train_batch_size", "4", "--num_ppo_epochs", "1", "--response_length", "4"]),
        ("grpo", ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4"]),
    ],
)
def test_train_on_the_game_from_the_cli(workspace, tmp_path, algorithm, extra):
    out = tmp_path / algorithm
    argv = env_argv(algorithm, workspace, out, GAME, "--max_turns", "3", "--logging_steps", "1", *extra)
    assert main(argv) == 0
    record = json.loads(open(out / "metrics.jsonl").readline())
    assert 1.0 <= record["episodes/turns_mean"] <= 3.0
    assert 0.0 <= record["episodes/success_rate"] <= 1.0
    assert (out / "model.safetensors").exists()
