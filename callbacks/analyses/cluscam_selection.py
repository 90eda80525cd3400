"""ClusCAM K / r / τ selection on the test samples of an evaluation (``cluscam.md`` Sec. 3.4,
App. B: Alg. 2, Alg. 3, Eqs. 8–10; Table 3 for the paper's values).

For every candidate K, each test sample's group scores ``s_j = logit_c(x ⊙ M_j) − logit_c(x)``
(Eq. 5) are computed in ``on_test_batch_end`` by :func:`contrastive_saliency.cluscam_selection.score_matrix`
(ClusCAM clusters each image as if alone, so batching does not change them) and kept with the
sample ``index``; at the end they are gathered from every process and de-duplicated by index
(exactly once under DDP). Then, as :func:`~contrastive_saliency.cluscam_selection.select_hyperparameters`
does on a dataloader: ``P(K)`` = mean score (Eq. 8), K* = maximum discrete curvature
(Alg. 2), r = mean non-salient posterior of a two-Gaussian fit to the scores at K* (Alg. 3,
Eq. 9), τ = 1/ln(1 + rK*) (Eq. 10). Rank zero publishes them
(:func:`callbacks.analyses.outputs.publish_analysis`): ``selection.csv`` (with the Table 3 row
of the architecture, when it has one), ``proxy.csv``, ``mixture.csv`` and the plots
``k_selection.png``, ``r_selection.png``, ``temperature.png``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from callbacks.explained_model import (
    explained_network,
    first_test_indices,
    model_description,
    model_name,
)
from contrastive_saliency.cluscam_selection import (
    ClusCAMSelection,
    Target,
    curvature_elbow,
    score_matrix,
    selection_from_scores,
    temperature_from,
)
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods.cluscam import CLUSCAM_PRESETS, ClusCAM, ClusCAMPreset
from contrastive_saliency.metrics.per_sample import PerSampleValues

# Model names (the part after ``timm:`` / ``torchvision:``, without a timm weight tag) whose
# architecture has a row in Table 3. EfficientNet and PVTv2 are left out: the paper does not
# say which variant; pass ``preset`` explicitly.
PRESET_BY_MODEL = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "inception_v3": "inception_v3",
    "vit_base_patch16_224": "vit_b",
    "vit_b_16": "vit_b",
    "swin_base_patch4_window7_224": "swin_b",
    "swin_b": "swin_b",
    "levit_192": "levit_192",
    "levit_256": "levit_256",
    "cait_xxs24_224": "cait_xxs24",
}

_RESERVED = ("num_clusters", "discard_ratio", "temperature", "preset", "layer", "seed")


class ClusCAMSelectionCallback(L.Callback):
    """Select ClusCAM's K (Alg. 2), r (Alg. 3) and τ (Eq. 10) on the evaluated test samples.

    Args:
        layer: the layer ClusCAM clusters (``None``: the network's default, the last
            convolutional stage of a CNN; the paper hooks the final conv layer of CNNs and the
            patch embedding of ViTs).
        k_candidates: the candidate group counts K_1 < … < K_M of Alg. 2 (at least three).
        samples: use the ``samples`` lowest sample indices of the test split (``None``: all
            the samples ``evaluate.py`` loads).
        target: the class c of Eq. 5: the sample's ``label`` (default) or the model's
            ``prediction`` (the reference code's validation script).
        preset: the Table 3 row to compare with (a key of
            :data:`contrastive_saliency.methods.cluscam.CLUSCAM_PRESETS`); ``None``: looked up from the
            evaluated model's name (:data:`PRESET_BY_MODEL`), else no comparison.
        seed: k-means random state (the code's ``random_state=0``).
        batch_size: masked images per forward when scoring groups.
        cluscam_kwargs: further :class:`~contrastive_saliency.methods.cluscam.ClusCAM` options
            (``kmeans_iterations``, ``kmeans_tol``, ``layout``).
        name: the analysis directory ``<run_dir>/analyses/<name>/`` and W&B prefix.
    """

    def __init__(
        self,
        layer: str | None = None,
        k_candidates: list[int] | None = None,
        samples: int | None = 100,
        target: Target = "label",
        preset: str | None = None,
        seed: int = 0,
        batch_size: int = 32,
        cluscam_kwargs: dict[str, Any] | None = None,
        name: str = "cluscam_selection",
    ) -> None:
        candidates = list(k_candidates) if k_candidates is not None else [10, 20, 30, 40, 50]
        # Alg. 2 needs at least three strictly increasing positive ints; check them now.
        curvature_elbow(candidates, [0.0] * len(candidates))
        if samples is not None and (isinstance(samples, bool) or samples < 1):
            raise ConfigurationError(
                f"samples must be a positive number of test samples or null (all), got {samples!r}"
            )
        if target not in ("label", "prediction"):
            raise ConfigurationError(f"target must be 'label' or 'prediction', got {target!r}")
        if preset is not None and preset not in CLUSCAM_PRESETS:
            raise ConfigurationError(
                f"unknown ClusCAM preset {preset!r}; Table 3 has {', '.join(CLUSCAM_PRESETS)}"
            )
        extra = dict(cluscam_kwargs or {})
        reserved = sorted(set(extra) & {*_RESERVED, "batch_size"})
        if reserved:
            raise ConfigurationError(
                f"cluscam_kwargs may not set {reserved}: K, r and τ are what this callback "
                f"selects, and layer / seed / batch_size are its own arguments"
            )
        self.layer = layer
        self.candidates = tuple(int(k) for k in candidates)
        self.samples = samples
        self.target = target
        self.preset = preset
        self.seed = seed
        self.batch_size = batch_size
        self.cluscam_kwargs = extra
        self.name = name
        self.selection: ClusCAMSelection | None = None
        self.indices: torch.Tensor | None = None
        self.tables: dict[str, pd.DataFrame] = {}

    # ---------------------------------------------------------------------------- per batch
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network = explained_network(pl_module)
        # Builds ClusCAM once: a wrong layer or option fails before the first batch.
        method = ClusCAM(network, self.layer, seed=self.seed, **self._score_kwargs())
        self._layer_used = method.layer
        self._preset_name = self.preset or _preset_for(pl_module)
        self._model_name = model_description(pl_module, network)
        self._wanted = (
            None
            if self.samples is None
            else set(first_test_indices(trainer.test_dataloaders, self.samples))
        )
        device = pl_module.device
        self._scores = {k: PerSampleValues(row_shape=(k,)).to(device) for k in self.candidates}

    def _score_kwargs(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, **self.cluscam_kwargs}

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        index = batch["index"]
        if self._wanted is not None:
            keep = torch.tensor([int(i) in self._wanted for i in index.tolist()], dtype=torch.bool)
            if not bool(keep.any()):
                return
            batch = {k: v[keep.to(v.device)] for k, v in batch.items() if k in ("image", "label")}
            index = index[keep.to(index.device)]
        rows = [{"image": batch["image"], "label": batch["label"]}]
        network = explained_network(pl_module)
        for k in self.candidates:
            scores = score_matrix(
                network, rows, k, self._layer_used, self.target, seed=self.seed,
                **self._score_kwargs(),
            )  # fmt: skip
            self._scores[k].update(scores.to(pl_module.device), index.to(pl_module.device))

    # ------------------------------------------------------------------------ at the end
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # compute() gathers across processes: every rank calls it, in the same order.
        gathered = {k: self._scores[k].compute() for k in self.candidates}
        indices = gathered[self.candidates[0]][0].cpu()
        if indices.numel() == 0:
            raise ConfigurationError(
                "ClusCAM selection saw no test sample; give evaluate.py test data (and a "
                "samples count that selects some)"
            )
        scores = {k: values.cpu().double() for k, (_, values) in gathered.items()}
        self.indices = indices
        self.selection = selection_from_scores(scores)
        self.tables = self._tables()
        if trainer.is_global_zero:
            from callbacks.analyses.outputs import publish_analysis

            publish_analysis(trainer, self.name, self.tables, self._figures(), self._summary())

    def _preset(self) -> ClusCAMPreset | None:
        return CLUSCAM_PRESETS.get(self._preset_name) if self._preset_name else None

    def _tables(self) -> dict[str, pd.DataFrame]:
        selection = self.selection
        common = {"layer": self._layer_used, "target": self.target}
        rows = [
            {
                "source": "selected (this run)",
                "num_clusters": selection.num_clusters,
                "discard_ratio": selection.discard_ratio,
                "temperature": selection.temperature,
                "temperature_eq10": temperature_from(
                    selection.discard_ratio, selection.num_clusters
                ),
                "samples": int(self.indices.numel()),
                **common,
            }
        ]
        preset = self._preset()
        if preset is not None:
            rows.append(
                {
                    "source": f"Table 3 ({self._preset_name})",
                    "num_clusters": preset.num_clusters,
                    "discard_ratio": preset.discard_ratio,
                    "temperature": preset.temperature,
                    "temperature_eq10": temperature_from(preset.discard_ratio, preset.num_clusters),
                    "samples": math.nan,
                    "layer": "",
                    "target": "",
                }
            )
        proxy = pd.DataFrame(
            {
                "num_clusters": list(selection.candidates),
                "proxy": selection.proxy.numpy(),
                "curvature": selection.curvature.numpy(),
                "chosen": [k == selection.num_clusters for k in selection.candidates],
            }
        )
        mixture = selection.mixture
        components = pd.DataFrame(
            {
                "component": ["non-salient", "salient"],
                "weight": mixture.weights.numpy(),
                "mean": mixture.means.numpy(),
                "variance": mixture.variances.numpy(),
                "em_iterations": mixture.iterations,
                "mean_log_likelihood": mixture.log_likelihood,
            }
        )
        return {"selection": pd.DataFrame(rows), "proxy": proxy, "mixture": components}

    def _summary(self) -> dict[str, float]:
        selection = self.selection
        summary = {
            "num_clusters": float(selection.num_clusters),
            "discard_ratio": selection.discard_ratio,
            "temperature": selection.temperature,
            "samples": float(self.indices.numel()),
        }
        preset = self._preset()
        if preset is not None:
            summary |= {
                "table3_num_clusters": float(preset.num_clusters),
                "table3_discard_ratio": preset.discard_ratio,
                "table3_temperature": preset.temperature,
            }
        return summary

    def _figures(self) -> dict[str, Figure]:
        where = f"{self._model_name}, layer {self._layer_used}, {self.indices.numel()} images"
        preset = self._preset()
        return {
            "k_selection": build_k_figure(self.selection, where, preset),
            "r_selection": build_r_figure(self.selection, where, preset),
            "temperature": build_temperature_figure(self.selection, where, preset),
        }


# -------------------------------------------------------------------------------------- plots


def build_k_figure(
    selection: ClusCAMSelection, where: str, preset: ClusCAMPreset | None = None
) -> Figure:
    """Alg. 2: the proxy P(K) (Eq. 8) and its discrete curvature C(K) over the candidates,
    the chosen K* (maximum curvature) and the Table 3 K marked."""
    ks = np.asarray(selection.candidates, dtype=np.float64)
    proxy = selection.proxy.numpy()
    curvature = selection.curvature.numpy()
    figure = Figure(figsize=(7.0, 6.4), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(ks, proxy, marker="o", color="tab:blue", label="P(K): mean logit change (Eq. 8)")
    bottom.plot(ks, curvature, marker="o", color="tab:orange", label="C(K): discrete curvature")
    for ax in (top, bottom):
        ax.axvline(
            selection.num_clusters, color="tab:red", linestyle="--",
            label=f"chosen K* = {selection.num_clusters} (max curvature)",
        )  # fmt: skip
        if preset is not None:
            ax.axvline(
                preset.num_clusters, color="grey", linestyle=":",
                label=f"Table 3 K = {preset.num_clusters}",
            )  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    top.set_ylabel("P(K) (logit units)")
    bottom.set_ylabel("C(K) (logit units / K²)")
    bottom.set_xlabel("number of groups K (candidates of Alg. 2)")
    top.set_title(f"ClusCAM K selection (Alg. 2): proxy and curvature\n{where}", fontsize=10)
    return figure


def build_r_figure(
    selection: ClusCAMSelection, where: str, preset: ClusCAMPreset | None = None
) -> Figure:
    """Alg. 3: the scores at K* with the fitted two-Gaussian mixture, the non-salient posterior
    and the chosen r (its score quantile marked: the r-fraction of lowest scores lies left)."""
    scores = selection.scores.flatten().numpy()
    mixture = selection.mixture
    figure = Figure(figsize=(7.6, 5.6), layout="constrained")
    ax = figure.subplots()
    bins = min(60, max(10, scores.size // 10))
    label = f"group scores s_j at K* = {selection.num_clusters}"
    ax.hist(scores, bins=bins, density=True, color="lightgrey", edgecolor="grey", label=label)
    low, high = float(scores.min()), float(scores.max())
    pad = 0.05 * (high - low or 1.0)
    grid = np.linspace(low - pad, high + pad, 400)
    weights, means = mixture.weights.numpy(), mixture.means.numpy()
    variances = mixture.variances.numpy()
    densities = [
        w * np.exp(-0.5 * (grid - m) ** 2 / v) / math.sqrt(2 * math.pi * v)
        for w, m, v in zip(weights, means, variances, strict=True)
    ]
    ax.plot(grid, densities[0], color="tab:blue", label="non-salient component (lower mean)")
    ax.plot(grid, densities[1], color="tab:green", label="salient component")
    ax.plot(grid, densities[0] + densities[1], color="black", linewidth=1.2, label="mixture")
    threshold = float(np.quantile(scores, selection.discard_ratio))
    ax.axvline(
        threshold, color="tab:red", linestyle="--",
        label=f"r = {selection.discard_ratio:.3f} (Eq. 9): {selection.discard_ratio:.1%} of "
        f"scores left of this line",
    )  # fmt: skip
    ax.set_xlabel("group score s_j = logit_c(x ⊙ M_j) − logit_c(x) (logit units)")
    ax.set_ylabel("density")
    posterior_ax = ax.twinx()
    posterior = mixture.posterior(torch.from_numpy(grid))[:, 0].numpy()
    label = "P(non-salient | s) (right axis)"
    posterior_ax.plot(grid, posterior, color="tab:purple", linestyle=":", label=label)
    posterior_ax.set_ylim(0, 1.05)
    posterior_ax.set_ylabel("posterior P(non-salient | s)")
    handles = ax.get_legend_handles_labels()
    twin = posterior_ax.get_legend_handles_labels()
    figure.legend(
        handles[0] + twin[0], handles[1] + twin[1], fontsize=8, ncols=2, loc="outside lower center"
    )
    reference = f"; Table 3 r = {preset.discard_ratio:.4f}" if preset is not None else ""
    ax.set_title(
        f"ClusCAM r selection (Alg. 3): 2-component GMM on the scores{reference}\n{where}",
        fontsize=10,
    )
    return figure


def build_temperature_figure(
    selection: ClusCAMSelection, where: str, preset: ClusCAMPreset | None = None
) -> Figure:
    """Eq. 10: τ = 1/ln(1 + rK) as a function of r for the chosen K* (and the Table 3 K), the
    selected (r, τ) and the Table 3 (r, τ) marked."""
    ratios = np.linspace(0.01, 0.99, 200)
    figure = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = figure.subplots()
    k = selection.num_clusters
    ax.plot(ratios, 1 / np.log1p(ratios * k), color="tab:red", label=f"τ(r) at K* = {k}")
    selected = f"selected r = {selection.discard_ratio:.3f}, τ = {selection.temperature:.3f}"
    ax.plot(
        [selection.discard_ratio], [selection.temperature], "o", color="tab:red", label=selected
    )
    if preset is not None:
        curve = 1 / np.log1p(ratios * preset.num_clusters)
        ax.plot(
            ratios,
            curve,
            color="grey",
            linestyle=":",
            label=f"τ(r) at Table 3 K = {preset.num_clusters}",
        )
        table = f"Table 3 r = {preset.discard_ratio:.4f}, τ = {preset.temperature}"
        ax.plot([preset.discard_ratio], [preset.temperature], "s", color="grey", label=table)
    ax.set_xlabel("discard ratio r (fraction of groups discarded)")
    ax.set_ylabel("temperature τ")
    ax.set_ylim(0, min(3.0, float(1 / np.log1p(0.01 * k)) * 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"ClusCAM temperature τ = 1 / ln(1 + rK) (Eq. 10)\n{where}", fontsize=10)
    return figure


# ------------------------------------------------------------------------------------ helpers


def _preset_for(pl_module: L.LightningModule) -> str | None:
    """The Table 3 row of the evaluated model by name (``torchvision:resnet50`` → resnet50)."""
    name = model_name(pl_module)
    if name is None:
        return None
    bare = name.partition(":")[2] or name
    return PRESET_BY_MODEL.get(bare.split(".")[0])
