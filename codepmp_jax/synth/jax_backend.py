"""A local synthesis backend: our own checkpoints generate, with the interface of `OpenAIBackend`.

For when no inference server is at hand: descriptions and responses come from a model converted
with `python -m codepmp_jax.convert` (e.g. DeepSeek-Coder from Hugging Face) and sampled by
`codepmp_jax.model.generate` on the local devices. Each prompt's random stream depends only on
the seed and the prompt text, so a rerun of a synthesis shard writes the same completions.
"""
from __future__ import annotations

import collections
import pathlib
import zlib
from collections.abc import Sequence

from codepmp_jax import checkpoint, sharding
from codepmp_jax.data.tokenizer import load_tokenizer
from codepmp_jax.model.generate import Generator, SamplingConfig


class JaxBackend:
  """`generate(prompts, *, temperature, top_p, max_tokens) -> list[str]` on a local Generator."""

  def __init__(self, generator: Generator, name: str, *, batch_size: int = 8, seed: int = 0,
               stop: Sequence[str] = (), add_bos: bool = False):
    if generator.tokenizer is None:
      raise ValueError("JaxBackend needs a Generator with a tokenizer")
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.generator, self.name = generator, name
    self.batch_size, self.seed, self.stop, self.add_bos = batch_size, seed, tuple(stop), add_bos
    self.stats: collections.Counter = collections.Counter()  # reported in the synth manifest

  def check(self) -> None:
    """Nothing to reach: the model is loaded already (the HTTP backend checks its server here)."""

  @classmethod
  def from_checkpoint(cls, path: str | pathlib.Path, *, mesh_shape: Sequence[int] = (-1, 1, 1),
                      **kwargs) -> "JaxBackend":
    """A backend on a model checkpoint (or training workdir) and the tokenizer stored with it."""
    params, config = checkpoint.load_model(path)
    tokenizer = load_tokenizer(pathlib.Path(path) / checkpoint.TOKENIZER)
    generator = Generator(params, config, tokenizer=tokenizer, mesh=sharding.make_mesh(mesh_shape))
    return cls(generator, f"jax:{pathlib.Path(path).name}", **kwargs)

  def generate(self, prompts: list[str], *, temperature: float, top_p: float,
               max_tokens: int) -> list[str]:
    """One completion per prompt, in the prompts' order (cut before any stop string)."""
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                              seed=self.seed, stop=self.stop)
    texts = []
    for i in range(0, len(prompts), self.batch_size):
      batch = prompts[i:i + self.batch_size]
      streams = [zlib.crc32(p.encode()) for p in batch]
      results = self.generator.generate_text(batch, sampling, streams, self.add_bos)
      texts.extend(completions[0].text for completions in results)
      self.stats["prompts"] += len(batch)
      self.stats.update(f"finish_{completions[0].finish_reason}" for completions in results)
    return texts
