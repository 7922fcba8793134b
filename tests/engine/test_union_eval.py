"""The union evaluation rule (``--eval union``, X-TAIL): golden metrics, the zero-shot identities of the union rule,
union vs per-task evaluation, KeepLoRA+'s routing rule, and what a union run writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clbench.cli.app import main
from clbench.config import TrainConfig
from clbench.costs.profiler import Profiler
from clbench.datasets.base import Benchmark, Task, duplicate_classnames, union_spans
from clbench.datasets.synthetic import ORDERS, build_synthetic
from clbench.engine.harness import Hooks, evaluate, evaluate_union, run_sequence
from clbench.engine.metrics import mtil_metrics
from clbench.methods import get_method, list_methods
from clbench.methods.base import Method

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet"]

# The 10 x 10 matrix printed in the LADA README ("Example Output, 16-shot Order I"; rows: after training on each
# domain, columns: the domains in the same order), with the per-domain metric rows it prints underneath.
LADA_DOMAINS = ["aircraft", "caltech101", "dtd", "eurosat", "flowers", "food101", "mnist", "oxford_pets",
                "stanford_cars", "sun397"]
LADA_MATRIX = """
48.3 75.0 36.4 37.4 64.1 83.4 43.9 87.8 65.5 61.1
48.8 91.6 35.8 37.2 67.2 83.9 44.0 88.0 65.4 61.4
48.8 92.5 66.6 33.6 67.1 83.8 44.7 88.0 65.4 61.2
48.8 92.5 66.6 86.9 67.1 83.8 40.2 88.0 65.4 61.5
48.8 92.7 66.8 86.9 96.3 83.8 40.2 88.0 65.4 61.5
48.8 92.7 67.8 86.9 96.4 86.1 40.2 88.0 65.4 61.5
48.8 92.8 67.8 86.9 96.4 86.1 93.9 88.0 65.4 61.6
48.8 92.9 67.9 86.9 96.4 86.2 93.9 93.5 65.4 61.6
48.8 93.2 67.9 86.9 96.4 86.2 93.9 93.5 84.6 61.7
49.3 93.7 69.3 86.9 96.8 86.9 93.9 93.6 84.6 76.0
"""
LADA_TRANSFER = [None, 75.0, 36.1, 36.1, 66.4, 83.7, 42.2, 88.0, 65.4, 61.5]
LADA_AVERAGE = [48.8, 91.0, 61.3, 71.6, 84.4, 85.0, 62.9, 89.6, 69.2, 62.9]
LADA_LAST = [49.3, 93.7, 69.3, 86.9, 96.8, 86.9, 93.9, 93.6, 84.6, 76.0]


def test_lada_readme_matrix_gives_its_printed_metrics() -> None:
    matrix = np.array([[float(x) for x in line.split()] for line in LADA_MATRIX.strip().splitlines()])
    m = mtil_metrics(matrix, LADA_DOMAINS)
    assert (round(m["transfer"], 1), round(m["average"], 1), round(m["last"], 1)) == (61.6, 72.7, 83.1)
    per = m["per_dataset"]
    for d, name in enumerate(LADA_DOMAINS):  # its rows are rounded to 0.1, hence the tolerance
        if LADA_TRANSFER[d] is not None:
            assert per["transfer"][name] == pytest.approx(LADA_TRANSFER[d], abs=0.1)
        assert per["average"][name] == pytest.approx(LADA_AVERAGE[d], abs=0.1)
        assert per["last"][name] == pytest.approx(LADA_LAST[d], abs=0.1)
    assert "aircraft" not in per["transfer"]


@pytest.fixture(scope="module")
def bench_and_model():
    from clbench.models.backbones import load_backbone

    torch.manual_seed(0)
    model = load_backbone("tiny", "none")
    return build_synthetic(1, model.image_spec, train_per_class=2, test_per_class=3, num_tasks=4), model


EVAL = TrainConfig(epochs=[1], batch_size=8, max_steps=2, eval_batch_size=16)


def test_union_is_never_above_per_task_and_differs_from_it(bench_and_model) -> None:
    bench, base = bench_and_model
    method = Method(copy.deepcopy(base), None, Profiler())
    device = torch.device("cpu")
    per_task = evaluate(method, bench, 0, EVAL, "first", device, Hooks())
    union, recall = evaluate_union(method, bench, 0, EVAL, "first", device, Hooks())
    # an image right among all classes is right among its own dataset's: union <= task, dataset by dataset
    assert all(u <= t + 1e-9 for u, t in zip(union, per_task, strict=True))
    # a correct prediction lies in its own dataset's range: recall >= accuracy
    assert all(r >= u - 1e-9 for r, u in zip(recall, union, strict=True))
    assert sum(union) < sum(per_task), "the union rule must be harder than the per-task rule"
    assert any(r < 100 for r in recall)


def test_union_labels_are_offset_by_the_class_ranges(bench_and_model) -> None:
    """Recompute the union accuracy by hand from the concatenated logits: ground truth = offset + local label."""
    bench, base = bench_and_model
    model = copy.deepcopy(base).eval()
    method = Method(model, None, Profiler())
    union, recall = evaluate_union(method, bench, 0, EVAL, "first", torch.device("cpu"), Hooks())
    spans = union_spans(bench)
    assert [s.stop - s.start for s in spans] == [len(t.classnames) for t in bench.tasks]
    with torch.no_grad():
        text = torch.cat([model.class_text_features([[t.templates[0].format(c)] for c in t.classnames])
                          for t in bench.tasks])
        for task, span, acc, rec in zip(bench.tasks, spans, union, recall, strict=True):
            images = torch.stack([task.test[i][0] for i in range(len(task.test))])
            labels = torch.tensor([int(task.test[i][1]) for i in range(len(task.test))])
            predicted = (model.encode_image(images) @ text.T).argmax(-1)
            assert acc == pytest.approx(100.0 * float((predicted == labels + span.start).float().mean()))
            inside = (predicted >= span.start) & (predicted < span.stop)
            assert rec == pytest.approx(100.0 * float(inside.float().mean()))


def test_a_method_that_never_updates_repeats_the_zero_shot_row(bench_and_model) -> None:
    bench, base = bench_and_model
    method = get_method("zeroshot")(copy.deepcopy(base), get_method("zeroshot").Hparams(), Profiler())
    result = run_sequence(method, bench, EVAL, method.profiler, torch.device("cpu"), seed=0, eval_rule="union")
    assert all(row == result.zeroshot for row in result.rows)
    assert all(row == result.zeroshot_recall for row in result.recall_rows)
    metrics = mtil_metrics(np.array(result.rows), bench.task_names)
    assert metrics["transfer"] == pytest.approx(float(np.mean(result.zeroshot[1:])), abs=1e-12)
    assert metrics["last"] == pytest.approx(float(np.mean(result.zeroshot)), abs=1e-12)


def test_keeplora_plus_routes_heads_to_trained_columns_only(bench_and_model) -> None:
    bench, base = bench_and_model
    cls = get_method("keeplora+")
    method = cls(copy.deepcopy(base), cls.Hparams(), Profiler())
    spans = union_spans(bench)
    width = base.clip.text_projection.shape[1]
    torch.manual_seed(1)
    method.heads = {t.name: torch.nn.Parameter(torch.randn(len(t.classnames), width)) for t in bench.tasks[:2]}
    features = torch.nn.functional.normalize(torch.randn(5, width), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(spans[-1].stop, width), dim=-1)
    plain = Method.logits_union(method, features, text, spans, trained=0)
    routed = method.logits_union(features, text, spans, trained=1)
    first = spans[0]
    expected = plain[:, first.start:first.stop] + method.head_logits(features, first.dataset)
    assert torch.allclose(routed[:, first.start:first.stop], expected)
    # the second dataset has a head but is not trained yet at this step; later datasets have none
    assert torch.equal(routed[:, first.stop:], plain[:, first.stop:])
    both = method.logits_union(features, text, spans, trained=2)
    assert not torch.equal(both[:, spans[1].start:spans[1].stop], plain[:, spans[1].start:spans[1].stop])


@pytest.mark.parametrize("name", list_methods())
def test_methods_with_their_own_logits_define_a_union_rule(name: str) -> None:
    cls = get_method(name)
    if cls.logits is not Method.logits:
        assert cls.logits_union is not Method.logits_union, (
            f"{name} overrides logits() but not logits_union(): under --eval union it would silently drop its "
            "own evaluation rule")


def test_duplicate_classnames_are_reported_not_merged() -> None:
    def task(name: str, classes: list[str]) -> Task:
        return Task(name, classes, ["a photo of a {}."], [], [])

    tasks = [task("caltech101", ["lotus", "Sunflower", "pizza"]), task("flowers", ["sunflower ", "lotus", "rose"]),
             task("food101", ["pizza", "pho"])]
    assert duplicate_classnames(tasks) == [
        {"name": "lotus", "datasets": ["caltech101", "flowers"]},
        {"name": "pizza", "datasets": ["caltech101", "food101"]},
        {"name": "sunflower", "datasets": ["caltech101", "flowers"]},
    ]
    assert union_spans(Benchmark("x", 1, tasks))[2].start == 6


def test_union_run_writes_recall_and_its_own_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "--methods", "zeroshot", "--out", str(out), "--set", "data.num_tasks=3", *SMOKE]
    assert main([*args, "--eval", "union"]) == 0
    assert main(args) == 0
    union_run = out / "synthetic-union-order1" / "zeroshot" / "seed0"
    task_run = out / "synthetic-order1" / "zeroshot" / "seed0"
    names = ORDERS[1][:3]
    recall = pd.read_csv(union_run / "selection_recall.csv")
    assert list(recall["trained_on"]) == ["zeroshot", *names] and list(recall.columns)[1:] == names
    assert not (task_run / "selection_recall.csv").exists()
    manifest = json.loads((union_run / "manifest.json").read_text())
    assert manifest["evaluation"]["rule"] == "union"
    assert manifest["evaluation"]["classes"] == sum(len(t.classnames) for t in build_synthetic(
        1, _spec(), 1, 1, num_tasks=3).tasks)
    assert json.loads((task_run / "manifest.json").read_text())["evaluation"] == {"rule": "task"}
    union_acc = pd.read_csv(union_run / "accuracy.csv").set_index("trained_on")
    task_acc = pd.read_csv(task_run / "accuracy.csv").set_index("trained_on")
    assert (union_acc.to_numpy() <= task_acc.to_numpy() + 1e-9).all()
    assert not np.allclose(union_acc.to_numpy(), task_acc.to_numpy()), "--eval union was ignored"
    metrics = json.loads((union_run / "metrics.json").read_text())
    assert metrics["eval"] == "union" and set(metrics["selection_recall"]["per_dataset"]) == set(names)
    # a report never pools the two rules, and says which rule its table is under
    from clbench.errors import UserError
    from clbench.reports.loading import collect
    from clbench.reports.report import describe, table_stem

    with pytest.raises(UserError, match="synthetic-union-order1.*evaluation rules|evaluation rules.*synthetic-union"):
        collect([out])
    report = collect([union_run.parent.parent])
    assert report.eval_rule == "union" and not report.own_rule
    assert describe(report) == "Synthetic Order I, preset smoke, union label space"
    assert table_stem(report) == "synthetic-union-order1"
    assert collect([task_run.parent.parent]).own_rule


def _spec():
    from clbench.datasets.base import ImageSpec

    return ImageSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_unknown_eval_rule_is_one_line(tmp_path: Path, capsys) -> None:
    code = main(["run", "--methods", "zeroshot", "--eval", "domain", "--out", str(tmp_path / "o"), *SMOKE])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'task', 'union'" in err
    assert not (tmp_path / "o").exists()


def test_union_run_resumes_to_the_same_recall(tmp_path: Path, monkeypatch) -> None:
    from test_resume import Interrupt, assert_same_state, final_state

    extra = ["eval=union"]
    reference = final_state(tmp_path / "a", "lora", monkeypatch, extra=extra)
    with pytest.raises(Interrupt):
        final_state(tmp_path / "b", "lora", monkeypatch, stop_after=1, extra=extra)
    resumed = final_state(tmp_path / "b", "lora", monkeypatch, resume=True, extra=extra)
    assert_same_state(reference, resumed)
    assert reference.recall and resumed.recall == reference.recall
    a, b = (tmp_path / x / "synthetic-union-order1" / "lora" / "seed0" for x in ("a", "b"))
    assert (a / "selection_recall.csv").read_bytes() == (b / "selection_recall.csv").read_bytes()


def test_published_numbers_only_beside_runs_under_their_own_rule() -> None:
    from clbench.reports.literature import literature_for

    xtail = literature_for("xtail", 1)
    assert len(xtail) and set(xtail["benchmark"]) == {"xtail"} and (xtail["verified"] == "secondary").all()
    assert len(literature_for("xtail", 1, own_rule=False)) == 0
    assert len(literature_for("mtil", 1)) and len(literature_for("mtil", 1, own_rule=False)) == 0


def test_sweep_takes_the_rule_and_plans_its_folders(tmp_path: Path, capsys) -> None:
    assert main(["sweep", "--methods", "zeroshot", "--eval", "union", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "synthetic-union-order1/zeroshot/seed0" in out
