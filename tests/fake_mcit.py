"""Fake UCIT / MLLM-DCL trees (JSON files only) that the tests write, in the official layouts."""

from __future__ import annotations

import json
from pathlib import Path

from clbench.settings.mcit.data import BENCHMARKS


def write_fake(root: Path, benchmark: str, n_train: int = 3, n_test: int = 2) -> Path:
    """Write every JSON file of ``benchmark`` under ``root`` (train in LLaVA form, test in CoIN form)."""
    for task in BENCHMARKS[benchmark]:
        paths = task.paths(root)
        paths["train"].parent.mkdir(parents=True, exist_ok=True)
        train = [{"id": f"{task.name}-{k}", "image": f"images/{k}.png",
                  "conversations": [{"from": "human", "value": f"<image>\nQuestion {k}?"},
                                    {"from": "gpt", "value": f"answer {k}"}]} for k in range(n_train)]
        test = [{"question_id": f"q{k}", "image": f"images/t{k}.png", "text": f"<image>\nWhat {k}?",
                 "answer": f"a{k}"} for k in range(n_test)]
        paths["train"].write_text(json.dumps(train))
        paths["test"].write_text(json.dumps(test))
        if "references" in paths:
            anns = [{"image_id": f"q{k}", "caption": f"a photo number {k}"} for k in range(n_test)]
            paths["references"].write_text(json.dumps({"annotations": anns, "images": []}))
    return root
