"""Fully sharded data parallelism for PPO and GRPO: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`).

Asked for the way Hugging Face users already ask for it: an accelerate config with
`distributed_type: FSDP` (`accelerate launch --config_file fsdp.yaml ...` exports ACCELERATE_USE_FSDP and
FSDP_* variables), or `fsdp=True` / `fsdp_config={...}` in the trainer config. accelerate's own
`FullyShardedDataParallelPlugin` parses either, so the option names and defaults are accelerate's.

What each option does here:
- FULL_SHARD / `reshard_after_forward: true` (ZeRO-3-like): weights, gradients and optimizer states are
  sharded; every unit is all-gathered for its forward and again for its backward.
- SHARD_GRAD_OP / `reshard_after_forward: false` (ZeRO-2-like): gradients and optimizer states are sharded,
  weights stay gathered between forward and backward.
- NO_SHARD: plain data parallelism (every rank holds the weights), as without FSDP.
- TRANSFORMER_BASED_WRAP (default): each `transformer_layer_cls_to_wrap` module (default: the model's
  `_no_split_modules`, e.g. LlamaDecoderLayer) is its own unit; NO_WRAP: one unit per model.
- `activation_checkpointing: true`: the trained models recompute activations in backward.
- `state_dict_type`: checkpoints always hold full Hugging Face weights (loadable without FSDP) and the
  optimizer state with every tensor gathered in full, written by rank 0; each rank takes its shards back
  on resume.
- LoRA (`peft_config`): the frozen base and the adapter are sharded together; the reference is the same
  sharded model with its adapter switched off; checkpoints hold the adapter (or, with
  `save_model(merge_adapter=True)`, merged full weights).
Refused by name: CPU offload of parameters, HYBRID_SHARD, SIZE_BASED_WRAP, and an optimizer built by the
caller (FSDP replaces the parameters it would hold).

How the trainers use a sharded model: every model (policy, critic, reference) is wrapped by a root module
whose forward runs an arbitrary function on the model (`ShardedModel.run`), so the log-prob helpers can call
the backbone and the lm_head weight directly and still see gathered weights, and gradients of every unit are
reduce-scattered after backward. Generation runs with the whole model gathered (`ShardedModel.gathered`):
inside it no collective runs, so ranks may take different numbers of decode steps (like TRL's
`ds3_gather_for_generation`). Reward models are frozen and small next to the policy: they stay replicated.
"""

import contextlib
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from rlhf_ext.trainers.base_config import env_flag


@dataclass(frozen=True)
class FSDPPlan:
    reshard_after_forward: bool  # True: FULL_SHARD; False: SHARD_GRAD_OP
    wrap_layers: bool  # False: NO_WRAP (one unit per model)
    layer_classes: Optional[tuple[str, ...]]  # None: each model's _no_split_modules
    activation_checkpointing: bool
    source: str  # what asked for FSDP, for error messages


def _requested_plugin(args):
    """(accelerate FullyShardedDataParallelPlugin, what asked) or (None, None)."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if getattr(args, "fsdp", None) and plugin_args is not None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        return FullyShardedDataParallelPlugin(**plugin_args), "fsdp/fsdp_config"
    if env_flag("ACCELERATE_USE_FSDP"):
        from accelerate.utils import FullyShardedDataParallelPlugin

        return FullyShardedDataParallelPlugin(), "the accelerate config (distributed_type: FSDP)"
    return None, None


def fsdp_plan(args, trainer_name: str) -> Optional[FSDPPlan]:
    """The FSDP plan asked for by `args` or by the accelerate launch environment; None for none (or NO_SHARD)."""
    plugin, source = _requested_plugin(args)
    if plugin is None:
        return None

    def refuse(what: str, hint: str):
        raise ValueError(f"{trainer_name}: {source} asks for {what}, which rlhf_ext's FSDP does not support; {hint}")

    if int(plugin.fsdp_version) == 1:
        strategy = getattr(plugin.sharding_strategy, "name", None) or "FULL_SHARD"
        if strategy == "NO_SHARD":
            return None
        if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            refuse(
                f"sharding_strategy={strategy}", "use FULL_SHARD or SHARD_GRAD_OP (hybrid sharding needs a 2-D mesh)"
            )
        reshard = strategy == "FULL_SHARD"
        offload = bool(getattr(plugin.cpu_offload, "offload_params", False))
    else:
        reshard = True if plugin.reshard_after_forward is None else plugin.reshard_after_forward
        if not isinstance(reshard, bool):
            refuse(f"reshard_after_forward={reshard!r}", "use true (FULL_SHARD) or false (SHARD_GRAD_OP)")
        offload = type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy"
    if offload:
        refuse(
            "CPU offload of the parameters (offload_params / cpu_offload)", "drop it, or use LoRA to shrink what trains"
        )
    policy = plugin.auto_wrap_policy
    policy_name = getattr(policy, "__name__", type(policy).__name__) if policy is not None else None
    if policy_name is not None and "transformer" not in policy_name:
        refuse(f"auto_wrap_policy={policy_name}", "use TRANSFORMER_BASED_WRAP (the default) or NO_WRAP")
    classes = plugin.transformer_cls_names_to_wrap
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    return FSDPPlan(
        reshard_after_forward=reshard,
        wrap_layers=policy is not None,
        layer_classes=tuple(classes) if classes else None,
        activation_checkpointing=bool(plugin.activation_checkpointing),
        source=source,
    )


class _Root(nn.Module):
    """The FSDP root around a model: its forward runs `fn(model, ...)`, so whatever `fn` does with the
    model (its forward, its backbone, its lm_head weight, generation) happens with the root's parameters
    gathered, and backward reduce-scatters the root's gradients when it ends."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


class ShardedModel:
    """A model whose parameters `fully_shard` has replaced by DTensor shards (the model object stays the
    one the trainer holds; only its parameters change)."""

    def __init__(self, model: nn.Module, plan: FSDPPlan, name: str):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        self.model, self.name = model, name
        if plan.wrap_layers:
            classes = plan.layer_classes or tuple(getattr(model, "_no_split_modules", None) or ())
            present = {type(m).__name__ for m in model.modules()}
            if plan.layer_classes and not set(classes) & present:
                raise ValueError(
                    f"{name}: transformer_layer_cls_to_wrap={list(classes)} matches no module of "
                    f"{type(model).__name__}; its layer classes include {sorted(present)[:12]}"
                )
            for module in model.modules():
                if type(module).__name__ in classes:
                    fully_shard(module, reshard_after_forward=plan.reshard_after_forward)
        self.root = _Root(model)
        fully_shard(self.root, reshard_after_forward=plan.reshard_after_forward)
        self.units = [m for m in self.root.modules() if isinstance(m, FSDPModule)]
        self.reshard_after_forward = plan.reshard_after_forward
        self._gathered = 0
        with torch.no_grad():  # initialise FSDP with this root now, before any unit runs on its own
            self.run(lambda m: None)
        # From here on, outside `run`/`gathered`, the model's parameters are its DTensor shards (what an
        # optimizer must be built over).

    def run(self, fn, *args, **kwargs):
        """`fn(model, *args, **kwargs)` with the weights gathered as it needs them (collective: every rank
        must make the same sequence of calls)."""
        if self._gathered:
            return fn(self.model, *args, **kwargs)
        with warnings.catch_warnings():
            # FSDP warns that an output which is a view would lose its pre-backward hook to an in-place op; the
            # trainers never modify these outputs in place.
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            out = self.root(fn, *args, **kwargs)
        if not torch.is_grad_enabled():  # no backward will come to reshard (e.g. the frozen reference)
            for unit in self.units:
                unit.reshard()
        return out

    @contextlib.contextmanager
    def gathered(self):
        """Every parameter in full for the block (one all-gather per unit on entry, none inside), then
        sharded again. For no-grad work whose number of forward calls may differ across ranks."""
        if torch.is_grad_enabled():  # FSDP's hooks are bypassed inside: gradients would miss the shards
            raise RuntimeError(
                f"{self.name}: gathered() is for no-grad work (generation, evaluation); wrap it in torch.no_grad()"
            )
        if self._gathered:
            self._gathered += 1
            try:
                yield
            finally:
                self._gathered -= 1
            return
        for unit in self.units:
            if unit is not self.root:
                unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        self._gathered = 1
        try:
            yield
        finally:
            self._gathered = 0
            for unit in self.units:
                unit.reshard()
                if unit is not self.root:
                    unit.set_reshard_after_forward(self.reshard_after_forward, recurse=False)

    # ---- state ----
    def full_state_dict(self) -> dict:
        """Full weights on rank 0 (CPU), {} elsewhere. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, state: dict, source: str = "checkpoint"):
        """Load full weights (every rank passes the same full `state`) into the shards: a whole model's, or a
        peft adapter's as `save_pretrained` writes it (keys without the adapter name). Every key must name a
        weight of the model; a plain model may only lack weights tied to loaded ones."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from rlhf_ext.trainers.lora import is_peft_model

        params = dict(self.model.named_parameters(remove_duplicate=False))
        own = {**params, **dict(self.model.named_buffers())}
        adapter = is_peft_model(self.model)
        if adapter:  # adapter files drop the adapter name: "...lora_A.weight" is "...lora_A.default.weight"
            alias = {}
            for name in own:
                for adapter_name in self.model.peft_config:
                    short = name.replace(f".{adapter_name}.", ".")
                    if short != name:
                        alias[short] = name
            state = {alias.get(k, k): v for k, v in state.items()}
        unknown = [k for k in state if k not in own]
        if unknown:
            raise KeyError(f"{source}: has weights {self.name} does not: {unknown[:5]}")
        if not adapter:
            loaded = {id(own[k]) for k in state}
            missing = [k for k, t in params.items() if k not in state and id(t) not in loaded]
            if missing:
                raise KeyError(f"{source}: lacks weights of {self.name}: {missing[:5]}")
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered in full (on CPU). Collective."""
    sd = optimizer.state_dict()
    state = {}
    for index in sorted(sd["state"]):  # the same order on every rank
        state[index] = {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in sd["state"][index].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, full: dict):
    """Load a full optimizer state (as `full_optimizer_state` writes it) into an optimizer over sharded
    parameters: each rank keeps its own shard of every per-parameter tensor."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in full["state"].items():
        param = params[int(index)]
        if _is_dtensor(param):
            entry = {
                k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
                if torch.is_tensor(v) and v.shape == param.shape
                else v
                for k, v in entry.items()
            }
        state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def optimizer_param_groups(params: list, weight_decay: float, split_shards: bool) -> list:
    """AdamW parameter groups: weight decay on matrices, none on biases and norm weights (fewer than 2 dims). With
    `split_shards` DTensor shards and plain tensors (a replicated value head) get groups of their own: one optimizer
    kernel cannot mix them."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    if split_shards:
        groups = [
            {**g, "params": [p for p in g["params"] if _is_dtensor(p) == sharded]}
            for g in groups
            for sharded in (True, False)
        ]
        groups = [g for g in groups if g["params"]]
    return groups


def clip_grad_norm(params: list, max_norm: float, dist) -> torch.Tensor:
    """Global gradient norm over sharded (DTensor) and replicated gradients, and in-place clipping to
    `max_norm` (torch's rule: scale by min(1, max_norm / (norm + 1e-6))). Replicated gradients must
    already be averaged. Collective."""
    sharded = [p.grad.to_local() for p in params if p.grad is not None and _is_dtensor(p.grad)]
    plain = [p.grad for p in params if p.grad is not None and not _is_dtensor(p.grad)]
    device = (sharded or plain)[0].device if (sharded or plain) else torch.device("cpu")
    local = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        local += g.float().pow(2).sum()
    total = dist.sum(local)  # the shards are disjoint: their squares add up over ranks
    for g in plain:
        total = total + g.float().pow(2).sum()
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in sharded + plain:
        g.mul_(coef.to(g.dtype))
    return norm
