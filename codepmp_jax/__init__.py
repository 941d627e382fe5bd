"""codepmp_jax: CodePMP reward-model pretraining on code-preference pairs, in JAX/Flax."""
