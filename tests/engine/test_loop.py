"""The one task loop (:func:`clbench.engine.loop.run_tasks`) on a toy setting: the order of the steps, the
profiler's task index and sections, the state sizes, the checkpoint before the row is reported, and a resumed
run that neither sets up nor scores the base model again. Each rule, broken, fails a test here."""

from __future__ import annotations

from clbench.costs.profiler import Profiler
from clbench.engine.loop import Hooks, TaskSteps, run_tasks


class ToyMethod:
    def __init__(self, log: list[str]) -> None:
        self.log, self.tasks = log, 0

    def setup(self) -> None:
        self.log.append("setup")

    def before_task(self, ctx) -> None:
        self.log.append(f"before {ctx}")

    def after_task(self, ctx) -> None:
        self.log.append(f"after {ctx}")
        self.tasks += 1

    def state_bytes(self) -> dict[str, int]:
        return {"memory": 10 * self.tasks}


class ToySteps(TaskSteps):
    """Logs every step with the profiler's task index and the innermost open section."""

    def __init__(self, log: list[str], profiler: Profiler, hooks: Hooks) -> None:
        super().__init__(ToyMethod(log), profiler, hooks, ["A", "B", "C"])
        self.log, self.rows = log, []

    def _where(self) -> str:
        return f"task={self.profiler.task}"

    def evaluate_base(self) -> None:
        self.log.append(f"base {self._where()}")

    def context(self, index: int) -> str:
        self.log.append(f"context {index} {self._where()}")
        return self.names[index]

    def train(self, index: int, ctx) -> None:
        self.log.append(f"train {ctx} {self._where()}")

    def evaluate(self, index: int) -> list[float]:
        row = [float(index)] * 3
        self.rows.append(row)
        self.log.append(f"eval {index}")
        return row


def _run(start: int, fresh: bool) -> tuple[list[str], Profiler]:
    log: list[str] = []
    profiler = Profiler()
    hooks = Hooks(on_row=lambda t, row: log.append(f"row {t} {row[0]:.0f}"))
    steps = ToySteps(log, profiler, hooks)
    run_tasks(steps, start, fresh, on_task_end=lambda t: log.append(f"checkpoint {t} ({len(steps.rows)} rows)"))
    return log, profiler


def test_a_fresh_run_sets_up_scores_the_base_then_each_task_in_order() -> None:
    log, profiler = _run(0, True)
    expected = ["setup", "base task=-1"]
    for t, name in enumerate("ABC"):
        expected += [f"context {t} task={t}", f"before {name}", f"train {name} task={t}", f"after {name}",
                     f"eval {t}", f"checkpoint {t} ({t + 1} rows)", f"row {t} {t}"]
    assert log == expected
    sections = profiler.frame()[["task", "section"]].values.tolist()
    assert sections == [[-1, "setup"], [-1, "eval"]] + [[t, s] for t in range(3) for s in ("train", "eval")]
    state = profiler.state_frame()
    assert state[["task", "name", "bytes"]].values.tolist() == [[0, "memory", 10], [1, "memory", 20],
                                                               [2, "memory", 30]]


def test_a_resumed_run_starts_at_its_next_task_without_setup_or_base_scores() -> None:
    log, profiler = _run(2, False)
    assert log == ["context 2 task=2", "before C", "train C task=2", "after C", "eval 2", "checkpoint 2 (1 rows)",
                   "row 2 2"]
    assert profiler.frame()[["task", "section"]].values.tolist() == [[2, "train"], [2, "eval"]]
