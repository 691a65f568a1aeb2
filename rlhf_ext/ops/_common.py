"""Small helpers shared by the op wrappers."""

import torch

# Device types with rlhf_ext kernels. Any other device (notably `meta`) would reach the fake
# implementation, whose outputs are uninitialised, or a dispatcher error that names no argument.
KERNEL_DEVICE_TYPES = ("cpu", "cuda")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def as_bool_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Accept bool or 0/1 masks of any dtype; the kernels take bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    return mask if mask.dtype == torch.bool else mask != 0


def out_float_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are float32 for float32/bf16/fp16 inputs and float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, value, optional: bool = False) -> None:
    """TypeError naming the argument when `value` is not a tensor (a list, a number...)."""
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32/bfloat16/float16/float64 tensor, got {tensor.dtype}")


def check_devices(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Before dispatch: every tensor argument is a tensor (None skipped), all on `reference`'s device, and
    that device has rlhf_ext kernels. Dispatch would otherwise pick one device's kernel for mixed devices,
    or the fake (meta) implementation, which returns uninitialised memory."""
    check_tensor(reference_name, reference)
    for name, tensor in others.items():
        check_tensor(name, tensor, optional=True)
    if reference.device.type not in KERNEL_DEVICE_TYPES:
        raise RuntimeError(
            f"{reference_name}: expected a tensor on cpu or cuda (the devices with rlhf_ext kernels), "
            f"got one on {reference.device}"
        )
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise RuntimeError(
                f"{name}: expected a tensor on {reference.device} (the device of {reference_name}), "
                f"got one on {tensor.device}"
            )


def check_cpu_float32(op: str, **tensors) -> None:
    """For the CPU-only ops (after check_devices): every tensor given (None skipped) is on the CPU and float32."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device.type != "cpu":
            raise RuntimeError(
                f"{name}: expected a tensor on cpu ({op} has only a CPU kernel), got one on {tensor.device}"
            )
        if tensor.dtype != torch.float32:
            raise TypeError(f"{name}: expected a float32 tensor, got {tensor.dtype}")
