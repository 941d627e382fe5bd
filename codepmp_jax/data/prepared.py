"""Prepared data on disk: a TFDS dataset directory of ArrayRecord shards, plus a sidecar of pair sizes.

`python -m codepmp_jax.data.prepare` writes one directory that the JAX data stack opens as it is:

  dataset_info.json, features.json           TFDS metadata (`tfds.builder_from_directory(dir)`)
  codepmp_pairs-<split>.array_record-<i>-of-<K>  the records (TFDS's shard names), one per pair:
      tokens          int32 [chosen + rejected]  the chosen sequence's ids, then the rejected one's
      lengths         int32 [2]                  tokens of the chosen and the rejected sequence
      response_start  int32 [2]                  where each sequence's response begins
      margin          float32                    the pair's margin (0 when the data has none)
      shared_prompt   int32                      the tokens both sequences begin with (packing
                                                 lays them out once, `packing.pair_sizes`)
  sizes/<split>-<i>-of-<K>.npy              `SIZES_DTYPE` per pair of that shard, in record order:
                                            the fields above but tokens and margin, so batching and
                                            packing plan whole epochs without reading a record
  manifest.json                             counts, bad records, truncation, tokenizer (prepare.py)

Read it with TFDS (`tfds.builder_from_directory(dir).as_data_source("train")`), with Grain
(`grain.sources.ArrayRecordDataSource(shard_paths(dir, manifest, "train"))` and `decode`), or
through `PreparedSplit`, which the training input pipeline uses. Records are serialized by TFDS's
own feature encoder, without TensorFlow; reading needs neither TensorFlow nor a TFDS builder.
Local and `gs://` directories read the same way (paths through `etils.epath`).
"""
from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from codepmp_jax.data.encode import PairArrays

MANIFEST = "manifest.json"
MANIFEST_VERSION = 4  # 4: a TFDS dataset of ArrayRecord shards
DATASET_NAME = "codepmp_pairs"
FILE_FORMAT = "array_record"
SIZES_DIR = "sizes"
SIZES_DTYPE = np.dtype([("lengths", "<i4", (2,)), ("response_start", "<i4", (2,)),
                        ("shared_prompt", "<i4")])
# ArrayRecord options: one record per chunk group keeps random reads to one record's bytes.
WRITER_OPTIONS = "group_size:1"


def features():
  """The TFDS feature spec of one record (see the module docstring)."""
  import tensorflow_datasets as tfds  # pure Python; it imports TensorFlow only when asked to
  return tfds.features.FeaturesDict({
      "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "lengths": tfds.features.Tensor(shape=(2,), dtype=np.int32),
      "response_start": tfds.features.Tensor(shape=(2,), dtype=np.int32),
      "margin": tfds.features.Scalar(dtype=np.float32),
      "shared_prompt": tfds.features.Scalar(dtype=np.int32),
  })


def shard_stem(split: str, index: int, count: int) -> str:
  """`<split>-<i>-of-<K>`: the name prepare tracks a shard by (its stats, its sizes file)."""
  return f"{split}-{index:05d}-of-{count:05d}"


def shard_file(split: str, index: int, count: int) -> str:
  """The shard's records, named as TFDS names ArrayRecord shards."""
  return f"{DATASET_NAME}-{split}.{FILE_FORMAT}-{index:05d}-of-{count:05d}"


def sizes_file(split: str, index: int, count: int) -> str:
  return f"{SIZES_DIR}/{shard_stem(split, index, count)}.npy"


def sizes_of(arrays: PairArrays) -> np.ndarray:
  rows = np.zeros(len(arrays), SIZES_DTYPE)
  rows["lengths"] = arrays.lengths
  rows["response_start"] = arrays.response_start
  rows["shared_prompt"] = arrays.shared_prompt()
  return rows


def serialize(arrays: PairArrays, feature_spec=None) -> list[bytes]:
  """One TFDS-serialized record per pair of `arrays`, its feature map in sorted key order
  (`deterministic=True`; TFDS's own `serialize_example` leaves the order to the process), so the
  same pairs give the same bytes in every process: a shard kept from a killed run and one written
  by its rerun, or two runs' shard sha256s, agree."""
  from tensorflow_datasets.core import example_serializer
  spec = feature_spec or features()
  serializer = example_serializer.ExampleSerializer(spec.get_serialized_info())
  shared = arrays.shared_prompt()
  return [serializer.get_tf_example(spec.encode_example({
      "tokens": np.concatenate([arrays.sequence(i, 0), arrays.sequence(i, 1)]).astype(np.int32),
      "lengths": arrays.lengths[i].astype(np.int32),
      "response_start": arrays.response_start[i].astype(np.int32),
      "margin": np.float32(arrays.margin[i]),
      "shared_prompt": np.int32(shared[i])})).SerializeToString(deterministic=True)
      for i in range(len(arrays))]


@functools.cache
def _example_proto():
  """TFDS's `tf.train.Example` proto class (no TensorFlow needed). `PreparedSplit` imports it
  before its loader threads start: two threads importing TFDS at once deadlock."""
  from tensorflow_datasets.proto import tf_example_pb2
  return tf_example_pb2.Example


def _parse(record: bytes) -> dict[str, Any]:
  """One serialized record's fields, read straight from the `tf.train.Example` proto TFDS writes
  for `features()` (int32 and scalar features as int64_list, margin as float_list): the arrays
  TFDS's generic `deserialize_example_np` gives, without its per-feature machinery (2.6x faster)."""
  feature = _example_proto().FromString(record).features.feature
  ints = lambda name: np.asarray(feature[name].int64_list.value, np.int32)  # noqa: E731
  return {"tokens": ints("tokens"), "lengths": ints("lengths"),
          "response_start": ints("response_start"),
          "margin": np.float32(feature["margin"].float_list.value[0])}


def decode(records: Sequence[bytes | Mapping]) -> PairArrays:
  """`PairArrays` of serialized records (or of records TFDS already decoded), in order."""
  examples = [r if isinstance(r, Mapping) else _parse(r) for r in records]
  if not examples:
    return PairArrays.from_lengths(np.zeros(0, np.int32), np.zeros((0, 2), np.int32),
                                   np.zeros((0, 2), np.int32), np.zeros(0, np.float32))
  return PairArrays.from_lengths(
      np.concatenate([e["tokens"] for e in examples]).astype(np.int32),
      np.stack([e["lengths"] for e in examples]), np.stack([e["response_start"] for e in examples]),
      np.asarray([e["margin"] for e in examples], np.float32))


def write_records(path: str, records: Sequence[bytes]) -> None:
  """An ArrayRecord file of `records` (a local path: prepare stages shards locally)."""
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
  try:
    for record in records:
      writer.write(record)
  finally:
    writer.close()


def write_tfds_metadata(directory: epath.Path, split_shards: Mapping[str, Sequence[int]],
                        description: str) -> None:
  """`dataset_info.json` and `features.json` for splits of shards with these pair counts, so
  that `tfds.builder_from_directory(directory)` opens the prepared data."""
  import tensorflow_datasets as tfds
  template = tfds.core.ShardedFileTemplate(data_dir=directory, dataset_name=DATASET_NAME,
                                           filetype_suffix=FILE_FORMAT)
  infos = [tfds.core.SplitInfo(name=split, shard_lengths=[int(n) for n in lengths], num_bytes=0,
                               filename_template=template.replace(split=split))
           for split, lengths in split_shards.items()]
  tfds.folder_dataset.write_metadata(data_dir=directory, features=features(), split_infos=infos,
                                     filename_template=template, check_data=False,
                                     description=description)


def read_manifest(directory: str | os.PathLike) -> dict:
  """The manifest of a prepared directory; an error says what to run when there is none, or when
  it was written by an older version of `prepare`."""
  path = epath.Path(directory) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(f"{directory}: no {MANIFEST}, so this is not prepared data; run "
                            f"python -m codepmp_jax.data.prepare --out={directory} ...")
  manifest = json.loads(path.read_text())
  if manifest.get("version") != MANIFEST_VERSION:
    raise ValueError(f"{directory} was prepared in format version {manifest.get('version')}, this "
                     f"version reads {MANIFEST_VERSION} (TFDS ArrayRecord); prepare the data again")
  return manifest


def check_tokenizer(directory: str | os.PathLike, fingerprint: str) -> None:
  """Refuse data prepared with a different tokenizer than the one a run uses."""
  used = read_manifest(directory)["tokenizer"]["fingerprint"]
  if used != fingerprint:
    raise ValueError(f"{directory} was prepared with tokenizer {used[:12]}, but this run uses "
                     f"{fingerprint[:12]}; prepare the data again with the run's tokenizer")


def shard_paths(directory: epath.Path | str, manifest: Mapping, split: str) -> list[str]:
  """The split's ArrayRecord files, in the order their records are numbered."""
  return [str(epath.Path(directory) / s["file"]) for s in manifest["splits"][split]["shards"]]


class PreparedSplit:
  """One split of a prepared directory: pair sizes in memory (20 bytes a pair), records read on
  demand through Grain's ArrayRecord source, one per shard, opened when a pair of that shard is
  first read (a global index numbers the split's shards' records in manifest order), so a process
  opens only the shards of its own read groups (and copies only those from a remote directory:
  `_open`)."""

  def __init__(self, directory: epath.Path | str, manifest: Mapping, split: str):
    self.directory = epath.Path(directory)
    if split not in manifest["splits"]:
      raise ValueError(f"{directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
    self._shards = manifest["splits"][split]["shards"]
    parts = []
    for shard in self._shards:
      path = self.directory / shard["sizes"]
      with path.open("rb") as f:
        sizes = np.load(f)
      if sizes.dtype != SIZES_DTYPE or len(sizes) != shard["pairs"]:
        raise ValueError(f"{path}: {len(sizes)} rows of {sizes.dtype}, the manifest says "
                         f"{shard['pairs']} of {SIZES_DTYPE}; prepare the data again")
      parts.append(sizes)
    self.sizes = np.concatenate(parts) if parts else np.zeros(0, SIZES_DTYPE)
    self.num_pairs = len(self.sizes)
    self.pad_id = int(manifest["tokenizer"]["pad_id"])
    self._paths = shard_paths(directory, manifest, split)
    self._ends = np.cumsum([shard["pairs"] for shard in self._shards], dtype=np.int64)
    self._readers: dict[int, Any] = {}
    self._lock = threading.Lock()  # loader threads read concurrently
    _example_proto()  # imported here, not on first read by a loader thread

  @property
  def opened(self) -> list[str]:
    """The shard files read so far, in shard order."""
    return [self._paths[shard] for shard in sorted(self._readers)]

  def _reader(self, shard: int):
    with self._lock:
      if shard not in self._readers:
        self._readers[shard] = self._open(shard)
      return self._readers[shard]

  def _open(self, shard: int):
    """The reader of one shard. ArrayRecord's reader opens local files only, so a shard in a remote
    directory (`gs://`) is first copied to the local cache (`<cache>/prepared/<its sha256>/`, the
    cache being `$CODEPMP_CACHE` or ~/.cache/codepmp_jax), once per machine: a process copies
    only the shards it reads, and a directory prepared again (other content) is copied anew."""
    import grain
    from codepmp_jax import storage
    from codepmp_jax.data import registry
    local = storage.local_copy(self._paths[shard], registry.cache_dir() / "prepared",
                               key=self._shards[shard]["sha256"][:32])
    reader = grain.sources.ArrayRecordDataSource([str(local)])
    if len(reader) != self._shards[shard]["pairs"]:
      raise ValueError(f"{self._paths[shard]}: {len(reader)} records, the manifest says "
                       f"{self._shards[shard]['pairs']}; prepare the data again")
    return reader

  def take(self, indices: np.ndarray) -> PairArrays:
    """Pairs `indices` (global within the split) in the given order."""
    indices = np.asarray(indices, np.int64)
    shard_of = np.searchsorted(self._ends, indices, "right")
    records: list[bytes] = [b""] * len(indices)
    for shard in np.unique(shard_of):
      where = np.flatnonzero(shard_of == shard)
      first = int(self._ends[shard] - self._shards[shard]["pairs"])
      got = self._reader(int(shard)).__getitems__([int(i) - first for i in indices[where]])
      for position, record in zip(where, got):
        records[position] = record
    return decode(records)
