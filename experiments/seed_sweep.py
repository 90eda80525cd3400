"""Train one config under several seeds (CASE Sec. V-A.1: DenseNet-201 retrained under five
seeds), one ``train.py`` process per seed: one after another, or with ``--gpus`` several at
once, one per GPU (``CUDA_VISIBLE_DEVICES``).

    uv run python -m experiments.seed_sweep --config configs/experiment/shapes_seed_robustness.yaml \\
        --seeds 0 1 2 3 4 --name seeds-shapes [--gpus 0 1 ...] [--output_dir outputs] \\
        [--force] [-- extra train.py arguments]

Seed N trains into ``<output_dir>/<name>-seed<N>/`` with ``--seed N`` (W&B group ``<name>``);
its output goes to ``seed_sweep.log`` in that directory. A seed whose ``checkpoints/last.ckpt``
exists is skipped unless ``--force``; a run this command started but that did not finish (its
log without ``seed_sweep.json``) is trained again from scratch. A failing seed stops the sweep
and names its log. Prints the wall time of every seed and the total. Aggregate the runs with
``experiments.aggregate_seeds``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments._jobs import (
    Job,
    JobResult,
    JobsFailed,
    python_command,
    run_jobs,
    split_extra_arguments,
)

CHECKPOINT = Path("checkpoints") / "last.ckpt"
LOG = "seed_sweep.log"
DONE = "seed_sweep.json"


@dataclass(frozen=True)
class SeedRun:
    """What the sweep did with one seed: ``status`` is ``trained`` or ``skipped``."""

    seed: int
    run_dir: Path
    status: str
    wall_s: float | None
    val_acc_top1: float | None


def run_name(prefix: str, seed: int) -> str:
    return f"{prefix}-seed{seed}"


def train_arguments(
    config: Path, seed: int, prefix: str, output_dir: Path, extra: Sequence[str] = ()
) -> list[str]:
    """``train.py`` arguments of one seed; ``extra`` comes last, so it can override anything."""
    return [
        "--config", str(config),
        "--seed", str(seed),
        "--run_name", run_name(prefix, seed),
        "--output_dir", str(output_dir),
        "--wandb.group", prefix,
        *extra,
    ]  # fmt: skip


def is_trained(run_dir: Path) -> bool:
    """A checkpoint exists and, if this command started the run, the run finished."""
    if not (run_dir / CHECKPOINT).is_file():
        return False
    return (run_dir / DONE).is_file() or not (run_dir / LOG).is_file()


def final_accuracy(run_dir: Path) -> float | None:
    """The last logged ``val/acc_top1`` of a training run (``metrics.csv``), if any."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    metrics = pd.read_csv(path)
    if "val/acc_top1" not in metrics:
        return None
    values = metrics["val/acc_top1"].dropna()
    return float(values.iloc[-1]) if len(values) else None


def sweep(
    config: Path,
    seeds: Sequence[int],
    prefix: str,
    output_dir: Path = Path("outputs"),
    gpus: Sequence[str] | None = None,
    force: bool = False,
    extra: Sequence[str] = (),
) -> list[SeedRun]:
    """Train ``config`` once per seed (see the module docstring); returns one
    :class:`SeedRun` per seed, in the order of ``seeds``."""
    if not config.is_file():
        raise SystemExit(f"error: config not found: {config}")
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds lists a seed twice: {list(seeds)}")
    jobs: list[Job] = []
    skipped: dict[int, Path] = {}
    seed_of: dict[str, int] = {}
    for seed in seeds:
        run_dir = output_dir / run_name(prefix, seed)
        if is_trained(run_dir) and not force:
            print(f"[seed {seed}] {run_dir / CHECKPOINT} exists: skipped (--force retrains)")
            skipped[seed] = run_dir
            continue
        if run_dir.exists():
            reason = "--force" if is_trained(run_dir) else "unfinished earlier run"
            print(f"[seed {seed}] removing {run_dir} ({reason})")
            shutil.rmtree(run_dir)
        command = python_command(
            "train.py", *train_arguments(config, seed, prefix, output_dir, extra)
        )
        jobs.append(Job(f"seed {seed}", command, run_dir / LOG))
        seed_of[jobs[-1].label] = seed

    def mark_done(result: JobResult) -> None:
        run_dir = result.job.log.parent
        done = {
            "seed": seed_of[result.job.label],
            "command": list(result.job.command),
            "wall_s": round(result.wall_s, 1),
            "gpu": result.gpu,
        }
        (run_dir / DONE).write_text(json.dumps(done, indent=2))

    try:
        results = run_jobs(jobs, gpus, on_finished=mark_done)
    except JobsFailed as error:
        failed = ", ".join(str(seed_of[r.job.label]) for r in error.failures)
        raise SystemExit(f"error: training failed for seed(s) {failed}\n\n{error}") from None
    wall = {seed_of[r.job.label]: r.wall_s for r in results}
    runs = []
    for seed in seeds:
        run_dir = output_dir / run_name(prefix, seed)
        status = "skipped" if seed in skipped else "trained"
        runs.append(SeedRun(seed, run_dir, status, wall.get(seed), final_accuracy(run_dir)))
    return runs


def main(argv: Sequence[str] | None = None) -> list[SeedRun]:
    import sys

    own, extra = split_extra_arguments(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m experiments.seed_sweep",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to every train.py run (e.g. -- --trainer.max_epochs 2).",
    )
    parser.add_argument("--config", type=Path, required=True, help="train.py config (YAML)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--name", help="run-name prefix (default: seeds-<config name>)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs"))
    parser.add_argument("--gpus", nargs="+", help="GPU ids: train one seed per GPU at a time")
    parser.add_argument("--force", action="store_true", help="retrain seeds that have a checkpoint")
    args = parser.parse_args(own)
    prefix = args.name or f"seeds-{args.config.stem}"
    started = time.perf_counter()
    runs = sweep(args.config, args.seeds, prefix, args.output_dir, args.gpus, args.force, extra)
    total = time.perf_counter() - started
    print("\nseed  status   wall time  val/acc_top1  run directory")
    for run in runs:
        wall = "–" if run.wall_s is None else f"{run.wall_s:7.1f} s"
        accuracy = "–" if run.val_acc_top1 is None else f"{run.val_acc_top1:.4f}"
        print(f"{run.seed:>4}  {run.status:<7}  {wall:>9}  {accuracy:>12}  {run.run_dir}")
    print(f"total wall time: {total:.1f} s ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    runs_glob = args.output_dir / f"{prefix}-seed*"
    print(
        f"\nnext: uv run python -m experiments.aggregate_seeds --runs {runs_glob} "
        f"--evaluate_config configs/evaluate/seed_robustness.yaml"
    )
    return runs


if __name__ == "__main__":
    main()
