"""Downstream tasks whose labels the source text defines, built from the shipped public-domain corpora.

- ``austen-novel``: which of Jane Austen's six novels a paragraph comes from (6 classes). The corpus
  (``benchmarks/corpora/austen.txt``, janeaustenr's text) holds the novels one after another, each
  opening with its title on a line of its own; the label of a paragraph is the last title above it.
- ``kjv-division``: which traditional division of the Bible a King James chapter belongs to
  (law, history, wisdom, prophets, gospels and Acts, epistles and Revelation: 6 classes). The corpus
  (``benchmarks/corpora/kjv_chapters.txt``) holds the 1,189 chapters in canonical order; the canonical
  chapter count of each of the 66 books gives every chapter its book, and the book its division.

No label comes from a model or a heuristic of ours: the novel's title and the book's place in the
canon are part of the source. `write_task` splits the rows into ``train.jsonl`` and
``validation.jsonl`` (stratified, seeded) for ``kd finetune --task DIR --text-fields text``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

AUSTEN_NOVELS = ("Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice",
                 "Sense and Sensibility")  # fmt: skip
AUSTEN_TITLES = {n.upper(): n for n in AUSTEN_NOVELS}

# (book, chapters, division) in canonical order: 39 + 27 books, 929 + 260 chapters.
KJV_BOOKS = [
    *[(b, n, "law") for b, n in (("Genesis", 50), ("Exodus", 40), ("Leviticus", 27), ("Numbers", 36),
                                   ("Deuteronomy", 34))],
    *[(b, n, "history") for b, n in (("Joshua", 24), ("Judges", 21), ("Ruth", 4), ("1 Samuel", 31),
                                       ("2 Samuel", 24), ("1 Kings", 22), ("2 Kings", 25), ("1 Chronicles", 29),
                                       ("2 Chronicles", 36), ("Ezra", 10), ("Nehemiah", 13), ("Esther", 10))],
    *[(b, n, "wisdom") for b, n in (("Job", 42), ("Psalms", 150), ("Proverbs", 31), ("Ecclesiastes", 12),
                                      ("Song of Solomon", 8))],
    *[(b, n, "prophets") for b, n in (("Isaiah", 66), ("Jeremiah", 52), ("Lamentations", 5), ("Ezekiel", 48),
                                        ("Daniel", 12), ("Hosea", 14), ("Joel", 3), ("Amos", 9), ("Obadiah", 1),
                                        ("Jonah", 4), ("Micah", 7), ("Nahum", 3), ("Habakkuk", 3),
                                        ("Zephaniah", 3), ("Haggai", 2), ("Zechariah", 14), ("Malachi", 4))],
    *[(b, n, "gospels and Acts") for b, n in (("Matthew", 28), ("Mark", 16), ("Luke", 24), ("John", 21),
                                                ("Acts", 28))],
    *[(b, n, "epistles and Revelation") for b, n in (
        ("Romans", 16), ("1 Corinthians", 16), ("2 Corinthians", 13), ("Galatians", 6), ("Ephesians", 6),
        ("Philippians", 4), ("Colossians", 4), ("1 Thessalonians", 5), ("2 Thessalonians", 3),
        ("1 Timothy", 6), ("2 Timothy", 4), ("Titus", 3), ("Philemon", 1), ("Hebrews", 13), ("James", 5),
        ("1 Peter", 5), ("2 Peter", 3), ("1 John", 5), ("2 John", 1), ("3 John", 1), ("Jude", 1),
        ("Revelation", 22))],
]  # fmt: skip


def austen_novels(lines: list[str], min_words: int = 30, max_words: int = 150) -> list[dict]:
    """Paragraphs of `min_words`..`max_words` words, each labelled with the novel it comes from."""
    rows, novel, seen = [], None, []
    for line in lines:
        title = line.strip().upper()
        if title in AUSTEN_TITLES and title not in seen:
            novel = AUSTEN_TITLES[title]
            seen.append(title)
            continue
        if novel and min_words <= len(line.split()) <= max_words:
            rows.append({"text": line.strip(), "label": novel})
    if sorted(seen) != sorted(AUSTEN_TITLES):
        raise ValueError(f"austen corpus: found the titles {seen}, expected the six novels")
    return rows


def kjv_divisions(lines: list[str], max_chars: int = 2000) -> list[dict]:
    """Every chapter (its first `max_chars` characters) with its book and the book's division."""
    chapters = [line.strip() for line in lines if line.strip()]
    expected = sum(n for _, n, _ in KJV_BOOKS)
    if len(chapters) != expected:
        raise ValueError(f"kjv corpus: {len(chapters)} chapters, the canon has {expected}")
    rows, i = [], 0
    for book, n, division in KJV_BOOKS:
        for chapter in range(1, n + 1):
            rows.append(
                {"text": chapters[i][:max_chars], "label": division, "book": book, "chapter": chapter}
            )
            i += 1
    return rows


def write_task(rows: list[dict], out_dir: Path, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """`n_train` and `n_eval` rows, stratified by label, as ``train.jsonl`` and ``validation.jsonl``."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    rng = random.Random(seed)
    train, evals = [], []
    total = len(rows)
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        k_train = round(n_train * len(group) / total)
        k_eval = round(n_eval * len(group) / total)
        train += group[:k_train]
        evals += group[k_train : k_train + k_eval]
    rng.shuffle(train)
    rng.shuffle(evals)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("validation", evals)):
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    return out_dir
