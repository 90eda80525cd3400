"""Two CPU processes (gloo) give exactly the single-process metric values.

A ``DistributedSampler`` over an odd number of samples pads one rank with a duplicate; the
metrics gather their per-sample states (``dist_reduce_fx="cat"``) and de-duplicate by index,
so every rank's ``compute()`` and ``per_sample_table()`` equal one process's over the unique
samples. The children import torch, torchmetrics and contrastive_saliency.metrics only (no Lightning).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from contrastive_saliency.metrics import (
    AverageDrop,
    AverageGain,
    ConfidenceDrop,
    DeletionAUC,
    FeatureAgreement,
    InsertionMinusDeletion,
    PointingGame,
    RelativeDrop,
    SampleMetric,
    TopKIntersection,
)
from contrastive_saliency.metrics.functional import confidence_drop

WORLD_SIZE = 2
NUM_SAMPLES = 7  # odd: the sampler pads rank 1 with sample 0 again
SIZE = 8
CLASSES = 3
TIMEOUT_S = 600  # cold imports on a loaded machine; a healthy run takes seconds


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Sparse, quantised maps: most pixels tie (at 0 or at one of three levels), so the masks,
    # orders and overlaps below all depend on the tie rule — keyed by the sample index, it
    # must give every rank the values one process gets, whatever the batches hold.
    sparse = (torch.rand(NUM_SAMPLES, SIZE, SIZE, generator=g) * 8 - 5).clamp(min=0).floor()
    return {
        "image": torch.randn(NUM_SAMPLES, 3, SIZE, SIZE, generator=g),
        "map": sparse,
        "map_b": (torch.rand(NUM_SAMPLES, SIZE, SIZE, generator=g) * 8 - 6).clamp(min=0).floor(),
        "mask": torch.rand(NUM_SAMPLES, SIZE, SIZE, generator=g) > 0.5,
        "label": torch.randint(0, CLASSES, (NUM_SAMPLES,), generator=g),
    }


class _Samples(Dataset):
    """The sample dicts of DESIGN.md: tensors plus ``index``."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {key: value[i] for key, value in self.data.items()} | {"index": torch.tensor(i)}


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same random-init weights in every process
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, CLASSES),
    ).eval()


def _metrics() -> dict[str, SampleMetric]:
    return {
        "deletion_auc": DeletionAUC(pixels_per_step=SIZE, batch_size=3),  # keeps curves too
        "insertion_minus_deletion": InsertionMinusDeletion(pixels_per_step=SIZE, batch_size=3),
        "confidence_drop": ConfidenceDrop(fraction=0.1, batch_size=3),
        "average_drop": AverageDrop(batch_size=3),
        "average_gain": AverageGain(batch_size=3),
        "feature_agreement": FeatureAgreement(fraction=0.1, wilcoxon_threshold=0.5),
        "relative_drop": RelativeDrop(fraction=0.2, batch_size=3),
        "top_k_intersection": TopKIntersection(k=12),
        # Updated by rank 0 only, with every sample: rank 1 contributes an empty state.
        "pointing_game_rank0": PointingGame(),
    }


def _update(metrics: dict[str, SampleMetric], model: nn.Module, batch: dict) -> None:
    image, maps, label, index = batch["image"], batch["map"], batch["label"], batch["index"]
    cache: dict = {}  # as the evaluation shares curves and forwards within a batch
    metrics["deletion_auc"].update(model, image, maps, label, index, cache)
    metrics["insertion_minus_deletion"].update(model, image, maps, label, index, cache)
    metrics["confidence_drop"].update(model, image, maps, label, index)
    metrics["average_drop"].update(model, image, maps, label, index, cache)
    metrics["average_gain"].update(model, image, maps, label, index, cache)
    metrics["feature_agreement"].update(maps, batch["map_b"], index)
    metrics["relative_drop"].update(model, image, maps, label, index)
    metrics["top_k_intersection"].update(maps, batch["mask"], index)


def _results(metrics: dict[str, SampleMetric]) -> dict[str, dict]:
    results = {}
    for name, metric in metrics.items():
        summary = metric.compute()
        indices, table = metric.per_sample_table()
        results[name] = {
            "summary": {key: value.item() for key, value in summary.items()},
            "indices": indices.tolist(),
            "table": {column: values.tolist() for column, values in table.items()},
            "local_rows": sum(part.numel() for part in metric.indices),
        }
        if getattr(metric, "curves", ()):
            curve_indices, curves = metric.per_sample_curves()
            results[name]["table"]["curves"] = curves.tolist()
            results[name]["curve_indices"] = curve_indices.tolist()
        if dist.is_initialized():
            with metric.sync_context():  # the raw gathered state, before de-duplication
                results[name]["gathered_rows"] = metric.indices.numel()
    return results


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        data, model, metrics = _data(), _model(), _metrics()
        dataset = _Samples(data)
        sampler = DistributedSampler(
            dataset, num_replicas=WORLD_SIZE, rank=rank, shuffle=False, drop_last=False
        )
        for batch in DataLoader(dataset, batch_size=2, sampler=sampler):
            _update(metrics, model, batch)
        if rank == 0:
            metrics["pointing_game_rank0"].update(
                data["map"], data["mask"], torch.arange(NUM_SAMPLES)
            )
        results = _results(metrics)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _single_process() -> dict[str, dict]:
    data, model, metrics = _data(), _model(), _metrics()
    batch = data | {"index": torch.arange(NUM_SAMPLES)}
    _update(metrics, model, batch)
    metrics["pointing_game_rank0"].update(data["map"], data["mask"], batch["index"])
    return _results(metrics)


def test_two_processes_equal_one_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _single_process()
    finally:
        torch.set_num_threads(threads)
    # The ties matter on these data: other indices draw other masks, so equal values below
    # show that every rank broke the ties as one process did, not by batch position.
    data, model = _data(), _model()
    shifted = confidence_drop(
        model, data["image"], data["map"], data["label"], 0.1, indices=torch.arange(7) + 100
    )
    own = torch.tensor(expected["confidence_drop"]["table"]["confidence_drop"])
    assert not torch.allclose(shifted, own, rtol=0, atol=1e-6)
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} processes did not finish in {TIMEOUT_S} s")

    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results.keys() == expected.keys()
        for name, want in expected.items():
            got = results[name]
            assert got["indices"] == list(range(NUM_SAMPLES)), (rank, name)
            assert got["table"].keys() == want["table"].keys()
            for column, values in want["table"].items():
                torch.testing.assert_close(
                    torch.tensor(got["table"][column]), torch.tensor(values), rtol=0, atol=1e-6
                )
            assert got["summary"].keys() == want["summary"].keys()
            for key, value in want["summary"].items():
                if key.endswith("/count"):
                    assert got["summary"][key] == value == NUM_SAMPLES, (rank, name, key)
                else:
                    assert got["summary"][key] == pytest.approx(value, abs=1e-6, nan_ok=True)
        # The sampler padded: 8 rows gathered for 7 samples, 4 on each rank; compute() and
        # per_sample_table() counted the duplicate once.
        assert results["deletion_auc"]["curve_indices"] == list(range(NUM_SAMPLES))
        for name in ("deletion_auc", "confidence_drop", "feature_agreement", "relative_drop"):
            assert results[name]["local_rows"] == 4
            assert results[name]["gathered_rows"] == 8 > NUM_SAMPLES
        # A rank without samples contributes an empty state that gathers with the others.
        pointing = results["pointing_game_rank0"]
        assert pointing["local_rows"] == (NUM_SAMPLES if rank == 0 else 0)
        assert pointing["gathered_rows"] == NUM_SAMPLES
