"""`rlhf-ext demo`: the whole RLHF pipeline on the demo's world (rlhf_ext.demo.task), judged at the end by
the hidden true preference that neither the reward model nor PPO ever saw.

  1. sft     a byte-level BPE tokenizer trained on the generated corpus and a tiny Llama trained from
             scratch with SFTTrainer on (prompt, completion) reviews of mixed sentiment;
  2. pairs   two completions per prompt sampled from the SFT policy (rlhf_ext.label.pairs, i.e. the
             rollout engine), labelled by the noisy Bradley-Terry annotator;
  3. reward  RewardTrainer on those pairs (initialised from the SFT checkpoint with a fresh score head);
             held-out pairwise accuracy against the annotator's labels and against the hidden preference;
  4. ppo     PPOTrainer against the reward model with a per-token KL penalty to the SFT policy; every few
             steps the current policy is sampled on fixed held-out prompts and judged by the hidden score;
  5. eval    SFT and PPO policies, reloaded from their saved HF checkpoints, sampled on held-out prompts:
             mean true score, win rate of PPO against SFT, and the KL of PPO to the SFT reference.

Everything goes through the public trainers, ops and rollout engine; the report folder is described in
the README ("The demo").
"""

import dataclasses
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass

from rlhf_ext.demo import task
from rlhf_ext.demo.report import MetricsLog, plot_curves, write_samples, write_summary
from rlhf_ext.demo.sampling import mean, sample_and_score, win_rate

STAGES = ("sft", "pairs", "reward", "ppo", "eval")


@dataclass(frozen=True)
class DemoSizes:
    """How big each stage is. `FULL` is `rlhf-ext demo`, `QUICK` is `--quick` (every stage, smaller)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 512  # BPE target; the corpus has ~75 words, so every word ends up one token
    sft_examples: int = 4000
    sft_epochs: float = 2.0
    pair_prompts: int = 2000  # one pair per prompt (two samples); identical completions are dropped
    reward_eval_fraction: float = 0.15
    reward_epochs: float = 2.0
    ppo_steps: int = 60
    ppo_micro_batch: int = 16
    ppo_mini_batches: int = 4  # prompts per step = ppo_micro_batch * ppo_mini_batches (a minibatch: one micro-batch)
    track_every: int = 5  # PPO steps between held-out true-score measurements
    track_prompts: int = 128
    eval_prompts: int = 256
    eval_samples_per_prompt: int = 2
    max_new_tokens: int = 16  # the longest corpus completion is 12 words + EOS = 13 tokens


FULL = DemoSizes()
QUICK = dataclasses.replace(
    FULL,
    sft_examples=2000,
    sft_epochs=1.0,
    pair_prompts=240,
    reward_epochs=1.0,
    ppo_steps=4,
    ppo_micro_batch=8,
    ppo_mini_batches=2,
    track_every=2,
    track_prompts=16,
    eval_prompts=32,
    eval_samples_per_prompt=1,
)


def prompts(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [task.make_prompt(rng) for _ in range(n)]


class Demo:
    def __init__(
        self,
        output_dir: str,
        seed: int = 0,
        quick: bool = False,
        device: str = "cpu",
        progress: bool = False,
        threads: int = 1,
    ):
        self.out = output_dir
        self.seed = seed
        self.quick = quick
        self.sizes = QUICK if quick else FULL
        self.device = device
        self.progress = progress
        self.threads = threads
        self.start = time.perf_counter()
        os.makedirs(output_dir, exist_ok=True)
        self.log = MetricsLog(os.path.join(output_dir, "metrics.jsonl"), self.start)
        self.results = {}  # summary figures, filled stage by stage
        self.stage_seconds = {}
        self.stage_ok = {name: False for name in STAGES}

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def common_args(self, stage: str) -> dict:
        return dict(
            output_dir=self.path(stage),
            use_cpu=self.device == "cpu",
            seed=self.seed,
            report_to="none",
            save_strategy="no",
            disable_tqdm=not self.progress,
        )

    def epoch_args(self, stage: str, epochs: int) -> dict:
        """The SFT and reward stages' recipe: `epochs` epochs of batches of 32, a cosine schedule after 5% warm-up."""
        return dict(
            **self.common_args(stage),
            per_device_train_batch_size=32,
            num_train_epochs=epochs,
            lr_scheduler_type="cosine",
            warmup_ratio=0.05,
            logging_steps=10,
        )

    def say(self, text: str):
        print(f"[demo {time.perf_counter() - self.start:6.1f}s] {text}", flush=True)

    # ---- 1. tokenizer + SFT ----
    def sft(self):
        from rlhf_ext import SFTConfig, SFTTrainer
        from rlhf_ext.models.tiny import build_tokenizer, tiny_causal_lm

        s = self.sizes
        corpus = task.sft_corpus(s.sft_examples, self.seed)
        self.tokenizer = build_tokenizer([p + c for p, c in corpus], vocab_size=s.vocab_size, chat_template=False)
        model = tiny_causal_lm(
            "llama",
            tokenizer=self.tokenizer,
            seed=self.seed,
            hidden_size=s.hidden_size,
            num_layers=s.num_layers,
            num_heads=s.num_heads,
            max_position_embeddings=64,
        )
        args = SFTConfig(**self.epoch_args("sft", s.sft_epochs), learning_rate=3e-3, max_length=64)
        trainer = SFTTrainer(
            model,
            args,
            train_dataset=[{"prompt": p, "completion": c} for p, c in corpus],
            processing_class=self.tokenizer,
            callbacks=[self.log.callback("sft")],
        )
        state = trainer.train()
        trainer.save_model()
        losses = [r["loss"] for r in state.log_history if "loss" in r]
        self.results.update(
            sft_final_loss=losses[-1],
            sft_steps=state.global_step,
            vocab_size=len(self.tokenizer),
            policy_parameters=sum(p.numel() for p in model.parameters()),
        )
        self.say(
            f"sft: {state.global_step} steps, final loss {losses[-1]:.3f}, vocab {len(self.tokenizer)}, "
            f"{self.results['policy_parameters'] / 1e3:.0f}k parameters"
        )

    # ---- 2. preference pairs from the SFT policy, labelled by the simulated annotator ----
    def pairs(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf_ext.label.pairs import make_pairs, sample_completions

        s = self.sizes
        model = AutoModelForCausalLM.from_pretrained(self.path("sft"), dtype=torch.float32).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(self.path("sft"), padding_side="left")
        pair_prompts = prompts(s.pair_prompts, self.seed + 1)
        samples = sample_completions(
            model,
            tokenizer,
            pair_prompts,
            n=2,
            max_new_tokens=s.max_new_tokens,
            temperature=1.0,
            seed=self.seed + 2,
            batch_size=64,
        )
        rows, skipped = make_pairs(pair_prompts, samples, model_name="sft")
        annotator = random.Random(self.seed + 3)
        labelled = []
        for row in rows:
            a, b = row["completion_a"], row["completion_b"]
            choice = task.annotate(a, b, annotator)
            chosen, rejected = (a, b) if choice == 0 else (b, a)
            labelled.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
        n_eval = max(8, int(round(s.reward_eval_fraction * len(labelled))))
        self.pairs_train, self.pairs_eval = labelled[n_eval:], labelled[:n_eval]
        # How often the noisy annotator agrees with the hidden preference where there is one: the ceiling
        # for a reward model's accuracy against the annotator's own labels is set by this noise.
        decided = [r for r in labelled if task.true_score(r["chosen"]) != task.true_score(r["rejected"])]
        agree = sum(task.true_score(r["chosen"]) > task.true_score(r["rejected"]) for r in decided) / max(
            1, len(decided)
        )
        sft_scores = [task.true_score(c) for pair in samples for c in pair]
        self.results.update(
            pairs_train=len(self.pairs_train),
            pairs_eval=len(self.pairs_eval),
            pairs_skipped=skipped,
            annotator_agreement_with_true=agree,
        )
        self.log.write(
            "pairs",
            None,
            pairs=len(labelled),
            skipped_identical=skipped,
            annotator_agreement_with_true=agree,
            sft_sample_true_score=mean(sft_scores),
        )
        self.say(
            f"pairs: {len(labelled)} labelled ({skipped} identical skipped); annotator agrees with the hidden "
            f"preference on {agree:.0%} of decided pairs"
        )

    # ---- 3. reward model ----
    def reward(self):
        from rlhf_ext import RewardConfig, RewardTrainer

        s = self.sizes
        args = RewardConfig(
            **self.epoch_args("reward", s.reward_epochs), learning_rate=1e-3, per_device_eval_batch_size=128
        )
        trainer = RewardTrainer(
            self.path("sft"),
            args,
            train_dataset=self.pairs_train,
            eval_dataset=self.pairs_eval,
            processing_class=self.tokenizer,
            callbacks=[self.log.callback("reward")],
        )
        trainer.train()
        trainer.save_model()
        held_out = trainer.evaluate()  # against the annotator's (noisy) labels
        # Against the hidden preference: the same held-out pairs, ordered by true score, ties left out.
        by_truth = []
        for r in self.pairs_eval:
            sc, sr = task.true_score(r["chosen"]), task.true_score(r["rejected"])
            if sc != sr:
                better, worse = (r["chosen"], r["rejected"]) if sc > sr else (r["rejected"], r["chosen"])
                by_truth.append({"prompt": r["prompt"], "chosen": better, "rejected": worse})
        truth = trainer.evaluate(eval_dataset=by_truth, metric_key_prefix="true") if by_truth else {}
        self.results.update(
            reward_model_accuracy=held_out["eval_accuracy"],
            reward_model_accuracy_true=truth.get("true_accuracy"),
            reward_eval_pairs_true=len(by_truth),
        )
        self.log.write("reward_eval", None, **held_out, **truth)
        self.say(
            f"reward: held-out accuracy {held_out['eval_accuracy']:.3f} vs the annotator, "
            f"{truth.get('true_accuracy', float('nan')):.3f} vs the hidden preference ({len(by_truth)} pairs)"
        )

    # ---- 4. PPO ----
    def ppo(self):
        from transformers import TrainerCallback

        from rlhf_ext import PPOConfig, PPOTrainer

        s, demo = self.sizes, self
        track_prompts = task.held_out_prompts(s.track_prompts, self.seed)

        class TrueScoreTracker(TrainerCallback):
            """Samples the current policy on fixed held-out prompts (fixed seed) and judges it."""

            def track(self, step, model):
                samples = sample_and_score(
                    model,
                    demo.tokenizer,
                    track_prompts,
                    max_new_tokens=s.max_new_tokens,
                    seed=demo.seed + 4,
                    ref_model=trainer.ref_model,
                    reward_model=trainer.reward_model,
                )
                demo.log.write(
                    "ppo_track",
                    step,
                    true_score=mean(r["true_score"] for r in samples),
                    rm_score=mean(r["rm_score"] for r in samples),
                    kl=mean(r["kl"] for r in samples),
                    eos_fraction=mean(float(r["finished"]) for r in samples),
                )

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                self.track(0, model)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % s.track_every == 0 or state.global_step == state.max_steps:
                    self.track(state.global_step, model)

        args = PPOConfig(
            **self.common_args("ppo"),
            learning_rate=3e-4,
            max_steps=s.ppo_steps,
            per_device_train_batch_size=s.ppo_micro_batch,
            gradient_accumulation_steps=s.ppo_mini_batches,
            num_mini_batches=s.ppo_mini_batches,
            num_ppo_epochs=4,
            response_length=s.max_new_tokens,
            temperature=1.0,
            kl_coef=0.1,
            lr_scheduler_type="constant",
            logging_steps=1,
            num_sample_generations=0,
            local_rollout_forward_batch_size=128,
        )
        trainer = PPOTrainer(
            args,
            self.tokenizer,
            self.path("sft"),
            reward_model=self.path("reward"),
            train_dataset=[{"prompt": p} for p in prompts(s.ppo_steps * args.batch_size, self.seed + 5)],
            callbacks=[self.log.callback("ppo"), TrueScoreTracker()],
        )
        state = trainer.train()
        trainer.save_model()
        tracked = self.log.of("ppo_track")
        self.results.update(
            ppo_steps=state.global_step,
            ppo_prompts_per_step=args.batch_size,
            ppo_track_true_score_first=tracked[0]["true_score"],
            ppo_track_true_score_last=tracked[-1]["true_score"],
        )
        self.say(
            f"ppo: {state.global_step} steps x {args.batch_size} prompts; held-out true score "
            f"{tracked[0]['true_score']:+.2f} -> {tracked[-1]['true_score']:+.2f}, KL {tracked[-1]['kl']:.2f}"
        )

    # ---- 5. evaluation by the hidden judge, from the saved checkpoints ----
    def eval(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        s = self.sizes
        tokenizer = AutoTokenizer.from_pretrained(self.path("ppo"))
        load = dict(dtype=torch.float32)
        sft = AutoModelForCausalLM.from_pretrained(self.path("sft"), **load).to(self.device).eval()
        ppo = AutoModelForCausalLM.from_pretrained(self.path("ppo"), **load).to(self.device).eval()
        rm = AutoModelForSequenceClassification.from_pretrained(self.path("reward"), **load).to(self.device).eval()
        eval_prompts = [
            p for p in task.held_out_prompts(s.eval_prompts, self.seed) for _ in range(s.eval_samples_per_prompt)
        ]
        common = dict(max_new_tokens=s.max_new_tokens, seed=self.seed + 6, reward_model=rm, ref_model=sft)
        before = sample_and_score(sft, tokenizer, eval_prompts, **common)
        after = sample_and_score(ppo, tokenizer, eval_prompts, **common)
        versus = win_rate(after, before)
        figures = {
            "win_rate_vs_sft": versus["win_rate"],
            "wins": versus["wins"],
            "ties": versus["ties"],
            "losses": versus["losses"],
            "true_score_sft": mean(r["true_score"] for r in before),
            "true_score_ppo": mean(r["true_score"] for r in after),
            "rm_score_sft": mean(r["rm_score"] for r in before),
            "rm_score_ppo": mean(r["rm_score"] for r in after),
            "kl_to_ref": mean(r["kl"] for r in after),
            "kl_sft_to_ref": mean(r["kl"] for r in before),
            "eos_fraction_sft": mean(float(r["finished"]) for r in before),
            "eos_fraction_ppo": mean(float(r["finished"]) for r in after),
            "mean_length_sft": mean(r["length"] for r in before),
            "mean_length_ppo": mean(r["length"] for r in after),
            "eval_comparisons": len(after),
        }
        self.results.update(figures)
        self.log.write("eval", None, **figures)
        write_samples(self.path("samples.md"), before, after)
        self.say(
            f"eval: true score {figures['true_score_sft']:+.2f} (SFT) -> {figures['true_score_ppo']:+.2f} (PPO), "
            f"win rate {versus['win_rate']:.3f}, KL to ref {figures['kl_to_ref']:.2f}"
        )

    # ---- the run ----
    def summary(self, error=None) -> dict:
        return {
            **{
                k: self.results.get(k)
                for k in ("win_rate_vs_sft", "true_score_sft", "true_score_ppo", "kl_to_ref", "reward_model_accuracy")
            },
            "wall_seconds": time.perf_counter() - self.start,
            **self.results,
            "stage_ok": dict(self.stage_ok),
            "stage_seconds": dict(self.stage_seconds),
            "error": error,
            "seed": self.seed,
            "quick": self.quick,
            "device": self.device,
            "threads": self.threads,
            "sizes": dataclasses.asdict(self.sizes),
            "win_rate_definition": "per held-out sample pair (PPO vs SFT, same prompt): 1 if PPO's true score is "
            "higher, 0.5 if equal, 0 if lower; averaged",
        }

    def run(self) -> dict:
        import torch

        # These models are tiny (64-wide): intra-op parallelism costs more than it saves, and on a busy
        # machine OpenMP threads waiting on each other made a step 20x slower than one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> dict:
        quiet_libraries()
        for name in STAGES:
            self.say(f"stage {name} ...")
            began = time.perf_counter()
            try:
                getattr(self, name)()
            except BaseException:
                self.stage_seconds[name] = time.perf_counter() - began
                write_summary(self.path("summary.json"), self.summary(error=traceback.format_exc(limit=5)))
                raise
            self.stage_seconds[name] = time.perf_counter() - began
            self.stage_ok[name] = True
        self.plot()
        summary = self.summary()
        write_summary(self.path("summary.json"), summary)
        self.say(f"done in {summary['wall_seconds']:.0f}s; report in {self.out}")
        return summary

    def plot(self):
        r = self.results
        title = (
            f"PPO vs SFT by the hidden judge: win rate {r['win_rate_vs_sft']:.2f}, true score "
            f"{r['true_score_sft']:+.2f} -> {r['true_score_ppo']:+.2f}, KL {r['kl_to_ref']:.2f}"
        )
        plot_curves(self.path("curves.png"), self.log.of("ppo"), self.log.of("ppo_track"), title)


def quiet_libraries():
    """No per-call progress bars or load reports from datasets/transformers between the demo's own lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def run_demo(
    output_dir: str = "demo_output",
    seed: int = 0,
    quick: bool = False,
    device: str = "cpu",
    progress: bool = None,
    threads: int = 1,
) -> dict:
    """Run every stage into `output_dir` and return the summary (also written to summary.json)."""
    progress = sys.stderr.isatty() if progress is None else progress
    return Demo(output_dir, seed=seed, quick=quick, device=device, progress=progress, threads=threads).run()
