"""Continual instruction tuning of multimodal LLMs (LLaVA) on UCIT, MLLM-DCL and an embedded synthetic sequence.

The setting of MCITlib (Guo et al., arXiv 2508.07307) and of KeepLoRA's LLaVA experiments, on the same results
contract as the CLIP / MTIL harness: scorers, metrics, data readers, backbone, methods and the task loop each live in
their own module here.
"""

from clbench.storage.layout import ResultLayout

# The benchmarks of this setting (``--benchmark``), here so that the setting's declaration
# (clbench.settings.mcit) names them without importing the setting's implementation or its extra.
BENCHMARKS = ("synthetic-mcit", "ucit", "mllm-dcl")

# What a complete run folder of this setting holds (clbench.storage.results.missing_results): the base model's row
# in base.csv, the task list under config.json's "tasks", MCITlib's MAA in metrics.json.
LAYOUT = ResultLayout(files=("config.json", "accuracy.csv", "base.csv", "metrics.json", "profile.csv"),
                      tasks_key="tasks", metric="maa")
