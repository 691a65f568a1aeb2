"""Build the rlhf_ext compiled core: a CPU extension always, CUDA kernels where torch has CUDA.

The extension is compiled against the torch it will run with, and the wheel says so (`torch==X.Y.*`):
- `pip install --no-build-isolation .`: the torch of the environment you install into.
- `pip install .` (build isolation on): torch is deliberately not a build requirement (pip would download
  the newest torch, a CUDA build of gigabytes, and compile against it). Instead the build asks the Python
  it installs into which torch it has and compiles against that one; when it has none, the build stops at
  once with one line saying what to install.
- `python -m build --sdist` needs no torch; a wheel needs torch as above.
The C++ standard is the one the torch in use asks for (torch's cpp_extension picks it: C++17 for old
releases, C++20 for current ones); the sources compile as both.

Build knobs (environment variables, read once here and listed in the README):
  RLHF_EXT_FORCE_CUDA=0|1   force the CUDA kernels off (0) or on (1); default: on when torch.version.cuda
                            and CUDA_HOME are both there (never decided by whether a GPU is visible)
  TORCH_CUDA_ARCH_LIST      CUDA architectures to build for (default "8.0;9.0")
  MAX_JOBS                  parallel compile jobs for ninja
"""

import glob
import os
import subprocess
import sys

from setuptools import Extension, find_packages, setup

FORCE_CUDA = os.environ.get("RLHF_EXT_FORCE_CUDA")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

ROOT = os.path.dirname(os.path.abspath(__file__))
# Commands that only describe or pack the sources: they must work without torch (sdist, metadata probes).
SOURCE_ONLY = {"sdist", "egg_info", "--version", "--name", "check"}
RUNTIME_DEPENDENCIES = [
    "transformers>=4.50",
    "tokenizers>=0.20",
    "accelerate>=1.0",
    "peft>=0.14",
    "safetensors>=0.4",
    "datasets>=3.0",
    "pyyaml>=6.0",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "pybind11>=2.12",
    "ninja>=1.11",
]
NO_TORCH_HELP = (
    "install torch first (`pip install torch`, or the CUDA build for your driver from pytorch.org), then "
    "`pip install --no-build-isolation .` (for a wheel: `python -m build --no-isolation`)"
)


def fail(message: str):
    """One line on stderr and exit code 1: pip shows it instead of a compiler log."""
    sys.exit(f"rlhf_ext build: {message}")


def target_torch_site():
    """(site_dir, version) of the torch installed for the interpreter pip installs into, or None.

    Under pip's build isolation the build runs on that same interpreter, with PYTHONPATH pointing at the
    isolated environment and user site-packages switched off; without those variables it sees the
    environment the package is being installed into."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    code = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__))); print(torch.__version__)"
    try:
        probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = probe.stdout.strip().splitlines()
    if probe.returncode != 0 or len(lines) < 2:
        return None
    return lines[-2], lines[-1]


def import_torch():
    """The torch to compile against: the importable one, else (build isolation) the target's, else exit."""
    try:
        import torch

        return torch
    except ImportError:
        pass
    found = target_torch_site()
    if found is None:
        fail(f"torch is not installed for {sys.executable}; {NO_TORCH_HELP}")
    site, version = found
    sys.path.append(site)
    try:
        import torch
    except ImportError as err:
        fail(
            f"build isolation is on and the installed torch {version} ({site}) cannot be imported from the "
            f"isolated build ({err}); run `pip install --no-build-isolation .`"
        )
    if torch.__version__ != version:
        fail(
            f"the build imported torch {torch.__version__} but {version} is installed; "
            "run `pip install --no-build-isolation .`"
        )
    print(f"rlhf_ext build: build isolation is on; compiling against the installed torch {version} ({site})")
    return torch


def use_cuda(torch, cpp_extension) -> bool:
    if FORCE_CUDA == "0":
        return False
    have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if FORCE_CUDA == "1" and not have_cuda:
        fail(
            f"RLHF_EXT_FORCE_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
            f"CUDA_HOME={cpp_extension.CUDA_HOME!r}; install a CUDA build of torch and the CUDA toolkit."
        )
    return have_cuda


def sources():
    """(C++ sources, CUDA bindings, headers) under csrc/: ops.cpp, checks/ and cpu/ are C++; cuda/*.cu the bindings."""

    def under_csrc(pattern):
        return sorted(glob.glob(os.path.join("csrc", "**", pattern), recursive=True))

    return under_csrc("*.cpp"), under_csrc("*.cu"), under_csrc("*.h") + under_csrc("*.cuh")


def write_build_record(torch_version: str, cuda_version):
    """rlhf_ext/_build_record.py: what the compiled core was built against, read by `import rlhf_ext`
    before it loads the .so (a core built against another torch can crash while loading)."""
    path = os.path.join(ROOT, "rlhf_ext", "_build_record.py")
    text = (
        '"""Written by setup.py when the compiled core is built; not in git."""\n\n'
        f"TORCH_VERSION = {torch_version!r}\nCUDA_VERSION = {cuda_version!r}\n"
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build_plan():
    """(ext_modules, cmdclass, torch requirement)."""
    cpu_sources, cuda_sources, headers = sources()
    if set(sys.argv[1:2]) & SOURCE_ONLY:
        # Packing the sources: a plain Extension lists them (with the headers as depends, so the sdist
        # carries them); it is never compiled from here.
        return [Extension("rlhf_ext._C", cpu_sources, depends=headers + cuda_sources)], {}, "torch>=2.4"
    torch = import_torch()
    from torch.utils import cpp_extension

    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cxx_flags = ["-O3", "-fopenmp", '-DRLHF_EXT_TORCH_VERSION="' + torch.__version__ + '"']
    with_cuda = use_cuda(torch, cpp_extension)
    if with_cuda:
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        cxx_flags += ["-DRLHF_EXT_WITH_CUDA", f'-DRLHF_EXT_CUDA_ARCHS="{arch_list}"']
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "-DRLHF_EXT_WITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            "rlhf_ext._C",
            cpu_sources + cuda_sources,
            depends=headers,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "rlhf_ext._C",
            cpu_sources,
            depends=headers,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    write_build_record(torch.__version__, torch.version.cuda if with_cuda else None)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    # A compiled torch extension runs only with the torch (major.minor) it was compiled against.
    return [ext], cmdclass, f"torch=={major_minor}.*"


ext_modules, cmdclass, torch_requirement = build_plan()
setup(
    packages=find_packages(include=["rlhf_ext", "rlhf_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[torch_requirement, *RUNTIME_DEPENDENCIES],
)
