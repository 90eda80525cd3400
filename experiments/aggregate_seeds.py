"""CASE Fig. 4 and the per-seed Wilcoxon table (CASE Sec. V-A.1): evaluate every seed's
checkpoint with the RQ1 procedure and compare the methods' mean top-1 vs top-2 feature
agreement across seeds.

    uv run python -m experiments.aggregate_seeds --runs outputs/seeds-shapes-seed* \\
        --evaluate_config configs/evaluate/seed_robustness.yaml [--layer L] \\
        [--output outputs/seeds-shapes-aggregate] [--gpus 0 1 ...] [-- extra evaluate.py args]

For each training run (``train.py`` run directory; its seed is read from its ``config.yaml``)
``evaluate.py`` runs the study on ``checkpoints/last.ckpt`` (``--checkpoint best``: the best
validation checkpoint) with the training run's datamodule, into
``<output>/evaluations/<run name>/``. A complete evaluation
(:func:`callbacks.run_outputs.is_complete`) of the same checkpoint, study and arguments is
reused, not repeated (``--force`` repeats it). Then, from every seed's ``per_sample.parquet``:

- ``seed_agreement.png``: CASE Fig. 4, mean agreement per method for each seed and the
  across-seed mean ± sd, with the Wilcoxon threshold (lower = more class-distinct);
- ``seed_wilcoxon.csv`` / ``.md``: method × seed: n, mean and median agreement, one-sided
  Wilcoxon p-value of H1: median < threshold (CASE Eq. 8), whether H0 is rejected at ``--alpha``,
  the method's rank within the seed (1 = lowest mean agreement);
- ``seed_summary.csv``: per method the mean, sd, min and max over seeds, how many seeds reject
  H0, rank statistics and Kendall's W of the method ranking across seeds;
- ``comparison.{csv,md,png}``: every metric of the study across the seeds, mean and 95 % CI
  per seed and the paired test of each seed against the first (the same table and plot as
  :mod:`experiments.compare_runs`, which also reads the evaluations and logs to W&B here);
- an offline W&B run (job type ``aggregate``, group = the runs' name prefix) with the same
  tables and figures (``--wandb.mode disabled`` or ``WANDB_MODE=disabled``: none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from experiments.compare_runs import (
    EvaluationRun,
    comparison_table,
    load_runs,
    log_to_wandb,
    print_outputs,
    write_comparison,
)
from experiments.seed_tables import (
    agreement_values,
    build_seed_agreement_figure,
    seed_summary_table,
    seed_wilcoxon_table,
    wilcoxon_markdown,
)

REQUEST = "aggregate_request.json"
TRAINING_DATA = "training_data.yaml"
_SEED_SUFFIX = re.compile(r"-seed\d+$")
_LOGGING_OPTIONS = ("--wandb.", "--trainer.enable_progress_bar")


# --------------------------------------------------------------------------------------------
# Runs: seeds, checkpoints, evaluations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedRun:
    """A training run and where its evaluation goes."""

    seed: int
    run_dir: Path
    checkpoint: Path
    evaluation_dir: Path


def _read_yaml(path: Path) -> dict:
    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def training_seed(run_dir: Path) -> int:
    """The seed of a ``train.py`` run: ``seed_everything`` of its ``config.yaml``, else the
    ``-seed<N>`` suffix of its name."""
    config = _read_yaml(run_dir / "config.yaml")
    if isinstance(config.get("seed_everything"), int):
        return config["seed_everything"]
    match = re.search(r"-seed(\d+)$", run_dir.name)
    if match is None:
        raise SystemExit(
            f"error: cannot tell the seed of {run_dir}: no seed_everything in its config.yaml "
            f"and no -seed<N> suffix in its name"
        )
    return int(match.group(1))


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """``checkpoints/last.ckpt`` (``which="last"``) or the newest ``checkpoints/best-*.ckpt``."""
    folder = run_dir / "checkpoints"
    if which == "last":
        path = folder / "last.ckpt"
        candidates = [path] if path.is_file() else []
    else:
        candidates = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(
            f"error: {run_dir} has no {which} checkpoint in {folder}/; train it first "
            f"(uv run python -m experiments.seed_sweep ...)"
        )
    return candidates[-1]


def runs_prefix(run_dirs: Sequence[Path]) -> str:
    """The runs' common name without ``-seed<N>`` (``seeds-shapes-seed3`` → ``seeds-shapes``)."""
    names = {_SEED_SUFFIX.sub("", run.name) for run in run_dirs}
    if len(names) == 1:
        return names.pop()
    first, *others = sorted(names)
    length = len(first)
    for name in others:
        shared = 0
        for a, b in zip(first, name, strict=False):
            if a != b:
                break
            shared += 1
        length = min(length, shared)
    return first[:length].rstrip("-_") or "seeds"


def evaluate_arguments(
    run: SeedRun,
    evaluate_config: Path,
    layer: str | None,
    group: str,
    wandb_mode: str,
    wandb_project: str,
    data_config: Path | None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``evaluate.py`` arguments for one seed; ``extra`` comes last and can override anything."""
    arguments = ["--config", str(evaluate_config)]
    if data_config is not None:
        arguments += ["--config", str(data_config)]
    arguments += [
        "--model.checkpoint", str(run.checkpoint),
        "--output_dir", str(run.evaluation_dir.parent),
        "--run_name", run.evaluation_dir.name,
        "--wandb.mode", wandb_mode,
        "--wandb.project", wandb_project,
        "--wandb.group", group,
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if layer is not None:
        arguments += ["--evaluation.layers", f"[{layer}]"]
    return [*arguments, *extra]


def _request(run: SeedRun, evaluate_config: Path, arguments: Sequence[str], data: dict | None):
    """What an evaluation was asked for: if it changes, a complete evaluation is redone. Where
    it logs (``--wandb.*``) does not change its results and is left out."""
    stat = run.checkpoint.stat()
    kept, skip_value = [], False
    for argument in arguments:
        if skip_value:  # the value of a logging option
            skip_value = False
        elif argument.startswith(_LOGGING_OPTIONS):
            skip_value = "=" not in argument
        else:
            kept.append(argument)
    return {
        "checkpoint": str(run.checkpoint.resolve()),
        "checkpoint_size": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "study_sha256": hashlib.sha256(evaluate_config.read_bytes()).hexdigest(),
        "arguments": kept,
        "training_data": data,
    }


def evaluate_seeds(
    runs: Sequence[SeedRun],
    evaluate_config: Path,
    layer: str | None,
    group: str,
    wandb_mode: str,
    wandb_project: str,
    data_from_training: bool = True,
    gpus: Sequence[str] | None = None,
    force: bool = False,
    extra: Sequence[str] = (),
) -> dict[int, float | None]:
    """Run ``evaluate.py`` for every seed whose evaluation is missing, incomplete or was asked
    for differently; returns the wall time per seed (``None``: reused)."""
    from callbacks.run_outputs import is_complete
    from experiments._jobs import Job, JobResult, JobsFailed, python_command, run_jobs

    jobs, requests, seed_of = [], {}, {}
    for run in runs:
        data = None
        data_config = None
        if data_from_training:
            data = _read_yaml(run.run_dir / "config.yaml").get("data")
            if data is None:
                raise SystemExit(f"error: {run.run_dir}/config.yaml has no data section")
            data_config = run.evaluation_dir / TRAINING_DATA
        arguments = evaluate_arguments(
            run, evaluate_config, layer, group, wandb_mode, wandb_project, data_config, extra
        )
        request = _request(run, evaluate_config, arguments, data)
        previous = run.evaluation_dir / REQUEST
        if (
            not force
            and is_complete(run.evaluation_dir)
            and previous.is_file()
            and json.loads(previous.read_text()) == request
        ):
            print(f"[seed {run.seed}] evaluation in {run.evaluation_dir} is complete: reused")
            continue
        run.evaluation_dir.mkdir(parents=True, exist_ok=True)
        previous.unlink(missing_ok=True)
        if data_config is not None:
            data_config.write_text(yaml.safe_dump({"data": data}, sort_keys=False))
        label = f"seed {run.seed}"
        jobs.append(
            Job(
                label,
                python_command("evaluate.py", *arguments),
                run.evaluation_dir / "evaluate.log",
            )
        )
        requests[label], seed_of[label] = request, run.seed

    def record(result: JobResult) -> None:
        directory = result.job.log.parent
        (directory / REQUEST).write_text(json.dumps(requests[result.job.label], indent=2))

    try:
        results = run_jobs(jobs, gpus, on_finished=record)
    except JobsFailed as error:
        failed = ", ".join(str(seed_of[r.job.label]) for r in error.failures)
        raise SystemExit(f"error: evaluation failed for seed(s) {failed}\n\n{error}") from None
    wall: dict[int, float | None] = {run.seed: None for run in runs}
    wall |= {seed_of[r.job.label]: r.wall_s for r in results}
    return wall


def read_agreement(
    runs: Sequence[SeedRun], layer: str | None
) -> tuple[pd.DataFrame, float, list[EvaluationRun]]:
    """Every seed's feature-agreement values (``seed, method, layer, index, value``), the
    Wilcoxon threshold of the evaluations (which must agree) and the evaluations as read by
    :func:`experiments.compare_runs.load_runs` (labelled ``seed <N>``)."""
    try:
        evaluations = load_runs(
            [run.evaluation_dir for run in runs], [f"seed {run.seed}" for run in runs]
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    frames, thresholds = [], set()
    for run, evaluation in zip(runs, evaluations, strict=True):
        try:
            values = agreement_values(evaluation.per_sample, layer)
        except ValueError as error:
            raise SystemExit(f"error: {run.evaluation_dir}: {error}") from None
        frames.append(values.assign(seed=run.seed))
        thresholds.add(evaluation.agreement_threshold)
    if len(thresholds) != 1:
        raise SystemExit(
            f"error: the evaluations used different Wilcoxon thresholds {sorted(thresholds)}: "
            f"evaluate every seed with the same study (--force re-evaluates)"
        )
    values = pd.concat(frames, ignore_index=True)
    return values[["seed", "method", "layer", "index", "value"]], thresholds.pop(), evaluations


def describe(runs: Sequence[SeedRun], wilcoxon: pd.DataFrame) -> str:
    """``<backbone> on <data>, layer <layer>, n = ... correctly classified test images``."""
    from experiments.run_labels import data_description, model_description

    evaluation = runs[0].evaluation_dir
    model = model_description(evaluation).split(" (")[0]
    data = data_description(evaluation)
    layers = ", ".join(pd.unique(wilcoxon["layer"]))
    counts = wilcoxon["n"]
    n = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}–{counts.max()}"
    correct = _read_yaml(evaluation / "config.yaml").get("evaluation", {}).get("correct_only")
    images = "correctly classified test images" if correct else "test images"
    return f"{model}{f' on {data}' if data else ''}, layer {layers}; n = {n} {images} per seed"


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def write_outputs(
    output: Path,
    wilcoxon: pd.DataFrame,
    summary: pd.DataFrame,
    context: str,
    comparison: pd.DataFrame,
) -> dict[str, Path]:
    """Write the two CSV tables, the markdown table and Fig. 4 into ``output``, and the
    cross-seed comparison of every metric (:mod:`experiments.compare_runs`)."""
    from callbacks.report.plots import save_figure

    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "seed_wilcoxon": output / "seed_wilcoxon.csv",
        "seed_summary": output / "seed_summary.csv",
        "seed_wilcoxon_md": output / "seed_wilcoxon.md",
        "seed_agreement": output / "seed_agreement.png",
    }
    wilcoxon.to_csv(paths["seed_wilcoxon"], index=False)
    summary.to_csv(paths["seed_summary"], index=False)
    paths["seed_wilcoxon_md"].write_text(wilcoxon_markdown(wilcoxon, summary, context))
    save_figure(build_seed_agreement_figure(wilcoxon, summary, context), paths["seed_agreement"])
    title = f"{comparison['run'].nunique()} seeds: mean ± 95 % CI per metric\n{context}"
    return paths | write_comparison(comparison, output, context, title)


def _wandb_summary(summary: pd.DataFrame) -> dict[str, float]:
    values: dict[str, float] = {}
    if len(summary):
        values["aggregate/kendalls_w"] = float(summary["kendalls_w"].iloc[0])
    for _, row in summary.iterrows():
        values[f"aggregate/{row['method']}/mean_agreement"] = float(row["mean"])
        values[f"aggregate/{row['method']}/seeds_rejecting_h0"] = int(row["seeds_rejecting_h0"])
    return values


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    import sys

    from experiments._jobs import split_extra_arguments

    own, extra = split_extra_arguments(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m experiments.aggregate_seeds",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to every evaluate.py run (e.g. -- --evaluation.sample_size 1000).",
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="train.py run dirs")
    parser.add_argument("--evaluate_config", type=Path, required=True, help="evaluate.py study")
    parser.add_argument("--layer", help="layer to evaluate (default: the study's layers)")
    parser.add_argument("--output", type=Path, help="default: <runs' parent>/<prefix>-aggregate")
    parser.add_argument("--name", help="run-name prefix / W&B group (default: from --runs)")
    parser.add_argument("--checkpoint", choices=["last", "best"], default="last")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level")
    parser.add_argument("--gpus", nargs="+", help="GPU ids: evaluate one seed per GPU at a time")
    parser.add_argument("--force", action="store_true", help="re-evaluate complete evaluations")
    parser.add_argument(
        "--data_from_training", action=argparse.BooleanOptionalAction, default=True,
        help="evaluate on the datamodule of each training run's config.yaml (default: yes)",
    )  # fmt: skip
    parser.add_argument(
        "--wandb.mode", dest="wandb_mode", choices=["offline", "online", "disabled"],
        default=os.environ.get("WANDB_MODE", "offline"),
    )  # fmt: skip
    parser.add_argument("--wandb.project", dest="wandb_project", default="contrastive-saliency")
    args = parser.parse_args(own)
    if not args.evaluate_config.is_file():
        parser.error(f"--evaluate_config {args.evaluate_config} does not exist")
    missing = [str(run) for run in args.runs if not run.is_dir()]
    if missing:
        parser.error(f"--runs: not a directory: {', '.join(missing)}")
    group = args.name or runs_prefix(args.runs)
    output = args.output or args.runs[0].parent / f"{group}-aggregate"
    runs = []
    for run_dir in args.runs:
        seed = training_seed(run_dir)
        runs.append(
            SeedRun(seed, run_dir, find_checkpoint(run_dir, args.checkpoint),
                    output / "evaluations" / run_dir.name)
        )  # fmt: skip
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        parser.error(f"--runs hold repeated seeds {seeds}: pass one run per seed")
    runs.sort(key=lambda run: run.seed)

    started = time.perf_counter()
    wall = evaluate_seeds(
        runs, args.evaluate_config, args.layer, group, args.wandb_mode, args.wandb_project,
        args.data_from_training, args.gpus, args.force, extra,
    )  # fmt: skip
    evaluated = time.perf_counter() - started
    values, threshold, evaluations = read_agreement(runs, args.layer)
    wilcoxon = seed_wilcoxon_table(values, threshold, args.alpha)
    summary = seed_summary_table(wilcoxon)
    context = describe(runs, wilcoxon)
    comparison = comparison_table(evaluations)
    paths = write_outputs(output, wilcoxon, summary, context, comparison)
    tables = {"seed_wilcoxon": wilcoxon, "seed_summary": summary}
    config = {
        "runs": [str(run.run_dir) for run in runs], "seeds": [run.seed for run in runs],
        "evaluate_config": str(args.evaluate_config), "layer": args.layer,
        "checkpoint": args.checkpoint, "alpha": args.alpha, "threshold": threshold,
    }  # fmt: skip
    wandb_dir = log_to_wandb(
        output, tables | {"comparison": comparison},
        {"seed_agreement": paths["seed_agreement"], "comparison": paths["comparison_plot"]},
        group=group, name=f"{group}-aggregate", job_type="aggregate", mode=args.wandb_mode,
        project=args.wandb_project, config=config, summary=_wandb_summary(summary),
    )  # fmt: skip

    with pd.option_context("display.width", 160, "display.float_format", "{:.4g}".format):
        print(f"\nper-seed Wilcoxon tests (H1: median agreement < {threshold:g}):")
        print(wilcoxon[["seed", "method", "n", "mean_agreement", "p_value", "rejects_h0", "rank"]]
              .to_string(index=False))  # fmt: skip
        print("\nacross seeds:")
        print(summary.drop(columns=["kendalls_w_p"]).to_string(index=False))
    print("\nevaluation wall time per seed:")
    for run in runs:
        seconds = wall[run.seed]
        print(f"  seed {run.seed}: {'reused' if seconds is None else f'{seconds:.1f} s'}")
    print(
        f"total: evaluations {evaluated:.1f} s, aggregation {time.perf_counter() - started - evaluated:.1f} s"
    )
    print(f"\n{context}")
    print_outputs(output, paths, wandb_dir)
    return tables


if __name__ == "__main__":
    main()
