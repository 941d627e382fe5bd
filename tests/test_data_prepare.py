"""`python -m codepmp_jax.data.prepare`: exact bad-record counts, shard contents, crash-safe reruns."""
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
from codepmp_jax.data import pipeline, prepare, registry, shards
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
    source = pipeline._Prepared(_cfg(out), split, 20)
    arrays = source.take(np.arange(source.num_pairs))
    assert len(arrays) == len(pairs) == manifest["splits"][split]["pairs"]
    stored = {(tuple(arrays.sequence(i, 0)), tuple(arrays.sequence(i, 1)),
               tuple(arrays.response_start[i]), float(arrays.margin[i])) for i in range(len(arrays))}
    assert stored == {(p.chosen.ids, p.rejected.ids, (p.chosen.response_start, p.rejected.response_start),
                       p.margin) for p in pairs}
    assert [tuple(arrays.sequence(i, 0)) for i in range(len(arrays))] != [p.chosen.ids for p in pairs]
    np.testing.assert_array_equal(source.lengths(0, source.num_pairs), arrays.lengths.max(axis=1))
    # The index holds each pair's shared prompt (the common beginning of both prompts' tokens).
    shared = source.pack_sizes(0, source.num_pairs, True)[:, 3]
    np.testing.assert_array_equal(shared, arrays.shared_prompt())
    assert (shared > 0).all() and (shared <= arrays.response_start.min(axis=1)).all()
    assert not source.pack_sizes(0, source.num_pairs, False)[:, 3].any()
  histogram = manifest["length_histogram"]
  assert sum(histogram["counts"]) == 2 * len(GOOD) and histogram["bin_edges"][-1] == 20
  prepare.check_tokenizer(out, tokenizer.fingerprint)
  with pytest.raises(ValueError, match="prepared with tokenizer"):
    prepare.check_tokenizer(out, "0" * 64)


def test_rerun_after_a_crash_redoes_only_the_missing_shard(tmp_path, tokenizer_path):
  path = tmp_path / "good.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
  settings = _settings(tmp_path, tokenizer_path, [str(path)])
  first = prepare.prepare(settings)
  out = pathlib.Path(settings.out)
  lost = out / (first["splits"]["train"]["shards"][1]["file"] + ".stats.json")
  lost.unlink()  # as if the run died before publishing the shard's last file
  kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tokens")}
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  (scratch / "keep.txt").write_text("not prepare's")
  second = prepare.prepare(dataclasses.replace(settings, spill_dir=str(scratch)))
  assert [p.name for p in scratch.iterdir()] == ["keep.txt"]
  assert second["throughput"]["pairs_encoded"] == first["splits"]["train"]["shards"][1]["pairs"]
  changed = {p.name for p in out.glob("*.tokens") if p.stat().st_mtime_ns != kept[p.name]}
  assert changed == {first["splits"]["train"]["shards"][1]["file"] + ".tokens"}
  assert {k: v for k, v in second.items() if k != "throughput"} == {
      k: v for k, v in first.items() if k != "throughput"}
  with pytest.raises(ValueError, match="other settings"):
    prepare.prepare(_settings(tmp_path, tokenizer_path, [str(path)], seq_len=32))


def test_version_2_shards_are_read_sharing_no_prompt_and_prepared_again(tmp_path, tokenizer_path,
                                                                        caplog):
  """Shards of manifest version 2 (no `shared_prompt` in the index) still train, packed without
  sharing prompts; preparing into their directory again rewrites them in the current format."""
  path = tmp_path / "good.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
  settings = _settings(tmp_path, tokenizer_path, [str(path)])
  current = prepare.prepare(settings)
  out = pathlib.Path(settings.out)
  want = pipeline._Prepared(_cfg(out), "train", 24)
  want = want.take(np.arange(want.num_pairs))
  for index in out.glob("*.index.npy"):  # what version 2 wrote
    rows = np.load(index)
    np.save(index, rows[list(shards.V2_INDEX_DTYPE.names)].astype(shards.V2_INDEX_DTYPE))
    stats = pathlib.Path(str(index).replace(".index.npy", ".stats.json"))
    stats.write_text(json.dumps({k: v for k, v in json.loads(stats.read_text()).items()
                                 if k != "version"}))
  manifest = json.loads((out / "manifest.json").read_text())
  (out / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))

  old = pipeline._Prepared(_cfg(out), "train", 24)
  got = old.take(np.arange(old.num_pairs))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  with caplog.at_level("WARNING"):
    sizes = old.pack_sizes(0, old.num_pairs, True)
  assert "manifest version 2" in caplog.text
  assert not sizes[:, 3].any() and (sizes[:, 0] == got.lengths.sum(axis=1)).all()

  again = prepare.prepare(settings)
  assert again["version"] == prepare.MANIFEST_VERSION == 3
  assert again["throughput"]["pairs_encoded"] == sum(s["pairs"] for s in current["splits"].values())
  for index in out.glob("*.index.npy"):
    assert np.load(index).dtype == shards.INDEX_DTYPE


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
  assert sorted(p.name for p in out.glob("train-*")) == [
      f"train-0000{i}-of-00002{suffix}" for i in range(2)
      for suffix in (".index.npy", ".lengths.npy", ".stats.json", ".tokens")]
  assert not list(out.glob(".*"))
  lengths = np.concatenate([np.load(f"{out / s['file']}.lengths.npy")
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
  assert manifest["truncation"] == truncation == prepare.manifest_truncation(manifest)
  assert manifest["dropped"] == {"overlong": 0, "identical_after_truncation": 10}
  assert manifest["splits"]["train"]["pairs"] == 30
