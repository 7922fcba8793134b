"""UCIT / MLLM-DCL readers on fake trees: orders, both record forms, hashes, and one-line errors."""

from __future__ import annotations

import json

import pytest
from fake_mcit import write_fake

from clbench.errors import UserError
from clbench.settings.mcit import data


def test_orders_match_the_official_scripts():
    assert [t.name for t in data.UCIT] == ["ImageNet-R", "ArxivQA", "VizWiz", "IconQA", "CLEVR-Math", "Flickr30k"]
    assert [t.name for t in data.DCL] == ["RS", "Med", "AD", "Sci", "Fin"]
    assert [t.scorer for t in data.DCL] == ["ai2d", "pvqa", "ai2d", "sci", "finvis"]


@pytest.mark.parametrize("bench", ["ucit", "mllm-dcl"])
def test_fake_tree_reads_and_hashes(tmp_path, bench):
    write_fake(tmp_path, bench)
    rows = data.inspect(tmp_path, bench)
    assert all(r.usable for r in rows) and rows[0].n_train == 3 and rows[0].n_test == 2
    hashes = data.file_hashes(tmp_path, bench)
    first = data.BENCHMARKS[bench][0].paths(tmp_path)["train"]
    assert hashes[str(first.relative_to(tmp_path))] == data.sha256(first)
    first.write_text(first.read_text() + " ")
    assert data.file_hashes(tmp_path, bench)[str(first.relative_to(tmp_path))] != hashes[
        str(first.relative_to(tmp_path))]


def test_both_record_forms(tmp_path):
    write_fake(tmp_path, "ucit")
    train = data.read_items(tmp_path / "ArxivQA" / "train_4w.json")
    test = data.read_items(tmp_path / "ArxivQA" / "test_3000.json")
    assert (train[1].question, train[1].answer) == ("Question 1?", "answer 1")
    assert (test[0].id, test[0].question, test[0].answer) == ("q0", "What 0?", "a0")
    refs = data.read_references(tmp_path / "VizWiz" / "val_coco_type_3000.json")
    assert refs["q1"] == ["a photo number 1"]


@pytest.mark.parametrize("content, match", [
    (None, "is missing"),
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    ('[{"image": "x"}]', "neither 'conversations'"),
    ('[{"conversations": [{"from": "human"}]}]', "human turn and a gpt turn"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, match):
    path = tmp_path / "f.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=match) as info:
        data.read_items(path)
    assert "\n" not in str(info.value)


def test_references_must_cover_every_test_id(tmp_path):
    write_fake(tmp_path, "ucit")
    refs = tmp_path / "VizWiz" / "val_coco_type_3000.json"
    refs.write_text(json.dumps({"annotations": [{"image_id": "q0", "caption": "x"}]}))
    rows = {r.name: r for r in data.inspect(tmp_path, "ucit")}
    assert not rows["VizWiz"].usable and "q1" in rows["VizWiz"].problem


def test_data_check_command(tmp_path, capsys):
    from clbench.cli.app import main

    write_fake(tmp_path, "mllm-dcl")
    assert main(["data", "check", "--benchmark", "mllm-dcl", "--data-root", str(tmp_path)]) == 0
    assert "Fin" in capsys.readouterr().out
    (tmp_path / "Domain_data" / "Sci" / "test.json").unlink()
    assert main(["data", "check", "--benchmark", "mllm-dcl", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Sci" in err and "test.json is missing" in err
