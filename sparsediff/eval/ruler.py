"""RULER, offline: the needle-in-a-haystack family and variable tracking, generated locally and
seeded, with RULER's templates, the noise haystack ("The grass is green. ...") and RULER's scoring
(the share of expected strings found in the output).

Lengths are counted with the model's tokenizer (whitespace words when none is given) and include
RULER's 128 tokens left for the answer. The essay haystack (Paul Graham essays) is not bundled: every
task uses the noise haystack, or distractor needles for ``niah_multikey_needle`` as RULER's multikey_2.
A RULER-format JSONL made elsewhere (``index, input, outputs, length``) loads with ``load_ruler_jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
import uuid
from pathlib import Path

from .benchmark import Benchmark, Sample
from .scoring import string_match_all

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\n"
                 "What are all the special magic {type_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
             "are assigned the value {query}, they are: ")
TOKENS_TO_GENERATE = 128
DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)

# Keys are adjective-noun pairs as in RULER (which draws them from wonderwords' lists).
_ADJ = ("abrupt adorable aggressive alert ancient angry anxious aquatic average bashful bitter brave broad "
        "calm careful cheerful chubby clumsy curious damp defiant delicate dizzy eager elegant empty fancy "
        "fierce fragile gentle giant gleaming glossy grumpy hollow humble icy jolly lively loud lucky "
        "mellow modern narrow nervous noisy odd plain proud quiet rapid rustic shiny silent sleepy smooth "
        "sour spiky steady sticky swift tame tender tidy tiny vivid wary wicked wise witty young zealous").split()
_NOUN = ("anchor apple arch badge banjo basket beacon blanket bottle bridge bucket cabin camel candle canyon "
         "carpet castle cellar chair comet copper cradle crystal desk dolphin dragon drum eagle engine falcon "
         "feather fence forest fountain garden glacier guitar hammer harbor helmet island jacket kettle "
         "ladder lantern lemon magnet marble meadow mirror needle orchid otter paddle parrot pebble pencil "
         "piano pillow planet puzzle quilt rabbit ribbon rocket saddle salmon shovel spider statue tiger "
         "tractor trumpet tunnel umbrella violin wagon walnut whistle window zipper").split()


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    kind: str = "niah"  # "niah" or "vt"
    num_k: int = 1  # keys with needles
    num_v: int = 1  # values per key
    num_q: int = 1  # keys asked about
    type_k: str = "words"
    type_v: str = "numbers"
    haystack: str = "noise"  # "noise" or "needle" (distractor needles)
    num_chains: int = 1  # vt
    num_hops: int = 4  # vt


TASKS = {
    "niah_single": TaskSpec(),  # RULER niah_single_1
    "niah_single_uuid": TaskSpec(type_v="uuids"),
    "niah_multikey": TaskSpec(num_k=4),
    "niah_multikey_needle": TaskSpec(num_k=1, haystack="needle"),  # RULER niah_multikey_2
    "niah_multivalue": TaskSpec(num_v=4),
    "niah_multiquery": TaskSpec(num_k=4, num_q=4),
    "vt": TaskSpec(kind="vt"),
}


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _niah(spec: TaskSpec, rng: random.Random, n_haystack: int, depth: float | None = None):
    keys, values, needles = [], [], []
    used = set()
    for _ in range(max(spec.num_k, spec.num_q)):
        key = _random_value(rng, spec.type_k)
        while key in used:
            key = _random_value(rng, spec.type_k)
        used.add(key)
        keys.append(key)
        vals = [_random_value(rng, spec.type_v) for _ in range(spec.num_v)]
        values.append(vals)
        needles += [NEEDLE.format(type_v=spec.type_v, key=key, value=v) for v in vals]
    rng.shuffle(needles)
    if spec.haystack == "needle":
        sentences = []
        while len(sentences) < n_haystack:
            key = _random_value(rng, spec.type_k)
            if key not in used:
                sentences.append(NEEDLE.format(type_v=spec.type_v, key=key, value=_random_value(rng, spec.type_v)))
    else:
        sentences = [NOISE] * n_haystack
    if depth is None:
        positions = sorted((rng.randint(0, n_haystack) for _ in needles), reverse=True)
    else:  # every needle at this share of the haystack (0: first sentence, 1: after the last)
        positions = [round(depth * n_haystack)] * len(needles)
    for index, needle in zip(positions, needles):
        sentences.insert(index, needle)
    asked = rng.sample(range(len(keys)), spec.num_q)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_v = NIAH_TEMPLATE, NIAH_PREFIX, spec.type_v
    if spec.num_q * spec.num_v == 1:  # singular wording, as RULER does
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        prefix = prefix.replace("are", "is")
        type_v = type_v[:-1]
    context = "\n".join(sentences)
    prompt = template.format(type_v=type_v, context=context, query=query)
    return prompt, prefix.format(type_v=type_v, query=query), answers


def _vt(spec: TaskSpec, rng: random.Random, n_haystack: int):
    chains, used = [], set()
    value = str(rng.randint(10000, 99999))
    for _ in range(spec.num_chains):
        names = []
        while len(names) < spec.num_hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in used:
                used.add(name)
                names.append(name)
        chains.append(names)
    statements = []
    for chain_index, names in enumerate(chains):
        chain_value = value if chain_index == 0 else str(rng.randint(10000, 99999))
        statements.append([f"VAR {names[0]} = {chain_value}"] +
                          [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, len(names))])
    sentences = [NOISE] * n_haystack
    # Each chain's statements keep their order; chains interleave at random positions.
    flat = [s for chain in statements for s in chain]
    positions = sorted(rng.sample(range(n_haystack + len(flat)), len(flat)))
    for pos, stmt in zip(positions, flat):
        sentences.insert(pos, stmt)
    answers = chains[0]
    return (VT_TEMPLATE.format(context="\n".join(sentences), query=value),
            VT_PREFIX.format(num_v=len(answers), query=value), answers)


def generate_one(task: str, n_haystack: int, rng: random.Random, depth: float | None = None):
    spec = TASKS[task]
    if spec.kind == "vt":
        if depth is not None:
            raise ValueError("a needle depth applies to the niah tasks, not vt")
        return _vt(spec, rng, n_haystack)
    return _niah(spec, rng, n_haystack, depth)


def whitespace_count(text: str) -> int:
    return len(text.split())


def tokenizer_counter(tokenizer):
    """Token count with a Hugging Face tokenizer (no special tokens, as RULER counts)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit_haystack(task, max_len, count, seed) -> int:
    """The largest haystack whose sample (prompt + prefix + answer budget) fits in ``max_len`` tokens."""
    def length(n):
        prompt, prefix, _ = generate_one(task, n, random.Random(f"{seed}-{task}-{max_len}-fit"))
        return count(prompt + prefix) + TOKENS_TO_GENERATE

    lo, hi = 1, 16
    if length(lo) > max_len:
        raise ValueError(f"{task}: even the smallest haystack is longer than {max_len} tokens")
    while length(hi) <= max_len:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: length(lo) fits, length(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if length(mid) <= max_len else (lo, mid)
    return lo


def generate_ruler(tasks=tuple(TASKS), lengths=(4096,), num_samples: int = 25, seed: int = 42,
                   count=whitespace_count) -> list[dict]:
    """RULER records ``{id, task, length, index, input, answer_prefix, outputs, tokens}``; every sample
    has its own seeded generator, so the set does not depend on which samples are asked for."""
    records = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown RULER task {task!r}; available: {sorted(TASKS)}")
        for max_len in lengths:
            n = _fit_haystack(task, int(max_len), count, seed)
            for index in range(num_samples):
                used = n
                while True:  # needles differ in length from sample to sample: shrink until it fits
                    rng = random.Random(f"{seed}-{task}-{max_len}-{index}")
                    prompt, prefix, outputs = generate_one(task, used, rng)
                    tokens = count(prompt + prefix) + TOKENS_TO_GENERATE
                    if tokens <= max_len or used <= 1:
                        break
                    used = max(1, used - max(1, used // 50))
                records.append({"id": f"{task}-{max_len}-{index}", "task": task, "length": int(max_len),
                                "index": index, "input": prompt, "answer_prefix": prefix, "outputs": outputs,
                                "tokens": tokens})
    return records


def needle_records(lengths, depths, *, count=whitespace_count, seed: int = 42, task: str = "niah_single"):
    """One needle sample per (length, depth): RULER's ``task`` with its needle(s) placed at ``depth`` (a share
    of the haystack, 0 to 1) in a prompt of ``length`` tokens (the answer budget included), seeded."""
    records = []
    for max_len in lengths:
        n = _fit_haystack(task, int(max_len), count, seed)
        for depth in depths:
            if not 0.0 <= float(depth) <= 1.0:
                raise ValueError(f"needle depths must lie in [0, 1], got {depth}")
            rng = random.Random(f"{seed}-{task}-{max_len}-depth{depth}")
            prompt, prefix, outputs = generate_one(task, n, rng, depth=float(depth))
            records.append({"id": f"{task}-{max_len}-d{depth}", "task": task, "length": int(max_len),
                            "depth": float(depth), "input": prompt, "answer_prefix": prefix, "outputs": outputs,
                            "tokens": count(prompt + prefix) + TOKENS_TO_GENERATE})
    return records


def save_jsonl(records, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # shards write the same file concurrently: each replace is whole


def load_ruler_jsonl(path, task: str | None = None, length: int | None = None) -> list[dict]:
    """Records from our generator's JSONL or RULER's own ``validation.jsonl`` (index, input, outputs, length)."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}: line {number} is not valid JSON") from None
            missing = [k for k in ("input", "outputs") if k not in r]
            if missing:
                raise ValueError(f"{path}: line {number} lacks field(s) {missing}")
            r.setdefault("task", task or path.parent.name or "ruler")
            r.setdefault("length", length or r.get("length", 0))
            r.setdefault("index", number - 1)
            r.setdefault("answer_prefix", "")
            r.setdefault("id", f"{r['task']}-{r['length']}-{r['index']}")
            records.append(r)
    return records


class Ruler(Benchmark):
    name = "ruler"
    group_fields = ("length", "task")

    def __init__(self, records: list[dict]):
        self.records = records

    def samples(self) -> list[Sample]:
        return [Sample(id=str(r["id"]), prompt=r["input"], answer=list(r["outputs"]),
                       answer_prefix=r.get("answer_prefix", ""), max_new_tokens=TOKENS_TO_GENERATE,
                       meta={"task": r["task"], "length": r["length"]}) for r in self.records]

    def score(self, sample: Sample, prediction: str):
        return prediction.strip()[:200], string_match_all(prediction, sample.answer)
