"""Corpus sources: what a ``--corpus`` value names, and loading it through `datasets`.

A value is, in this order:

- an existing file: text (one document a line), jsonl or parquet, by its suffix;
- an existing directory, optionally ``DIR[:CONFIG[:SPLIT]]``: a dataset directory as `datasets`
  reads it (data files of one format, a ``README.md`` with configs, or a hub repository's clone);
- ``hf://datasets/ORG/NAME[@REVISION]/PATH``: data files in a hub repository (globs allowed);
- ``hf://datasets/ORG/NAME[@REVISION][:CONFIG[:SPLIT]]`` or ``[ORG/]NAME[@REVISION][:CONFIG[:SPLIT]]``:
  a hub dataset (``wikimedia/wikipedia:20231101.en``), split ``train`` unless named;
- any other ``scheme://`` URL: a data file read through fsspec, its format by its suffix.

A dataset's provenance (name, config, split, requested revision and, for a hub dataset, the
commit it resolved to) is recorded in the store's ``corpus.datasets`` attribute.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from offline_kd.runtime.errors import UsageError

TEXT_SUFFIXES = {".txt", ".text", ".md", ""}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
FILE_SUFFIXES = TEXT_SUFFIXES - {""} | JSON_SUFFIXES | PARQUET_SUFFIXES
HUB_PREFIX = "hf://datasets/"
# [ORG/]NAME[@REVISION][:CONFIG[:SPLIT]]; a revision may hold slashes (refs/convert/parquet)
HUB_NAME = re.compile(
    r"^(?P<name>[\w.-]+(?:/[\w.-]+)?)(?:@(?P<revision>[\w./%-]+))?"
    r"(?::(?P<config>[\w.-]*))?(?::(?P<split>[\w.-]+))?$"
)
DATASET_SUFFIX = re.compile(r"^(?P<path>.+?)(?::(?P<config>[\w.-]*))?(?::(?P<split>[\w.-]+))?$")


class CorpusError(UsageError):
    """Bad corpus input: empty, undecodable, missing or of an unknown kind."""


@dataclass(frozen=True)
class CorpusSource:
    """One ``--corpus`` value, resolved.

    ``kind`` is ``text``, ``json`` or ``parquet`` for a data file (``path`` is the file or URL) and
    ``dataset`` for a dataset (``path`` is the hub name or the local directory)."""

    spec: str
    kind: str
    path: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.kind == "dataset" and not Path(self.path).is_dir()

    def matches(self, key: str) -> bool:
        """True when ``key`` names this source: the value as given, or its dataset name or path."""
        return key in (self.spec, self.path, self.path.removeprefix(HUB_PREFIX))


def _file_kind(path: str) -> str:
    suffix = Path(path.split("?")[0]).suffix.lower()
    return "json" if suffix in JSON_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"


def _hub_source(spec: str, value: str) -> CorpusSource:
    m = HUB_NAME.match(value)
    if not m:
        raise CorpusError(
            f"{spec!r} is neither an existing file nor a dataset ([ORG/]NAME[@REVISION][:CONFIG[:SPLIT]])"
        )
    return CorpusSource(
        spec, "dataset", m["name"], m["config"] or None, m["split"] or "train", m["revision"] or None
    )


def _hf_url_source(spec: str) -> CorpusSource:
    rest = spec[len(HUB_PREFIX) :]
    parts = rest.split("/", 2)
    if len(parts) == 3 and parts[2]:  # files inside the repository (the revision rides in the URL)
        repo = parts[1].partition("@")
        return CorpusSource(spec, _file_kind(parts[2]), spec, revision=repo[2] or None)
    return _hub_source(spec, rest)


def parse_source(spec: str | os.PathLike) -> CorpusSource:
    """What a ``--corpus`` value names (see the module docstring); refuses a missing file."""
    spec = str(spec)
    p = Path(spec).expanduser()
    if p.is_file():
        return CorpusSource(spec, _file_kind(spec), str(p))
    if p.is_dir():
        return CorpusSource(spec, "dataset", str(p))
    m = DATASET_SUFFIX.match(spec)
    if m and (m["config"] is not None or m["split"]) and Path(m["path"]).expanduser().is_dir():
        return CorpusSource(
            spec, "dataset", str(Path(m["path"]).expanduser()), m["config"] or None, m["split"] or "train"
        )
    if spec.startswith(HUB_PREFIX):
        return _hf_url_source(spec)
    if "://" in spec:
        return CorpusSource(spec, _file_kind(spec), spec)
    suffix = Path(spec.partition(":")[0]).suffix.lower()
    if spec.startswith((os.sep, ".", "~")) or suffix in FILE_SUFFIXES:
        raise CorpusError(f"corpus file {spec!r} does not exist")
    return _hub_source(spec, spec)


def parse_sources(sources: str | os.PathLike | Sequence[str]) -> list[CorpusSource]:
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise CorpusError("no corpus sources given")
    return [parse_source(s) for s in sources]


def check_sources(sources: str | Sequence[str]) -> None:
    """Refuse a missing corpus file or a malformed dataset name before anything is read."""
    parse_sources(sources)


def check_group_rows(group_rows: dict | None, sources: Sequence[str]) -> dict[str, int]:
    """``--group-rows SOURCE=N`` as {source value: N}, each naming one of ``sources``."""
    parsed = parse_sources(sources)
    out: dict[str, int] = {}
    for key, value in (group_rows or {}).items():
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = 0
        if n < 1:
            raise UsageError(f"--group-rows {key}={value}: the number of rows must be a positive integer")
        named = [s.spec for s in parsed if s.matches(key)]
        if not named:
            raise UsageError(f"--group-rows {key}={value}: no --corpus source is {key!r}")
        out.update(dict.fromkeys(named, n))
    return out


def load_source(source: CorpusSource, num_proc: int | None = None):
    """The source's rows as a `datasets.Dataset` and its provenance (None for a data file outside
    the hub; a hub repository's files record the revision their URL names)."""
    import datasets

    if source.kind != "dataset":
        ds = datasets.load_dataset(source.kind, data_files=[source.path], split="train")
        if not source.path.startswith(HUB_PREFIX):
            return ds, None
        repo = "/".join(source.path[len(HUB_PREFIX) :].split("/", 2)[:2]).partition("@")[0]
        return ds, {"source": source.spec, "name": repo, "revision": source.revision, "commit": None}
    builder = datasets.load_dataset_builder(source.path, source.config, revision=source.revision)
    builder.download_and_prepare(num_proc=num_proc if num_proc and num_proc > 1 else None)
    ds = builder.as_dataset(split=source.split)
    provenance = {
        "source": source.spec,
        "name": source.path,
        "config": builder.config.name,
        "split": source.split,
        "revision": source.revision,
        # A hub dataset's builder hash is the commit its files were read at.
        "commit": builder.hash if source.is_hub else None,
    }
    return ds, provenance
