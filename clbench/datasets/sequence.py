"""Which datasets a real-data run trains on, in which order: the protocol's order, its first ``data.num_tasks``,
or the user's own selection ``data.datasets`` (``--datasets mnist,eurosat``).

A selection names datasets as the benchmark's protocol spells them (MTIL: ``MNIST``, ``EuroSAT``...; X-TAIL:
``mnist``, ``oxford_pets``...), case-insensitively, in the order they are to be learned. The metrics are then
those of the chosen sequence (Transfer over its datasets after the first, Average and Last over all of them),
which are not the protocol's 11-dataset numbers. Light on imports: :func:`clbench.config.build_config` resolves
a selection before anything is read.
"""

from __future__ import annotations

from collections.abc import Sequence

from clbench.errors import UserError

DISPLAY = {"mtil": "MTIL", "xtail": "X-TAIL"}


def protocol_names(benchmark: str) -> list[str]:
    """Every dataset of ``benchmark`` as its protocol spells it (Order I)."""
    if benchmark == "mtil":
        from clbench.datasets.mtil_names import ORDER_I
    elif benchmark == "xtail":
        from clbench.datasets.xtail_names import ORDER_I
    else:
        raise UserError(f"--datasets chooses among a real benchmark's datasets; --benchmark {benchmark} has its own "
                        "fixed sequence (pass --benchmark mtil or xtail, or drop --datasets)")
    return list(ORDER_I)


def parse_selection(benchmark: str, raw: str) -> list[str]:
    """``raw`` (comma-separated, any case) as the protocol's names, in the given order; unknown or repeated
    names are a one-line :class:`UserError`."""
    known = protocol_names(benchmark)
    by_key = {name.lower(): name for name in known}
    picked: list[str] = []
    for item in (s.strip() for s in raw.split(",")):
        if not item:
            continue
        name = by_key.get(item.lower())
        if name is None:
            raise UserError(f"--datasets: {item!r} is not a {DISPLAY[benchmark]} dataset; choose among "
                            f"{', '.join(known)} (any case)")
        if name in picked:
            raise UserError(f"--datasets names {name} twice; name each dataset once")
        picked.append(name)
    if not picked:
        raise UserError(f"--datasets is empty; name at least one {DISPLAY[benchmark]} dataset, e.g. "
                        f"--datasets {known[0]}")
    return picked


def canonical_selection(benchmark: str, raw: str) -> str:
    """The selection as stored in the configuration: the protocol's names, comma-separated, in run order."""
    return ",".join(parse_selection(benchmark, raw)) if raw.strip() else ""


def task_sequence(order_names: Sequence[str], selection: str, num_tasks: int, benchmark: str) -> list[str]:
    """The datasets of the run: the selection if given (in its order), else ``order_names`` cut to
    ``num_tasks`` (0: all)."""
    if selection.strip():
        return parse_selection(benchmark, selection)
    from clbench.datasets.selection import first_tasks

    return first_tasks(order_names, num_tasks, DISPLAY.get(benchmark, benchmark))


def is_full_protocol(benchmark: str | None, datasets: Sequence[str]) -> bool:
    """Whether ``datasets`` is all of a real benchmark's datasets (in any order)."""
    if benchmark not in DISPLAY:
        return False
    return sorted(d.lower() for d in datasets) == sorted(n.lower() for n in protocol_names(benchmark))
