"""UCIT / MLLM-DCL scorers and the pure-Python caption metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from clbench.settings.mcit import caption as cap
from clbench.settings.mcit import scorers as sc


def test_exact_match_is_whole_string_case_insensitive():
    assert sc.exact_match_item("Cat", "cat") == 1.0
    assert sc.exact_match_item("cat.", "cat") == 0.0
    assert sc.exact_match_item(" cat", "cat") == 0.0
    assert sc.exact_match_item("a cat", "cat") == 0.0


def test_ai2d_one_word_must_be_a_word_and_multi_word_is_containment():
    assert sc.ai2d_item("The answer is Harbor.", "harbor") == 1.0
    assert sc.ai2d_item("harbor", "Harbor.") == 1.0          # periods of a one-word answer are dropped
    assert sc.ai2d_item("harbors nearby", "harbor") == 0.0
    assert sc.ai2d_item("seaharbor", "harbor") == 0.0
    assert sc.ai2d_item("harbor, then", "harbor") == 1.0
    assert sc.ai2d_item("two parking lots", "parking lot") == 1.0  # multi-word: plain containment
    assert sc.ai2d_item("Unanswerable harbor", "harbor") == 0.0


def test_pvqa_is_substring_containment():
    assert sc.pvqa_item("Yesterday", "yes") == 1.0
    assert sc.pvqa_item("no", "yes") == 0.0
    assert sc.pvqa_item("Unanswerable yes", "yes") == 0.0


def test_sci_exact_for_diagram_sources_and_mapqa_fraction():
    assert sc.sci_item("B", "b", image="imgs/AI2D_12.png") == 1.0
    assert sc.sci_item("b.", "b", image="imgs/TQA_3.png") == 0.0
    q = "Which states have the highest value?"
    assert sc.sci_item("Texas,Utah", "texas,ohio,utah", question=q, image="map_1.png") == pytest.approx(2 / 3)
    # items compared as written: a space after the comma makes " utah" differ from "utah"
    assert sc.sci_item("texas, utah", "texas,ohio,utah", question=q, image="map_1.png") == pytest.approx(1 / 3)
    assert sc.sci_item("it is ohio", "ohio", question="Does Ohio ...", image="map_1.png") == 1.0


def test_finvis_ignores_spaces_and_periods():
    assert sc.finvis_item("A.", "a") == 1.0
    assert sc.finvis_item("Tr ue", "true") == 1.0
    assert sc.finvis_item("B", "a") == 0.0


def test_accuracy_counts_every_item():
    assert sc.accuracy([1.0, 0.0, 0.5, 0.5]) == 50.0
    with pytest.raises(ValueError):
        sc.accuracy([])


def test_truncation_keeps_300_characters():
    assert len(sc.truncate("x" * 500)) == 300


def test_tokenizer_lowercases_and_drops_punctuation():
    assert cap.ptb_tokenize("A man, riding a horse.") == ["a", "man", "riding", "a", "horse"]


def test_bleu_by_hand_with_brevity_penalty():
    b = cap.bleu([["a", "cat", "sat"]], [[["a", "cat", "sat", "on", "mat"]]])
    bp = math.exp(1 - 5 / 3)
    assert b[0] == pytest.approx(bp)
    assert b[2] == pytest.approx(bp)
    # no 4-gram in a 3-token candidate: (0 + 1e-15) / (0 + 1e-9) = 1e-6 enters the geometric mean
    assert b[3] == pytest.approx((1e-6) ** 0.25 * bp)


def test_bleu_clips_counts_to_the_reference():
    b = cap.bleu([["the"] * 4], [[["the", "cat"]]])
    assert b[0] == pytest.approx(0.25)


def test_bleu_picks_the_closest_reference_length():
    # references of length 2 and 4 for a 3-token candidate: tie on distance, the shorter one (2) is taken
    b = cap.bleu([["a", "b", "c"]], [[["a", "b"], ["a", "b", "c", "d"]]])
    assert b[0] == pytest.approx(1.0)


def test_bleu_brevity_penalty_uses_the_closest_not_the_shortest_reference():
    """pycocoevalcap's BleuScorer ("closest"): the reference length closest to the candidate's, ties to the
    shorter. Here the shortest (2) and the mean (4) would give no penalty; the closest (6) does."""
    cand = ["a", "b", "c", "d", "e"]
    b = cap.bleu([cand], [[["a", "b"], ["a", "b", "c", "d", "e", "f"]]])
    assert b[0] == pytest.approx(math.exp(1 - 6 / 5))
    # lengths 2, 4 and 6 for 5 tokens: 4 and 6 tie at distance 1, the shorter (4) is taken: no penalty
    b = cap.bleu([cand], [[["a", "b"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e", "f"]]])
    assert b[0] == pytest.approx(1.0)


def test_cider_idf_is_log_n_over_document_frequency():
    """CIDEr-D's idf is ``log(N) − log(max(1, df))`` with N the number of images and df the number of images whose
    references hold the n-gram (pycocoevalcap's ``log(float(len(crefs)))``). Here "a" is in two of the three
    images' references, the other unigrams in one, so the idfs differ and the partial match's cosine depends on
    their ratio (a common ``log(N + 1)`` would not cancel)."""
    refs = [[["a", "b"]], [["a", "c"]], [["d", "e"]]]
    idf_a, idf_b = math.log(3) - math.log(2), math.log(3)
    # image 1 predicted "a": unigram cosine idf_a / ‖(idf_a, idf_b)‖, no bigram, one bigram shorter -> exp(-1/72)
    first = 10 * idf_a / math.hypot(idf_a, idf_b) * math.exp(-1 / 72) / 4
    assert cap.cider_d([["a"], ["a", "c"], ["d", "e"]], refs) == pytest.approx((first + 5.0 + 5.0) / 3)


def test_rouge_l_by_hand():
    f = cap.rouge_l([["a", "cat", "sat"]], [[["a", "cat", "sat", "on", "mat"]]])
    assert f == pytest.approx((1 + 1.44) * 1.0 * 0.6 / (0.6 + 1.44 * 1.0))


def test_cider_by_hand_two_images():
    refs = [[["a", "b"]], [["c", "d"]]]
    assert cap.cider_d([["a", "b"], ["c", "d"]], refs) == pytest.approx(5.0)
    # image 1 predicted "a": unigram cosine 1/sqrt(2), no bigram, length gap of one bigram -> exp(-1/72)
    first = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    assert cap.cider_d([["a"], ["c", "d"]], refs) == pytest.approx((first + 5.0) / 2)
    # "a a": the candidate's tf-idf 2*log2 is clipped to the reference's log2 (CIDEr-D), norm stays 2*log2
    clipped = 10 * (1 / (2 * math.sqrt(2))) / 4
    assert cap.cider_d([["a", "a"], ["c", "d"]], refs) == pytest.approx((clipped + 5.0) / 2)


def test_caption_scores_truncate_and_average_without_meteor():
    preds = {"1": "a b", "2": "c d" + " z" * 200}
    refs = {"1": ["a b"], "2": ["c d"]}
    whole = cap.caption_scores(preds, refs, max_chars=None)
    cut = cap.caption_scores(preds, refs, max_chars=3)
    assert cut["CIDEr"] == pytest.approx(500.0)
    assert whole["CIDEr"] < cut["CIDEr"]
    avg, names = cap.caption_average(cut)
    assert names == ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"]
    assert avg == pytest.approx(sum(cut[k] for k in names) / 6)
    avg7, names7 = cap.caption_average({**cut, "METEOR": 10.0})
    assert len(names7) == 7 and avg7 == pytest.approx((sum(cut[k] for k in names) + 10.0) / 7)


def test_caption_scores_need_a_reference_for_every_prediction():
    with pytest.raises(ValueError, match="no reference"):
        cap.caption_scores({"1": "a"}, {})


def test_rouge_l_takes_max_precision_and_max_recall_over_references():
    # ref 1: LCS 2 -> P 1, R 0.5; ref 2: LCS 1 -> P 0.5, R 0.5; pycocoevalcap combines max P = 1 with max R = 0.5
    f = cap.rouge_l([["a", "b"]], [[["a", "b", "c", "d"], ["a", "x"]]])
    assert f == pytest.approx(2.44 * 0.5 / (0.5 + 1.44))
