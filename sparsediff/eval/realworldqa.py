"""RealWorldQA (xai-org/RealworldQA): real-world images, short questions; exact match after
normalisation, as lmms-eval's ``realworldqa`` task scores it.

Published layout: ``data/test-0000i-of-0000n.parquet`` with ``image`` (struct ``{bytes, path}``, as
``datasets`` stores images), ``question`` (options and the answer instruction are inside it) and
``answer``. Samples are numbered in file order (the dataset has no id column).
"""

from __future__ import annotations

import io
from pathlib import Path

from .benchmark import Benchmark, Prepared, Sample, hub_snapshot, read_parquet_checked
from .scoring import score_exact_match

HUB_ID = "xai-org/RealworldQA"
COLUMNS = ("image", "question", "answer")


def decode_image(value, where: str = "image"):
    """A PIL RGB image from what a parquet image cell holds: a {bytes, path} struct, raw bytes, or a path."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        value = data if data is not None else path
    try:
        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        if isinstance(value, str) and Path(value).is_file():
            return Image.open(value).convert("RGB")
    except Exception as err:
        raise ValueError(f"{where}: the image cannot be decoded ({err})") from err
    raise ValueError(f"{where}: no image bytes or readable path in the image cell ({type(value).__name__})")


def find_parquets(root: Path) -> list[Path]:
    files = sorted(root.glob("data/*.parquet")) or sorted(root.glob("*.parquet")) or sorted(root.glob("**/*.parquet"))
    if not files:
        raise ValueError(f"{root}: no RealWorldQA parquet found (expected data/test-*.parquet)")
    return files


class RealWorldQA(Benchmark):
    name = "realworldqa"
    group_fields = ("kind",)

    def __init__(self, source: str = HUB_ID, *, max_pixels: int | None = None):
        path = Path(source)
        if path.is_file():
            self.files = [path]
        else:
            root = path if path.is_dir() else hub_snapshot(str(source), allow_patterns=["*.parquet", "**/*.parquet"])
            self.files = find_parquets(root)
        self.max_pixels = max_pixels

    def samples(self) -> list[Sample]:
        out = []
        for path in self.files:
            df = read_parquet_checked(path, COLUMNS)
            for i, row in enumerate(df.itertuples(index=False)):
                answer = str(row.answer).strip()
                kind = "choice" if len(answer) == 1 and answer.isalpha() else "open"
                out.append(Sample(id=f"rwqa-{len(out):04d}", prompt=str(row.question).strip(), answer=answer,
                                  meta={"kind": kind, "source": f"{path.name}:{i}"}, image=row.image,
                                  max_new_tokens=16))
        return out

    def prepare(self, sample: Sample) -> Prepared:
        image = decode_image(sample.image, f"{sample.meta['source']} ({sample.id})")
        if self.max_pixels and image.width * image.height > self.max_pixels:
            scale = (self.max_pixels / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        return Prepared(sample, sample.prompt, images=[image])

    def score(self, sample: Sample, prediction: str):
        return score_exact_match(prediction, sample.answer, sample.prompt)
