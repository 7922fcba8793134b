"""``clbench methods`` covers both settings: the LLaVA methods are listed, their card shows their hyperparameters,
and a CLIP-only method asked for on the MCIT setting is refused in one line."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from clbench.cli.app import main
from clbench.errors import UserError
from clbench.methods.registry import CLIP_METHODS, Registry

pytest.importorskip("transformers", reason="the MCIT setting needs transformers (pip install 'clbench[mcit]')")

from clbench.settings.mcit.methods import get_mcit_method, list_mcit_methods  # noqa: E402


def test_listing_names_the_llava_methods_under_their_setting(capsys) -> None:
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    mcit_header = next(i for i, line in enumerate(lines) if line.startswith("MCIT setting"))
    below = lines[mcit_header + 1:]
    for name in ("lora", "keeplora"):
        line = next(line for line in below if line.split()[:1] == [name])
        assert get_mcit_method(name).summary in line
    assert not any(line.split()[:1] == ["zscl"] for line in below)  # CLIP only
    clip_block = lines[1:mcit_header]
    assert any(line.split()[:1] == ["zscl"] for line in clip_block)


def test_card_of_the_llava_form_shows_its_hyperparameters(capsys) -> None:
    assert main(["methods", "keeplora", "--setting", "mcit"]) == 0
    out = capsys.readouterr().out
    hp = get_mcit_method("keeplora").Hparams()
    for f in dataclasses.fields(hp):
        assert f.name in out
    assert "grad_fraction" in out and "eps_w" in out  # LLaVA-only fields, absent from the CLIP keeplora
    assert "UCIT 32, DCL 64" in out and "loop.epochs" in out and "[12]" in out  # default preset: 12 epochs
    assert main(["methods", "keeplora", "--setting", "mcit", "--preset", "smoke"]) == 0
    assert "[1]" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "needle"), [
    (["methods", "zscl", "--setting", "mcit"], "method 'zscl' has no LLaVA form"),
    (["methods", "nosuch", "--setting", "mcit"], "unknown method 'nosuch' on the MCIT setting"),
    (["methods", "lora", "--setting", "mcit", "--preset", "paper"], "unknown for the MCIT setting"),
    (["methods", "lora", "--setting", "mcit", "--order", "2"], "one task order"),
    (["run", "--methods", "inflora", "--benchmark", "ucit"], "method 'inflora' has no LLaVA form"),
])
def test_refusals_are_one_line(args: list[str], needle: str, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_every_mcit_method_is_a_clip_family_name() -> None:
    """One name means one method family on either setting (``--methods lora,keeplora`` on both)."""
    assert set(list_mcit_methods()) <= set(CLIP_METHODS.names())


def test_generic_registry() -> None:
    reg: Registry[type] = Registry(lambda name, available: f"no {name}; have {','.join(available)}")

    @reg.register("b")
    class B:
        pass

    @reg.register("a")
    class A:
        pass

    assert reg.names() == ["a", "b"] and reg.get("a") is A and A.name == "a" and "b" in reg
    with pytest.raises(UserError, match="no c; have a,b"):
        reg.get("c")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg.register("a")(B)
    assert caught and "re-registered" in str(caught[0].message) and reg.get("a") is B
