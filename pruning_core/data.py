"""Text sources and the calibration set.

The embedded default is the English prose that ships with every CPython (`pydoc_data.topics`):
79 topics, ~113k SmolLM2 tokens. It is split *by topic*, deterministically, so the parts never
overlap: walking the topics in sorted order, a topic goes to the evaluation part while that part
holds less than 20 % of the characters seen so far; the rest is training text (calibration and
recovery fine-tuning).

`pkgdocs` is the out-of-domain evaluation text: the running-prose paragraphs of the long descriptions
(READMEs, `METADATA`) of every installed distribution, walked in sorted name order, markup and code
dropped, each paragraph kept once (~75k SmolLM2 tokens with `requirements.lock`'s packages). It is
English about HTTP clients, dates, plotting, clouds and licences rather than the language reference,
shares nothing with pydoc, and is evaluation-only: every split is the whole text, and calibrating or
training on it is refused, so no calibration set can overlap it.

Other sources: a local `.txt` / `.jsonl` (field `text`) / `.parquet` (column `text`) file, or a
Hugging Face dataset `hf:<name>[:<config>]` (only when the hub is reachable).
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from pathlib import Path

import torch

from .errors import ConfigError, DataError

DEFAULT_SOURCE = "pydoc"
OOD_SOURCE = "pkgdocs"
SPLITS = ("train", "eval", "all")
EVAL_FRACTION = 0.2


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(topics)


def _pydoc_text(split: str) -> str:
    topics = pydoc_topics()
    keys = sorted(topics)
    docs = [topics[k] for k in keys]
    return "\n\n".join(_split_docs(docs, split))


_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_EMPH = re.compile(r"\*\*([^*]+)\*\*|\*([^*]+)\*")
_CODEISH = re.compile(r"[{}<>=|#$\\`]|\(\)|::|__|https?:|www\.|\.py\b|--|\w\.\w+\(")
_BULLET = re.compile(r"^([-*+]|\d+\.)\s+")


def _prose_of(body: str) -> list[str]:
    """Running-prose paragraphs of a Markdown / reStructuredText document, each folded to one line:
    links and emphasis reduced to their words; code, tables, titles, URLs and short lines dropped."""
    out = []
    for para in re.split(r"\n\s*\n", body):
        lines = para.split("\n")
        if not para.strip() or any(ln.startswith(("    ", "\t")) for ln in lines):
            continue
        flat = _BULLET.sub("", " ".join(ln.strip() for ln in lines))
        if flat.startswith(("[", "!", "#", ">", "..", ":", "|", "=")):
            continue
        flat = _EMPH.sub(lambda m: m.group(1) or m.group(2), _RST_LINK.sub(r"\1", _MD_LINK.sub(r"\1", flat)))
        flat = re.sub(r"`+([^`]+)`+_?", r"\1", flat)
        if _CODEISH.search(flat) or len(flat.split()) < 8 or flat[-1] not in ".!?":
            continue
        if sum(c.isalpha() or c in " ,.;" for c in flat) < 0.93 * len(flat):
            continue
        out.append(flat)
    return out


def _long_description(dist) -> str:
    """The body of a distribution's METADATA (its README), parsed from the file with the standard library:
    importing mlflow swaps `importlib.metadata` for the `importlib_metadata` backport, whose `Message`
    has no payload, so `dist.metadata.get_payload()` gave '' after it (and the text depended on imports)."""
    import email

    raw = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    body = email.message_from_string(raw).get_payload()
    return body if isinstance(body, str) else ""


@functools.cache
def pkgdocs_documents() -> tuple[tuple[str, str], ...]:
    """[(distribution, prose)] for every installed distribution with prose in its long description,
    sorted by normalised name; a paragraph already seen (shared boilerplate) is kept only the first time.
    pruneflow's own README is left out."""
    import importlib.metadata as im

    dists = {}
    for d in im.distributions():
        name = d.metadata["Name"]
        if name:
            dists.setdefault(re.sub(r"[-_.]+", "-", name).lower(), d)
    seen, docs = set(), []
    for key in sorted(dists):
        if key == "pruneflow":
            continue
        paras = [p for p in _prose_of(_long_description(dists[key])) if not (p in seen or seen.add(p))]
        if paras:
            docs.append((key, "\n\n".join(paras)))
    return tuple(docs)


def _file_texts(path: Path) -> list[str]:
    suf = path.suffix.lower()
    if suf == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suf == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" not in row:
                raise DataError("calibration.source", str(path), f"JSON lines with a 'text' field (line {n + 1})")
            out.append(row["text"])
        return out
    if suf == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DataError("calibration.source", str(path), "a parquet file with a 'text' column")
        return [t for t in table.column("text").to_pylist() if t]
    raise DataError("calibration.source", str(path), "a .txt, .jsonl or .parquet file, 'pydoc', or 'hf:<dataset>'")


def eval_mask(lengths: list[int], fraction: float = EVAL_FRACTION) -> list[bool]:
    """Deterministic, order-based split: a document goes to eval while eval holds less than
    `fraction` of the characters seen so far. Whole documents, so the parts never overlap."""
    mask, seen, in_eval = [], 0, 0
    for n in lengths:
        seen += n
        e = in_eval < fraction * seen
        in_eval += n if e else 0
        mask.append(e)
    return mask


def _split_docs(docs: list[str], split: str) -> list[str]:
    if split == "all":
        return docs
    if len(docs) == 1:  # one long document: split by paragraphs, the same rule as topics
        docs = [p for p in docs[0].split("\n\n") if p.strip()]
    mask = eval_mask([len(d) for d in docs])
    chosen = [d for d, e in zip(docs, mask) if e == (split == "eval")]
    if split == "eval":  # documents may share paragraphs (pydoc topics do): drop those seen in train
        seen = {p.strip() for d, e in zip(docs, mask) if not e for p in d.split("\n\n")}
        chosen = ["\n\n".join(p for p in d.split("\n\n") if p.strip() not in seen) for d in chosen]
    return [d for d in chosen if d.strip()]


def load_text(source: str = DEFAULT_SOURCE, split: str = "train") -> str:
    """The text of `source` restricted to `split` ("train", "eval" or "all")."""
    if split not in SPLITS:
        raise ConfigError("split", split, ", ".join(SPLITS))
    if source in (None, "", DEFAULT_SOURCE):
        return _pydoc_text(split)
    if source == OOD_SOURCE:
        if split == "train":
            raise DataError("calibration.source", source, "a text other than 'pkgdocs' (it is evaluation-only)")
        return "\n\n".join(text for _, text in pkgdocs_documents())
    if source.startswith("hf:"):
        return "\n\n".join(_split_docs(_hf_texts(source[3:]), split))
    path = Path(os.path.expanduser(source))
    if not path.exists():
        raise DataError("calibration.source", source, "an existing .txt/.jsonl/.parquet path, 'pydoc', 'pkgdocs' or 'hf:<dataset>'")
    return "\n\n".join(_split_docs(_file_texts(path), split))


def _hf_texts(spec: str) -> list[str]:
    parts = spec.split(":")
    name, config = parts[0], (parts[1] if len(parts) > 1 else None)
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError("calibration.source", "hf:" + spec, "a local file or 'pydoc' (the hub is offline: HF_HUB_OFFLINE=1)")
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split="train")
    except Exception as e:  # network, missing dataset
        raise DataError("calibration.source", "hf:" + spec, "a reachable Hugging Face dataset", str(e)[:120]) from e
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    return [t for t in ds[col] if isinstance(t, str) and t]


def source_digest(source: str | None) -> str:
    """What a text source's content is, as a digest: the text that a split of it is cut from.
    `pydoc`: the topics of the running CPython; `pkgdocs`: the prose of the installed distributions;
    a local file: its bytes; `hf:<name>`: the dataset's resolved hub revision. (The split itself is
    code, in this module.)"""
    import hashlib

    if source in (None, "", DEFAULT_SOURCE):
        return "pydoc:" + hashlib.sha256(json.dumps(pydoc_topics(), sort_keys=True).encode()).hexdigest()[:16]
    if source == OOD_SOURCE:
        return "pkgdocs:" + hashlib.sha256(json.dumps(pkgdocs_documents()).encode()).hexdigest()[:16]
    if source.startswith("hf:"):
        return f"{source}@{_hf_revision(source[3:].split(':')[0])}"
    path = Path(os.path.expanduser(source))
    if path.is_file():
        from .digest import file_digest

        return "file:" + file_digest(path)[:16]
    return source  # not readable: the step that reads it says so


def _hf_revision(name: str) -> str:
    """The commit a hub dataset's default revision resolves to (the datasets cache keys on it too)."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return "offline"  # such a source is refused when read (`_hf_texts`)
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name).sha or "unknown"
    except Exception as e:  # noqa: BLE001 - unreachable or unknown: the read says so in one line
        raise DataError("calibration.source", "hf:" + name, "a reachable Hugging Face dataset",
                        str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from None


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D stream of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def calibration_set(
    tokenizer, source: str = DEFAULT_SOURCE, n_samples: int = 32, seq_len: int = 256, seed: int = 0, split: str = "train",
    sampling: str = "chunks",
) -> torch.Tensor:
    """N x L token blocks. `sampling="chunks"`: the stream is cut into L-token chunks and N distinct
    chunks are drawn (seeded, torch). `sampling="random_windows"`: the Wanda / SparseGPT / LLM-Rank
    loaders' draw — `random.seed(seed)`, each window starts at `randint(0, n_tokens - L - 1)`, with
    replacement (windows may overlap)."""
    if sampling not in ("chunks", "random_windows"):
        raise ConfigError("calibration.sampling", sampling, "chunks or random_windows")
    if n_samples < 1:
        raise ConfigError("calibration.n_samples", n_samples, "an integer >= 1")
    if seq_len < 2:
        raise ConfigError("calibration.seq_len", seq_len, "an integer >= 2")
    ids = tokenize_text(tokenizer, load_text(source, split))
    n_chunks = ids.numel() // seq_len
    if sampling == "random_windows":
        if ids.numel() < seq_len + 1:
            raise DataError("calibration.seq_len", seq_len, f"at most {ids.numel() - 1} tokens from {source!r}")
        rng = random.Random(seed)
        starts = [rng.randint(0, ids.numel() - seq_len - 1) for _ in range(n_samples)]
        return torch.stack([ids[a:a + seq_len] for a in starts])
    if n_chunks < n_samples:
        raise DataError(
            "calibration.n_samples",
            n_samples,
            f"at most {n_chunks} samples of {seq_len} tokens from {source!r} ({ids.numel()} tokens in split {split!r})",
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_chunks, generator=g)[:n_samples].sort().values
    return ids[: n_chunks * seq_len].view(n_chunks, seq_len)[pick].clone()


def eval_tokens(tokenizer, source: str = DEFAULT_SOURCE) -> torch.Tensor:
    return tokenize_text(tokenizer, load_text(source, "eval"))
