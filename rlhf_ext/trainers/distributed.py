"""Multi-process data parallelism for the on-policy trainers (PPO, GRPO/RLOO/REINFORCE++).

Launch with `torchrun --nproc_per_node N script.py` or `accelerate launch --num_processes N script.py`:
`TrainingArguments` joins the process group those launchers describe (gloo on CPU, NCCL on GPU;
`ddp_backend` / `ddp_timeout` pick others). Every rank holds a full copy of the trained weights,
generates completions for its own share of the prompts and computes its share of the loss; the
gradients are then averaged across ranks with flattened all-reduces once per optimizer step. That
is DDP's arithmetic without DDP's module wrapper (our log-prob helpers call into the HF model and its
backbone directly, which a wrapper would hide). Statistics the algorithms need over the whole batch
(group rewards, whitening, token counts of the loss normaliser, metrics) are all-gathered or
all-reduced here. Only rank 0 writes checkpoints, metrics and samples.

With an FSDP config (accelerate's, or fsdp=/fsdp_config) the policy, critic and reference are sharded
instead (rlhf_ext.trainers.sharding); the statistics above are computed the same way. DeepSpeed configs are
refused when the trainer config is built (rlhf_ext.trainers.base_config).
"""

import dataclasses

import torch
import torch.distributed as td


def zero_fields(cls, device):
    """A dataclass of 0-dim float64 zeros on `device`: named statistics to add up, then `Distributed.sum_fields`."""
    return cls(**{f.name: torch.zeros((), dtype=torch.float64, device=device) for f in dataclasses.fields(cls)})


# Gradients are all-reduced in flat buckets of at most this many elements (fewer, larger messages).
_BUCKET_NUMEL = 32 * 1024 * 1024


class Distributed:
    """The process group as the trainers see it. With one process every collective is the identity."""

    def __init__(self, args, trainer_name: str, multi_process: bool = True):
        self.world_size = int(args.world_size)
        self.rank = int(args.process_index)
        self.is_main = self.rank == 0
        if self.world_size > 1:
            if not multi_process:
                raise ValueError(
                    f"{trainer_name}: runs in a single process, but {self.world_size} were launched "
                    "(torchrun / accelerate "
                    "launch). Launch it with one process; PPOTrainer and GRPOTrainer/RLOOTrainer support several."
                )
            if not td.is_initialized():
                raise RuntimeError(
                    f"{trainer_name}: WORLD_SIZE={self.world_size} but no torch.distributed process group "
                    "is initialised; launch with torchrun or accelerate launch"
                )
        self.device = torch.device("cpu") if torch.device(args.device).type == "cpu" else args.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ---- collectives ----
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along dim 0 (rank order). Shapes must match across ranks."""
        if not self.enabled:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        td.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor; the input is left alone)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone()
        td.all_reduce(out, op=td.ReduceOp.SUM)
        return out

    def sum_fields(self, stats):
        """A dataclass of 0-dim tensors summed over ranks in one all-reduce: the same dataclass, holding floats."""
        names = [f.name for f in dataclasses.fields(stats)]
        totals = self.sum(torch.stack([getattr(stats, name) for name in names]))
        return dataclasses.replace(stats, **dict(zip(names, totals.tolist())))

    def max(self, value: int) -> int:
        if not self.enabled:
            return value
        out = torch.tensor([value], dtype=torch.long, device=self.device)
        td.all_reduce(out, op=td.ReduceOp.MAX)
        return int(out)

    def mean(self, values: dict) -> dict:
        """{name: float} averaged over ranks (one all-reduce for all names; every rank must pass the same keys)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        totals = self.sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device))
        return {k: float(v) / self.world_size for k, v in zip(keys, totals.tolist())}

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.enabled:
            td.barrier()

    # ---- parameters and gradients ----
    def broadcast_parameters(self, modules: list):
        """Give every rank rank 0's weights and buffers (what DDP does at construction); None entries are skipped."""
        if not self.enabled:
            return
        with torch.no_grad():
            for module in modules:
                if module is None:
                    continue
                for tensor in [*module.parameters(), *module.buffers()]:
                    td.broadcast(tensor.data, src=0)

    def average_gradients(self, params: list):
        """Replace each gradient by its mean over ranks. Every rank runs the same code path, so the set of
        parameters holding a gradient is the same everywhere."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        bucket, size = [], 0
        for grad in grads:
            bucket.append(grad)
            size += grad.numel()
            if size >= _BUCKET_NUMEL:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, grads: list):
        by_dtype = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for same in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in same])
            td.all_reduce(flat, op=td.ReduceOp.SUM)
            flat.div_(self.world_size)
            offset = 0
            for grad in same:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()
