"""Loading a script of examples/ as a module, so tests can call its functions (the scripts are not a package)."""

import importlib.util
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(filename: str):
    """examples/<filename> imported as a fresh module named after it."""
    if str(EXAMPLES) not in sys.path:  # as when the script runs: its folder (example_common.py) is importable
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(pathlib.Path(filename).stem, EXAMPLES / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
