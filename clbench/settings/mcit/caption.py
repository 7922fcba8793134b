"""Caption scores of pycocoevalcap re-derived in pure Python: BLEU-1..4, ROUGE-L, CIDEr(-D), and their average.

UCIT scores VizWiz-Caption and Flickr30k with ``eval_caption``: the mean of BLEU-1, BLEU-2, BLEU-3, BLEU-4, METEOR,
ROUGE-L and CIDEr, each x100 (HiDe-LLaVA, MCITlib). pycocoevalcap tokenises with the Java Stanford PTB tokenizer and
runs METEOR 1.5 in Java. This module is the pure-Python path:

- **Tokenisation** (``ptb_tokenize``): lower-case, split off punctuation, drop the punctuation tokens pycocoevalcap
  drops. It matches the PTB tokenizer on plain words and punctuation; it differs on contractions ("don't" stays
  one token here, PTB gives "do n't") and on rare symbols, which changes BLEU / ROUGE-L / CIDEr only for captions
  that contain them.
- **METEOR** needs Java and WordNet; without them it is absent, and the average is taken over the six other metrics
  (``caption_average`` says which it used, in ``metrics_used``). That is the number that differs from the papers:
  an average of 6 instead of 7 metrics.
- BLEU, ROUGE-L and CIDEr-D follow pycocoevalcap's formulas exactly (corpus BLEU with the "closest" reference
  length and its 1e-15 / 1e-9 smoothing; ROUGE-L with beta 1.2 on max precision / recall over references;
  CIDEr-D with sigma 6, clipped tf-idf, document frequencies from the references of the scored set, x10).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
               ";", "(", ")", "{", "}", "[", "]"}
_TOKEN = re.compile(r"\.\.\.|--|[A-Za-z0-9]+(?:['’][A-Za-z]+)?|[^\sA-Za-z0-9]")


def ptb_tokenize(text: str) -> list[str]:
    """Lower-cased tokens with punctuation removed, approximating pycocoevalcap's PTBTokenizer."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in PUNCTUATION]


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(candidates: Sequence[list[str]], references: Sequence[Sequence[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (fractions) as pycocoevalcap's BleuScorer with option "closest"."""
    tiny, small = 1e-15, 1e-9
    testlen = reflen = 0
    guess = [0] * n
    correct = [0] * n
    for cand, refs in zip(candidates, references, strict=True):
        maxcounts: dict[tuple, int] = {}
        for ref in refs:
            for gram, c in _ngrams(ref, n).items():
                maxcounts[gram] = max(maxcounts.get(gram, 0), c)
        lens = [len(r) for r in refs]
        reflen += min((abs(length - len(cand)), length) for length in lens)[1]
        testlen += len(cand)
        counts = _ngrams(cand, n)
        for k in range(n):
            guess[k] += max(len(cand) - k, 0)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(maxcounts.get(gram, 0), c)
    scores = []
    prod = 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: Sequence[list[str]], references: Sequence[Sequence[list[str]]], beta: float = 1.2) -> float:
    """Mean sentence ROUGE-L F (fraction) as pycocoevalcap's Rouge: max precision and recall over references."""
    total = 0.0
    for cand, refs in zip(candidates, references, strict=True):
        precs, recs = [], []
        for ref in refs:
            lcs = _lcs(ref, cand)
            precs.append(lcs / len(cand) if cand else 0.0)
            recs.append(lcs / len(ref) if ref else 0.0)
        p, r = max(precs), max(recs)
        total += ((1 + beta**2) * p * r) / (r + beta**2 * p) if p != 0 and r != 0 else 0.0
    return total / len(candidates)


def cider_d(candidates: Sequence[list[str]], references: Sequence[Sequence[list[str]]], n: int = 4,
            sigma: float = 6.0) -> float:
    """Corpus CIDEr-D as pycocoevalcap's Cider (its "CIDEr"): mean over items of the x10 per-item score."""
    ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({g for counts in refs for g in counts})
    log_n = math.log(float(len(references)))

    def vec(counts: Counter):
        v = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            v[k][gram] = float(tf) * (log_n - math.log(max(1.0, df[gram])))
            norm[k] += v[k][gram] ** 2
            if k == 1:  # pycocoevalcap counts the length in bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    total = 0.0
    for cand, refs in zip(candidates, ref_counts, strict=True):
        vh, nh, lh = vec(_ngrams(cand, n))
        score = [0.0] * n
        for counts in refs:
            vr, nr, lr = vec(counts)
            delta = float(lh - lr)
            for k in range(n):
                val = sum(min(x, vr[k][g]) * vr[k][g] for g, x in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                score[k] += val * math.exp(-(delta**2) / (2 * sigma**2))
        total += sum(score) / n / len(refs) * 10.0
    return total / len(candidates)


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   max_chars: int | None = 300) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and CIDEr (x100) of predictions keyed by id against their reference captions.

    Each prediction is truncated to ``max_chars`` first (KeepLoRA: 300; ``None`` keeps it whole as MCITlib's
    LoRA-FT does). Every prediction id needs at least one reference.
    """
    ids = sorted(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no reference caption for id(s) {', '.join(map(str, missing[:5]))}")
    cands = [ptb_tokenize(predictions[i] if max_chars is None else predictions[i][:max_chars]) for i in ids]
    refs = [[ptb_tokenize(r) for r in references[i]] for i in ids]
    b = bleu(cands, refs)
    out = {f"BLEU_{k + 1}": 100.0 * b[k] for k in range(4)}
    out["ROUGE_L"] = 100.0 * rouge_l(cands, refs)
    out["CIDEr"] = 100.0 * cider_d(cands, refs)
    return out


def caption_average(scores: Mapping[str, float]) -> tuple[float, list[str]]:
    """The UCIT caption score: mean of the metrics present (7 with METEOR, else 6) and the names used."""
    names = [k for k in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr") if k in scores]
    return sum(scores[k] for k in names) / len(names), names
