"""The trainer records the prompt format its data is rendered in, model checkpoints carry it, and
train / plan end a user's mistake in one `error:` line (exit 2)."""
from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import pytest

from codepmp_jax import checkpoint, train
from codepmp_jax.config import default_config
from codepmp_jax.data import prepared, templates
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset
from tests.test_cli_errors import _one_error_line, _run  # the CLIs run as a user runs them

# A tiny synthetic run (as tests/test_train.py), so an error is the only thing that can stop it early.
SMALL = [
    "--config=configs/tiny.py", "--config.data.builtin.name=", "--config.data.source=synthetic",
    "--config.data.vocab_size=256", "--config.model.vocab_size=256", "--config.model.hidden_size=32",
    "--config.model.intermediate_size=64", "--config.model.num_layers=2", "--config.train.global_batch=8",
    "--config.train.seq_len=32", "--config.train.eval_every=0", "--config.mesh_shape=(-1,1,1)",
]


def _prepared(root: pathlib.Path, format: str, sources: list[str]) -> str:
  """A prepared directory's manifest (all `resolve_prompt_format` reads of it)."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "manifest.json").write_text(json.dumps(
      {"version": prepared.MANIFEST_VERSION, "format": format, "sources": [{"path": s} for s in sources]}))
  return str(root)


def test_prompt_format_follows_the_data(tmp_path):
  config = default_config()
  assert config.data.builtin.name == "" and config.data.source == "prepared"
  config.data.source = "synthetic"
  assert train.resolve_prompt_format(config) is None  # token ids: no template to record
  config.data.prompt_format = "logic"
  assert train.resolve_prompt_format(config) == "logic"
  config.data.prompt_format = "maths"
  with pytest.raises(ValueError, match=r"data.prompt_format='maths' is not one of"):
    train.resolve_prompt_format(config)

  config = default_config()
  config.data.builtin.name = "stdlib_mutate"
  assert train.resolve_prompt_format(config) == "code"  # synth renders its prompts with the code template
  config = default_config()
  for format, expected in (("gsm8k", "math"), ("logiqa2", "logic"), ("reclor", "logic"),
                           ("codepmp", "code"), ("trl", "chat")):
    config.data.path = _prepared(tmp_path / format, format, ["x.jsonl"])
    assert train.resolve_prompt_format(config) == expected, format
  config.data.prompt_format = "none"  # TRL standard (string) data: the texts as given
  assert train.resolve_prompt_format(config) == "none"

  # `pairs`: code when synth made them (its manifest beside the shards names the code template).
  config = default_config()
  synth_out = tmp_path / "synth"
  synth_out.mkdir()
  shard = str(synth_out / "train-00000.jsonl.gz")
  config.data.path = _prepared(tmp_path / "pairs_plain", "pairs", [shard])
  assert train.resolve_prompt_format(config) == "none"
  (synth_out / "manifest.json").write_text(json.dumps({"prompts": {"code": templates.TEMPLATES["code"]}}))
  config.data.path = _prepared(tmp_path / "pairs_synth", "pairs", [shard])
  assert train.resolve_prompt_format(config) == "code"
  config.data.path = _prepared(tmp_path / "pairs_mixed", "pairs", [shard, str(tmp_path / "other.jsonl")])
  assert train.resolve_prompt_format(config) == "none"


def test_save_model_carries_the_prompt_format(tmp_path):
  config = get_preset("tiny", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1)
  params = nn.unbox(transformer.init_params(config, jax.random.key(0)))
  plain = checkpoint.save_model(tmp_path / "plain", params, config)
  assert templates.load_prompt_format(plain) is None
  logic = checkpoint.save_model(tmp_path / "logic", params, config, prompt_format="logic")
  assert templates.load_prompt_format(logic) == "logic"
  assert json.loads((logic / templates.PROMPT_FORMAT_FILE).read_text())["chat_template"] == (
      templates.chat_template("logic"))
  with pytest.raises(ValueError, match="unknown prompt format 'maths'"):
    checkpoint.save_model(tmp_path / "bad", params, config, prompt_format="maths")


@pytest.mark.slow
def test_train_errors_are_one_line(tmp_path):
  workdir = f"--workdir={tmp_path / 'run'}"
  _one_error_line(_run("train", workdir, *SMALL, "--config.trian.total_steps=1"),
                  "--config.trian.total_steps=1", "no field 'trian'", 'Did you mean "train"')
  _one_error_line(_run("train", workdir, *SMALL, "--config.train.totl_steps=1"), "no field 'totl_steps'")
  missing = tmp_path / "no_such_checkpoint"
  _one_error_line(_run("train", workdir, *SMALL, f"--config.init_from={missing}"),
                  f"{missing}/model_config.json")
  assert not (tmp_path / "run").exists()  # stopped before anything was written
  _one_error_line(_run("train", workdir, "--config=configs/rm_gsm8k_smollm2_135m.py"),
                  "needs --config.init_from=CKPT")
  _one_error_line(_run("train", workdir, "--config=configs/no_such.py"),
                  "--config=configs/no_such.py: cannot load the config file", "No such file")
  _one_error_line(_run("train", *SMALL), "--workdir")
  verbose = _run("train", workdir, *SMALL, f"--config.init_from={missing}", "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_plan_errors_are_one_line():
  _one_error_line(_run("plan", "--config=configs/tiny.py", "--config.model.hiden_size=8"),
                  "no field 'hiden_size'")
  _one_error_line(_run("plan", "--config=configs/tiny.py:bogus"), "takes no argument")
  _one_error_line(_run("plan"), "--config")


def test_train_builds_no_data_and_names_the_command_that_does(tmp_path, monkeypatch):
  """A missing built-in data set at its home: the builder's command; another path: `prepare`."""
  from codepmp_jax.data import builtin
  monkeypatch.chdir(tmp_path)
  config = default_config()
  config.data.builtin.name = "stdlib_mutate"
  config.data.path = builtin.home("stdlib_mutate")
  with pytest.raises(ValueError, match=r"not built yet in data_cache/stdlib_mutate: build it with "
                                       r"`python -m codepmp_jax.data.builtin --config=configs/tiny.py`"):
    train.train(config, tmp_path / "run")
  assert not (tmp_path / "data_cache").exists()  # nothing built
  config.data.path = str(tmp_path / "mine")
  with pytest.raises(ValueError, match=r"is not prepared data \(no such directory; the built-in data "
                                       r"set stdlib_mutate is built only in data_cache/stdlib_mutate"):
    builtin.check_prepared(config.data)


@pytest.mark.slow
def test_the_builtin_command_builds_prepared_data_that_trains(tmp_path):
  home = tmp_path / "data_cache" / "stdlib_mutate"
  flags = ["--config=configs/tiny.py", f"--config.data.path={home}",
           "--config.data.builtin.max_pairs=300", "--config.data.builtin.vocab_size=1000"]
  built = _run("data.builtin", *flags)
  assert built.returncode == 0, built.stderr[-2000:]
  assert (home / "manifest.json").is_file() and "prepared data in" in built.stdout
  trained = _run("train", *flags[:2], f"--workdir={tmp_path / 'run'}",
                 "--config.train.total_steps=2", "--config.train.eval_every=0")
  assert trained.returncode == 0, trained.stderr[-2000:]
