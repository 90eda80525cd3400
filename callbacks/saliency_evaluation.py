"""Saliency evaluation during ``trainer.test``: maps, per-sample metrics, summary, W&B.

Per test batch: the module's logits (one forward) give the top-1 and top-2 predicted classes;
each method makes both maps in one call; CASE's class-sensitivity diagnostic (top-k feature
agreement between the two maps, CASE Eq. 7) and the RISE deletion AUC of the top-1 map are
recorded per sample with the sample ``index``. At the end of the epoch the values are gathered
from every process, de-duplicated by index (exactly once under DDP), and written as
``per_sample.parquet`` and ``summary.csv`` with a one-sided Wilcoxon signed-rank test of
H1: median agreement < threshold (CASE Eq. 8).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import WandbLogger

from saliency.errors import UnknownMethodError, closest
from saliency.layers import default_layer
from saliency.methods import create_method, list_methods
from saliency.metrics.functional import deletion_auc, feature_agreement
from saliency.metrics.per_sample import PerSampleValues
from saliency.stats import mean_confidence_interval, wilcoxon_below

# (metric, target policy it is computed for)
METRICS = (("feature_agreement", "top1_vs_top2"), ("deletion_auc", "top1"))


class SaliencyEvaluationCallback(L.Callback):
    """Evaluate saliency ``methods`` at ``layer`` on the test split.

    Args:
        methods: registered method names (``saliency.methods.list_methods()``).
        layer: dotted path in the explained network; ``None`` = the network's default layer.
        agreement_fraction: share of pixels in the top-k sets (CASE: 5 %).
        agreement_threshold: Wilcoxon threshold (CASE paper 0.5, reference code 0.7).
        deletion_pixels_per_step: pixels removed per deletion step (default: image width, the
            RISE protocol's 224 per step at 224²); deletion_fill: value in normalised space.
        perturbation_batch_size: images per forward pass of the deletion curve.
        output_dir: where the tables go (default: the trainer's ``default_root_dir``).
    """

    def __init__(
        self,
        methods: list[str] | None = None,
        layer: str | None = None,
        agreement_fraction: float = 0.05,
        agreement_threshold: float = 0.5,
        deletion_pixels_per_step: int | None = None,
        deletion_fill: float = 0.0,
        perturbation_batch_size: int = 256,
        output_dir: str | None = None,
    ) -> None:
        self.method_names = list(methods or ["grad_cam"])
        for name in self.method_names:
            if name not in list_methods():
                hint = closest(name, list_methods())
                raise UnknownMethodError(
                    f"unknown saliency method {name!r} in --evaluation.methods; "
                    f"{'did you mean ' + ', '.join(hint) + '? ' if hint else ''}"
                    f"available: {', '.join(list_methods())}"
                )
        self.layer = layer
        self.agreement_fraction = agreement_fraction
        self.agreement_threshold = agreement_threshold
        self.deletion_pixels_per_step = deletion_pixels_per_step
        self.deletion_fill = deletion_fill
        self.perturbation_batch_size = perturbation_batch_size
        self.output_dir = output_dir
        self.per_sample: pd.DataFrame | None = None
        self.summary: pd.DataFrame | None = None

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network = pl_module.network
        self.resolved_layer = self.layer or default_layer(network)
        self._methods = {
            name: create_method(name, network, layer=self.resolved_layer)
            for name in self.method_names
        }
        device = pl_module.device
        self._values = {
            (name, metric): PerSampleValues().to(device)
            for name in self.method_names
            for metric, _ in METRICS
        }
        self._predictions = PerSampleValues().to(device)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        images, indices = batch["image"], batch["index"]
        logits = outputs["logits"]
        top2 = logits.topk(2, dim=1)
        probs = logits.softmax(dim=1).gather(1, top2.indices)
        self._predictions.update(
            torch.cat([batch["label"][:, None].float(), top2.indices.float(), probs], dim=1),
            indices,
        )
        for name, method in self._methods.items():
            maps = method(images, top2.indices)  # [B, 2, H, W]
            agreement = feature_agreement(maps[:, 0], maps[:, 1], self.agreement_fraction)
            deletion = deletion_auc(
                pl_module.network,
                images,
                maps[:, 0],
                top2.indices[:, 0],
                pixels_per_step=self.deletion_pixels_per_step,
                fill=self.deletion_fill,
                batch_size=self.perturbation_batch_size,
            )
            self._values[(name, "feature_agreement")].update(agreement, indices)
            self._values[(name, "deletion_auc")].update(deletion, indices)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # compute() gathers across processes: every rank must call it.
        sample_index, predictions = (t.cpu() for t in self._predictions.compute())
        samples = pd.DataFrame(
            {
                "index": sample_index.numpy(),
                "label": predictions[:, 0].long().numpy(),
                "top1": predictions[:, 1].long().numpy(),
                "top2": predictions[:, 2].long().numpy(),
                "top1_prob": predictions[:, 3].numpy(),
            }
        )
        frames = []
        for (name, metric), state in self._values.items():
            indices, values = (t.cpu() for t in state.compute())
            policy = dict(METRICS)[metric]
            frames.append(
                pd.DataFrame(
                    {
                        "method": name,
                        "layer": self.resolved_layer,
                        "target_policy": policy,
                        "metric": metric,
                        "index": indices.numpy(),
                        "value": values.numpy(),
                    }
                )
            )
        self.per_sample = pd.concat(frames, ignore_index=True).merge(samples, on="index")
        self.summary = summarise(self.per_sample, self.agreement_threshold)
        if trainer.is_global_zero:
            directory = Path(self.output_dir or trainer.default_root_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.per_sample.to_parquet(directory / "per_sample.parquet", index=False)
            self.summary.to_csv(directory / "summary.csv", index=False)
            self._log_wandb(trainer)

    def _log_wandb(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            import wandb

            run = logger.experiment
            for row in self.summary.itertuples():
                run.summary[f"eval/{row.method}/{row.metric}"] = row.mean
                if not math.isnan(row.wilcoxon_p):
                    run.summary[f"eval/{row.method}/{row.metric}_wilcoxon_p"] = row.wilcoxon_p
            run.log({"eval/summary": wandb.Table(dataframe=self.summary)})


def summarise(per_sample: pd.DataFrame, agreement_threshold: float) -> pd.DataFrame:
    """One row per (method, layer, target policy, metric): n, mean, median, sd, 95 % t-CI, and
    for feature agreement the one-sided Wilcoxon test against ``agreement_threshold``."""
    rows = []
    keys = ["method", "layer", "target_policy", "metric"]
    for key, group in per_sample.groupby(keys, sort=False):
        values = group["value"].to_numpy(dtype=np.float64)
        ci_low, ci_high = mean_confidence_interval(values)
        row = dict(zip(keys, key, strict=True))
        row |= {
            "n": values.size,
            "mean": values.mean(),
            "median": float(np.median(values)),
            "sd": values.std(ddof=1) if values.size > 1 else math.nan,
            "ci_low": ci_low,
            "ci_high": ci_high,
            "wilcoxon_threshold": math.nan,
            "wilcoxon_statistic": math.nan,
            "wilcoxon_p": math.nan,
        }
        if row["metric"] == "feature_agreement":
            test = wilcoxon_below(values, agreement_threshold)
            row |= {
                "wilcoxon_threshold": agreement_threshold,
                "wilcoxon_statistic": test.statistic,
                "wilcoxon_p": test.p_value,
            }
        rows.append(row)
    return pd.DataFrame(rows)
