"""Small helpers shared by the op wrappers."""
import torch


def as_bool_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Accept bool or 0/1 masks of any dtype; the kernels take bool."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    return mask if mask.dtype == torch.bool else mask != 0


def out_float_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are float32 for float32/bf16/fp16 inputs and float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_same_device(reference_name: str, reference: torch.Tensor, **others) -> None:
    """Raise a clear error before dispatch when tensors live on different devices (dispatch would
    otherwise pick one device's kernel, or a fake one for meta tensors)."""
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise RuntimeError(
                f"{name}: expected a tensor on {reference.device} (the device of {reference_name}), got one on {tensor.device}"
            )
