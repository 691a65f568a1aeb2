"""Loads the compiled core. There is no slow fallback: without it, importing rlhf_ext fails loudly.

Before the shared library is loaded, the torch it was built against (rlhf_ext/_build_record.py, written
by setup.py) is compared with the torch that is running: a core built against another torch can fail to
load with an obscure symbol error, or load and misbehave, so a mismatch is refused in one line saying
what was found, what was expected and the command that rebuilds it.
"""

import importlib

FIX = (
    "Rebuild it against the installed torch: `pip install --no-build-isolation .` "
    "(or `make install`) in the rlhf_ext source folder."
)


class CompiledCoreError(ImportError):
    """The compiled core is missing, or was built for another torch."""


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_build_record(torch_version: str, torch_cuda, record) -> None:
    """Raise CompiledCoreError when `record` (TORCH_VERSION, CUDA_VERSION) does not fit the running torch."""
    if record is None:
        raise CompiledCoreError(
            f"rlhf_ext: the compiled core was not built (no rlhf_ext/_build_record.py); the installed torch is "
            f"{torch_version}. {FIX}"
        )
    built, built_cuda = record.TORCH_VERSION, record.CUDA_VERSION
    if _major_minor(built) != _major_minor(torch_version):
        raise CompiledCoreError(
            f"rlhf_ext: the compiled core was built against torch {built}, but torch {torch_version} is installed "
            f"(expected torch {_major_minor(built)}.*). {FIX}"
        )
    if built_cuda is not None and torch_cuda is not None and built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        raise CompiledCoreError(
            f"rlhf_ext: the compiled core's CUDA kernels were built for CUDA {built_cuda}, but the installed torch "
            f"{torch_version} uses CUDA {torch_cuda}. {FIX}"
        )
    if built_cuda is not None and torch_cuda is None:
        raise CompiledCoreError(
            f"rlhf_ext: the compiled core was built with CUDA kernels (CUDA {built_cuda}, torch {built}), but the "
            f"installed torch {torch_version} is a CPU build. {FIX}"
        )


def load_compiled():
    import torch  # loads libc10/libtorch, which the extension links against

    try:
        record = importlib.import_module("rlhf_ext._build_record")
    except ImportError:
        record = None
    check_build_record(torch.__version__, torch.version.cuda, record)
    try:
        return importlib.import_module("rlhf_ext._C")
    except ImportError as err:  # the .so is missing, or does not load beside this torch
        raise CompiledCoreError(
            f"rlhf_ext: the compiled core rlhf_ext._C could not be loaded ({err}); torch {torch.__version__} is "
            f"installed. {FIX}"
        ) from None
