"""The paper's LLM strategy with the local JAX generator as the backend (no server)."""
import flax.linen as nn
import jax

from codepmp_jax import checkpoint
from codepmp_jax.data.tokenizer import train_sentencepiece
from codepmp_jax.model import transformer
from codepmp_jax.model.config import get_preset
from codepmp_jax.synth.synthesize import SynthSettings, synthesize

CODE = '''def add_all(values):
    """Return the sum of the values, skipping None."""
    total = 0
    for value in values:
        if value is not None:
            total += value
    return total
'''


def test_llm_strategy_runs_on_local_checkpoints(tmp_path):
  corpus = tmp_path / "repo"
  corpus.mkdir()
  for i in range(3):
    (corpus / f"module_{i}.py").write_text(CODE.replace("add_all", f"add_all_{i}") * 3)
  tokenizer = train_sentencepiece([CODE * 20], 300, tmp_path / "spm")
  config = get_preset("tiny", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.pad_id)
  ckpt = checkpoint.save_model(
      tmp_path / "ckpt", nn.unbox(transformer.init_params(config, jax.random.key(0))), config, tokenizer)
  out = tmp_path / "pairs"
  manifest = synthesize(SynthSettings(
      source=(str(corpus),), strategy="llm", backend="jax", out=str(out), describe_model=str(ckpt),
      strong_model=str(ckpt), weak_model=str(ckpt), describe_max_tokens=8, respond_max_tokens=8,
      min_bytes=10, near_dup_threshold=1.0, decontam_sets=(), workers=1))
  assert manifest["complete"]
  # One checkpoint plays all three roles, so its requests are counted under one name: at least a
  # description per kept file, then answers for every description that was not empty.
  (stats,) = manifest["backend_requests"].values()
  assert stats["prompts"] >= 3
  # The same model and seed answer as strong and weak, so every pair is chosen == rejected and
  # dropped; each document is accounted for by exactly one reason.
  strategy = manifest["counts"]["strategy"]
  assert strategy["documents"] == 3 and manifest["counts"]["pairs_written"] == 0
  assert sum(v for k, v in strategy.items() if k not in ("documents", "pairs_cut_by_max_pairs")) == 3
