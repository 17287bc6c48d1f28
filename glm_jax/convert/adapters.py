"""A LoRA run merged into a plain run directory: W + (A B) * alpha / rank in every adapted kernel.

`merge_run` writes a run directory whose checkpoint holds the merged parameters (no
optimizer state), its config is the LoRA run's with the adapters switched off
(train.adapter = 'none', no init_from) and its tokenizer is the LoRA run's. Its logits
equal the LoRA run's (glm_jax.model.lora.merge_adapters; tested at 1e-5), and
generate, chat, export-hf and further training take it like any run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

from glm_jax.run_dir import RunDir


def merge_run(source: str | Path, out: str | Path) -> dict:
    """Writes the merged run directory `out`; returns its provenance record."""
    source_run, step = RunDir.resolve(source)
    experiment = source_run.read_experiment()
    if experiment.adapters is None:
        raise ValueError(f"{source_run.path} is not a LoRA run (its train.adapter is 'none'); there is nothing to merge")
    if not experiment.adapters.mergeable:
        try:
            experiment.adapters.merge({})  # a method that cannot be merged raises, saying why and what to do
        except ValueError as reason:
            raise ValueError(f"{source_run.path} is a train.adapter = '{experiment.train.adapter}' run: {reason}") \
                from None
    target = RunDir(out)
    if target.checkpoints_path.exists():
        raise FileExistsError(f"{target.path} already holds checkpoints; choose a new --out directory")
    run = source_run.load(step)  # base + adapters, merged
    base = json.loads(source_run.adapter_base_path.read_text())
    target.write_derived(source_run, run, run.params, [
        f"# glm_jax convert merge-lora: the LoRA adapters of {source_run.path} step {run.step} merged into "
        f"{base['run']} step {base['step']} (provenance.json)"])
    provenance = {"merged_from": str(source_run.path), "step": int(run.step), "adapter_base": base,
                  "lora": dataclasses.asdict(experiment.adapters),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    target.write_provenance(provenance)
    return provenance
