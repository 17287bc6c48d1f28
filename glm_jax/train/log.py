"""What a run shows and leaves behind: progress bar, TensorBoard events, config, summary."""

from __future__ import annotations

import sys
import threading
import traceback
from pathlib import Path

import jax

from glm_jax.run_dir import RunDir


class RunLogger:
    """Process 0 writes; other processes stay silent."""

    def __init__(self, run: RunDir, total_steps: int, start_step: int, gin_config: str, tokenizer):
        self.enabled = jax.process_index() == 0
        self.run = run
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.tokens_per_second: list[float] = []
        if not self.enabled:
            return
        run.write_config(gin_config)  # the operative config of this run
        run.write_tokenizer(tokenizer)
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        if not isinstance(threading.excepthook, _EventWriterErrors):  # for the process: the writer thread outlives us
            threading.excepthook = _EventWriterErrors(threading.excepthook)
        self.writer = SummaryWriter(str(run.tensorboard_path))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        """On an error, closes the progress bar and event writer without masking the error (a full disk)."""
        if error is not None and self.enabled:
            self.bar.close()
            try:
                self.writer.close()
            except OSError:
                pass

    def log_step(self, step: int, metrics: dict, steady: bool = True) -> None:
        """One step's metrics; steady=False for steps whose time includes compiling the step."""
        self.history.append({"step": step, **metrics})
        if steady:
            self.tokens_per_second.append(metrics["tokens_per_second"])
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)
        rate = ({"mfu": f"{metrics['mfu']:.1%}"} if "mfu" in metrics
                else {"gflop_s": f"{metrics['model_flops_per_device'] / 1e9:.1f}"})  # no fixed peak: no MFU
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}", **rate)
        self.bar.update(1)

    def log_eval(self, step: int, metrics: dict) -> None:
        self.eval_history.append({"step": step, **metrics})
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.writer.add_scalar(f"eval/{key}", value, step)
        self.bar.write(f"step {step}: eval loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f}")

    def finish(self, last: dict, peak_source: str, checkpoint_dir: Path, checkpoint_step,
               stopped_by: str | None) -> dict:
        """The run's summary (printed and written to summary.json); stopped_by: the signal that ended it early."""
        preempted = stopped_by is not None
        # Steps timed without the compile; a run of one window has only those.
        steady = self.tokens_per_second or [h["tokens_per_second"] for h in self.history]
        summary = {
            "final_train_loss": last.get("loss"), "final_eval_loss": (self.eval_history or [{}])[-1].get("loss"),
            "tokens_per_second": sum(steady) / max(len(steady), 1), "mfu": last.get("mfu"),
            "model_flops_per_device": last.get("model_flops_per_device"),
            "mfu_full_matrix": last.get("mfu_full_matrix"), "mfu_peak_source": peak_source,
            "checkpoint": str(checkpoint_dir / str(checkpoint_step)) if checkpoint_step is not None else None,
            "preempted": preempted, "stopped_by": stopped_by, "losses": [h["loss"] for h in self.history], "eval": self.eval_history,
        }
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.run.write_summary(summary)
            eval_loss = summary["final_eval_loss"]
            ending = {None: "done", "SIGTERM": "preempted", "SIGINT": "interrupted"}[stopped_by]
            print(f"{ending}: train loss {summary['final_train_loss']:.4f}, "
                  f"eval loss {eval_loss if eval_loss is None else f'{eval_loss:.4f}'}, "
                  f"{summary['tokens_per_second']:.0f} tokens/s, {_utilisation(summary, peak_source)}, "
                  f"checkpoint {summary['checkpoint']}", flush=True)
        return summary


def _utilisation(summary: dict, peak_source: str) -> str:
    """'MFU 41.0% (TPU v5e bf16 spec)', or the model FLOP/s where the device has no fixed peak."""
    if summary["mfu"] is not None:
        return f"MFU {summary['mfu']:.1%} ({peak_source})"
    rate = summary["model_flops_per_device"]
    return f"{(rate or 0) / 1e9:.1f} model GFLOP/s per device ({peak_source})"


class _EventWriterErrors:
    """A thread excepthook: an OSError in TensorBoard's background writer thread (a full or read-only
    disk) becomes one warning line instead of a traceback per flush; anything else goes to `fallback`.
    Training and checkpoints do not depend on the events, and a failing save says so itself."""

    def __init__(self, fallback):
        self.fallback = fallback
        self.warned = False

    def __call__(self, args) -> None:
        frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
        if not (isinstance(args.exc_value, OSError) and any("tensorboardX" in f.filename for f in frames)):
            return self.fallback(args)
        if not self.warned:
            self.warned = True
            print(f"WARNING: TensorBoard events could not be written ({args.exc_value}); training goes on without "
                  "them", file=sys.stderr, flush=True)
