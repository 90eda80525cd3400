"""Linear-probe training on cached features vs through the frozen backbone on every step.

    uv run python benchmarks/linear_probe_cache.py                        # 1000 train, 500 val
    uv run python benchmarks/linear_probe_cache.py --epochs 10 --train-size 200

Three ``trainer.fit`` runs of :class:`LinearProbeModule` on the embedded shapes benchmark (64²),
each ``--epochs`` epochs with the same seed, backbone (a randomly initialised timm vit_tiny,
8×8 patches, ``--depth`` blocks, mean of the patch tokens), batch size and Adam 3e-4:

* ``cached_cold``: feature cache empty, so the time includes computing it (one backbone pass
  over train and val) and writing it;
* ``cached_warm``: the same run again, reading the cache;
* ``uncached``: ``feature_cache=false``, the backbone runs on every training batch.

Validation runs once, after the last epoch (no sanity check), in all three. Reports wall times,
the ratios cached / uncached (target ≤ 5 %), both final validation accuracies and the largest
difference between the heads (same batches in the same order, so only float rounding), the
1-minute load average before and after, and PASS/FAIL per target. Random features of this
fine-grained benchmark carry little class information, so the accuracies are near chance
(0.1); what matters is that they are equal. Writes JSON (default
``benchmarks/results/linear_probe_cache_cpu.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import environment, print_checks, print_table, write_json


def _fit(args: argparse.Namespace, cache_dir: Path, feature_cache: bool) -> dict[str, Any]:
    """One timed fit; returns wall seconds, backbone calls, final val accuracy and the head."""
    import lightning as L

    from datamodules import ShapesDataModule
    from lightning_modules.linear_probe import LinearProbeModule

    L.seed_everything(args.seed, verbose=False)
    module = LinearProbeModule(
        backbone="timm:vit_tiny_patch16_224",
        num_classes=10,
        pretrained=False,
        backbone_kwargs={"img_size": 64, "patch_size": 8, "depth": args.depth},
        pooling="mean_patch",
        feature_cache=feature_cache,
        cache_dir=str(cache_dir),
    )
    data = ShapesDataModule(
        image_size=64,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=1,
        batch_size=args.batch_size,
        num_workers=0,
    )
    calls: list[int] = []
    module.model.backbone.register_forward_hook(lambda *_: calls.append(1))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=args.epochs,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=module.fit_data(data))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "backbone_calls": len(calls),
        "val_acc_top1": float(trainer.callback_metrics["val/acc_top1"]),
        "head": torch.cat([module.model.head.weight.flatten(), module.model.head.bias]).detach(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=100, help="Finer-CAM: 100")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=128, help="Finer-CAM code: 128")
    parser.add_argument("--depth", type=int, default=2, help="ViT blocks of the backbone")
    # One thread: on a shared, oversubscribed CPU, OpenMP synchronisation makes the head's tiny
    # ops ~10x slower with two threads (measured: 10 cached epochs 4.5 s vs 0.39 s).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        cache_dir = Path(scratch) / "features"
        runs = {
            "cached_cold": _fit(args, cache_dir, feature_cache=True),
            "cached_warm": _fit(args, cache_dir, feature_cache=True),
            "uncached": _fit(args, cache_dir, feature_cache=False),
        }
        cache_bytes = sum(p.stat().st_size for p in cache_dir.glob("*.pt"))
    uncached = runs["uncached"]["seconds"]
    head_difference = (runs["cached_cold"]["head"] - runs["uncached"]["head"]).abs().max()
    accuracy_gap = abs(runs["cached_cold"]["val_acc_top1"] - runs["uncached"]["val_acc_top1"])
    checks = {
        "cached run (cold, incl. building the cache) <= 5% of the uncached run": bool(
            runs["cached_cold"]["seconds"] <= 0.05 * uncached
        ),
        "cached and uncached final val accuracy within 1 point": bool(accuracy_gap <= 0.01),
        "warm run did not call the backbone": runs["cached_warm"]["backbone_calls"] == 0,
    }
    result: dict[str, Any] = {
        "benchmark": "linear_probe_cache",
        "config": {**vars(args), "image_size": 64, "backbone": "timm:vit_tiny_patch16_224"},
        "environment": {**environment(torch.device("cpu")), "cpu_count": os.cpu_count()},
        "runs": {
            name: {key: value for key, value in run.items() if key != "head"}
            for name, run in runs.items()
        },
        "ratio_cached_cold_vs_uncached": runs["cached_cold"]["seconds"] / uncached,
        "ratio_cached_warm_vs_uncached": runs["cached_warm"]["seconds"] / uncached,
        "max_abs_head_difference_cached_vs_uncached": float(head_difference),
        "cache_bytes": cache_bytes,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "checks": checks,
    }
    output = args.output or Path(__file__).parent / "results" / "linear_probe_cache_cpu.json"
    write_json(result, output)
    rows = [{"run": name, **result["runs"][name]} for name in runs]
    print_table(rows, ["run", "seconds", "backbone_calls", "val_acc_top1"])
    print(
        f"cached/uncached: cold {result['ratio_cached_cold_vs_uncached']:.2%}, warm "
        f"{result['ratio_cached_warm_vs_uncached']:.2%}; max |head difference| "
        f"{result['max_abs_head_difference_cached_vs_uncached']:.2e}"
    )
    print_checks(checks, output)
    return result


if __name__ == "__main__":
    main()
