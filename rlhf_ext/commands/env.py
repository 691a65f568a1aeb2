"""`rlhf-ext env`: how the compiled core was built and what this machine offers."""

import json
import platform


def register(subparsers):
    p = subparsers.add_parser("env", help="print the build facts of the compiled core and the environment")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    import rlhf_ext

    info = rlhf_ext.build_info()
    facts = {
        "rlhf_ext": rlhf_ext.__version__,
        "python": platform.python_version(),
        "torch (running)": torch.__version__,
        "torch (built against)": info["torch_version"],
        "cuda kernels built": info["cuda"],
        "cuda archs": info["cuda_archs"] or "-",
        "torch.version.cuda": torch.version.cuda or "-",
        "gpu visible": torch.cuda.is_available(),
        "openmp": info["openmp"],
        "cpu threads": info["num_threads"],
        "ops": sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("rlhf_ext::")),
    }
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:<{width}}  {value}")
    if info["torch_version"] != torch.__version__:
        print(
            "warning: the extension was built against another torch; rebuild with "
            "`pip install --no-build-isolation -e .`"
        )
    return 0
