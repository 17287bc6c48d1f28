"""Hugging Face / THUDM GLM checkpoints in and out of glm_jax run directories.

    import_hf(DIR, RUN)   config.json + safetensors + tokenizer -> a run directory
    export_hf(RUN, DIR)   a run directory (or one step) -> config.json + sharded safetensors

The layouts and their tensor rules live in glm_jax/convert/hf_layouts.py. Both
directions stream: tensors are read one at a time from memory-mapped safetensors
and written one layer at a time (Orbax partial saves on import, one safetensors
shard at a time on export), so host memory holds a layer or a shard, never the
model. Everything is checked before anything is written (layout, every tensor's
presence and shape, the tokenizer's specials, the output directory), and the
run directory is assembled beside --out and renamed into place when complete.
Only safetensors are read: .bin / .pt files are pickles, which can run code.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from glm_jax.checkpoint import write_streamed
from glm_jax.convert import hf_layouts
from glm_jax.convert.hf_layouts import Layout, LayoutError, Rule
from glm_jax.data.chatglm_tokenizer import TOKENIZER_CLASS as CHATGLM_TOKENIZER_CLASS
from glm_jax.data.chatglm_tokenizer import ChatGLMTokenizer, is_chatglm_tokenizer
from glm_jax.data.tiktoken_file import is_tiktoken_file, load_tiktoken
from glm_jax.data.tokenizer import load_tokenizer_file
from glm_jax.model import ModelConfig, abstract_params
from glm_jax.model.scan_layout import unscan_targets
from glm_jax.run_dir import RunDir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class CheckpointFormatError(ValueError):
    """A source checkpoint is missing pieces or has tensors of the wrong shape."""


# ------------------------------------------------------------------ reading safetensors
class SafetensorsReader:
    """The tensors of a checkpoint directory, read one at a time from memory-mapped files.

    Each read maps the file, copies one tensor out and unmaps it again, so pages of the
    source never accumulate in this process's resident memory across a whole import.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = _tensor_files(directory)
        self._info: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.files.values())):
            with self._open(file) as handle:
                present = set(handle.keys())
                missing = [n for n, f in self.files.items() if f == file and n not in present]
                if missing:
                    raise CheckpointFormatError(f"{INDEX_FILE} places {missing[:3]} in {file}, which does not hold "
                                                "them; the download is incomplete or the index belongs to another "
                                                "checkpoint")
                for name in present & {n for n, f in self.files.items() if f == file}:
                    view = handle.get_slice(name)
                    self._info[name] = (tuple(view.get_shape()), view.get_dtype())

    def _open(self, file: str):
        return safe_open(str(self.directory / file), framework="numpy")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][0]

    def dtype(self, name: str) -> str:
        return self._info[name][1]

    def read(self, name: str) -> np.ndarray:
        with self._open(self.files[name]) as handle:
            return handle.get_tensor(name)


def _tensor_files(directory: Path) -> dict[str, str]:
    """tensor name -> file name, from the index (sharded) or the single model.safetensors."""
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFormatError(f"{directory / INDEX_FILE} has no weight_map; it is not a safetensors index")
        absent = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if absent:
            example = next(n for n, f in weight_map.items() if f == absent[0])
            raise CheckpointFormatError(f"shard {absent[0]} named in {INDEX_FILE} is missing from {directory} "
                                        f"(it holds e.g. {example}); {len(absent)} of "
                                        f"{len(set(weight_map.values()))} shards are absent: finish the download")
        return dict(weight_map)
    if (directory / SINGLE_FILE).is_file():
        with safe_open(str(directory / SINGLE_FILE), framework="numpy") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern))
    if pickles:
        raise CheckpointFormatError(
            f"{directory} holds only pickle checkpoints ({', '.join(pickles[:3])}); glm_jax reads safetensors only, "
            "because loading a pickle can run arbitrary code. Convert it once where you trust the file: "
            "`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).save_pretrained(OUT, "
            "safe_serialization=True)` (transformers), then import OUT")
    raise CheckpointFormatError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}; pass a Hugging Face checkpoint "
                                "directory with safetensors weights")


# ------------------------------------------------------------------ checks
def read_source_config(directory: Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointFormatError(f"{directory} has no config.json; pass a Hugging Face checkpoint directory")
    return json.loads(path.read_text())


def unscanned_shapes(model: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """glm_jax parameter path -> abstract array, in the unscanned layout the rules use."""
    tree = nn.unbox(abstract_params(model.replace(scan_layers=True)))  # one traced block, not num_layers
    flat = jax.tree_util.tree_flatten_with_path(unscan_targets(tree))[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def expected_source_shapes(rule: Rule, targets: dict) -> list[tuple[int, ...]]:
    """The source tensor shapes a rule needs, derived from the model's parameter shapes."""
    abstract = [jax.ShapeDtypeStruct(targets[p].shape, np.float32) for p in rule.targets]
    return [tuple(x.shape) for x in jax.eval_shape(rule.to_theirs, *abstract)]


def check_source(reader: SafetensorsReader, layout: Layout, model: ModelConfig) -> None:
    """Every tensor the layout needs exists with the right shape; CheckpointFormatError otherwise."""
    targets = unscanned_shapes(model)
    layer_shapes = None  # every layer's rules have the same shapes: derive them once
    missing = []
    for group in layout.rule_groups(model):
        if group[0].targets[0][0].startswith("layers_"):
            layer_shapes = layer_shapes or [expected_source_shapes(rule, targets) for rule in group]
            shapes = layer_shapes
        else:
            shapes = [expected_source_shapes(rule, targets) for rule in group]
        for rule, wants in zip(group, shapes):
            for name, want in zip(rule.sources, wants):
                if name not in reader:
                    missing.append(name)
                elif reader.shape(name) != want:
                    raise CheckpointFormatError(
                        f"tensor {name} has shape {reader.shape(name)} in {reader.directory} but config.json "
                        f"implies {want} (layout {layout.name!r}); the weights and config.json do not belong together")
                elif reader.dtype(name) not in SAFETENSORS_DTYPES:
                    raise CheckpointFormatError(f"tensor {name} is stored as {reader.dtype(name)}; glm_jax imports "
                                                f"floating-point weights ({sorted(SAFETENSORS_DTYPES)})")
    if missing:
        raise CheckpointFormatError(f"{len(missing)} tensors the {layout.name!r} layout needs are missing from "
                                    f"{reader.directory}, e.g. {missing[:3]}; the checkpoint is incomplete or not "
                                    f"this layout ({hf_layouts.supported()})")


def _source_tokenizer(directory: Path):
    """The checkpoint's tokenizer: tokenizer.json (transformers), THUDM's tokenizer.model (ChatGLM2/3
    SentencePiece, or GLM-4's tiktoken vocabulary, converted to a tokenizer.json)."""
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer_file(directory / "tokenizer.json")
    model_file = directory / "tokenizer.model"
    if model_file.is_file():
        if is_tiktoken_file(model_file):
            return load_tiktoken(model_file)
        if is_chatglm_tokenizer(directory):
            return ChatGLMTokenizer.load(model_file)
        raise CheckpointFormatError(
            f"{model_file} is a SentencePiece model but {directory / 'tokenizer_config.json'} does not name "
            f"tokenizer_class {CHATGLM_TOKENIZER_CLASS!r} (THUDM's ChatGLM2/3 tokenizer, whose specials sit above "
            "the SentencePiece vocabulary); glm_jax reads tokenizer.json, ChatGLM2/3's tokenizer.model and "
            "GLM-4's tiktoken tokenizer.model")
    found = sorted(p.name for p in directory.glob("*.model")) + sorted(p.name for p in directory.glob("tokenizer*"))
    hint = ""
    if "ice_text.model" in found:
        hint = (" ChatGLM-6B's icetk tokenizer (ice_text.model: 20,000 image ids before the text ids, <n> / <|tab|> / "
                "<|blank_N|> rewriting of whitespace) is not supported: copy a tokenizer.json, or a ChatGLM2/3 "
                "tokenizer.model, that you mean to use with these weights into the directory.")
    elif found:
        hint = f" (found {found}, none of them a tokenizer glm_jax reads)."
    raise CheckpointFormatError(f"{directory} has no tokenizer.json or tokenizer.model; glm_jax needs the "
                                f"checkpoint's own tokenizer to generate and fine-tune.{hint}")


def _check_output(out: RunDir, force: bool) -> None:
    if out.path.exists() and any(out.path.iterdir()) and not force:
        raise FileExistsError(f"{out.path} already exists and is not empty; choose a new --out or pass --force "
                              "to replace it")


def _file_hashes(directory: Path, names) -> dict[str, str]:
    hashes = {}
    for name in sorted(names):
        with open(directory / name, "rb") as f:
            hashes[name] = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    return hashes


# ------------------------------------------------------------------ import
def model_gin(model: ModelConfig) -> list[str]:
    return [f"ModelConfig.{f.name} = {getattr(model, f.name)!r}" for f in dataclasses.fields(model)]


def import_hf(source: str | Path, out: str | Path, dtype: str | None = None, force: bool = False,
              hash_files: bool = True) -> dict:
    """Imports a Hugging Face / THUDM GLM checkpoint directory into a new run directory; returns its provenance.

    dtype: parameter dtype of the run ('float32', 'bfloat16', 'float16'); None keeps the source's.
    """
    source = Path(source).expanduser().absolute()
    config = read_source_config(source)
    layout = hf_layouts.detect(config)
    reader = SafetensorsReader(source)
    model = layout.model_config(config)
    stored = SAFETENSORS_DTYPES.get(reader.dtype(layout.global_rules(model)[0].sources[0]), "float32")
    param_dtype = dtype or stored
    if param_dtype not in DTYPES:
        raise ValueError(f"--dtype {param_dtype!r} is not one of {sorted(DTYPES)}")
    model = model.replace(param_dtype=param_dtype)
    check_source(reader, layout, model)
    tokenizer = _source_tokenizer(source)
    if tokenizer.vocab_size > model.vocab_size:
        raise CheckpointFormatError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding "
                                    f"only {model.vocab_size} rows; the tokenizer belongs to another model")
    target = RunDir(out)
    _check_output(target, force)

    build = RunDir(target.path.with_name(target.path.name + ".importing"))
    shutil.rmtree(build.path, ignore_errors=True)
    tokenizer.save_into(build.path)
    tokenizer_file = build.tokenizer_path.name  # tokenizer.json, or ChatGLM2/3's tokenizer.model
    gin_text = "\n".join([
        f"# glm_jax convert import-hf from {source} ({layout.description}); see provenance.json.",
        "# Fine-tune or continue pretraining with ./launch.sh train RUN/config.gin --gin.STEPS=N.",
        "include 'base.gin'", "include 'objectives/causal.gin'",
        f"RUN_DIR = '{target.path}'", "STEPS = 0",
        *model_gin(model),
        f"DataConfig.tokenizer_path = '{target.path / tokenizer_file}'",
        "OptimizerConfig.learning_rate = 1e-05", ""])
    build.write_config(gin_text)
    write_streamed(build.checkpoints_path, 0, _converted_groups(reader, layout, model), [None], gin_text)
    provenance = {
        "imported_from": str(source), "layout": layout.name, "layout_description": layout.description,
        "dtype": param_dtype, "source_config": config,
        "source_files": (_file_hashes(source, set(reader.files.values()) | {"config.json"})
                         if hash_files else None),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    build.write_provenance(provenance)
    _replace_directory(build.path, target.path)
    return provenance


def _converted_groups(reader: SafetensorsReader, layout: Layout, model: ModelConfig):
    """Yields the parameters group by group (outside the layers, then each layer) as nested dicts."""
    cast = DTYPES[model.param_dtype]
    for group in layout.rule_groups(model):
        tree: dict = {}
        for rule in group:
            arrays = rule.to_ours(*[reader.read(name) for name in rule.sources])
            for path, array in zip(rule.targets, arrays):
                _set(tree, path, np.ascontiguousarray(array.astype(cast, copy=False)))
        yield tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _replace_directory(build: Path, target: Path) -> None:
    """Moves a completed build into place; a replaced directory is removed only after the move."""
    old = target.with_name(target.name + ".replaced")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    build.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ export
def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1024' -> bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise ValueError(f"--max_shard_size {text!r} is not a size; write e.g. 5GB, 500MB or a byte count")


def export_hf(source: str | Path, out: str | Path, layout_name: str | None = None, max_shard_size: str = "5GB",
              force: bool = False) -> dict:
    """Writes a run's checkpoint (latest, or the step of RUN/checkpoints/STEP) as a Hugging Face directory.

    layout_name: one of hf_layouts.LAYOUTS; default: the layout it was imported from, else
    GlmForCausalLM (Glm4ForCausalLM for sandwich-norm models). Returns a summary.
    """
    run, step = RunDir.resolve(source)
    experiment = run.read_experiment()
    model = experiment.model
    provenance = run.provenance() or {}
    if experiment.adapters is not None and not experiment.adapters.mergeable:
        raise ValueError(f"{run.path} holds train.adapter = {experiment.train.adapter!r} parameters, not a "
                         "model, and Hugging Face GLM layouts have no place for them; export its base run "
                         "(train.init_from) instead")
    if experiment.adapters is not None:
        raise ValueError(f"{run.path} holds LoRA adapters, not a model; merge them into their base first: "
                         f"python -m glm_jax convert merge-lora --from {run.path} --out MERGED, then export MERGED")
    if model.quant_bits:
        raise ValueError(f"{run.path} holds INT{model.quant_bits}-quantized weights (glm_jax convert quantize), which "
                         "the Hugging Face GLM layouts have no place for; export the float run it was quantized "
                         f"from ({provenance.get('quantized_from', 'named in its provenance.json')}) instead")
    layout_name = layout_name or provenance.get("layout") or hf_layouts.for_model(model).name
    if layout_name not in hf_layouts.LAYOUTS:
        raise LayoutError(f"--layout {layout_name!r} is unknown; choose one of {sorted(hf_layouts.LAYOUTS)}")
    layout = hf_layouts.LAYOUTS[layout_name]
    base = provenance.get("source_config") if provenance.get("layout") == layout.name else None
    tokenizer = run.tokenizer()
    hf_config = layout.hf_config(model, base)
    if base is None:
        hf_config.update(eos_token_id=tokenizer.specials.eos, pad_token_id=tokenizer.specials.pad)
    limit = parse_size(max_shard_size)
    target = Path(out).expanduser().absolute()
    if target.exists() and any(target.iterdir()) and not force:
        raise FileExistsError(f"{target} already exists and is not empty; choose a new --out or pass --force")

    params, step = run.restore_params(model, step)
    build = target.with_name(target.name + ".exporting")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    shards = _write_shards(build, _exported_tensors(params, layout, model), limit)
    (build / "config.json").write_text(json.dumps(hf_config, indent=2))
    tokenizer.save_into(build)
    _replace_directory(build, target)
    return {"run": str(run.path), "step": int(step), "layout": layout.name, "out": str(target),
            "files": shards, "num_tensors": sum(len(r.sources) for g in layout.rule_groups(model) for r in g)}


def _exported_tensors(params: dict, layout: Layout, model: ModelConfig):
    """Yields (source tensor name, contiguous numpy array), one rule at a time."""
    for group in layout.rule_groups(model):
        for rule in group:
            arrays = rule.to_theirs(*[_param(params, path) for path in rule.targets])
            for name, array in zip(rule.sources, arrays):
                yield name, np.ascontiguousarray(array)


def _param(params: dict, path: tuple[str, ...]) -> np.ndarray:
    """A parameter by its unscanned path, read from a scanned or unscanned tree (one layer copied to the host)."""
    head = path[0]
    if head.startswith("layers_") and "layers" in params:
        node, index = params["layers"], int(head.split("_")[1])
        for key in path[1:]:
            node = node[key]
        return np.asarray(node[index])
    node = params
    for key in path:
        node = node[key]
    return np.asarray(node)


SAFETENSORS_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
                     np.dtype(np.int32): "I32", np.dtype(np.int64): "I64"}


def save_file(tensors: dict[str, np.ndarray], path: str) -> None:
    """Writes a safetensors file tensor by tensor from the arrays themselves.

    safetensors.numpy.save_file serialises the whole file into one buffer first (two extra
    copies of a shard); this writes the same format (8-byte little-endian header length,
    JSON header padded to 8 bytes, then the raw little-endian data in header order).
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": SAFETENSORS_CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # bytes of any dtype, no copy


def _write_shards(directory: Path, tensors, limit: int) -> list[str]:
    """Writes tensors into safetensors shards of at most `limit` bytes (a larger tensor gets its own),
    named as transformers names them, plus the index when there is more than one."""
    shard: dict[str, np.ndarray] = {}
    size, written, weight_map, total = 0, [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"shard-{len(written) + 1:05d}.tmp"
            save_file(shard, str(directory / name))
            written.append((name, list(shard)))
            shard, size = {}, 0

    for name, array in tensors:
        if shard and size + array.nbytes > limit:
            flush()
        shard[name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(written) == 1:
        os.replace(directory / written[0][0], directory / SINGLE_FILE)
        return [SINGLE_FILE]
    names = []
    for i, (tmp, tensor_names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(directory / tmp, directory / final)
        weight_map.update({n: final for n in tensor_names})
        names.append(final)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names
