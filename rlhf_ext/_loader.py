"""Loads the compiled core. There is no slow fallback: without it, importing rlhf_ext fails loudly."""
import importlib

_FIX = (
    "Build it against the installed torch with `pip install --no-build-isolation -e .` "
    "(or `make install`) from the rlhf_ext source folder."
)


def load_compiled():
    import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)

    try:
        return importlib.import_module("rlhf_ext._C")
    except ImportError as err:  # the .so is missing, or was built against another torch
        raise ImportError(
            f"rlhf_ext: the compiled core rlhf_ext._C could not be loaded ({err}). "
            f"The installed torch is {torch.__version__}. {_FIX}"
        ) from err
