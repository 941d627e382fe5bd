"""The docs against the code: docs/contracts.md's tables parsed and compared with what the code
builds, signs and writes (real batches, `inspect.signature`, a prepared data set, a saved
checkpoint), so the reference cannot drift from the code unnoticed; README's length; and every
relative link in README.md and docs/*.md resolving to a file."""
from __future__ import annotations

import ast
import inspect
import json
import pathlib
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from codepmp_jax import checkpoint, convert, losses, score, step, workdir
from codepmp_jax.data import packing, prepare, prepared
from codepmp_jax.data.encode import EncodedSequence, PairArrays
from codepmp_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "contracts.md"
README = ROOT / "README.md"
README_MAX_LINES = 250  # issue #32: the rest lives in docs/


# --- reading the doc ---------------------------------------------------------------------------

def _section(title: str) -> str:
  """The text of docs/contracts.md's `## title` section (up to the next `## `)."""
  parts = re.split(r"^## +(.+?)\s*$", DOC.read_text(), flags=re.M)
  sections = dict(zip(parts[1::2], parts[2::2]))
  assert title in sections, f"docs/contracts.md has no section '## {title}' (it has {list(sections)})"
  return sections[title]


def _split_row(line: str) -> list[str]:
  """The cells of a markdown table row (no cell in these tables holds a `|`)."""
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(title: str, first_header: str) -> list[dict[str, str]]:
  """The rows, as {header: cell}, of the table in section `title` whose first header is
  `first_header`."""
  lines = _section(title).splitlines()
  for i, line in enumerate(lines):
    if line.startswith("|") and _split_row(line)[0] == first_header:
      headers = _split_row(line)
      rows = []
      for row in lines[i + 2:]:
        if not row.startswith("|"):
          break
        rows.append(dict(zip(headers, _split_row(row))))
      return rows
  raise AssertionError(f"docs/contracts.md, '## {title}': no table headed '{first_header}'")


def _code(cell: str) -> list[str]:
  """The backticked spans of a cell."""
  return re.findall(r"`([^`]+)`", cell)


def _name(cell: str) -> str:
  """The first backticked span of a cell: the name a row documents."""
  spans = _code(cell)
  assert spans, f"docs/contracts.md: a row's first cell names nothing in backticks: {cell!r}"
  return spans[0]


def _dims(text: str, sizes: dict[str, int]) -> tuple[int, ...]:
  """A documented shape (`[R, 2K]`, `[D, H*hd]`, `[]`) evaluated with `sizes`."""
  inner = text.strip().strip("`").strip()
  assert inner.startswith("[") and inner.endswith("]"), f"not a shape: {text!r}"
  inner = inner[1:-1].strip()
  dims = []
  for dim in filter(None, (d.strip() for d in inner.split(","))):
    value = 1
    for factor in dim.split("*"):
      coefficient, name = re.fullmatch(r"(\d*)([A-Za-z]\w*)?", factor.strip()).groups()
      value *= (int(coefficient) if coefficient else 1) * (sizes[name] if name else 1)
    dims.append(value)
  return tuple(dims)


def _layout(title: str, batch: dict[str, np.ndarray], sizes: dict[str, int]) -> None:
  """The `title` section's key table states exactly `batch`'s keys, dtypes and shapes."""
  rows = {_name(row["key"]): row for row in _table(title, "key")}
  assert set(rows) == set(batch), f"'## {title}' documents {sorted(rows)}; the batch has {sorted(batch)}"
  for key, array in batch.items():
    assert rows[key]["dtype"] == np.dtype(array.dtype).name, (title, key, array.dtype)
    assert _dims(rows[key]["shape"], sizes) == array.shape, (title, key, rows[key]["shape"], array.shape)


# --- batch layouts -----------------------------------------------------------------------------

LENGTHS = np.array([[40, 35], [30, 28], [50, 44], [20, 20], [33, 31], [45, 25], [10, 12]])


def _pairs() -> PairArrays:
  tokens = np.arange(1, LENGTHS.sum() + 1) % 250 + 1
  return PairArrays.from_lengths(tokens, LENGTHS, LENGTHS // 3, np.arange(len(LENGTHS), dtype=np.float32))


def test_packed_batch_table_states_what_pack_batch_builds():
  arrays, row_len, pairs_per_row = _pairs(), 160, 4
  result = packing.pack_batch(arrays, row_len=row_len, max_pairs_per_row=pairs_per_row, pad_id=0)
  shape = packing.batch_shape([packing.pair_sizes(arrays.lengths, arrays.response_start)], row_len,
                              pairs_per_row)
  assert set(result.batch) == set(packing.PACKED_KEYS)
  assert {k: v.shape for k, v in result.batch.items()} == shape.array_shapes(pairs_per_row)
  symbols = {_name(row["symbol"]) for row in _table("Batch", "symbol")}
  assert symbols == {"R", "L", "K", "M", "S", "T"}
  sizes = {"R": shape.rows, "L": shape.columns, "K": pairs_per_row, "M": shape.lm_slots,
           "S": shape.sequence_slots, "T": shape.sequence_len}
  # Distinct sizes, so a doc that swaps two symbols fails.
  assert len(set(sizes.values()) | {2 * pairs_per_row}) == len(sizes) + 1, sizes
  _layout("Batch", result.batch, sizes)


def test_batch_table_states_what_pair_rows_build():
  """Unpacked, one pair a row: the same table, with K = 1, L = 2 x the length, M = T = the length."""
  batch = packing.pair_rows(_pairs(), 64, pad_id=0)
  _layout("Batch", batch, {"R": len(LENGTHS), "L": 128, "K": 1, "M": 64, "S": 2, "T": 64})


# --- the model and the steps -------------------------------------------------------------------

def test_every_parameter_and_output_of_the_forward_is_documented():
  documented = [_name(row["parameter"]) for row in _table("Model forward", "parameter")]
  parameters = [p for p in inspect.signature(transformer.RewardModel.__call__).parameters if p != "self"]
  assert documented == parameters
  fields = [_name(row["field"]) for row in _table("Model forward", "field")]
  assert fields == list(transformer.ModelOutput._fields)


def test_parameter_tree_table_is_convert_expected_shapes():
  config = get_preset("tiny", num_layers=1, head_dim=8, qkv_bias=True, tie_word_embeddings=False)
  sizes = {"V": config.vocab_size, "D": config.hidden_size, "F": config.intermediate_size,
           "H": config.num_heads, "KV": config.num_kv_heads, "hd": config.resolved_head_dim}
  documented = {tuple(_name(row["path"]).replace("{i}", "0").split("/")): _dims(row["shape"], sizes)
                for row in _table("Parameter tree", "path")}
  assert documented == convert.expected_shapes(config)


def _call_signature(span: str) -> tuple[list[str], dict[str, object]]:
  """(positional names, keyword defaults) of a documented call `f(a, b, c=1)`."""
  call = ast.parse(span, mode="eval").body
  return [a.id for a in call.args], {k.arg: ast.literal_eval(k.value) for k in call.keywords}


def test_step_factories_are_documented_with_their_signatures():
  spans = {_name(row["factory"]).split("(")[0]: _name(row["factory"])
           for row in _table("Train and eval steps", "factory")}
  assert set(spans) == {n for n in dir(step) if n.startswith("make_") and n.endswith("_step")}
  for name, span in spans.items():
    parameters = inspect.signature(getattr(step, name)).parameters.values()
    names, defaults = _call_signature(span)
    assert names == [p.name for p in parameters if p.default is inspect.Parameter.empty], span
    assert defaults == {p.name: p.default for p in parameters
                        if p.default is not inspect.Parameter.empty}, span


def test_sums_and_metrics_tables_match_what_the_steps_return():
  config = get_preset("tiny", num_layers=1, attention="plain")
  model, optimizer, loss_cfg = transformer.RewardModel(config), optax.sgd(0.1), losses.default_loss_config()
  params = jax.eval_shape(lambda: nn.unbox(transformer.init_params(config, jax.random.key(0))))
  state = step.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=jax.eval_shape(optimizer.init, params))
  arrays = _pairs()
  batches = {"pair rows": packing.pair_rows(arrays, 64, pad_id=0),
             "packed": packing.pack_batch(arrays, row_len=160, max_pairs_per_row=4, pad_id=0).batch}

  sums = [_name(row["sum"]) for row in _table("Train and eval steps", "sum")]
  assert sums == list(losses.SUM_KEYS)
  metrics = {_name(row["metric"]) for row in _table("Train and eval steps", "metric")}
  from_sums = losses.metrics_from_sums({k: jnp.ones(()) for k in losses.SUM_KEYS}, loss_cfg)
  assert set(from_sums) <= metrics
  for layout, batch in batches.items():
    _, returned = jax.eval_shape(step.make_train_step(model, optimizer, loss_cfg), state, batch)
    assert set(returned) == metrics, layout
    returned = jax.eval_shape(step.make_eval_step(model, loss_cfg), params, batch)
    assert set(returned) == set(losses.SUM_KEYS), layout


# --- prepared data -----------------------------------------------------------------------------

RECORDS = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.",
            "rejected": f"It is {2 * i + 1}.", "margin": i % 3} for i in range(12)]


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny data set prepared as `python -m codepmp_jax.data.prepare` prepares one."""
  root = tmp_path_factory.mktemp("docs_prepared")
  train_sentencepiece([r["prompt"] + r["chosen"] + r["rejected"] for r in RECORDS] * 5, 300, root / "tok")
  (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  prepare.prepare(prepare.PrepareSettings(
      inputs=(str(root / "pairs.jsonl"),), format="pairs", tokenizer=str(root / "tok.model"),
      seq_len=24, out=str(root / "out"), num_shards=1, split="train:0.75,eval:0.25", num_workers=1))
  return root / "out"


def _key_paths(value, prefix: str = "") -> set[str]:
  """The dotted key paths of a manifest as the doc writes them: each split is `<split>`, each
  object of a list `[]`; `bad_records` and `bad_record_examples` are keyed by data, so leaves."""
  if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
    return set().union(*(_key_paths(v, prefix + "[]") for v in value))
  if not isinstance(value, dict) or prefix in ("bad_records", "bad_record_examples"):
    return {prefix}
  paths = set()
  for key, child in value.items():
    name = "<split>" if prefix == "splits" else key
    paths |= _key_paths(child, f"{prefix}.{name}" if prefix else name)
  return paths


def test_manifest_table_lists_every_key_prepare_writes(prepared_dir):
  manifest = prepared.read_manifest(prepared_dir)
  documented = {_name(row["key"]) for row in _table("Prepared data", "key")}
  written = _key_paths(manifest)
  assert written - documented == set(), "written by prepare, not in docs/contracts.md"
  assert documented - written == set(), "in docs/contracts.md, not written by prepare"
  assert f"now {prepared.MANIFEST_VERSION}" in _section("Prepared data")


def _pattern(entry: str) -> re.Pattern:
  """A documented file entry as a regex: `<...>` any name part, a trailing `/` a directory."""
  regex = "".join("[^/]+" if part.startswith("<") else re.escape(part)
                  for part in re.split(r"(<[^>]+>)", entry.rstrip("/")))
  return re.compile(regex + ("(/.*)?" if entry.endswith("/") else ""))


def _entries_match(files: list[str], entries: list[str], where: str) -> None:
  """Every file matches a documented entry and every entry matches a file."""
  patterns = {entry: _pattern(entry) for entry in entries}
  for file in files:
    assert any(p.fullmatch(file) for p in patterns.values()), f"{where}: {file} is not documented"
  for entry, p in patterns.items():
    assert any(p.fullmatch(file) for file in files), f"{where}: documented {entry} is not written"


def test_prepared_files_table_lists_every_file_prepare_writes(prepared_dir):
  files = [p.relative_to(prepared_dir).as_posix() for p in prepared_dir.rglob("*") if p.is_file()]
  entries = [_name(row["file"]) for row in _table("Prepared data", "file")]
  _entries_match(files, entries, "prepared data")


def test_record_features_and_sizes_dtype_tables(prepared_dir):
  spec = prepared.features()
  features = {_name(row["feature"]): row for row in _table("Prepared data", "feature")}
  assert list(features) == list(spec.keys())
  for name, row in features.items():
    assert row["dtype"] == np.dtype(spec[name].np_dtype).name, name
    shape = spec[name].shape
    assert (shape == (None,) and row["shape"] == "`[chosen + rejected]`") or \
        _dims(row["shape"], {}) == shape, (name, row["shape"], shape)
  fields = {_name(row["field"]): row for row in _table("Prepared data", "field")}
  assert list(fields) == list(prepared.SIZES_DTYPE.names)
  for name, row in fields.items():
    base, shape = prepared.SIZES_DTYPE[name].base, prepared.SIZES_DTYPE[name].shape
    assert (row["dtype"], _dims(row["shape"], {})) == (base.name, shape), name
  assert f"one element ({prepared.SIZES_DTYPE.itemsize} bytes) a pair" in _section("Prepared data")
  sizes = np.load(next((prepared_dir / prepared.SIZES_DIR).glob("*.npy")))
  assert sizes.dtype == prepared.SIZES_DTYPE


def test_tokenizer_interface_and_special_ids_file(prepared_dir):
  text = " ".join(_section("Tokenizer").split())
  interface = text.split("The object has ", 1)[1].split(", which writes", 1)[0]
  names = {span.split("(")[0] for span in _code(interface)}
  tokenizer = load_tokenizer(prepared_dir / "tokenizer")
  assert {n for n in names if not hasattr(tokenizer, n)} == set()
  special = re.search(r"`codepmp_tokenizer\.json` \(([^)]*)\)", text).group(1)
  stored = json.loads((prepared_dir / "tokenizer" / "codepmp_tokenizer.json").read_text())
  assert set(_code(special)) == set(stored)


# --- checkpoints, workdirs, scores -------------------------------------------------------------

def _braced_keys(cell: str) -> set[str]:
  """The quoted keys of a documented `{"a", "b", ...}` object."""
  return set(re.findall(r'"(\w+)"', cell.split("}")[0]))


def test_checkpoint_table_lists_what_save_model_writes(tmp_path, prepared_dir):
  config = get_preset("tiny", num_layers=1, attention="plain")
  abstract = jax.eval_shape(lambda: nn.unbox(transformer.init_params(config, jax.random.key(0))))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  path = checkpoint.save_model(tmp_path / "ckpt", params, config, load_tokenizer(prepared_dir / "tokenizer"),
                               prompt_format="code", truncation="keep_end",
                               reward_stats={"mean": 0.0, "std": 1.0})
  rows = {_name(row["checkpoint entry"]): row for row in
          _table("Model checkpoint and training workdir", "checkpoint entry")}
  files = [p.relative_to(path).as_posix() for p in pathlib.Path(path).rglob("*") if p.is_file()]
  _entries_match(files, list(rows), "model checkpoint")
  assert f"{checkpoint.PARAMS_DIR}/" in rows
  for name in ("prompt_format.json", "truncation.json"):
    assert _braced_keys(rows[name]["what"]) == set(json.loads((path / name).read_text())), name
  assert _braced_keys(rows[checkpoint.REWARD_STATS_FILE]["what"]) <= set(
      json.loads((path / checkpoint.REWARD_STATS_FILE).read_text()))


def test_workdir_table_names_every_workdir_entry():
  entries = [_name(row["workdir entry"]) for row in
             _table("Model checkpoint and training workdir", "workdir entry")]
  assert {e.split("/")[0] for e in entries} == set(workdir.NAMES) | {checkpoint.REWARD_STATS_FILE}


def test_scores_table_states_the_fields_score_adds():
  scorer = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=100), max_length=16,
                                 encode=lambda prompt, response: EncodedSequence((1, 2), 0))
  rows = _table("Scores file", "input fields")
  assert rows
  for row in rows:
    record = {f: [1, 2, 3] if f == "input_ids" else "text" for f in _code(row["input fields"])}
    added = score.sequences_of(record, scorer, "none", "test:1")
    assert list(added) == _code(row["fields added"]), row


# --- README and links --------------------------------------------------------------------------

def test_readme_is_short_and_maps_the_contracts():
  lines = README.read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
  assert "docs/contracts.md" in README.read_text()


def _links(markdown: str) -> list[str]:
  """The targets of inline links and images, outside fenced code blocks."""
  prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
  return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)


def test_every_relative_link_in_readme_and_docs_resolves():
  files = [README, *sorted((ROOT / "docs").glob("*.md"))]
  broken = []
  for file in files:
    for target in _links(file.read_text()):
      if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
        continue  # a URL or an anchor in the same file
      if not (file.parent / target.split("#")[0]).exists():
        broken.append(f"{file.relative_to(ROOT)}: {target}")
  assert not broken, broken
  assert len([t for f in files for t in _links(f.read_text())]) > 5  # the parser finds links


def test_no_reference_to_the_old_contracts_name():
  stale = [f"{p.relative_to(ROOT)}" for p in [README, *(ROOT / "docs").glob("*.md"),
                                              *(ROOT / "codepmp_jax").rglob("*.py")]
           if "CONTRACTS.md" in p.read_text()]
  assert not stale, stale
