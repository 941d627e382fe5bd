"""convert: sharded safetensors, GGUF quantizations and Q/K order, the HF export, the CLI, and clear errors."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from codepmp_jax import checkpoint, convert
from codepmp_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset
from codepmp_jax.model.transformer import RewardModel, right_padded
from tests import hf_models

ROOT = pathlib.Path(__file__).resolve().parents[1]
LENGTHS = [9, 6, 3]


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out


def _our_rewards(params, config, ids, mask) -> np.ndarray:
  return np.asarray(RewardModel(config).apply({"params": params}, jnp.asarray(ids),
                                              **right_padded(mask.sum(-1), ids.shape[1])).rewards[:, 0])


def _hf_rewards(directory, ids, mask) -> np.ndarray:
  model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits[:, 0].numpy()


def test_sharded_safetensors_read_like_one_file(tmp_path):
  model = hf_models.tiny_hf_model("qwen2_untied", tmp_path / "one")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  one, _ = convert.load_hf(tmp_path / "one", seed=5)
  sharded, _ = convert.load_hf(tmp_path / "sharded", seed=5)
  assert _flat(one).keys() == _flat(sharded).keys()
  for name, value in _flat(one).items():
    np.testing.assert_array_equal(value, _flat(sharded)[name], err_msg=name)
  head = _flat(one)["score/kernel"]
  assert head.shape == (32, 1) and 0.5 < head.std() * np.sqrt(33) < 1.5  # N(0, 1/(d+1))
  other, _ = convert.load_hf(tmp_path / "one", seed=6)
  assert not np.array_equal(head, np.asarray(other["score"]["kernel"]))


def test_bfloat16_params(tmp_path):
  model = hf_models.tiny_hf_model("llama", tmp_path)
  params, config = convert.load_hf(tmp_path, param_dtype="bfloat16")
  assert config.param_dtype == "bfloat16" and params["embed"]["embedding"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(params["embed"]["embedding"], np.float32),
                             model.model.embed_tokens.weight.detach().numpy(), atol=2e-3)


@pytest.mark.parametrize("qtypes,atol", [(["F32"], 0.0), (["F16", "BF16"], 4e-3), (["Q8_0"], 1e-2),
                                         (["Q4_0", "Q4_1"], 0.15)])
def test_gguf_dequantizes_and_restores_qk_order(qtypes, atol, tmp_path):
  model = hf_models.tiny_hf_model("llama", tmp_path)
  types = hf_models.write_tiny_gguf(model, tmp_path / "tiny.gguf", qtypes)
  assert set(qtypes) <= set(types.values())
  ours, config = convert.load_hf(tmp_path)
  params, gguf_config, tokenizer = convert.load_gguf(tmp_path / "tiny.gguf")
  assert gguf_config.replace(rms_norm_eps=1e-5) == config
  assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (96, 2, 0)
  flat = _flat(params)
  for name, expected in _flat(ours).items():
    if name != "score/kernel":
      bound = atol if "proj" in name or "lm_head" in name or "embed" in name else 1e-3 * (atol > 0)
      np.testing.assert_allclose(flat[name], expected, atol=bound, rtol=0, err_msg=name)
  if qtypes == ["F32"]:  # exact weights: the model's outputs must match transformers
    ids, mask = hf_models.padded_batch(LENGTHS, 96)
    logits = RewardModel(gguf_config).apply({"params": params}, ids, **right_padded(mask.sum(-1), ids.shape[1]),
                                            return_logits=True).logits
    with torch.no_grad():
      expected = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits
    np.testing.assert_allclose(np.asarray(logits)[mask > 0], expected.numpy()[mask > 0], atol=1e-4)


@pytest.mark.parametrize("name", ["qwen2_seqcls", pytest.param("mistral", marks=pytest.mark.slow),
                                  pytest.param("llama_llama3_rope", marks=pytest.mark.slow), "qwen2_tied"])
def test_export_scores_like_ours_in_transformers(name, tmp_path):
  hf_models.tiny_hf_model(name, tmp_path / "in")
  params, config = convert.load_hf(tmp_path / "in", seed=2)
  convert.save_hf(tmp_path / "out", params, config, tokenizer=None)
  exported = json.loads((tmp_path / "out" / "config.json").read_text())
  assert exported["architectures"][0].endswith("ForSequenceClassification") and exported["pad_token_id"] == 0
  ids, mask = hf_models.padded_batch(LENGTHS, config.vocab_size)
  ours = _our_rewards(params, config, ids, mask)
  np.testing.assert_allclose(_hf_rewards(tmp_path / "out", ids, mask), ours, atol=1e-4, rtol=0)
  again, again_config = convert.load_hf(tmp_path / "out")  # and back in
  assert again_config.resolved_head_dim == config.resolved_head_dim
  assert again_config.replace(tie_word_embeddings=config.tie_word_embeddings, head_dim=config.head_dim) == config
  np.testing.assert_allclose(_our_rewards(again, again_config, ids, mask), ours, atol=1e-6)


@pytest.mark.slow
def test_cli_round_trip(tmp_path):
  hf_models.tiny_hf_model("llama_seqcls", tmp_path / "hf")
  run = lambda *args: subprocess.run(  # noqa: E731
      [sys.executable, "-m", "codepmp_jax.convert", *args], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  result = run(f"--from_hf={tmp_path / 'hf'}", f"--output={tmp_path / 'ckpt'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "no tokenizer" in result.stdout
  result = run(f"--to_hf={tmp_path / 'out'}", f"--checkpoint={tmp_path / 'ckpt'}")
  assert result.returncode == 0, result.stderr[-3000:]
  params, config = checkpoint.load_model(tmp_path / "ckpt")
  ids, mask = hf_models.padded_batch(LENGTHS, config.vocab_size)
  ours = _our_rewards(params, config, ids, mask)
  np.testing.assert_allclose(_hf_rewards(tmp_path / "hf", ids, mask), ours, atol=1e-4, rtol=0)
  np.testing.assert_allclose(_hf_rewards(tmp_path / "out", ids, mask), ours, atol=1e-4, rtol=0)
  result = run(f"--from_hf={tmp_path / 'hf'}")
  assert result.returncode != 0 and "needs --output" in result.stderr


# ----------------------------------------------------------------------------- clear errors

@pytest.fixture
def tiny_dir(tmp_path) -> pathlib.Path:
  hf_models.tiny_hf_model("llama", tmp_path)
  return tmp_path


def test_truncated_safetensors_names_file_and_tensor(tiny_dir):
  file = tiny_dir / "model.safetensors"
  data = file.read_bytes()
  header_len = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + header_len])
  del header["__metadata__"]
  cut = len(data) - 8 - header_len - 1000
  first_cut = min((k for k in header if header[k]["data_offsets"][1] > cut), key=lambda k: header[k]["data_offsets"][0])
  file.write_bytes(data[:-1000])
  with pytest.raises(convert.ConversionError, match=rf"model\.safetensors: tensor '{first_cut}' needs bytes"):
    convert.load_hf(tiny_dir)


def test_corrupt_safetensors_header(tiny_dir):
  file = tiny_dir / "model.safetensors"
  data = bytearray(file.read_bytes())
  data[10:20] = b"\x00garbage\xff\xfe"
  file.write_bytes(bytes(data))
  with pytest.raises(convert.ConversionError, match=r"model\.safetensors: corrupt safetensors header"):
    convert.load_hf(tiny_dir)


def test_unsupported_architecture(tiny_dir):
  config = json.loads((tiny_dir / "config.json").read_text())
  config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
  (tiny_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(convert.ConversionError, match=r"config\.json: unsupported architecture 'GPT2LMHeadModel'"):
    convert.load_hf(tiny_dir)


def test_shape_mismatch_names_tensor(tiny_dir):
  config = json.loads((tiny_dir / "config.json").read_text())
  config["intermediate_size"] = 96
  (tiny_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(convert.ConversionError,
                     match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
    convert.load_hf(tiny_dir)


def test_missing_and_unexpected_tensors(tiny_dir):
  file = tiny_dir / "model.safetensors"
  source = convert.SafetensorsFile(file)
  tensors = {name: np.array(source.get(name)) for name in source.keys()}
  del source
  del tensors["model.layers.1.mlp.up_proj.weight"]
  convert.write_safetensors(file, tensors, {"format": "pt"})
  with pytest.raises(convert.ConversionError, match=r"missing tensors for \['layers_1/mlp/up_proj/kernel'\]"):
    convert.load_hf(tiny_dir)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((64, 32), np.float32)
  tensors["model.extra.weight"] = np.zeros(3, np.float32)
  convert.write_safetensors(file, tensors, {"format": "pt"})
  with pytest.raises(convert.ConversionError, match=r"model\.safetensors: unexpected tensor 'model\.extra\.weight'"):
    convert.load_hf(tiny_dir)


def test_pickle_checkpoints_are_refused(tmp_path):
  hf_models.tiny_hf_model("llama", tmp_path)
  (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
  with pytest.raises(convert.ConversionError, match="never read"):
    convert.load_hf(tmp_path)


def test_truncated_and_corrupt_gguf(tmp_path):
  model = hf_models.tiny_hf_model("llama", tmp_path)
  file = tmp_path / "tiny.gguf"
  hf_models.write_tiny_gguf(model, file, ["Q8_0"])
  data = file.read_bytes()
  file.write_bytes(data[:-200])
  with pytest.raises(convert.ConversionError, match=r"tiny\.gguf: tensor 'output\.weight' needs bytes"):
    convert.load_gguf(file)
  file.write_bytes(data[:100])
  with pytest.raises(convert.ConversionError, match=r"tiny\.gguf: not a readable GGUF file"):
    convert.load_gguf(file)


def test_reader_agrees_with_safetensors_library(tiny_dir):
  """Our memory-mapped reader returns exactly what the safetensors library reads."""
  from safetensors.numpy import load_file
  reference = load_file(tiny_dir / "model.safetensors")
  ours = convert.SafetensorsFile(tiny_dir / "model.safetensors")
  assert sorted(ours.keys()) == sorted(reference)
  for name, value in reference.items():
    np.testing.assert_array_equal(ours.get(name), value)


@pytest.mark.slow
def test_export_with_sentencepiece_tokenizer_scores_text_like_ours(tmp_path):
  """Our tiny-config model with its code tokenizer, exported and used through transformers alone."""
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  sp = train_sentencepiece(files, vocab_size=400, out_prefix=tmp_path / "sp")
  config = get_preset("tiny", vocab_size=400, eos_token_id=sp.eos_id, pad_token_id=sp.pad_id)
  params = nn.unbox(transformer.init_params(config, jax.random.key(0)))
  out = convert.save_hf(tmp_path / "hf", params, config, sp)
  assert load_tokenizer(out).fingerprint == sp.fingerprint
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  texts = ["def f(x):\n    return x * 2\n", "import json\n\nprint(json.dumps({'a': 1}))\n", "pass"]
  batch = hf_tokenizer([t + hf_tokenizer.eos_token for t in texts], padding=True, return_tensors="np")
  ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
  for row, text in enumerate(texts):
    assert ids[row, :mask[row].sum()].tolist() == sp.encode(text) + [sp.eos_id]
  np.testing.assert_allclose(_hf_rewards(out, ids, mask), _our_rewards(params, config, ids, mask), atol=1e-4)
