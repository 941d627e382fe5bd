"""Packed batches from the input pipeline: one fixed shape per run, every pair of an epoch exactly
once (the pairs that do not fit a step carried into the next), the same steps for every process
count, exact resume with either reader, and packed training that compiles its step once."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from codepmp_jax.data import packing, pipeline
from codepmp_jax.data.encode import PairArrays
from tests.test_data_pipeline import _pairs  # pair i's chosen starts with 1000 + i, margin i

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pipeline(cfg, *, index=0, count=1, global_batch=8, seq_len=16, repeat=True, seed=3,
              row_multiple=1):
  return pipeline.PairBatches(cfg, split="train", global_batch=global_batch, seq_len=seq_len,
                              sharding=None, seed=seed, repeat=repeat, process_index=index,
                              process_count=count, row_multiple=row_multiple)


def _prompted_pairs(n: int) -> PairArrays:
  """`_pairs` whose rejected sequences begin with their chosen one's prompt, as real pairs do."""
  arrays = _pairs(n)
  tokens = arrays.tokens.copy()
  prompts = np.minimum(arrays.lengths.min(axis=1) - 1, 3)  # 2 or 3 tokens
  for i, prompt in enumerate(prompts):
    tokens[arrays.offsets[i, 1]:arrays.offsets[i, 1] + prompt] = arrays.sequence(i, 0)[:prompt]
  return PairArrays.from_lengths(tokens, arrays.lengths, np.repeat(prompts[:, None], 2, axis=1),
                                 arrays.margin)


def code_like_pairs(n: int, seq_len: int = 1024, seed: int = 0) -> PairArrays:
  """Pairs of code-like lengths: a prompt of 40-160 tokens shared by both sequences, responses
  log-normal around 200 tokens (cut to fit `seq_len`); pair i's margin is i."""
  rng = np.random.default_rng(seed)
  prompt = rng.integers(40, 161, n)
  response = np.clip(np.round(rng.lognormal(np.log(200), 0.5, (n, 2))), 8, seq_len).astype(np.int64)
  lengths = np.minimum(prompt[:, None] + response, seq_len)
  tokens = []
  for i in range(n):
    shared = rng.integers(3, 30000, prompt[i])
    for which in (0, 1):
      tokens.append(np.concatenate([shared, rng.integers(3, 30000, lengths[i, which] - prompt[i])]))
  return PairArrays.from_lengths(np.concatenate(tokens).astype(np.int32), lengths,
                                 np.repeat(prompt[:, None], 2, axis=1), np.arange(n, dtype=np.float32))


def _unpack(batch) -> dict[int, tuple]:
  """pair id (its margin) -> (chosen tokens, rejected tokens) read back from a packed batch
  through its `sequence_index` (a shared prompt's columns are in both sequences' slots)."""
  out = {}
  for row in range(len(batch["input_ids"])):
    ids = batch["input_ids"][row]
    for slot in np.flatnonzero(batch["pair_valid"][row]):
      chosen, rejected = (batch["sequence_index"][row, 2 * slot + which] for which in (0, 1))
      chosen, rejected = chosen[chosen >= 0], rejected[rejected >= 0]
      assert batch["reward_index"][row, 2 * slot:2 * slot + 2].tolist() == [chosen[-1], rejected[-1]]
      pair = int(batch["margin"][row, slot])
      assert pair not in out
      out[pair] = (ids[chosen].tolist(), ids[rejected].tolist())
  return out


def _pair_ids(batch) -> list[int]:
  """The pairs (margins) a packed batch holds, row by row, slot by slot."""
  return [int(m) for m in batch["margin"][batch["pair_valid"] > 0]]


def _check_layout(batch) -> None:
  """lm_index lists each row's LM targets (lm_mask), then zeros; sequence_index each segment's
  columns (a rejected sequence: its shared prompt's columns, then its own), then -1."""
  for row in range(len(batch["input_ids"])):
    targets = np.flatnonzero(batch["lm_mask"][row])
    np.testing.assert_array_equal(batch["lm_index"][row, :len(targets)], targets)
    assert not batch["lm_index"][row, len(targets):].any()
    for s, columns in enumerate(batch["sequence_index"][row]):
      want = np.flatnonzero(batch["segment_ids"][row] == s + 1)
      if s % 2:
        prompt = batch["positions"][row, want[0]] if len(want) else 0
        want = np.concatenate([batch["sequence_index"][row, s - 1, :prompt], want])
      np.testing.assert_array_equal(columns, np.pad(want, (0, len(columns) - len(want)),
                                                    constant_values=-1))


def _shapes(batch) -> dict[str, tuple]:
  return {k: v.shape for k, v in batch.items()}


@pytest.mark.parametrize("share_prompt", [True, False])
def test_an_epoch_holds_every_pair_exactly_once_in_one_shape(share_prompt):
  arrays = _prompted_pairs(70)
  assert arrays.shared_prompt().min() >= 2
  cfg = pipeline.in_memory_config(arrays, pad_id=0, pack=True, pack_row_len=32,
                                  pack_pairs_per_row=3, pack_share_prompt=share_prompt, prefetch=0)
  it = _pipeline(cfg)
  want_shapes = it.shape.array_shapes(3)
  assert it.shape.columns == 32
  steps = it.steps_per_epoch
  seen, epochs = [], []
  for index in range(steps + 3):  # one epoch and the start of the next
    batch = next(it)
    assert _shapes(batch) == want_shapes  # every step the same shape
    _check_layout(batch)
    pairs = _unpack(batch)
    for pair, (chosen, rejected) in pairs.items():  # the pairs' own tokens
      assert chosen == arrays.sequence(pair, 0).tolist()
      assert rejected == arrays.sequence(pair, 1).tolist()
    # Shared prompts are laid out once: the rows hold the pairs' tokens less their prompts.
    held = sorted(pairs)
    saved = arrays.shared_prompt()[held].sum() if share_prompt else 0
    assert (batch["segment_ids"] > 0).sum() == arrays.lengths[held].sum() - saved
    (epochs if index >= steps else seen).append(_pair_ids(batch))
  first = [p for step in seen for p in step]
  assert sorted(first) == list(range(70))  # none dropped, none twice
  assert all(len(step) for step in seen)
  # The next epoch starts over in another order.
  second = [p for step in epochs for p in step]
  assert len(set(second)) == len(second) and second != first[:len(second)]


def test_packing_efficiency_of_code_like_pairs():
  """256 pairs a step of code-like lengths at seq_len 1024 (rows of 2048): at least 0.85 of the
  packed tokens are real ones in every step but the epoch's last, and every pair is used once."""
  arrays = code_like_pairs(4096)
  cfg = pipeline.in_memory_config(arrays, pad_id=0, pack=True, prefetch=0)
  it = _pipeline(cfg, global_batch=256, seq_len=1024, repeat=False, seed=0)
  assert it.shape.columns == 2048
  batches = list(it)
  assert len(batches) == it.steps_per_epoch
  efficiency = [packing.packing_efficiency(b) for b in batches]
  pairs = [int(b["pair_valid"].sum()) for b in batches]
  print(f"rows {it.shape.rows} x {it.shape.columns}: efficiency {np.mean(efficiency[:-1]):.3f} "
        f"(min {min(efficiency[:-1]):.3f}), pairs a step {np.mean(pairs[:-1]):.1f}")
  assert np.mean(efficiency[:-1]) >= 0.85
  assert 0.9 * 256 <= np.mean(pairs[:-1]) <= 1.1 * 256
  assert sorted(p for b in batches for p in _pair_ids(b)) == list(range(4096))


@pytest.mark.parametrize("row_multiple", [1, 2])
def test_batches_are_the_same_for_one_two_and_four_processes(row_multiple):
  """read_groups=4: process p of P holds rows [p R/P, (p+1) R/P) of the one-process batch."""
  arrays = _prompted_pairs(150)
  cfg = pipeline.in_memory_config(arrays, pad_id=0, pack=True, pack_row_len=32,
                                  pack_pairs_per_row=3, read_groups=4, prefetch=0)
  one = _pipeline(cfg, global_batch=16, repeat=True, row_multiple=row_multiple)
  steps = one.steps_per_epoch + 2  # over the epoch's end
  want = [next(one) for _ in range(steps)]
  assert one.shape.rows % (4 * row_multiple) == 0
  for count in (2, 4):
    procs = [_pipeline(cfg, index=p, count=count, global_batch=16, row_multiple=row_multiple)
             for p in range(count)]
    assert {p.steps_per_epoch for p in procs} == {one.steps_per_epoch}
    for index in range(steps):
      parts = [next(p) for p in procs]
      for key, value in want[index].items():
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), value,
                                      err_msg=f"{count} processes, step {index}, {key}")


@pytest.mark.parametrize("reader", ["grain", "tfdata"])
def test_resume_gives_the_same_next_batches(reader):
  arrays = _prompted_pairs(70)
  cfg = pipeline.in_memory_config(arrays, pad_id=0, pack=True, pack_row_len=32,
                                  pack_pairs_per_row=3, reader=reader, prefetch=2, read_groups=2)
  first = _pipeline(cfg, global_batch=8)
  steps = first.steps_per_epoch
  for k in (1, steps - 1):  # mid-epoch, and just before the epoch's end
    for _ in range(k):
      next(first)
    state = json.loads(json.dumps(first.get_state()))
    assert state["next_index"] == k
    want = [next(first) for _ in range(4)]  # over the epoch boundary when k = steps - 1
    resumed = _pipeline(cfg, global_batch=8)
    resumed.set_state(state)
    for index, batch in enumerate(want):
      got = next(resumed)
      for key in batch:
        np.testing.assert_array_equal(got[key], batch[key], err_msg=f"{reader} k={k} +{index} {key}")
    resumed.close()
    first.close()
    first = _pipeline(cfg, global_batch=8)
  first.close()
  # Another pipeline's state (another data order) is refused.
  other = _pipeline(pipeline.in_memory_config(_prompted_pairs(71), pad_id=0, pack=True,
                                              pack_row_len=32, pack_pairs_per_row=3))
  with pytest.raises(ValueError, match="num_pairs=70"):
    other.set_state(state)


def test_the_tfdata_reader_yields_the_grain_readers_batches():
  arrays = code_like_pairs(600, seq_len=512, seed=1)
  batches = {}
  for reader in ("grain", "tfdata"):
    cfg = pipeline.in_memory_config(arrays, pad_id=0, pack=True, reader=reader, prefetch=2,
                                    read_groups=2)
    batches[reader] = list(_pipeline(cfg, global_batch=64, seq_len=512, repeat=False))
  assert len(batches["grain"]) == len(batches["tfdata"]) > 2
  for index, (grain, tfdata) in enumerate(zip(batches["grain"], batches["tfdata"])):
    assert grain.keys() == tfdata.keys()
    for key in grain:
      assert grain[key].dtype == tfdata[key].dtype, key
      np.testing.assert_array_equal(tfdata[key], grain[key], err_msg=f"step {index} {key}")


def test_a_pair_longer_than_a_row_is_an_error():
  cfg = pipeline.in_memory_config(_pairs(16, max_len=12), pad_id=0, pack=True, pack_row_len=8,
                                  prefetch=0)
  with pytest.raises(ValueError, match=r"tokens, more than data.pack_row_len=8: a row must hold"):
    _pipeline(cfg)


def test_packed_shape_is_the_pipelines_shape():
  """`pipeline.packed_shape` (what `plan` compiles) is the shape `PairBatches` packs into."""
  import jax

  arrays = code_like_pairs(300, seq_len=512)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("data", "model"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  for rows, groups in ((0, 0), (0, 4), (24, 8)):
    cfg = pipeline.in_memory_config(arrays, pad_id=0, pack=True, pack_rows=rows,
                                    read_groups=groups, prefetch=0)
    for count in (1, 2):
      for row_multiple in (1, 2):
        it = pipeline.PairBatches(cfg, split="train", global_batch=32, seq_len=512,
                                  sharding=sharding, seed=0, repeat=True, process_index=0,
                                  process_count=count, row_multiple=row_multiple)
        want = pipeline.packed_shape(cfg, split="train", global_batch=32, seq_len=512, seed=0,
                                     row_multiple=row_multiple,
                                     sharding=sharding, process_count=count)
        assert it.shape == want, (rows, groups, count, row_multiple)
        assert it.shape.rows * count % (8 * row_multiple) == 0
        host = it.host_batch(0)
        assert _shapes(host) == want.array_shapes(cfg.pack_pairs_per_row)


WORDS = ("alpha beta gamma delta sum list loop return value index count print sort map filter "
         "read write open close key item").split()


@pytest.fixture(scope="module")
def prepared_pairs(tmp_path_factory) -> pathlib.Path:
  """Prepared pairs of varied lengths (prompts 3-20 words, responses 5-60) and their tokenizer."""
  from codepmp_jax.data import prepare
  from codepmp_jax.data.tokenizer import train_sentencepiece

  tmp = tmp_path_factory.mktemp("packed_prepared")
  rng = np.random.default_rng(0)

  def text(n):
    return " ".join(rng.choice(WORDS, size=n))
  records = [{"prompt": f"task {i}: {text(int(rng.integers(3, 20)))}",
              "chosen": text(int(rng.integers(5, 60))), "rejected": text(int(rng.integers(5, 60)))}
             for i in range(240)]
  (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  train_sentencepiece([r["prompt"] + r["chosen"] + r["rejected"] for r in records], 300, tmp / "spm")
  prepare.prepare(prepare.PrepareSettings(
      inputs=(str(tmp / "pairs.jsonl"),), format="pairs", tokenizer=str(tmp / "spm.model"),
      seq_len=128, out=str(tmp / "prepared"), num_shards=3, split="train:0.8,eval:0.2",
      num_workers=1))
  return tmp / "prepared"


@pytest.mark.slow
def test_packed_training_over_an_epoch_compiles_its_step_once(prepared_pairs, tmp_path):
  """A packed run on prepared data over one whole epoch (eval at its end): metrics.jsonl counts one
  compilation of the train step and one of the eval step; every step's losses are finite."""
  from codepmp_jax import train
  from codepmp_jax.config import default_config

  config = default_config()
  config.data.update(path=str(prepared_pairs), pack=True, pack_pairs_per_row=4)
  config.model.update(vocab_size=0, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, attention="plain")
  config.optimizer.update(lr=3e-3, warmup_ratio=0.0, weight_decay=0.0)
  config.train.update(global_batch=16, microbatches=2, seq_len=128, total_steps=0, epochs=1.0,
                      log_every=1, eval_every=1000, eval_batch=16, eval_batches=0, lm_chunk=64)
  config.checkpoint.save_every = 1000
  config.mesh_shape = (-1, 1, 1)
  final = train.train(config, tmp_path / "run")
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  from codepmp_jax import sharding, step
  mesh = sharding.make_mesh(config.mesh_shape)
  batch_sharding = step.batch_shardings(mesh, sharding.rules_from_config(config.logical_rules))
  data = pipeline.PairBatches(config.data, split="train", global_batch=16, seq_len=128,
                              sharding=batch_sharding["input_ids"], seed=config.seed, repeat=True,
                              process_index=0, process_count=1, row_multiple=2)
  steps = data.steps_per_epoch
  assert [r["step"] for r in rows] == list(range(1, steps + 1)) and steps >= 8
  for row in rows:
    for key in ("loss", "bt_loss", "lm_loss"):
      assert np.isfinite(row[key]), (row["step"], key)
    assert 0 < row["packing_efficiency"] <= 1
    assert row["compiles_train_step"] == 1, row
  assert rows[-1]["compiles_eval_step"] == 1 and "eval/loss" in rows[-1], rows[-1]
  assert np.isfinite(final["eval/loss"]) and 0 <= final["eval/accuracy"] <= 1


@pytest.mark.slow
def test_plan_compiles_the_shape_the_run_packs_into(monkeypatch):
  """`plan` with data.pack lowers the train step on `pipeline.packed_shape`, the pipeline's shape."""
  from codepmp_jax import plan
  from codepmp_jax.config import load_config
  from codepmp_jax.model.config import ModelConfig

  config = load_config("tiny")
  config.mesh_shape = (8, 1, 1)
  config.train.update(global_batch=16, seq_len=512, microbatches=2, eval_batch=16)
  config.data.update(source="in_memory", records=code_like_pairs(200, seq_len=512), pad_id=0)
  model_config = ModelConfig.from_dict({**config.model.to_dict(), "vocab_size": 1000})
  padded = plan.plan(config, model_config)
  config.data.pack = True
  seen = []
  real = pipeline.packed_shape
  monkeypatch.setattr(pipeline, "packed_shape", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
  packed = plan.plan(config, model_config)
  import jax
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  run = pipeline.PairBatches(config.data, split="train", global_batch=16, seq_len=512,
                             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
                             seed=config.seed, repeat=True, process_index=0, process_count=1,
                             row_multiple=2)
  assert seen[0] == run.shape and run.shape.rows % 16 == 0
  assert packed.params_bytes == padded.params_bytes
  assert packed.eval_temp_bytes > 0


@pytest.mark.slow
def test_packed_eval_microbatches_and_chunked_lm_give_the_full_sums():
  import flax.linen as nn
  import jax
  import ml_collections

  from codepmp_jax import losses, step
  from codepmp_jax.model import transformer
  from codepmp_jax.model.config import get_preset

  config = get_preset("tiny", attention="plain")
  loss_cfg = ml_collections.ConfigDict(dict(rm_coef=1.0, lm_coef=1.0, center_coef=0.01,
                                            loss_type="sigmoid", use_margin=True))
  arrays = _pairs(12, max_len=12)
  batch = packing.pack_batch(arrays, row_len=32, max_pairs_per_row=3, pad_id=0, row_multiple=4).batch
  model = transformer.RewardModel(config)
  params = jax.jit(lambda: nn.unbox(transformer.init_params(config, jax.random.key(0))))()
  want = jax.jit(step.make_eval_step(model, loss_cfg, lm_chunk=0))(params, batch)
  got = jax.jit(step.make_eval_step(model, loss_cfg, microbatches=2, lm_chunk=8))(params, batch)
  assert float(want["lm_count"]) > 0
  for key in losses.SUM_KEYS:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", ("pmp_qwen2_1_5b", "pmp_qwen2_7b", "pmp_smollm2_135m"))
def test_paper_pmp_configs_pack_their_pairs(name):
  from codepmp_jax.config import load_config

  config = load_config(name)
  assert config.data.pack and config.data.pack_row_len == 0  # rows of 2 x seq_len
