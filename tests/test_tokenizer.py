"""Tokenizers: the GGUF vocabulary matches transformers' reading of the same file; round trips."""
from __future__ import annotations

import json
import pathlib
import sysconfig

import pytest
import tokenizers

from codepmp_jax.data import tokenizer as tok_lib
from tests import hf_models

CODE = 'def mean(xs):\n    """Average."""\n\treturn sum(xs) / len(xs)  # 12345 ✓ é 🙂\n\n\n'


def _real_texts(shared_data: pathlib.Path, n: int = 20) -> list[str]:
  lines = (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:n]
  texts = []
  for line in lines:
    record = json.loads(line)
    texts += [record["question"], record["answer"]]
  return texts + [CODE, "<|im_start|>user\nHi<|im_end|>\n", "  leading and trailing  ", ""]


@pytest.fixture(scope="module")
def gguf_pair():
  path = hf_models.smollm2_gguf_path()
  import transformers
  theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  return tok_lib.load_tokenizer(path), theirs


def test_gguf_tokenizer_matches_transformers(gguf_pair, shared_data):
  ours, theirs = gguf_pair
  texts = _real_texts(shared_data)
  expected = [theirs.encode(t, add_special_tokens=False) for t in texts]
  assert [ours.encode(t) for t in texts] == expected
  assert ours.encode_batch(texts) == expected
  assert sum(map(len, expected)) > 2000
  assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (49152, 1, 2, 2)
  for text, ids in zip(texts, expected):
    assert ours.decode(ids) == text == theirs.decode(ids)


def test_gguf_tokenizer_saves_and_reloads(gguf_pair, tmp_path):
  ours, _ = gguf_pair
  ours.save(tmp_path / "tokenizer")
  again = tok_lib.load_tokenizer(tmp_path / "tokenizer")
  assert again.fingerprint == ours.fingerprint
  assert again.encode(CODE) == ours.encode(CODE)
  assert (again.bos_id, again.eos_id, again.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
  # A checkpoint directory holds its tokenizer in tokenizer/.
  assert tok_lib.load_tokenizer(tmp_path).fingerprint == ours.fingerprint


def test_hf_directory_reads_special_ids(gguf_pair, tmp_path):
  ours, theirs = gguf_pair
  theirs.save_pretrained(tmp_path)
  from_dir = tok_lib.load_tokenizer(tmp_path)
  assert from_dir.kind == "hf"
  assert from_dir.eos_id == theirs.convert_tokens_to_ids(theirs.eos_token)
  assert from_dir.encode(CODE) == ours.encode(CODE)
  assert tok_lib.load_tokenizer(tmp_path / "tokenizer.json").encode(CODE) == ours.encode(CODE)


def test_sentencepiece_trains_on_code_and_round_trips(tmp_path):
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  sp = tok_lib.train_sentencepiece(files, vocab_size=700, out_prefix=tmp_path / "code")
  assert (tmp_path / "code.model").exists()
  assert (sp.vocab_size, sp.pad_id, sp.eos_id, sp.bos_id) == (700, 0, 2, None)
  ids = sp.encode(CODE)
  assert sp.decode(ids) == CODE  # byte fallback covers the emoji and accents
  assert sp.encode("x = 1") + sp.encode("\n") == sp.encode("x = 1\n")  # no dummy prefix
  source = files[0].read_text()
  assert len(sp.encode(source)) < len(source.encode()) / 2  # it learned code pieces
  sp.save(tmp_path / "saved")
  again = tok_lib.load_tokenizer(tmp_path / "saved")
  assert again.fingerprint == sp.fingerprint
  assert again.encode_batch([CODE, "pass"]) == [ids, sp.encode("pass")]
  assert tok_lib.load_tokenizer(tmp_path / "code.model").encode(CODE) == ids

  # Its tokenizer.json export (for transformers) encodes unseen code to the same ids.
  exported = tokenizers.Tokenizer.from_str(sp.to_tokenizer_json())
  unseen = [f.read_text() for f in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "email").glob("*.py"))[:6]]
  for text in unseen + [CODE, "a  b   c\n\n\n    d"]:
    assert exported.encode(text, add_special_tokens=False).ids == sp.encode(text)
    assert exported.decode(sp.encode(text)) == text


def test_bad_files_give_clear_errors(tmp_path):
  bad = tmp_path / "broken.gguf"
  bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 10)
  with pytest.raises(ValueError, match="broken.gguf"):
    tok_lib.load_tokenizer(bad)
  model = tmp_path / "junk.model"
  model.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="junk.model"):
    tok_lib.load_tokenizer(model)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no codepmp_tokenizer.json"):
    tok_lib.load_tokenizer(empty)
