"""Helpers shared by the tests (no fixtures: those live in the conftest.py files): process.py starts and awaits
processes, runs.py reads run directories, files.py writes test files, cluster.py drives the namespace SLURM cluster,
evaluation.py holds the official evaluator venv and inference configs, wandb_records.py reads .wandb logs."""
