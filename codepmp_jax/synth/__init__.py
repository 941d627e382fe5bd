"""Code-preference pair synthesis (`python -m codepmp_jax.synth`).

corpus -> filters -> dedup -> decontaminate -> a strategy -> writer:
`mutate` (offline: real function vs one AST mutation; `mutate.py`, `mutate_strategy.py`) or
`llm` / `human_vs_weak` (the paper's describe + strong/weak answers; `llm_strategy.py` over
`backends.py`). `pipeline.py` runs the stages, `merge.py` checks and merges worker outputs,
`execution.py` runs tests in a sandboxed child process, `prompts.py` holds the paper's prompts.
"""
