import json
import os

import pytest

from rlhf_ext.cli import main
from tests.trainer_helpers import write_config

pytestmark = pytest.mark.usefixtures("single_thread")


def test_train_sft_from_yaml_with_overrides(workspace, tmp_path):
    out = tmp_path / "sft"
    config = write_config(
        tmp_path / "sft.yaml",
        model_name_or_path=str(workspace / "policy"),
        dataset_name=str(workspace / "text.jsonl"),
        output_dir=str(out),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate="1e-3",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
    )
    assert main(["train", "sft", "--config", config, "--max_steps", "2", "--learning_rate=2e-3"]) == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]  # the override won over the file
    assert records[0]["learning_rate"] == pytest.approx(2e-3)
    assert os.path.exists(out / "model.safetensors") and os.path.exists(out / "tokenizer.json")


def test_train_reward_and_ppo(workspace, tmp_path):
    common = dict(use_cpu=True, disable_tqdm=True, save_strategy="no", max_steps=1, per_device_train_batch_size=4)
    rm_config = write_config(
        tmp_path / "rm.yaml",
        model_name_or_path=str(workspace / "rm"),
        dataset_name=str(workspace / "pairs.jsonl"),
        output_dir=str(tmp_path / "rm"),
        **common,
    )
    assert main(["train", "reward", "--config", rm_config]) == 0
    ppo_config = write_config(
        tmp_path / "ppo.yaml",
        model_name_or_path=str(workspace / "policy"),
        reward_model_path=str(tmp_path / "rm"),
        reward_funcs=[f"{workspace / 'my_rewards.py'}:short"],
        reward_weights=[1.0, 0.5],
        dataset_name=str(workspace / "prompts.jsonl"),
        output_dir=str(tmp_path / "ppo"),
        response_length=4,
        num_sample_generations=0,
        **common,
    )
    assert main(["train", "ppo", "--config", ppo_config, "--num_ppo_epochs", "1", "--kl_estimator", "k3"]) == 0
    record = json.loads(open(tmp_path / "ppo" / "metrics.jsonl").readline())
    assert "rewards/short/mean" in record and "objective/kl" in record
    assert os.path.exists(tmp_path / "ppo" / "critic" / "config.json")


def test_help(capsys):
    assert main(["train", "ppo", "--help"]) == 0
    text = capsys.readouterr().out
    for name in ("--kl_coef", "--num_ppo_epochs", "--reward_model_path", "--per_device_train_batch_size", "--use_cpu"):
        assert name in text
    assert text.count("--reward_model_path ") == 1 and text.count("--sft_model_path ") == 1  # script key and field
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "sft,reward,ppo" in capsys.readouterr().out


def test_bad_configs_are_named(workspace, tmp_path, capsys):
    config = write_config(
        tmp_path / "bad.yaml",
        model_name_or_path=str(workspace / "policy"),
        dataset_name=str(workspace / "text.jsonl"),
        output_dir=str(tmp_path / "o"),
        use_cpu=True,
    )
    assert main(["train", "sft", "--config", config, "--learnin_rate", "1"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    assert main(["train", "sft", "--config", config, "--max_steps", "two"]) == 2
    assert "max_steps: expected an integer" in capsys.readouterr().err
    assert main(["train", "sft", "--config", config, "--deepspeed", "ds.json"]) == 2
    assert "deepspeed" in capsys.readouterr().err
    assert main(["train", "sft", "--config", config, "--reward_model_path", "x"]) == 2
    assert "only used by `rlhf-ext train ppo`" in capsys.readouterr().err


def test_local_dataset_formats(tmp_path):
    import datasets

    from rlhf_ext.trainers.data import load_local_dataset

    data = datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    data.to_parquet(str(tmp_path / "d.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert load_local_dataset(str(tmp_path / "d.parquet"))["prompt"] == ["a", "b"]
    assert len(load_local_dataset(str(tmp_path / "saved"))) == 2
    assert len(load_local_dataset(str(tmp_path / "dict"), split="test")) == 1
    with pytest.raises(ValueError, match="has splits"):
        load_local_dataset(str(tmp_path / "dict"), split="validation")
    with pytest.raises(FileNotFoundError, match="only local files"):
        load_local_dataset(str(tmp_path / "missing.jsonl"))
