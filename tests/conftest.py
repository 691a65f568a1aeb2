"""Shared fixtures: a tokenizer trained locally and tiny Llama / GPT-2 / Qwen2 models (rlhf_ext.models.tiny)."""

import copy
import json
import sys

import pytest


def pytest_collection_modifyitems(config, items):
    """The one place tests are skipped for missing hardware, each with its reason: `cuda` tests where torch sees
    no CUDA GPU, `cuda_sim` tests where nvcc or the GPU simulator is missing (tests/sim_harness.py)."""
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(pytest.mark.skip(reason="cuda: needs a CUDA GPU (torch.cuda.is_available() is False)"))
    sim_items = [item for item in items if item.get_closest_marker("cuda_sim")]
    if not sim_items:
        return
    from tests import sim_harness

    reason = sim_harness.unavailable_reason()
    if reason:
        for item in sim_items:
            item.add_marker(pytest.mark.skip(reason=f"cuda_sim: {reason}"))


def pytest_terminal_summary(terminalreporter):
    import sys

    harness = sys.modules.get("tests.sim_harness")
    if harness is not None and harness.summary():
        terminalreporter.write_line(harness.summary())


@pytest.fixture(scope="session")
def cuda_sim():
    """The harness module (tests/sim_harness.py) with every family's library built (in parallel, cached);
    `cuda_sim.library("gae").call(...)`. The simulator workers end with the session."""
    from tests import sim_harness

    reason = sim_harness.unavailable_reason()
    if reason:
        pytest.skip(f"cuda_sim: {reason}")
    sim_harness.build_all()
    yield sim_harness
    sim_harness.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _end_simulator_workers():
    """A simulator worker keeps most of a core busy even while idle (measured: ~70 % CPU each), slowing every
    later test: end the workers when the module that used them is done (a later call starts a fresh one)."""
    yield
    harness = sys.modules.get("tests.sim_harness")
    if harness is not None:
        harness.shutdown()


@pytest.fixture(scope="module")
def single_thread():
    """Trainer tests run tiny models, which gain nothing from intra-op threads, while OpenMP threads on a
    shared, oversubscribed CPU can make each small kernel call 50x slower. Restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE (~380 tokens) with <pad>, </s> (EOS) and a chat template."""
    from rlhf_ext.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def make_lm(tiny_tokenizer):
    """make_lm(arch="llama", seed=0, **config) -> a fresh tiny causal LM (trainers mutate their models)."""
    from rlhf_ext.models.tiny import tiny_causal_lm

    cache = {}

    def build(arch="llama", seed=0, **config):
        key = (arch, seed, tuple(sorted(config.items())))
        if key not in cache:
            cache[key] = tiny_causal_lm(arch, tokenizer=tiny_tokenizer, seed=seed, **config)
        return copy.deepcopy(cache[key])

    return build


@pytest.fixture(scope="session")
def make_rm(tiny_tokenizer):
    """make_rm(arch="llama", seed=0) -> a fresh tiny sequence classifier with num_labels=1."""
    from rlhf_ext.models.tiny import tiny_sequence_classifier

    def build(arch="llama", seed=0, **config):
        return tiny_sequence_classifier(arch, tokenizer=tiny_tokenizer, seed=seed, **config)

    return build


@pytest.fixture(scope="session")
def corpus():
    from rlhf_ext.models.tiny import default_corpus

    return default_corpus(256, seed=1)


@pytest.fixture(scope="session")
def prompt_rows(corpus):
    """[{"prompt": first two words of a sentence}] x 64."""
    return [{"prompt": " ".join(line.split(" ")[:2])} for line in corpus[:64]]


@pytest.fixture
def cpu_args(tmp_path):
    """Common quiet CPU settings for the trainer configs."""
    return dict(output_dir=str(tmp_path / "out"), use_cpu=True, disable_tqdm=True, report_to="none", seed=0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, make_lm, make_rm, tiny_tokenizer, corpus):
    """Local model folders and data files, as a user of `rlhf-ext train` would have them."""
    root = tmp_path_factory.mktemp("cli")
    make_lm().save_pretrained(root / "policy")
    tiny_tokenizer.save_pretrained(root / "policy")
    make_rm().save_pretrained(root / "rm")
    tiny_tokenizer.save_pretrained(root / "rm")
    with open(root / "text.jsonl", "w") as fh:
        for line in corpus[:16]:
            fh.write(json.dumps({"text": line}) + "\n")
    with open(root / "pairs.jsonl", "w") as fh:
        for _ in range(8):
            fh.write(json.dumps({"prompt": "the movie", "chosen": " was great", "rejected": " was awful"}) + "\n")
    with open(root / "prompts.jsonl", "w") as fh:
        for line in corpus[:16]:
            fh.write(json.dumps({"prompt": " ".join(line.split()[:2]), "topic": line.split()[1]}) + "\n")
    (root / "my_rewards.py").write_text(
        "def short(prompts, completions, topic, **kw):\n"
        "    assert len(topic) == len(completions)\n"
        "    return [-len(c) / 10 for c in completions]\n"
    )
    return root
