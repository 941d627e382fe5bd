"""Scoring's batching: length buckets with scaled rows, one compile per bucket, layers scanned
(the last at the reward token only: `rewards_only`)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from codepmp_jax import checkpoint, score
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset


@pytest.mark.slow
def test_buckets_compile_once_each_and_match_one_at_a_time(tmp_path):
  config = get_preset("tiny", num_layers=3)
  params = nn.unbox(transformer.init_params(config, jax.random.key(2)))
  scorer = score.RewardScorer(checkpoint.save_model(tmp_path / "ckpt", params, config),
                              batch_size=2, max_length=64, show_progress=False)
  # The layers stacked once at load for lax.scan.
  assert jax.tree.leaves(scorer.params["layers"])[0].shape[0] == 3 and "layers_2" not in scorer.params
  lengths = [64, 3, 40, 17, 16, 5, 33, 60, 2, 9, 12, 20]
  batches = scorer.length_batches(lengths)
  # batch_size 2 rounds up to the 8 fake devices; 4 buckets per octave, longest first:
  # 64 (8 rows), 40 (8 rows: 64 // 40 = 1), 20 (3 x 8 rows), 16 (4 x 8 rows)
  assert scorer.batch_size == 8
  assert [(sorted(lengths[i] for i in rows), length, n) for rows, length, n in batches] == [
      ([60, 64], 64, 8), ([33, 40], 40, 8), ([17, 20], 20, 24), ([2, 3, 5, 9, 12, 16], 16, 32)]
  rng = np.random.default_rng(0)
  sequences = [rng.integers(1, config.vocab_size, n).tolist() for n in lengths]
  rewards = scorer.score_ids(sequences)
  assert scorer._forward._cache_size() == 4
  model = transformer.RewardModel(config)
  forward = jax.jit(lambda ids, lengths: model.apply(
      {"params": params}, ids, **transformer.right_padded(lengths, 64, False)).rewards[:, 0])
  ids = np.zeros((len(sequences), 64), np.int32)
  for i, s in enumerate(sequences):
    ids[i, :len(s)] = s
  expected = forward(ids, np.asarray(lengths))
  np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5)


def test_cpu_batches_keep_attention_scores_cache_sized(tmp_path):
  """256-token rows run in 4 causal blocks of 64 queries: 4 heads x 64 x 256 float32 scores are
  256 KiB a row, so a 2 MiB budget holds 8 rows however large `batch_size` is (and 112-token
  rows, one block, 196 KiB each, also 8: rows stay a multiple of the 8 fake devices)."""
  config = get_preset("tiny")
  params = nn.unbox(transformer.init_params(config, jax.random.key(2)))
  scorer = score.RewardScorer(checkpoint.save_model(tmp_path / "ckpt", params, config),
                              batch_size=64, max_length=256, show_progress=False)
  assert scorer.config.attention_block_bytes == 2 << 20 and score.SCORE_CAUSAL_BLOCK == 64
  batches = scorer.length_batches([256] * 20 + [100] * 3)
  assert [(len(rows), length, n) for rows, length, n in batches] == [
      (8, 256, 8), (8, 256, 8), (4, 256, 8), (3, 112, 8)]
