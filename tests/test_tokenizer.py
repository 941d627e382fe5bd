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
def gguf_ours():
  return tok_lib.load_tokenizer(hf_models.smollm2_gguf_path())


@pytest.fixture(scope="module")
def gguf_pair(gguf_ours):
  """Ours and transformers' reading of the GGUF (transformers takes ~16 s: only the tests that
  compare with it ask for it)."""
  path = hf_models.smollm2_gguf_path()
  import transformers
  return gguf_ours, transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow  # real-model parity: transformers reads the GGUF vocabulary in ~16 s
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


def test_gguf_tokenizer_saves_and_reloads(gguf_ours, tmp_path):
  ours = gguf_ours
  ours.save(tmp_path / "tokenizer")
  again = tok_lib.load_tokenizer(tmp_path / "tokenizer")
  assert again.fingerprint == ours.fingerprint
  assert again.encode(CODE) == ours.encode(CODE)
  assert (again.bos_id, again.eos_id, again.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
  # A checkpoint directory holds its tokenizer in tokenizer/.
  assert tok_lib.load_tokenizer(tmp_path).fingerprint == ours.fingerprint


@pytest.mark.slow  # real-model parity: transformers reads the GGUF vocabulary in ~16 s
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


JOINED = [("Instruction:What is x?\n\nResponse:", " x = 3"), ("x =", "= 3"), ("", "print(1)"),
          ("Passage: café\n\nResponse:", "é🙂 done"), ("def f():\n", "    return 1\n"), ("a", "")]


def _exported_transformers_tokenizer(ours: tok_lib.Tokenizer, directory: pathlib.Path):
  """The tokenizer of `convert --to_hf`, as transformers loads it."""
  import transformers
  from codepmp_jax import convert
  convert._save_hf_tokenizer(directory, ours, ours.pad_id)
  return transformers.AutoTokenizer.from_pretrained(directory)


def _check_joined(ours: tok_lib.Tokenizer, theirs, pairs) -> None:
  for prompt, response in pairs:
    ids, start = ours.encode_joined(prompt, response)
    assert ids == theirs(prompt + response, add_special_tokens=False)["input_ids"], (prompt, response)
    assert ours.encode_joined_batch([prompt], [response]) == [(ids, start)]
    assert ours.decode(ids) == prompt + response
    # Every prompt token lies inside the prompt; the first response token covers response text.
    assert prompt.startswith(ours.decode(ids[:start]))
    assert start == len(ids) or not prompt.startswith(ours.decode(ids[:start + 1])) or not response


@pytest.mark.slow  # real-model parity: transformers reads the GGUF vocabulary in ~16 s
def test_joined_encoding_equals_transformers_for_every_tokenizer_kind(gguf_pair, tmp_path, shared_data):
  ours, theirs = gguf_pair  # GGUF vocabulary -> tokenizer.json
  record = json.loads((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
  pairs = JOINED + [(f"Instruction:{record['question']}\n\nResponse:", " " + record["answer"])]
  _check_joined(ours, theirs, pairs)
  _check_joined(ours, _exported_transformers_tokenizer(ours, tmp_path / "gguf_export"), pairs)
  theirs.save_pretrained(tmp_path / "hf")  # a Hugging Face tokenizer.json directory
  _check_joined(tok_lib.load_tokenizer(tmp_path / "hf"), theirs, pairs)
  # The merge case: tokenized apart, "x =" + "= 3" is not what anyone else sees.
  ids, start = ours.encode_joined("x =", "= 3")
  assert ours.encode("x =") + ours.encode("= 3") != ids and ours.decode(ids[start:]).endswith("= 3")

  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  sp = tok_lib.train_sentencepiece(files, vocab_size=700, out_prefix=tmp_path / "code")
  _check_joined(sp, _exported_transformers_tokenizer(sp, tmp_path / "sp_export"), pairs)
  split = [(p, r) for p, r in pairs if sp.encode(p) + sp.encode(r) != sp.encode_joined(p, r)[0]]
  assert split  # the sentencepiece model too merges across the boundary somewhere


def test_sentencepiece_boundary_fast_path_equals_its_offsets(tmp_path):
  """Piece byte lengths give sentencepiece's own offsets; a normalizing model (dummy prefix, NFKC)
  falls back to asking sentencepiece."""
  import io

  import sentencepiece as spm
  texts = [json.dumps(p) for p in JOINED] * 30 + [CODE] * 30
  normalizing = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=normalizing, vocab_size=500,
                                 model_type="bpe", byte_fallback=True, eos_id=2, minloglevel=2,
                                 hard_vocab_limit=False)
  models = [tok_lib.train_sentencepiece(texts, 500, tmp_path / "code"),
            tok_lib.Tokenizer("sentencepiece", normalizing.getvalue(), eos_id=2)]
  for tokenizer in models:
    for prompt, response in JOINED + [("ﬁ  x", "① y"), (CODE, "  ")]:
      proto = tokenizer._sp.encode(prompt + response, return_type="proto")
      boundary = tok_lib._boundary([(p.begin, p.end) for p in proto.pieces], len(prompt.encode()))
      assert tokenizer.encode_joined(prompt, response) == ([p.id for p in proto.pieces], boundary)
  ids = models[1].encode("ﬁ  x")
  assert models[1]._piece_bytes[ids].sum() != len("ﬁ  x".encode())  # this one took the fallback
