"""Training output shared by the trainers: progress bar, metrics.jsonl, TensorBoard and the
`transformers.TrainerCallback` events (on_train_begin, on_step_begin/end, on_log, on_save, on_evaluate,
on_train_end). Callbacks may stop training or ask for a log/save through the `TrainerControl` they return.
With several processes every rank keeps the same state and fires the callbacks (as HF's Trainer does);
only rank 0 draws the progress bar and writes metrics.jsonl / TensorBoard.
"""

import json
import math
import os
from typing import Optional

from transformers import TrainerControl, TrainerState

# Metrics that are counters or settings: the last value of a logging window, not its mean.
LAST_VALUE_KEYS = {"episode", "lr", "epoch", "objective/kl_coef"}


def interval(value: float, total_steps: int) -> int:
    """HF semantics: a value < 1 is a fraction of the run, else a step count."""
    if value is None or value <= 0:
        return 0
    return max(1, math.ceil(value * total_steps)) if value < 1 else int(value)


class Reporter:
    def __init__(self, args, callbacks=None, progress_keys: Optional[dict] = None, **callback_objects):
        self.args = args
        self.callbacks = [cb() if isinstance(cb, type) else cb for cb in (callbacks or [])]
        self.callback_objects = callback_objects  # model=, processing_class=, optimizer=, lr_scheduler=
        self.progress_keys = progress_keys or {}
        self.state = TrainerState()
        self.is_main = getattr(args, "process_index", 0) == 0
        self.state.is_world_process_zero = self.is_main
        self.state.is_local_process_zero = getattr(args, "local_process_index", 0) == 0
        self.control = TrainerControl()
        self.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        self._window = []
        self._bar = None
        self._tb = None

    # ---- callbacks ----
    def event(self, name: str, **kwargs):
        for callback in self.callbacks:
            result = getattr(callback, name)(self.args, self.state, self.control, **self.callback_objects, **kwargs)
            if isinstance(result, TrainerControl):
                self.control = result

    # ---- run boundaries ----
    def begin(self, total_steps: int, start_step: int, steps_per_epoch: int, train_batch_size: int):
        args = self.args
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.state.max_steps = total_steps
        self.state.global_step = start_step
        self.state.epoch = start_step / self.steps_per_epoch
        self.state.train_batch_size = train_batch_size
        self.state.num_train_epochs = math.ceil(total_steps / self.steps_per_epoch)
        self.state.logging_steps = interval(args.logging_steps, total_steps)
        self.state.save_steps = interval(args.save_steps, total_steps)
        self.state.eval_steps = interval(args.eval_steps or args.logging_steps, total_steps)
        if self.is_main:
            os.makedirs(args.output_dir, exist_ok=True)
            self._trim_metrics(start_step)
        if "tensorboard" in args.report_to and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=args.logging_dir, purge_step=start_step + 1 if start_step else None)
        if not args.disable_tqdm and self.is_main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self.event("on_train_begin")

    def end(self):
        self.event("on_train_end")
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _trim_metrics(self, start_step: int):
        # A resumed run rewrites the steps after its checkpoint: drop the interrupted run's lines for them.
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as fh:
            lines = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(lines)
        os.replace(tmp, self.metrics_path)

    # ---- per step ----
    def step_begin(self):
        self.event("on_step_begin")

    def step_end(self, metrics: dict):
        """Record one optimisation step's metrics, advance the step, fire on_step_end, and log when due."""
        self.state.global_step += 1
        self.state.epoch = self.state.global_step / self.steps_per_epoch
        self._window.append(metrics)
        if self._bar is not None:
            self._bar.update(1)
            postfix = {short: metrics[key] for short, key in self.progress_keys.items() if key in metrics}
            if postfix:
                self._bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)
        self.event("on_step_end")
        if self._should_log() or self.control.should_log:
            self.flush()
            self.control.should_log = False

    def _should_log(self) -> bool:
        args, step = self.args, self.state.global_step
        if args.logging_strategy == "no":
            return False
        if args.logging_first_step and step == 1:
            return True
        if step == self.state.max_steps:
            return True
        if args.logging_strategy == "epoch":
            return step % self.steps_per_epoch == 0
        return self.state.logging_steps > 0 and step % self.state.logging_steps == 0

    def flush(self):
        """Log the mean of the metrics recorded since the last log (last value for counters)."""
        if not self._window:
            return
        keys = list(dict.fromkeys(k for m in self._window for k in m))
        logs = {}
        for key in keys:
            values = [m[key] for m in self._window if key in m]
            logs[key] = values[-1] if key in LAST_VALUE_KEYS else sum(values) / len(values)
        self._window = []
        self.log(logs)

    def log(self, logs: dict):
        step = self.state.global_step
        logs = {k: float(v) for k, v in logs.items()}
        logs["epoch"] = round(self.state.epoch, 4)
        record = {"step": step, **logs}
        self.state.log_history.append(record)
        if self.is_main:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in logs.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        self.event("on_log", logs=logs)

    def write_rows(self, file_name: str, step: int, rows: list):
        """Append `rows` (dicts) to <output_dir>/file_name as JSON lines tagged with `step` (main process only)."""
        if not self.is_main:
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, file_name), "a") as fh:
            for row in rows:
                fh.write(json.dumps({"step": step, **row}, default=str) + "\n")

    # ---- saving and evaluation decisions ----
    def _due(self, strategy, every_steps) -> bool:
        """Whether a "steps"/"epoch" schedule falls on the current step ("no" never does)."""
        step = self.state.global_step
        if strategy == "steps":
            return every_steps > 0 and step % every_steps == 0
        if strategy == "epoch":
            return step % self.steps_per_epoch == 0
        return False

    def should_save(self) -> bool:
        return self._due(self.args.save_strategy, self.state.save_steps) or self.control.should_save

    def should_evaluate(self) -> bool:
        return self._due(self.args.eval_strategy, self.state.eval_steps) or self.control.should_evaluate

    def saved(self, path: str):
        self.control.should_save = False
        self.event("on_save", checkpoint=path)

    def evaluated(self, metrics: dict):
        self.control.should_evaluate = False
        self.log(metrics)
        self.event("on_evaluate", metrics=metrics)
