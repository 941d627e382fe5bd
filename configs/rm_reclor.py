"""RM fine-tuning on ReClor pairs (gold option vs each wrong one), from a PMP checkpoint.

  python -m codepmp_jax.data.prepare --input=reclor/train.json --format=reclor \
      --tokenizer=runs/pmp_1_5b --seq_len=1024 --out=prepared/reclor
  python -m codepmp_jax.train --config=configs/rm_reclor.py --workdir=runs/rm_reclor \
      --config.init_from=runs/pmp_1_5b
"""
from codepmp_jax.config import default_config, model_fields


def get_config(arg=None):
  config = default_config()
  config.model = model_fields(arg or "qwen2_1_5b", dtype="bfloat16", remat_policy="full",
                              scan_layers=True)
  config.data.path = "prepared/reclor"
  config.loss.update(rm_coef=1.0, lm_coef=0.0)
  config.optimizer.update(lr=3e-6, schedule="wsd", warmup_ratio=0.25, decay_ratio=0.1,
                          weight_decay=0.1)
  config.train.update(global_batch=128, microbatches=4, seq_len=1024, epochs=1.0,
                      log_every=10, eval_every=50, eval_batches=20)
  return config
