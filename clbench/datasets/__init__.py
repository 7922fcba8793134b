"""Benchmarks of the CLIP setting: the embedded synthetic sequence, the real MTIL datasets and X-TAIL."""

# The CLIP benchmarks ``--benchmark`` accepts (the LLaVA setting's are clbench.settings.mcit's). Here, below the
# configuration layer, so that the data layer (and the user's config file, clbench.userconfig) can name them
# without importing clbench.config. Importing this package imports no torch.
BENCHMARKS = ("synthetic", "mtil", "xtail")
