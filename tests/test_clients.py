"""Our reward models in other software: a checkpoint exported by `convert --to_hf` is scored by
transformers exactly as by `score`, its chat template renders the training text, and TRL's
RewardTrainer fine-tunes it on TRL-format data."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import sysconfig

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from codepmp_jax import checkpoint
from codepmp_jax.data import loaders, templates
from codepmp_jax.data.records import BadRecords
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset
from codepmp_jax.score import RewardScorer

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_data):
  """A tiny math RM (code tokenizer, a trained-like score head) saved as ours and exported by the CLI."""
  tmp = tmp_path_factory.mktemp("clients")
  files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))
  tok = train_sentencepiece(files, vocab_size=400, out_prefix=tmp / "sp")
  config = get_preset("tiny", vocab_size=400, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  params = nn.unbox(transformer.init_params(config, jax.random.key(0)))
  head = np.random.default_rng(1).normal(0, 3.0, params["score"]["kernel"].shape).astype(np.float32)
  params["score"]["kernel"] = head  # rewards spread well beyond the tolerance (an initial head is ~0)
  ckpt = checkpoint.save_model(tmp / "ckpt", params, config, tok)
  templates.save_prompt_format(ckpt, "math")
  out = tmp / "hf"
  subprocess.run([sys.executable, "-m", "codepmp_jax.convert", f"--to_hf={out}", f"--checkpoint={ckpt}"],
                 cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
  bad = BadRecords()
  records = list(loaders.load_records([shared_data / "gsm8k" / "test.jsonl"], "gsm8k", bad))[:4]
  return ckpt, out, records


def _messages(question: str, reply: str) -> list[dict]:
  return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def test_chat_template_renders_the_training_text(exported, shared_data):
  _, out, records = exported
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]]
  for row, record in zip(rows, records):
    text = hf_tok.apply_chat_template(_messages(row["question"], record.chosen), tokenize=False)
    assert text == record.prompt + record.chosen + hf_tok.eos_token
    prompt = hf_tok.apply_chat_template(_messages(row["question"], "")[:1], tokenize=False,
                                        add_generation_prompt=True)
    assert prompt == record.prompt
  with pytest.raises(Exception, match="one user message"):
    hf_tok.apply_chat_template([{"role": "system", "content": "x"}] + _messages("q", "a"), tokenize=False)
  assert templates.load_prompt_format(out) == "math"
  # transformers 4.x (RewardBench pins 4.51) would otherwise add token_type_ids, which Llama rejects
  assert json.loads((out / "tokenizer_config.json").read_text())["model_input_names"] == ["input_ids", "attention_mask"]
  assert set(hf_tok("x").keys()) == {"input_ids", "attention_mask"}
  card = (out / "README.md").read_text()
  assert "Instruction:QUESTION\n\nResponse:" in card and "apply_chat_template" in card


@pytest.mark.slow
def test_transformers_scores_like_ours_one_by_one_and_batched(exported, shared_data):
  ckpt, out, records = exported
  scorer = RewardScorer(ckpt, batch_size=4, show_progress=False)
  texts = [(r.prompt, side) for r in records for side in (r.chosen, r.rejected)]
  ours = scorer.score_texts([p for p, _ in texts], [s for _, s in texts])
  assert ours.std() > 0.05
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
  rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]]
  conversations = [_messages(row["question"], side) for row, r in zip(rows, records)
                   for side in (r.chosen, r.rejected)]
  with torch.no_grad():
    single = []
    for (prompt, response), conversation in zip(texts, conversations):
      ids = hf_tok.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
      assert ids["input_ids"][0].tolist() == list(scorer.encode(prompt, response).ids)
      single.append(model(**ids).logits[0, 0].item())
    full = [p + s + hf_tok.eos_token for p, s in texts]
    batch = hf_tok(full, padding=True, return_tensors="pt", add_special_tokens=False)
    assert hf_tok.padding_side == "right" and batch["attention_mask"].sum(1).min() < batch["input_ids"].shape[1]
    batched = model(**batch).logits[:, 0].numpy()
  np.testing.assert_allclose(single, ours, atol=1e-4)
  np.testing.assert_allclose(batched, ours, atol=1e-4)


def test_trl_reward_trainer_fine_tunes_the_export(exported, tmp_path):
  import datasets  # pinned in requirements-test.txt: missing, the test fails (imported here, being slow)
  import trl
  _, out, records = exported
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
  before = model.score.weight.detach().clone()
  rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
           "chosen": [{"role": "assistant", "content": f" {2 * i}"}],
           "rejected": [{"role": "assistant", "content": f" {2 * i + 1}"}]} for i in range(8)]
  args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), max_steps=3, per_device_train_batch_size=4,
                          learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                          logging_steps=1, dataloader_num_workers=0, dataset_num_proc=None)
  trainer = trl.RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=hf_tok)
  first = trainer.train_dataset[0]
  text = templates.render("math", question="What is 0 + 0?") + " 0"
  assert hf_tok.decode(first["chosen_ids"]) == text + hf_tok.eos_token  # TRL sees our training text
  result = trainer.train()
  assert result.global_step == 3 and np.isfinite(result.training_loss)
  assert not torch.equal(before, model.score.weight.detach())


@pytest.mark.slow
def test_trl_example_script_trains_and_saves(exported, tmp_path):
  _, out, _ = exported
  run = subprocess.run([sys.executable, "launch/examples/trl_reward_trainer.py", f"--model={out}",
                        f"--output_dir={tmp_path / 'trl'}", "--max_steps=2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  assert "TRL's text of the first pair: 'Instruction:What is 0 + 0?\\n\\nResponse: 0</s>'" in run.stdout
  trained = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "trl", dtype=torch.float32)
  before = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
  assert not torch.equal(trained.score.weight, before.score.weight)
