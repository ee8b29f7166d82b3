"""The training run: the loop (`trainer.py`), what it is built from (`setup.py`), checkpoints and
resume, the run directory, several processes, the schedule, progress, metrics and trackers.
"""
