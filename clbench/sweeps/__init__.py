"""Sweeps: planning a grid of runs into staged run specs (plan) and executing them locally, on Ray or on SLURM
(launchers)."""
