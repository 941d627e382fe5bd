"""Every config file: whole (only default fields), its step compiles on its mesh, recipes as released."""
from __future__ import annotations

import pathlib

import ml_collections
import pytest

from codepmp_jax import plan
from codepmp_jax.config import default_config, load_config
from codepmp_jax.model.config import ModelConfig
from configs import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))
# The real-model configs take 10-20 s each to compile (the paper's 1.5B/7B ones, scanned with full
# remat at 1024 x 1024, the longest); the fast tier builds tiny and short_rm.
SLOW_TO_COMPILE = {"pmp_qwen2_1_5b", "pmp_qwen2_7b", "pmp_smollm2_135m", "rm_gsm8k_smollm2_135m", "rm_logic",
                   "rm_math_shepherd"}
RM_CONFIGS = ("rm_math_shepherd", "rm_logic:reclor", "rm_logic:logiqa2", "rm_gsm8k_smollm2_135m")


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  """Every dotted leaf key (a mistyped `config.train.update(globl_batch=...)` adds one)."""
  out = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out |= _keys(value, f"{prefix}{key}.")
    else:
      out.add(prefix + key)
  return out


@pytest.mark.parametrize("path", [
    pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW_TO_COMPILE else [])
    for p in CONFIGS])
def test_every_config_builds(path):
  """The config has exactly the default fields, and its train step compiles on 8 fake devices.

  `plan` lowers and compiles the real step from abstract shapes, so a batch that the microbatches
  or the mesh do not divide fails here. Two layers stand for the model's depth (scanned or not,
  the depth changes no shape of the batch or the mesh) to keep the compile short.
  """
  config = load_config(str(path))
  assert _keys(config) == _keys(default_config())
  fields = config.model.to_dict()
  fields["vocab_size"] = fields["vocab_size"] or 1000
  fields["num_layers"] = min(fields["num_layers"], 2)
  result = plan.plan(config, ModelConfig.from_dict(fields))
  assert result.devices == 8
  assert result.temp_bytes > 0 and result.params_bytes > 0


def test_a_batch_the_microbatches_do_not_divide_fails_to_build():
  """16 pairs (one a row) shard over the 8 devices, so the step's own check is the one that
  refuses 3 microbatches."""
  config = load_config("tiny")
  config.train.update(global_batch=16, microbatches=3)
  fields = config.model.to_dict()
  fields["vocab_size"] = 1000
  with pytest.raises(ValueError, match=r"batch of 16 rows does not split into 3 microbatches"):
    plan.plan(config, ModelConfig.from_dict(fields))


@pytest.mark.parametrize("name", RM_CONFIGS)
def test_rm_configs_carry_the_released_hyperparameters(name):
  """FAMOR-FY/CodePMP's fine-tuning: cosine, weight decay 0, clipping 1.0, one epoch, BT only."""
  config = load_config(name)
  assert config.optimizer.schedule == "cosine"
  assert config.optimizer.weight_decay == 0.0
  assert config.optimizer.grad_clip == 1.0
  assert config.train.epochs == 1.0 and config.train.total_steps == 0
  assert (config.loss.rm_coef, config.loss.lm_coef) == (1.0, 0.0)
  assert config.data.bucket
  assert config.init_from is None  # required: --config.init_from=CKPT or =scratch
  config.init_from = "runs/pmp"  # the placeholder takes a string from the command line
  expected = {"rm_math_shepherd": (3e-7, 0.03), "rm_logic:reclor": (3e-6, 0.25),
              "rm_logic:logiqa2": (3e-6, 0.25), "rm_gsm8k_smollm2_135m": (3e-6, 0.03)}[name]
  assert (config.optimizer.lr, config.optimizer.warmup_ratio) == expected


@pytest.mark.parametrize("name", ("pmp_qwen2_1_5b", "pmp_qwen2_7b", "pmp_smollm2_135m"))
def test_pmp_configs_as_published_and_bucketed(name):
  config = load_config(name)
  assert (config.loss.rm_coef, config.loss.lm_coef) == (1.0, 1.0)
  assert config.optimizer.schedule == "wsd"
  assert (config.optimizer.warmup_ratio, config.optimizer.decay_ratio) == (0.03, 0.1)
  assert config.optimizer.weight_decay == 0.1
  assert config.data.bucket


def test_parse_arg_one_way_for_every_config():
  arg = common.parse_arg("preset=qwen2_7b,runlocal", preset="qwen2_1_5b", runlocal=False, steps=3)
  assert (arg.preset, arg.runlocal, arg.steps) == ("qwen2_7b", True, 3)
  assert common.parse_arg("qwen2_7b", preset="x", runlocal=False).preset == "qwen2_7b"
  assert common.parse_arg("runlocal", preset="x", runlocal=False).runlocal is True
  assert common.parse_arg("runlocal=false,steps=7", runlocal=True, steps=1).to_dict() == {
      "runlocal": False, "steps": 7}
  assert common.parse_arg(None, lr=1e-3).lr == 1e-3
  with pytest.raises(ValueError, match="unknown config argument.*'stpes'"):
    common.parse_arg("stpes=3", steps=1)
  with pytest.raises(ValueError, match="takes no argument"):
    common.parse_arg("qwen2_7b")
  with pytest.raises(ValueError, match="boolean"):
    common.parse_arg("runlocal=maybe", runlocal=False)
  config = load_config("rm_logic:dataset=reclor,preset=qwen2_7b")
  assert config.model.hidden_size == load_config("pmp_qwen2_7b").model.hidden_size
  assert config.data.path == "prepared/reclor"
  with pytest.raises(ValueError, match="dataset 'race' is not one of"):
    load_config("rm_logic:race")
  with pytest.raises(ValueError, match="takes no argument"):
    load_config("tiny:qwen2_7b")


def test_short_rm_is_the_demo_fine_tuning_of_the_tiny_model():
  """The demo's RM recipe, field by field as it was (`recipes.rm_config` before the move)."""
  config = load_config("short_rm:base=tiny,steps=80,lr=0.001")
  tiny = load_config("tiny")
  assert config.model.to_dict() == tiny.model.to_dict()
  assert config.data.builtin.name == ""
  assert (config.loss.rm_coef, config.loss.lm_coef) == (1.0, 0.0)
  assert config.optimizer.to_dict() == {**tiny.optimizer.to_dict(), "lr": 1e-3, "schedule": "wsd",
                                        "warmup_ratio": 0.1, "decay_ratio": 0.2}
  assert config.train.to_dict() == {**tiny.train.to_dict(), "total_steps": 80, "log_every": 8,
                                    "eval_every": 80, "eval_batches": 4}
  assert (config.checkpoint.save_every, config.checkpoint.keep) == (80, 1)
