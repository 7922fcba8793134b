"""Storage: the results folder contract (results), checkpoints for resume, run locks and safe file writing."""
