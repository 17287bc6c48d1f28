"""Ahead-of-time compile of the Generator (prefill + decode loop) for a TPU topology, on a CPU machine.

The inference counterpart of glm_jax.train.preflight: abstract parameters placed by the
experiment's sharding rules on the topology's devices, the real TPU compiler, and the
compiled program's per-device HBM (glm_jax.parallel.tpu_topology). A quantized model
(ModelConfig.quant_bits) compiles with its int8 / packed int4 weights, so this says how
many chips a checkpoint needs at each precision before any is booked.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from glm_jax.data.tokenizer import SpecialTokens
from glm_jax.infer.generate import Generator
from glm_jax.infer.prompts import prompt_batch_shapes
from glm_jax.model import ModelConfig, abstract_params
from glm_jax.parallel.mesh import MeshConfig, make_mesh

# Ids only shape the program; any below the vocabulary do.
PLACEHOLDER_SPECIALS = SpecialTokens(pad=0, eos=1, cls=2, mask=3, smask=4, gmask=5, sop=6, eop=7, dblock=8)


def compile_generator(devices, model: ModelConfig, mesh_config: MeshConfig, rules, batch: int, context: int,
                      new_tokens: int, mode: str = "causal"):
    """The compiled generation program for `batch` prompts of `context` tokens and `new_tokens` more."""
    mesh = make_mesh(mesh_config, devices)
    decoder = model.replace(scan_layers=False, remat_policy="none")  # how the Generator decodes
    boxed = abstract_params(decoder)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    prompts = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
               for name, (shape, dtype) in prompt_batch_shapes(batch, context).items()}
    generator = Generator(decoder, params, PLACEHOLDER_SPECIALS, mesh=mesh, rules=rules)
    return generator.lower(prompts, mode, new_tokens).compile()
