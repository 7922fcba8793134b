"""Answer scorers of the official UCIT and MLLM-DCL evaluation scripts, as pure functions.

Each ``*_item`` function scores one prediction against one ground truth (1, 0 or a fraction); ``accuracy`` turns a
list of item scores into the percentage the official scripts print (``100 * right / total``; every item counts in
the total, including those scored 0 because the prediction says "Unanswerable").

Sources: UCIT's ``eval_deepseek_r1.eval_single`` (HiDe-LLaVA / MCITlib ``llava/eval/CoIN``) for exact match;
MLLM-CL's ``eval_ai2d``, ``eval_pvqa``, ``eval_sci`` and ``eval_finvis`` (github.com/bjzhb666/MLLM-CL,
``ETrain/Eval/LLaVA/CoIN``) in the versions KeepLoRA ships with MCITlib for the DCL domains.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

MAX_TEXT_LENGTH = 300  # KeepLoRA truncates each caption prediction to 300 characters before scoring


def truncate(prediction: str, limit: int = MAX_TEXT_LENGTH) -> str:
    """The first ``limit`` characters of a prediction, as KeepLoRA's caption evaluation does."""
    return prediction[:limit]


def exact_match_item(prediction: str, answer: str) -> float:
    """UCIT exact match: the whole strings equal after ``upper()`` (no stripping, no containment)."""
    return 1.0 if prediction.upper() == answer.upper() else 0.0


def _unanswerable(prediction: str) -> bool:
    return "Unanswerable" in prediction  # case-sensitive, as in the official scripts


def ai2d_item(prediction: str, answer: str) -> float:
    """RS / AD (``eval_ai2d``): lower-cased containment; a one-word answer must appear as a word.

    A multi-word answer scores when it is a substring of the prediction. A one-word answer (periods removed) scores
    when it starts the prediction or follows a space, and is followed by a space, ``.``, ``,`` or the end.
    A prediction containing "Unanswerable" scores 0.
    """
    if _unanswerable(prediction):
        return 0.0
    pred, gt = prediction.lower(), answer.lower()
    if len(gt.split()) > 1:
        return 1.0 if gt in pred else 0.0
    word = gt.replace(".", "").strip()
    if not word:
        return 0.0
    return 1.0 if re.search(r"(?:^|\s)" + re.escape(word) + r"(?:[\s.,]|$)", pred) else 0.0


def pvqa_item(prediction: str, answer: str) -> float:
    """Med (``eval_pvqa``): the lower-cased answer is a substring of the lower-cased prediction."""
    if _unanswerable(prediction):
        return 0.0
    return 1.0 if answer.lower() in prediction.lower() else 0.0


EXACT_SCI_SOURCES = ("AI2D", "TQA", "VQA", "SciVerse")


def sci_item(prediction: str, answer: str, question: str = "", image: str = "") -> float:
    """Sci (``eval_sci``): exact match for AI2D / TQA / VQA / SciVerse images, MapQA rules otherwise.

    The source is the image file name's prefix before the first ``_``. For MapQA, a "Which states" question scores
    the fraction of comma-separated answer items found among the prediction's comma-separated items (compared as
    written, without stripping spaces); any other MapQA question scores by containment.
    """
    if _unanswerable(prediction):
        return 0.0
    pred, gt = prediction.lower(), answer.lower()
    source = image.replace("\\", "/").split("/")[-1].split("_")[0]
    if source in EXACT_SCI_SOURCES:
        return 1.0 if pred == gt else 0.0
    if "Which states" in question:
        items = gt.split(",")
        predicted = pred.split(",")
        return sum(1 for g in items if g in predicted) / len(items)
    return 1.0 if gt in pred else 0.0


def finvis_item(prediction: str, answer: str) -> float:
    """Fin (``eval_finvis``): exact match, lower-cased, after removing spaces and periods from both."""
    if _unanswerable(prediction):
        return 0.0

    def norm(s: str) -> str:
        return s.lower().replace(" ", "").replace(".", "")

    return 1.0 if norm(prediction) == norm(answer) else 0.0


ItemScorer = Callable[..., float]


def accuracy(scores: Sequence[float]) -> float:
    """Percentage over all items (``100 * sum / N``), as the official scripts print it; 0 items is an error."""
    if not scores:
        raise ValueError("no items to score")
    return 100.0 * float(sum(scores)) / len(scores)
