"""Code-preference pair synthesis: `synthesize(SynthSettings)` in `synthesize.py`; the CLI is
`python -m codepmp_jax.synth`.

corpus -> filters -> dedup -> decontaminate -> a strategy -> writer:
`mutate` (offline: real function vs one AST mutation; `mutations.py`, `mutate_strategy.py`) or
`llm` / `human_vs_weak` (the paper's describe + strong/weak answers; `llm_strategy.py` over
`backends.py`). `workers.py` runs one worker's stages in a process pool, `dedup.py` removes
duplicates inside a worker and across workers, `merge.py` checks and merges worker outputs,
`execution.py` runs tests in a sandboxed child process, `prompts.py` holds the paper's prompts.
"""
