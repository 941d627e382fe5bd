"""RM fine-tuning of SmolLM2-135M on GSM8K pairs (reference vs a consistently wrong solution).

  python -m codepmp_jax.data.prepare --input=../shared/data/gsm8k/train.jsonl --format=gsm8k \
      --tokenizer=ckpt/smollm2 --seq_len=512 --out=prepared/gsm8k_smollm2
  python -m codepmp_jax.train --config=configs/rm_gsm8k_smollm2_135m.py --workdir=runs/rm_gsm8k \
      --config.init_from=runs/pmp_smollm2     # or ckpt/smollm2 for the no-PMP baseline
The released math recipe (`common.released_rm`) with lr 3e-6 for the small model.
"""
from codepmp_jax.config import model_fields
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  return common.released_rm(model_fields("smollm2_135m", **common.SMALL_NUMERICS),
                            "prepared/gsm8k_smollm2", lr=3e-6, warmup_ratio=0.03, global_batch=64,
                            microbatches=4, seq_len=512, eval_every=100,
                            eval_batches=10)
