"""Packed batches from the input pipeline: the same pairs as unpacked, shapes every process agrees on,
exact resume, and a packed training run on prepared data."""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from codepmp_jax.data import packing, pipeline
from codepmp_jax.data.encode import PairArrays
from tests.test_data_pipeline import _pairs  # pair i's chosen starts with 1000 + i

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pipeline(cfg, *, index=0, count=1, global_batch=8, seq_len=16):
  return pipeline.PairBatches(cfg, split="train", global_batch=global_batch, seq_len=seq_len,
                              sharding=None, seed=3, repeat=True, process_index=index,
                              process_count=count)


def _prompted_pairs(n: int) -> PairArrays:
  """`_pairs` whose rejected sequences begin with their chosen one's prompt, as real pairs do."""
  arrays = _pairs(n)
  tokens = arrays.tokens.copy()
  prompts = np.minimum(arrays.lengths.min(axis=1) - 1, 3)  # 2 or 3 tokens
  for i, prompt in enumerate(prompts):
    tokens[arrays.offsets[i, 1]:arrays.offsets[i, 1] + prompt] = arrays.sequence(i, 0)[:prompt]
  return PairArrays.from_lengths(tokens, arrays.lengths, np.repeat(prompts[:, None], 2, axis=1),
                                 arrays.margin)


def _unpack(batch) -> dict[int, tuple]:
  """pair id -> (chosen tokens, rejected tokens, margin) read back from a packed batch through
  its `sequence_index` (a shared prompt's columns are in both sequences' slots)."""
  out = {}
  for row in range(len(batch["input_ids"])):
    ids = batch["input_ids"][row]
    for slot in np.flatnonzero(batch["pair_valid"][row]):
      chosen, rejected = (batch["sequence_index"][row, 2 * slot + which] for which in (0, 1))
      chosen, rejected = chosen[chosen >= 0], rejected[rejected >= 0]
      assert batch["reward_index"][row, 2 * slot:2 * slot + 2].tolist() == [chosen[-1], rejected[-1]]
      out[int(ids[chosen[0]]) - 1000] = (ids[chosen].tolist(), ids[rejected].tolist(),
                                         float(batch["margin"][row, slot]))
  return out


def _padded(batch) -> dict[int, tuple]:
  out = {}
  for p in range(len(batch["input_ids"])):
    seqs = [batch["input_ids"][p, w][batch["attention_mask"][p, w] > 0].tolist() for w in (0, 1)]
    out[seqs[0][0] - 1000] = (seqs[0], seqs[1], float(batch["margin"][p]))
  return out


@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_batches_hold_the_unpacked_pairs_agree_across_processes_and_resume(share_prompt):
  arrays = _prompted_pairs(70)
  assert arrays.shared_prompt().min() >= 2
  packed_cfg = pipeline.in_memory_config(arrays, pad_id=0, pack=True, pack_row_len=32,
                                         pack_pairs_per_row=3, pack_share_prompt=share_prompt,
                                         prefetch=0)
  plain_cfg = pipeline.in_memory_config(arrays, pad_id=0, prefetch=0)
  procs = [_pipeline(packed_cfg, index=p, count=2) for p in range(2)]
  plains = [_pipeline(plain_cfg, index=p, count=2) for p in range(2)]
  steps = procs[0].steps_per_epoch
  assert steps == (70 // 2) // 4
  seen = []
  for _ in range(steps + 2):  # one epoch and the start of the next
    packed = [next(it) for it in procs]
    plain = [next(it) for it in plains]
    for key in ("input_ids", "lm_index", "sequence_index"):  # all processes agree on the shapes
      assert packed[0][key].shape == packed[1][key].shape
    for got in packed:  # lm_index lists each row's LM targets (lm_mask), then zeros;
      for row in range(len(got["input_ids"])):  # sequence_index each segment's columns, then -1
        targets = np.flatnonzero(got["lm_mask"][row])
        np.testing.assert_array_equal(got["lm_index"][row, :len(targets)], targets)
        assert not got["lm_index"][row, len(targets):].any()
        for s, columns in enumerate(got["sequence_index"][row]):
          want = np.flatnonzero(got["segment_ids"][row] == s + 1)
          if s % 2:  # a rejected sequence: its shared prompt's columns, then its own
            prompt = got["positions"][row, want[0]] if len(want) else 0
            want = np.concatenate([got["sequence_index"][row, s - 1, :prompt], want])
          np.testing.assert_array_equal(columns, np.pad(want, (0, len(columns) - len(want)),
                                                        constant_values=-1))
    assert {k: v.shape[0] for k, v in packed[0].items()} == {k: len(packed[0]["input_ids"])
                                                             for k in packed[0]}
    assert packed[0]["input_ids"].shape[1] == 32
    for got, want in zip(packed, plain):
      pairs = _unpack(got)
      assert pairs == _padded(want)  # exactly the unpacked batch's pairs, tokens and margins
      # Shared prompts are laid out once: the rows hold the pairs' tokens less their prompts.
      ids = [i + 1000 for i in pairs]
      in_batch = [i for i in range(70) if arrays.sequence(i, 0)[0] in ids]
      saved = arrays.shared_prompt()[in_batch].sum() if share_prompt else 0
      assert (got["segment_ids"] > 0).sum() == arrays.lengths[in_batch].sum() - saved
      seen.extend(pairs)
  first_epoch = seen[:steps * 8]
  assert len(set(first_epoch)) == len(first_epoch) == steps * 8  # every pair at most once
  assert set(first_epoch) <= set(range(70))
  # Each process's epoch covers every pair of its range that fills a batch, exactly once.
  for p, it in enumerate(procs):
    start, stop = it._range(p)
    mine = [i for i in first_epoch if start <= i < stop]
    assert len(mine) == steps * 4

  # Resume: a new pipeline given the state continues with the same packed batches.
  state = procs[0].get_state()
  want = [next(procs[0]) for _ in range(3)]
  resumed = _pipeline(packed_cfg, index=0, count=2)
  resumed.set_state(json.loads(json.dumps(state)))
  for w in want:
    got = next(resumed)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])


def test_packed_rows_are_a_multiple_of_row_multiple_and_few_shapes():
  cfg = pipeline.in_memory_config(_pairs(200, max_len=16), pad_id=0, pack=True, prefetch=0)
  it = pipeline.PairBatches(cfg, split="train", global_batch=16, seq_len=16, sharding=None, seed=0,
                            repeat=False, process_index=0, process_count=1, row_multiple=2)
  assert it.row_len == 32  # 0 means 2 * seq_len: the longest pair always fits
  rows = {len(b["input_ids"]) for b in it}
  assert rows and all(r % 2 == 0 for r in rows)
  # 16 pairs of <= 32 tokens in rows of 32 need at most 16 rows, and FFD needs fewer.
  assert max(rows) < 16


def test_a_pair_longer_than_a_row_is_an_error():
  cfg = pipeline.in_memory_config(_pairs(16, max_len=12), pad_id=0, pack=True, pack_row_len=8,
                                  prefetch=0)
  with pytest.raises(ValueError, match="more than row_len=8"):
    next(_pipeline(cfg))


@pytest.mark.slow
def test_packed_training_on_prepared_data_equals_unpacked_and_evaluates(tmp_path, shared_data):
  """A packed run on real prepared GSM8K pairs trains on the same pairs as the padded run: its
  losses match step for step (same batches, same init), and its evaluation works."""
  from codepmp_jax import train
  from codepmp_jax.config import default_config
  from codepmp_jax.data import prepare
  from codepmp_jax.data.tokenizer import train_sentencepiece

  questions = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").open()][:120]
  train_sentencepiece((q["question"] + q["answer"] for q in questions), 384, tmp_path / "spm")
  subset = tmp_path / "gsm8k.jsonl"
  subset.write_text("".join(json.dumps(q) + "\n" for q in questions))
  prepare.prepare(prepare.PrepareSettings(
      inputs=(str(subset),), format="gsm8k", tokenizer=str(tmp_path / "spm.model"), seq_len=256,
      out=str(tmp_path / "prepared"), split="train:0.8,eval:0.2", num_workers=1))

  def run(name, **data):
    config = default_config()
    config.data.update(path=str(tmp_path / "prepared"), **data)
    config.model.update(vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=2,
                        attention="plain")
    config.optimizer.update(lr=3e-3, warmup_ratio=0.0, weight_decay=0.0)
    config.train.update(global_batch=8, microbatches=2, seq_len=256, total_steps=4, log_every=1,
                        eval_every=4, eval_batches=2, lm_chunk=64)
    config.mesh_shape = (-1, 1, 1)
    final = train.train(config, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return final, {row["step"]: row for row in rows}

  packed_final, packed = run("packed", pack=True, pack_pairs_per_row=4)
  padded_final, padded = run("padded")
  assert sorted(packed) == [1, 2, 3, 4]
  for step in packed:
    for key in ("loss", "bt_loss", "lm_loss"):
      assert np.isfinite(packed[step][key])
      assert packed[step][key] == pytest.approx(padded[step][key], rel=1e-4), (step, key)
    assert 0 < packed[step]["packing_efficiency"] <= 1
  assert packed_final["eval/loss"] == pytest.approx(padded_final["eval/loss"], rel=1e-4)
  assert packed_final["eval/accuracy"] == pytest.approx(padded_final["eval/accuracy"])


@pytest.mark.slow
def test_plan_compiles_the_packed_steps_on_the_most_rows_a_batch_can_take():
  from codepmp_jax import plan
  from codepmp_jax.config import load_config
  from codepmp_jax.model.config import ModelConfig

  config = load_config("tiny")
  config.mesh_shape = (8, 1, 1)
  config.train.update(global_batch=16, seq_len=64, microbatches=2)
  model_config = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": 1000})
  padded = plan.plan(config, model_config)
  config.data.pack = True
  packed = plan.plan(config, model_config)
  # At most one pair a row: 16 rows of 128 tokens, the positions of the padded [16, 2, 64] batch.
  assert packing.PackedShape(16, 64, 2, 64, 128).rounded(128, 2 * 8).rows == 16
  assert packed.params_bytes == padded.params_bytes
  assert 0.5 * padded.temp_bytes < packed.temp_bytes < 2 * padded.temp_bytes
  assert packed.eval_temp_bytes > 0


@pytest.mark.slow
def test_packed_eval_microbatches_and_chunked_lm_give_the_full_sums():
  import flax.linen as nn
  import jax
  import ml_collections

  from codepmp_jax import losses, step
  from codepmp_jax.data import packing
  from codepmp_jax.model import transformer
  from codepmp_jax.model.config import get_preset

  config = get_preset("tiny", attention="plain")
  loss_cfg = ml_collections.ConfigDict(dict(rm_coef=1.0, lm_coef=1.0, center_coef=0.01,
                                            loss_type="sigmoid", use_margin=True))
  arrays = _pairs(12, max_len=12)
  batch = packing.pack_batch(arrays, row_len=32, max_pairs_per_row=3, pad_id=0, row_multiple=4).batch
  model = transformer.RewardModel(config)
  params = jax.jit(lambda: nn.unbox(transformer.init_params(config, jax.random.key(0))))()
  want = jax.jit(step.make_packed_eval_step(model, loss_cfg, lm_chunk=0))(params, batch)
  got = jax.jit(step.make_packed_eval_step(model, loss_cfg, microbatches=2, lm_chunk=8))(params, batch)
  assert float(want["lm_count"]) > 0
  for key in losses.SUM_KEYS:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", ("pmp_qwen2_1_5b", "pmp_qwen2_7b", "pmp_smollm2_135m"))
def test_paper_pmp_configs_pack_their_pairs(name):
  from codepmp_jax.config import load_config

  config = load_config(name)
  assert config.data.pack and config.data.pack_row_len == 0  # rows of 2 x seq_len


def _two_process_run(workdir, *overrides) -> dict[int, dict]:
  """A 3-step synthetic run as 2 processes x 4 CPU devices; its metrics by step."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for process_id in range(2):
    env = os.environ.copy()
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "codepmp_jax.train", f"--workdir={workdir}", "--config=configs/tiny.py",
         "--config.data.builtin.name=", "--config.data.source=synthetic", "--config.data.vocab_size=256",
         "--config.data.synthetic_pairs=512", "--config.data.shuffle_buffer=0",
         "--config.model.vocab_size=256", "--config.model.hidden_size=32",
         "--config.model.intermediate_size=64", "--config.model.num_layers=2",
         "--config.train.global_batch=8", "--config.train.seq_len=32", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.total_steps=3", "--config.mesh_shape=(-1,1,1)",
         f"--config.distributed.coordinator_address=localhost:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
         *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row for row in rows}


@pytest.mark.slow
def test_two_processes_packed_equal_two_processes_padded(tmp_path):
  """Two real processes agree on the packed shapes and train on the pairs the padded run does."""
  padded = _two_process_run(tmp_path / "padded")
  packed = _two_process_run(tmp_path / "packed", "--config.data.pack=True",
                            "--config.data.pack_row_len=96")
  assert sorted(packed) == [1, 2, 3]
  for step in padded:
    for key in ("loss", "bt_loss", "lm_loss", "grad_norm"):
      assert packed[step][key] == pytest.approx(padded[step][key], rel=1e-5), (step, key)
