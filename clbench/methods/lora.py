"""Plain sequential LoRA: a fresh adapter per task on q, k, v, o of both encoders, merged after the task.

Standard LoRA initialisation (down-projection Kaiming-uniform, up-projection zero, scale α/r). The
default α = 1 with r = 16 matches KeepLoRA's scale s = 1/16, so the two differ only in how the adapter is
designed, not in its step size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from clbench.linalg import full_precision
from clbench.methods.base import Method, TaskContext
from clbench.methods.recipes import RecipeCard, adapted, harness
from clbench.methods.registry import register_method
from clbench.models.attention import LowRankDelta
from clbench.models.clip import AttentionSite

ADAPTER = "task"


@dataclass
class LoRAHparams:
    rank: int = field(default=16, metadata={"min": 1, "max_width": True})
    alpha: float = field(default=1.0, metadata={"min": 0.0, "exclusive_min": True})
    projections: str = field(default="qkvo", metadata={"choices_of": "qkvo"})
    encoders: str = field(default="vision,text", metadata={"subset_of": ("vision", "text")})


@full_precision()
def merge_adapters(sites: list[AttentionSite], name: str = ADAPTER) -> None:
    """Fold every adapter called ``name`` into its base weight (exact: W + s·up·down), in float32 whatever the
    caller's autocast (LoRA, InfLoRA and KeepLoRA merge through here)."""
    for site in sites:
        for proj in list(site.module.adapters):
            if name in site.module.adapters[proj]:
                site.module.merge_adapter(proj, name)


def adapter_parameters(sites: list[AttentionSite], name: str = ADAPTER) -> list[nn.Parameter]:
    params = []
    for site in sites:
        for proj in site.module.adapters:
            if name in site.module.adapters[proj]:
                params += list(site.module.adapters[proj][name].parameters())
    return params


def encoder_list(spec: str) -> list[str]:
    return [e.strip() for e in spec.split(",") if e.strip()]


@register_method("lora")
class LoRA(Method):
    """Sequential LoRA (rank 16 on q, k, v, o of both encoders), merged into the weights after every task."""

    summary = "plain LoRA on q,k,v,o of both encoders, merged after each task"
    Hparams = LoRAHparams

    def sites(self) -> list[AttentionSite]:
        return self.model.attention_sites(encoder_list(self.hparams.encoders))

    def before_task(self, task: TaskContext) -> None:
        hp = self.hparams
        gen = torch.Generator().manual_seed(task.index * 7919 + 17)
        for site in self.sites():
            d = site.width
            for proj in hp.projections:
                down = torch.empty(hp.rank, d)
                bound = 1 / math.sqrt(d)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / peft
                down.uniform_(-bound, bound, generator=gen)
                delta = LowRankDelta(down, torch.zeros(d, hp.rank), hp.alpha / hp.rank, train_down=True)
                site.module.add_adapter(proj, ADAPTER, delta)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return adapter_parameters(self.sites())

    def after_task(self, task: TaskContext) -> None:
        with self.profiler.section("merge"):
            merge_adapters(self.sites())


# ---- recipe cards (provenance under --preset paper; the values live in presets/paper.json and the defaults) --------
_SAME_AS_KEEPLORA = "no authors' continual recipe: KeepLoRA's MTIL setting, so the two differ only in the adapter"
RECIPES = {
    "lora": RecipeCard(
        "sequential LoRA (Hu et al., ICLR 2022) merged after each task, on KeepLoRA's MTIL recipe",
        {**{f"train.{key}": adapted(_SAME_AS_KEEPLORA) for key in
            ("optimizer", "lr", "weight_decay", "schedule", "epochs", "max_steps", "batch_size")},
         "train.warmup_steps": harness("unused: OneCycle warms up over its first 30% by itself"),
         "rank": adapted("r = 16 as KeepLoRA"),
         "alpha": adapted("α = 1: KeepLoRA's step scale s = 1/16"),
         "projections": adapted("q, k, v, o as KeepLoRA"),
         "encoders": adapted("both towers as KeepLoRA")}),
}
