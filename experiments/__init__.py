"""Commands that run or combine several runs of an experiment (seed sweeps, cross-run plots).

Each module is a small command: ``uv run python -m experiments.<name> --help``. Single-run
analyses are callbacks in ``callbacks/``; these commands only start runs and read their outputs.
"""
