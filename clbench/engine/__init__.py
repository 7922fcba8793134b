"""The engine: one run of methods over a task sequence (runner), the per-task train/evaluate harness, schedules,
metrics, cost profiling, progress, interruption and experiment tracking. It never imports a setting or the CLI."""
