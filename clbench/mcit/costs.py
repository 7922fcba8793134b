"""Cost of KeepLoRA's LLaVA-form linear algebra on random weights shaped like a LLaVA language model.

``clbench profile --backbone llava-1.5-7b`` times, for one decoder layer's matrices of each shape (q/k/v/o,
gate/up, down), the sections the CLIP profile names: ``pretrained_svd`` (W_p at eps_w), ``grad_svd`` (projection
and rank-r randomized SVD of a gradient) and ``feature_svd`` (GPM extension of the memory from a post-training
gradient), then scales by the number of matrices per layer and of layers. No weights or data are needed; random
Gaussian matrices have a flat spectrum, so W_p is wider than for trained weights (an upper bound on its cost).
The gradient passes (``grad_estimation``, ``feature_stats``) need the model and data and are measured by
``clbench run`` on the tiny LLaVA. Memory per matrix: the fp32 gradient, the adapter, and the basis bound d_in².
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from clbench import linalg
from clbench.errors import UserError

# Vicuna / Llama decoder sizes of the LLaVA-1.5 language models (hidden, MLP width, layers)
SHAPES = {"llava-1.5-7b": (4096, 11008, 32), "llava-1.5-13b": (5120, 13824, 40), "llava-tiny": (64, 128, 2)}


@dataclass
class MatrixCost:
    kind: str
    d_out: int
    d_in: int
    per_model: int
    seconds: dict[str, float]
    basis_columns: int

    def bytes(self, rank: int) -> dict[str, int]:
        return {"gradient": 4 * self.d_out * self.d_in, "adapter": 4 * rank * (self.d_in + self.d_out),
                "basis_bound": 4 * self.d_in * self.d_in}


def profile_llava_linear_algebra(backbone: str, rank: int = 32, eps_w: float = 0.6, energy: float = 0.99,
                                 seed: int = 0, device: str = "cpu") -> list[MatrixCost]:
    """Seconds of each section for one matrix of every shape, with the count of such matrices in the model."""
    if backbone not in SHAPES:
        raise UserError(f"--backbone {backbone!r}: LLaVA shapes known are {', '.join(SHAPES)}")
    hidden, mlp, layers = SHAPES[backbone]
    gen = torch.Generator().manual_seed(seed)
    kinds = [("q/k/v/o", hidden, hidden, 4 * layers), ("gate/up", mlp, hidden, 2 * layers),
             ("down", hidden, mlp, layers)]
    out = []
    for kind, d_out, d_in, count in kinds:
        W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(device)
        G = torch.randn(d_in, d_out, generator=gen).to(device)  # paper layout d_in x d_out
        times = {}
        t = time.perf_counter()
        U = linalg.principal_basis(W, eps_w, side="input", rule="paper", method="auto")
        times["pretrained_svd"] = time.perf_counter() - t
        t = time.perf_counter()
        linalg.top_r_factors(linalg.project_out(G, U), rank, method="randomized", niter=2, generator=gen, basis=U)
        times["grad_svd"] = time.perf_counter() - t
        t = time.perf_counter()
        U = linalg.gpm_extend(U, energy, features=G)
        times["feature_svd"] = time.perf_counter() - t
        out.append(MatrixCost(kind, d_out, d_in, count, times, U.shape[1]))
    return out
