"""`python -m codepmp_jax.data.prepare`: exact bad-record counts, shard contents read by TFDS and
Grain, crash-safe reruns."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from codepmp_jax import cli
import grain
import tensorflow_datasets as tfds

from codepmp_jax.data import pipeline, prepare, prepared, registry
from codepmp_jax.data.encode import encode_pair
from codepmp_jax.data.records import BadRecordError, PairRecord
from codepmp_jax.data.tokenizer import load_tokenizer, train_sentencepiece

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOOD = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.",
         "rejected": f"It is {2 * i + 1}.", "margin": i % 3} for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
  texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in GOOD] * 5
  out = tmp_path_factory.mktemp("tok") / "tok"
  train_sentencepiece(texts, 300, out)
  return f"{out}.model"


def _bad_file(path: pathlib.Path) -> None:
  """Good lines with one line of every malformed kind in between (lines 3, 5, 7, 9, 11, 13)."""
  lines = [json.dumps(r).encode() for r in GOOD[:2]]
  lines += [b'{"prompt": "p", "chosen": "a"']
  lines += [json.dumps(GOOD[2]).encode(), json.dumps({"prompt": "p", "chosen": "a"}).encode()]
  lines += [json.dumps(GOOD[3]).encode(), json.dumps({"prompt": "p", "chosen": ["a"], "rejected": "b"}).encode()]
  lines += [json.dumps(GOOD[4]).encode(), json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}).encode()]
  lines += [json.dumps(GOOD[5]).encode(), b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}']
  lines += [json.dumps(GOOD[6]).encode(), json.dumps({**GOOD[7], "margin": "high"}).encode()]
  lines += [json.dumps(r).encode() for r in GOOD[8:]]
  path.write_bytes(b"\n".join(lines) + b"\n")


def _settings(tmp_path, tokenizer_path, inputs, **kw) -> prepare.PrepareSettings:
  defaults = dict(inputs=tuple(inputs), format="pairs", tokenizer=tokenizer_path, seq_len=24,
                  out=str(tmp_path / "out"), num_shards=3, split="train:0.75,eval:0.25", num_workers=1)
  return prepare.PrepareSettings(**{**defaults, **kw})


def _cfg(path):
  cfg = pipeline.default_data_config()
  cfg.path = str(path)
  return cfg


def test_every_kind_of_bad_line_is_counted_exactly_in_the_manifest(tmp_path, tokenizer_path):
  _bad_file(tmp_path / "bad.jsonl")
  (tmp_path / "empty.jsonl").write_text("")
  manifest = prepare.prepare(_settings(tmp_path, tokenizer_path,
                                       [str(tmp_path / "bad.jsonl"), str(tmp_path / "empty.jsonl")]))
  assert manifest["bad_records"] == {
      "invalid_json": 1, "invalid_utf8": 1, "missing_field": 1, "non_string_field": 1,
      "bad_value": 1, "identical_pair": 1, "empty_file": 1, "corrupt_file": 0, "empty_response": 0,
      "no_valid_perturbation": 0, "fewer_rejected_than_asked": 0}
  assert manifest["bad_record_examples"]["missing_field"] == [f"{tmp_path}/bad.jsonl:5: field 'rejected' is missing (the record has: chosen, prompt)"]
  assert manifest["records_loaded"] == len(GOOD) - 1  # GOOD[7] was given a bad margin
  splits = manifest["splits"]
  assert splits["train"]["pairs"] + splits["eval"]["pairs"] == len(GOOD) - 1
  assert 0 < splits["eval"]["pairs"] < splits["train"]["pairs"]
  with pytest.raises(BadRecordError, match=r"bad\.jsonl:3: invalid_json"):
    prepare.prepare(_settings(tmp_path, tokenizer_path, [str(tmp_path / "bad.jsonl")],
                              out=str(tmp_path / "strict"), strict=True))


def test_shards_hold_exactly_the_encoded_pairs(tmp_path, tokenizer_path):
  path = tmp_path / "good.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
  settings = _settings(tmp_path, tokenizer_path, [str(path)], seq_len=20)
  manifest = prepare.prepare(settings)
  tokenizer = load_tokenizer(tokenizer_path)
  assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint
  assert manifest["sources"] == [{"path": str(path), "sha256": registry.sha256_of(path),
                                  "bytes": path.stat().st_size}]
  expected = {split: [] for split in ("train", "eval")}
  truncated = 0
  for r in GOOD:
    pair = encode_pair(tokenizer, PairRecord(r["prompt"], r["chosen"], r["rejected"], r["margin"]), 20)
    truncated += bool(pair.chosen.prompt_cut or pair.rejected.prompt_cut)
    expected[prepare.assign_split(r["prompt"], 0, [("train", 0.75), ("eval", 0.25)])].append(pair)
  assert manifest["truncated"] == {"prompt": truncated, "response": 0} and truncated > 0
  out = pathlib.Path(settings.out)
  for split, pairs in expected.items():
    assert len(manifest["splits"][split]["shards"]) == 3
    source = pipeline.open_source(_cfg(out), split, 20, seed=0)
    arrays = source.take(np.arange(source.num_pairs))
    assert len(arrays) == len(pairs) == manifest["splits"][split]["pairs"]
    stored = {(tuple(arrays.sequence(i, 0)), tuple(arrays.sequence(i, 1)),
               tuple(arrays.response_start[i]), float(arrays.margin[i])) for i in range(len(arrays))}
    assert stored == {(p.chosen.ids, p.rejected.ids, (p.chosen.response_start, p.rejected.response_start),
                       p.margin) for p in pairs}
    assert [tuple(arrays.sequence(i, 0)) for i in range(len(arrays))] != [p.chosen.ids for p in pairs]
    np.testing.assert_array_equal(source.sizes["lengths"], arrays.lengths)
    np.testing.assert_array_equal(source.sizes["response_start"], arrays.response_start)
    # The sizes hold each pair's shared prompt (the common beginning of both prompts' tokens).
    shared = source.sizes["shared_prompt"]
    np.testing.assert_array_equal(shared, arrays.shared_prompt())
    assert (shared > 0).all() and (shared <= arrays.response_start.min(axis=1)).all()
    # TFDS opens the directory as it is, and Grain reads its ArrayRecord files: the same records.
    tfds_split = tfds.builder_from_directory(out).as_data_source(split)
    assert len(tfds_split) == len(arrays)
    by_tfds = prepared.decode([tfds_split[i] for i in range(len(tfds_split))])
    by_grain = prepared.decode(grain.sources.ArrayRecordDataSource(
        prepared.shard_paths(out, manifest, split)).__getitems__(list(range(len(arrays)))))
    for other in (by_tfds, by_grain):
      np.testing.assert_array_equal(other.tokens, arrays.tokens)
      np.testing.assert_array_equal(other.lengths, arrays.lengths)
      np.testing.assert_array_equal(other.margin, arrays.margin)
  histogram = manifest["length_histogram"]
  assert sum(histogram["counts"]) == 2 * len(GOOD) and histogram["bin_edges"][-1] == 20
  prepared.check_tokenizer(out, tokenizer.fingerprint)
  with pytest.raises(ValueError, match="prepared with tokenizer"):
    prepared.check_tokenizer(out, "0" * 64)


def test_rerun_after_a_crash_redoes_only_the_missing_shard(tmp_path, tokenizer_path):
  path = tmp_path / "good.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
  settings = _settings(tmp_path, tokenizer_path, [str(path)])
  first = prepare.prepare(settings)
  out = pathlib.Path(settings.out)
  lost = out / "stats" / "train-00001-of-00003.json"
  lost.unlink()  # as if the run died before publishing the shard's last file
  kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.array_record-*")}
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  (scratch / "keep.txt").write_text("not prepare's")
  second = prepare.prepare(dataclasses.replace(settings, spill_dir=str(scratch)))
  assert [p.name for p in scratch.iterdir()] == ["keep.txt"]
  assert second["throughput"]["pairs_encoded"] == first["splits"]["train"]["shards"][1]["pairs"]
  changed = {p.name for p in out.glob("*.array_record-*") if p.stat().st_mtime_ns != kept[p.name]}
  assert changed == {first["splits"]["train"]["shards"][1]["file"]}
  assert {k: v for k, v in second.items() if k != "throughput"} == {
      k: v for k, v in first.items() if k != "throughput"}
  with pytest.raises(ValueError, match="other settings"):
    prepare.prepare(_settings(tmp_path, tokenizer_path, [str(path)], seq_len=32))


def test_data_of_an_older_format_is_refused_and_prepared_again(tmp_path, tokenizer_path):
  """A manifest of an older format version names what to do; preparing into its directory again
  rewrites every shard in the current format."""
  path = tmp_path / "good.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
  settings = _settings(tmp_path, tokenizer_path, [str(path)])
  current = prepare.prepare(settings)
  out = pathlib.Path(settings.out)
  for stats in (out / "stats").iterdir():  # as format version 3 left them
    stats.write_text(json.dumps({**json.loads(stats.read_text()), "version": 3}))
  manifest = json.loads((out / "manifest.json").read_text())
  (out / "manifest.json").write_text(json.dumps({**manifest, "version": 3}))
  with pytest.raises(ValueError, match="format version 3.*prepare the data again"):
    pipeline.open_source(_cfg(out), "train", 24, seed=0)
  again = prepare.prepare(settings)
  assert again["version"] == prepared.MANIFEST_VERSION == 4
  assert again["throughput"]["pairs_encoded"] == sum(s["pairs"] for s in current["splits"].values())


@pytest.mark.slow
def test_cli_with_worker_processes_and_strict_failure(tmp_path, tokenizer_path):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
  gsm8k = tmp_path / "gsm8k.jsonl"
  gsm8k.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i + 2}. How many?",
                                       "answer": f"{i}+{i + 2}=<<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n"
                                                 f"#### {2 * i + 2}"}) + "\n" for i in range(30)))
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "codepmp_jax.data.prepare", f"--input={gsm8k}", "--format=gsm8k",
         f"--tokenizer={tokenizer_path}", "--seq_len=64", f"--out={out}", "--num_shards=2",
         "--split=train:1", "--num_workers=2"]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["splits"]["train"]["pairs"] == 30 and manifest["throughput"]["workers"] == 2
  assert load_tokenizer(out / "tokenizer").fingerprint == manifest["tokenizer"]["fingerprint"]
  assert sorted(p.name for p in out.glob("codepmp_pairs-train*")) == [
      f"codepmp_pairs-train.array_record-0000{i}-of-00002" for i in range(2)]
  assert sorted(p.name for p in (out / "sizes").iterdir()) == [
      f"train-0000{i}-of-00002.npy" for i in range(2)]
  assert {"dataset_info.json", "features.json"} <= {p.name for p in out.iterdir()}
  assert not list(out.glob(".*"))
  lengths = np.concatenate([np.load(out / s["sizes"])["lengths"]
                            for s in manifest["splits"]["train"]["shards"]])
  assert len(lengths) == 30 and lengths.max() <= 64

  _bad_file(tmp_path / "bad.jsonl")
  cmd[3:5] = [f"--input={tmp_path / 'bad.jsonl'}", "--format=pairs"]
  result = subprocess.run(cmd + ["--strict", f"--out={tmp_path / 'strict'}"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr  # after the progress bars, one error line
  assert result.stderr.splitlines()[-1].startswith(f"error: {tmp_path / 'bad.jsonl'}:3: invalid_json")


def test_cli_missing_flag_is_one_error_line(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.call(prepare.main, prepare.define_flags, ["--format=pairs", "--seq_len=8"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == "error: --input is required\n"


@pytest.mark.parametrize("truncation", ["keep_head", "keep_end"])
def test_pairs_identical_after_truncation_are_dropped_and_counted(tmp_path, tokenizer_path, truncation):
  """Pairs that differ only after (keep_head) or before (keep_end) what a short seq_len keeps
  become token-identical: prepare drops them, counts them, and records its truncation policy."""
  differ_late = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}. " * 6 + "Yes.",
                  "rejected": f"It is {2 * i}. " * 6 + "No."} for i in range(10)]
  differ_early = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": "Yes. " + f"It is {2 * i}. " * 6,
                   "rejected": "No. " + f"It is {2 * i}. " * 6} for i in range(10)]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in differ_late + differ_early + GOOD[:20]))
  manifest = prepare.prepare(_settings(tmp_path, tokenizer_path, [str(path)], seq_len=16,
                                       split="train:1", num_shards=1, truncation=truncation))
  tokenizer = load_tokenizer(tokenizer_path)
  identical = sum(
      encode_pair(tokenizer, PairRecord(r["prompt"], r["chosen"], r["rejected"]), 16, truncation) is None
      for r in differ_late + differ_early + GOOD[:20])
  assert identical == 10  # the ones whose difference the policy cuts off
  assert manifest["truncation"] == truncation
  assert manifest["dropped"] == {"overlong": 0, "identical_after_truncation": 10}
  assert manifest["splits"]["train"]["pairs"] == 30
