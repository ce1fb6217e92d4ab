"""Small stand-in data sets in the published formats (tests and smoke runs; no download needed).

    python -m sparsediff.eval.standins /tmp/standins   # writes Video-MME/ and RealworldQA/ there
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np

VIDEOMME_ROWS = [
    # (question_id, videoID, duration, domain, sub_category, task_type, answer)
    ("001-1", "vidA0000001", "short", "Knowledge", "Astronomy", "Counting Problem", "B"),
    ("001-2", "vidA0000001", "short", "Knowledge", "Astronomy", "Object Recognition", "A"),
    ("301-1", "vidB0000002", "medium", "Sports Competition", "Football", "Action Recognition", "D"),
    ("601-1", "vidC0000003", "long", "Life Record", "Travel", "Temporal Reasoning", "C"),
]


def _tiny_video(path: Path, frames: int, seed: int) -> None:
    import imageio

    rng = np.random.default_rng(seed)
    # 64x48: decord needs a width of 64 or more; each frame a flat colour plus noise so frames differ.
    video = np.clip(rng.integers(0, 255, (frames, 1, 1, 3)) + rng.integers(-8, 8, (frames, 48, 64, 3)), 0, 255)
    # The FFMPEG plugin by name: without imageio-ffmpeg, imageio would hand .mp4 to another plugin (TIFF) that
    # fails on fps; named, it raises an ImportError that says what to install.
    imageio.mimwrite(str(path), video.astype(np.uint8), format="FFMPEG", fps=4, codec="libx264", macro_block_size=16)


def write_videomme(root, *, zipped: bool = True, loose: bool = False, frames: int = 12) -> Path:
    """``root/videomme/test-00000-of-00001.parquet`` with 4 questions on 3 videos; the videos as zip chunks
    (``videos_chunked_01.zip``, ``_02.zip``: members ``data/<videoID>.mp4``) and/or loose in ``data/``,
    plus ``subtitle.zip`` with one .srt."""
    import pandas as pd

    root = Path(root)
    (root / "videomme").mkdir(parents=True, exist_ok=True)
    rows = []
    for qid, vid, duration, domain, sub, task, answer in VIDEOMME_ROWS:
        rows.append({"video_id": qid.split("-")[0], "duration": duration, "domain": domain, "sub_category": sub,
                     "url": f"https://www.youtube.com/watch?v={vid}", "videoID": vid, "question_id": qid,
                     "task_type": task, "question": f"What is shown in video {vid} ({task})?",
                     "options": [f"{letter}. option {letter.lower()} for {qid}" for letter in "ABCD"],
                     "answer": answer})
    pd.DataFrame(rows).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    staging = root / ("data" if loose else ".staging")
    staging.mkdir(exist_ok=True)
    vids = sorted({r[1] for r in VIDEOMME_ROWS})
    for i, vid in enumerate(vids):
        _tiny_video(staging / f"{vid}.mp4", frames, i)
    if zipped:
        chunks = [vids[:2], vids[2:]]
        for n, chunk in enumerate(chunks, 1):
            with zipfile.ZipFile(root / f"videos_chunked_{n:02d}.zip", "w", zipfile.ZIP_STORED) as zf:
                for vid in chunk:
                    zf.write(staging / f"{vid}.mp4", f"data/{vid}.mp4")
        srt = ("1\n00:00:00,000 --> 00:00:01,500\n<font color=\"white\" size=\".72c\">hello there</font>\n\n"
               "2\n00:00:01,500 --> 00:00:03,000\n<font color=\"white\" size=\".72c\">general kenobi</font>\n")
        with zipfile.ZipFile(root / "subtitle.zip", "w") as zf:
            zf.writestr(f"subtitle/{vids[0]}.srt", srt)
    if not loose:
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    return root


def write_realworldqa(root, n: int = 4) -> Path:
    """``root/data/test-00000-of-00001.parquet``: image structs {bytes: PNG, path}, question, answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    images, questions, answers = [], [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((40 + 8 * i, 56, 3), 30 * i, np.uint8)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
        if i % 2 == 0:
            questions.append(f"Which side is the car {i} on?\nA. left\nB. right\nC. middle\n"
                             "Please answer directly with only the letter of the correct option and nothing else.")
            answers.append("ABC"[i % 3])
        else:
            questions.append(f"How many cones are there in picture {i}?\n"
                             "Please answer directly with a single word or number.")
            answers.append(str(i + 1))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(images, type=image_type), "question": questions, "answer": answers})
    pq.write_table(table, root / "data" / "test-00000-of-00001.parquet")
    return root


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "standins")
    print(write_videomme(out / "Video-MME"), write_realworldqa(out / "RealworldQA"))
