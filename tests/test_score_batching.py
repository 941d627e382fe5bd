"""Scoring's batching: length buckets with scaled rows, one compile per bucket, layers scanned."""
import flax.linen as nn
import jax
import numpy as np

from codepmp_jax import checkpoint, score
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset


def test_buckets_compile_once_each_and_match_one_at_a_time(tmp_path):
  config = get_preset("tiny", num_layers=3)
  params = nn.unbox(transformer.init_params(config, jax.random.key(2)))
  scorer = score.RewardScorer(checkpoint.save_model(tmp_path / "ckpt", params, config),
                              batch_size=2, max_length=64, show_progress=False)
  assert scorer.config.scan_layers and "layers" in scorer.params
  lengths = [64, 3, 40, 17, 16, 5, 33, 60, 2, 9, 12, 20]
  batches = scorer.length_batches(lengths)
  # batch_size 2 rounds up to the 8 fake devices; power-of-two buckets, longest first:
  # 64 (8 rows), 32 (2 x 8 rows), 16 (4 x 8 rows)
  assert scorer.batch_size == 8
  assert [(sorted(lengths[i] for i in rows), length, n) for rows, length, n in batches] == [
      ([33, 40, 60, 64], 64, 8), ([17, 20], 32, 16), ([2, 3, 5, 9, 12, 16], 16, 32)]
  rng = np.random.default_rng(0)
  sequences = [rng.integers(1, config.vocab_size, n).tolist() for n in lengths]
  rewards = scorer.score_ids(sequences)
  assert scorer._forward._cache_size() == 3
  model = transformer.RewardModel(config)
  forward = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, mask).rewards)
  ids = np.zeros((len(sequences), 64), np.int32)
  for i, s in enumerate(sequences):
    ids[i, :len(s)] = s
  expected = forward(ids, (np.arange(64)[None] < np.asarray(lengths)[:, None]).astype(np.int32))
  np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5)
