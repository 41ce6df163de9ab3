"""Prompt sources on seqio Tasks / Mixtures and TFDS datasets (the `seqio` extra).

    initial_prompts.source = "seqio"
    seqio_prompts.task = "my_task"              # a registered seqio Task or Mixture
    seqio_prompts.modules = ["my_project.tasks"]  # imported first: they register it
    seqio_prompts.split = "train"
    seqio_prompts.feature = "inputs"
    seqio_prompts.heldout_split = "validation"  # or heldout_fraction / heldout_count, or
                                                # heldout_paths (prompt files: load_prompts)

    initial_prompts.source = "tfds"
    tfds_prompts.name = "my_dataset"            # NAME, NAME/CONFIG, NAME:VERSION
    tfds_prompts.split = "train[:5000]"         # TFDS split syntax, slices included
    tfds_prompts.feature = "question"           # nested features as "a/b"
    tfds_prompts.data_dir = "gs://bucket/tfds"
    tfds_prompts.heldout_split = "test"

A feature holds text (bytes are decoded as UTF-8), or chat messages (a sequence of
{"role", "content"}: the last user turn is the prompt, as in prompt files). A seqio feature
that holds token ids is read from its "<feature>_pretokenized" copy (what
`seqio.preprocessors.tokenize` keeps), or else decoded with the task's output-feature
vocabulary; TFDS token ids are refused. The prompts then go through `PromptCollector`, as
file prompts do: empty ones, duplicates and ones longer than `max_prompt_tokens` are dropped
and counted, and `limit` stops the read.

Multi-process: process 0 reads the whole split (in order: no shuffling, no sharding, seqio's
preprocessors seeded with `seed`) and broadcasts the prompts, so every JAX process holds the
same list; the other processes never import TensorFlow. An error on process 0 is raised on
every process.

Nothing here imports TensorFlow, seqio or tensorflow_datasets until a source reads: importing
eva_jax.data registers "seqio" and "tfds" without them; reading without them raises an
ImportError that says `pip install "eva-jax[seqio]"`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import pickle
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import gin
import numpy as np

from eva_jax.data.prompts import (PathLike, PromptCollector, PromptFileError, PromptSet,
                                  _metadata_of, _prompt_of, check_prompt_limits, load_prompts,
                                  split_prompt_set)
from eva_jax.data.sources import PROMPT_SOURCES
from eva_jax.models.tokenizer import Tokenizer, get_tokenizer

INSTALL_HINT = 'pip install "eva-jax[seqio]"'


class PromptSourceError(PromptFileError):
  """A seqio Task / Mixture or a TFDS dataset cannot be read as prompts."""


# --------------------------------------------------------------------------------------------
# Imports, only when reading


def _require(who: str, *names: str) -> list[Any]:
  """Imports `names` (TensorFlow first); a missing one raises the install hint."""
  mods = []
  for name in names:
    try:
      mods.append(importlib.import_module(name))
    except ImportError as e:
      raise ImportError(f"{who}: reading prompts with {' and '.join(names[1:])} needs {name}, "
                        f"which is not installed ({e}). Install the seqio extra: "
                        f"{INSTALL_HINT}") from e
    if name == "tensorflow":
      _hide_accelerators(mods[-1])
  return mods


def _hide_accelerators(tf: Any) -> None:
  """TensorFlow only reads data here: keep it off the GPUs / TPUs, which belong to JAX (TF
  would otherwise reserve most of a GPU's memory)."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device kind
      pass


def _import_modules(who: str, modules: Sequence[str]) -> None:
  for m in modules:
    try:
      importlib.import_module(m)
    except ImportError as e:
      raise ImportError(f"{who}: cannot import {m!r} (named in {who}.modules to register "
                        f"tasks / datasets): {e}") from e


@contextlib.contextmanager
def _tf_errors(tf: Any, who: str, what: str) -> Iterator[None]:
  """TensorFlow's own errors while reading (a missing or unreadable file, a failing
  preprocessor) as a `PromptSourceError` naming what was read."""
  try:
    yield
  except tf.errors.OpError as e:
    raise PromptSourceError(f"{who}: reading {what} failed: {type(e).__name__}: "
                            f"{e.message.strip()}") from e


def _on_process0(fn: Callable[[], PromptSet]) -> PromptSet:
  """`fn()` on process 0, its result on every process (`parallel.run_on_process0`); an error
  that would not survive the broadcast (unpicklable) is raised as a `PromptSourceError`."""
  import jax  # pylint: disable=import-outside-toplevel
  from eva_jax import parallel  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return fn()

  def guarded():
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      try:
        pickle.loads(pickle.dumps(e))
      except Exception:  # pylint: disable=broad-except
        raise PromptSourceError(f"{type(e).__name__}: {e}") from e
      raise
  return parallel.run_on_process0(guarded)


# --------------------------------------------------------------------------------------------
# One example -> (text, context)


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested dicts -> {"a/b": leaf}; a nested dict is also kept under its own path."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    path = f"{prefix}{k}"
    out[path] = v
    if isinstance(v, Mapping):
      out.update(_flatten(v, path + "/"))
  return out


def _is_text(spec: Any, tf: Any, rank: int) -> bool:
  return (isinstance(spec, tf.TensorSpec) and spec.dtype == tf.string and
          spec.shape.rank == rank)


def _is_ids(spec: Any, tf: Any) -> bool:
  return (isinstance(spec, tf.TensorSpec) and spec.dtype.is_integer and
          spec.shape.rank == 1)


def _describe(spec: Any) -> str:
  if isinstance(spec, Mapping):
    return f"a dict of {sorted(spec)}"
  shape = getattr(spec, "shape", None)
  dtype = getattr(getattr(spec, "dtype", None), "name", spec)
  known = shape is not None and shape.rank is not None
  return f"{dtype} of shape {list(shape) if known else '?'}"


def _text(value: Any, where: str, feature: str) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    try:
      return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise PromptSourceError(f"{where}: {feature!r} is not UTF-8 text ({e.reason} at byte "
                              f"{e.start}).") from None
  return str(value)


def _plain(value: Any, where: str, feature: str) -> Any:
  """A numpy value as JSON-able Python (bytes decoded), for metadata."""
  if isinstance(value, Mapping):
    return {k: _plain(v, where, f"{feature}/{k}") for k, v in value.items()}
  if isinstance(value, np.ndarray):
    return [_plain(v, where, feature) for v in value.tolist()] if value.ndim else _plain(
        value.item(), where, feature)
  if isinstance(value, list):
    return [_plain(v, where, feature) for v in value]
  if isinstance(value, (bytes, np.bytes_)):
    return _text(value, where, feature)
  if isinstance(value, np.generic):
    return value.item()
  return value


def _feature_reader(spec: Mapping, feature: str, *, tf: Any, who: str, what: str,
                    decode_ids: Optional[Callable[[list[int]], Any]] = None,
                    ids_hint: str = "") -> Callable[[Mapping, str], Any]:
  """A function from one (flattened) example to the prompt value under `feature`: a str, or
  a list of chat messages. Checks `feature` against the dataset's element spec up front."""
  flat = _flatten(spec)
  if feature not in flat:
    raise PromptSourceError(f"{who}: {what} has no feature {feature!r}; its features are "
                            f"{sorted(flat)}. Set {who}.feature (gin) to the one holding the "
                            "prompt (nested features as 'a/b').")
  fspec = flat[feature]
  if _is_text(fspec, tf, 0):
    return lambda ex, where: _text(ex[feature], where, feature)
  pre = f"{feature}_pretokenized"
  if _is_ids(fspec, tf) and _is_text(flat.get(pre), tf, 0):
    return lambda ex, where: _text(ex[pre], where, pre)
  if _is_ids(fspec, tf):
    if decode_ids is None:
      raise PromptSourceError(f"{who}: the feature {feature!r} of {what} holds token ids "
                              f"({_describe(fspec)}), not text, and {ids_hint}. Name a text "
                              f"feature in {who}.feature.")

    def from_ids(ex, where):
      ids = [int(i) for i in np.asarray(ex[feature]).reshape(-1)]
      try:
        return _text(decode_ids(ids), where, feature)
      except PromptSourceError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (a vocabulary's own error)
        raise PromptSourceError(f"{where}: cannot decode the token ids of {feature!r} with "
                                f"the task's vocabulary: {e}") from None
    return from_ids
  if (isinstance(fspec, Mapping) and _is_text(fspec.get("role"), tf, 1) and
      _is_text(fspec.get("content"), tf, 1)):
    def messages(ex, where):
      turns = ex[feature]
      roles, contents = np.asarray(turns["role"]).tolist(), np.asarray(turns["content"]).tolist()
      return [{"role": _text(r, where, f"{feature}/role"),
               "content": _text(c, where, f"{feature}/content")}
              for r, c in zip(roles, contents)]
    return messages
  raise PromptSourceError(f"{who}: the feature {feature!r} of {what} is {_describe(fspec)}; a "
                          "prompt feature holds one text (a string), chat messages (a "
                          "sequence of {'role', 'content'} strings)"
                          f"{', or token ids' if decode_ids is not None else ''}. Set "
                          f"{who}.feature (gin) to the one holding the prompt.")


def _check_metadata(spec: Mapping, keys: Sequence[str], who: str, what: str) -> None:
  flat = _flatten(spec)
  missing = [k for k in keys if k not in flat]
  if missing:
    raise PromptSourceError(f"{who}: {what} has no feature(s) {missing} (metadata_keys); its "
                            f"features are {sorted(flat)}. Check {who}.metadata_keys.")


def _collect(keep: PromptCollector, rows: Any, read: Callable[[Mapping, str], Any],
             feature: str, where_prefix: str) -> int:
  """Feeds numpy examples `rows` to `keep` until it is full; returns how many were read."""
  n = 0
  for n, ex in enumerate(rows, 1):
    flat = _flatten(ex)
    where = f"{where_prefix}:{n - 1}"
    value = read(flat, where)
    text, context = _prompt_of({feature: value}, feature, None, where)
    meta = {k: _plain(flat[k], where, k) for k in keep.metadata_keys}
    keep.add(where, text, context, _metadata_of(meta, keep.metadata_keys, where))
    if keep.full:
      break
  return n


# --------------------------------------------------------------------------------------------
# seqio


def _seqio_provider(seqio: Any, task: str, who: str) -> Any:
  try:
    return seqio.get_mixture_or_task(task)
  except ValueError as e:
    if "No Task or Mixture found" not in str(e):
      raise
    names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    close = difflib.get_close_matches(task, names, n=5)
    raise PromptSourceError(
        f"{who}: no seqio Task or Mixture named {task!r} is registered"
        f"{f' (close: {close})' if close else ''}. Import the module that registers it "
        f"({who}.modules = ['my_project.tasks'] in gin), or fix {who}.task.") from None


def _seqio_decoder(seqio: Any, task: Any, feature: str) -> tuple[Optional[Callable], str]:
  out = task.output_features.get(feature)
  if out is None:
    return None, "it is no output feature of the task (no vocabulary to decode them)"
  vocab = out.vocabulary
  if isinstance(vocab, seqio.PassThroughVocabulary):
    return None, (f"its vocabulary ({type(vocab).__name__}) cannot turn them into text, nor is "
                  f"there a '{feature}_pretokenized' copy")
  return vocab.decode, ""


def read_seqio_prompts(task: str, split: str = "train", feature: str = "inputs",
                       *, modules: Union[str, Sequence[str]] = (),
                       tokenizer: Union[None, str, Tokenizer] = None,
                       max_prompt_tokens: Optional[int] = None, drop_duplicates: bool = True,
                       limit: Optional[int] = None, metadata_keys: Sequence[str] = (),
                       seed: int = 0, who: str = "read_seqio_prompts") -> PromptSet:
  """Prompts from one split of a seqio Task or Mixture (see the module docstring).

  Args:
    task: the registered Task or Mixture name. A Mixture is read task by task, in its order
      (by name), whole: sampling rates do not apply, tasks at rate 0 are left out, and tasks
      without `split` are skipped.
    split: the split to read (`Task.splits`).
    feature: the feature holding the prompt after the task's preprocessors: text, chat
      messages, or token ids (read from "<feature>_pretokenized", else decoded with the
      output feature's vocabulary).
    modules: modules imported first (those that register the task).
    tokenizer, max_prompt_tokens, drop_duplicates, limit, metadata_keys: as `load_prompts`'
      (`metadata_keys` name features).
    seed: the seed of seqio's preprocessors (the same on every run).
    who: the name error messages give (the gin configurable the user set).

  Returns:
    A `PromptSet`; sources "seqio:TASK/SPLIT:N" (N: the example's index, 0-based), files
    ["seqio:TASK/SPLIT", ...] (per task of a Mixture).

  Raises:
    ImportError: seqio / TensorFlow not installed, or a module in `modules` not importable.
    PromptSourceError: unknown task or split, a missing or non-text feature, an empty split,
      no prompt left.
  """
  tok, modules, metadata_keys = _check_args(who, task, "task", split, feature, modules,
                                            tokenizer, max_prompt_tokens, limit,
                                            metadata_keys)

  def read() -> PromptSet:
    tf, seqio = _require(who, "tensorflow", "seqio")
    _import_modules(who, modules)
    provider = _seqio_provider(seqio, task, who)
    is_mixture = isinstance(provider, seqio.Mixture)
    kind = "Mixture" if is_mixture else "Task"
    tasks = [t for t in provider.tasks if provider.get_rate(t) > 0] if is_mixture else [provider]
    with_split = [t for t in tasks if split in t.splits]
    if not with_split:
      splits = sorted({s for t in tasks for s in t.splits})
      raise PromptSourceError(f"{who}: the seqio {kind} {task!r} has no split {split!r}; its "
                              f"splits are {splits}. Set {who}.split (or heldout_split).")
    keep = PromptCollector(tokenizer=tok, max_prompt_tokens=max_prompt_tokens,
                           drop_duplicates=drop_duplicates, limit=limit,
                           metadata_keys=metadata_keys)
    read_from = []
    total = 0
    for t in with_split:
      if keep.full:
        break
      what = f"the seqio Task {t.name!r}" + (f" (of Mixture {task!r})" if is_mixture else "")
      with _tf_errors(tf, who, f"the {split!r} split of {what}"):
        ds = t.get_dataset(sequence_length=None, split=split, use_cached=False, shuffle=False,
                           num_epochs=1, seed=seed)
        decode, why = _seqio_decoder(seqio, t, feature)
        reader = _feature_reader(ds.element_spec, feature, tf=tf, who=who, what=what,
                                 decode_ids=decode, ids_hint=why)
        _check_metadata(ds.element_spec, keep.metadata_keys, who, what)
        read_from.append(f"seqio:{t.name}/{split}")
        total += _collect(keep, ds.as_numpy_iterator(), reader, feature, read_from[-1])
    if total == 0:
      raise PromptSourceError(f"{who}: the {split!r} split of the seqio {kind} {task!r} holds "
                              f"no examples; fill it, or read another split ({who}.split / "
                              "heldout_split).")
    return keep.finish(read_from, who=who, metadata_hint=f"check {who}.metadata_keys")
  return _on_process0(read)


# --------------------------------------------------------------------------------------------
# TFDS


def _tfds_builder(tfds: Any, name: str, data_dir: Optional[str], who: str) -> Any:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise PromptSourceError(
        f"{who}: TFDS has no dataset named {name!r} ({first}). Check {who}.name (NAME, "
        f"NAME/CONFIG or NAME:VERSION) and {who}.data_dir, or import the module that defines "
        f"its builder ({who}.modules in gin).") from None


def read_tfds_prompts(name: str, split: str = "train", feature: str = "prompt",
                      *, data_dir: Optional[PathLike] = None, download: bool = False,
                      modules: Union[str, Sequence[str]] = (),
                      tokenizer: Union[None, str, Tokenizer] = None,
                      max_prompt_tokens: Optional[int] = None, drop_duplicates: bool = True,
                      limit: Optional[int] = None, metadata_keys: Sequence[str] = (),
                      who: str = "read_tfds_prompts") -> PromptSet:
  """Prompts from one split of a TFDS dataset (see the module docstring).

  Args:
    name: the dataset: NAME, NAME/CONFIG, NAME:VERSION or NAME/CONFIG:VERSION.
    split: the split, in TFDS syntax ("train", "train[:1000]", "train+validation").
    feature: the feature holding the prompt: text or chat messages; "a/b" for a nested one.
    data_dir: where the prepared dataset lies (local or gs://); None: TFDS's default.
    download: prepare the dataset (download and build) when it is not; False: refuse.
    modules: modules imported first (e.g. those that define a dataset's builder).
    tokenizer, max_prompt_tokens, drop_duplicates, limit, metadata_keys: as `load_prompts`'.
    who: the name error messages give.

  Returns:
    A `PromptSet`; sources "tfds:NAME/SPLIT:N" (N: the example's index in the split as
    read, 0-based), files ["tfds:NAME/SPLIT"].

  Raises:
    ImportError: TensorFlow / tensorflow_datasets not installed, or a module in `modules` not
      importable.
    PromptSourceError: unknown dataset or split, a dataset not prepared (with
      download=False), a missing or non-text feature, an empty split, no prompt left.
  """
  tok, modules, metadata_keys = _check_args(who, name, "name", split, feature, modules,
                                            tokenizer, max_prompt_tokens, limit,
                                            metadata_keys)
  data_dir = None if data_dir is None else str(data_dir)

  def read() -> PromptSet:
    tf, tfds = _require(who, "tensorflow", "tensorflow_datasets")
    _import_modules(who, modules)
    builder = _tfds_builder(tfds, name, data_dir, who)
    where_dir = data_dir or "TFDS's default data_dir"
    if not builder.is_prepared():
      if not download:
        raise PromptSourceError(
            f"{who}: the TFDS dataset {name!r} is not prepared in {where_dir}. Build it there "
            f"(`tfds build {name.split(':')[0]} --data_dir=...`), point {who}.data_dir at the "
            f"folder that holds it, or set {who}.download = True.")
      builder.download_and_prepare()
    try:
      num = builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
      raise PromptSourceError(f"{who}: the TFDS dataset {name!r} has no split {split!r} ({e}); "
                              f"its splits are {sorted(builder.info.splits)}. Set {who}.split "
                              "(or heldout_split).") from None
    if num == 0:
      raise PromptSourceError(f"{who}: the {split!r} split of the TFDS dataset {name!r} holds "
                              f"no examples; read another split or slice ({who}.split / "
                              "heldout_split).")
    what = f"the TFDS dataset {name!r}"
    keep = PromptCollector(tokenizer=tok, max_prompt_tokens=max_prompt_tokens,
                           drop_duplicates=drop_duplicates, limit=limit,
                           metadata_keys=metadata_keys)
    read_from = [f"tfds:{name}/{split}"]
    with _tf_errors(tf, who, f"the {split!r} split of {what}"):
      # shuffle_files=False: the split's examples in their stored order, every time.
      ds = builder.as_dataset(split=split, shuffle_files=False)
      reader = _feature_reader(ds.element_spec, feature, tf=tf, who=who, what=what,
                               ids_hint="TFDS prompts must be text (there is no vocabulary to "
                               "decode them)")
      _check_metadata(ds.element_spec, keep.metadata_keys, who, what)
      _collect(keep, tfds.as_numpy(ds), reader, feature, read_from[0])
    return keep.finish(read_from, who=who, metadata_hint=f"check {who}.metadata_keys")
  return _on_process0(read)


# --------------------------------------------------------------------------------------------
# Sources: (train, held-out)


def _check_args(who: str, name: Any, name_param: str, split: Any, feature: Any,
                modules: Union[str, Sequence[str]], tokenizer: Any,
                max_prompt_tokens: Optional[int], limit: Optional[int],
                metadata_keys: Union[str, Sequence[str]]):
  """Validates what needs no TensorFlow; returns (tokenizer, modules, metadata_keys)."""
  for param, value in ((name_param, name), ("split", split), ("feature", feature)):
    if not isinstance(value, str) or not value:
      raise ValueError(f"{who}: {param}={value!r}; set {who}.{param} (gin) to a non-empty "
                       "string.")
  check_prompt_limits(who, tokenizer, max_prompt_tokens, limit,
                      " (the run's own, passed by initial_prompts); pass tokenizer=")
  tok = None if tokenizer is None or max_prompt_tokens is None else get_tokenizer(tokenizer)
  modules = (modules,) if isinstance(modules, str) else tuple(modules)
  metadata_keys = (metadata_keys,) if isinstance(metadata_keys, str) else tuple(metadata_keys)
  return tok, modules, metadata_keys


def _train_and_heldout(who: str, read: Callable[[str, Optional[int]], PromptSet], split: str,
                       heldout_split: Optional[str],
                       heldout_paths: Union[None, PathLike, Sequence[PathLike]],
                       heldout_fraction: Optional[float], heldout_count: Optional[int],
                       seed: int, limit: Optional[int], heldout_limit: Optional[int],
                       tokenizer: Any) -> tuple[PromptSet, PromptSet]:
  fraction_or_count = heldout_fraction is not None or heldout_count is not None
  given = [n for n, v in (("heldout_split", heldout_split is not None),
                          ("heldout_paths", heldout_paths is not None),
                          ("heldout_fraction / heldout_count", fraction_or_count)) if v]
  if not given:
    raise ValueError(f"{who}: no held-out prompts; set {who}.heldout_split (another split), "
                     f"{who}.heldout_paths (prompt files) or {who}.heldout_fraction / "
                     "heldout_count (split off the training prompts).")
  if len(given) > 1:
    raise ValueError(f"{who}: give one of heldout_split, heldout_paths and heldout_fraction / "
                     f"heldout_count; got {' and '.join(given)}.")
  if heldout_split is not None and heldout_split == split:
    raise ValueError(f"{who}: heldout_split={heldout_split!r} is the training split; hold out "
                     "another split, or a share of this one (heldout_fraction / heldout_count).")
  if heldout_limit is not None and heldout_limit < 1:
    raise ValueError(f"{who}: heldout_limit={heldout_limit} must be >= 1 (or None).")
  train = read(split, limit)
  if heldout_split is not None:
    return train, read(heldout_split, heldout_limit)
  if heldout_paths is not None:  # prompt files, read as the "files" source reads them
    kwargs = {} if tokenizer is None else {"tokenizer": tokenizer}
    if heldout_limit is not None:
      kwargs["limit"] = heldout_limit
    return train, load_prompts(heldout_paths, **kwargs)
  return split_prompt_set(train, fraction=heldout_fraction, count=heldout_count, seed=seed)


@gin.configurable
def seqio_prompts(tokenizer: Any = None, *, task: str = gin.REQUIRED, split: str = "train",
                  feature: str = "inputs", heldout_split: Optional[str] = None,
                  heldout_paths: Union[None, PathLike, Sequence[PathLike]] = None,
                  heldout_fraction: Optional[float] = None, heldout_count: Optional[int] = None,
                  seed: int = 0, limit: Optional[int] = None,
                  heldout_limit: Optional[int] = None, modules: Union[str, Sequence[str]] = (),
                  max_prompt_tokens: Optional[int] = None, drop_duplicates: bool = True,
                  metadata_keys: Sequence[str] = ()) -> tuple[PromptSet, PromptSet]:
  """The "seqio" prompt source: (training, held-out) prompts from a seqio Task or Mixture.

  Held-out prompts come from exactly one of: `heldout_split` (another split of the task),
  `heldout_paths` (prompt files, read by `load_prompts` with its gin bindings), or
  `heldout_fraction` / `heldout_count` (a seeded split of the training prompts, as the files
  source does).

  Args:
    tokenizer: the run's tokenizer (for `max_prompt_tokens`), passed by `initial_prompts`.
    task, split, feature, modules, max_prompt_tokens, drop_duplicates, metadata_keys: see
      `read_seqio_prompts`.
    heldout_split, heldout_paths, heldout_fraction, heldout_count: the held-out prompts.
    seed: seqio's preprocessors' seed and the held-out split's.
    limit: the most training prompts kept (before a fraction / count split); None: all.
    heldout_limit: the most held-out prompts kept from `heldout_split` / `heldout_paths`.
  """
  def read(s: str, lim: Optional[int]) -> PromptSet:
    return read_seqio_prompts(task, s, feature, modules=modules, tokenizer=tokenizer,
                              max_prompt_tokens=max_prompt_tokens,
                              drop_duplicates=drop_duplicates, limit=lim,
                              metadata_keys=metadata_keys, seed=seed, who="seqio_prompts")
  _check_args("seqio_prompts", task, "task", split, feature, modules, tokenizer,
              max_prompt_tokens, limit, metadata_keys)
  return _train_and_heldout("seqio_prompts", read, split, heldout_split, heldout_paths,
                            heldout_fraction, heldout_count, seed, limit, heldout_limit,
                            tokenizer)


@gin.configurable
def tfds_prompts(tokenizer: Any = None, *, name: str = gin.REQUIRED, split: str = "train",
                 feature: str = "prompt", data_dir: Optional[PathLike] = None,
                 download: bool = False, heldout_split: Optional[str] = None,
                 heldout_paths: Union[None, PathLike, Sequence[PathLike]] = None,
                 heldout_fraction: Optional[float] = None, heldout_count: Optional[int] = None,
                 seed: int = 0, limit: Optional[int] = None,
                 heldout_limit: Optional[int] = None, modules: Union[str, Sequence[str]] = (),
                 max_prompt_tokens: Optional[int] = None, drop_duplicates: bool = True,
                 metadata_keys: Sequence[str] = ()) -> tuple[PromptSet, PromptSet]:
  """The "tfds" prompt source: (training, held-out) prompts from a TFDS dataset.

  Held-out prompts as `seqio_prompts`' (`heldout_split` may be a slice such as
  "train[-500:]" when training on "train[:-500]").

  Args:
    tokenizer: the run's tokenizer (for `max_prompt_tokens`), passed by `initial_prompts`.
    name, split, feature, data_dir, download, modules, max_prompt_tokens, drop_duplicates,
      metadata_keys: see `read_tfds_prompts`.
    heldout_split, heldout_paths, heldout_fraction, heldout_count, seed: the held-out prompts.
    limit: the most training prompts kept (before a fraction / count split); None: all.
    heldout_limit: the most held-out prompts kept from `heldout_split` / `heldout_paths`.
  """
  def read(s: str, lim: Optional[int]) -> PromptSet:
    return read_tfds_prompts(name, s, feature, data_dir=data_dir, download=download,
                             modules=modules, tokenizer=tokenizer,
                             max_prompt_tokens=max_prompt_tokens,
                             drop_duplicates=drop_duplicates, limit=lim,
                             metadata_keys=metadata_keys, who="tfds_prompts")
  _check_args("tfds_prompts", name, "name", split, feature, modules, tokenizer,
              max_prompt_tokens, limit, metadata_keys)
  return _train_and_heldout("tfds_prompts", read, split, heldout_split, heldout_paths,
                            heldout_fraction, heldout_count, seed, limit, heldout_limit,
                            tokenizer)


PROMPT_SOURCES.register("seqio", seqio_prompts)
PROMPT_SOURCES.register("tfds", tfds_prompts)
