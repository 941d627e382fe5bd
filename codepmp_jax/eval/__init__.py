"""Evaluation of reward models: pairwise accuracy, Best-of-N with answer checking, multiple choice.

`python -m codepmp_jax.eval pairwise|bon|mc ... --out=REPORT.json`; see `__main__`.
"""
