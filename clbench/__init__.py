"""clbench: continual-learning methods for CLIP on one shared MTIL harness."""

__version__ = "0.1.0"
