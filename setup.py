"""Build the rlhf_ext compiled core: a C++17 CPU extension always, CUDA kernels where torch has CUDA.

Build knobs (environment variables, read once here and listed in the README):
  RLHF_EXT_FORCE_CUDA=0|1   force the CUDA kernels off (0) or on (1); default: on when torch.version.cuda
                            and CUDA_HOME are both there (never decided by whether a GPU is visible)
  TORCH_CUDA_ARCH_LIST      CUDA architectures to build for (default "8.0;9.0")
  MAX_JOBS                  parallel compile jobs for ninja
"""
import glob
import os
import sys

FORCE_CUDA = os.environ.get("RLHF_EXT_FORCE_CUDA")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "rlhf_ext: torch must be installed before building: `pip install torch` first, "
        "then `pip install --no-build-isolation .` (the extension is compiled against the installed torch)."
    )

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def use_cuda() -> bool:
    if FORCE_CUDA == "0":
        return False
    have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if FORCE_CUDA == "1" and not have_cuda:
        sys.exit(
            "rlhf_ext: RLHF_EXT_FORCE_CUDA=1 but torch.version.cuda="
            f"{torch.version.cuda!r} and CUDA_HOME={cpp_extension.CUDA_HOME!r}; install a CUDA build of torch."
        )
    return have_cuda


def extension():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-DRLHF_EXT_TORCH_VERSION=\"" + torch.__version__ + "\""]
    if not use_cuda():
        return cpp_extension.CppExtension(
            "rlhf_ext._C", cpu_sources,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    cxx_flags += ["-DRLHF_EXT_WITH_CUDA", f"-DRLHF_EXT_CUDA_ARCHS=\"{arch_list}\""]
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "-DRLHF_EXT_WITH_CUDA"]
    return cpp_extension.CUDAExtension(
        "rlhf_ext._C", cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["rlhf_ext", "rlhf_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
