"""The registry of settings (clbench.settings): every benchmark belongs to exactly one setting, lookups of unknown
names are one line, and no module outside the settings spells a benchmark of the LLaVA setting (the command line
asks the registry instead of testing names)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from clbench.cli.app import main
from clbench.errors import UserError
from clbench.settings import SETTINGS, all_benchmarks, get_setting, setting_for_benchmark
from clbench.settings.base import Setting

ROOT = Path(__file__).resolve().parents[2] / "clbench"
# Where a setting's names may be spelled: its declaration and its implementation (both under settings/).
ALLOWED = ("settings",)
LLAVA_NAMES = ("synthetic-mcit", "ucit", "mllm-dcl")


def test_every_benchmark_belongs_to_exactly_one_setting() -> None:
    names = all_benchmarks()
    assert len(names) == len(set(names)), "a benchmark is declared by two settings"
    for benchmark in names:
        owners = [s for s in SETTINGS if benchmark in s.benchmarks]
        assert len(owners) == 1 and setting_for_benchmark(benchmark) is owners[0]
    assert setting_for_benchmark("mtil").name == "clip" and setting_for_benchmark("ucit").name == "mcit"
    assert set(LLAVA_NAMES) == set(get_setting("mcit").benchmarks)
    for s in SETTINGS:
        assert isinstance(s, Setting) and s.name and set(s.embedded) <= set(s.benchmarks)
        assert get_setting(s.name) is s and all(get_setting(a) is s for a in s.aliases)


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_the_commands_offer_exactly_the_registered_benchmarks(command: str, capsys) -> None:
    assert main([command, "--help"]) == 0
    assert f"--benchmark <{'|'.join(all_benchmarks())}>" in " ".join(capsys.readouterr().out.split())


def test_unknown_names_are_one_line() -> None:
    with pytest.raises(UserError, match=r"--benchmark 'nope' is unknown; use one of synthetic, mtil"):
        setting_for_benchmark("nope")
    with pytest.raises(UserError, match=r"--setting 'nope' is unknown; use clip \(mtil\) or mcit"):
        get_setting("nope")


@pytest.mark.parametrize("args", [
    ["run", "--methods", "lora", "--benchmark", "nope"],
    ["sweep", "--methods", "lora", "--benchmark", "nope"],
    ["metrics", "unused.csv", "--setting", "nope"],
    ["methods", "lora", "--setting", "nope"],
])
def test_unknown_benchmark_or_setting_on_the_command_line(args: list[str], capsys, tmp_path: Path,
                                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if args[0] == "metrics":
        (tmp_path / "unused.csv").write_text("trained_on,a\na,50\n")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0], err
    assert not (tmp_path / "results").exists()


def spelled_names(source: str, names: tuple[str, ...] = LLAVA_NAMES) -> list[tuple[int, str]]:
    """``(line, text)`` of every string constant in ``source`` that names one of ``names`` as a word (docstrings
    excluded: prose may name a benchmark; code that tests one must ask the registry)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and pattern.search(node.value)]


def test_the_detector_catches_a_name_test() -> None:
    assert spelled_names('def run(benchmark):\n    if benchmark == "ucit":\n        pass\n') == [(2, "ucit")]
    assert spelled_names('x = benchmark in ("synthetic-mcit", "mllm-dcl")\n') != []
    assert spelled_names('help = "LLaVA: ucit, mllm-dcl"\n') != []
    assert spelled_names('"""ucit in a docstring is prose."""\nx = "synthetic"\ny = "ucitx"\n') == []


def test_no_module_outside_the_settings_spells_a_llava_benchmark() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ALLOWED:
            continue
        found += [f"{relative}:{line}: {text!r}" for line, text in spelled_names(path.read_text())]
    assert not found, "ask clbench.settings instead of naming a setting's benchmark:\n" + "\n".join(found)


def test_llava_presets_are_json_read_by_the_shared_loader() -> None:
    """The LLaVA presets moved from a Python dict to clbench/presets/mcit/*.json with the same values (so the same
    run ids), read by the CLIP presets' loader; the tiny LLaVA's default pre-training length stays STEPS."""
    pytest.importorskip("transformers", reason="the MCIT setting needs the mcit extra")
    from clbench.config import list_presets, load_preset
    from clbench.settings.mcit.pretrain import STEPS
    from clbench.settings.mcit.runner import PRESETS

    assert list_presets("mcit") == ["default", "smoke"] and "paper" in list_presets()
    assert {k: v for k, v in load_preset("smoke", "mcit").items() if k != "_doc"} == {
        "n_train": 32, "n_test": 8, "pretrain_steps": 20, "loop": {"epochs": [1], "batch_size": 16}}
    assert {k: v for k, v in PRESETS["default"].items() if k != "_doc"} == {
        "n_train": 192, "n_test": 48, "pretrain_steps": STEPS, "loop": {"epochs": [12], "batch_size": 16}}
    with pytest.raises(UserError, match="--preset 'paper' is unknown for the MCIT setting; use default or smoke"):
        load_preset("paper", "mcit", "MCIT setting")


def test_llava_sets_go_through_the_shared_parser() -> None:
    pytest.importorskip("transformers", reason="the MCIT setting needs the mcit extra")
    from clbench.settings.mcit.loop import LoopConfig
    from clbench.settings.mcit.methods import get_mcit_method
    from clbench.settings.mcit.runner import apply_sets

    loop, hparams, sizes = LoopConfig(), {"keeplora": get_mcit_method("keeplora").Hparams()}, {"n_train": 4,
                                                                                               "n_test": 2}
    apply_sets(["loop.epochs=2,3", "loop.caption_max_chars=none", "keeplora.rank = 4", "data.n_test=5",
                "keeplora.energy=1"], loop, hparams, sizes)
    assert loop.epochs == [2, 3] and loop.caption_max_chars is None and hparams["keeplora"].rank == 4
    assert hparams["keeplora"].energy == 1.0 and sizes == {"n_train": 4, "n_test": 5}
    for bad, needle in [("loop.batch_size=0", "loop.batch_size=0 is out of range"),
                        ("keeplora.eps_w=1.5", "keeplora.eps_w=1.5 is out of range"),
                        ("keeplora.rank=2.5", "is not a valid int"), ("loop.nope=1", "<method>.<field>"),
                        ("data.n_train=-1", "data.n_train=-1 is out of range")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            apply_sets([bad], loop, hparams, sizes)


@pytest.mark.parametrize(("steps", "warmup"), [(1, 0.03), (2, 0.5), (7, 0.03), (40, 0.03), (100, 0.1), (33, 1.0),
                                               (5, 0.0)])
def test_the_llava_loop_uses_the_shared_warmup_cosine_with_the_same_numbers(steps: int, warmup: float) -> None:
    """The LLaVA loop's schedule (formerly its own lambda) is the shared warm-up cosine; at every step the loop
    takes, the factor is bit-identical to the old one: (s+1)/W while s < W, then 0.5·(1 + cos(π(s−W)/max(1, T−W)))."""
    pytest.importorskip("transformers", reason="the MCIT setting needs the mcit extra")
    import math

    from clbench.settings.mcit.loop import lr_factor

    warm = max(1, math.ceil(warmup * steps))
    factor = lr_factor(steps, warmup)
    for s in range(steps):
        old = (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        assert factor(s) == old, s
    assert factor(0) == 1 / warm and factor(min(warm, steps) - 1) == 1.0  # the peak ends the warm-up
