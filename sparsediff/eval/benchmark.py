"""What every benchmark provides to the runner: samples (cheap, no media decoded), ``prepare`` (decode
the media of one sample for the model) and ``score`` (parse a prediction, 0..1 credit)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Sample:
    id: str
    prompt: str  # the benchmark's standard prompt, ready for the model
    answer: Any  # a letter / word, or a list of strings (RULER)
    meta: dict = dataclasses.field(default_factory=dict)  # grouping fields: duration, domain, task, length
    video: Any = None  # a path, or a callable returning one (extracted from a zip on demand)
    image: Any = None  # PIL image, or the parquet image struct / bytes
    answer_prefix: str = ""  # text the answer starts with (RULER), after the assistant turn begins
    max_new_tokens: int = 16


@dataclasses.dataclass
class Prepared:
    """A sample with its media decoded: what a ``ModelRunner`` receives."""

    sample: Sample
    text: str
    images: list = dataclasses.field(default_factory=list)  # PIL images
    video: Any = None  # video_io.Frames


class Benchmark:
    name = "benchmark"
    group_fields: tuple[str, ...] = ()  # meta fields the summary breaks accuracy down by

    def samples(self) -> list[Sample]:
        raise NotImplementedError

    def prepare(self, sample: Sample) -> Prepared:
        return Prepared(sample, sample.prompt)

    def score(self, sample: Sample, prediction: str) -> tuple[Any, float]:
        raise NotImplementedError


def read_parquet_checked(path, required: tuple[str, ...]):
    """A parquet file as a pandas frame, with errors that name the file and what is wrong with it."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from err
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {table.column_names}")
    return table.to_pandas()


def hub_snapshot(repo_id: str, allow_patterns=None) -> Path:
    """Download (or reuse from the Hugging Face cache) a dataset repository; honours HF_HUB_OFFLINE."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=allow_patterns))
    except Exception as err:
        raise ValueError(f"could not fetch dataset {repo_id!r} from the Hugging Face Hub or its local cache "
                         f"({type(err).__name__}: {err}); pass a local directory instead") from err
