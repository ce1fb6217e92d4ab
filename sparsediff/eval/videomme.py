"""Video-MME (lmms-lab/Video-MME): 900 videos, 2,700 four-option questions, short/medium/long.

Published layout (hub repository or a local copy of it)::

    videomme/test-00000-of-00001.parquet   video_id, duration, domain, sub_category, url, videoID,
                                           question_id, task_type, question, options, answer
    videos_chunked_01.zip ... _20.zip      members data/<videoID>.mp4
    subtitle.zip                           members subtitle/<videoID>.srt

Videos are looked up as ``data/<videoID>.mp4`` (what unzipping the chunks gives), next to the parquet,
or in ``videos/`` / ``video/``; otherwise the member is extracted on demand from the zip chunks.
The prompt and the scoring follow lmms-eval's ``videomme`` task.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import zipfile
from pathlib import Path

from .benchmark import Benchmark, Prepared, Sample, hub_snapshot, read_parquet_checked
from .scoring import score_choice

logger = logging.getLogger(__name__)

HUB_ID = "lmms-lab/Video-MME"
COLUMNS = ("video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type",
           "question", "options", "answer")
OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and the "
                 "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
POST_PROMPT = "The best answer is:"
SUBTITLE_PROMPT = "This video's subtitles are listed below: \n"
VIDEO_EXTS = (".mp4", ".MP4", ".mkv", ".webm")


def build_prompt(question: str, options, post_prompt: str = POST_PROMPT, subtitles: str | None = None) -> str:
    """lmms-eval's Video-MME prompt: instruction, question, one option per line, post prompt."""
    body = OPTION_PROMPT + "\n" + question + "\n" + "\n".join(str(o) for o in options) + "\n" + post_prompt
    if subtitles is None:
        return body
    return SUBTITLE_PROMPT + (subtitles or "No subtitles available") + "\n" + body


# -- subtitles --------------------------------------------------------------------------------------------
def _srt_time(stamp: str) -> float:
    h, m, rest = stamp.strip().split(":")
    s, _, ms = rest.replace(".", ",").partition(",")
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms or 0) / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """(start s, end s, text) cues of an .srt file, markup such as <font> tags removed."""
    cues = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip()):
        lines = block.strip().split("\n")
        for i, line in enumerate(lines):
            if "-->" in line:
                start, end = line.split("-->")
                body = re.sub(r"<[^>]+>", "", " ".join(lines[i + 1:])).strip()
                try:
                    cues.append((_srt_time(start), _srt_time(end.split()[0]), body))
                except (ValueError, IndexError):
                    pass  # a malformed cue: skip it, keep the rest
                break
    return cues


def subtitles_at(cues, timestamps) -> str:
    """The cues on screen at any of the sampled frames' timestamps, in order, each once."""
    chosen = [c for c in cues if any(c[0] <= t < c[1] for t in timestamps)]
    return "\n".join(c[2] for c in chosen if c[2])


# -- the dataset ----------------------------------------------------------------------------------------------
class VideoStore:
    """Finds ``<videoID>.mp4`` in a local copy, extracting it from the zip chunks when needed."""

    def __init__(self, root: Path, extract_dir: Path | None = None):
        self.root = Path(root)
        self.dirs = [self.root / "data", self.root, self.root / "videos", self.root / "video"]
        self.extract_dir = Path(extract_dir) if extract_dir else self.root / "data"
        self._members: dict[str, tuple[Path, str]] | None = None
        self._lock = threading.Lock()

    def _zip_index(self) -> dict[str, tuple[Path, str]]:
        if self._members is None:
            members = {}
            for zpath in sorted(self.root.glob("*.zip")):
                try:
                    with zipfile.ZipFile(zpath) as zf:
                        for name in zf.namelist():
                            if name.endswith(VIDEO_EXTS + (".srt",)):
                                members.setdefault(Path(name).name, (zpath, name))
                except zipfile.BadZipFile as err:
                    raise ValueError(f"{zpath}: not a readable zip file ({err})") from err
            self._members = members
        return self._members

    def find(self, stem: str, exts=VIDEO_EXTS, subdir: str = "data") -> Path | None:
        for d in ([self.root / subdir] if subdir != "data" else []) + self.dirs:
            for ext in exts:
                if (d / f"{stem}{ext}").is_file():
                    return d / f"{stem}{ext}"
        for ext in exts:
            hit = self._zip_index().get(f"{stem}{ext}")
            if hit:
                return self._extract(*hit)
        return None

    def _extract(self, zpath: Path, member: str) -> Path:
        target = self._writable_dir() / Path(member).name
        with self._lock:
            if not target.exists():
                tmp = target.with_name(target.name + f".part{os.getpid()}")
                with zipfile.ZipFile(zpath) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(tmp, target)  # atomic: a killed run never leaves a half-written video behind
        return target

    def _writable_dir(self) -> Path:
        for d in (self.extract_dir, Path.home() / ".cache" / "sparsediff" / "videomme"):
            try:
                d.mkdir(parents=True, exist_ok=True)
                if os.access(d, os.W_OK):
                    return d
            except OSError:
                continue
        raise OSError(f"no writable directory to extract videos into (tried {self.extract_dir})")


def find_parquet(root: Path) -> Path:
    candidates = sorted(root.glob("videomme/*.parquet")) or sorted(root.glob("*.parquet")) \
        or sorted(root.glob("**/*.parquet"))
    if not candidates:
        raise ValueError(f"{root}: no Video-MME parquet found (expected videomme/test-00000-of-00001.parquet)")
    return candidates[0]


class VideoMME(Benchmark):
    """Video-MME from the hub id, a local copy of the repository, or a parquet file (videos next to it)."""

    name = "videomme"
    group_fields = ("duration", "domain", "task_type", "sub_category")

    def __init__(self, source: str = HUB_ID, *, num_frames: int | None = None, fps: float | None = None,
                 max_frames: int | None = 32, max_pixels: int | None = None, subtitles: bool = False,
                 durations=None, video_backend: str = "auto", extract_dir=None, post_prompt: str = POST_PROMPT):
        path = Path(source)
        if path.is_file():
            self.parquet, root = path, path.parent.parent if path.parent.name == "videomme" else path.parent
        elif path.is_dir():
            root = path
            self.parquet = find_parquet(root)
        else:
            root = hub_snapshot(str(source))
            self.parquet = find_parquet(root)
        self.store = VideoStore(root, extract_dir)
        self.frame_args = dict(num_frames=num_frames, fps=fps, max_frames=max_frames, max_pixels=max_pixels,
                               backend=video_backend)
        self.subtitles = subtitles
        self.durations = set(durations) if durations else None
        self.post_prompt = post_prompt

    def samples(self) -> list[Sample]:
        df = read_parquet_checked(self.parquet, COLUMNS)
        out = []
        for row in df.itertuples(index=False):
            if self.durations and row.duration not in self.durations:
                continue
            options = [str(o) for o in row.options]
            out.append(Sample(
                id=str(row.question_id), prompt=build_prompt(row.question, options, self.post_prompt),
                answer=str(row.answer).strip(), max_new_tokens=16,
                meta={"videoID": row.videoID, "duration": row.duration, "domain": row.domain,
                      "sub_category": row.sub_category, "task_type": row.task_type, "options": options,
                      "question": row.question},
                video=row.videoID,
            ))
        return out

    def prepare(self, sample: Sample) -> Prepared:
        from .video_io import read_video

        path = self.store.find(sample.video)
        if path is None:
            raise FileNotFoundError(f"video {sample.video}.mp4 (question {sample.id}) not found under "
                                    f"{self.store.root} (data/, videos/, or the videos_chunked_*.zip files)")
        frames = read_video(path, **self.frame_args)
        text = sample.prompt
        if self.subtitles:
            srt = self.store.find(sample.video, exts=(".srt",), subdir="subtitle")
            cues = parse_srt(srt.read_text(encoding="utf-8", errors="replace")) if srt else []
            stamps = [i / (frames.source_fps or 1.0) for i in frames.indices]
            m = sample.meta
            text = build_prompt(m["question"], m["options"], self.post_prompt, subtitles_at(cues, stamps))
        return Prepared(sample, text, video=frames)

    def score(self, sample: Sample, prediction: str):
        return score_choice(prediction, sample.answer, "ABCD", sample.meta.get("options"))
