"""Packed pairs: the packer's layout, and the model and step on packed rows against each sequence
alone in its own row."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from codepmp_jax import losses, optim, sharding, step
from codepmp_jax.data import packing
from codepmp_jax.data.encode import PairArrays
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset

MODEL = get_preset("tiny", attention="plain")
LOSS = ml_collections.ConfigDict(dict(
    rm_coef=1.0, lm_coef=1.0, center_coef=0.01, loss_type="sigmoid", use_margin=True))
PAD = 0


def _pairs(n=8, max_len=16, seed=0, shared_prompts=False) -> PairArrays:
  """Random pairs; with `shared_prompts`, each pair's rejected sequence begins with the same
  tokens as its chosen one, up to a random point (within or past the prompts)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, max_len + 1, size=(n, 2))
  tokens = rng.integers(1, MODEL.vocab_size, size=int(lengths.sum())).astype(np.int32)
  starts = np.minimum(rng.integers(0, 6, size=(n, 2)), lengths - 1)
  arrays = PairArrays.from_lengths(tokens, lengths, starts, rng.uniform(0, 0.5, n).astype(np.float32))
  if shared_prompts:
    for i, same in enumerate(rng.integers(0, 8, size=n).tolist()):
      same = min(same, *lengths[i])
      tokens[arrays.offsets[i, 1]:arrays.offsets[i, 1] + same] = arrays.sequence(i, 0)[:same]
  return arrays


def test_layout_by_hand():
  # pair 0: chosen [5 6 7], rejected [8 9]; pair 1: chosen [1 2], rejected [3]
  arrays = PairArrays.from_lengths(np.array([5, 6, 7, 8, 9, 1, 2, 3]), [[3, 2], [2, 1]],
                                   [[1, 1], [0, 0]], np.array([0.5, 0.25]))
  result = packing.pack_pairs(arrays, row_len=10, max_pairs_per_row=2, pad_id=PAD)
  b = result.batch
  np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 8, 9, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 3, 3, 4, 0, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 0, 1, 0, 0, 0]])
  # chosen responses: pair 0 from its index 1, pair 1 from index max(0, 1) = 1 (never a segment start)
  np.testing.assert_array_equal(b["lm_mask"], [[0, 1, 1, 0, 0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b["lm_index"], [[1, 2, 6]])  # the LM targets' columns
  np.testing.assert_array_equal(b["sequence_index"], [[[0, 1, 2], [3, 4, -1], [5, 6, -1],
                                                       [7, -1, -1]]])
  # per pair: tokens, LM targets, longer sequence, shared prompt
  np.testing.assert_array_equal(packing.pair_sizes(arrays.lengths, arrays.response_start),
                                [[5, 2, 3, 0], [3, 1, 2, 0]])
  assert packing.PackedShape.of(packing.pair_sizes(arrays.lengths, arrays.response_start),
                                10, 2) == packing.PackedShape(1, 3, 4, 3, 8)
  np.testing.assert_array_equal(b["reward_index"], [[2, 4, 6, 7]])
  np.testing.assert_array_equal(b["pair_valid"], [[1, 1]])
  np.testing.assert_allclose(b["margin"], [[0.5, 0.25]])
  np.testing.assert_array_equal(result.slots, [[0, 1]])
  assert result.left_over.size == 0
  assert result.efficiency == pytest.approx(0.8)


def test_shared_prompt_layout_by_hand():
  # pair 0: chosen [5 6 7 1], rejected [5 6 8] share [5 6] (both prompts are 2 tokens);
  # pair 1: chosen [1 2], rejected [1 3] share nothing: [1] is the chosen prompt, not the rejected's
  arrays = PairArrays.from_lengths(np.array([5, 6, 7, 1, 5, 6, 8, 1, 2, 1, 3]), [[4, 3], [2, 2]],
                                   [[2, 2], [1, 0]], np.array([0.5, 0.25]))
  np.testing.assert_array_equal(arrays.shared_prompt(), [2, 0])
  result = packing.pack_pairs(arrays, row_len=10, max_pairs_per_row=2, pad_id=PAD,
                              shared_prompt=arrays.shared_prompt())
  b = result.batch
  np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 1, 8, 1, 2, 1, 3, 0]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2, 3, 3, 4, 4, 0]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 2, 0, 1, 0, 1, 0]])
  np.testing.assert_array_equal(b["lm_mask"], [[0, 0, 1, 1, 0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b["sequence_index"], [[[0, 1, 2, 3], [0, 1, 4, -1],
                                                       [5, 6, -1, -1], [7, 8, -1, -1]]])
  np.testing.assert_array_equal(b["reward_index"], [[3, 4, 6, 8]])
  sizes = packing.pair_sizes(arrays.lengths, arrays.response_start, arrays.shared_prompt())
  np.testing.assert_array_equal(sizes, [[5, 2, 4, 2], [4, 1, 2, 0]])
  assert result.efficiency == pytest.approx(0.9)
  # A shared prompt the tokens do not have is an error: as long as pair 0's rejected sequence, or
  # pair 1's first token where its rejected sequence begins with another one.
  other = PairArrays.from_lengths(np.array([5, 6, 7, 1, 5, 6, 8, 1, 2, 4, 3]), [[4, 3], [2, 2]],
                                  [[2, 2], [1, 0]], np.array([0.5, 0.25]))
  for pairs, shared, pair in ((arrays, [3, 0], 0), (other, [2, 1], 1)):
    with pytest.raises(ValueError, match=f"pair {pair}: shared_prompt="):
      packing.pack_pairs(pairs, row_len=10, max_pairs_per_row=2, pad_id=PAD, shared_prompt=shared)


def test_first_fit_decreasing_fixed_rows_and_left_over():
  lengths = np.array([3, 9, 5, 7, 2])  # pair totals
  rows = packing.assign_rows(lengths, row_len=10, max_pairs_per_row=4)
  # longest first: 9 -> row 0, 7 -> row 1, 5 -> row 2, 3 -> row 1, 2 -> row 2
  np.testing.assert_array_equal(rows, [1, 0, 2, 1, 2])
  in_order = packing.assign_rows(lengths, row_len=10, max_pairs_per_row=4, order="first_fit")
  np.testing.assert_array_equal(in_order, [0, 1, 0, 2, 0])
  capped = packing.assign_rows(lengths, row_len=10, max_pairs_per_row=1, num_rows=2)
  np.testing.assert_array_equal(capped, [-1, 0, -1, 1, -1])
  # balanced: longest first into the row with the fewest pairs (then the most room): 9 -> 0,
  # 7 -> 1, 5 -> 2, 3 -> 2 (1 pair each, row 2 has the most room), 2 -> 1 (fewer pairs than 2)
  balanced = packing.assign_rows(lengths, row_len=10, max_pairs_per_row=4, num_rows=3,
                                 order="balanced")
  np.testing.assert_array_equal(balanced, [2, 0, 2, 1, 1])
  # where balancing leaves a pair out (5, 5, 4, 3 -> rows 0, 1, 0, 1; the last 3 fits neither),
  # it is ffd
  np.testing.assert_array_equal(packing.assign_rows(np.array([5, 5, 4, 3, 3]), 10, 4, 2, "balanced"),
                                [0, 0, 1, 1, 1])
  arrays = _pairs(n=6)
  result = packing.pack_pairs(arrays, row_len=32, max_pairs_per_row=1, pad_id=PAD,
                              shape=packing.PackedShape(4, 32, 2, 16, 32))
  placed = sorted(int(i) for i in result.slots.reshape(-1) if i >= 0)
  assert sorted(placed + result.left_over.tolist()) == list(range(6)) and len(placed) == 4


def test_pack_batch_takes_every_pair_and_rounds_rows_up():
  arrays = _pairs(n=11)
  result = packing.pack_batch(arrays, row_len=32, max_pairs_per_row=2, pad_id=PAD, row_multiple=4)
  used = int((result.slots >= 0).any(axis=1).sum())
  assert sorted(result.slots[result.slots >= 0].tolist()) == list(range(11))
  assert result.left_over.size == 0
  rows = len(result.slots)
  assert rows % 4 == 0 and used <= rows < used + 4 + rows // 4
  assert all(v.shape[0] == rows for v in result.batch.values())
  assert not result.batch["segment_ids"][used:].any() and not result.batch["pair_valid"][used:].any()
  assert result.efficiency == pytest.approx(arrays.lengths.sum() / (rows * 32))


def test_a_wider_shape_pads_and_a_narrower_one_is_an_error():
  arrays = PairArrays.from_lengths(np.array([5, 6, 7, 8, 9, 1, 2, 3]), [[3, 2], [2, 1]],
                                   [[1, 1], [0, 0]], np.array([0.5, 0.25]))
  wide = packing.pack_pairs(arrays, row_len=10, max_pairs_per_row=2, pad_id=PAD,
                            shape=packing.PackedShape(2, 5, 4, 4, 10)).batch
  np.testing.assert_array_equal(wide["lm_index"], [[1, 2, 6, 0, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(wide["sequence_index"][0, :, -1], [-1, -1, -1, -1])
  assert (wide["sequence_index"][1] == -1).all()  # an empty row
  with pytest.raises(ValueError, match="row 0 has 3 LM targets, more than lm_slots=2"):
    packing.pack_pairs(arrays, row_len=10, max_pairs_per_row=2, pad_id=PAD,
                       shape=packing.PackedShape(1, 2, 4, 3, 10))
  with pytest.raises(ValueError, match="up to 4 sequences of up to 3 tokens"):
    packing.pack_pairs(arrays, row_len=10, max_pairs_per_row=2, pad_id=PAD,
                       shape=packing.PackedShape(1, 3, 4, 2, 10))
  with pytest.raises(ValueError, match="row 0 has 8 tokens, more than columns=6"):
    packing.pack_pairs(arrays, row_len=10, max_pairs_per_row=2, pad_id=PAD,
                       shape=packing.PackedShape(1, 3, 4, 3, 6))
  shapes = [packing.PackedShape(*sizes).rounded(1024, row_multiple=2) for sizes in
            [(1, 0, 1, 1, 1), (3, 17, 3, 129, 129), (9, 300, 6, 300, 700), (40, 5000, 16, 900, 2000)]]
  assert [dataclasses.astuple(s) for s in shapes] == [
      (2, 16, 1, 128, 128), (4, 20, 3, 160, 160), (10, 320, 6, 320, 768), (40, 1024, 16, 1024, 1024)]


def test_short_batches_get_short_rows():
  """Rows are as long as the fullest one needs (rounded), not `row_len`: few or short pairs do
  not pay for a long row's padding, and sharing prompts shortens the rows."""
  arrays = _pairs(n=4, max_len=16, shared_prompts=True)
  result = packing.pack_batch(arrays, row_len=1024, max_pairs_per_row=8, pad_id=PAD)
  assert result.batch["input_ids"].shape == (1, 128)  # 4 pairs of at most 32 tokens: one row
  np.testing.assert_array_equal(np.sort(result.batch["input_ids"][result.batch["segment_ids"] > 0]),
                                np.sort(arrays.tokens))
  shared = packing.pack_batch(arrays, row_len=1024, max_pairs_per_row=8, pad_id=PAD,
                              share_prompt=True)
  assert (shared.batch["segment_ids"] > 0).sum() == arrays.lengths.sum() - arrays.shared_prompt().sum()


def test_pair_longer_than_a_row_is_an_error():
  with pytest.raises(ValueError, match="pair 1 has 12 tokens"):
    packing.assign_rows(np.array([4, 12]), row_len=10, max_pairs_per_row=2)


def _reference_sums(model, params, arrays: PairArrays):
  """The loss sums from each sequence run alone in its own row (full logits, no packing)."""
  ids, lengths, lm_mask = arrays.sequence_rows(16, PAD)
  out = model.apply({"params": params}, ids, **transformer.right_padded(lengths, ids.shape[1], False),
                    return_logits=True)
  lm_sum, lm_count = losses.lm_cross_entropy(out.logits, jnp.asarray(ids), jnp.asarray(lm_mask))
  return losses.pair_sums(out.rewards[0::2, 0], out.rewards[1::2, 0], lm_sum, lm_count,
                          jnp.asarray(arrays.margin), LOSS)


def _params():
  return nn.unbox(transformer.init_params(MODEL, jax.random.key(1)))


@pytest.mark.parametrize("by_sequence,share_prompt", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("impl,scan", [("plain", False), pytest.param("blocked", False, marks=pytest.mark.slow),
                                       pytest.param("plain", True, marks=pytest.mark.slow)])
def test_model_on_packed_rows_equals_each_sequence_alone(impl, scan, by_sequence, share_prompt):
  """Rewards and LM logits of each packed sequence equal those of the sequence alone in its own
  row (1e-5), also with the layers scanned and rematerialised, under segment masks or sequence by
  sequence, with each pair's shared prompt laid out once or twice."""
  arrays = _pairs(shared_prompts=True)
  params = _params()
  config = MODEL.replace(attention=impl)
  if scan:
    config = config.replace(scan_layers=True, remat_policy="full")
    params = transformer.stack_layers(params, config.num_layers)
  model = transformer.RewardModel(config)
  ids, lengths, _ = arrays.sequence_rows(16, PAD)
  ref = jax.jit(lambda p, i, n: model.apply({"params": p}, i, **transformer.right_padded(n, 16, False),
                                            return_logits=True))(params, ids, lengths)
  result = packing.pack_pairs(arrays, row_len=40, max_pairs_per_row=3, pad_id=PAD,
                              shared_prompt=arrays.shared_prompt() if share_prompt else None)
  assert not share_prompt or arrays.shared_prompt().sum() > 0
  b = result.batch
  out = jax.jit(lambda p, b: model.apply(
      {"params": p}, b["input_ids"], b["segment_ids"], b["positions"], b["reward_index"],
      b["sequence_index"] if by_sequence else None, return_logits=True))(params, b)
  for row, k in zip(*np.nonzero(result.slots >= 0)):
    pair = result.slots[row, k]
    for which in (0, 1):
      np.testing.assert_allclose(out.rewards[row, 2 * k + which], ref.rewards[2 * pair + which, 0],
                                 rtol=1e-5, atol=1e-5)
      columns = b["sequence_index"][row, 2 * k + which, :arrays.lengths[pair, which]]
      np.testing.assert_allclose(out.logits[row, columns], ref.logits[2 * pair + which, :len(columns)],
                                 rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["pair_rows", "packed", "packed_shared_prompt"])
def test_loss_and_gradients_equal_each_sequence_alone(layout):
  """The key property: same pairs, same loss and gradients whatever the layout (1e-5, float32):
  one pair a row or packed, attending sequence by sequence (`sequence_index`) with the LM head
  only at `lm_index` (chunked), each packed pair's shared prompt laid out once or twice, against
  each sequence run alone with the full logits."""
  arrays = _pairs(n=8, shared_prompts=True)
  params = _params()
  model = transformer.RewardModel(MODEL)
  if layout == "pair_rows":
    batch = packing.pair_rows(arrays, 16, PAD)
  else:
    batch = packing.pack_pairs(arrays, row_len=48, max_pairs_per_row=4, pad_id=PAD,
                               shared_prompt=arrays.shared_prompt() if layout.endswith("prompt") else None
                               ).batch
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def reference_loss(p):
    sums = _reference_sums(model, p, arrays)
    return losses.loss_from_sums(sums, LOSS), sums

  def step_loss(p):
    sums = step.microbatch_sums(model, p, batch, LOSS, lm_chunk=8)
    return losses.loss_from_sums(sums, LOSS), sums

  (ref_loss, ref_sums), ref_grads = jax.jit(jax.value_and_grad(reference_loss, has_aux=True))(params)
  (loss, sums), grads = jax.jit(jax.value_and_grad(step_loss, has_aux=True))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in losses.SUM_KEYS:
    np.testing.assert_allclose(sums[key], ref_sums[key], rtol=1e-5, atol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, ref_grads)


def _one_step(batch, mesh_shape, **kwargs):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  rules = sharding.DEFAULT_RULES
  opt_cfg = optim.default_optimizer_config()
  opt_cfg.lr = 1e-3
  optimizer = optim.make_optimizer(opt_cfg, total_steps=10)
  _, state_sharding = step.state_shardings(MODEL, optimizer, mesh, rules)
  params = _params()
  state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  shardings = step.batch_shardings(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fn = step.jit_train_step(step.make_train_step(transformer.RewardModel(MODEL), optimizer, LOSS,
                                                  **kwargs),
                             state_sharding, shardings, mesh)
    new_state, metrics = fn(jax.device_put(state, state_sharding), jax.device_put(batch, shardings))
  return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.mark.slow
def test_packed_train_step_equals_one_pair_a_row_on_a_mesh_with_microbatches():
  arrays = _pairs(n=8, seed=3)
  ref_params, ref_metrics = _one_step(packing.pair_rows(arrays, 16, PAD), (1, 1, 1))
  packed = packing.pack_pairs(arrays, row_len=32, max_pairs_per_row=2, pad_id=PAD,
                              shape=packing.PackedShape(8, 32, 4, 16, 32))
  assert packed.left_over.size == 0
  params, metrics = _one_step(packed.batch, (2, 2, 2), microbatches=2)
  for key in ("loss", "bt_loss", "lm_loss", "grad_norm", "accuracy", "chosen_reward_std"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)
