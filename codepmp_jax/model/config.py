"""Model shapes: one dataclass for the Llama / Qwen2 / Mistral family, and the published presets."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "mistral")
ROPE_SCALING_TYPES = ("linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
# Attention implementations by name (model/attention.py); "auto" is resolved per backend once, at
# config resolution (`resolve_attention`).
ATTENTION_IMPLEMENTATIONS = ("auto", "plain", "blocked", "cudnn", "splash")
LEGACY_ATTENTION = {"fused": "cudnn"}  # names in model_config.json files written before the rename
# The projections LoRA can adapt: the names of the model's `Linear` layers (as in transformers).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the projections in `targets` (`codepmp_jax.model.lora`); rank 0 = off.

  Each adapted kernel W [in, out] computes `x @ W + (alpha / rank) * (x @ A) @ B` with A [in, rank]
  random and B [rank, out] zero at init (PEFT's init: the initial model is the base model). It is a
  model field, not a training one, so a checkpoint's `model_config.json` says its params hold
  adapters and every reader (score, eval, convert) builds the same model; a run sets it on top of
  an `init_from` base (`train.NUMERICS_FIELDS`). Default targets: all seven projections
  ("all-linear", as OpenRLHF's `--target_modules all-linear` and the QLoRA recipe).
  """

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    # "q_proj,v_proj" (a string, or one element: what --config.model.lora.targets=q_proj,v_proj
    # gives) means the same as ("q_proj", "v_proj").
    targets = [self.targets] if isinstance(self.targets, str) else self.targets
    targets = tuple(t.strip() for text in targets for t in text.split(",") if t.strip())
    object.__setattr__(self, "targets", targets)
    unknown = sorted(set(self.targets) - set(LORA_TARGETS))
    if unknown:
      raise ValueError(f"lora targets {unknown} are not among the model's projections {LORA_TARGETS}")
    if self.rank < 0:
      raise ValueError(f"lora rank must be >= 0 (0 = off), got {self.rank}")
    if self.rank and (self.alpha <= 0 or not self.targets):
      raise ValueError(f"lora rank {self.rank} needs alpha > 0 and at least one target")

  @property
  def scale(self) -> float:
    """The adapters' multiplier alpha / rank (PEFT's `scaling`)."""
    return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only reward model.

  `rope_scaling` is None or a dict: {"type": "linear", "factor": f} or
  {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
  "original_max_position_embeddings"} (the Hugging Face fields of the same names).
  """

  architecture: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat_policy: str = "none"
  scan_layers: bool = False
  # plain | blocked | cudnn | splash, or auto (`resolve_attention`: picked for the backend once,
  # when the run's config is resolved; a model built from an unresolved config runs blocked).
  attention: str = "auto"
  # blocked: causal self-attention over >= 2 blocks runs in query blocks of about this many tokens
  # (smaller blocks skip more of the masked triangle and compile longer)
  causal_block: int = 256
  # blocked: also shrink blocks until one block's float32 scores ([rows, heads, queries, keys])
  # fit this many bytes (a core's cache on CPU; 0 = no cap), but not under attention_min_block
  attention_block_bytes: int = 0
  attention_min_block: int = 32
  splash_interpret: bool = False  # splash: run the Pallas kernel in interpret mode (any backend)
  lora: LoraConfig = LoraConfig()  # low-rank adapters; rank 0 (the default) = none

  def __post_init__(self):
    if isinstance(self.lora, dict):  # from to_dict / JSON / a ConfigDict
      object.__setattr__(self, "lora", LoraConfig(**self.lora))
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if self.causal_block < 1:
      raise ValueError(f"causal_block must be positive, got {self.causal_block}")
    if self.attention_block_bytes < 0 or self.attention_min_block < 1:
      raise ValueError(f"attention_block_bytes must be >= 0 and attention_min_block >= 1, got "
                       f"{self.attention_block_bytes} and {self.attention_min_block}")
    if self.rope_scaling is not None and self.rope_scaling.get("type") not in ROPE_SCALING_TYPES:
      raise ValueError(f"rope_scaling type {self.rope_scaling.get('type')!r} is not one of {ROPE_SCALING_TYPES}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config fields: {unknown}")
    if values.get("attention") in LEGACY_ATTENTION:
      values = {**values, "attention": LEGACY_ATTENTION[values["attention"]]}
    return cls(**values)

  def save(self, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

  @classmethod
  def load(cls, path: str | pathlib.Path) -> "ModelConfig":
    return cls.from_dict(json.loads(pathlib.Path(path).read_text()))


PRESETS: dict[str, ModelConfig] = {
    # Small enough to train on a laptop CPU; tests and the built-in demo use it.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, max_position_embeddings=1024),
    "smollm2_135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "qwen2_0_5b": ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, qkv_bias=True,
        eos_token_id=151643, pad_token_id=151643),
    "qwen2_1_5b": ModelConfig(
        architecture="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, qkv_bias=True,
        eos_token_id=151643, pad_token_id=151643),
    "qwen2_7b": ModelConfig(
        architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False, qkv_bias=True,
        eos_token_id=151643, pad_token_id=151643),
    "llama3_8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001,
        pad_token_id=128001),
    "deepseek_coder_1_3b": ModelConfig(
        vocab_size=32256, hidden_size=2048, intermediate_size=5504, num_layers=24, num_heads=16,
        num_kv_heads=16, rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0},
        rms_norm_eps=1e-6, max_position_embeddings=16384, bos_token_id=32013,
        eos_token_id=32014, pad_token_id=32014),
    "deepseek_coder_6_7b": ModelConfig(
        vocab_size=32256, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, rope_theta=100000.0,
        rope_scaling={"type": "linear", "factor": 4.0}, rms_norm_eps=1e-6,
        max_position_embeddings=16384, bos_token_id=32013, eos_token_id=32014,
        pad_token_id=32014),
}


# What `attention="auto"` becomes on each backend (`resolve_attention`); why, in docs/performance.md
# ("What makes it fast"); benchmarks/train_step.py measures them.
AUTO_ATTENTION: dict[str, dict[str, Any]] = {
    # query blocks whose float32 scores fit a 2 MiB L2 cache, at least 32-64 queries (below)
    "cpu": {"attention": "blocked", "attention_block_bytes": 2 << 20},
    "gpu": {"attention": "cudnn"},  # for bf16/fp16 and head_dim <= 128 (what cuDNN takes), else blocked
    "tpu": {"attention": "splash"},
}


def resolve_attention(config: ModelConfig, backend: str) -> ModelConfig:
  """`config` with `attention="auto"` replaced by `backend`'s choice (`AUTO_ATTENTION`; "cpu",
  "gpu", "tpu", else blocked) and that choice's settings; a named implementation is returned
  unchanged. Called once where a program resolves its config (train, score, sample_candidates),
  with the backend its mesh runs on; model code never asks which backend it is on."""
  if config.attention != "auto":
    return config
  fields = dict(AUTO_ATTENTION.get(backend, {"attention": "blocked"}))
  if fields["attention"] == "cudnn" and not (
      config.dtype in ("bfloat16", "float16") and config.resolved_head_dim <= 128):
    fields = {"attention": "blocked"}
  if fields.get("attention_block_bytes"):
    # Each key costs a block `heads x queries` scores and `2 x kv_heads x head_dim` copied key and
    # value elements: 4 x kv_heads x head_dim / heads queries keep the copies under half the scores.
    wanted = 4 * config.num_kv_heads * config.resolved_head_dim // config.num_heads
    fields["attention_min_block"] = max(32, min(64, wanted))
  return config.replace(**fields)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  """A published model shape by name, with optional field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
