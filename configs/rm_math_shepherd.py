"""RM fine-tuning on Math-Shepherd pairs from a PMP checkpoint (BT loss only; DESIGN.md step 5).

  python -m codepmp_jax.data.prepare --input=math_shepherd.jsonl --format=math_shepherd \
      --tokenizer=runs/pmp_1_5b --seq_len=1024 --out=prepared/math_shepherd
  python -m codepmp_jax.train --config=configs/rm_math_shepherd.py --workdir=runs/rm_math \
      --config.init_from=runs/pmp_1_5b
Arg: a model preset for the shape (default qwen2_1_5b); the params come from init_from.
"""
from codepmp_jax.config import default_config, model_fields


def get_config(arg=None):
  config = default_config()
  config.model = model_fields(arg or "qwen2_1_5b", dtype="bfloat16", remat_policy="full",
                              scan_layers=True)
  config.data.path = "prepared/math_shepherd"
  config.loss.update(rm_coef=1.0, lm_coef=0.0)
  config.optimizer.update(lr=3e-7, schedule="wsd", warmup_ratio=0.03, decay_ratio=0.1,
                          weight_decay=0.1)
  config.train.update(global_batch=512, microbatches=8, seq_len=1024, epochs=1.0,
                      log_every=10, eval_every=200, eval_batches=20)
  return config
