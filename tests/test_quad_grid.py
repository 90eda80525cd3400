"""Quad grids (Rao et al. 2022; VAR App. B.1) over the embedded shapes benchmark: layout,
determinism, cell contents, the confidence filter and its cache, configuration errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive_saliency.errors import ConfigurationError
from contrastive_saliency.metrics.functional.localisation import grid_cell_masks, grid_pointing_game
from datamodules import QuadGridDataModule, QuadGridDataset, ShapesDataModule
from datamodules.confidence_filter import confident_indices
from datamodules.dataset_labels import dataset_labels

NUM_CLASSES = 6  # 3 shapes × 2 marks; label of base index i is i % 6


def tiny_base() -> ShapesDataModule:
    return ShapesDataModule(
        image_size=32, num_shapes=3, num_marks=2, train_size=12, val_size=36, test_size=24,
        clutter=1, batch_size=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def base() -> ShapesDataModule:
    return tiny_base()


def _key(image: torch.Tensor) -> tuple[float, ...]:
    """Exact top-left pixels: unique per noisy shapes image, unchanged by batching."""
    return tuple(image[:, :2, :2].flatten().tolist())


class LookupModel(nn.Module):
    """Recognises the base images it was built from and answers their true label with logit
    ``scale`` (softmax ≈ 1) for ``confident`` indices, logit 2 (softmax ≈ 0.6 over 6 classes)
    for the others. ``calls`` counts forward passes."""

    def __init__(self, datasets, confident) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.table = {}
        for dataset in datasets:
            for i in range(len(dataset)):
                sample = dataset[i]
                self.table[_key(sample["image"])] = (int(sample["label"]), confident(i))
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(images.shape[0], NUM_CLASSES)
        for row, image in enumerate(images):
            label, sure = self.table[_key(image)]
            logits[row, label] = self.scale if sure else 2.0
        return logits


def confident_on_four_classes(index: int) -> bool:
    return index % NUM_CLASSES < 4 and index < 24


# -- layout, determinism, contents --------------------------------------------------------------


def test_grids_are_a_pure_function_of_seed_and_index(base):
    data = base.dataset("val")
    first = QuadGridDataset(data, 6, 16, seed=3)
    again = QuadGridDataset(data, 6, 16, seed=3)
    other = QuadGridDataset(data, 6, 16, seed=4)
    for i in (0, 5, 2):  # any order
        a, b = first[i], again[i]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(first[i]["image"], other[i]["image"]) for i in range(6))
    assert any(
        not torch.equal(first[i]["source_indices"], other[i]["source_indices"]) for i in range(6)
    )


def test_each_grid_has_four_distinct_classes_and_the_sample_format(base):
    data = base.dataset("val")
    grids = QuadGridDataset(data, 12, 16, seed=0)
    assert len(grids) == 12
    for i in range(len(grids)):
        sample = grids[i]
        labels = sample["grid_labels"]
        assert sample["image"].shape == (3, 32, 32)
        assert labels.dtype == torch.long and labels.shape == (4,)
        assert len(set(labels.tolist())) == 4
        assert [data.label_of(int(s)) for s in sample["source_indices"]] == labels.tolist()
        assert int(sample["label"]) == int(labels[0])
        assert int(sample["index"]) == i
        assert (
            sample["cell_masks"].shape == (4, 32, 32) and sample["cell_masks"].dtype == torch.bool
        )


def test_cells_are_the_resized_base_images(base):
    data = base.dataset("val")
    sample = QuadGridDataset(data, 2, 24, seed=1)[1]
    for cell, (y, x) in enumerate(((0, 0), (0, 24), (24, 0), (24, 24))):
        source = data[int(sample["source_indices"][cell])]["image"]
        expected = F.interpolate(
            source[None], size=(24, 24), mode="bilinear", align_corners=False, antialias=True
        )[0]
        assert torch.equal(sample["image"][:, y : y + 24, x : x + 24], expected)
    same_size = QuadGridDataset(data, 1, 32, seed=1)[0]
    top_right = data[int(same_size["source_indices"][1])]["image"]
    assert torch.equal(same_size["image"][:, :32, 32:], top_right)


def test_cell_masks_are_the_grid_pointing_game_cells(base):
    sample = QuadGridDataset(base.dataset("val"), 1, 16, seed=0)[0]
    cells = torch.arange(4)
    assert torch.equal(sample["cell_masks"], grid_cell_masks(cells, 32, 32))
    maps = sample["cell_masks"].float()
    assert torch.equal(grid_pointing_game(maps, cells), torch.ones(4))
    for cell in range(4):
        others = torch.tensor([c for c in range(4) if c != cell])
        scores = grid_pointing_game(maps[cell].expand(3, -1, -1), others)
        assert torch.equal(scores, torch.zeros(3))


def test_candidates_restrict_the_images_used(base):
    data = base.dataset("val")
    candidates = [i for i in range(len(data)) if confident_on_four_classes(i)]
    grids = QuadGridDataset(data, 10, 16, seed=0, candidates=candidates)
    assert len(grids) == 10  # fixed length whatever the filter keeps
    for i in range(len(grids)):
        sources, labels = grids.layout(i)[1], grids.layout(i)[0]
        assert set(sources) <= set(candidates)
        assert sorted(labels) == [0, 1, 2, 3]


# -- labels without rendering --------------------------------------------------------------------


@dataclass
class _Record:
    label: int


class _Plain(torch.utils.data.Dataset):
    def __init__(self, labels):
        self._labels, self.loads = labels, 0

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        self.loads += 1
        return {"image": torch.zeros(3, 4, 4), "label": self._labels[i], "index": i}


def test_dataset_labels_prefers_cheap_sources(base):
    assert dataset_labels(base.dataset("val")) == [i % NUM_CLASSES for i in range(36)]
    with_labels = _Plain([3, 1, 2])
    with_labels.labels = [3, 1, 2]
    assert dataset_labels(with_labels) == [3, 1, 2] and with_labels.loads == 0
    with_records = _Plain([0, 2])
    with_records.records = [_Record(0), _Record(2)]
    with_records.targets = [9, 9, 9]  # longer than the dataset (a subset): not used
    assert dataset_labels(with_records) == [0, 2] and with_records.loads == 0
    plain = _Plain([1, 0, 1, 4])
    assert dataset_labels(plain) == [1, 0, 1, 4] and plain.loads == 4  # fallback: one pass


# -- the confidence filter and its cache ---------------------------------------------------------


def test_confident_indices_keep_correct_and_confident_images(base):
    data = base.dataset("val")
    model = LookupModel([data], confident_on_four_classes)
    kept = confident_indices(model, data, threshold=0.99, batch_size=10)
    assert kept == [i for i in range(36) if confident_on_four_classes(i)]
    assert model.calls == 4  # ⌈36 / 10⌉ batches
    assert confident_indices(model, data, threshold=0.5, batch_size=64) == list(range(36))


def test_filter_cache_is_reused_and_invalidated(base, tmp_path):
    data = base.dataset("val")
    model = LookupModel([data], confident_on_four_classes)
    expected = [i for i in range(36) if confident_on_four_classes(i)]

    assert confident_indices(model, data, 0.99, 16, cache_dir=tmp_path, split="val") == expected
    files = list(tmp_path.glob("confident-*.json"))
    assert len(files) == 1 and model.calls == 3
    stored = json.loads(files[0].read_text())
    assert stored["indices"] == expected and stored["threshold"] == 0.99
    assert stored["dataset"]["split"] == "val" and stored["dataset"]["length"] == 36

    model.calls = 0
    assert confident_indices(model, data, 0.99, 16, cache_dir=tmp_path, split="val") == expected
    assert model.calls == 0  # read from the cache

    assert confident_indices(model, data, 0.5, 16, cache_dir=tmp_path, split="val") == list(
        range(36)
    )
    assert model.calls == 3  # another threshold: recomputed, stored beside the first
    assert len(list(tmp_path.glob("confident-*.json"))) == 2

    model.calls = 0
    with torch.no_grad():
        model.scale += 1.0  # other weights: another key
    assert confident_indices(model, data, 0.99, 16, cache_dir=tmp_path, split="val") == expected
    assert model.calls == 3

    model.calls = 0
    assert confident_indices(model, data, 0.99, 16, cache_dir=tmp_path, split="test") == expected
    assert model.calls == 3  # another split name: another key


def test_a_stale_or_broken_cache_file_is_recomputed(base, tmp_path):
    data = base.dataset("val")
    model = LookupModel([data], confident_on_four_classes)
    expected = confident_indices(model, data, 0.99, 64, cache_dir=tmp_path)
    (path,) = tmp_path.glob("confident-*.json")
    stored = json.loads(path.read_text())

    path.write_text(json.dumps({**stored, "threshold": 0.5, "indices": [0]}))  # mismatched key
    model.calls = 0
    assert confident_indices(model, data, 0.99, 64, cache_dir=tmp_path) == expected
    assert model.calls == 1 and json.loads(path.read_text()) == stored  # rewritten

    path.write_text('{"format": 1, "indi')  # truncated
    model.calls = 0
    assert confident_indices(model, data, 0.99, 64, cache_dir=tmp_path) == expected
    assert model.calls == 1

    path.write_text(json.dumps({**stored, "indices": [999]}))  # out of range
    model.calls = 0
    assert confident_indices(model, data, 0.99, 64, cache_dir=tmp_path) == expected
    assert model.calls == 1
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_another_benchmark_of_equal_size_does_not_hit_the_cache(base, tmp_path):
    data = base.dataset("val")
    other_seed = ShapesDataModule(
        image_size=32, num_shapes=3, num_marks=2, val_size=36, clutter=1, data_seed=1
    ).dataset("val")
    model = LookupModel([data, other_seed], confident_on_four_classes)
    confident_indices(model, data, 0.99, 64, cache_dir=tmp_path, split="val")
    model.calls = 0
    confident_indices(model, other_seed, 0.99, 64, cache_dir=tmp_path, split="val")
    assert model.calls == 1


# -- the datamodule --------------------------------------------------------------------------------


def test_datamodule_filters_once_and_serves_grids(base, tmp_path):
    model = LookupModel([base.dataset("val"), base.dataset("test")], confident_on_four_classes)
    dm = QuadGridDataModule(
        base, cell_size=16, val_samples=8, test_samples=5, seed=2, cache_dir=str(tmp_path),
        batch_size=4,
    )  # fmt: skip
    assert (dm.num_classes, dm.class_names) == (base.num_classes, base.class_names)
    assert (dm.mean, dm.std) == (base.mean, base.std)
    dm.set_filter_model(model)
    dm.prepare_data()  # rank 0: computes and caches both evaluation splits
    calls = model.calls
    assert calls > 0 and len(list(tmp_path.glob("confident-*.json"))) == 2
    dm.setup("validate")
    dm.setup("test")
    again = QuadGridDataModule(
        base, cell_size=16, val_samples=8, test_samples=5, seed=2, cache_dir=str(tmp_path)
    )
    again.set_filter_model(model)
    again.setup("test")  # another rank: reads the cache
    assert model.calls == calls

    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["grid_labels"].shape == (4, 4) and batch["cell_masks"].shape == (4, 4, 32, 32)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["label"], batch["grid_labels"][:, 0])
    confident = {i for i in range(24) if confident_on_four_classes(i)}
    for grids in (dm.dataset("val"), dm.dataset("test")):
        for i in range(len(grids)):
            sample = grids[i]
            assert set(sample["source_indices"].tolist()) <= confident
            assert sorted(sample["grid_labels"].tolist()) == [0, 1, 2, 3]
    assert torch.equal(again.dataset("test")[3]["image"], dm.dataset("test")[3]["image"])
    with pytest.raises(ConfigurationError, match="train_samples"):
        dm.train_dataloader()


def test_unfiltered_datamodule_uses_the_base_image_size(base):
    dm = QuadGridDataModule(base, val_samples=3, test_samples=0, cache_dir=None)
    sample = dm.dataset("val")[0]
    assert sample["image"].shape == (3, 64, 64)
    assert dm.candidates("val") is None


def test_filter_with_the_trainer_model_only_for_the_stage_splits(base, tmp_path):
    from lightning.pytorch.trainer.states import TrainerFn

    model = LookupModel([base.dataset("val"), base.dataset("test")], confident_on_four_classes)
    dm = QuadGridDataModule(
        base, cell_size=8, val_samples=4, test_samples=4, filter_trainer_model=True,
        cache_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="Trainer"):
        dm.dataset("val")
    dm.trainer = SimpleNamespace(
        lightning_module=model,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        state=SimpleNamespace(fn=TrainerFn.TESTING),
    )
    dm.prepare_data()  # trainer.test(...): only the test split is filtered
    (path,) = tmp_path.glob("confident-*.json")
    assert json.loads(path.read_text())["dataset"]["split"] == "test"
    assert dm.candidates("val") == [i for i in range(36) if confident_on_four_classes(i)]


def test_filter_checkpoint_network_is_handed_in_by_the_entry_points(base, tmp_path):
    import lightning as L

    from lightning_modules import ClassifierModule
    from lightning_modules.checkpoints import hand_filter_model

    classifier = ClassifierModule(backbone="small_cnn", num_classes=NUM_CLASSES)
    path = tmp_path / "tiny.ckpt"
    torch.save(
        {
            "state_dict": classifier.state_dict(),
            "hyper_parameters": dict(classifier.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    dm = QuadGridDataModule(
        base, val_samples=2, test_samples=0, filter_checkpoint=str(path), confidence_threshold=0.0,
        cache_dir=None,
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="loaded by the entry points"):
        dm.filter_model()  # the datamodule never loads a checkpoint itself
    hand_filter_model(dm)
    network = dm.filter_model()
    assert network is dm.filter_model()  # loaded once
    for name, value in classifier.model.state_dict().items():
        assert torch.equal(network.state_dict()[name], value)
    assert dm.candidates("val") == confident_indices(classifier.model, base.dataset("val"), 0.0)
    unfiltered = QuadGridDataModule(base, val_samples=2, test_samples=0, cache_dir=None)
    hand_filter_model(unfiltered)  # no filter_checkpoint: nothing to hand in
    assert unfiltered.filter_model() is None


@pytest.mark.parametrize("entry_point", ["train", "evaluate"])
def test_entry_points_load_the_filter_checkpoint_before_running(entry_point, tmp_path):
    """train.py and evaluate.py hand the filter network to the datamodule right after building
    it: a missing filter_checkpoint stops them there, naming the file."""
    import importlib

    from lightning_modules.cli import CONFIG_DIR

    missing = tmp_path / "missing.ckpt"
    arguments = [
        "--data", str(CONFIG_DIR / "data" / "quad_shapes.yaml"),
        "--data.init_args.filter_checkpoint", str(missing),
        "--output_dir", str(tmp_path), "--wandb.mode", "disabled",
    ]  # fmt: skip
    if entry_point == "evaluate":
        arguments += ["--model.model_name", "small_cnn", "--model.num_classes", "10"]
    with pytest.raises(ConfigurationError, match=rf"{missing.name}: no such file"):
        importlib.import_module(entry_point).main(arguments)


# -- errors ------------------------------------------------------------------------------------------


def test_too_few_confident_classes_is_a_clear_error(base, tmp_path):
    model = LookupModel([base.dataset("val")], lambda i: i % NUM_CLASSES < 3)
    dm = QuadGridDataModule(base, cell_size=16, val_samples=4, test_samples=0, cache_dir=None)
    dm.set_filter_model(model)
    with pytest.raises(ConfigurationError, match=r"threshold 0\.99.*only 3 classes"):
        dm.setup("validate")
    candidates = [i for i in range(36) if i % NUM_CLASSES < 3]
    with pytest.raises(ValueError, match="only 3 classes have candidate images"):
        QuadGridDataset(base.dataset("val"), 4, 16, candidates=candidates)


@pytest.mark.parametrize("cell_size", [0, -4, 2.5, True, "16"])
def test_invalid_cell_size_is_refused(base, cell_size):
    with pytest.raises(ValueError, match="cell_size"):
        QuadGridDataset(base.dataset("val"), 2, cell_size)
    with pytest.raises(ValueError, match="cell_size"):
        QuadGridDataModule(base, cell_size=cell_size)


def test_other_invalid_arguments_are_refused(base):
    data = base.dataset("val")
    with pytest.raises(ValueError, match="num_samples"):
        QuadGridDataset(data, -1, 16)
    with pytest.raises(ValueError, match="outside the base dataset"):
        QuadGridDataset(data, 1, 16, candidates=[0, 36])
    with pytest.raises(ValueError, match="labels has 3 entries"):
        QuadGridDataset(data, 1, 16, labels=[0, 1, 2])
    with pytest.raises(IndexError):
        QuadGridDataset(data, 2, 16)[2]
    with pytest.raises(ValueError, match="confidence threshold"):
        confident_indices(nn.Identity(), data, threshold=1.5)
    with pytest.raises(ValueError, match="confidence_threshold"):
        QuadGridDataModule(base, confidence_threshold=-0.1)
    with pytest.raises(ConfigurationError, match="not both"):
        QuadGridDataModule(base, filter_checkpoint="x.ckpt", filter_trainer_model=True)
    with pytest.raises(ConfigurationError, match="dataset"):
        QuadGridDataModule(object())  # type: ignore[arg-type]


# -- configuration -----------------------------------------------------------------------------------


def test_yaml_config_builds_the_nested_base_datamodule(tmp_path, capsys):
    import lightning as L
    from jsonargparse import ArgumentParser

    import evaluate
    from lightning_modules.cli import CONFIG_DIR

    config = CONFIG_DIR / "data" / "quad_shapes.yaml"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    parsed = parser.parse_args(["--data", str(config), "--data.init_args.val_samples", "3"])
    data = parser.instantiate(parsed).data
    assert isinstance(data, QuadGridDataModule) and isinstance(data.base, ShapesDataModule)
    assert (data.cell_size, data.samples["val"], data.base.config.image_size) == (64, 3, 64)

    with pytest.raises(SystemExit) as exit_info:  # the real LightningCLI of evaluate.py
        evaluate.main(["--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "datamodules.QuadGridDataModule" in printed and "datamodules.ShapesDataModule" in printed
