"""What every rlhf_ext trainer shares: model loading (object or local path), optimizer and schedule,
mixed precision, saving in HF format, atomic checkpoints with exact resume, and the step bookkeeping
around `Reporter`. Each algorithm file keeps its own update loop, top to bottom.
"""

import contextlib
import ctypes
import functools
import os
import platform
import time
from typing import Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import TrainerState

from rlhf_ext.trainers import checkpoint as ckpt
from rlhf_ext.trainers.base_config import TrainerConfig
from rlhf_ext.trainers.data import prepare_dataset
from rlhf_ext.trainers.distributed import Distributed
from rlhf_ext.trainers.experience import autocast, sample_completions
from rlhf_ext.trainers.loading import disable_dropout
from rlhf_ext.trainers.lora import apply_peft
from rlhf_ext.trainers.reporting import Reporter
from rlhf_ext.trainers.sharding import (
    ShardedModel,
    clip_grad_norm,
    fsdp_plan,
    optimizer_param_groups,
)


@functools.cache
def reuse_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, once per process; returns whether it applies (glibc only).

    By default a block of 32 MB or more (a [512, 32000] float32 logits tensor, a [32000, 256] gradient) is served
    by its own mmap and unmapped on free, so every allocation of it starts from fresh pages that the kernel
    zeroes on first touch: filling a new 65 MB tensor took 35 ms here, a reused one 3 ms. mallopt(M_MMAP_MAX, 0)
    serves every block from the heap and M_TRIM_THRESHOLD at its maximum keeps the heap's top, so freed memory
    is handed to the next tensor instead. Process-wide: resident memory stays at its peak instead of shrinking.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss, gradient norm or weight; nothing non-finite was applied or saved."""


class BaseTrainer:
    """Holds args, device, models to train, optimizer, scheduler, the Reporter and the process group."""

    # The keys `train` logs at each step ("*" stands for a reward source's name): what a dashboard can rely on.
    metric_keys: tuple = ()
    progress_keys: dict = {}  # progress-bar label -> metric key
    supports_multi_process: bool = False  # PPO and GRPO train data-parallel under torchrun / accelerate launch

    def __init__(self, args: TrainerConfig, processing_class, callbacks=None):
        if not isinstance(args, TrainerConfig):
            raise TypeError(f"args: expected a {TrainerConfig.__name__} subclass instance, got {type(args).__name__}")
        from transformers import enable_full_determinism, set_seed

        self.args = args
        (enable_full_determinism if args.full_determinism else set_seed)(args.seed)
        if args.log_level != "passive":
            import transformers

            transformers.logging.set_verbosity(transformers.logging.get_log_levels_dict()[args.log_level])
        # Under torchrun on CPU TrainingArguments gives "cpu:0", which torch.load cannot map back: use plain "cpu".
        self.device = torch.device("cpu") if torch.device(args.device).type == "cpu" else args.device
        if args.reuse_freed_cpu_memory and self.device.type == "cpu":
            reuse_freed_cpu_memory()
        self.dist = Distributed(args, type(self).__name__, self.supports_multi_process)
        # FSDP (an accelerate FSDP config or fsdp=/fsdp_config): the trained models are sharded by `shard_models`.
        self.fsdp = fsdp_plan(args, type(self).__name__)
        if self.fsdp is not None and not self.supports_multi_process:
            raise ValueError(
                f"{type(self).__name__}: {self.fsdp.source} asks for FSDP, but this trainer runs in a single "
                "process; FSDP applies to PPOTrainer and GRPOTrainer/RLOOTrainer"
            )
        self._sharded: dict = {}  # id(model) -> ShardedModel
        self.processing_class = processing_class
        self.callbacks = list(callbacks or [])
        self.optimizer = None
        self.lr_scheduler = None
        self.reporter: Optional[Reporter] = None
        self._state_before_training = TrainerState(
            is_world_process_zero=self.dist.is_main, is_local_process_zero=args.local_process_index == 0
        )

    # ---- what TRL's trainers (transformers.Trainer subclasses) offer scripts and callbacks ----
    @property
    def state(self) -> TrainerState:
        """The run's transformers.TrainerState (global_step, log_history, ...), also before train()."""
        return self.reporter.state if self.reporter is not None else self._state_before_training

    def add_callback(self, callback):
        """Add a TrainerCallback (an instance or a class); it receives the events from the next one on."""
        self.callbacks.append(callback)
        if self.reporter is not None:
            self.reporter.callbacks.append(callback() if isinstance(callback, type) else callback)

    def log(self, logs: dict, start_time: Optional[float] = None):
        """Record `logs` at the current step: log_history, metrics.jsonl, TensorBoard and on_log once training
        has begun; before train() only state.log_history (train() keeps it)."""
        if self.reporter is None:
            self._state_before_training.log_history.append({**{k: float(v) for k, v in logs.items()}, "step": 0})
        else:
            self.reporter.log(logs)

    def is_world_process_zero(self) -> bool:
        return self.dist.is_main

    def is_local_process_zero(self) -> bool:
        return self.args.local_process_index == 0

    # ---- models ----
    def apply_peft(self, model: nn.Module, peft_config, name: str = "model") -> nn.Module:
        """`model` with the `peft_config` adapter (only the adapter trains), or unchanged when it is None."""
        return apply_peft(model, peft_config, name)

    def prepare_model(self, model: nn.Module, trainable: bool) -> nn.Module:
        model = model.to(self.device)
        if self.args.disable_dropout:
            disable_dropout(model)
        if trainable:
            args = self.args
            # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old names mirror it)
            fsdp_checkpointing = self.fsdp is not None and self.fsdp.activation_checkpointing
            if getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing or fsdp_checkpointing:
                kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
                kwargs = kwargs or {"use_reentrant": False}
                if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
                    model.enable_input_require_grads()  # reentrant checkpoints of a frozen (LoRA) base need it
                if hasattr(model, "activation_checkpointing_enable"):
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.requires_grad_(False)
            model.eval()
        return model

    # ---- data ----
    def load_datasets(self, train_dataset, eval_dataset, tokenize, expected: str = ""):
        """Sets train_dataset (required; `expected` says what it should hold) and eval_dataset (required when
        eval_strategy evaluates), each through `data.prepare_dataset`."""
        if train_dataset is None:
            raise ValueError("train_dataset: required" + (f" ({expected})" if expected else ""))
        self.train_dataset = prepare_dataset(train_dataset, "train_dataset", tokenize)
        self.eval_dataset = prepare_dataset(eval_dataset, "eval_dataset", tokenize)
        if self.args.eval_strategy != "no" and self.eval_dataset is None:
            raise ValueError(f"eval_strategy={self.args.eval_strategy.value!r} needs an eval_dataset")

    def shard_models(self, models: dict, optimizers=(None, None)):
        """Shard {name: model} with FSDP when it was asked for and several processes run (call after
        `broadcast_parameters`, before the optimizer is created). One process: nothing to shard."""
        if self.fsdp is None:
            return
        name = type(self).__name__
        if optimizers is not None and optimizers[0] is not None:
            raise ValueError(
                f"optimizers: {name} builds its optimizer itself under FSDP ({self.fsdp.source}); "
                "fully_shard replaces the parameters an optimizer built beforehand would hold"
            )
        if not self.dist.enabled:  # one process: FSDP would shard over one rank, i.e. change nothing
            return
        for key, model in models.items():
            if model is not None:
                self._sharded[id(model)] = ShardedModel(model, self.fsdp, key)

    def sharded(self, model) -> Optional[ShardedModel]:
        return self._sharded.get(id(model)) if model is not None else None

    def run(self, model, fn, *args, **kwargs):
        """`fn(model, *args, **kwargs)`; for an FSDP-sharded model inside its root's forward (weights gathered
        as needed, gradients reduce-scattered after backward). Every rank must make the same calls."""
        sharded = self.sharded(model)
        return sharded.run(fn, *args, **kwargs) if sharded is not None else fn(model, *args, **kwargs)

    def gathered(self, *models):
        """A context in which the FSDP-sharded `models` are held in full (no collective inside it: ranks may
        generate different numbers of tokens). A no-op for unsharded models."""
        stack = contextlib.ExitStack()
        for model in models:
            sharded = self.sharded(model)
            if sharded is not None:
                stack.enter_context(sharded.gathered())
        return stack

    def autocast(self):
        return autocast(self.args, self.device)

    def sample(self, rows: dict, step: int, row_offset: int, chunk_size: Optional[int]) -> tuple:
        """(rollout, seconds): completions of this process's prompts `rows["input_ids"]` (global rows `row_offset`,
        ... of step `step`, which key the sampling: experience.sample_completions), `chunk_size` rows at a time.
        Under FSDP the policy's weights are held in full meanwhile, with no collective inside (decode lengths
        differ by rank)."""
        timer = time.perf_counter()
        with self.gathered(self.policy):
            rollout = sample_completions(
                self.policy,
                rows["input_ids"],
                self.sampling,
                seed=self.args.seed,
                step=step,
                row_offset=row_offset,
                chunk_size=chunk_size,
            )
        return rollout, time.perf_counter() - timer

    # ---- optimisation ----
    def create_optimizer_and_scheduler(self, modules: list, num_training_steps: int, optimizers=(None, None)):
        """AdamW over the trainable parameters of `modules` (no weight decay on biases and norm weights,
        i.e. tensors with fewer than 2 dims) and the `lr_scheduler_type` schedule; or the pair given."""
        from transformers import get_scheduler

        optimizer, scheduler = optimizers if optimizers is not None else (None, None)
        if optimizer is None:
            args = self.args
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            if self._sharded and any(
                self.sharded(m) and not isinstance(p, DTensor) for m in modules for p in m.parameters()
            ):
                raise RuntimeError(
                    "create_optimizer_and_scheduler: an FSDP model holds gathered parameters here; "
                    "the optimizer must be built over its shards"
                )
            groups = optimizer_param_groups(params, args.weight_decay, split_shards=bool(self._sharded))
            kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
            optimizer = torch.optim.AdamW(groups, fused=args.optim == "adamw_torch_fused" or None, **kwargs)
        if scheduler is None:
            scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer,
                num_warmup_steps=self.args.warmup_for(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {},
            )
        self.optimizer, self.lr_scheduler = optimizer, scheduler

    def clip_and_step(self, params: list) -> torch.Tensor:
        """Average the gradients over processes, clip their norm (max_grad_norm), step the optimizer, zero
        the grads. Returns the pre-clip norm (a 0-dim tensor on the device, so callers choose when to sync)."""
        if self._sharded:  # FSDP already averaged (and sharded) its gradients; replicated ones still need it
            self.dist.average_gradients([p for p in params if not isinstance(p, DTensor)])
            norm = clip_grad_norm(params, self.args.max_grad_norm or float("inf"), self.dist)
        else:
            self.dist.average_gradients(params)
            norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm or float("inf"))
        # One host sync per optimizer step: stepping on inf/nan gradients would make every weight non-finite.
        if not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.stop_non_finite("gradient norm", float(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def step_optimizer(self, params: list) -> dict:
        """`clip_and_step`, then the schedule: {"grad_norm", "learning_rate"} (the rate this step was taken with)."""
        grad_norm = float(self.clip_and_step(params))
        learning_rate = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        return {"grad_norm": grad_norm, "learning_rate": learning_rate}

    # ---- non-finite values stop training ----
    @staticmethod
    def is_loss_metric(key: str) -> bool:
        """Metrics that are losses ("loss", "loss/policy_avg", "eval_loss"): a non-finite one stops training."""
        return key == "loss" or key.startswith("loss/") or key.endswith("_loss")

    def stop_non_finite(self, quantity: str, value: float):
        """Raise NonFiniteError naming the step (1-based, as logged) and the quantity, and where the last good
        checkpoint is. Called before the optimizer step or the save that would spread the value."""
        step = self.reporter.state.global_step + 1 if self.reporter is not None else 0
        last = ckpt.latest_checkpoint(self.args.output_dir) if self.args.output_dir else None
        kept = f"; the last checkpoint, {last}, was written before it" if last else "; no checkpoint was written"
        raise NonFiniteError(
            f"step {step}: the {quantity} is {value} (non-finite); training stopped before the "
            f"optimizer step or save that would use it{kept}. Check the data (NaN/inf values), "
            "the learning rate and the precision (fp16/bf16)"
        )

    def check_finite_metrics(self, metrics: dict):
        for key, value in metrics.items():
            if self.is_loss_metric(key) or key == "grad_norm":
                if isinstance(value, (int, float, torch.Tensor)) and not torch.isfinite(torch.as_tensor(value)).all():
                    self.stop_non_finite(key if key != "grad_norm" else "gradient norm", float(value))

    def check_finite_weights(self):
        """Every parameter of the models about to be checkpointed is finite (FSDP shards are covered by the
        gradient-norm check, which every rank takes the same way)."""
        for sub, module in self.models_to_save().items():
            if self.sharded(module):
                continue
            for param_name, param in module.named_parameters():
                if not bool(torch.isfinite(param.detach()).all()):
                    self.stop_non_finite(f"weight {'/'.join(filter(None, [sub, param_name]))}", float("nan"))

    # ---- saving ----
    def models_to_save(self) -> dict:
        """{subfolder: module}; "" is the main model. Overridden by each trainer."""
        raise NotImplementedError

    def save_model(self, output_dir: Optional[str] = None, merge_adapter: bool = False):
        """Every model in HF format (`save_pretrained`; a bare head as safetensors) plus the tokenizer. A LoRA
        model saves its adapter, or with `merge_adapter=True` the base weights with the adapter merged in.
        Only the main process writes (call it from every process: FSDP-sharded weights are gathered)."""
        states = self.gather_models()
        if self.dist.is_main:
            ckpt.write_models(
                self.models_to_save(), states, output_dir or self.args.output_dir, self.processing_class, merge_adapter
            )

    def gather_models(self) -> dict:
        """{subfolder: full state dict} of the FSDP-sharded models (on rank 0). Collective."""
        return {sub: self.sharded(m).full_state_dict() for sub, m in self.models_to_save().items() if self.sharded(m)}

    def trainer_extra_state(self) -> dict:
        """Algorithm state that a resumed run needs (e.g. the KL controller). JSON-serialisable."""
        return {}

    def load_trainer_extra_state(self, state: dict):
        pass

    def rng_generators(self) -> dict:
        """Named torch.Generators whose states go into checkpoints."""
        return {}

    def checkpoint_payload(self) -> dict:
        """{file name: object} saved with torch.save next to the weights. Runs on every process (it may use
        collectives); only the main process writes. Read back by `load_checkpoint_payload`."""
        return {}

    def load_checkpoint_payload(self, path: str):
        pass

    def save_checkpoint(self) -> str:
        """A checkpoint of the current step (see `checkpoint.write_trainer_checkpoint`); every process calls it."""
        path = ckpt.write_trainer_checkpoint(self)
        self.reporter.saved(path)
        return path

    def save_state(self) -> str:
        """A full checkpoint at the current step (as every save_steps does) and trainer_state.json in
        output_dir (what HF's Trainer.save_state writes). Returns the checkpoint folder."""
        if self.reporter is None or self.optimizer is None:
            raise RuntimeError("save_state: nothing to save before train() has started")
        path = self.save_checkpoint()
        if self.dist.is_main:
            self.reporter.state.save_to_json(os.path.join(self.args.output_dir, "trainer_state.json"))
        return path

    def resolve_checkpoint(self, resume_from_checkpoint) -> Optional[str]:
        return ckpt.resolve_checkpoint(self.args.output_dir, resume_from_checkpoint)

    def load_checkpoint(self, path: str) -> int:
        """Restore the state `save_checkpoint` wrote at `path` (see `checkpoint.read_trainer_checkpoint`); returns
        its step."""
        return ckpt.read_trainer_checkpoint(self, path)

    # ---- the loop's bookkeeping ----
    def begin_training(
        self, total_steps: int, steps_per_epoch: int, batch_size: int, resume_from_checkpoint, model_for_callbacks
    ) -> int:
        """Creates the Reporter, restores a checkpoint if asked; returns the first step to run."""
        self.reporter = Reporter(
            self.args,
            self.callbacks,
            self.progress_keys,
            model=model_for_callbacks,
            processing_class=self.processing_class,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
        )
        path = self.resolve_checkpoint(resume_from_checkpoint)
        start = self.load_checkpoint(path) if path else 0
        if start > total_steps:
            raise ValueError(
                f"resume_from_checkpoint: {path} is at step {start}, beyond this run's {total_steps} steps"
            )
        self.reporter.begin(total_steps, start, steps_per_epoch, batch_size)
        if start == 0:  # what log() recorded before train() stays in the history
            self.reporter.state.log_history[:0] = self._state_before_training.log_history
        return start

    def train_windows(self, model: nn.Module, resume_from_checkpoint, window_metrics) -> TrainerState:
        """The loop of the single-model trainers (SFT, reward): each step takes a window of
        per_device_train_batch_size x gradient_accumulation_steps rows, and `window_metrics(rows, step)` trains on
        it (backward, `step_optimizer`) and returns the step's metrics; then logging, checkpoints, evaluation."""
        from rlhf_ext.trainers.data import StepBatches

        args = self.args
        window = args.per_device_train_batch_size * args.gradient_accumulation_steps
        batches = StepBatches(len(self.train_dataset), window, args.seed if args.data_seed is None else args.data_seed)
        total_steps = batches.total_steps(args.num_train_epochs, args.max_steps)
        self.create_optimizer_and_scheduler([model], total_steps, self._optimizers)
        start = self.begin_training(
            total_steps, batches.batches_per_epoch, window, resume_from_checkpoint or args.resume_from_checkpoint, model
        )
        model.train()
        for step in range(start, total_steps):
            self.reporter.step_begin()
            if self.end_step(window_metrics(self.train_dataset[batches.indices(step)], step)):
                break
        self.end_training()
        return self.reporter.state

    @torch.no_grad()
    def map_eval_batches(self, model: nn.Module, data, fn) -> list:
        """`[fn(rows), ...]` over per_device_eval_batch_size rows of `data` at a time, `model` in eval mode (its
        mode restored afterwards)."""
        was_training = model.training
        model.eval()
        size = self.args.per_device_eval_batch_size
        try:
            return [fn(data[first : first + size]) for first in range(0, len(data), size)]
        finally:
            model.train(was_training)

    def end_step(self, metrics: dict) -> bool:
        """Log, checkpoint and evaluate when due; returns True when training should stop. A non-finite loss
        or gradient norm stops training here, before the step is counted or checkpointed."""
        self.check_finite_metrics(metrics)
        self.reporter.step_end(metrics)
        if self.reporter.should_evaluate():
            self.evaluate_and_log()
        if self.reporter.should_save():
            self.save_checkpoint()
        return self.reporter.control.should_training_stop

    def evaluate(self) -> dict:
        """Evaluation metrics ("eval_..." or "eval/..."); each trainer defines its own."""
        raise NotImplementedError

    def evaluate_and_log(self):
        self.reporter.evaluated(self.evaluate())

    def end_training(self):
        self.reporter.flush()
        self.reporter.end()
