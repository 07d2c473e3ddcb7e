"""Offline lm-eval tasks built deterministically from the default text's *evaluation* split.

Evaluation suites are data: each task is an lm-eval YAML file in this folder, found by path
(`TaskManager(include_path=TASK_DIR, include_defaults=False)`). Their documents are not shipped as
files; the YAML names a `custom_dataset` function (`pf_data.py`) that rebuilds them from
`pruning_core.data.load_text("pydoc", "eval")` — the same text on every machine with the same
CPython, so the items are identical run to run (a fixed seed, sorted inputs, no hashing of sets).

| task | lm-eval output type | items | metrics |
|---|---|---|---|
| `pydoc_next_sentence` | multiple_choice (4 options) | a sentence; which of 4 sentences follows it | acc, acc_norm |
| `pydoc_last_word` | loglikelihood (LAMBADA-style cloze) | a passage without its last word; the word | acc (greedy), perplexity |
| `pydoc_rolling` | loglikelihood_rolling (wikitext-style) | the eval text cut into sections | word_perplexity, byte_perplexity, bits_per_byte |
| `pkgdocs_last_word` | loglikelihood (cloze), out of domain | the same cloze from `pkgdocs` (installed packages' READMEs) | acc (greedy), perplexity |

The eval split never overlaps the training split used for calibration and LoRA recovery.
"""

from __future__ import annotations

import random
import re
from functools import cache
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
SEED = 1234
N_NEXT_SENTENCE = 200
N_LAST_WORD = 200
N_CHOICES = 4
MIN_SECTION_CHARS = 1500

TASKS = ("pydoc_next_sentence", "pydoc_last_word", "pydoc_rolling", "pkgdocs_last_word")

_UNDERLINE = re.compile(r"^(\*{3,}|={3,}|-{3,})$")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
_WORD = re.compile(r"[A-Za-z]{3,}")


def _text(source: str = "pydoc") -> str:
    from pruning_core.data import load_text

    return load_text(source, "eval")


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose: no indented code, no titles, no bullet lists; whitespace folded."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if not para.strip() or any(ln.startswith((" ", "\t")) for ln in lines):
            continue
        if any(_UNDERLINE.match(ln.strip()) for ln in lines) or para.lstrip().startswith(("*", "-", "+", "[")):
            continue
        flat = " ".join(ln.strip() for ln in lines)
        if len(flat.split()) >= 8 and flat[-1] in ".!?":
            out.append(flat)
    return out


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(paragraph) if s.strip()]


def _good_sentence(s: str) -> bool:
    return 25 <= len(s) <= 300 and len(s.split()) >= 5 and s[-1] in ".!?"


@cache
def next_sentence_items(n: int = N_NEXT_SENTENCE, seed: int = SEED) -> tuple[dict, ...]:
    """(sentence, true next sentence) pairs from the same paragraph; 3 distractors drawn from the
    other sentences of the eval text; option order shuffled with a fixed seed."""
    paras = [_sentences(p) for p in _prose_paragraphs(_text())]
    pool = sorted({s for ss in paras for s in ss if _good_sentence(s)})
    pairs = [(a, b) for ss in paras for a, b in zip(ss, ss[1:]) if _good_sentence(a) and _good_sentence(b)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    items = []
    for ctx, nxt in pairs[:n]:
        distract = []
        while len(distract) < N_CHOICES - 1:
            s = pool[rng.randrange(len(pool))]
            if s not in (ctx, nxt) and s not in distract:
                distract.append(s)
        choices = [nxt, *distract]
        rng.shuffle(choices)
        items.append({"context": ctx, "choices": choices, "label": choices.index(nxt)})
    return tuple(items)


@cache
def last_word_items(n: int = N_LAST_WORD, seed: int = SEED, source: str = "pydoc") -> tuple[dict, ...]:
    """LAMBADA-style cloze: the previous sentence plus the current one up to its last word; the
    target is that word (alphabetic, >= 3 letters) with its leading space; end punctuation dropped."""
    items = []
    for para in _prose_paragraphs(_text(source)):
        ss = _sentences(para)
        for i, s in enumerate(ss):
            if not _good_sentence(s):
                continue
            body = s[:-1].rstrip()
            head, _, last = body.rpartition(" ")
            if not head or not _WORD.fullmatch(last):
                continue
            ctx = (ss[i - 1] + " " + head) if i > 0 else head
            if len(ctx.split()) < 8:
                continue
            items.append({"context": ctx, "target": " " + last})
    rng = random.Random(seed)
    rng.shuffle(items)
    return tuple(items[:n])


@cache
def rolling_docs(min_chars: int = MIN_SECTION_CHARS) -> tuple[dict, ...]:
    """The eval text cut at its section titles (a line underlined with *** / === / ---), short
    sections merged into the next, so each document is a wikitext-like page."""
    lines = _text().split("\n")
    starts = [i - 1 for i in range(1, len(lines)) if _UNDERLINE.match(lines[i].strip()) and lines[i - 1].strip()]
    bounds = sorted({0, *starts}) + [len(lines)]
    docs, buf = [], ""
    for a, b in zip(bounds, bounds[1:]):
        sec = "\n".join(lines[a:b]).strip()
        if not sec:
            continue
        buf = f"{buf}\n\n{sec}" if buf else sec
        if len(buf) >= min_chars:
            docs.append({"page": buf})
            buf = ""
    if buf:
        if docs:
            docs[-1] = {"page": docs[-1]["page"] + "\n\n" + buf}
        else:
            docs.append({"page": buf})
    return tuple(docs)


BUILDERS = {
    "pydoc_next_sentence": next_sentence_items,
    "pydoc_last_word": last_word_items,
    "pydoc_rolling": rolling_docs,
    "pkgdocs_last_word": lambda: last_word_items(source="pkgdocs"),
}


def dataset(task: str):
    """A `{"test": datasets.Dataset}` for lm-eval's `custom_dataset` hook (in memory, no cache files)."""
    import datasets

    return {"test": datasets.Dataset.from_list([dict(d) for d in BUILDERS[task]()])}
