"""Checkpoint interop: Hugging Face safetensors and GGUF in, Hugging Face `*ForSequenceClassification` out.

  python -m codepmp_jax.convert --from_hf=DIR --output=CKPT [--seed=0] [--param_dtype=float32]
  python -m codepmp_jax.convert --from_gguf=FILE --output=CKPT
  python -m codepmp_jax.convert --to_hf=OUT --checkpoint=CKPT [--template=math]

`--to_hf` of a LoRA checkpoint (`model.lora`) merges the adapters into the weights.

`--to_hf` carries the model's prompt format (stored with the checkpoint, or --template) into the
export: a `chat_template` rendering the training text, `prompt_format.json` and a model card.

Only safetensors and GGUF are read (never pickle). Tensors are read one at a time from memory maps
and written straight into the target tree, so a model is never held twice. Every failure names the
file and the tensor.

Every path may be `gs://...` (through etils.epath). A memory map needs a local file, so remote
safetensors and GGUF files are read from local copies in a temporary directory, removed when the
conversion is done (`storage.local_copy`; the disk needs room for the model once).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
from absl import app, flags
from etils import epath
from tqdm import tqdm

from codepmp_jax import cli, storage
from codepmp_jax.data import encode, templates
from codepmp_jax.data import tokenizer as tokenizer_lib
from codepmp_jax.model.config import ModelConfig

HF_ARCHITECTURES = {
    f"{prefix}{head}": model_type
    for model_type, prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"))
    for head in ("ForCausalLM", "ForSequenceClassification")
}
GGUF_ARCHITECTURES = ("llama", "qwen2")
# llama.cpp reorders the rows of Q and K of llama-architecture models for its RoPE layout.
GGUF_PERMUTED_QK = ("llama",)

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_LAYER_NAMES = {
    "input_layernorm.weight": ("input_norm", "scale"),
    "post_attention_layernorm.weight": ("post_attn_norm", "scale"),
    **{f"self_attn.{p}_proj.{kind}": ("attn", f"{p}_proj", "kernel" if kind == "weight" else "bias")
       for p in "qkvo" for kind in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": ("mlp", f"{p}_proj", "kernel") for p in ("gate", "up", "down")},
}
_GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": ("input_norm", "scale"),
    "ffn_norm.weight": ("post_attn_norm", "scale"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    **{f"attn_{p}.{kind}": ("attn", f"{p}_proj", "kernel" if kind == "weight" else "bias")
       for p in "qkv" for kind in ("weight", "bias")},
    **{f"ffn_{p}.weight": ("mlp", f"{p}_proj", "kernel") for p in ("gate", "up", "down")},
}


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file and the tensor."""


# ----------------------------------------------------------------------------- canonical tree

def _param_path(name: str, layer_pattern: re.Pattern, layer_names: dict, top_names: dict) -> tuple | None:
  if name in top_names:
    return top_names[name]
  match = layer_pattern.fullmatch(name)
  if match and match.group(2) in layer_names:
    return (f"layers_{match.group(1)}", *layer_names[match.group(2)])
  return None


def expected_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Shapes of the canonical parameter tree of `config` (docs/contracts.md), keyed by path."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  q, kv = config.num_heads * config.resolved_head_dim, config.num_kv_heads * config.resolved_head_dim
  shapes = {("embed", "embedding"): (v, d), ("final_norm", "scale"): (d,), ("score", "kernel"): (d, 1)}
  if not config.tie_word_embeddings:
    shapes[("lm_head", "kernel")] = (d, v)
  for i in range(config.num_layers):
    layer = {("input_norm", "scale"): (d,), ("post_attn_norm", "scale"): (d,),
             ("attn", "q_proj", "kernel"): (d, q), ("attn", "k_proj", "kernel"): (d, kv),
             ("attn", "v_proj", "kernel"): (d, kv), ("attn", "o_proj", "kernel"): (q, d),
             ("mlp", "gate_proj", "kernel"): (d, f), ("mlp", "up_proj", "kernel"): (d, f),
             ("mlp", "down_proj", "kernel"): (f, d)}
    if config.qkv_bias:
      layer.update({("attn", "q_proj", "bias"): (q,), ("attn", "k_proj", "bias"): (kv,),
                    ("attn", "v_proj", "bias"): (kv,)})
    shapes.update({(f"layers_{i}", *k): s for k, s in layer.items()})
  return shapes


class _TreeBuilder:
  """Fills the canonical tree tensor by tensor, checking names and shapes as they arrive."""

  def __init__(self, config: ModelConfig, dtype: Any):
    self.expected = expected_shapes(config)
    self.dtype = dtype
    self.params: dict = {}
    self.filled: set[tuple[str, ...]] = set()

  def put(self, path: tuple[str, ...], value: np.ndarray, source: str, tensor: str) -> None:
    if path not in self.expected:
      raise ConversionError(f"{source}: tensor {tensor!r} maps to {'/'.join(path)}, "
                            "which this model config does not have")
    if tuple(value.shape) != self.expected[path]:
      raise ConversionError(f"{source}: tensor {tensor!r} has shape {tuple(value.shape)} but "
                            f"{'/'.join(path)} needs {self.expected[path]} (after transposing)")
    if path in self.filled:
      raise ConversionError(f"{source}: tensor {tensor!r} appears twice")
    node = self.params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.array(value, dtype=self.dtype, order="C")  # a copy: no views into the source file
    self.filled.add(path)

  def finish(self, source: str, seed: int) -> dict:
    """The tree; a missing score head is drawn N(0, 1/(d+1)) from `seed`, anything else missing is an error."""
    if ("score", "kernel") not in self.filled:
      d = self.expected[("score", "kernel")][0]
      head = np.random.default_rng(seed).normal(0.0, 1.0 / math.sqrt(d + 1), (d, 1))
      self.put(("score", "kernel"), head, source, "score (initialised)")
    missing = sorted("/".join(p) for p in set(self.expected) - self.filled)
    if missing:
      raise ConversionError(f"{source}: missing tensors for {missing[:8]}"
                            f"{' and more' if len(missing) > 8 else ''}")
    return self.params


# ----------------------------------------------------------------------------- safetensors

class SafetensorsFile:
  """A memory-mapped safetensors file, validated up front, read one tensor at a time.

  A remote `path` (`gs://`) is read from its copy below `scratch` (a memory map needs a local
  file); errors name `path`."""

  def __init__(self, path: str | os.PathLike, scratch: str | os.PathLike | None = None):
    self.path = epath.Path(path)
    if storage.is_remote(path) and scratch is None:
      raise ValueError(f"{path}: a remote safetensors file needs a scratch directory to be copied to")
    local = storage.local_copy(path, scratch or "")
    size = local.stat().st_size
    with open(local, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise ConversionError(f"{self.path}: not a safetensors file (only {size} bytes)")
      header_len = int.from_bytes(prefix, "little")
      if header_len > size - 8 or header_len > 100_000_000:
        raise ConversionError(f"{self.path}: corrupt or truncated safetensors header "
                              f"(header length {header_len}, file size {size})")
      try:
        header = json.loads(f.read(header_len))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{self.path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
      raise ConversionError(f"{self.path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    self._start = 8 + header_len
    self._data_size = size - self._start
    self.entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
      try:
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{self.path}: tensor {name!r} has a corrupt header entry {info!r}") from e
      if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
        raise ConversionError(f"{self.path}: tensor {name!r}: offsets {begin}..{end} do not fit "
                              f"shape {shape} of {info['dtype']}")
      self.entries[name] = (dtype, shape, begin, end)
    for name, (_, _, _, end) in sorted(self.entries.items(), key=lambda item: item[1][2]):
      if end > self._data_size:  # the first tensor (in file order) cut off
        raise ConversionError(f"{self.path}: tensor {name!r} needs bytes up to {end} but the file "
                              f"holds {self._data_size} bytes of data (truncated?)")
    self._map = np.memmap(local, dtype=np.uint8, mode="r") if size else None

  def keys(self) -> list[str]:
    return list(self.entries)

  def get(self, name: str) -> np.ndarray:
    """The tensor, as a read-only view of the file (no copy)."""
    dtype, shape, begin, end = self.entries[name]
    raw = self._map[self._start + begin:self._start + end]
    return raw.view(dtype).reshape(shape)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
  """Write arrays to a safetensors file one at a time (`tensors` may hold lazily converted arrays)."""
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, offset = {"__metadata__": metadata}, 0
  for name, array in tensors.items():
    size = math.prod(array.shape) * np.dtype(array.dtype).itemsize
    header[name] = {"dtype": names[np.dtype(array.dtype)], "shape": list(array.shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with epath.Path(path).open("wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())


def _hf_tensor_files(directory: epath.Path, scratch: str) -> dict[str, epath.Path]:
  """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
  index = directory / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ConversionError(f"{index}: not a safetensors index ({e})") from e
    return {name: directory / file for name, file in weight_map.items()}
  single = directory / "model.safetensors"
  if single.exists():
    return {name: single for name in SafetensorsFile(single, scratch).keys()}
  if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
    raise ConversionError(f"{directory}: only pickle checkpoints (.bin/.pt) found; they are never "
                          "read (code execution risk). Convert them to safetensors first.")
  raise ConversionError(f"{directory}: no model.safetensors or model.safetensors.index.json")


# ----------------------------------------------------------------------------- Hugging Face in

def model_config_from_hf(hf: dict, source: str = "config.json", param_dtype: str = "float32") -> ModelConfig:
  """Our ModelConfig from a Hugging Face Llama / Qwen2 / Mistral config.json."""
  architectures = hf.get("architectures") or []
  arch = architectures[0] if architectures else None
  if arch not in HF_ARCHITECTURES or hf.get("model_type") != HF_ARCHITECTURES[arch]:
    raise ConversionError(f"{source}: unsupported architecture {arch!r} (model_type "
                          f"{hf.get('model_type')!r}); supported: {sorted(HF_ARCHITECTURES)}")
  model_type = HF_ARCHITECTURES[arch]
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ConversionError(f"{source}: {flag}=true is not supported (no biases on those layers)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise ConversionError(f"{source}: Qwen2 use_sliding_window=true is not supported")
  if arch.endswith("ForSequenceClassification") and hf.get("num_labels", len(hf.get("id2label") or [0])) != 1:
    raise ConversionError(f"{source}: a reward model has one label; this one has "
                          f"{hf.get('num_labels', len(hf.get('id2label') or []))}")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    rope_scaling = None
  elif rope_type == "linear":
    rope_scaling = {"type": "linear", "factor": float(rope["factor"])}
  elif rope_type == "llama3":
    rope_scaling = {"type": "llama3", "factor": float(rope["factor"]),
                    "low_freq_factor": float(rope["low_freq_factor"]),
                    "high_freq_factor": float(rope["high_freq_factor"]),
                    "original_max_position_embeddings": int(rope["original_max_position_embeddings"])}
  else:
    raise ConversionError(f"{source}: rope scaling {rope_type!r} is not supported (default, linear, llama3)")
  eos = hf.get("eos_token_id")
  heads = hf["num_attention_heads"]
  return ModelConfig(
      architecture=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim"), rope_theta=float(rope_theta), rope_scaling=rope_scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)) or arch.endswith("ForSequenceClassification"),
      qkv_bias=model_type == "qwen2",
      sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
      bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
      pad_token_id=hf.get("pad_token_id"), param_dtype=param_dtype)


def load_hf(directory: str | os.PathLike, seed: int = 0, param_dtype: str = "float32") -> tuple[dict, ModelConfig]:
  """Canonical params and config of a Hugging Face Llama / Qwen2 / Mistral directory (remote
  safetensors files are read from temporary local copies: see the module docstring)."""
  directory = epath.Path(directory)
  config_file = directory / "config.json"
  if not config_file.exists():
    raise ConversionError(f"{directory}: no config.json")
  try:
    hf = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{config_file}: invalid JSON at line {e.lineno} ({e.msg})") from e
  config = model_config_from_hf(hf, str(config_file), param_dtype)
  top = {"model.embed_tokens.weight": ("embed", "embedding"), "model.norm.weight": ("final_norm", "scale"),
         "lm_head.weight": ("lm_head", "kernel"), "score.weight": ("score", "kernel")}
  builder = _TreeBuilder(config, np.dtype(param_dtype) if param_dtype != "bfloat16" else ml_dtypes.bfloat16)
  with tempfile.TemporaryDirectory(prefix="convert-") as scratch:
    files = _hf_tensor_files(directory, scratch)
    opened: dict[epath.Path, SafetensorsFile] = {}
    for name, file in tqdm(files.items(), desc=f"reading {directory.name}", unit="tensor"):
      if name.endswith("rotary_emb.inv_freq"):
        continue  # a recomputed buffer that some old checkpoints saved
      if name == "lm_head.weight" and config.tie_word_embeddings:
        continue  # tied: the embedding is the LM head
      path = _param_path(name, _HF_LAYER, _HF_LAYER_NAMES, top)
      if path is None:
        raise ConversionError(f"{file}: unexpected tensor {name!r} for {hf['architectures'][0]}")
      if file not in opened:
        if not file.exists():
          raise ConversionError(f"{file}: listed in the safetensors index (tensor {name!r}) but missing")
        opened[file] = SafetensorsFile(file, scratch)
      if name not in opened[file].entries:
        raise ConversionError(f"{file}: tensor {name!r} is listed in the index but not in the file")
      value = opened[file].get(name)
      builder.put(path, value.T if value.ndim == 2 and path[0] != "embed" else value, str(file), name)
  return builder.finish(str(directory), seed), config


# ----------------------------------------------------------------------------- GGUF in

def _gguf_reader(path: epath.Path, local: os.PathLike):
  """A GGUFReader of `local` (the file `path`, or its local copy) whose failures on damaged files
  name the file and the tensor."""
  import gguf

  class Reader(gguf.GGUFReader):
    def _build_tensors(self, start_offs, fields):
      for field in fields:
        _, name, _, dims, raw_type, offset = field.parts
        name = bytes(name).decode("utf-8", "replace")
        try:
          qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
          raise ConversionError(f"{path}: tensor {name!r} has unknown type {int(raw_type[0])}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        end = int(start_offs + offset[0]) + math.prod(int(d) for d in dims) * type_size // block
        if end > len(self.data):
          raise ConversionError(f"{path}: tensor {name!r} needs bytes up to {end} but the file has "
                                f"{len(self.data)} (truncated?)")
      super()._build_tensors(start_offs, fields)

  try:
    return Reader(local)
  except ConversionError:
    raise
  except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged headers
    raise ConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _unpermute_qk(weights: np.ndarray, heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head row interleave of Q/K (as transformers' GGUF loader does)."""
  half = weights.shape[0] // heads // 2
  return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def load_gguf(path: str | os.PathLike, seed: int = 0, param_dtype: str = "float32"
              ) -> tuple[dict, ModelConfig, tokenizer_lib.Tokenizer]:
  """Canonical params (dequantized), config and tokenizer of a llama / qwen2 GGUF file (a remote
  one read from a temporary local copy: see the module docstring)."""
  with tempfile.TemporaryDirectory(prefix="convert-") as scratch:
    return _load_gguf(epath.Path(path), storage.local_copy(path, scratch), seed, param_dtype)


def _load_gguf(path: epath.Path, local: os.PathLike, seed: int, param_dtype: str
               ) -> tuple[dict, ModelConfig, tokenizer_lib.Tokenizer]:
  import gguf

  reader = _gguf_reader(path, local)

  def field(name: str, default: Any = None) -> Any:
    f = reader.fields.get(name)
    return default if f is None else f.contents()

  arch = field("general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise ConversionError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {GGUF_ARCHITECTURES}")
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    raise ConversionError(f"{path}: tensor 'rope_freqs.weight' (Llama 3.1 frequency factors) is not supported")
  scaling_type = field(f"{arch}.rope.scaling.type", "none")
  if scaling_type not in ("none", "linear"):
    raise ConversionError(f"{path}: rope scaling {scaling_type!r} is not supported")
  heads = field(f"{arch}.attention.head_count")
  kv_heads = field(f"{arch}.attention.head_count_kv", heads)
  hidden = field(f"{arch}.embedding_length")
  tokenizer = tokenizer_lib.tokenizer_from_gguf(local)
  if "token_embd.weight" not in tensors:
    raise ConversionError(f"{path}: missing tensor 'token_embd.weight'")
  config = ModelConfig(
      architecture=arch, vocab_size=int(tensors["token_embd.weight"].shape[1]), hidden_size=hidden,
      intermediate_size=field(f"{arch}.feed_forward_length"), num_layers=field(f"{arch}.block_count"),
      num_heads=heads, num_kv_heads=kv_heads,
      head_dim=field(f"{arch}.attention.key_length", hidden // heads),
      rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
      rope_scaling=({"type": "linear", "factor": float(field(f"{arch}.rope.scaling.factor"))}
                    if scaling_type == "linear" else None),
      rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
      max_position_embeddings=field(f"{arch}.context_length", 2048),
      tie_word_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors,
      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
      param_dtype=param_dtype)
  top = {"token_embd.weight": ("embed", "embedding"), "output_norm.weight": ("final_norm", "scale"),
         "output.weight": ("lm_head", "kernel")}
  builder = _TreeBuilder(config, np.dtype(param_dtype) if param_dtype != "bfloat16" else ml_dtypes.bfloat16)
  for name, tensor in tqdm(tensors.items(), desc=f"dequantizing {path.name}", unit="tensor"):
    target = _param_path(name, _GGUF_LAYER, _GGUF_LAYER_NAMES, top)
    if target is None:
      raise ConversionError(f"{path}: unexpected tensor {name!r} for GGUF architecture {arch!r}")
    try:
      value = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as e:
      raise ConversionError(f"{path}: tensor {name!r} of type {tensor.tensor_type.name} cannot be "
                            f"dequantized ({e})") from e
    if arch in GGUF_PERMUTED_QK and re.search(r"\.attn_[qk]\.", name):
      value = _unpermute_qk(value, heads if ".attn_q." in name else kv_heads)
    builder.put(target, value.T if value.ndim == 2 and target[0] != "embed" else value, str(path), name)
  return builder.finish(str(path), seed), config, tokenizer


# ----------------------------------------------------------------------------- Hugging Face out

def hf_config_from_model(config: ModelConfig, pad_token_id: int | None) -> dict:
  """A transformers `*ForSequenceClassification` config.json for `config`."""
  class_prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[config.architecture]
  rope: dict[str, Any] = {"rope_type": "default"}
  if config.rope_scaling:
    rope = {k: v for k, v in config.rope_scaling.items() if k != "type"}
    rope["rope_type"] = config.rope_scaling["type"]
  hf = {
      "architectures": [f"{class_prefix}ForSequenceClassification"], "model_type": config.architecture,
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.resolved_head_dim, "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta, "rope_parameters": {**rope, "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id, "pad_token_id": pad_token_id, "num_labels": 1,
      "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "dtype": config.param_dtype,
  }
  if config.architecture == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  if config.architecture == "qwen2":
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
  if config.architecture == "mistral":
    hf["sliding_window"] = config.sliding_window
  return hf


def export_pad_id(tokenizer: tokenizer_lib.Tokenizer | None, config: ModelConfig) -> int | None:
  """A pad id for the exported model that is not the end token.

  Hugging Face reads the reward at the last token that is not `pad_token_id`; we read it at the
  end token. With pad == eos the two would differ, so another special token pads instead.
  """
  pad = tokenizer.pad_id if tokenizer is not None else config.pad_token_id
  eos = tokenizer.eos_id if tokenizer is not None else config.eos_token_id
  if pad is None or pad != eos:
    return pad
  candidates = tokenizer.special_ids() if tokenizer is not None else []
  others = [i for i in candidates if i not in (eos, tokenizer.bos_id)]
  if not others:
    raise ConversionError(f"the tokenizer pads with its end token ({eos}) and has no other special "
                          "token to pad with; Hugging Face would read the reward one token early")
  return others[0]


def save_hf(out: str | os.PathLike, params: dict, config: ModelConfig,
            tokenizer: tokenizer_lib.Tokenizer | None, template: str | None = None) -> epath.Path:
  """Write a `*ForSequenceClassification` directory that transformers scores exactly as we do.

  With a prompt format (`templates.FORMATS`) the tokenizer gets a `chat_template` rendering a
  user/assistant conversation into the training text (ending in the end token), the format is
  stored (`prompt_format.json`), and the model card (README.md) says how to score with it.
  LoRA adapters (`model.lora`) are merged into their kernels first (`lora.merge`): the export is a
  plain model with no adapter tensors.
  """
  if config.lora.rank:
    from codepmp_jax.model import lora  # jax only when there is something to merge
    params, config = lora.merge(params, config)
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  pad_id = export_pad_id(tokenizer, config)
  hf_names = {("embed", "embedding"): "model.embed_tokens.weight", ("final_norm", "scale"): "model.norm.weight",
              ("score", "kernel"): "score.weight"}
  layer_names = {v: k for k, v in _HF_LAYER_NAMES.items()}

  def tensors() -> Iterator[tuple[str, Any]]:
    for path in expected_shapes(config):
      if path[0] == "lm_head":
        continue  # a sequence classifier has no LM head
      node = params
      for key in path:
        node = node[key]
      name = hf_names.get(path) or f"model.layers.{path[0][len('layers_'):]}.{layer_names[path[1:]]}"
      yield name, _LazyTranspose(node) if path[-1] == "kernel" else node

  write_safetensors(out / "model.safetensors", dict(tensors()), {"format": "pt"})
  (out / "config.json").write_text(json.dumps(hf_config_from_model(config, pad_id), indent=2) + "\n")
  if tokenizer is not None:
    _save_hf_tokenizer(out, tokenizer, pad_id, template)
  if template is not None:
    templates.save_prompt_format(out, template)
  (out / "README.md").write_text(model_card(config, template, tokenizer is not None))
  return out


def write_hf_reward_stats(out: str | os.PathLike, stats: dict | None) -> None:
  """Put a checkpoint's reward stats (`checkpoint.load_reward_stats`) in an export's config.json
  as `mean` and `std`, where OpenRLHF's reward model reads them (`--normalize_reward`: its
  `get_llm_for_sequence_regression` loads `config.mean` / `config.std`, as its reward trainer
  saves them); nothing when the checkpoint has none."""
  if stats is None:
    return
  file = epath.Path(out) / "config.json"
  hf = json.loads(file.read_text())
  hf.update(mean=stats["mean"], std=stats["std"])
  file.write_text(json.dumps(hf, indent=2) + "\n")


def read_hf_reward_stats(directory: str | os.PathLike) -> dict | None:
  """The reward stats (`mean`, `std`) of a Hugging Face model's config.json, or None."""
  hf = json.loads((epath.Path(directory) / "config.json").read_text())
  if hf.get("mean") is None or hf.get("std") is None:
    return None
  return {"mean": float(hf["mean"]), "std": float(hf["std"]), "source": f"{directory}/config.json"}


def model_card(config: ModelConfig, template: str | None, has_tokenizer: bool) -> str:
  """The README.md of an export: what the model is, its prompt format, and how to score with it."""
  name = "MODEL_DIR"
  if template is None:
    prompt = ("This checkpoint records no prompt format, so the export has no chat template: "
              "score the exact text the model was trained on, followed by the end token.")
  else:
    example_prompt, _ = templates.render_conversation(template, [{"role": "user", "content": "QUESTION"}])
    prompt = (f"Prompt format `{template}`: a reward is read at the end token after `prompt + response`, "
              f"where the prompt is rendered as\n\n```\n{example_prompt}\n```\n\n(`QUESTION` is the "
              "user message). The tokenizer's `chat_template` renders a [user, assistant] conversation "
              "into exactly that text plus the end token, so `apply_chat_template` gives the training text.")
  usage = "" if not has_tokenizer else f"""
## Score with transformers

```python
import torch, transformers
tok = transformers.AutoTokenizer.from_pretrained("{name}")
rm = transformers.AutoModelForSequenceClassification.from_pretrained("{name}", dtype=torch.float32)
messages = [{{"role": "user", "content": "What is 2 + 3?"}}, {{"role": "assistant", "content": " 5"}}]
ids = tok.apply_chat_template(messages, return_tensors="pt", return_dict=True)
print(rm(**ids).logits[0, 0].item())  # the reward
```

Batches pad on the right (`padding_side="right"`); the pad token is not the end token, so the
reward is read at the end token as in training.

## RewardBench and TRL

```
rewardbench --model={name} --batch_size=8
```
RewardBench applies the tokenizer's chat template, i.e. the training format above. TRL's
`RewardTrainer` fine-tunes the export directly (`model=...` this directory, a conversational or
standard preference data set).
"""
  return f"""# Reward model trained with codepmp_jax

A {config.architecture} `ForSequenceClassification` reward model ({config.num_layers} layers, hidden size
{config.hidden_size}, vocabulary {config.vocab_size}) exported by `python -m codepmp_jax.convert --to_hf`.
It was trained with CodePMP (arXiv 2410.02229): preference-model pretraining on code pairs
(Bradley-Terry + LM loss) and/or reward-model fine-tuning (Bradley-Terry loss), reward read at
the last token of each sequence (the end token).

{prompt}
{usage}"""


class _LazyTranspose:
  """`array.T` materialised only when written (keeps one tensor at a time in host memory)."""

  def __init__(self, array: Any):
    self.array = array
    self.shape = tuple(reversed(array.shape))
    self.dtype = array.dtype

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self.array).T


def _save_hf_tokenizer(out: epath.Path, tokenizer: tokenizer_lib.Tokenizer, pad_id: int | None,
                       template: str | None = None) -> None:
  """Our tokenizer files (so `load_tokenizer(out)` gives back the same fingerprint) plus the
  `tokenizer.json` / `tokenizer_config.json` that transformers reads."""
  tokenizer.save(out)
  if tokenizer.kind != "hf":
    (out / tokenizer_lib.HF_FILE).write_text(tokenizer.to_tokenizer_json())
  token = lambda i: None if i is None else tokenizer.id_to_token(i)  # noqa: E731
  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
      "pad_token": token(pad_id), "padding_side": "right", "add_bos_token": False,
      "add_eos_token": False, "clean_up_tokenization_spaces": False,
      # Without it transformers 4.x (RewardBench pins 4.51) adds token_type_ids, which the decoder
      # models' forward() rejects.
      "model_input_names": ["input_ids", "attention_mask"],
  }
  if template is not None:
    tokenizer_config["chat_template"] = templates.chat_template(template)
  (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


# ----------------------------------------------------------------------------- command line

def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command-line flags (defined only when run as a program, so other programs can import this module)."""
  def define(kind: str, name: str, default: object, help: str, *args: object) -> None:
    getattr(flags, f"DEFINE_{kind}")(name, default, *args, help, flag_values=values)

  define("string", "from_hf", None, "Hugging Face model directory (config.json + safetensors) to import.")
  define("string", "from_gguf", None, "GGUF file to import.")
  define("string", "to_hf", None, "Output directory for a transformers *ForSequenceClassification model.")
  define("string", "checkpoint", None, "Our checkpoint (or training workdir) to export with --to_hf.")
  define("string", "output", None, "Our checkpoint directory to write (with --from_hf / --from_gguf).")
  define("integer", "seed", 0, "Seed of the score head when the source has none.")
  define("enum", "param_dtype", "float32", "Stored parameter dtype.", ["float32", "bfloat16"])
  define("enum", "template", None, "Prompt format of the model (default: the one stored with the "
         "checkpoint).", list(templates.FORMATS))


def main(argv: list[str], values: flags.FlagValues = flags.FLAGS) -> None:
  """Imports a Hugging Face directory or GGUF file into our checkpoint, or exports one to Hugging Face."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])} (flags are --name=value)")
  from codepmp_jax import checkpoint  # orbax and jax only when writing or reading our checkpoints

  modes = [m for m in ("from_hf", "from_gguf", "to_hf") if values[m].value]
  if len(modes) != 1:
    raise app.UsageError("give exactly one of --from_hf, --from_gguf, --to_hf")
  if modes[0] == "to_hf":
    if not values.checkpoint:
      raise app.UsageError("--to_hf needs --checkpoint")
    source = epath.Path(values.checkpoint)
    params, config = checkpoint.load_model(source)
    tokenizer_dir = source / checkpoint.TOKENIZER
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
    if tokenizer is None:
      print(f"note: {source} has no tokenizer; writing the model without tokenizer files")
    template = values.template or templates.load_prompt_format(source)
    if template is None:
      print(f"note: {source} records no prompt format (--template to give one); the export has no chat_template")
    if config.lora.rank:
      print(f"note: merging the LoRA adapters (rank {config.lora.rank}, alpha {config.lora.alpha}, "
            f"{', '.join(config.lora.targets)}) into the exported weights")
    out = save_hf(values.to_hf, params, config, tokenizer, template)
    encode.save_truncation(out, encode.load_truncation(source))  # how our score/eval cut its inputs
    write_hf_reward_stats(out, checkpoint.load_reward_stats(source))
    print(f"wrote {out} ({config.architecture}, {config.num_layers} layers, prompt format {template})")
    return
  if not values.output:
    raise app.UsageError(f"--{modes[0]} needs --output")
  if modes[0] == "from_hf":
    params, config = load_hf(values.from_hf, values.seed, values.param_dtype)
    source = epath.Path(values.from_hf)
    has_tokenizer = any((source / n).exists() for n in (tokenizer_lib.HF_FILE, tokenizer_lib.SENTENCEPIECE_FILE))
    tokenizer = tokenizer_lib.load_tokenizer(source) if has_tokenizer else None
    if tokenizer is None:
      print(f"note: {source} has no tokenizer; the checkpoint can score token ids only")
    template = values.template or templates.load_prompt_format(source)
  else:
    params, config, tokenizer = load_gguf(values.from_gguf, values.seed, values.param_dtype)
    template = values.template
  truncation = encode.load_truncation(source) if modes[0] == "from_hf" else None
  reward_stats = read_hf_reward_stats(source) if modes[0] == "from_hf" else None
  out = checkpoint.save_model(values.output, params, config, tokenizer, prompt_format=template,
                              truncation=truncation, reward_stats=reward_stats)
  print(f"wrote {out} ({config.architecture}, {config.num_layers} layers, "
        f"{sum(x.size for x in _leaves(params)) / 1e6:.1f}M parameters)")


def _leaves(tree: dict) -> Iterator[np.ndarray]:
  for value in tree.values():
    yield from _leaves(value) if isinstance(value, dict) else (value,)


if __name__ == "__main__":
  cli.run(main, define_flags)
