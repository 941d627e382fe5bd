"""codepmp_jax: CodePMP reward-model pretraining on code-preference pairs, in JAX/Flax."""
import os as _os
import sys as _sys

# Quiet TensorFlow/XLA C++ start-up logs (oneDNN notices, CPU feature lines) before anything heavy
# is imported; `--verbose` on a command line (codepmp_jax.cli) or the variables set by hand keep them.
if "--verbose" not in _sys.argv:
  _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
