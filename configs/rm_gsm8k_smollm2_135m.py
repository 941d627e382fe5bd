"""RM fine-tuning of SmolLM2-135M on GSM8K pairs (reference vs a consistently wrong solution).

  python -m codepmp_jax.data.prepare --input=../shared/data/gsm8k/train.jsonl --format=gsm8k \
      --tokenizer=ckpt/smollm2 --seq_len=512 --out=prepared/gsm8k_smollm2
  python -m codepmp_jax.train --config=configs/rm_gsm8k_smollm2_135m.py --workdir=runs/rm_gsm8k \
      --config.init_from=runs/pmp_smollm2     # or ckpt/smollm2 for the no-PMP baseline
"""
from codepmp_jax.config import default_config, model_fields


def get_config(arg=None):
  del arg
  config = default_config()
  config.model = model_fields("smollm2_135m", remat_policy="dots_with_no_batch_dims")
  config.init_from = "runs/pmp_smollm2"
  config.data.path = "prepared/gsm8k_smollm2"
  config.loss.update(rm_coef=1.0, lm_coef=0.0)
  config.optimizer.update(lr=3e-6, schedule="wsd", warmup_ratio=0.03, decay_ratio=0.1,
                          weight_decay=0.1)
  config.train.update(global_batch=64, microbatches=4, seq_len=512, epochs=1.0,
                      log_every=10, eval_every=100, eval_batches=10)
  return config
