"""The results of a test epoch: per-sample values gathered from every process and de-duplicated
by index (exactly once under DDP; only scalars, curves and the few gallery samples travel),
the contrasts each sample took from the confusion matrix, the gallery samples, and the
tables (``summary``, ``stats``, ``curves``) built from them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from callbacks.evaluation.engine import CONTRASTS_FROM_MATRIX
from callbacks.evaluation.keys import CurveKey, PolicyKey
from callbacks.evaluation.tables import mean_curves, method_tests, sibling_share, summarise
from callbacks.report import GalleryKey
from contrastive_saliency.errors import ConfigurationError


class GatheredResults:
    """Collecting and assembling the results (mixed into
    :class:`callbacks.evaluation.SaliencyEvaluationCallback`)."""

    def _count_matrix_contrasts(self, batch: dict[str, Any], device: torch.device) -> None:
        """Per (method, layer, policy) with a confusion selector: how many contrasts of the
        explained classes came from the matrix (the fewest among a policy's classes)."""
        for combination in self.combinations:
            for policy in self.policies:
                key = PolicyKey(combination.spec.label, combination.layer, policy.name)
                if key not in self._contrast_counts:
                    continue
                chosen = [self._batch_columns.index(c) for c in policy.columns(batch)]
                counts = combination.contrasts_from_matrix(self._batch_classes[:, chosen])
                self._contrast_counts[key].update(counts.to(device), batch["index"])

    def _keep_gallery(self, batch, logits, trainer) -> None:
        wanted = [
            i for i, index in enumerate(batch["index"].tolist()) if index in self._gallery_indices
        ]
        if not wanted:
            return
        datamodule = trainer.datamodule
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        for row in wanted:
            maps = {
                GalleryKey(key.method, key.layer, column.name): batch_maps[row, j].cpu()
                for key, batch_maps in self._batch_maps.items()
                for j, column in enumerate(self._batch_columns)
            }
            self._gallery.append(
                {
                    "index": int(batch["index"][row]),
                    "image": batch["image"][row].cpu(),
                    "pixels": display_pixels(batch["image"][row].cpu(), mean, std),
                    "masks": {
                        k: batch[k][row].cpu()
                        for k in ("mask", "part_mask")
                        if k in batch and torch.is_tensor(batch[k])
                    },
                    "label": int(batch["label"][row]),
                    "maps": maps,
                    "fields": {name: batch[name][row].cpu() for name in self._method_fields()},
                }
            )

    def _gather_results(self, trainer: Any) -> list[dict[str, Any]]:
        """Fill ``per_sample``, ``dataset_checks``, ``summary``, ``stats`` and ``curves`` from
        every process; returns the gathered gallery. Collective: every rank calls it."""
        # compute() gathers across processes: every rank calls it, in the same order.
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
        curves: dict[CurveKey, np.ndarray] = {}
        for (method, layer, policy, label), state in self._metrics.items():
            indices, columns = state.labelled_values(label)
            for metric, values in columns.items():
                frames.append(
                    pd.DataFrame(
                        {
                            "method": method,
                            "layer": layer,
                            "target_policy": policy,
                            "metric": metric,
                            "index": indices.cpu().numpy(),
                            "value": values.cpu().numpy(),
                        }
                    )
                )
            for curve in state.curves:  # the first metric of a curve kind gives its curve
                key = CurveKey(method, layer, policy, curve.kind)
                if key not in curves:
                    curves[key] = state.per_sample_curves()[1].cpu().numpy()
        gallery = gather_objects(self._gallery)
        self.per_sample = self._with_contrast_counts(
            pd.concat(frames, ignore_index=True).merge(samples, on="index")
        )
        if self.per_sample.empty:
            raise ConfigurationError(nothing_explained(len(samples), self.correct_only))
        self.dataset_checks = sibling_share(
            samples, getattr(trainer.datamodule, "sibling_classes", None)
        )
        self.summary = summarise(self.per_sample, self.agreement_threshold)
        self.stats = method_tests(
            self.per_sample, self.reference_methods, self.agreement_threshold,
            self.test_alternative,
        )  # fmt: skip
        self.curves = mean_curves(curves)
        return gallery

    def _with_contrast_counts(self, per_sample: pd.DataFrame) -> pd.DataFrame:
        """``per_sample`` with the column ``contrasts_from_matrix`` (nullable int): filled for
        the rows of methods with a confusion selector, NA for the others. Gathered and
        de-duplicated by index like every per-sample value (collective: every rank calls it)."""
        keys = ["method", "layer", "target_policy", "index"]
        frames = []
        for (method, layer, policy), state in self._contrast_counts.items():
            indices, counts = (t.cpu() for t in state.compute())
            frame = pd.DataFrame({"index": indices.numpy(), CONTRASTS_FROM_MATRIX: counts.numpy()})
            frames.append(frame.assign(method=method, layer=layer, target_policy=policy))
        if not frames:
            return per_sample.assign(**{CONTRASTS_FROM_MATRIX: pd.NA}).astype(
                {CONTRASTS_FROM_MATRIX: "Int64"}
            )
        counts = pd.concat(frames, ignore_index=True).round({CONTRASTS_FROM_MATRIX: 0})
        merged = per_sample.merge(counts, on=keys, how="left")
        return merged.astype({CONTRASTS_FROM_MATRIX: "Int64"})


def display_pixels(image: torch.Tensor, mean, std) -> torch.Tensor:
    """A normalised ``[3, H, W]`` image back in [0, 1] with the datamodule's mean/std; a
    datamodule that declares none gets its image min-max scaled for display."""
    if mean is None or std is None:
        low, high = image.min(), image.max()
        return (image - low) / (high - low) if high > low else torch.zeros_like(image)
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image * std + mean).clamp(0, 1)


def nothing_explained(evaluated: int, correct_only: bool) -> str:
    """Why an evaluation has no value to report, and what to change."""
    if correct_only and evaluated:
        return (
            f"nothing was explained: evaluation.correct_only is true and the model classified "
            f"none of the {evaluated} evaluated test samples correctly (an untrained or "
            f"randomly initialised model?); evaluate a trained model, or pass "
            f"--evaluation.correct_only false"
        )
    return (
        f"nothing was explained: the evaluation saw {evaluated} test samples; check the "
        f"dataset's test split and evaluation.sample_size"
    )


def gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a list from every process (the gallery: a few samples)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(items)
    gathered: list[list[Any] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]
