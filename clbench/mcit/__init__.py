"""Continual instruction tuning of multimodal LLMs (LLaVA) on UCIT, MLLM-DCL and an embedded synthetic sequence.

The setting of MCITlib (Guo et al., arXiv 2508.07307) and of KeepLoRA's LLaVA experiments, on the same results
contract as the CLIP / MTIL harness: scorers, metrics, data readers, backbone, methods and the task loop each live in
their own module here.
"""
