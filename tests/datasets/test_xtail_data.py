"""The X-TAIL datasets on a fake CoOp tree (tests/fake_xtail.py): discovery, class names, splits from the split
files, orders, the one template, K-shot picks and their stored indices, duplicate class names, errors and
``clbench data check --benchmark xtail``."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from fake_xtail import COOP, FakeXTail, build_fake_xtail

from clbench.cli.app import main
from clbench.config import RunConfig
from clbench.datasets.base import Benchmark, ImageSpec
from clbench.datasets.xtail import build_xtail, duplicate_classnames, preflight, shot_positions
from clbench.datasets.xtail_names import XLAYOUTS, eurosat_name
from clbench.errors import UserError

SPEC = ImageSpec(32, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# RAIL's/LADA's orders, written out here rather than imported, so that a wrong order in the module fails.
ORDER_I = ["aircraft", "caltech101", "dtd", "eurosat", "flowers", "food101", "mnist", "oxford_pets", "stanford_cars",
           "sun397"]
ORDER_II = ["stanford_cars", "aircraft", "oxford_pets", "food101", "sun397", "mnist", "flowers", "dtd", "caltech101",
            "eurosat"]
FOLDERS = {"aircraft": "Aircraft", "caltech101": "Caltech101", "dtd": "DTD", "eurosat": "EuroSAT", "flowers": "Flowers",
           "food101": "Food", "mnist": "MNIST", "oxford_pets": "Pets", "stanford_cars": "StanfordCars",
           "sun397": "Sun397"}


def config(root: Path, order: int = 1, seed: int = 0, **data) -> RunConfig:
    cfg = RunConfig(benchmark="xtail", order=order, seed=seed, data_root=str(root))
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def build(root: Path, order: int = 1, seed: int = 0, **data) -> Benchmark:
    return build_xtail(config(root, order, seed, **data), SPEC)


def task(bench: Benchmark, name: str):
    return next(t for t in bench.tasks if t.name == name)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> FakeXTail:
    return build_fake_xtail(tmp_path_factory.mktemp("xtail") / "data")


@pytest.fixture(scope="module")
def bench(tree: FakeXTail) -> Benchmark:
    return build(tree.root)


@pytest.fixture
def own_tree(tree: FakeXTail, tmp_path: Path) -> Path:
    """A private copy of the fake tree that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(tree.root, root)
    return root


def split_file(root: Path, name: str) -> Path:
    return root / XLAYOUTS[name].split_file


# ---------------------------------------------------------------------------------------------------- discovery


def test_orders_are_the_spec_orders(tree: FakeXTail, bench: Benchmark) -> None:
    assert bench.task_names == ORDER_I and bench.info["order"] == ORDER_I and bench.order == 1
    assert build(tree.root, order=2).task_names == ORDER_II
    assert bench.name == "xtail" and "cifar100" not in bench.task_names


def test_folders_are_the_lada_readme_layout() -> None:
    assert {name: layout.folder for name, layout in XLAYOUTS.items()} == FOLDERS
    assert XLAYOUTS["mnist"].required[0].startswith("MNIST/MNIST/raw/")


def test_class_names_come_from_the_split_files(tree: FakeXTail, bench: Benchmark) -> None:
    for t in bench.tasks:
        assert t.classnames == tree.domains[t.name].classnames, t.name
    assert task(bench, "aircraft").classnames[1] == "Cessna 172"  # a variant with a space, from variants.txt
    assert task(bench, "eurosat").classnames[0] == "Annual Crop Land satellite location"
    assert task(bench, "mnist").classnames[:2] == ['number: "0 - zero"', 'number: "1 - one"']
    assert task(bench, "food101").classnames[0] == "apple pie"  # "_" -> " " as LADA's prompts do
    assert task(bench, "flowers").classnames == ["pink primrose", "lotus", "Sunflower"]  # label order of the file


def test_class_names_are_ordered_by_label_not_by_file_order(own_tree: Path) -> None:
    path = split_file(own_tree, "dtd")
    data = json.loads(path.read_text())
    for part in ("train", "val", "test"):
        data[part].reverse()  # the file now meets label 2 first
    path.write_text(json.dumps(data))
    assert task(build(own_tree), "dtd").classnames == ["banded", "blotchy", "zigzagged"]


def test_eurosat_folder_style_names_are_remapped(own_tree: Path) -> None:
    assert eurosat_name("AnnualCrop") == "Annual Crop Land satellite location"
    assert eurosat_name("SeaLake") == eurosat_name("Sea or Lake") == "Sea or Lake satellite location"
    path = split_file(own_tree, "eurosat")
    data = json.loads(path.read_text())
    folder = {"Annual Crop Land": "AnnualCrop", "Forest": "Forest", "Sea or Lake": "SeaLake"}
    for part in ("train", "val", "test"):
        data[part] = [[p, y, folder[c]] for p, y, c in data[part]]
    path.write_text(json.dumps(data))
    assert task(build(own_tree), "eurosat").classnames == [
        "Annual Crop Land satellite location", "Forest satellite location", "Sea or Lake satellite location"]


def test_split_sizes_come_from_the_split_files(tree: FakeXTail, bench: Benchmark) -> None:
    for t in bench.tasks:
        fake = tree.domains[t.name]
        assert (len(t.train), len(t.test)) == (fake.n_train, fake.n_test), t.name
        assert bench.info["splits"][t.name]["n_train"] == fake.n_train
        assert bench.info["splits"][t.name]["n_test"] == fake.n_test
        assert bench.info["splits"][t.name]["val"].startswith("not used")
    for name, (_, _, file, _, _) in COOP.items():
        data = json.loads((tree.root / FOLDERS[name] / file).read_text())
        t = task(bench, name)
        assert t.train.labels() == [y for _, y, _ in data["train"]], name
        assert t.test.labels() == [y for _, y, _ in data["test"]], name
        assert [Path(f).name for f in t.train.files()] == [Path(p).name for p, _, _ in data["train"]], name
        assert bench.info["splits"][name]["train"] == f"{file} 'train'"
    assert bench.info["splits"]["aircraft"]["test"].startswith("images_variant_test.txt")


def test_class_counts_recorded(tree: FakeXTail, bench: Benchmark) -> None:
    counts = {name: len(fake.classnames) for name, fake in tree.domains.items()}
    assert bench.info["class_counts"] == counts
    assert bench.info["n_classes_total"] == sum(counts.values())
    assert bench.info["shots"] == 0 and bench.info["shots_rule"].startswith("full-shot")
    assert "train_indices" not in bench.info


def test_every_task_has_the_one_template(bench: Benchmark) -> None:
    for t in bench.tasks:
        assert t.templates == ["a photo of a {}."], t.name
    assert task(bench, "caltech101").prompts() == ["a photo of a lotus.", "a photo of a pizza.",
                                                   "a photo of a sunflower."]


def test_images_are_read_and_preprocessed(bench: Benchmark) -> None:
    for t in bench.tasks:
        for split in (t.train, t.test):
            image, label = split[0]
            assert image.shape == (3, 32, 32) and 0 <= label < len(t.classnames), t.name


# --------------------------------------------------------------------------------------------------------- shots


def test_sixteen_shots_per_class(tree: FakeXTail, bench: Benchmark) -> None:
    few = build(tree.root, shots=16)
    assert few.info["shots"] == 16 and few.info["shot_seed"] == 0
    for full_task, t in zip(bench.tasks, few.tasks, strict=True):
        labels = full_task.train.labels()
        assert Counter(t.train.labels()) == {c: 16 for c in set(labels)}, t.name
        assert few.info["train_indices"][t.name] == t.train.positions == t.info["train_indices"], t.name
        assert all(labels[i] == y for i, y in zip(t.train.positions, t.train.labels(), strict=True))
        assert t.test.positions == full_task.test.positions, t.name  # test sets stay full
    dtd = task(few, "dtd").train
    first = [p for p, y in zip(dtd.positions, dtd.labels(), strict=True) if y == 0]
    assert len(set(first)) == 16  # 18 available: drawn without replacement
    last = [p for p, y in zip(dtd.positions, dtd.labels(), strict=True) if y == 2]
    assert set(last) == {20}  # one available: drawn with replacement, 16 times


def test_shot_indices_are_stable_per_seed(tree: FakeXTail) -> None:
    first = build(tree.root, shots=16, seed=3).info["train_indices"]
    assert build(tree.root, shots=16, seed=3).info["train_indices"] == first
    assert build(tree.root, order=2, shots=16, seed=3).info["train_indices"] == first  # same picks in Order II
    other = build(tree.root, shots=16, seed=4).info["train_indices"]
    assert other["dtd"] != first["dtd"] and other.keys() == first.keys()


def test_shot_positions_rule() -> None:
    labels = [0] * 5 + [1] * 2 + [2] * 9
    picks = shot_positions(labels, 4, seed=0, dataset="x")
    by_label = {y: [i for i in picks if labels[i] == y] for y in range(3)}
    assert [len(v) for v in by_label.values()] == [4, 4, 4]
    assert len(set(by_label[0])) == 4 and len(set(by_label[2])) == 4  # enough images: no repeats
    assert set(by_label[1]) <= {5, 6}  # two images: with replacement
    assert picks == [i for y in range(3) for i in by_label[y]]  # ascending labels
    excluded = shot_positions(labels, 4, seed=0, dataset="x", exclude={by_label[2][0]})
    assert [i for i in excluded if labels[i] != 2] == [i for i in picks if labels[i] != 2]  # other classes unchanged
    assert by_label[2][0] not in excluded
    assert shot_positions(labels, 4, seed=0, dataset="y") != picks  # each dataset its own stream


# -------------------------------------------------------------------------------------------- duplicate names


def test_duplicate_classnames_are_reported(tree: FakeXTail, bench: Benchmark) -> None:
    expected = [{"name": "lotus", "datasets": ["caltech101", "flowers"]},
                {"name": "pizza", "datasets": ["caltech101", "food101"]},
                {"name": "sunflower", "datasets": ["caltech101", "flowers"]}]  # "Sunflower" in flowers
    assert duplicate_classnames(bench.tasks) == expected
    assert bench.info["duplicate_classnames"] == expected
    order2 = build(tree.root, order=2).info["duplicate_classnames"]
    assert {"name": "pizza", "datasets": ["food101", "caltech101"]} in order2  # sequence order


# ------------------------------------------------------------------------------------------------------ errors


def test_no_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CLBENCH_DATA_ROOT", "CLBENCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no user config file either
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(UserError, match="^--benchmark xtail needs its datasets: pass --data-root DIR"):
        preflight(RunConfig(benchmark="xtail"))


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"data root {re.escape(str(tmp_path / 'nowhere'))}.* does not exist.*X-TAIL"):
        preflight(config(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", ["dtd", "mnist", "oxford_pets", "sun397"])
def test_missing_dataset_names_it_and_its_path(own_tree: Path, name: str) -> None:
    shutil.rmtree(own_tree / FOLDERS[name])
    for call in (lambda: preflight(config(own_tree)), lambda: build(own_tree)):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert message.startswith(f"{name}: not found: expected {own_tree / FOLDERS[name]} (CoOp layout: ")
        assert message.endswith("put the dataset there or fix --data-root") and "\n" not in message


@pytest.mark.parametrize("name", ["flowers", "stanford_cars"])
def test_half_present_dataset_without_its_split_file(own_tree: Path, name: str) -> None:
    missing = split_file(own_tree, name)
    missing.unlink()
    with pytest.raises(UserError) as err:
        preflight(config(own_tree))
    assert str(err.value) == (f"{name}: incomplete: file {missing} is missing; put CoOp's {missing.name} (see "
                              f"CoOp's DATASETS.md) into {own_tree / FOLDERS[name]}")


def test_half_present_mnist_and_aircraft(own_tree: Path) -> None:
    raw = own_tree / "MNIST" / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    raw.unlink()
    with pytest.raises(UserError, match=f"^mnist: incomplete: file {raw} is missing; re-extract the dataset into "
                                        f"{own_tree / 'MNIST'}$"):
        preflight(config(own_tree))
    shutil.rmtree(own_tree / "Aircraft" / "images")
    with pytest.raises(UserError) as err:
        preflight(config(own_tree))
    assert str(err.value) == (f"2 of the 10 X-TAIL datasets are not usable under {own_tree}: aircraft (missing "
                              f"{own_tree / 'Aircraft' / 'images'}); mnist (missing {raw})")


def test_empty_root_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"none of the 10 X-TAIL datasets is under {tmp_path} \\(e.g. expected "
                                        f"{tmp_path / 'Aircraft'}\\)"):
        preflight(config(tmp_path))


def test_preflight_reads_nothing_and_respects_num_tasks(own_tree: Path) -> None:
    split_file(own_tree, "dtd").write_text("not json")  # preflight checks existence only
    preflight(config(own_tree))
    shutil.rmtree(own_tree / "Sun397")
    preflight(config(own_tree, num_tasks=3))  # Order I's first three do not include sun397
    with pytest.raises(UserError, match="^sun397: not found"):
        preflight(config(own_tree, num_tasks=10))


@pytest.mark.parametrize(("content", "problem"), [
    ("not json", "cannot parse"),
    (json.dumps({"train": []}), "has no 'train' and 'test' lists"),
    (json.dumps({"train": [["a.jpg", "zero", "banded"]], "test": []}), "entry 0 of split 'train'"),
    (json.dumps({"train": [["a.jpg", 0, "banded"]], "test": [["b.jpg", 0, "blotchy"]]}), "label 0 is named both"),
    (json.dumps({"train": [["a.jpg", 1, "banded"]], "test": []}), "labels in .* skip 0"),
])
def test_bad_split_file_is_one_line(own_tree: Path, content: str, problem: str) -> None:
    path = split_file(own_tree, "dtd")
    path.write_text(content)
    with pytest.raises(UserError) as err:
        build(own_tree)
    message = str(err.value)
    assert message.startswith("dtd: ") and str(path) in message and "\n" not in message
    assert re.search(problem, message), message


def test_unknown_aircraft_variant(own_tree: Path) -> None:
    file = own_tree / "Aircraft" / "images_variant_test.txt"
    file.write_text(file.read_text() + "1999999 Spitfire\n")
    with pytest.raises(UserError, match=f"aircraft: line 4 of {file} names variant 'Spitfire'"):
        build(own_tree)


def test_listed_image_not_on_disk(tree: FakeXTail, own_tree: Path) -> None:
    gone = own_tree / tree.domains["food101"].image_files[0].relative_to(tree.root)
    gone.unlink()
    with pytest.raises(UserError, match=f"^food101: incomplete: 1 listed image\\(s\\) are not on disk, e.g. {gone}; "
                                        f"re-extract the dataset into {own_tree / 'Food'} \\(or --skip-bad-images\\)$"):
        build(own_tree)
    b = build(own_tree, skip_bad_images=True)
    food = task(b, "food101")
    assert len(food.train) == tree.domains["food101"].n_train - 1 and str(gone) not in food.train.files()
    assert b.info["bad_images"] == {"food101": {"train": 1, "test": 0}} and b.info["bad_images_total"] == 1


def test_corrupt_image_with_shots_is_replaced(tree: FakeXTail, own_tree: Path) -> None:
    dtd = task(build(own_tree, shots=2), "dtd")
    bad = Path(dtd.train.files()[0])  # a pick of class 0 (18 images)
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=f"dtd: cannot read image {bad} .*or run with --skip-bad-images to skip"):
        dtd.train[0]
    again = task(build(own_tree, shots=2, skip_bad_images=True), "dtd")
    assert str(bad) not in again.train.files() and Counter(again.train.labels()) == {0: 2, 1: 2, 2: 2}
    kept = [p for p, y in zip(dtd.train.positions, dtd.train.labels(), strict=True) if y != 0]
    assert [p for p, y in zip(again.train.positions, again.train.labels(), strict=True) if y != 0] == kept
    assert again.info["bad_images"]["train"] == 1
    for i in range(len(again.train)):
        again.train[i]


def test_num_tasks_cuts_the_sequence(tree: FakeXTail) -> None:
    assert build(tree.root, order=2, num_tasks=3).task_names == ORDER_II[:3]
    with pytest.raises(UserError, match="X-TAIL has 10 tasks"):
        build(tree.root, num_tasks=11)


# ------------------------------------------------------------------------------------------------- data check


def test_data_check_all_usable(tree: FakeXTail, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", "--benchmark", "xtail", "--data-root", str(tree.root)]) == 0
    out = capsys.readouterr().out
    assert "X-TAIL datasets under" in out
    for name in ORDER_I:
        assert name in out


def test_data_check_names_exactly_the_removed_dataset(own_tree: Path, capsys: pytest.CaptureFixture) -> None:
    for name, folder_name in FOLDERS.items():
        folder = own_tree / folder_name
        folder.rename(own_tree / "set-aside")
        try:
            assert main(["data", "check", "--benchmark", "xtail", "--data-root", str(own_tree)]) == 2
        finally:
            (own_tree / "set-aside").rename(folder)
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {name}: not found: expected {folder} "), err
        assert len(err.splitlines()) == 1
        assert [other for other in FOLDERS if other != name and f"{other}:" in err] == []


def test_data_check_half_present_and_unknown_benchmark(own_tree: Path, capsys: pytest.CaptureFixture) -> None:
    split_file(own_tree, "caltech101").write_text("{")
    assert main(["data", "check", "--benchmark", "xtail", "--data-root", str(own_tree)]) == 2
    captured = capsys.readouterr()
    assert "incomplete" in captured.out or "unreadable" in captured.out
    assert captured.err.startswith(f"error: caltech101: cannot parse {split_file(own_tree, 'caltech101')}")
    assert main(["data", "check", "--benchmark", "cifar", "--data-root", str(own_tree)]) == 2
    assert "knows mtil, xtail, ucit and mllm-dcl" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- literature


def test_literature_rows_for_xtail() -> None:
    from clbench.reports.literature import literature_for, load_literature, match_datasets

    lit = load_literature()
    rows = lit[lit["benchmark"] == "xtail"]
    assert set(rows["verified"]) == {"secondary"} and rows["source"].str.match(r"^LADA Tab\.[1256]\b").all()
    assert not rows["method"].str.contains("Zero-shot").any()  # recompute, do not cite
    means = rows[rows["dataset"] == ""].set_index(["method", "order"])
    assert tuple(means.loc[("LADA (16-shot)", 1), ["transfer", "average", "last"]]) == (61.5, 72.7, 83.1)
    assert tuple(means.loc[("ZSCL (full-shot)", 2), ["transfer", "average", "last"]]) == (54.2, 65.1, 70.1)
    assert pd.isna(means.loc[("Primal-RAIL (16-shot)", 1), "transfer"])  # LADA prints "-" for RAIL's Transfer
    assert ("Dual-RAIL (full-shot)", 1) not in means.index  # not run (memory)
    assert len(means) == 7 + 5 + 4 + 4
    for order, names in ((1, ORDER_I), (2, ORDER_II)):
        per = match_datasets(literature_for("xtail", order), names)
        lada = per[(per["method"] == "LADA (16-shot)") & (per["dataset"] != "")]
        assert list(lada["dataset"]) == names  # named as in code, in training order
