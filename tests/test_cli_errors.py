"""`rlhf-ext train` given bad models, data or configs: one line on stderr naming the file, row or key, exit
code 2, never a traceback."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from rlhf_ext.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


def run_cli(capsys, argv):
    """(exit code, stderr) of `rlhf-ext` argv in this process."""
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


def write_lines(path, lines, mode="w"):
    with open(path, mode) as fh:
        for line in lines:
            fh.write(line + ("\n" if mode == "w" else b"\n"))
    return str(path)


def sft_argv(model, data, out):
    return [
        "train",
        "sft",
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--use_cpu",
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "1",
        "--disable_tqdm",
    ]


def test_model_path_that_does_not_exist_or_is_not_a_model(workspace, tmp_path, capsys):
    data = workspace / "text.jsonl"
    code, err = run_cli(capsys, sft_argv(tmp_path / "nowhere", data, tmp_path / "o"))
    assert_one_line_error(code, err, "model_name_or_path:", "nowhere", "does not exist")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    code, err = run_cli(capsys, sft_argv(tmp_path / "notes", data, tmp_path / "o"))
    assert_one_line_error(code, err, "model_name_or_path:", "is not a model folder (it has no config.json)")
    shutil.copytree(workspace / "policy", tmp_path / "bare")
    for name in os.listdir(tmp_path / "bare"):
        if "token" in name or name in ("vocab.json", "merges.txt"):
            os.remove(tmp_path / "bare" / name)
    code, err = run_cli(capsys, sft_argv(tmp_path / "bare", data, tmp_path / "o"))
    assert_one_line_error(code, err, "model_name_or_path:", "holds no tokenizer")


def test_wrong_kind_of_model_is_refused_by_name(workspace, tmp_path, capsys):
    code, err = run_cli(capsys, sft_argv(workspace / "rm", workspace / "text.jsonl", tmp_path / "o"))
    assert_one_line_error(code, err, "model:", "is a sequence classifier", "expected a causal LM")
    code, err = run_cli(
        capsys,
        [
            "train",
            "ppo",
            "--model_name_or_path",
            str(workspace / "policy"),
            "--reward_model_path",
            str(workspace / "policy"),
            "--dataset_name",
            str(workspace / "prompts.jsonl"),
            "--output_dir",
            str(tmp_path / "p"),
            "--use_cpu",
            "--disable_tqdm",
        ],
    )
    assert_one_line_error(code, err, "reward_model:", "is a causal LM", "score head would be random")


@pytest.mark.parametrize("case", ["empty", "blank lines", "bad json", "not an object", "not utf-8"])
def test_bad_data_files_name_the_file_and_line(case, workspace, tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    expected = {
        "empty": (lambda: path.write_text(""), "holds no rows"),
        "blank lines": (lambda: path.write_text("\n  \n"), "holds no rows"),
        "bad json": (
            lambda: write_lines(path, ['{"text": "a"}', '{"text": "b"']),
            "data.jsonl, line 2: not valid JSON",
        ),
        "not an object": (lambda: write_lines(path, ['{"text": "a"}', '["b"]']), "data.jsonl, line 2: expected a JSON"),
        "not utf-8": (
            lambda: write_lines(path, [b'{"text": "a"}', b'{"text": "\xff\xfe"}'], "wb"),
            "data.jsonl, line 2: not UTF-8 text",
        ),
    }[case]
    expected[0]()
    code, err = run_cli(capsys, sft_argv(workspace / "policy", path, tmp_path / "o"))
    assert_one_line_error(code, err, expected[1])


def test_empty_prompt_is_refused_before_training(workspace, tmp_path, capsys):
    data = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"prompt": p}) for p in ["the cat", "", "a dog", "x"]])
    code, err = run_cli(
        capsys,
        [
            "train",
            "grpo",
            "--model_name_or_path",
            str(workspace / "policy"),
            "--reward_funcs",
            f"{workspace / 'my_rewards.py'}:short",
            "--dataset_name",
            data,
            "--output_dir",
            str(tmp_path / "g"),
            "--use_cpu",
            "--max_steps",
            "1",
            "--disable_tqdm",
        ],
    )
    assert_one_line_error(code, err, "train_dataset: row 1: column 'prompt' is empty")


@pytest.mark.parametrize("case", ["syntax", "missing", "list", "scalar"])
def test_bad_config_files(case, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    expected = {
        "syntax": (lambda: path.write_text("output_dir: out\nmax_steps: [1, 2\n"), "config.yaml, line 3"),
        "missing": (lambda: None, "config.yaml: no such file"),
        "list": (lambda: path.write_text("- output_dir: out\n- max_steps: 2\n"), "got a YAML list"),
        "scalar": (lambda: path.write_text("just words\n"), "got a YAML str"),
    }[case]
    expected[0]()
    code, err = run_cli(capsys, ["train", "sft", "--config", str(path)])
    assert_one_line_error(code, err, "--config", expected[1])


def test_stray_positional_argument_through_the_real_command(tmp_path):
    """The installed entry point, as a user runs it: exit code 2 and one line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_ext.cli", "train", "sft", "oops", "--config", "x.yaml"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert_one_line_error(result.returncode, result.stderr, "unexpected argument 'oops'")


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"prompt": "p", "rejected": "b"}, "expected 'chosen' and 'rejected' columns"),
        (
            {"prompt": "p", "chosen": None, "rejected": "b"},
            "row 1: column 'chosen' must be text or chat messages, got missing or null",
        ),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "row 1: column 'rejected' must be text"),
        ({"prompt": "", "chosen": "", "rejected": "b"}, "row 1: 'prompt' and 'chosen' are both empty"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "row 1: column 'margin' must be a number"),
    ],
)
def test_reward_rows_are_named(row, fragment, workspace, tmp_path, capsys):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    data = write_lines(
        tmp_path / "pairs.jsonl", [json.dumps(good), json.dumps({**good, **row})] + [json.dumps(good)] * 2
    )
    if "chosen" not in row:  # a missing column: every row lacks it
        data = write_lines(tmp_path / "pairs.jsonl", [json.dumps(row)] * 3)
    code, err = run_cli(
        capsys,
        [
            "train",
            "reward",
            "--model_name_or_path",
            str(workspace / "rm"),
            "--dataset_name",
            data,
            "--output_dir",
            str(tmp_path / "r"),
            "--use_cpu",
            "--max_steps",
            "1",
            "--disable_tqdm",
        ],
    )
    assert_one_line_error(code, err, fragment)


def test_reward_trainer_names_non_utf8_text(make_rm, tiny_tokenizer, cpu_args):
    from rlhf_ext import RewardConfig, RewardTrainer

    pairs = [{"chosen": "a", "rejected": "b"}, {"chosen": "bad \udcff byte", "rejected": "b"}]
    with pytest.raises(ValueError, match=r"train_dataset: row 1: column .chosen. is not valid UTF-8"):
        RewardTrainer(make_rm(), RewardConfig(**cpu_args), train_dataset=pairs, processing_class=tiny_tokenizer)


def test_wrong_kind_of_model_object_is_refused_by_name(make_lm, make_rm, tiny_tokenizer, prompt_rows, cpu_args):
    from rlhf_ext import PPOConfig, PPOTrainer, SFTConfig, SFTTrainer

    with pytest.raises(ValueError, match="model: the LlamaForSequenceClassification given is a sequence classifier"):
        SFTTrainer(make_rm(), SFTConfig(**cpu_args), train_dataset=[{"text": "a b"}], processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="reward_model: the LlamaForCausalLM given is a causal LM"):
        PPOTrainer(
            args=PPOConfig(**cpu_args),
            processing_class=tiny_tokenizer,
            model=make_lm(),
            reward_model=make_lm(),
            train_dataset=prompt_rows,
        )
