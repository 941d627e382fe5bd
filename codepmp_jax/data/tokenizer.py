"""One tokenizer interface over sentencepiece, Hugging Face `tokenizer.json` and GGUF vocabularies.

Every tokenizer keeps the exact bytes of its model file: `save` writes them back unchanged and
`fingerprint` hashes them, so token shards and checkpoints can check they share a tokenizer.
A GGUF vocabulary is converted once into a `tokenizer.json` and from then on behaves like one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers

SPECIAL_IDS_FILE = "codepmp_tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

# llama.cpp `tokenizer.ggml.pre` names -> the split before byte-level BPE (as in the original
# Hugging Face tokenizers of those models).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = ("default", "gpt2", "gpt-2", "starcoder", "refact", "olmo", "dbrx")
_DIGITS_PRE = ("smollm",)
_GGUF_CONTROL_TOKEN = 3
_GGUF_USER_DEFINED_TOKEN = 4


class Tokenizer:
  """Text <-> token ids with the special ids a reward model needs (eos ends every response)."""

  def __init__(self, kind: str, blob: bytes, eos_id: int, pad_id: int | None = None,
               bos_id: int | None = None):
    if kind not in ("sentencepiece", "hf"):
      raise ValueError(f"unknown tokenizer kind {kind!r}")
    self.kind = kind
    self._blob = blob
    if kind == "sentencepiece":
      self._sp = spm.SentencePieceProcessor(model_proto=blob)
      self.vocab_size = self._sp.get_piece_size()
      self._piece_bytes = _piece_byte_lengths(self._sp)
    else:
      self._hf = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
      self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
    self.eos_id = int(eos_id)
    self.pad_id = self.eos_id if pad_id is None else int(pad_id)
    self.bos_id = None if bos_id is None else int(bos_id)
    for name in ("eos_id", "pad_id", "bos_id"):
      value = getattr(self, name)
      if value is not None and not 0 <= value < self.vocab_size:
        raise ValueError(f"tokenizer {name}={value} is outside the vocabulary (size {self.vocab_size})")
    self.fingerprint = hashlib.sha256(blob).hexdigest()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with no special tokens added."""
    if self.kind == "sentencepiece":
      return self._sp.encode(text)
    return self._hf.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of many texts at once, using all cores."""
    texts = list(texts)
    if self.kind == "sentencepiece":
      return self._sp.encode(texts, num_threads=os.cpu_count() or 1)
    return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

  def encode_joined(self, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of `prompt + response` tokenized as ONE text, and where the response starts.

    This is what transformers, TRL and RewardBench produce for the same string (tokenizing the two
    parts separately differs where the response's first characters merge with the prompt's last
    token, and sentencepiece would mark each part as a word start). The response starts at the
    first token that covers any of its characters, found from the tokenizer's offsets.
    """
    return self.encode_joined_batch([prompt], [response])[0]

  def encode_joined_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[list[int], int]]:
    """`encode_joined` of many (prompt, response) pairs with one batched call (all cores)."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    texts = [p + r for p, r in zip(prompts, responses)]
    out = []
    if self.kind == "sentencepiece":  # offsets are UTF-8 byte positions
      threads = os.cpu_count() or 1
      for prompt, text, ids in zip(prompts, texts, self._sp.encode(texts, num_threads=threads)):
        # Fast path: offsets from the pieces' byte lengths, exact when they add up to the text (no
        # normalization changed it, no unknown piece); otherwise ask sentencepiece for its offsets.
        ends = np.cumsum(self._piece_bytes[ids]) if ids else np.zeros(0, np.int64)
        if ids and (ends[-1] != len(text.encode("utf-8")) or self._piece_bytes[ids].min() < 0):
          proto = self._sp.encode(text, return_type="proto")
          spans = [(p.begin, p.end) for p in proto.pieces]
        else:
          spans = zip(ends - self._piece_bytes[ids], ends)
        out.append((ids, _boundary(list(spans), len(prompt.encode("utf-8")))))
    else:  # offsets are character positions
      for prompt, encoding in zip(prompts, self._hf.encode_batch(texts, add_special_tokens=False)):
        out.append((list(encoding.ids), _boundary(encoding.offsets, len(prompt))))
    return out

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """The text of `ids` (the inverse of `encode` for text without special tokens)."""
    ids = [int(i) for i in ids]
    if self.kind == "sentencepiece":
      if skip_special_tokens:
        ids = [i for i in ids if not self._sp.is_control(i)]
      return self._sp.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

  def id_to_token(self, token_id: int) -> str:
    """The vocabulary entry of one id (for messages and for exporting special tokens)."""
    if self.kind == "sentencepiece":
      return self._sp.id_to_piece(int(token_id))
    return self._hf.id_to_token(int(token_id))

  def special_ids(self) -> list[int]:
    """Ids of control tokens (never produced from ordinary text), ascending."""
    if self.kind == "sentencepiece":
      return [i for i in range(self.vocab_size) if self._sp.is_control(i)]
    return sorted(i for i, t in self._hf.get_added_tokens_decoder().items() if t.special)

  def to_tokenizer_json(self) -> str:
    """This tokenizer as a Hugging Face `tokenizer.json` (for exporting models to transformers).

    A sentencepiece BPE model becomes a byte-fallback BPE whose merges are ordered by the score
    of the merged piece, which is the order sentencepiece applies them in.
    """
    if self.kind == "hf":
      return self._blob.decode("utf-8")
    sp = self._sp
    if sp.get_piece_size() and not any(sp.is_byte(i) for i in range(sp.get_piece_size())):
      raise ValueError("only byte-fallback sentencepiece models can be exported to tokenizer.json")
    pieces = [sp.id_to_piece(i) for i in range(self.vocab_size)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    normal = {p: i for i, p in enumerate(pieces) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = sorted(
        ((-sp.get_score(i), normal[p[:k]], normal[p[k:]], p[:k], p[k:])
         for p, i in normal.items() for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal))
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=[(left, right) for *_, left, right in merges],
        unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True, byte_fallback=True))
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([tokenizers.AddedToken(pieces[i], special=True, normalized=False)
                           for i in self.special_ids()])
    return hf.to_str()

  @property
  def file_name(self) -> str:
    return SENTENCEPIECE_FILE if self.kind == "sentencepiece" else HF_FILE

  def save(self, directory: str | os.PathLike) -> epath.Path:
    """Write the model file (byte-identical to the one loaded) and the special ids beside it."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / self.file_name).write_bytes(self._blob)
    special = {"kind": self.kind, "file": self.file_name, "bos_id": self.bos_id,
               "eos_id": self.eos_id, "pad_id": self.pad_id, "fingerprint": self.fingerprint}
    (directory / SPECIAL_IDS_FILE).write_text(json.dumps(special, indent=2) + "\n")
    return directory

  def __repr__(self) -> str:
    return (f"Tokenizer(kind={self.kind}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, fingerprint={self.fingerprint[:12]})")


def _piece_byte_lengths(sp: spm.SentencePieceProcessor) -> np.ndarray:
  """UTF-8 length of the text each piece stands for (byte pieces 1, control 0, unknown -1)."""
  lengths = np.zeros(sp.get_piece_size(), np.int64)
  for i in range(sp.get_piece_size()):
    if sp.is_unknown(i):
      lengths[i] = -1
    elif sp.is_byte(i):
      lengths[i] = 1
    elif not sp.is_control(i):
      lengths[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
  return lengths


def _boundary(offsets: Sequence[tuple[int, int]], prompt_end: int) -> int:
  """Index of the first token that covers text at or after `prompt_end` (the response's first token).

  A token that straddles the boundary belongs to the response; the partial-byte tokens of a
  character split by byte fallback carry that character's start, so they go with it.
  """
  for i, (begin, end) in enumerate(offsets):
    if end > prompt_end or begin >= prompt_end:
      return i
  return len(offsets)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A tokenizer from a `.model`, a `tokenizer.json`, a `.gguf`, or a directory holding one.

  A directory written by `Tokenizer.save` (or a checkpoint's `tokenizer/` folder) is read back
  with its special ids; a Hugging Face model directory takes them from its tokenizer_config.json /
  config.json.
  """
  path = epath.Path(path)
  if path.is_dir():
    if (path / "tokenizer").is_dir() and not any(
        (path / name).exists() for name in (SPECIAL_IDS_FILE, HF_FILE, SENTENCEPIECE_FILE)):
      path = path / "tokenizer"
    return _load_directory(path)
  if not path.exists():
    raise FileNotFoundError(f"tokenizer file {path} does not exist")
  if path.suffix == ".gguf":
    return tokenizer_from_gguf(path)
  if path.suffix == ".model":
    return _sentencepiece_from_bytes(path.read_bytes(), path)
  if path.suffix == ".json":
    return _hf_from_directory(path.parent, path)
  raise ValueError(f"{path}: not a tokenizer (expected .model, tokenizer.json, .gguf or a directory)")


def _load_directory(directory: epath.Path) -> Tokenizer:
  special_file = directory / SPECIAL_IDS_FILE
  if special_file.exists():
    special = json.loads(special_file.read_text())
    blob = (directory / special["file"]).read_bytes()
    tokenizer = Tokenizer(special["kind"], blob, eos_id=special["eos_id"], pad_id=special["pad_id"],
                          bos_id=special["bos_id"])
    if special.get("fingerprint") not in (None, tokenizer.fingerprint):
      raise ValueError(f"{directory / special['file']}: contents do not match the fingerprint in {special_file}")
    return tokenizer
  if (directory / HF_FILE).exists():
    return _hf_from_directory(directory, directory / HF_FILE)
  if (directory / SENTENCEPIECE_FILE).exists():
    return _sentencepiece_from_bytes((directory / SENTENCEPIECE_FILE).read_bytes(), directory / SENTENCEPIECE_FILE)
  ggufs = sorted(directory.glob("*.gguf"))
  if len(ggufs) == 1:
    return tokenizer_from_gguf(ggufs[0])
  raise FileNotFoundError(
      f"{directory}: no {SPECIAL_IDS_FILE}, {HF_FILE}, {SENTENCEPIECE_FILE} or single .gguf file found")


def _sentencepiece_from_bytes(blob: bytes, source: epath.Path) -> Tokenizer:
  try:
    sp = spm.SentencePieceProcessor(model_proto=blob)
  except RuntimeError as e:
    raise ValueError(f"{source}: not a sentencepiece model ({e})") from e
  if sp.eos_id() < 0:
    raise ValueError(f"{source}: the sentencepiece model has no eos id; a reward model needs one")
  return Tokenizer("sentencepiece", blob, eos_id=sp.eos_id(),
                   pad_id=sp.pad_id() if sp.pad_id() >= 0 else None,
                   bos_id=sp.bos_id() if sp.bos_id() >= 0 else None)


def _hf_from_directory(directory: epath.Path, json_file: epath.Path) -> Tokenizer:
  """A `tokenizer.json` with special ids from the Hugging Face config files beside it."""
  blob = json_file.read_bytes()
  try:
    hf = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
  except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
    raise ValueError(f"{json_file}: not a Hugging Face tokenizer.json ({e})") from e
  special: dict[str, int | None] = {}
  config = _read_json(directory / "config.json")
  tokenizer_config = _read_json(directory / "tokenizer_config.json")
  special_map = _read_json(directory / "special_tokens_map.json")
  for name in ("bos", "eos", "pad"):
    token = tokenizer_config.get(f"{name}_token") or special_map.get(f"{name}_token")
    if isinstance(token, dict):
      token = token.get("content")
    token_id = hf.token_to_id(token) if isinstance(token, str) else None
    if token_id is None:
      token_id = config.get(f"{name}_token_id")
      if isinstance(token_id, list):  # Llama 3 lists several end tokens; the first ends a turn
        token_id = token_id[0] if token_id else None
    special[name] = token_id
  if special["eos"] is None:
    raise ValueError(f"{directory}: cannot find the eos token (looked in tokenizer_config.json, "
                     "special_tokens_map.json and config.json)")
  return Tokenizer("hf", blob, eos_id=special["eos"], pad_id=special["pad"], bos_id=special["bos"])


def _read_json(path: epath.Path) -> dict:
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from e


def tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
  """The vocabulary stored in a GGUF file, as a `tokenizer.json` tokenizer (byte-level BPE)."""
  import gguf  # only needed for GGUF files

  path = epath.Path(path)
  try:
    reader = gguf.GGUFReader(os.fspath(path))  # memory-mapped: a local file
  except Exception as e:  # gguf raises ValueError/struct.error/IndexError on damaged files
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e

  def field(name: str, default=None):
    f = reader.fields.get(name)
    return default if f is None else f.contents()

  model = field("tokenizer.ggml.model")
  if model is None:
    raise ValueError(f"{path}: no tokenizer.ggml.model field; the file holds no tokenizer")
  if model != "gpt2":
    raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
  tokens = field("tokenizer.ggml.tokens")
  merges = field("tokenizer.ggml.merges")
  if not tokens or not merges:
    raise ValueError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
  token_types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
  pre = field("tokenizer.ggml.pre", "default")

  hf = _byte_level_bpe(tokens, merges, pre, path)
  hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                         for t, kind in zip(tokens, token_types) if kind == _GGUF_CONTROL_TOKEN])
  hf.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                 for t, kind in zip(tokens, token_types) if kind == _GGUF_USER_DEFINED_TOKEN])
  eos_id = field("tokenizer.ggml.eos_token_id")
  if eos_id is None:
    raise ValueError(f"{path}: no tokenizer.ggml.eos_token_id; a reward model needs an end token")
  bos_id = field("tokenizer.ggml.bos_token_id")
  pad_id = field("tokenizer.ggml.padding_token_id")
  return Tokenizer("hf", hf.to_str().encode("utf-8"), eos_id=eos_id, pad_id=pad_id, bos_id=bos_id)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str, path: epath.Path) -> tokenizers.Tokenizer:
  pairs = []
  for rank, merge in enumerate(merges):
    parts = merge.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{path}: tokenizer.ggml.merges[{rank}] = {merge!r} is not two tokens")
    pairs.append((parts[0], parts[1]))
  vocab = {token: i for i, token in enumerate(tokens)}
  hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
  if pre in _GPT2_PRE:
    hf.pre_tokenizer = byte_level
  elif pre in _DIGITS_PRE:
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ("llama3", "llama-bpe", "qwen2"):
    regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    if pre == "qwen2":
      hf.normalizer = normalizers.NFC()
  else:
    raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                     f"(known: {sorted(_GPT2_PRE + _DIGITS_PRE + ('llama-bpe', 'qwen2'))})")
  hf.decoder = decoders.ByteLevel()
  return hf


def train_sentencepiece(texts_or_files: Iterable[str | os.PathLike], vocab_size: int,
                        out_prefix: str | os.PathLike) -> Tokenizer:
  """Train a byte-fallback BPE sentencepiece model on code and write `<out_prefix>.model`.

  Items that are `os.PathLike` are read as UTF-8 files (one document each); `str` items are the
  texts themselves. Whitespace and newlines are kept verbatim (identity normalization, no dummy
  prefix) so code round-trips exactly and `encode(a) + encode(b)` adds no spaces. Ids: pad 0,
  unk 1, eos 2, no bos.
  """
  def documents():
    for item in texts_or_files:
      yield pathlib.Path(item).read_text(encoding="utf-8") if isinstance(item, os.PathLike) else item

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=documents(), model_writer=model, vocab_size=vocab_size, model_type="bpe",
      byte_fallback=True, pad_id=0, unk_id=1, bos_id=-1, eos_id=2, add_dummy_prefix=False,
      remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
      allow_whitespace_only_pieces=True, max_sentence_length=1 << 20, hard_vocab_limit=False,
      minloglevel=2)
  out = pathlib.Path(f"{out_prefix}.model")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(model.getvalue())
  return _sentencepiece_from_bytes(model.getvalue(), out)
