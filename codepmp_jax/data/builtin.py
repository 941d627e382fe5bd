"""Data that builds itself on first use, so the default config runs with no input from the user.

`stdlib_mutate`: code-preference pairs synthesized from this Python's standard library by the
offline `mutate` strategy (`synth.synthesize`), a sentencepiece tokenizer trained on the
same code, and the pairs prepared into shards (`python -m codepmp_jax.data.prepare`), all under
`data.path`:
  <path>/pairs/       synthesized pair shards + manifest.json
  <path>/spm.model    the tokenizer
  <path>/manifest.json, shards, tokenizer/   the prepared data the trainer reads
Each stage is skipped when its output is complete, so a rerun reuses finished work.
"""
from __future__ import annotations

import gzip
import json
import logging
import os

import ml_collections
from etils import epath

from codepmp_jax.data.encode import DEFAULT_TRUNCATION

BUILTINS = ("stdlib_mutate",)


def default_builtin_config() -> ml_collections.ConfigDict:
  """name: '' (none) or one of BUILTINS; the rest sizes the data it builds."""
  return ml_collections.ConfigDict(dict(name="", max_pairs=20000, vocab_size=4000, seq_len=256,
                                        eval_fraction=0.05, seed=0))


def _pair_texts(pairs_dir: epath.Path):
  for shard in sorted(pairs_dir.glob("*.jsonl.gz")):
    with shard.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        yield record["prompt"] + record["chosen"]


def ensure(data_cfg: ml_collections.ConfigDict) -> None:
  """Builds the built-in data set named by `data_cfg.builtin.name` unless it is already complete."""
  spec = data_cfg.builtin
  if not spec.name:
    return
  if spec.name not in BUILTINS:
    raise ValueError(f"data.builtin.name={spec.name!r} is not one of {BUILTINS}")
  from codepmp_jax.data import prepare
  from codepmp_jax.data.tokenizer import train_sentencepiece
  from codepmp_jax.synth.synthesize import SynthSettings, synthesize

  root = epath.Path(data_cfg.path)
  manifest = root / prepare.MANIFEST
  truncation = data_cfg.get("truncation") or DEFAULT_TRUNCATION
  if manifest.is_file():
    built = json.loads(manifest.read_text())
    if built.get("version") == prepare.MANIFEST_VERSION and prepare.manifest_truncation(built) == truncation:
      return  # (other versions or truncations are prepared again, from the kept pairs and tokenizer)
  pairs_dir = root / "pairs"
  synth_manifest = pairs_dir / "manifest.json"
  if not (synth_manifest.is_file() and json.loads(synth_manifest.read_text()).get("complete")):
    logging.info("building %s: synthesizing %d code pairs into %s", spec.name, spec.max_pairs, pairs_dir)
    synthesize(SynthSettings(out=str(pairs_dir), source=("stdlib",), strategy="mutate",
                             max_pairs=spec.max_pairs, seed=spec.seed,
                             workers=min(2, os.cpu_count() or 1)))
  spm_model = root / "spm.model"
  if not spm_model.is_file():
    logging.info("training a %d-piece sentencepiece tokenizer on the pairs", spec.vocab_size)
    train_sentencepiece(_pair_texts(pairs_dir), spec.vocab_size, root / "spm")
  logging.info("preparing the pairs into %s", root)
  prepare.prepare(prepare.PrepareSettings(
      inputs=(str(pairs_dir / "*.jsonl.gz"),), format="pairs", tokenizer=str(spm_model),
      seq_len=spec.seq_len, out=str(root), truncation=truncation,
      split=f"train:{1 - spec.eval_fraction:.6g},eval:{spec.eval_fraction:.6g}", seed=spec.seed))
