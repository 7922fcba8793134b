"""Readers for the UCIT and MLLM-DCL JSON layouts: task orders, train / test files, caption references, hashes.

Layouts (HiDe-LLaVA / MCITlib data configs; MLLM-CL's ``Domain_data``), under the data root:

- UCIT, order ImageNet-R -> ArxivQA -> VizWiz-Caption -> IconQA -> CLEVR-Math -> Flickr30k:
  ``<Task>/<train file>`` and ``<Task>/test_3000.json``; the two caption tasks also need
  ``<Task>/val_coco_type_3000.json`` (COCO-format references).
- MLLM-DCL, order RS -> Med -> AD -> Sci -> Fin: ``Domain_data/<D>/train.json`` and ``Domain_data/<D>/test.json``.

A train record is LLaVA's ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": answer}]}``; a test record is CoIN's ``{"question_id", "image", "text", "answer"}``
(either form is accepted in either file). Every file's SHA-256 goes into the run manifest, so a changed data
revision (the VizWiz references were fixed on 2025-10-28) is visible in the results.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from clbench.errors import UserError


@dataclass(frozen=True)
class TaskFiles:
    """One task of a real benchmark: its folder, files and scorer name."""

    name: str
    folder: str
    train: str
    test: str
    scorer: str  # exact, caption, ai2d, pvqa, sci, finvis
    references: str | None = None  # COCO-format caption references

    def paths(self, root: Path) -> dict[str, Path]:
        """Every file this task needs, by role."""
        base = root / self.folder
        out = {"train": base / self.train, "test": base / self.test}
        if self.references:
            out["references"] = base / self.references
        return out


UCIT = (
    TaskFiles("ImageNet-R", "ImageNet-R", "train.json", "test_3000.json", "exact"),
    TaskFiles("ArxivQA", "ArxivQA", "train_4w.json", "test_3000.json", "exact"),
    TaskFiles("VizWiz", "VizWiz", "train.json", "test_3000.json", "caption", "val_coco_type_3000.json"),
    TaskFiles("IconQA", "IconQA", "train.json", "test_3000.json", "exact"),
    TaskFiles("CLEVR-Math", "CLEVR-Math", "train_4w.json", "test_3000.json", "exact"),
    TaskFiles("Flickr30k", "Flickr30k", "train_brief_4w.json", "test_3000.json", "caption", "val_coco_type_3000.json"),
)
DCL = (
    TaskFiles("RS", "Domain_data/RS", "train.json", "test.json", "ai2d"),
    TaskFiles("Med", "Domain_data/Med", "train.json", "test.json", "pvqa"),
    TaskFiles("AD", "Domain_data/AD", "train.json", "test.json", "ai2d"),
    TaskFiles("Sci", "Domain_data/Sci", "train.json", "test.json", "sci"),
    TaskFiles("Fin", "Domain_data/Fin", "train.json", "test.json", "finvis"),
)
BENCHMARKS = {"ucit": UCIT, "mllm-dcl": DCL}


@dataclass(frozen=True)
class Item:
    """One instruction example: question (without the ``<image>`` marker), answer, image path, id."""

    id: str
    question: str
    answer: str
    image: str | None


def _one_item(rec: object, path: Path, k: int) -> Item:
    where = f"{path}: record {k}"
    if not isinstance(rec, dict):
        raise UserError(f"{where} is not a JSON object; each record needs question/answer fields (LLaVA or CoIN form)")
    rid = rec.get("question_id", rec.get("id", k))
    if "conversations" in rec:
        conv = rec["conversations"]
        if (not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) and "value" in c
                                                                      for c in conv[:2])):
            raise UserError(f"{where}: 'conversations' must hold a human turn and a gpt turn with 'value'")
        question, answer = str(conv[0]["value"]), str(conv[1]["value"])
    elif "text" in rec and "answer" in rec:
        question, answer = str(rec["text"]), str(rec["answer"])
    else:
        raise UserError(f"{where} has neither 'conversations' nor 'text' + 'answer'; fix or re-download the file")
    question = question.replace("<image>", "").strip()
    image = rec.get("image")
    return Item(str(rid), question, answer, None if image is None else str(image))


def read_items(path: Path) -> list[Item]:
    """The records of one train or test JSON file (a list), with one-line errors for missing or bad files."""
    if not path.is_file():
        raise UserError(f"{path} is missing; download the benchmark's JSON files (see 'clbench data check')")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc.__class__.__name__}: line {getattr(exc, 'lineno', '?')}); "
                        "re-download it") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{path} must hold a non-empty JSON list of records")
    return [_one_item(rec, path, k) for k, rec in enumerate(data)]


def read_references(path: Path) -> dict[str, list[str]]:
    """COCO-format caption references (``{"annotations": [{"image_id", "caption"}]}``) keyed by image id."""
    if not path.is_file():
        raise UserError(f"{path} is missing; the caption task needs its COCO-format references file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        refs: dict[str, list[str]] = {}
        for ann in data["annotations"]:
            refs.setdefault(str(ann["image_id"]), []).append(str(ann["caption"]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a COCO caption file (needs annotations with image_id and caption); "
                        "re-download it") from None
    return refs


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path, benchmark: str) -> dict[str, str]:
    """SHA-256 of every data file of ``benchmark`` under ``root``, keyed by path relative to the root."""
    return {str(p.relative_to(root)): sha256(p) for t in BENCHMARKS[benchmark] for p in t.paths(root).values()}


@dataclass
class TaskStatus:
    """One row of ``clbench data check`` for an MCIT benchmark."""

    name: str
    usable: bool
    n_train: int | None = None
    n_test: int | None = None
    problem: str = ""


def inspect(root: Path, benchmark: str) -> list[TaskStatus]:
    """Read every task's files; a task is usable when all of them parse (images are not opened)."""
    rows = []
    for task in BENCHMARKS[benchmark]:
        paths = task.paths(root)
        try:
            train, test = read_items(paths["train"]), read_items(paths["test"])
            if "references" in paths:
                refs = read_references(paths["references"])
                lacking = [it.id for it in test if it.id not in refs]
                if lacking:
                    raise UserError(f"{paths['references']} has no caption for test id(s) "
                                    f"{', '.join(lacking[:3])}; use the fixed references file")
            rows.append(TaskStatus(task.name, True, len(train), len(test)))
        except UserError as exc:
            rows.append(TaskStatus(task.name, False, problem=str(exc)))
    return rows
