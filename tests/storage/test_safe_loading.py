"""Safe loading (issue 9): no file clbench reads can run code, nothing it writes is a pickle, and paths built
from configuration or input files cannot leave the output folder.

The planted files are real exploits: unpickling them calls ``open(marker, "w")``, so the marker file appears
if any loader unpickles them (``test_the_planted_pickles_do_run_code`` shows that they do).
"""

from __future__ import annotations

import ast
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from clbench.cli.app import main
from clbench.errors import UserError
from clbench.methods import registry
from clbench.methods.base import Method
from clbench.models.backbones import load_state_file
from clbench.storage.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from clbench.storage.results import atomic_write_safetensors, run_dir

SMOKE = ["--preset", "smoke", "--pretrained", "none", "--quiet"]
PACKAGE = Path(__file__).resolve().parents[2] / "clbench"


class Plant:
    """Unpickling this object runs ``open(marker, "w")``, creating ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path, kind: str) -> Path:
    """Write an exploit at ``path``: a raw pickle or a ``torch.save`` zip archive holding one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"weight": Plant(marker)}))
    else:
        torch.save({"state_dict": {"weight": Plant(marker)}}, path)
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, code: int, marker: Path, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not marker.exists(), "the planted pickle was unpickled"
    return lines[0]


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_the_planted_pickles_do_run_code(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    path = plant(tmp_path / "evil.pt", marker, kind)
    if kind == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


# ---- --pretrained ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kind", [("evil.pt", "torch.save"), ("evil.pth", "pickle"), ("evil.bin", "pickle"),
                                        ("evil.safetensors", "pickle"), ("evil.safetensors", "torch.save")])
def test_pretrained_pickle_is_refused(tmp_path: Path, capsys, name: str, kind: str) -> None:
    marker = tmp_path / "pwned"
    weights = plant(tmp_path / "weights" / name, marker, kind)
    out = tmp_path / "out"
    code = main(["run", "--methods", "lora", "--out", str(out), "--preset", "smoke", "--quiet",
                 "--pretrained", str(weights)])
    refused(capsys, code, marker, str(weights))
    assert not out.exists()


def scripted(path: Path) -> Path:
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(path))
    return path


def test_torchscript_needs_the_explicit_flag(tmp_path: Path, capsys) -> None:
    archive = scripted(tmp_path / "openai.pt")
    with pytest.raises(UserError, match="--trust-torchscript"):
        load_state_file(archive)
    state = load_state_file(archive, allow_torchscript=True)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (2, 3)
    out = tmp_path / "out"
    code = main(["run", "--methods", "lora", "--out", str(out), *SMOKE[:2], "--quiet", "--pretrained", str(archive)])
    refused(capsys, code, tmp_path / "none", "TorchScript", "--trust-torchscript")
    # with the flag the archive is read, and found not to be a tiny CLIP (so the flag reached the loader)
    code = main(["run", "--methods", "lora", "--out", str(out), *SMOKE[:2], "--quiet", "--pretrained", str(archive),
                 "--trust-torchscript"])
    refused(capsys, code, tmp_path / "none", "does not fit backbone")
    assert not out.exists()


def test_plain_tensor_checkpoint_still_loads(tmp_path: Path) -> None:
    """``torch.load(weights_only=True)`` reads an ordinary state-dict checkpoint (only the code is refused)."""
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"module.w": torch.arange(4.0)}}, path)
    assert torch.equal(load_state_file(path)["w"], torch.arange(4.0))


# ---- resume checkpoint -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(["run", "--methods", "zeroshot", "--out", str(out), *SMOKE, "--set", "data.num_tasks=2"]) == 0
    return out


def interrupted_copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run made to look interrupted; returns (results folder, run folder)."""
    out = Path(shutil.copytree(finished, tmp_path / "results"))
    folder = out / "synthetic-order1" / "zeroshot" / "seed0"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["status"] = "running"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return out, folder


@pytest.mark.parametrize("kind", ["pickle", "torch.save", "foreign safetensors"])
def test_resume_checkpoint_that_is_not_ours_is_refused(finished: Path, tmp_path: Path, capsys, kind: str) -> None:
    out, folder = interrupted_copy(finished, tmp_path)
    marker = tmp_path / "pwned"
    if kind == "foreign safetensors":
        atomic_write_safetensors(folder / CHECKPOINT_NAME, {"w": torch.ones(2)})
    else:
        plant(folder / CHECKPOINT_NAME, marker, kind)
    before = snapshot(out)
    code = main(["run", "--methods", "zeroshot", "--out", str(out), *SMOKE, "--set", "data.num_tasks=2", "--resume"])
    refused(capsys, code, marker, "cannot resume from", CHECKPOINT_NAME, "delete it")
    assert snapshot(out) == before


# ---- results folders given to report ---------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["metrics.json", "accuracy.csv", "manifest.json", "config.json", "zeroshot.csv",
                                    "profile.csv"])
def test_report_refuses_pickles_in_a_results_folder(finished: Path, tmp_path: Path, capsys, victim: str) -> None:
    out = Path(shutil.copytree(finished, tmp_path / "results"))
    marker = tmp_path / "pwned"
    plant(next(out.rglob(victim)), marker, "torch.save")
    code = main(["report", str(out), "--out", str(tmp_path / "report"), "--format", "csv"])
    refused(capsys, code, marker)
    assert not (tmp_path / "report").exists()


def test_report_ignores_stray_pickles_and_external_pickles_are_refused(finished: Path, tmp_path: Path,
                                                                       capsys) -> None:
    out = Path(shutil.copytree(finished, tmp_path / "results"))
    marker = tmp_path / "pwned"
    folder = next(out.rglob("manifest.json")).parent
    for name in ("model.pt", "state.pkl", CHECKPOINT_NAME):
        plant(folder / name, marker, "torch.save")
    assert main(["report", str(out), "--out", str(tmp_path / "report"), "--format", "csv"]) == 0
    assert not marker.exists()
    external = plant(tmp_path / "elsewhere.csv", marker, "pickle")
    code = main(["report", str(external), "--out", str(tmp_path / "report2"), "--format", "csv"])
    refused(capsys, code, marker)


# ---- nothing clbench writes is a pickle ------------------------------------------------------------------
def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def dotted(node: ast.AST) -> str:
    """``torch.jit.load`` for the expression of a call's function, ``""`` if it is not a plain name path."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


UNSAFE_CALLS = {"torch.save", "pickle.dump", "pickle.dumps", "pickle.load", "pickle.loads", "pickle.Unpickler",
                "np.load", "numpy.load", "joblib.load", "joblib.dump", "dill.load", "shelve.open",
                "torch.serialization.load"}


def test_no_pickle_writers_or_unsafe_readers_in_the_package() -> None:
    """A static guard over every module of the package: no pickle/torch.save/np.load/joblib/dill/shelve calls,
    every ``torch.load`` passes ``weights_only=True``, and ``torch.jit.load`` only inside a function taking
    ``allow_torchscript``."""
    problems = []
    for path in source_files():
        tree = ast.parse(path.read_text())
        rel = path.relative_to(PACKAGE.parent)
        functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func)
            if name in UNSAFE_CALLS:
                problems.append(f"{rel}:{node.lineno}: {name}")
            if name == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    problems.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
            if name == "torch.jit.load":
                owner = [f for f in functions if f.lineno <= node.lineno <= (f.end_lineno or 0)]
                args = {a.arg for f in owner for a in f.args.args + f.args.kwonlyargs}
                if "allow_torchscript" not in args:
                    problems.append(f"{rel}:{node.lineno}: torch.jit.load outside an allow_torchscript function")
    assert not problems, problems


def test_the_static_guard_sees_unsafe_calls() -> None:
    tree = ast.parse("import torch\ntorch.load(f, map_location='cpu')\ntorch.save(x, f)\n")
    names = [dotted(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert names == ["torch.load", "torch.save"]


def test_an_interrupted_run_folder_holds_only_json_csv_and_safetensors(tmp_path: Path, monkeypatch) -> None:
    import clbench.engine.runner as runner
    import clbench.engine.session as session
    from clbench.config import build_config

    class Stop(BaseException):
        pass

    save = session.save_checkpoint

    def save_then_stop(path: Path, ckpt: Checkpoint) -> None:
        save(path, ckpt)
        raise Stop

    monkeypatch.setattr(session, "save_checkpoint", save_then_stop)
    cfg = build_config("smoke", {"pretrained": "none"}, ["data.num_tasks=2"], ["keeplora+"])
    with pytest.raises(Stop):
        runner.run_methods(cfg, ["keeplora+"], tmp_path, notify=lambda msg: None)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".csv", ".safetensors"}
    for p in files:
        head = p.read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x04", b"\x80\x05", b"PK"), f"{p} looks like a pickle or zip"
        if p.suffix == ".json":
            json.loads(p.read_text())
    ckpt = load_checkpoint(next(tmp_path.rglob(CHECKPOINT_NAME)))
    assert any(k.startswith("basis/") for k in ckpt.method) and any(k.startswith("head/") for k in ckpt.method)


# ---- exact round trip --------------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).tolist())


def test_checkpoint_round_trip_is_bitwise(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([math.nan, -0.0, math.inf, -math.inf, 1e-45, 3.4e38])
    tensors = {
        "w": torch.randn(7, 5, generator=gen), "special": special, "double": torch.randn(4, generator=gen).double(),
        "half": torch.randn(3, generator=gen).half(), "bf16": torch.randn(3, generator=gen).bfloat16(),
        "int": torch.randint(-(2**40), 2**40, (6,), generator=gen), "mask": torch.rand(5, generator=gen) > 0.5,
        "empty basis": torch.zeros(128, 0), "scalar": torch.tensor(2.5), "nan_view": special[::2],
    }
    extra = {"kinds": {"memory.vision.0": "retain", "memory.text.3": "remove"}, "nested": [[1, 2.5], {"ü": None}],
             "tiny": 1e-300, "tenth": 0.1}
    ckpt = Checkpoint(run_id="abc123", completed=3, datasets=["A", "B"], zeroshot=[12.5, 1 / 3],
                      rows=[[0.1, 2 / 3], [99.99999999999, 0.0]], model={"clip.w": tensors["w"]}, method=tensors,
                      method_extra=extra, profile=[{"task": -1, "section": "eval", "seconds": 0.123456789}],
                      state_bytes=[{"task": 0, "name": "basis", "bytes": 4096, "columns": 3}],
                      rng={"torch": torch.get_rng_state()}, rng_extra={"numpy": ["MT19937", [1, 2], 0, 0, 0.0]})
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, ckpt)
    back = load_checkpoint(path)
    assert back.info() == json.loads(json.dumps(ckpt.info()))
    assert back.method_extra == extra and back.rows == ckpt.rows and back.zeroshot == ckpt.zeroshot
    for group in ("model", "method", "rng"):
        ours, theirs = getattr(ckpt, group), getattr(back, group)
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            assert theirs[key].dtype == value.dtype and theirs[key].shape == value.shape, key
            assert bits(theirs[key]) == bits(value), key


def test_method_states_round_trip_through_a_checkpoint(tmp_path: Path, tiny_model) -> None:
    """KeepLoRA+ (bases and heads) and InfLoRA (memories and their kinds, in JSON) give back exactly what they
    stored, through the same file the runner writes."""
    import copy

    from clbench.config import build_config
    from clbench.costs.profiler import Profiler
    from clbench.methods import get_method
    from clbench.methods.inflora import DualMemory

    def build(name: str, model) -> Method:
        cfg = build_config("smoke", {}, [], [name])
        cls = get_method(name)
        return cls(model, cls.Hparams(**cfg.methods[name]), Profiler())

    gen = torch.Generator().manual_seed(1)
    keep = build("keeplora+", copy.deepcopy(tiny_model))
    keep.setup()
    keep.heads["Shapes"] = torch.nn.Parameter(torch.randn(4, 128, generator=gen), requires_grad=False)
    inf = build("inflora", copy.deepcopy(tiny_model))
    inf.memory = {"vision.0": DualMemory(torch.linalg.qr(torch.randn(128, 5, generator=gen)).Q, "retain"),
                  "text.1": DualMemory(torch.zeros(128, 0), "remove")}
    for method, name in ((keep, "keeplora+"), (inf, "inflora")):
        path = tmp_path / f"{name}.safetensors"
        save_checkpoint(path, Checkpoint("id", 1, ["Shapes"], [1.0], [[1.0]], method=method.state_dict(),
                                         method_extra=method.extra_state()))
        back = load_checkpoint(path)
        fresh = build(name, copy.deepcopy(tiny_model))
        fresh.load_state_dict(back.method)
        fresh.load_extra_state(back.method_extra)
        assert fresh.extra_state() == method.extra_state()
        before, after = method.state_dict(), fresh.state_dict()
        assert before.keys() == after.keys() and len(before) > 0
        for key in before:
            assert bits(before[key]) == bits(after[key]) and before[key].dtype == after[key].dtype, key
    assert {m.kind for m in fresh.memory.values()} == {"retain", "remove"}


# ---- paths from configuration and input cannot leave --out -----------------------------------------------
BAD_NAMES = ["../evil", "..", "/abs", "a/b", "a\\b", "", ".hidden", "x/../../y"]


@pytest.mark.parametrize("method", BAD_NAMES, ids=[f"name{i}" for i in range(len(BAD_NAMES))])
def test_run_dir_rejects_names_that_are_not_one_plain_component(tmp_path: Path, method: str) -> None:
    with pytest.raises(UserError, match="cannot be used in a path"):
        run_dir(tmp_path, "synthetic", 1, method, 0)


@pytest.mark.parametrize("name", ["../x", "/etc"], ids=["dotdot", "absolute"])
def test_run_dir_rejects_a_bad_benchmark_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError):
        run_dir(tmp_path, name, 1, "lora", 0)


def test_run_dir_stays_inside(tmp_path: Path) -> None:
    path = run_dir(tmp_path, "synthetic", 2, "keeplora++", 3)
    assert path == tmp_path / "synthetic-order2" / "keeplora++" / "seed3"


def test_a_registered_method_named_with_dotdot_cannot_write_outside(tmp_path: Path, capsys, monkeypatch) -> None:
    class Evil(Method):
        pass

    monkeypatch.setitem(registry._METHODS, "../../evil", Evil)
    out = tmp_path / "a" / "out"
    code = main(["run", "--methods", "../../evil", "--out", str(out), *SMOKE])
    refused(capsys, code, tmp_path / "none", "cannot be used in a path")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_report_never_writes_outside_out(tmp_path: Path, capsys) -> None:
    """A manifest's benchmark becomes the table's file name: a ``..`` in it is refused; a ``--label`` with
    ``../`` only names a table row (figure files use a slug of it)."""
    from fake_runs import write_external_csv, write_fake_run

    results = tmp_path / "results"
    folder = write_fake_run(results, "lora", 0)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["benchmark"] = "../../../escaped"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "deep" / "er" / "report"
    before = snapshot(tmp_path)
    code = main(["report", str(results), "--out", str(out), "--format", "csv"])
    refused(capsys, code, tmp_path / "none", "benchmark", "cannot be used in a path")
    assert snapshot(tmp_path) == before
    external = write_external_csv(tmp_path / "matrix.csv")
    code = main(["report", str(external), "--label", "../../../escaped", "--out", str(out), "--format", "csv",
                 "--figures"])
    assert code == 0, capsys.readouterr().err
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents
               and p != external and results not in p.parents]
    assert outside == []
    assert all(p.resolve().parent.is_relative_to(out.resolve()) for p in out.rglob("*"))
