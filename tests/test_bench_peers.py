"""The peer benchmark (benchmarks/bench_peers.py + peer_script.py) without TRL: our side runs end to end at a tiny
shape, and the config both sides get is accepted by ours with TRL's math-changing defaults overridden. Where the
peers' venvs exist (`make bench-peers` made them under .peers/), TRL's configs are built from the same fields and
compared, and TRL's side runs too; otherwise those tests skip."""

import dataclasses
import json
import os
import subprocess

import pytest

from benchmarks import bench_peers, peer_script

ALGOS = ("ppo", "grpo")


def our_config(algo, tmp_path):
    config_cls, _ = peer_script.trainer_classes(algo, "ours")
    return peer_script.make_config(config_cls, algo, peer_script.SIZES["quick"][algo], 3, str(tmp_path))


@pytest.mark.parametrize("algo", ALGOS)
def test_our_config_takes_every_field_and_trl_defaults_are_overridden(algo, tmp_path):
    kwargs = peer_script.config_kwargs(algo, peer_script.SIZES["quick"][algo], 3, str(tmp_path))
    # TRL's defaults that compute something else than ours: each is set, to what ours computes.
    assert kwargs["bf16"] is False and kwargs["gradient_checkpointing"] is False
    assert kwargs["seed"] == 0
    # The optimizer is left to both configs' shared default (TrainingArguments': TRL's configs and ours inherit it);
    # --optim sets another for both.
    assert "optim" not in kwargs
    config = our_config(algo, tmp_path)
    from transformers import TrainingArguments

    default = TrainingArguments(output_dir=str(tmp_path), use_cpu=True).optim
    assert config.optim == default and getattr(default, "value", default) == "adamw_torch_fused"
    config_cls, _ = peer_script.trainer_classes(algo, "ours")
    chosen = peer_script.make_config(
        config_cls, algo, peer_script.SIZES["quick"][algo], 3, str(tmp_path), "adamw_torch"
    )
    assert getattr(chosen.optim, "value", chosen.optim) == "adamw_torch"
    for name, value in kwargs.items():
        actual = getattr(getattr(config, name), "value", getattr(config, name))  # TrainingArguments' enums
        assert actual == ([] if value == "none" else value), name  # report_to="none" is kept as []
    names = {f.name for f in dataclasses.fields(config)}
    assert not set(peer_script.TRL_ONLY) & names  # TRL-only knobs are never handed to our config


def test_bad_impl_and_steps():
    with pytest.raises(ValueError, match="impl: expected 'trl' or 'ours', got 'veRL'"):
        peer_script.trainer_classes("ppo", "veRL")
    with pytest.raises(SystemExit):
        peer_script.main(["--algo", "ppo", "--impl", "ours", "--steps", "1"])
    # --optim: argparse refuses a value outside what both configs accept, in one usage line naming it (exit 2)
    for main, argv in ((peer_script.main, ["--algo", "ppo", "--impl", "ours"]), (bench_peers.main, [])):
        with pytest.raises(SystemExit) as stop:
            main(argv + ["--optim", "sgd"])
        assert stop.value.code == 2
    from rlhf_ext.trainers.base_config import SUPPORTED_OPTIMIZERS

    assert set(peer_script.OPTIMIZERS) == set(SUPPORTED_OPTIMIZERS)
    with pytest.raises(SystemExit, match="--algos: expected a comma-separated subset"):
        bench_peers.main(["--algos", "dpo"])
    with pytest.raises(SystemExit, match="--peer-python: expected ALGO=PATH"):
        bench_peers.parse_peer_python(["ppo"])


@pytest.mark.parametrize("algo", ALGOS)
def test_our_side_runs_and_reports(algo):
    record = bench_peers.run_child(bench_peers.sys.executable, algo, "ours", "quick", 2, 1, timeout=600)
    assert record["algo"] == algo and record["impl"] == "ours" and record["threads"] == 1
    assert len(record["all_step_seconds"]) == 2 and record["step_seconds"] > 0
    assert set(record["phases"]) == {"rollout", "scoring", "update"}
    assert all(v > 0 for v in record["phases"].values())
    assert record["peak_rss_mb"] > 100  # torch alone is more than that


def peer_python(algo):
    path = bench_peers.DEFAULT_PEER_PYTHON[algo]
    if not os.path.exists(path):
        pytest.skip(f"no peer venv at {path} (make bench-peers creates it)")
    return path


@pytest.mark.parametrize("algo", ALGOS)
def test_trl_builds_the_same_config(algo, tmp_path):
    python = peer_python(algo)
    fields = list(peer_script.config_kwargs(algo, peer_script.SIZES["quick"][algo], 3, str(tmp_path)))
    code = (
        "import json, sys; from benchmarks import peer_script as s; "
        f"c = s.make_config(s.trainer_classes({algo!r}, 'trl')[0], {algo!r}, s.SIZES['quick'][{algo!r}], 3, "
        f"{str(tmp_path)!r}); print(json.dumps({{k: str(getattr(c, k)) for k in {fields!r}}}))"
    )
    env = dict(os.environ, PYTHONPATH=bench_peers.ROOT)
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trl_values = json.loads(done.stdout.strip().splitlines()[-1])
    ours = our_config(algo, tmp_path)
    for name in fields:
        assert trl_values[name] == str(getattr(ours, name)), name


@pytest.mark.slow  # a TRL training run per algorithm: minutes on a busy machine
@pytest.mark.parametrize("algo", ALGOS)
def test_trl_side_runs(algo):
    record = bench_peers.run_child(peer_python(algo), algo, "trl", "quick", 2, 1, timeout=600)
    assert record["trl"] == bench_peers.PEER_VERSIONS[algo]
    assert len(record["all_step_seconds"]) == 2 and record["step_seconds"] > 0


@pytest.mark.parametrize("peer_malloc", [False, True])
def test_peer_malloc_hands_trl_our_malloc_settings(peer_malloc, monkeypatch, tmp_path):
    """--peer-malloc: TRL's process gets the environment spelling of what reuse_freed_cpu_memory sets; ours is
    started as always (our trainer applies it itself). The JSON records which way it ran."""
    envs, real_run = {}, subprocess.run

    def fake_run(cmd, env=None, **kwargs):
        if "--impl" not in cmd:  # not a training child (platform.processor() runs `uname`)
            return real_run(cmd, env=env, **kwargs)
        impl = cmd[cmd.index("--impl") + 1]
        envs[impl] = env
        record = {"step_seconds": 1.0, "peak_rss_mb": 1.0, "size": {}, "trl": "x", "optim": None}
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(record) + "\n", stderr="")

    monkeypatch.setattr(bench_peers.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_peers.os.path, "exists", lambda path: True)
    out = tmp_path / "peers.json"
    argv = ["--algos", "ppo", "--out", str(out)] + (["--peer-malloc"] if peer_malloc else [])
    bench_peers.main(argv)
    for key, value in bench_peers.SAME_MALLOC_ENV.items():
        assert (envs["trl"].get(key) == value) == peer_malloc
        assert envs["ours"].get(key) == os.environ.get(key)
    assert json.loads(out.read_text())["results"][0]["peer_malloc"] is peer_malloc
    assert bench_peers.SAME_MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"] == str(2**31 - 1)  # the mallopt value in base.py
