"""Data that builds itself on first use, so the default config runs with no input from the user.

`stdlib_mutate`: code-preference pairs synthesized from this Python's standard library by the
offline `mutate` strategy (`synth.synthesize`), a sentencepiece tokenizer trained on the
same code, and the pairs prepared into shards (`python -m codepmp_jax.data.prepare`), all under
`data.path`:
  <path>/pairs/       synthesized pair shards + manifest.json
  <path>/spm.model    the tokenizer
  <path>/manifest.json, shards, tokenizer/   the prepared data the trainer reads
Each stage is skipped when its output is complete, so a rerun reuses finished work. The trainer
only reads it; it is built by the demo and the launchers, or by

  python -m codepmp_jax.data.builtin --config=configs/tiny.py [--config.data.builtin.max_pairs=N]
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
_MANIFEST = "manifest.json"  # prepared data's manifest (data.prepare), written last


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


def home(name: str) -> str:
  """Where the built-in default config (configs/tiny.py) keeps data set `name` (relative to the
  working directory)."""
  return f"data_cache/{name}"


def _is_home(path: str, name: str) -> bool:
  return epath.Path(path).parts[-2:] == ("data_cache", name)


def _not_prepared(path: str, why: str, builtin: bool = False) -> ValueError:
  """The one-line refusal of a `data.path` that does not hold prepared data."""
  root = epath.Path(path)
  raw = sorted(p.name for p in root.glob("*.jsonl*"))[:1] if root.is_dir() else []
  found = f"; it holds {raw[0]}, ...: raw pairs?" if raw else ""
  inputs = f"{path}/*.jsonl*" if raw else "PAIRS.jsonl.gz"
  return ValueError(
      f"--config.data.path={path} is not prepared data ({why}{found}): run `python -m "
      f"codepmp_jax.data.prepare --input='{inputs}' --format=pairs --tokenizer=TOKENIZER.model "
      f"--seq_len=N --out=prepared/mine`, then train with --config.data.path=prepared/mine"
      + (" --config.data.builtin.name=" if builtin else ""))


def check_prepared(data_cfg: ml_collections.ConfigDict) -> None:
  """What `train` checks before it reads `data.path` (it builds nothing): prepared data must be
  there. A missing built-in data set at its home names the command that builds it; any other
  path without a manifest names the `prepare` command."""
  if data_cfg.get("source", "prepared") != "prepared":
    return
  root = epath.Path(data_cfg.path)
  if (root / _MANIFEST).is_file():
    return
  name = data_cfg.builtin.name
  if name and _is_home(data_cfg.path, name):
    raise ValueError(f"the built-in data set {name} is not built yet in {data_cfg.path}: build it "
                     f"with `python -m codepmp_jax.data.builtin --config=configs/tiny.py` (make demo "
                     f"does), then train again")
  why = f"no {_MANIFEST}" if root.is_dir() else "no such directory"
  if name:
    why += f"; the built-in data set {name} is built only in {home(name)}, with data.path left at its default"
  raise _not_prepared(data_cfg.path, why, builtin=bool(name))


def ensure(data_cfg: ml_collections.ConfigDict) -> None:
  """Builds the built-in data set named by `data_cfg.builtin.name` in `data_cfg.path` unless it
  is already complete (saying so on screen). The demo, the launchers and `python -m
  codepmp_jax.data.builtin` call it; training never builds data (`check_prepared`)."""
  spec = data_cfg.builtin
  if spec.name not in BUILTINS:
    raise ValueError(f"data.builtin.name={spec.name!r} is not one of {BUILTINS}")
  from codepmp_jax.data import prepare, prepared
  from codepmp_jax.data.tokenizer import train_sentencepiece
  from codepmp_jax.synth.synthesize import SynthSettings, synthesize

  root = epath.Path(data_cfg.path)
  manifest = root / prepared.MANIFEST
  truncation = data_cfg.get("truncation") or DEFAULT_TRUNCATION
  if manifest.is_file():
    built = json.loads(manifest.read_text())
    if built.get("version") == prepared.MANIFEST_VERSION and built.get("truncation") == truncation:
      return  # (other versions or truncations are prepared again, from the kept pairs and tokenizer)
  print(f"building the built-in data set {spec.name} in {root} ({spec.max_pairs} code pairs "
        f"synthesized from the standard library, a tokenizer, prepared shards; reused once complete)",
        flush=True)
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


def check_eval_split(data_cfg: ml_collections.ConfigDict, eval_batch: int, split: str = "eval") -> None:
  """Refuses a held-out split of prepared (unpacked) data smaller than one eval batch, which the
  held-out evaluation would silently skip for the whole run; the message says what to change."""
  if data_cfg.get("source", "prepared") != "prepared" or data_cfg.get("pack"):
    return
  manifest = epath.Path(data_cfg.path) / _MANIFEST
  if not manifest.is_file():
    return
  pairs = json.loads(manifest.read_text()).get("splits", {}).get(split, {}).get("pairs")
  if pairs is not None and pairs < eval_batch:
    raise ValueError(
        f"the held-out split {split!r} of {data_cfg.path} has {pairs} pairs, fewer than one eval batch "
        f"(train.eval_batch={eval_batch}), so the evaluation would yield nothing: set "
        f"--config.train.eval_batch={pairs} or less (a multiple of the devices), hold out more "
        f"(prepare --split), or turn evaluation off (--config.train.eval_every=0)")



def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "A config whose data.builtin names a built-in data set "
                                  "(configs/tiny.py).")
  flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  """Builds the built-in data set of `--config` (its `data.builtin`, at its `data.path`)."""
  from absl import flags
  del argv
  config = flags.FLAGS.config
  ensure(config.data)
  print(f"built-in data set {config.data.builtin.name}: prepared data in {config.data.path}")


if __name__ == "__main__":
  from codepmp_jax import cli
  cli.run(main, define_flags)
