"""CodePMP pretraining of Qwen2-1.5B (the paper's setup; DESIGN.md "PMP").

Needs a converted checkpoint and prepared code pairs:
  python -m codepmp_jax.convert --from_hf=Qwen2-1.5B --output=ckpt/qwen2_1_5b
  python -m codepmp_jax.data.prepare --input='pairs/*.jsonl.gz' --format=pairs \
      --tokenizer=ckpt/qwen2_1_5b --seq_len=1024 --out=prepared/codepmp
  python -m codepmp_jax.train --config=configs/pmp_qwen2_1_5b.py --workdir=runs/pmp_1_5b \
      --config.init_from=ckpt/qwen2_1_5b --config.data.path=prepared/codepmp
"""
from codepmp_jax.config import default_config, model_fields


def get_config(arg=None):
  del arg
  config = default_config()
  config.model = model_fields("qwen2_1_5b", dtype="bfloat16", remat_policy="full", scan_layers=True)
  config.data.path = "prepared/codepmp"
  config.loss.update(rm_coef=1.0, lm_coef=1.0)
  config.optimizer.update(lr=1e-6, schedule="wsd", warmup_ratio=0.03, decay_ratio=0.1,
                          weight_decay=0.1)
  config.train.update(global_batch=1024, microbatches=8, seq_len=1024, epochs=1.0,
                      log_every=10, eval_every=500, eval_batches=20)
  config.mesh_shape = (1, -1, 1)
  config.checkpoint.save_every = 1000
  return config
