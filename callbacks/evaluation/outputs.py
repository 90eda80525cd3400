"""Writing an evaluation's results: ``per_sample.parquet``, ``summary.csv``, ``stats.csv``,
``curves.csv``, plots, a gallery and ``report.md`` in a staging directory, published at once
(:mod:`callbacks.run_outputs`), then logged to W&B (:mod:`callbacks.evaluation.wandb_logging`)."""

from __future__ import annotations

from typing import Any

from callbacks.evaluation.engine import CONTRASTS_FROM_MATRIX
from callbacks.evaluation.tables import describe_sibling_share
from callbacks.evaluation.target_policies import TOP1
from callbacks.evaluation.test_subset import explained_data
from callbacks.evaluation.wandb_logging import log_wandb
from contrastive_saliency.stats import hypothesis_text


class ResultWriter:
    """The files, the report's run information and notes (mixed into
    :class:`callbacks.evaluation.SaliencyEvaluationCallback`)."""

    def _write_results(self, trainer: Any, gallery: list[dict[str, Any]]) -> None:
        from callbacks.report import (
            GallerySample,
            agreement_histograms,
            gallery_grid,
            metric_summary,
            perturbation_curves,
            render_gallery,
            sanity_curves,
            write_report,
        )

        staging = self._staging.path
        self.per_sample.to_parquet(staging / "per_sample.parquet", index=False)
        self.summary.to_csv(staging / "summary.csv", index=False)
        self.stats.to_csv(staging / "stats.csv", index=False)
        self.curves.to_csv(staging / "curves.csv", index=False)
        if self.sanity is not None:
            self.sanity.to_csv(staging / "sanity_checks.csv", index=False)
        plots = staging / "plots"
        plots.mkdir()
        plot_paths = [
            *metric_summary(self.summary, plots),
            *agreement_histograms(self.per_sample, self.summary, plots),
            *perturbation_curves(self.curves, plots),
        ]
        if self.sanity is not None:
            plot_paths += sanity_curves(self.sanity, plots)
        samples = self.per_sample.drop_duplicates("index").set_index("index")
        class_names = getattr(trainer.datamodule, "class_names", None)
        gallery_samples = [
            GallerySample(
                index=g["index"],
                image=g["pixels"],
                masks=g["masks"],
                label=g["label"],
                top1=int(samples.loc[g["index"], "top1"]) if g["index"] in samples.index else -1,
                top2=int(samples.loc[g["index"], "top2"]) if g["index"] in samples.index else -1,
                class_names=list(class_names) if class_names else None,
                maps=g["maps"],
            )
            for g in gallery
        ]
        gallery_dir = staging / "gallery"
        gallery_dir.mkdir()
        gallery_paths = [
            *(
                gallery_grid(gallery_samples, gallery_dir, column=self._gallery_column(gallery))
                if gallery_samples
                else []
            ),
            *render_gallery(gallery_samples, gallery_dir),
        ]
        write_report(
            staging,
            title=self.title,
            run_info=self._run_info(trainer),
            summary=self.summary,
            stats=self.stats,
            plot_paths=plot_paths,
            gallery_paths=gallery_paths,
            notes=self._notes(),
        )
        self.published = self._staging.publish(
            {"dataset_checks": self.dataset_checks} if self.dataset_checks else None
        )
        run_dir = self._staging.run_dir
        log_wandb(
            self,
            trainer,
            [run_dir / p.relative_to(staging) for p in plot_paths],
            [run_dir / p.relative_to(staging) for p in gallery_paths],
        )

    @staticmethod
    def _gallery_column(gallery: list[dict[str, Any]]) -> str:
        """The overview shows the first explained column: ``top1``, else e.g. ``cell0``."""
        columns = [key.column for key in gallery[0]["maps"]]
        return TOP1.name if TOP1.name in columns else columns[0]

    def _run_info(self, trainer: Any) -> dict[str, str]:
        module = trainer.lightning_module
        source = getattr(module, "checkpoint_path", None) or getattr(module, "source_name", "")
        info = {
            "model": str(source),
            "data": type(explained_data(trainer.datamodule)).__name__,
            "samples": str(self.per_sample["index"].nunique()),
            "methods": ", ".join(s.label for s in self.method_specs),
            "layers": ", ".join(sorted({c.layer for c in self.combinations})),
            "target policies": ", ".join(p.name for p in self.policies),
            "devices": f"{trainer.world_size} ({trainer.strategy.__class__.__name__})",
            "reference methods": ", ".join(self.reference_methods),
        }
        if self.dataset_checks:
            checks = self.dataset_checks
            info["top-2 = sibling (correctly classified)"] = describe_sibling_share(checks)
        return info

    def _reference_word(self) -> str:
        return self.reference_method if len(self.reference_methods) == 1 else "reference"

    def _notes(self) -> list[str]:
        notes = [
            f"Feature agreement: one-sided Wilcoxon signed-rank test of H1: median < "
            f"{self.agreement_threshold} (CASE Eq. 8).",
            f"stats.csv: paired t-tests of each method against "
            f"{' and '.join(repr(r) for r in self.reference_methods)} on the same samples, "
            f"test_alternative {self.test_alternative}: "
            f"{hypothesis_text(self.test_alternative, 'method', self._reference_word())} "
            f"(per row in the column hypothesis); Cohen's d_z, Holm and BH corrections over the "
            f"whole table.",
        ]
        if self.correct_only:
            notes.append("Only correctly classified samples were explained.")
        return notes + self._contrast_notes()

    def _contrast_notes(self) -> list[str]:
        """One line per method with a confusion selector: how often the matrix gave all k."""
        notes = []
        for combination in self.combinations:
            if not combination.counters:
                continue
            selector = combination.counters[0]
            rows = self.per_sample[
                (self.per_sample["method"] == combination.spec.label)
                & (self.per_sample["layer"] == combination.layer)
            ].drop_duplicates(["target_policy", "index"])[CONTRASTS_FROM_MATRIX]
            if rows.empty:
                continue
            notes.append(
                f"{combination.spec.label} ({combination.layer}): all k={selector.k} contrasts "
                f"came from the confusion matrix for {rows.eq(selector.k).mean():.0%} of the "
                f"explained samples (mean {rows.mean():.2f}); the rest from fallback "
                f"{selector.fallback!r} (per sample: per_sample.parquet {CONTRASTS_FROM_MATRIX})."
            )
        return notes
