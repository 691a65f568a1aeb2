"""`rlhf-ext bench`: each op module's cases run against their baselines; a bad --only or --repeat is one line on
stderr naming the option, exit code 2."""

import pytest

from rlhf_ext.cli import main
from rlhf_ext.commands.bench import OP_MODULES

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_cpu_only_ops_run_against_their_baselines(capsys):
    assert main(["bench", "--only", "decode_step,packed_linear", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for case in ("decode_step fwd", "packed_linear fwd (lm_head)"):
        line = next(line for line in out.splitlines() if line.startswith(case))
        assert line.rstrip().endswith("x") and float(line.split()[-1].rstrip("x")) > 0


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--only", "decode_step,nope"], "--only: expected op modules among " + ",".join(OP_MODULES) + ", got 'nope'"),
        (["--repeat", "0"], "--repeat: expected an int >= 1, got 0"),
    ],
)
def test_bad_options_are_one_line(capsys, argv, fragment):
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.strip().splitlines() == [f"rlhf-ext bench: {fragment}"]
