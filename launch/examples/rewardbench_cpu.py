"""RewardBench's `rewardbench` command on a machine without CUDA.

rewardbench 0.1.4 moves every batch to "cuda" (`rewardbench/models/pipeline.py`), so its CLI stops
on CPU with "Torch not compiled with CUDA enabled". This runs the CLI unchanged, with the same
flags, except that those batches go to the model's device:

  python launch/examples/rewardbench_cpu.py --model=hf/my_rm --dataset=pairs.jsonl --load_json \
      --not_quantized --torch_dtype=float32

Run it in RewardBench's own environment (it pins transformers==4.51.0); on a GPU use `rewardbench`.
"""
import functools

import torch
import transformers
from rewardbench.models.pipeline import RewardBenchPipeline
from rewardbench.rewardbench import main


def _on_model_device(call):
  """Wraps RewardBenchPipeline.__call__ so its `.to("cuda")` moves the batch to the model's device."""
  @functools.wraps(call)
  def wrapped(self, *args, **kwargs):
    to = transformers.BatchEncoding.to
    transformers.BatchEncoding.to = lambda batch, device, **kw: to(
        batch, self.model.device if device == "cuda" else device, **kw)
    try:
      return call(self, *args, **kwargs)
    finally:
      transformers.BatchEncoding.to = to
  return wrapped


if __name__ == "__main__":
  if not torch.cuda.is_available():
    RewardBenchPipeline.__call__ = _on_model_device(RewardBenchPipeline.__call__)
  main()
