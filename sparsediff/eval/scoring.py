"""Scorers with known conventions: multiple-choice letter extraction (VideoMME, as lmms-eval scores
it, made robust to chatty answers), RealWorldQA exact match after normalisation, RULER string match,
and per-group accuracy."""

from __future__ import annotations

import re
import string
from collections import defaultdict

# Phrases models put before the letter; removed first so their capitals ("The", "A") never match.
_ANSWER_PHRASE = re.compile(
    r"(?:the\s+)?(?:best|correct|right|final)?\s*(?:answer|option|choice)\s*(?:is|would be|:)?\s*[:\-]?\s*"
    r"(?:option\s+)?\(?\s*([A-Za-z])\s*\)?(?![A-Za-z])",
    re.IGNORECASE,
)
_MARKUP = re.compile(r"[*_`#]")


def extract_choice(text: str, letters: str = "ABCD", options=None) -> str:
    """The option letter a free-form answer picks, or "" when it picks none.

    Handles "B", "(B)", "B. a cat", "The answer is (B).", "Answer: c", "**D**"; an uppercase
    standalone letter anywhere counts (except the article "A" before a lowercase word). With
    ``options`` ("A. text", ...), an answer quoting exactly one option's text picks that option.
    """
    if not text:
        return ""
    s = _MARKUP.sub("", str(text)).strip()
    allowed = set(letters.upper())
    # 1. An explicit answer phrase decides, whatever case the letter has ("Answer: c").
    for m in _ANSWER_PHRASE.finditer(s):
        letter = m.group(1)
        # "the answer is a cat": a lowercase letter followed by a word is an article, not a choice.
        if letter.islower() and re.match(r"\s+[a-z]", s[m.end(1):]):
            continue
        if letter.upper() in allowed:
            return letter.upper()
    # 2. The whole answer is one letter, possibly bracketed or punctuated ("c", "(B).").
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?\s*[.:)]?", s)
    if m and m.group(1).upper() in allowed:
        return m.group(1).upper()
    # 3. A bracketed capital anywhere, then a standalone capital that is not the article "A".
    for pattern in (r"\(([A-Z])\)", r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])(?!\s+[a-z])"):
        for m in re.finditer(pattern, s):
            if m.group(1) in allowed:
                return m.group(1)
    # 4. The text of exactly one option.
    if options:
        hits = {letter for letter, body in _split_options(options) if body and body.lower() in s.lower()}
        if len(hits) == 1 and hits <= allowed:
            return hits.pop()
    return ""


def _split_options(options):
    for i, opt in enumerate(options):
        m = re.match(r"\s*\(?([A-Z])[.)]\s*(.*)", str(opt))
        letter, body = (m.group(1), m.group(2)) if m else (chr(ord("A") + i), str(opt))
        yield letter, body.strip().rstrip(".")


def score_choice(prediction: str, answer: str, letters: str = "ABCD", options=None) -> tuple[str, bool]:
    picked = extract_choice(prediction, letters, options)
    return picked, bool(picked) and picked == str(answer).strip().upper()


# -- RealWorldQA -------------------------------------------------------------------------------------
_NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_OPTION_LINE = re.compile(r"(?m)^\s*\(?([A-Z])[.)]\s+(.+?)\s*$")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, single spaces, number words as digits ("Four." -> "4")."""
    s = str(text).lower().strip()
    s = s.translate(str.maketrans("", "", string.punctuation))
    s = " ".join(s.split())
    return _NUMBER_WORDS.get(s, s)


def question_options(question: str) -> list[str]:
    """The "A. text" option lines inside a RealWorldQA question."""
    return [f"{m.group(1)}. {m.group(2)}" for m in _OPTION_LINE.finditer(question)]


def score_exact_match(prediction: str, answer: str, question: str = "") -> tuple[str, bool]:
    """RealWorldQA: exact match after normalisation. For lettered questions the letter is extracted
    first (or mapped from the quoted option text), as lmms-eval's flexible-extract filter does."""
    options = question_options(question)
    target = normalize_answer(answer)
    if options and len(target) == 1 and target.isalpha():
        letters = "".join(o[0] for o in options)
        picked = extract_choice(prediction, letters, options)
        return picked, picked.lower() == target
    pred = normalize_answer(str(prediction).strip().rstrip("."))
    return pred, pred == target


# -- RULER --------------------------------------------------------------------------------------------
def _clean(prediction: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", str(prediction)).strip()


def string_match_all(prediction: str, references) -> float:
    """RULER's metric for retrieval and tracking: the share of expected strings found in the output."""
    pred = _clean(prediction).lower()
    refs = [str(r).lower() for r in references]
    return sum(r in pred for r in refs) / len(refs) if refs else 0.0


def string_match_part(prediction: str, references) -> float:
    """RULER's metric for QA: 1 when any expected string is found."""
    pred = _clean(prediction).lower()
    return float(any(str(r).lower() in pred for r in references))


# -- aggregation ----------------------------------------------------------------------------------------
def accuracy(records, key: str = "score") -> float:
    """Mean of ``key`` over records, in percent (0 when empty)."""
    values = [float(r[key]) for r in records]
    return 100.0 * sum(values) / len(values) if values else 0.0


def accuracy_by(records, field: str, key: str = "score") -> dict[str, dict]:
    """{group value: {"accuracy": %, "n": count}} over ``record["meta"][field]``."""
    groups = defaultdict(list)
    for r in records:
        value = (r.get("meta") or {}).get(field)
        if value is not None:
            groups[str(value)].append(r)
    return {g: {"accuracy": accuracy(rs, key), "n": len(rs)} for g, rs in sorted(groups.items())}
