"""The real MTIL datasets on fake trees in the exact torchvision layouts (tests/fake_mtil.py): discovery, class
names, splits, seed-42 split stability, few-shot picks, templates, preprocessing, errors, ``clbench data check``
and an end-to-end ``clbench run --benchmark mtil``."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from clbench.cli.app import main
from clbench.config import RunConfig
from clbench.datasets.base import Benchmark, ImageSpec
from clbench.errors import UserError

pytest.importorskip("scipy", reason="Flowers102/StanfordCars/Caltech101 read .mat files through scipy; the fake "
                                    "trees are written with it")

from fake_mtil import FakeTree, build_fake_mtil  # noqa: E402

from clbench.datasets.mtil import LAYOUTS, build_mtil  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
SPEC = ImageSpec(32, MEAN, STD)
# ZSCL's orders, written out here rather than imported, so that a wrong order in the module fails.
ORDER_I = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
           "StanfordCars", "SUN397"]
ORDER_II = ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
            "EuroSAT", "CIFAR100"]
UNSPLIT = ("Caltech101", "EuroSAT", "SUN397")


def build(root: Path, order: int = 1, **data) -> Benchmark:
    """The benchmark over ``root``; the fake trees hold fewer classes than MTIL's, so they are accepted as such
    (``data.allow_incomplete``) unless a test says otherwise."""
    cfg = RunConfig(benchmark="mtil", order=order, data_root=str(root))
    cfg.data.allow_incomplete = True
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return build_mtil(cfg, SPEC)


def task(bench: Benchmark, name: str):
    return next(t for t in bench.tasks if t.name == name)


def seed42_perm(n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> FakeTree:
    return build_fake_mtil(tmp_path_factory.mktemp("mtil") / "data")


@pytest.fixture(scope="module")
def bench(tree: FakeTree) -> Benchmark:
    return build(tree.root)


@pytest.fixture
def own_tree(tree: FakeTree, tmp_path: Path) -> Path:
    """A private copy of the fake tree that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(tree.root, root)
    return root


def moved(path: Path, tree: FakeTree, root: Path) -> Path:
    return root / path.relative_to(tree.root)


# ---------------------------------------------------------------------------------------------------- discovery


def test_orders_are_the_spec_orders(tree: FakeTree, bench: Benchmark) -> None:
    assert bench.task_names == ORDER_I
    assert build(tree.root, order=2).task_names == ORDER_II


def test_class_names_follow_the_loaders(tree: FakeTree, bench: Benchmark) -> None:
    for t in bench.tasks:
        assert t.classnames == tree.datasets[t.name].classnames, t.name
    caltech = task(bench, "Caltech101").classnames
    assert len(caltech) == 101 and caltech[:4] == ["off-center face", "centered face", "leopard", "motorbike"]
    assert caltech[-1] == "yin and yang symbol"
    assert task(bench, "EuroSAT").classnames == [
        "annual crop land", "forest", "brushland or shrubland", "highway or road",
        "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
        "residential buildings or homes or apartments", "river", "lake or sea"]
    flowers = task(bench, "Flowers").classnames
    assert len(flowers) == 102 and flowers[0] == "pink primrose" and flowers[-1] == "blackberry lily"
    assert task(bench, "CIFAR100").classnames[1] == "aquarium fish"  # process_labels: "_" -> " "
    assert task(bench, "SUN397").classnames[1] == "apartment building/outdoor"  # "/a/" cut, "/" kept
    assert task(bench, "OxfordPet").classnames[1] == "American Bulldog"


def test_split_sizes(tree: FakeTree, bench: Benchmark) -> None:
    for t in bench.tasks:
        fake = tree.datasets[t.name]
        if t.name in UNSPLIT:
            n_train = int(0.8 * fake.n_total)
            assert (len(t.train), len(t.test)) == (n_train, fake.n_total - n_train), t.name
        else:
            assert (len(t.train), len(t.test)) == (fake.n_train, fake.n_test), t.name
        assert bench.info["splits"][t.name]["n_train"] == len(t.train)
    assert "not trainval" in bench.info["splits"]["Aircraft"]["train"]
    assert "trainval" in bench.info["splits"]["OxfordPet"]["train"]
    assert "seed-42" in bench.info["splits"]["SUN397"]["train"] and "sorted" in bench.info["sun397_order"]


@pytest.mark.parametrize("name", UNSPLIT)
def test_random_split_is_the_seed42_randperm_of_the_sorted_files(tree: FakeTree, bench: Benchmark, name: str) -> None:
    t = task(bench, name)
    fake = tree.datasets[name]
    # Caltech101/EuroSAT: torchvision's sorted folder order; SUN397: our sorted file list.
    files = sorted(str(f) for f in fake.image_files) if name == "SUN397" else [str(f) for f in fake.image_files]
    perm = seed42_perm(len(files))
    n_train = int(0.8 * len(files))
    assert t.train.files() == [files[i] for i in perm[:n_train]]
    assert t.test.files() == [files[i] for i in perm[n_train:]]
    assert set(t.train.files()).isdisjoint(t.test.files())
    again = task(build(tree.root), name)
    assert again.train.files() == t.train.files() and again.test.files() == t.test.files()


def test_labels_match_folders(bench: Benchmark) -> None:
    from clbench.datasets.mtil_names import CALTECH101_FOLDERS

    t = task(bench, "Caltech101")
    for file, label in zip(t.train.files(), t.train.labels(), strict=True):
        assert Path(file).parent.name == CALTECH101_FOLDERS[label]
    sun = task(bench, "SUN397")
    for file, label in zip(sun.train.files(), sun.train.labels(), strict=True):
        assert sun.classnames[label].replace(" ", "_") in file


def test_building_decodes_no_image(tree: FakeTree, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    b = build(tree.root)
    assert opened == []
    b.tasks[0].train[0]
    assert len(opened) == 1


# ---------------------------------------------------------------------------------------------- preprocessing


def test_items_are_clip_normalised_tensors(bench: Benchmark) -> None:
    cifar = task(bench, "CIFAR100")
    for i in range(len(cifar.test)):
        image, label = cifar.test[i]
        value = (10 * i + label) % 256  # the fake test images are flat colours
        expected = (torch.full((3, 32, 32), value / 255.0) - torch.tensor(MEAN)[:, None, None]) \
            / torch.tensor(STD)[:, None, None]
        assert image.dtype == torch.float32 and torch.allclose(image, expected, atol=1e-6)
    mnist_image, mnist_label = task(bench, "MNIST").train[0]
    raw = mnist_image * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    assert mnist_image.shape == (3, 32, 32) and isinstance(mnist_label, int)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)  # grey -> RGB
    for t in bench.tasks:
        image, label = t.test[0]
        assert image.shape == (3, 32, 32) and 0 <= label < len(t.classnames), t.name


def test_train_augmentation_is_behind_a_flag(tree: FakeTree, bench: Benchmark) -> None:
    from torchvision import transforms as T

    plain = task(bench, "DTD").train.transform.transforms
    assert [type(s) for s in plain[:2]] == [T.Resize, T.CenterCrop]
    augmented = task(build(tree.root, train_augment=True), "DTD")
    crop = augmented.train.transform.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.9, 1.0)
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert type(augmented.test.transform.transforms[0]) is T.Resize
    assert augmented.train[0][0].shape == (3, 32, 32)


# -------------------------------------------------------------------------------------------------- templates


def test_first_template_policy(bench: Benchmark) -> None:
    assert task(bench, "MNIST").prompts()[0] == 'a photo of the number: "0 - zero".'
    assert task(bench, "DTD").prompts()[0] == "a photo of a banded thing."  # KeepLoRA's first
    assert task(bench, "SUN397").prompts()[0] == "a photo of the abbey."
    assert task(bench, "StanfordCars").prompts()[0] == "a photo of the AM General Hummer SUV 2000, a type of car."
    assert task(bench, "EuroSAT").prompts()[0] == "a centered satellite photo of annual crop land."
    counts = {t.name: len(t.templates) for t in bench.tasks}
    assert counts == {"Aircraft": 2, "Caltech101": 34, "CIFAR100": 18, "DTD": 8, "EuroSAT": 3, "Flowers": 1,
                      "Food": 1, "MNIST": 1, "OxfordPet": 1, "StanfordCars": 9, "SUN397": 2}


def test_ensemble_policy_uses_zscl_order(tree: FakeTree, bench: Benchmark) -> None:
    from clbench.engine.harness import dataset_prompts

    ens = build(tree.root, prompt="ensemble")
    assert task(ens, "DTD").templates[0] == "a photo of a {} texture."
    assert task(ens, "StanfordCars").templates[0] == "a photo of a {}, a type of car."
    assert task(ens, "SUN397").templates[0] == "a photo of a {}."
    assert sorted(task(ens, "DTD").templates) == sorted(task(bench, "DTD").templates)
    for t in ens.tasks:
        assert len(t.templates) == len(task(bench, t.name).templates)
        prompts = dataset_prompts(t, "ensemble")
        assert len(prompts) == len(t.classnames) and all(len(p) == len(t.templates) for p in prompts)


# --------------------------------------------------------------------------------------------------- few-shot


@pytest.mark.parametrize("shots", [1, 2])
def test_few_shot_takes_first_k_per_class_in_seed42_order(tree: FakeTree, bench: Benchmark, shots: int) -> None:
    few = build(tree.root, shots=shots)
    for full_task, t in zip(bench.tasks, few.tasks, strict=True):
        labels = full_task.train.labels()
        expected, taken = [], Counter()
        for i in seed42_perm(len(labels)):
            if taken[labels[i]] < shots:
                taken[labels[i]] += 1
                expected.append(full_task.train.positions[i])
        assert t.train.positions == expected, t.name
        per_class = Counter(t.train.labels())
        available = Counter(labels)
        assert per_class == {c: min(shots, n) for c, n in available.items()}, t.name
        assert t.test.positions == full_task.test.positions, t.name
        assert t.info["shots"] == shots
    assert few.info["shots"] == shots


# ------------------------------------------------------------------------------------------------------ errors


def test_no_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLBENCH_DATA_ROOT", raising=False)
    with pytest.raises(UserError, match="--data-root DIR or set CLBENCH_DATA_ROOT"):
        build_mtil(RunConfig(benchmark="mtil"), SPEC)


def test_data_root_from_environment(tree: FakeTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(tree.root))
    cfg = RunConfig(benchmark="mtil")
    cfg.data.allow_incomplete = True
    b = build_mtil(cfg, SPEC)
    assert b.info["data_root"] == str(tree.root) and b.task_names == ORDER_I


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"data root {tmp_path / 'nowhere'} \\(from --data-root\\) does not exist"):
        build(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["DTD", "StanfordCars", "Caltech101"])
def test_missing_dataset_names_it_and_its_path(own_tree: Path, name: str) -> None:
    shutil.rmtree(own_tree / LAYOUTS[name].folder)
    with pytest.raises(UserError) as err:
        build(own_tree)
    message = str(err.value)
    assert message.startswith(f"{name}: not found: expected {own_tree / LAYOUTS[name].folder} ")
    assert "\n" not in message


def test_half_present_dataset(own_tree: Path) -> None:
    (own_tree / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(UserError, match=f"^Flowers: incomplete: file {own_tree / 'flowers-102' / 'setid.mat'} is "
                                        "missing; re-extract"):
        build(own_tree)


def test_two_missing_datasets_in_one_line(own_tree: Path) -> None:
    shutil.rmtree(own_tree / "MNIST")
    shutil.rmtree(own_tree / "food-101" / "images")
    with pytest.raises(UserError) as err:
        build(own_tree)
    message = str(err.value)
    assert message == (f"2 of the 11 MTIL datasets are not usable under {own_tree}: Food (missing "
                       f"{own_tree / 'food-101' / 'images'}); MNIST (missing {own_tree / 'MNIST'})")


def test_empty_root_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"none of the 11 MTIL datasets is under {tmp_path} \\(e.g. expected "
                                        f"{tmp_path / 'fgvc-aircraft-2013b'}\\)"):
        build(tmp_path)


def test_unparseable_meta_file_is_one_line(own_tree: Path, capsys: pytest.CaptureFixture) -> None:
    (own_tree / "cifar-100-python" / "meta").write_bytes(b"garbage")
    with pytest.raises(UserError) as err:
        build(own_tree)
    assert str(err.value).startswith(f"CIFAR100: torchvision could not read {own_tree / 'cifar-100-python'} (")
    assert "\n" not in str(err.value)
    assert main(["data", "check", "--allow-incomplete", "--data-root", str(own_tree)]) == 2
    captured = capsys.readouterr()
    assert "unreadable" in captured.out and captured.err.startswith("error: CIFAR100: torchvision could not read")


def test_caltech_folders_must_match_the_names(own_tree: Path) -> None:
    base = own_tree / "caltech101" / "101_ObjectCategories"
    (base / "yin_yang").rename(base / "yinyang")
    with pytest.raises(UserError, match=f"Caltech101: missing class folder {base / 'yin_yang'}"):
        build(own_tree)


def test_listed_image_not_on_disk(tree: FakeTree, own_tree: Path) -> None:
    gone = moved(tree.datasets["Food"].image_files[0], tree, own_tree)
    gone.unlink()
    top = own_tree / "food-101"
    with pytest.raises(UserError, match=f"^Food: incomplete: 1 listed image\\(s\\) are not on disk, e.g. {gone}; "
                                        f"re-extract the dataset into {top} \\(or --skip-bad-images\\)$"):
        build(own_tree)
    b = build(own_tree, skip_bad_images=True)
    food = task(b, "Food")
    assert len(food.train) == tree.datasets["Food"].n_train - 1 and str(gone) not in food.train.files()
    assert b.info["bad_images"] == {"Food": {"train": 1, "test": 0}} and b.info["bad_images_total"] == 1


def test_corrupt_image_stops_with_the_file_named(tree: FakeTree, own_tree: Path) -> None:
    b = build(own_tree)
    aircraft = task(b, "Aircraft")
    bad = Path(aircraft.test.files()[1])
    bad.write_bytes(b"this is not a jpeg")
    aircraft.test[0]
    with pytest.raises(UserError, match=f"Aircraft: cannot read image {bad} .*or run with --skip-bad-images to skip"):
        aircraft.test[1]
    # A DataLoader worker sends the error back and the main process re-raises it as
    # type(exc)("Caught ... in DataLoader worker process 0. Original Traceback ..."): still one line here.
    from torch._utils import ExceptionWrapper

    try:
        aircraft.test[1]
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    assert wrapped.exc_msg.startswith("Traceback") and "\n" in wrapped.exc_msg
    with pytest.raises(UserError) as err:
        wrapped.reraise()
    assert str(err.value).startswith(f"Aircraft: cannot read image {bad} (") and "\n" not in str(err.value)


def test_skip_bad_images_drops_and_counts_them(tree: FakeTree, own_tree: Path) -> None:
    dtd = task(build(own_tree), "DTD")
    bad = Path(dtd.train.files()[2])
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated JPEG: opens, fails to decode
    with pytest.raises(UserError, match=f"DTD: cannot read image {bad}"):
        dtd.train[2]
    b = build(own_tree, skip_bad_images=True)
    skipped = task(b, "DTD")
    assert len(skipped.train) == len(dtd.train) - 1 and str(bad) not in skipped.train.files()
    assert skipped.train.files() == [f for f in dtd.train.files() if f != str(bad)]
    assert list(skipped.info["bad_images"]["files"]) == [str(bad)]
    assert b.info["bad_images"] == {"DTD": {"train": 1, "test": 0}}
    for i in range(len(skipped.train)):
        skipped.train[i]


def test_skip_bad_images_with_few_shot_picks_a_readable_replacement(tree: FakeTree, own_tree: Path) -> None:
    sun = task(build(own_tree, shots=1), "SUN397")
    first = dict(zip(sun.train.labels(), sun.train.files(), strict=True))
    Path(first[0]).write_bytes(b"broken")
    again = task(build(own_tree, shots=1, skip_bad_images=True), "SUN397")
    picked = dict(zip(again.train.labels(), again.train.files(), strict=True))
    assert sorted(picked) == sorted(first) and picked[0] != first[0]
    assert {k: v for k, v in picked.items() if k != 0} == {k: v for k, v in first.items() if k != 0}
    assert again.info["bad_images"]["train"] == 1


def test_num_tasks_cuts_the_sequence(tree: FakeTree) -> None:
    assert build(tree.root, num_tasks=3).task_names == ORDER_I[:3]
    with pytest.raises(UserError, match="MTIL has 11 tasks"):
        build(tree.root, num_tasks=12)


# ------------------------------------------------------------------------------------------------- data check


def test_data_check_all_usable(tree: FakeTree, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", "--allow-incomplete", "--data-root", str(tree.root)]) == 0
    out = capsys.readouterr().out
    for name in ORDER_I:
        assert name in out


def test_data_check_names_exactly_the_removed_dataset(own_tree: Path, capsys: pytest.CaptureFixture) -> None:
    for name, layout in LAYOUTS.items():
        folder = own_tree / layout.folder
        folder.rename(own_tree / "set-aside")
        try:
            assert main(["data", "check", "--allow-incomplete", "--data-root", str(own_tree)]) == 2
        finally:
            (own_tree / "set-aside").rename(folder)
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {name}: not found: expected {folder} "), err
        assert len(err.splitlines()) == 1
        assert [other for other in LAYOUTS if other != name and other in err] == []


def test_data_check_without_root_is_a_user_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("CLBENCH_DATA_ROOT", raising=False)
    assert main(["data", "check"]) == 2
    assert "CLBENCH_DATA_ROOT" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow  # about 10 s on two shared cores: 12 evaluations of 11 datasets
def test_run_end_to_end_on_the_fake_tree(tree: FakeTree, tmp_path: Path) -> None:
    out = tmp_path / "results"
    code = main(["run", "--benchmark", "mtil", "--allow-incomplete", "--data-root", str(tree.root), "--backbone",
                 "tiny", "--pretrained",
                 "none", "--preset", "smoke", "--methods", "lora", "--device", "cpu", "--out", str(out), "--quiet"])
    assert code == 0
    (accuracy,) = list(out.rglob("accuracy.csv"))
    frame = pd.read_csv(accuracy)
    assert list(frame.columns) == ["trained_on", *ORDER_I]
    assert list(frame["trained_on"]) == ORDER_I
    assert frame[ORDER_I].to_numpy().min() >= 0 and frame[ORDER_I].to_numpy().max() <= 100
