"""Channel activity (CASE Sec. V-B, Eq. 10, Figs. 5–6): active-channel counts of several layers
in one forward pass, per-class means, the callback's exactly-once tables and plot, and a real
evaluate.py run with the callback configured in YAML."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import evaluate
from callbacks.analyses.channel_activity import (
    ChannelActivityCallback,
    KdeSeries,
    build_channel_activity_figure,
)
from contrastive_saliency.channel_activity import active_channel_counts, per_class_active_channels
from contrastive_saliency.errors import ConfigurationError, UnknownLayerError
from tests.conftest import TINY_SIZES

pytestmark = pytest.mark.usefixtures("one_thread")

CHANNELS = 4


class ConstantMapNet(nn.Module):
    """``features.0``: identity 1x1 conv (its output = the input image, C = 4 channels);
    ``features.1``: 1x1 conv ``2·A − 0.1``; logits = the spatial means of ``features.0``, so the
    prediction is the channel with the largest mean."""

    def __init__(self) -> None:
        super().__init__()
        identity = nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False)
        scaled = nn.Conv2d(CHANNELS, CHANNELS, 1)
        with torch.no_grad():
            identity.weight.copy_(torch.eye(CHANNELS)[:, :, None, None])
            scaled.weight.copy_(2 * torch.eye(CHANNELS)[:, :, None, None])
            scaled.bias.fill_(-0.1)
        self.features = nn.Sequential(identity, scaled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        first = self.features[0](images)
        self.features[1](first)  # runs for its activations only
        return first.mean(dim=(2, 3))


def constant_images(values: list[list[float]], size: int = 4) -> torch.Tensor:
    """Images whose channel c is the constant ``values[b][c]`` (spatial mean = that value)."""
    return torch.tensor(values, dtype=torch.float32)[:, :, None, None].expand(-1, -1, size, size)


VALUES = [
    [0.002, 0.0005, -1.0, 0.3],  # features.0: 2 active at τ = 0.001; predicts 3
    [0.5, 0.06, 0.04, 0.0],  # 3 active; features.1 (2a − 0.1): 0.9, 0.02, −0.02, −0.1 → 2
    [-0.2, -0.3, 0.0, 0.0001],  # none active; predicts 3 (largest mean 0.0001)
]


def test_counts_of_every_layer_from_one_forward_match_the_closed_form():
    model = ConstantMapNet()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    activity = active_channel_counts(model, constant_images(VALUES), ["features.0", "features.1"])
    assert len(calls) == 1
    values = torch.tensor(VALUES)
    assert activity.counts["features.0"].tolist() == (values > 0.001).sum(1).tolist() == [2, 3, 0]
    assert activity.counts["features.1"].tolist() == (2 * values - 0.1 > 0.001).sum(1).tolist()
    assert activity.channels == {"features.0": CHANNELS, "features.1": CHANNELS}
    assert activity.logits.argmax(1).tolist() == [3, 0, 3]


def test_a_mean_exactly_at_the_threshold_is_not_active():
    # 0.125 is exact in float32, so the spatial mean equals τ exactly: Eq. 10 is "> τ".
    images = constant_images([[0.125, 0.125 + 2**-20, 0.125 - 2**-20, 1.0]])
    counts = active_channel_counts(ConstantMapNet(), images, ["features.0"], threshold=0.125)
    assert counts.counts["features.0"].tolist() == [2]


def test_token_layers_count_patch_tokens_only():
    """A ViT layer: the class token is dropped and the mean runs over the patch grid."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=3
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    seen = {}
    handle = vit.blocks[0].norm1.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        vit(images)
    handle.remove()
    expected = (seen["out"][:, 1:].mean(dim=1) > 0.001).sum(1)
    with_class_token = (seen["out"].mean(dim=1) > 0.001).sum(1)
    activity = active_channel_counts(vit, images, ["blocks.0.norm1"])
    assert activity.counts["blocks.0.norm1"].tolist() == expected.tolist()
    assert activity.channels["blocks.0.norm1"] == 192
    assert activity.layouts["blocks.0.norm1"].kind == "tokens"
    assert not torch.equal(expected, with_class_token)  # dropping the class token matters


def test_mode_is_restored_and_bad_layers_are_specific_errors():
    model = ConstantMapNet().train()
    active_channel_counts(model, constant_images(VALUES), ["features.0"])
    assert model.training and not model._forward_hooks
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(UnknownLayerError, match=r"features\.0"):
        active_channel_counts(model, constant_images(VALUES), ["featurs.0"])
    with pytest.raises(ConfigurationError, match="listed twice"):
        active_channel_counts(model, constant_images(VALUES), ["features.0", "features.0"])
    with pytest.raises(ConfigurationError, match="finite"):
        active_channel_counts(model, constant_images(VALUES), ["features.0"], float("nan"))


def test_per_class_means_equal_a_direct_computation():
    generator = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 50, (40,), generator=generator)
    labels = torch.randint(0, 5, (40,), generator=generator)
    predictions = torch.where(torch.rand(40, generator=generator) < 0.7, labels, (labels + 1) % 5)
    result = per_class_active_channels(counts, labels, 6, predictions)
    frame = pd.DataFrame({"count": counts, "label": labels, "ok": predictions == labels})
    direct = frame[frame["ok"]].groupby("label")["count"].agg(["mean", "size"])
    assert result.present.nonzero().flatten().tolist() == direct.index.tolist()
    np.testing.assert_allclose(result.mean[result.present].numpy(), direct["mean"].to_numpy())
    assert result.num_images[result.present].tolist() == direct["size"].tolist()
    every = per_class_active_channels(counts, labels, 6)  # no predictions: every image counts
    assert every.num_images.sum() == 40 and not every.present[5]


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.network = ConstantMapNet()
        self.num_classes = CHANNELS


def _batch(rows: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "image": constant_images([VALUES[r] for r in rows]),
        "label": torch.tensor(labels),
        "index": torch.tensor(rows),
    }


def test_callback_counts_each_sample_once_and_means_over_correct_images(tmp_path):
    callback = ChannelActivityCallback(["features.0", "features.1"], name="activity")
    module = _Module()
    trainer = SimpleNamespace(
        is_global_zero=True, datamodule=None, default_root_dir=str(tmp_path), loggers=[]
    )
    callback.on_test_start(trainer, module)
    # sample 0 (label 3, predicted 3) arrives three times, as DistributedSampler padding would
    # repeat it; sample 1 has label 1 but is predicted 0; sample 2 has label 3, predicted 3.
    callback.on_test_batch_end(trainer, module, None, _batch([0, 1], [3, 1]), 0)
    callback.on_test_batch_end(trainer, module, None, _batch([2, 0], [3, 3]), 1)
    callback.on_test_batch_end(trainer, module, None, _batch([0], [3]), 2)
    callback.on_test_epoch_end(trainer, module)
    folder = tmp_path / "analyses" / "activity"
    per_sample = pd.read_csv(folder / "per_sample.csv")
    assert sorted(per_sample[per_sample["layer"] == "features.0"]["index"]) == [0, 1, 2]
    per_class = pd.read_csv(folder / "per_class.csv").set_index(["layer", "class"])
    # class 3: samples 0 (2 active) and 2 (0 active); class 1's only image is misclassified.
    assert per_class.loc[("features.0", 3), "mean_active_channels"] == 1.0
    assert per_class.loc[("features.0", 3), "n_images"] == 2
    assert per_class.loc[("features.1", 3), "mean_active_channels"] == 0.5  # 1 and 0 active
    assert ("features.0", 1) not in per_class.index
    summary = pd.read_csv(folder / "summary.csv").set_index("layer")
    assert summary.loc["features.0", "channels"] == CHANNELS
    assert summary.loc["features.0", "share_active"] == pytest.approx(1.0 / CHANNELS)
    assert (folder / "channel_activity_kde.png").stat().st_size > 0

    every = ChannelActivityCallback(["features.0"], correct_only=False, name="every")
    every.on_test_start(trainer, module)
    every.on_test_batch_end(trainer, module, None, _batch([0, 1, 2], [3, 1, 3]), 0)
    every.on_test_epoch_end(trainer, module)
    assert every.per_class.set_index("class").loc[1, "mean_active_channels"] == 3.0

    # no correctly predicted image: empty per-class table, a summary row per layer, a plot
    none = ChannelActivityCallback(["features.0", "features.1"], name="none")
    none.on_test_start(trainer, module)
    none.on_test_batch_end(trainer, module, None, _batch([1], [1]), 0)
    none.on_test_epoch_end(trainer, module)
    assert none.per_class.empty
    assert none.summary["layer"].tolist() == ["features.0", "features.1"]
    assert none.summary["classes"].tolist() == [0, 0]
    assert none.summary["mean_over_classes"].isna().all()
    assert (tmp_path / "analyses" / "none" / "channel_activity_kde.png").is_file()


def test_callback_rejects_unknown_layers_before_any_batch(tmp_path):
    callback = ChannelActivityCallback(["features.2"])
    with pytest.raises(UnknownLayerError, match="nearest valid names: features"):
        callback.on_test_start(SimpleNamespace(), _Module())
    with pytest.raises(ConfigurationError, match="non-empty list"):
        ChannelActivityCallback("features.0")  # type: ignore[arg-type]


def test_degenerate_kde_is_drawn_as_a_line_and_said_so():
    figure = build_channel_activity_figure(
        [
            KdeSeries("spread", np.array([3.0, 4.0, 6.0]), 8),
            KdeSeries("flat", np.array([5.0, 5.0]), 8),
            KdeSeries("single", np.array([2.0]), 8),
        ],
        title="test",
    )
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert sum("KDE undefined" in label for label in labels) == 2
    assert any(label.startswith("spread") and "KDE undefined" not in label for label in labels)


def test_evaluate_run_writes_channel_activity_of_the_configured_layers(
    trained_run, tmp_path, monkeypatch
):
    from datamodules import ShapesDataModule
    from lightning_modules.checkpoints import load_classifier
    from tests.test_evaluation_pipeline import _capture_wandb

    wandb_run = _capture_wandb(monkeypatch)

    config = tmp_path / "activity.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: callbacks.analyses.channel_activity.ChannelActivityCallback\n"
        "      init_args:\n"
        "        layers: [features.3, features.2.2.0]\n"
        "        correct_only: false\n"
        "evaluation:\n"
        "  methods: [grad_cam]\n"
        "  targets: [top1_vs_top2]\n"
        "  metrics: [feature_agreement]\n"
        "  gallery_size: 0\n"
    )
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    evaluate.main(
        [
            "--config", str(config),
            "--model.checkpoint", str(checkpoint),
            "--output_dir", str(tmp_path), "--run_name", "activity",
            "--wandb.mode", "offline", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "4", "--data.num_workers", "0", *TINY_SIZES,
        ]
    )  # fmt: skip
    folder = Path(tmp_path) / "activity" / "analyses" / "channel_activity"
    per_sample = pd.read_csv(folder / "per_sample.csv")
    # independent computation: plain hooks on the checkpoint's network, mean over h, w
    network = load_classifier(checkpoint).model.eval()
    data = ShapesDataModule(train_size=96, val_size=30, test_size=7)
    data.setup("test")
    images = torch.stack([data.test_dataloader().dataset[i]["image"] for i in range(7)])
    seen = {}
    for layer in ("features.3", "features.2.2.0"):
        module = network.get_submodule(layer)
        module.register_forward_hook(lambda m, a, out, layer=layer: seen.update({layer: out + 0}))
    with torch.no_grad():
        network(images)
    for layer, output in seen.items():
        rows = per_sample[per_sample["layer"] == layer].sort_values("index")
        assert rows["index"].tolist() == list(range(7))
        expected = (output.mean(dim=(2, 3)) > 0.001).sum(1).tolist()
        assert rows["active_channels"].tolist() == expected
        assert set(rows["channels"]) == {output.shape[1]}
    per_class = pd.read_csv(folder / "per_class.csv")
    direct = per_sample.groupby(["layer", "label"])["active_channels"].agg(["mean", "size"])
    merged = per_class.merge(direct, left_on=["layer", "class"], right_index=True)
    assert len(merged) == len(per_class) == len(direct)
    np.testing.assert_allclose(merged["mean_active_channels"], merged["mean"])
    assert (merged["n_images"] == merged["size"]).all()
    assert set(per_class["class_name"]) <= set(data.class_names)
    summary = pd.read_csv(folder / "summary.csv").set_index("layer")
    means = per_class.groupby("layer")["mean_active_channels"].mean()
    for layer in seen:
        assert summary.loc[layer, "mean_over_classes"] == pytest.approx(means[layer])
    assert (folder / "channel_activity_kde.png").stat().st_size > 10_000
    logged = wandb_run["summary"]
    for layer in seen:
        key = f"analysis/channel_activity/{layer}/mean_active_channels"
        assert logged[key] == pytest.approx(summary.loc[layer, "mean_over_classes"])


def test_fig6_command_overlays_runs_labelled_by_their_model(tmp_path, capsys):
    from experiments import channel_activity_kde

    runs = []
    for name, model, channels, values in (
        ("dense", "torchvision:densenet201", 32, [12.0, 15.0, 18.0]),
        ("res", "torchvision:resnet50", 2048, [700.0, 820.0, 905.0]),
    ):
        run = tmp_path / name
        folder = run / "analyses" / "channel_activity"
        folder.mkdir(parents=True)
        (run / "config.yaml").write_text(
            f"model:\n  model_name: {model}\ndata:\n  class_path: datamodules.ImageNetDataModule\n"
        )
        pd.DataFrame(
            {
                "layer": "last",
                "class": range(3),
                "mean_active_channels": values,
                "n_images": 2,
                "channels": channels,
            }
        ).to_csv(folder / "per_class.csv", index=False)
        pd.DataFrame({"layer": ["last"], "threshold": [0.001], "correct_only": [True]}).to_csv(
            folder / "summary.csv", index=False
        )
        runs.append(str(run))
    output = channel_activity_kde.main([*runs, "--output", str(tmp_path / "fig6.png")])
    assert output.stat().st_size > 10_000
    table = pd.read_csv(tmp_path / "fig6.csv").set_index("model")
    assert table.loc["torchvision:densenet201 on ImageNet", "mean_over_classes"] == 15.0
    assert table.loc["torchvision:resnet50 on ImageNet", "channels"] == 2048
    assert "torchvision:resnet50 on ImageNet" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"per_class\.csv not found"):
        channel_activity_kde.main([str(tmp_path), "--output", str(tmp_path / "x.png")])
