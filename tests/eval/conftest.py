"""Multiple-choice fixtures in the HellaSwag, ARC and PIQA formats built from the corpus's words."""

import json
import random

import pytest

WORDS = ("expert router token layer gradient batch window split value train model loss "
         "attention norm rotary vocabulary merge corpus document python code function").split()


def _phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="session")
def choice_tasks(tmp_path_factory):
    """{format: jsonl path}, 16 items each; answers vary in length so acc and acc_norm can differ."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(7)
    rows = {"hellaswag": [], "arc": [], "piqa": []}
    for i in range(16):
        endings = [_phrase(rng, rng.randint(2, 9)) for _ in range(4)]
        rows["hellaswag"].append({
            "ind": i, "activity_label": rng.choice(WORDS).capitalize(),
            "ctx_a": f"marker{i:03d}x {_phrase(rng, 6)} [title] {_phrase(rng, 2)}.",
            "ctx_b": _phrase(rng, 3), "ctx": "", "endings": endings, "label": str(i % 4),
            "split": "val", "split_type": "indomain", "source_id": f"s{i}"})
        labels = ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3", "4"]
        rows["arc"].append({"id": f"q{i}", "question": f"{_phrase(rng, 5)}?",
                            "choices": {"text": [_phrase(rng, rng.randint(1, 6)) for _ in range(4)],
                                        "label": labels},
                            "answerKey": labels[(i * 3) % 4]})
        rows["piqa"].append({"goal": _phrase(rng, 6), "sol1": _phrase(rng, rng.randint(2, 8)),
                             "sol2": _phrase(rng, rng.randint(2, 8)), "label": i % 2})
    paths = {}
    for fmt, items in rows.items():
        paths[fmt] = root / f"{fmt}_local.jsonl"
        paths[fmt].write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths
