"""The method contract every setting shares: identity, typed hyperparameters, the task lifecycle and resumable state.

A setting's base class adds what only its loop calls: the CLIP setting's :class:`clbench.methods.base.Method`
(losses over images and labels, evaluation features and logits, X-TAIL's union logits), the LLaVA setting's
:class:`clbench.settings.mcit.methods.McitMethod` (adapters on the language model's linears, a projector learning rate).
The run engine (:mod:`clbench.engine`) needs no more than this contract to checkpoint, check and restore a method,
so one resume path serves both settings. The split follows open_clip's ``task/base_task.py`` (one base, one task
class per modality) and mammoth's ``ContinualModel`` (one model contract over many settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from clbench.costs.profiler import Profiler


class MethodContract:
    """What the engine calls on every method, whatever its setting.

    - ``name`` / ``summary`` / ``Hparams``: the registry's name, one line for ``clbench methods``, and the dataclass
      of typed hyperparameters (``self.hparams``; each field's metadata gives its ``--set`` range);
    - ``setup()`` once before the first task; ``before_task(ctx)`` / ``after_task(ctx)`` around each task's
      training, with the setting's task context;
    - ``trainable_parameters()``: what the optimiser updates on the current task (parameters or groups);
    - ``state_dict()`` / ``check_state(state, extra, tasks)`` / ``load_state_dict(state)``: tensors saved in the
      resume checkpoint after each task, checked against the model before they are loaded;
    - ``extra_state()`` / ``load_extra_state(extra)``: the JSON part of that state;
    - ``state_bytes()``: what it holds between tasks, by name, for the cost profile (``state_bytes.csv``).

    Costly steps run inside ``self.profiler.section(name)`` (the names of :mod:`clbench.costs.profiler`).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Hparams: ClassVar[type]

    def __init__(self, model: nn.Module, hparams: Any, profiler: Profiler) -> None:
        self.model = model
        self.hparams = hparams
        self.profiler = profiler

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Once, before the first task."""

    def before_task(self, task: Any) -> None:
        """Before training task ``task`` (the setting's task context)."""

    def trainable_parameters(self) -> list[nn.Parameter] | list[dict]:
        """Parameters (or optimiser groups) trained on the current task; empty means no training."""
        return []

    def after_task(self, task: Any) -> None:
        """After training task ``task``, before it is evaluated."""

    # ---- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Method state beyond the model weights (tensors only; JSON-able extras via :meth:`extra_state`)."""
        return {}

    def check_state(self, state: dict[str, Tensor], extra: dict, tasks: Sequence[Any]) -> None:
        """Refuse restored state (saved after ``tasks``) that does not fit this method on this model, with a
        :class:`~clbench.methods.state_checks.StateMismatch` naming the entry; called after :meth:`setup` and before
        :meth:`load_state_dict`. Each setting's base gives the default rule."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""
        if state:
            raise ValueError(f"{self.name} keeps no state but was given {len(state)} tensors")

    def extra_state(self) -> dict:
        """JSON-able state saved beside :meth:`state_dict`."""
        return {}

    def load_extra_state(self, extra: dict) -> None:
        """Restore JSON state saved by :meth:`extra_state`."""

    def state_bytes(self) -> dict[str, int]:
        """Bytes held between tasks, by name (e.g. ``basis``), for the cost profile."""
        return {}
