"""Write `long_qa.jsonl`: a small long-context QA dataset for the `qa` task, made here rather than downloaded.

Each record's context states 6-16 facts ("The number of owls in Maple Zoo equals 7."), all about different
quantities; the question asks for one of them and the answer is its number. `difficulty` grows with the number of
facts: 1 (6-9), 2 (10-13), 3 (14-16). The words are GSM-Infinite's, so `data/tokenizers/gsm_infinite` covers them.
Deterministic:

    python data/examples/make_long_qa.py          # rewrites data/examples/long_qa.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from retrofit.tasks.gsm_infinite import LEAF, QUANTITIES

RECORDS = 400
OUT = Path(__file__).with_name("long_qa.jsonl")


def record(rng: random.Random) -> dict:
    facts = rng.randint(6, 16)
    names = rng.sample(QUANTITIES, facts)
    values = [rng.randint(0, 99) for _ in names]
    asked = rng.randrange(facts)
    return {
        "context": " ".join(LEAF.format(x=name, n=value) for name, value in zip(names, values, strict=True)),
        "question": f"What is the number of {names[asked]}?",
        "answer": str(values[asked]),
        "difficulty": min(1 + (facts - 6) // 4, 3),
    }


def main() -> None:
    rng = random.Random("long_qa/0")
    OUT.write_text("".join(json.dumps(record(rng)) + "\n" for _ in range(RECORDS)))


if __name__ == "__main__":
    main()
