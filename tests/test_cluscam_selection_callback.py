"""ClusCAMSelectionCallback (callbacks/analyses/cluscam_selection.py): ClusCAM Alg. 2, Alg. 3
and Eq. 10 on the evaluated test samples. Its selection equals select_hyperparameters on the
same images (parity), counts every sample once whatever the duplicates, compares with Table 3,
publishes readable plots; one real evaluate.py run of the shapes twin config."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from callbacks.analyses.cluscam_selection import ClusCAMSelectionCallback
from contrastive_saliency.cluscam_selection import select_hyperparameters, selection_from_scores
from contrastive_saliency.errors import ConfigurationError
from tests.tiny_models import TinyCAMNet

pytestmark = pytest.mark.usefixtures("one_thread")

CANDIDATES = [2, 3, 4, 6]
REPO = Path(__file__).resolve().parent.parent


def tiny_cnn() -> nn.Module:
    """TinyCAMNet whose 8 channel maps are 8×8 for 32×32 inputs (ClusCAM upsamples them)."""
    torch.manual_seed(0)
    model = TinyCAMNet(channels=8, num_classes=5)
    model.features = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4, padding=2), nn.ReLU())
    return model.eval()


def dataset(n: int = 7) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    return [
        {"image": images[i], "label": torch.tensor(i % 5), "index": torch.tensor(i)}
        for i in range(n)
    ]


def batches(samples: list[dict], size: int) -> list[dict[str, torch.Tensor]]:
    loader = DataLoader(samples, batch_size=size, shuffle=False)
    return list(loader)


def run(callback, model, samples, batch_size=3, repeat=(), tmp_path=None, model_name=None):
    """Drive the callback's hooks as trainer.test does, with ``repeat`` batch numbers fed a
    second time (the duplicates a DistributedSampler pads uneven splits with)."""
    trainer = SimpleNamespace(
        test_dataloaders=DataLoader(samples, batch_size=batch_size),
        is_global_zero=True,
        default_root_dir=str(tmp_path),
        loggers=[],
    )
    module = SimpleNamespace(network=model, device=torch.device("cpu"), model_name=model_name)
    callback.on_test_start(trainer, module)
    parts = batches(samples, batch_size)
    for number in [*range(len(parts)), *repeat]:
        callback.on_test_batch_end(trainer, module, {}, parts[number], number)
    callback.on_test_epoch_end(trainer, module)
    return Path(tmp_path) / "analyses" / callback.name


def test_selection_equals_select_hyperparameters_on_the_same_samples(tmp_path):
    model, samples = tiny_cnn(), dataset(7)
    callback = ClusCAMSelectionCallback(k_candidates=CANDIDATES, samples=None, batch_size=5)
    directory = run(callback, model, samples, tmp_path=tmp_path)
    expected = select_hyperparameters(model, batches(samples, 4), CANDIDATES, seed=0)
    chosen = callback.selection
    assert chosen.num_clusters == expected.num_clusters
    assert torch.allclose(chosen.proxy, expected.proxy, rtol=1e-6, atol=1e-6)
    assert torch.equal(chosen.curvature.isnan(), expected.curvature.isnan())
    finite = ~expected.curvature.isnan()
    assert torch.allclose(chosen.curvature[finite], expected.curvature[finite], atol=1e-5)
    assert chosen.discard_ratio == pytest.approx(expected.discard_ratio, abs=1e-5)
    assert chosen.temperature == pytest.approx(expected.temperature, abs=1e-5)
    assert callback.indices.tolist() == list(range(7))
    table = pd.read_csv(directory / "selection.csv")
    assert table.loc[0, "num_clusters"] == expected.num_clusters
    assert table.loc[0, "discard_ratio"] == pytest.approx(expected.discard_ratio, abs=1e-5)
    assert table.loc[0, "temperature"] == pytest.approx(
        1 / math.log1p(table.loc[0, "discard_ratio"] * table.loc[0, "num_clusters"])
    )
    assert table.loc[0, "samples"] == 7
    proxy = pd.read_csv(directory / "proxy.csv")
    assert proxy["num_clusters"].tolist() == CANDIDATES
    assert proxy["chosen"].tolist() == [k == expected.num_clusters for k in CANDIDATES]
    assert torch.allclose(
        torch.tensor(proxy["proxy"].to_numpy()), expected.proxy, rtol=1e-6, atol=1e-6
    )
    assert len(table) == 1  # an unnamed model has no Table 3 row


def test_duplicated_indices_are_counted_once_and_samples_takes_the_lowest_indices(tmp_path):
    model, samples = tiny_cnn(), dataset(7)
    # Batches fed twice (DDP padding) change nothing.
    once = ClusCAMSelectionCallback(k_candidates=CANDIDATES, samples=None)
    run(once, model, samples, tmp_path=tmp_path / "once")
    twice = ClusCAMSelectionCallback(k_candidates=CANDIDATES, samples=None)
    run(twice, model, samples, repeat=(0, 2), tmp_path=tmp_path / "twice")
    assert twice.indices.tolist() == list(range(7))
    assert torch.equal(twice.selection.scores, once.selection.scores)
    assert twice.selection.discard_ratio == once.selection.discard_ratio
    # samples=4: the four lowest indices, in whatever batches they come.
    subset = ClusCAMSelectionCallback(k_candidates=CANDIDATES, samples=4)
    shuffled = [samples[i] for i in (5, 1, 6, 0, 3, 2, 4)]
    run(subset, model, shuffled, batch_size=2, tmp_path=tmp_path / "subset")
    assert subset.indices.tolist() == [0, 1, 2, 3]
    expected = select_hyperparameters(model, batches(samples[:4], 4), CANDIDATES, seed=0)
    assert subset.selection.num_clusters == expected.num_clusters
    assert subset.selection.discard_ratio == pytest.approx(expected.discard_ratio, abs=1e-5)


def test_table_3_row_plots_and_summary(tmp_path):
    model, samples = tiny_cnn(), dataset(6)
    callback = ClusCAMSelectionCallback(k_candidates=CANDIDATES, target="prediction")
    directory = run(callback, model, samples, tmp_path=tmp_path, model_name="torchvision:resnet50")
    table = pd.read_csv(directory / "selection.csv")
    preset = table.iloc[1]
    assert preset["source"] == "Table 3 (resnet50)"
    assert (preset["num_clusters"], preset["discard_ratio"], preset["temperature"]) == (
        45, 0.5171, 0.31,
    )  # fmt: skip
    assert round(preset["temperature_eq10"], 2) == 0.31  # Eq. 10 reproduces the table
    mixture = pd.read_csv(directory / "mixture.csv")
    assert mixture["mean"].is_monotonic_increasing  # non-salient first (Alg. 3 line 4)
    assert mixture["weight"].sum() == pytest.approx(1.0)
    for name in ("k_selection", "r_selection", "temperature"):
        assert (directory / f"{name}.png").stat().st_size > 10_000
    figures = callback._figures()
    for figure in figures.values():
        for ax in figure.axes:
            assert ax.get_xlabel() or ax.get_ylabel()
        assert "ClusCAM" in figure.axes[0].get_title()
        assert figure.axes[0].get_legend() is not None or figure.legends
    assert "torchvision:resnet50" in figures["k_selection"].axes[0].get_title()
    summary = callback._summary()
    assert summary["num_clusters"] == callback.selection.num_clusters
    assert summary["table3_num_clusters"] == 45.0


def test_selection_from_scores_follows_algorithms_2_and_3():
    # Proxies 0, -4, -6, -7 at K = 1, 2, 3, 4: slopes -4, -2, -1, curvatures 2 (K=3), 1 (K=4).
    proxies = {1: 0.0, 2: -4.0, 4: -7.0}
    scores = {k: torch.full((3, k), p) for k, p in proxies.items()}
    # K = 3: six scores near -10, three near 2 (mean -6 = P(3)).
    scores[3] = torch.tensor([[-10.2, -9.8, 2.2], [-10.1, -9.9, 1.8], [-10.0, -10.0, 2.0]])
    selection = selection_from_scores(scores)
    assert selection.num_clusters == 3
    assert selection.curvature[2].item() == pytest.approx(2.0)
    assert selection.curvature[3].item() == pytest.approx(1.0)
    # Six low scores, three high ones: about 2/3 non-salient.
    assert selection.discard_ratio == pytest.approx(6 / 9, abs=0.02)
    assert selection.temperature == pytest.approx(1 / math.log1p(selection.discard_ratio * 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k_candidates": [2, 4]}, "at least 3 strictly increasing"),
        ({"k_candidates": [4, 2, 6]}, "at least 3 strictly increasing"),
        ({"preset": "resnet51"}, "unknown ClusCAM preset 'resnet51'"),
        ({"cluscam_kwargs": {"num_clusters": 4}}, "cluscam_kwargs may not set"),
        ({"samples": 0}, "samples must be a positive number"),
        ({"target": "truth"}, "target must be 'label' or 'prediction'"),
    ],
)
def test_configuration_errors(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        ClusCAMSelectionCallback(**kwargs)


def test_wrong_layer_fails_before_the_first_batch(tmp_path):
    callback = ClusCAMSelectionCallback(layer="feature", k_candidates=CANDIDATES)
    with pytest.raises(ConfigurationError, match="layer 'feature' is not a submodule"):
        run(callback, tiny_cnn(), dataset(3), tmp_path=tmp_path)


def test_shapes_twin_config_runs_in_evaluate(trained_run, tmp_path):
    """configs/experiment/cluscam_selection_shapes.yaml end to end on a tiny small_cnn."""
    import evaluate

    evaluate.main(
        [
            "--config", str(REPO / "configs/experiment/cluscam_selection_shapes.yaml"),
            "--model.checkpoint", str(trained_run / "checkpoints/last.ckpt"),
            "--data.test_size", "12",
            "--data.num_workers", "0",
            "--evaluation.sample_size", "6",
            "--output_dir", str(tmp_path),
            "--run_name", "selection",
            "--wandb.mode", "disabled",
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    directory = tmp_path / "selection" / "analyses" / "cluscam_selection"
    table = pd.read_csv(directory / "selection.csv")
    assert table.loc[0, "samples"] == 6
    proxy = pd.read_csv(directory / "proxy.csv")
    assert table.loc[0, "num_clusters"] in proxy["num_clusters"].tolist()
    assert 0 < table.loc[0, "discard_ratio"] < 1
    assert {p.name for p in directory.glob("*.png")} == {
        "k_selection.png", "r_selection.png", "temperature.png",
    }  # fmt: skip
    assert (tmp_path / "selection" / "summary.csv").is_file()  # the evaluation ran as well
