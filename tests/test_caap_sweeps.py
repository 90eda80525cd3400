"""CAAPSweepCallback (callbacks/analyses/caap_sweeps.py): CAAP Figs. 5 and 7. Its per-sample values
equal the method plus the functional metrics called directly on the same samples (parity), the
full-depth cutoff equals a plain caap call over all layers, duplicated indices count once, bad
cutoffs / operators / metrics fail with specific errors, the plots are readable; one real
evaluate.py run of the shapes twin config on a tiny trained ViT."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

import contrastive_saliency.methods.caap  # noqa: F401  (registers "caap")
from callbacks.analyses.caap_sweeps import CAAPSweepCallback
from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.methods import create_method
from contrastive_saliency.metrics import functional as M
from tests.conftest import tiny_train_args
from tests.tiny_models import TinyCAMNet

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
DEPTH = 4  # ⌈2L/3⌉ = 3
METRIC_NAMES = ["insertion_auc", "deletion_auc", "insertion_minus_deletion", "pointing_game"]


# The loop and parallel forms agree to ~1e-7; deletion / insertion orders amplify that where
# pixels nearly tie, and the zeros blank keeps this model's maps clear of such near-ties.
BLANK = "zeros"


def small_vit() -> VisionTransformer:
    """4 blocks on 32×32 images, 8×8 patches; sharpened attention so maps vary by patch."""
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=5
    )
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(4.0)
    # the normalisation timm.create_model records (CAAP's default white blank reads it)
    model.pretrained_cfg = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD}
    return model.eval()


def dataset(n: int = 5) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    masks = torch.zeros(n, 32, 32, dtype=torch.bool)
    for i in range(n):
        masks[i, 4 * i : 4 * i + 12, 6:20] = True
    return [
        {
            "image": images[i],
            "label": torch.tensor(i % 5),
            "index": torch.tensor(i),
            "mask": masks[i],
        }
        for i in range(n)
    ]


def run(callback, model, samples, batch_size=2, repeat=(), tmp_path=None):
    """The callback's hooks as trainer.test calls them; ``repeat`` batches come twice (the
    duplicates a DistributedSampler pads uneven splits with). No ``logits`` in the outputs:
    the callback computes them."""
    trainer = SimpleNamespace(
        test_dataloaders=DataLoader(samples, batch_size=batch_size),
        is_global_zero=True,
        default_root_dir=str(tmp_path),
        loggers=[],
    )
    module = SimpleNamespace(network=model, device=torch.device("cpu"), model_name="tiny-vit")
    callback.on_test_start(trainer, module)
    parts = list(DataLoader(samples, batch_size=batch_size))
    for number in [*range(len(parts)), *repeat]:
        callback.on_test_batch_end(trainer, module, None, parts[number], number)
    callback.on_test_epoch_end(trainer, module)
    return Path(tmp_path) / "analyses" / callback.name


def direct_values(model, samples, layers, operator) -> dict[str, torch.Tensor]:
    """CAAP through the registry and the functional metrics, on all samples at once."""
    images = torch.stack([s["image"] for s in samples])
    masks = torch.stack([s["mask"] for s in samples])
    with torch.no_grad():
        top1 = model(images).argmax(dim=1)
    method = create_method(
        "caap", model, mode="loop", selection=operator, layers=layers, blank=BLANK
    )
    maps = method(images, top1[:, None])[:, 0]
    indices = torch.stack([s["index"] for s in samples])
    insertion = M.insertion_auc(model, images, maps, top1, indices=indices)
    deletion = M.deletion_auc(model, images, maps, top1, indices=indices)
    positive, negative = M.aupr(maps, masks)
    return {
        "insertion_auc": insertion,
        "deletion_auc": deletion,
        "insertion_minus_deletion": insertion - deletion,
        "pointing_game": M.pointing_game(maps, masks).float(),
        "aupr1": positive,
        "aupr0": negative,
    }


def values_of(per_sample: pd.DataFrame, cutoff: int, operator: str, metric: str) -> torch.Tensor:
    rows = per_sample[
        (per_sample["cutoff"] == cutoff)
        & (per_sample["operator"] == operator)
        & (per_sample["metric"] == metric)
    ].sort_values("index")
    return torch.tensor(rows["value"].to_numpy())


def test_sweeps_equal_direct_caap_and_metric_calls(tmp_path):
    model, samples = small_vit(), dataset(5)
    callback = CAAPSweepCallback(
        cutoffs=None, operators=["none", "box1", "manhattan"], caap_kwargs={"blank": BLANK}
    )
    directory = run(callback, model, samples, tmp_path=tmp_path)
    per_sample = callback.per_sample
    # Variants: cutoffs 1..4 with box1, and none / box1 / manhattan at ⌈2·4/3⌉ = 3.
    variants = set(zip(per_sample["cutoff"], per_sample["operator"], strict=True))
    assert variants == {(1, "box1"), (2, "box1"), (3, "box1"), (4, "box1"), (3, "none"),
                        (3, "manhattan")}  # fmt: skip
    # The parallel form against the per-patch loop (mode="loop") + metrics called directly;
    # cutoff 4 = the full depth: a plain caap call over layers 1..L.
    for cutoff, operator in [(4, "box1"), (3, "manhattan"), (1, "box1")]:
        expected = direct_values(model, samples, (1, cutoff), operator)
        for metric, values in expected.items():
            got = values_of(per_sample, cutoff, operator, metric)
            assert got.shape == (5,), (cutoff, operator, metric)
            # The parallel and loop forms differ by float32 rounding, which can reorder pixels
            # of near-equal saliency: 2e-4 per AUC, so twice that for Ins − Del.
            atol = 4e-4 if metric == "insertion_minus_deletion" else 2e-4
            assert torch.allclose(got, values.double(), atol=atol), (cutoff, operator, metric)
    # The sweep is not trivial: the depth changes the maps' faithfulness.
    assert not torch.equal(
        values_of(per_sample, 1, "box1", "insertion_auc"),
        values_of(per_sample, 4, "box1", "insertion_auc"),
    )
    cutoff = pd.read_csv(directory / "cutoff_sweep.csv")
    assert cutoff["cutoff"].unique().tolist() == [1, 2, 3, 4]
    assert cutoff["metric"].unique().tolist() == [*METRIC_NAMES, "aupr1", "aupr0"]
    assert cutoff["default_cutoff"].tolist() == [c == 3 for c in cutoff["cutoff"]]
    row = cutoff[(cutoff["cutoff"] == 2) & (cutoff["metric"] == "deletion_auc")].iloc[0]
    values = values_of(per_sample, 2, "box1", "deletion_auc")
    assert row["n"] == 5
    assert row["mean"] == pytest.approx(float(values.mean()))
    assert row["ci_low"] < row["mean"] < row["ci_high"]
    operator = pd.read_csv(directory / "operator_sweep.csv")
    assert operator["operator"].unique().tolist() == ["none", "box1", "manhattan"]
    assert set(operator["cutoff"]) == {3}
    shared = operator[(operator["operator"] == "box1")].set_index("metric")["mean"]
    same = cutoff[cutoff["cutoff"] == 3].set_index("metric")["mean"]
    assert shared.to_dict() == same.to_dict()  # one computation serves both sweeps


def test_duplicated_indices_count_once_and_plots_are_readable(tmp_path):
    model, samples = small_vit(), dataset(5)
    metrics = ["insertion_minus_deletion", {"name": "aupr", "kwargs": {"mask_key": "mask"}}]
    once = CAAPSweepCallback(cutoffs=[1, 4], operators=["box1", "box2"], metrics=metrics)
    run(once, model, samples, tmp_path=tmp_path / "once")
    twice = CAAPSweepCallback(cutoffs=[1, 4], operators=["box1", "box2"], metrics=metrics)
    directory = run(twice, model, samples, repeat=(0, 2), tmp_path=tmp_path / "twice")
    # 4 variants (box1 at cutoffs 1, 4; box1 and box2 at 3) × 3 values × 5 samples, once each.
    assert len(twice.per_sample) == 4 * 3 * 5
    assert not twice.per_sample.duplicated(["cutoff", "operator", "metric", "index"]).any()
    pd.testing.assert_frame_equal(twice.tables["cutoff_sweep"], once.tables["cutoff_sweep"])
    for name in ("cutoff_sweep", "operator_sweep"):
        assert (directory / f"{name}.png").stat().st_size > 10_000
    figures = twice._figures()
    cutoff_ax = figures["cutoff_sweep"].axes[0]
    assert "Fig. 7" in cutoff_ax.get_title() and "tiny-vit" in cutoff_ax.get_title()
    assert "last intervened layer" in figures["cutoff_sweep"].axes[-1].get_xlabel()
    assert all(ax.get_ylabel() for ax in figures["cutoff_sweep"].axes)
    faithfulness, localisation = (
        [text.get_text() for text in ax.get_legend().get_texts()]
        for ax in figures["cutoff_sweep"].axes
    )
    assert faithfulness == ["Ins − Del (↑)", "default cutoff ⌈2L/3⌉ = 3"]
    assert localisation == ["AUPR₁ (↑)", "AUPR₀ (↑)", "default cutoff ⌈2L/3⌉ = 3"]
    operator_ax = figures["operator_sweep"].axes[0]
    assert "Fig. 5" in operator_ax.get_title() and operator_ax.get_ylabel()
    legend = [text.get_text() for text in figures["operator_sweep"].legends[0].get_texts()]
    assert legend == ["radius-1 box (3×3) (default)", "radius-2 box (5×5)"]
    summary = twice._summary()
    assert summary["depth"] == DEPTH
    assert summary["cutoff/aupr1/best_cutoff"] in (1.0, 4.0)


def test_best_cutoff_follows_each_metrics_direction(tmp_path):
    """The cutoff sweep's best variant reads ``higher_is_better`` from the metric classes:
    confidence drop is higher-is-better (CASE Eq. 9; it once read "lower" from a second
    table), deletion AUC lower-is-better, also under a custom label."""
    model, samples = small_vit(), dataset(5)
    metrics = [
        {"name": "confidence_drop", "label": "drop_10", "kwargs": {"fraction": 0.1}},
        "deletion_auc",
    ]
    sweep = CAAPSweepCallback(cutoffs=[1, 2, 3, 4], operators=["box1"], metrics=metrics)
    run(sweep, model, samples, tmp_path=tmp_path)
    summary, table = sweep._summary(), sweep.tables["cutoff_sweep"]
    drop = table[table["metric"] == "drop_10"].set_index("cutoff")["mean"]
    deletion = table[table["metric"] == "deletion_auc"].set_index("cutoff")["mean"]
    assert drop.idxmax() != drop.idxmin()  # the direction decides the pick on these data
    assert summary["cutoff/drop_10/best_cutoff"] == drop.idxmax()
    assert summary["cutoff/drop_10/best_mean"] == pytest.approx(drop.max())
    assert summary["cutoff/deletion_auc/best_cutoff"] == deletion.idxmin()
    legend = [t.get_text() for t in sweep._figures()["cutoff_sweep"].axes[0].get_legend().texts]
    assert legend[:2] == ["confidence drop (drop_10) (↑)", "Deletion AUC (↓)"]


def test_samples_keeps_the_lowest_indices(tmp_path):
    model, samples = small_vit(), dataset(5)
    callback = CAAPSweepCallback(
        cutoffs=[2], operators=["box1"], metrics=["deletion_auc"], samples=2,
        caap_kwargs={"blank": BLANK},
    )  # fmt: skip
    shuffled = [samples[i] for i in (4, 1, 3, 0, 2)]
    run(callback, model, shuffled, batch_size=2, tmp_path=tmp_path)
    assert sorted(callback.per_sample["index"].unique().tolist()) == [0, 1]
    expected = direct_values(model, samples[:2], (1, 2), "box1")["deletion_auc"]
    got = values_of(callback.per_sample, 2, "box1", "deletion_auc")
    assert torch.allclose(got, expected.double(), atol=2e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"operators": ["box1", "box3"]}, "unknown CAAP selection operator 'box3'"),
        ({"default_operator": "cross"}, "unknown CAAP selection operator 'cross'"),
        ({"operators": ["box1", "box1"]}, "distinct selection operators"),
        ({"cutoffs": [2, 2]}, "distinct integer layer indices"),
        ({"cutoffs": [1, 3], "first_layer": 2}, r"cutoffs \[1\] lie below first_layer = 2"),
        ({"caap_kwargs": {"layers": (1, 2)}}, "caap_kwargs may not set"),
        ({"metrics": ["feature_agreement"]}, "do not score one map per sample"),
        ({"metrics": ["insertion_aux"]}, "unknown metric 'insertion_aux'"),
        ({"missing_annotations": "ignore"}, "missing_annotations must be"),
    ],
)
def test_configuration_errors(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        CAAPSweepCallback(**kwargs)


def test_errors_that_need_the_model_or_the_data(tmp_path):
    samples = dataset(2)
    with pytest.raises(ConfigurationError, match=r"exceed the model's depth L = 4"):
        run(CAAPSweepCallback(cutoffs=[2, 5]), small_vit(), samples, tmp_path=tmp_path)
    with pytest.raises(ConfigurationError, match="not a timm VisionTransformer"):
        run(CAAPSweepCallback(), TinyCAMNet(), samples, tmp_path=tmp_path)
    unmasked = [{k: v for k, v in s.items() if k != "mask"} for s in samples]
    with pytest.raises(ConfigurationError, match=r"'pointing_game' needs \['mask'\]"):
        run(CAAPSweepCallback(cutoffs=[1]), small_vit(), unmasked, tmp_path=tmp_path)
    # skip: the localisation metrics drop out, faithfulness stays.
    callback = CAAPSweepCallback(cutoffs=[1], operators=["box1"], missing_annotations="skip")
    run(callback, small_vit(), unmasked, tmp_path=tmp_path)
    assert callback.per_sample["metric"].unique().tolist() == METRIC_NAMES[:3]


def test_shapes_twin_config_runs_in_evaluate(tmp_path):
    """configs/experiment/caap_sweeps_shapes.yaml end to end on a tiny ViT trained for one
    epoch (2 blocks, 8×8 patches on 32² images)."""
    import evaluate
    import train

    vit = ["--model.init_args.backbone_kwargs", "{img_size: 32, patch_size: 8, depth: 2}"]
    train.main(
        [
            "--config", str(REPO / "configs/model/vit_tiny_shapes.yaml"),
            *tiny_train_args(tmp_path, "tiny-vit", 0, *vit, "--data.image_size", "32"),
        ]
    )  # fmt: skip
    evaluate.main(
        [
            "--config", str(REPO / "configs/experiment/caap_sweeps_shapes.yaml"),
            "--model.checkpoint", str(tmp_path / "tiny-vit/checkpoints/last.ckpt"),
            "--data.image_size", "32",
            "--data.test_size", "8",
            "--data.num_workers", "0",
            "--evaluation.sample_size", "3",
            "--output_dir", str(tmp_path),
            "--run_name", "sweeps",
            "--wandb.mode", "disabled",
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    directory = tmp_path / "sweeps" / "analyses" / "caap_sweeps"
    cutoff = pd.read_csv(directory / "cutoff_sweep.csv")
    assert cutoff["cutoff"].unique().tolist() == [1, 2]  # every cutoff of the 2-block ViT
    assert set(cutoff["n"]) == {3}
    operator = pd.read_csv(directory / "operator_sweep.csv")
    assert operator["operator"].unique().tolist() == ["none", "box1", "box2", "manhattan"]
    assert {p.name for p in directory.glob("*.png")} == {"cutoff_sweep.png", "operator_sweep.png"}
    assert (tmp_path / "sweeps" / "summary.csv").is_file()  # the evaluation ran as well
