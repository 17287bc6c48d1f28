"""A run's projections quantized to INT8 / INT4 for inference (glm_jax.model.quantization).

`quantize_run` writes a run directory whose config is the source's with
ModelConfig.quant_bits / quant_group_size set and whose checkpoint holds the quantized
parameters: every attention and MLP projection as `qkernel` + `scale`; the embedding, the
output head, norms and biases as they were (what GLM-130B's INT4 release keeps in FP16).
generate, chat, evaluation and the inference preflight take it like any run; training
and export-hf refuse it with the reason.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from glm_jax.model import param_bytes, quantize_params
from glm_jax.model.quantization import check_scheme
from glm_jax.run_dir import RunDir


def quantize_run(source: str | Path, out: str | Path, bits: int, group_size: int | None = None) -> dict:
    """Writes the quantized run directory `out`; returns its provenance record."""
    check_scheme(bits, group_size)
    source_run, step = RunDir.resolve(source)
    experiment = source_run.read_experiment()
    if experiment.model.quant_bits:
        raise ValueError(f"{source_run.path} is already INT{experiment.model.quant_bits}-quantized; quantizing "
                         "it again would compound the rounding. Quantize the float run it came from "
                         f"({(source_run.provenance() or {}).get('quantized_from', 'see its provenance.json')})")
    if experiment.adapters is not None and not experiment.adapters.mergeable:
        raise ValueError(f"{source_run.path} is a P-tuning run, whose learned prefix cannot be merged into a plain "
                         "run; quantize its base run and train the prefix on that")
    model = experiment.model.replace(quant_bits=bits, quant_group_size=group_size)  # ValueError if it does not fit
    target = RunDir(out)
    if target.checkpoints_path.exists():
        raise FileExistsError(f"{target.path} already holds checkpoints; choose a new --out directory")
    run = source_run.load(step)  # a LoRA run comes back merged
    params = quantize_params(run.params, model)
    scheme = f"INT{bits} " + (f"group {group_size}" if group_size else "per output channel")
    target.write_derived(source_run, run, params, [
        f"# glm_jax convert quantize: {source_run.path} step {run.step}, projections {scheme} (provenance.json)",
        f"ModelConfig.quant_bits = {bits}", f"ModelConfig.quant_group_size = {group_size}"])
    provenance = {"quantized_from": str(source_run.path), "step": int(run.step), "bits": bits,
                  "group_size": group_size, "param_bytes": param_bytes(params), "source_param_bytes": param_bytes(run.params),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    target.write_provenance(provenance)
    return provenance

