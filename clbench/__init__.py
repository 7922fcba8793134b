"""clbench: continual-learning methods on one benchmark suite: CLIP on MTIL / X-TAIL, LLaVA on UCIT / MLLM-DCL."""

__version__ = "0.1.0"
