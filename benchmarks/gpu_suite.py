"""GPU verification in one call: correctness tests, throughput, one full study; JSON + a table.

    bash benchmarks/gpu_suite.sh                          # CUDA, full (≤ 8 min on one H100: estimate)
    bash benchmarks/gpu_suite.sh --quick                  # CUDA, ≤ 3 min (estimate)
    bash benchmarks/gpu_suite.sh --device cpu --quick     # CI-sized, the same code paths (≤ 2 min)
    bash benchmarks/gpu_suite.sh --steps tests study      # only some steps (e.g. a second window)
    bash benchmarks/gpu_suite.sh --deadline 540           # start no step that would end after 9 min

Steps, in this order (each writes ``<step>.json`` under ``--output``, default
``benchmarks/results/gpu/``; ``suite.json`` is rewritten after every step, so a run cut off
by the end of a GPU window keeps what it finished):

1. ``tests``: ``pytest -m gpu tests/`` on CUDA (every ``gpu``-marked test: CUDA = CPU for each
   method and metric family, autocast float16/bfloat16 within stated tolerances, host round
   trips that do not grow with the batch, a deterministic ``train.py`` run reproducing itself
   bit for bit); on CPU the ``cpu`` parametrisations of the same checks
   (``pytest tests/test_gpu.py -m "not gpu"``).
2. ``cams``: maps/s of the gradient CAMs (incl. CASE, Finer-CAM, VAR) for K = 1 and K = 5
   classes per image on ResNet-50 at 224², pytorch-grad-cam's and torch-cam's time for the
   same K maps in the same process, peak GPU memory and host round trips per call
   (``benchmarks/saliency_throughput.py``).
3. ``study``: ``evaluate.py --config configs/evaluate/class_sensitivity.yaml`` on a fabricated
   ImageNet folder (2,000 images, ImageNet-S masks) with a random-init ResNet-50; images/s
   of the whole study and the projected time for the 50,000 ImageNet validation images.
4. ``metrics``: seconds per image of every metric (deletion/insertion, AD/IC/AG, PIC, ...) on
   ResNet-50 at 224² (``benchmarks/metrics_throughput.py``).
5. ``score_cams``: Score-CAM and Ablation-CAM vs pytorch-grad-cam
   (``benchmarks/score_cam_throughput.py``).
6. ``vit``: ViT-B/16 at 224²: Grad-CAM at ``blocks.11.norm1`` vs pytorch-grad-cam, attention
   rollout; CAAP parallel vs the per-patch loop (``benchmarks/caap_throughput.py``).
7. ``input_gradients``: saliency, Input×Gradient, Integrated Gradients, SmoothGrad, guided
   backprop, LRP on ResNet-50.
8. ``perturbation``: RISE, ClusCAM, Finer-Score-CAM on ResNet-50.

Every step runs even if an earlier one failed; the exit status is 1 if any step failed.

Budgets (``Profile.budgets``, seconds on one H100; ESTIMATES — no GPU has run this yet;
``suite.json`` records each step's measured time next to its budget). They assume ResNet-50
at 224² runs ≈ 3,000 images/s forward in float32 (cuDNN's default TF32 convolutions) at
batch ≥ 64, ≈ 3 ms per call at batch ≤ 8 (kernel launches), backward ≈ 2× forward, and a
16-core host for data loading, PIC's WebP encoding and imports:

============== ====== ===== ==============================================================
step            full  quick  what dominates
============== ====== ===== ==============================================================
tests            100   100  collecting tests/ (imports), two tiny deterministic train.py runs
cams              60    25  10 methods × 15 calls at batch 32; pytorch-grad-cam K calls each
study             90    45  fabricating 2,000 JPEGs; 107-step sanity check; plots, report
metrics           60     –  deletion+insertion (2 × 225 forwards per image), PIC on the host
score_cams        45     –  pytorch-grad-cam Score-/Ablation-CAM: 5 × 4,096 forwards
vit               30     –  ViT-B/16 model build; CAAP loop
input_gradients   40     –  Integrated Gradients / SmoothGrad: 50 × K forward+backward
perturbation      35     –  RISE: 4,000 masked forwards per image
total            460   170  (≤ 8 min and ≤ 3 min; machine start-up not included)
============== ====== ===== ==============================================================
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's progress bars

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import environment, load_average, print_table, write_json

REPO = Path(__file__).resolve().parents[1]

STEPS = (
    "tests",
    "cams",
    "study",
    "metrics",
    "score_cams",
    "vit",
    "input_gradients",
    "perturbation",
)
CAMS = [
    "grad_cam", "grad_cam_pp", "xgrad_cam", "layer_cam", "hires_cam", "eigen_cam",
    "case", "finer_cam", "var", "guided_grad_cam",
]  # fmt: skip
INPUT_GRADIENTS = [
    "saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop",
    "lrp",
]  # fmt: skip
PERTURBATION = ["rise", "cluscam", "finer_score_cam"]
STUDY_CONFIG = "configs/evaluate/class_sensitivity.yaml"
IMAGENET_VAL_IMAGES = 50_000


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes of one run of the suite. ``budgets`` (seconds per step) are estimates."""

    cnn: str
    vit: str
    image_size: int
    vit_image_size: int
    cam_batch: int
    gradient_batch: int
    perturbation_batch: int
    score_forward_batch: int
    repeats: int
    warmup: int
    metric_images: int
    metric_batch_sizes: tuple[int, ...]
    study_model: str
    study_images: int
    study_image_size: int
    study_resize_size: int
    study_batch: int
    study_workers: int
    study_sanity_check: dict[str, Any] | None  # None: the study config's
    study_gallery: int | None  # None: the study config's
    method_kwargs: dict[str, dict[str, Any]]
    cams: tuple[str, ...]
    budgets: dict[str, float]
    tests: tuple[str, ...]
    test_timeout_s: int
    threads: int | None = None  # CPU threads (here and in the subprocesses); None: torch's default
    # run the subprocess steps (tests, study) alongside the in-process ones: CPU only, where
    # the numbers check code paths; on a GPU, steps never share the device while timed
    concurrent: bool = False


CUDA_FULL = Profile(
    cnn="resnet50", vit="timm:vit_base_patch16_224", image_size=224, vit_image_size=224,
    cam_batch=32, gradient_batch=8, perturbation_batch=2, score_forward_batch=256,
    repeats=5, warmup=2, metric_images=8, metric_batch_sizes=(64, 256),
    study_model="torchvision:resnet50", study_images=2000, study_image_size=224,
    study_resize_size=256, study_batch=128, study_workers=8, study_sanity_check=None, study_gallery=None,
    method_kwargs={}, cams=tuple(CAMS),
    budgets={"tests": 100, "cams": 60, "study": 90, "metrics": 60, "score_cams": 45,
             "vit": 30, "input_gradients": 40, "perturbation": 35},
    tests=("-m", "gpu", "tests"), test_timeout_s=240,
)  # fmt: skip
CUDA_QUICK = dataclasses.replace(
    CUDA_FULL,
    cam_batch=16, repeats=3, warmup=1, metric_images=4, metric_batch_sizes=(256,),
    study_images=500, study_sanity_check={"samples": 2, "max_steps": 8, "measure": "spearman_abs"},
    cams=("grad_cam", "case", "finer_cam", "var", "layer_cam"),
    budgets={"tests": 100, "cams": 25, "study": 45},
)  # fmt: skip
CPU_QUICK = Profile(
    cnn="resnet18", vit="timm:vit_tiny_patch16_224", image_size=64, vit_image_size=64,
    cam_batch=2, gradient_batch=2, perturbation_batch=1, score_forward_batch=64,
    repeats=1, warmup=0, metric_images=2, metric_batch_sizes=(64,),
    study_model="torchvision:resnet18", study_images=16, study_image_size=64,
    study_resize_size=73, study_batch=8, study_workers=0,
    study_sanity_check={"samples": 1, "max_steps": 2, "measure": "spearman_abs"},
    study_gallery=1,
    method_kwargs={"integrated_gradients": {"steps": 4}, "smoothgrad": {"n_samples": 4},
                   "rise": {"n_masks": 64}, "cluscam": {"num_clusters": 4}},
    cams=("grad_cam", "case", "finer_cam", "var"),
    # measured on the shared 2-core development machine at a 1-minute load average of 7-13
    # (tests and study run alongside cams: the whole quick run took 98-150 s)
    budgets={"tests": 120, "cams": 60, "study": 90, "metrics": 45, "score_cams": 90,
             "vit": 10, "input_gradients": 20, "perturbation": 25},
    tests=("tests/test_gpu.py", "-m", "not gpu"),  # the cpu parametrisations, slow ones too
    test_timeout_s=150,
    # one thread: tiny tensors on a shared, oversubscribed 2-core machine run several times
    # faster than with two spinning threads
    threads=1,
    concurrent=True,
)  # fmt: skip
QUICK_STEPS = ("tests", "cams", "study")


def profile_for(device: torch.device, quick: bool) -> Profile:
    if device.type == "cuda":
        return CUDA_QUICK if quick else CUDA_FULL
    # A full run on CPU is the GPU profile on the CPU (hours): the sizes say what is measured.
    if quick:
        return CPU_QUICK
    return dataclasses.replace(CUDA_FULL, tests=CPU_QUICK.tests)


# ------------------------------------------------------------------------------- steps
def step_tests(profile: Profile, device: torch.device, output: Path) -> Job:
    report = output / "tests.xml"
    report.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "pytest", *profile.tests, "-q", "-p", "no:cacheprovider",
        "-o", "addopts=-ra", f"--junitxml={report}",
    ]  # fmt: skip

    def finish(completed: subprocess.CompletedProcess, wall_s: float) -> dict[str, Any]:
        counts = _junit_counts(report)
        ok = completed.returncode == 0 and counts["failed"] == 0 and counts["passed"] > 0
        if device.type == "cuda" and counts["skipped"]:
            ok = False  # on a GPU machine no gpu-marked test may be skipped
        return {
            "ok": ok,
            "command": " ".join(command),
            "returncode": completed.returncode,
            **counts,
            "output_tail": completed.stdout[-4000:],
            "summary": [
                {"item": "tests", "figure": "passed", "value": counts["passed"]},
                {"item": "tests", "figure": "failed", "value": counts["failed"]},
                {"item": "tests", "figure": "skipped", "value": counts["skipped"]},
            ],
        }

    # deterministic cuBLAS needs its workspace fixed before the process first uses cuBLAS
    return Job(command, profile.test_timeout_s, finish, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})


def _throughput(
    argv: list[str], rows_key: str = "methods"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from benchmarks import saliency_throughput

    result = saliency_throughput.main(argv)
    return result, [r for r in result[rows_key] if "skipped" not in r]


def _method_rows(rows: list[dict[str, Any]], model: str, k: int) -> list[dict[str, Any]]:
    summary = []
    for row in rows:
        item = f"{model} {row['method']}"
        summary += [
            {"item": item, "figure": "maps/s K=1", "value": row["maps_per_s_1_class"]},
            {"item": item, "figure": f"maps/s K={k}", "value": row["maps_per_s_k_classes"]},
        ]
        if "library_maps_per_s_k_classes" in row:
            summary.append(
                {
                    "item": item,
                    "figure": f"pytorch-grad-cam maps/s K={k}",
                    "value": row["library_maps_per_s_k_classes"],
                }
            )
        if "torchcam_maps_per_s_k_classes" in row:
            summary.append(
                {
                    "item": item,
                    "figure": f"torch-cam maps/s K={k}",
                    "value": row["torchcam_maps_per_s_k_classes"],
                }
            )
        if row.get("peak_memory_mib_k_classes") is not None:
            summary.append(
                {"item": item, "figure": "peak MiB", "value": row["peak_memory_mib_k_classes"]}
            )
    return summary


def _method_step(
    profile: Profile,
    device: torch.device,
    output: Path,
    name: str,
    methods: list[str] | tuple[str, ...],
    batch: int,
    *,
    model: str | None = None,
    layer: str = "layer4",
    image_size: int | None = None,
    library: bool = True,
    expensive: bool = False,
) -> dict[str, Any]:
    """Maps/s of ``methods`` (benchmarks/saliency_throughput.py); ``expensive`` methods
    (hundreds to thousands of forwards per map) are timed with at most 2 repeats after 1
    warm-up call."""
    model = model or profile.cnn
    repeats = min(profile.repeats, 2) if expensive else profile.repeats
    warmup = min(profile.warmup, 1) if expensive else profile.warmup
    argv = [
        "--model", model, "--layer", layer,
        "--image-size", str(image_size or profile.image_size),
        "--batch-size", str(batch), "--classes", "5",
        "--repeats", str(repeats), "--warmup", str(warmup),
        "--device", str(device), "--output", str(output / f"{name}.json"),
        "--methods", *methods,
        "--method-kwargs", json.dumps({m: profile.method_kwargs[m] for m in methods
                                       if m in profile.method_kwargs}),
    ]  # fmt: skip
    if not library:
        argv.append("--no-library")
    result, rows = _throughput(argv)
    missing = sorted(set(methods) - {r["method"] for r in rows})
    return {
        "ok": not missing,
        "missing": missing,
        "result": f"{name}.json",
        "checks": result["checks"],
        "summary": _method_rows(rows, model.removeprefix("timm:"), 5),
    }


def step_cams(profile: Profile, device: torch.device, output: Path) -> dict[str, Any]:
    return _method_step(profile, device, output, "cams", profile.cams, profile.cam_batch)


def step_input_gradients(profile: Profile, device: torch.device, output: Path) -> dict[str, Any]:
    return _method_step(
        profile, device, output, "input_gradients", INPUT_GRADIENTS, profile.gradient_batch,
        expensive=True,
    )  # fmt: skip


def step_perturbation(profile: Profile, device: torch.device, output: Path) -> dict[str, Any]:
    return _method_step(
        profile, device, output, "perturbation", PERTURBATION, profile.perturbation_batch,
        library=False, expensive=True,
    )  # fmt: skip


def step_score_cams(profile: Profile, device: torch.device, output: Path) -> dict[str, Any]:
    from benchmarks import score_cam_throughput

    result = score_cam_throughput.main(
        [
            "--model", profile.cnn, "--layer", "layer4",
            "--image-size", str(profile.image_size),
            "--batch-size", str(profile.perturbation_batch),
            "--forward-batch", str(profile.score_forward_batch),
            "--classes", "5", "--repeats", "1", "--device", str(device),
            "--output", str(output / "score_cams.json"),
        ]
    )  # fmt: skip
    summary = []
    for row in result["rows"]:
        item = f"{profile.cnn} {row['method']} ({row['implementation']})"
        summary += [
            {"item": item, "figure": "maps/s K=1", "value": row["images_per_s_1_class"]},
            {"item": item, "figure": "maps/s K=5", "value": 5 * row["images_per_s_k_classes"]},
        ]
    return {"ok": True, "result": "score_cams.json", "checks": result["checks"],
            "summary": summary}  # fmt: skip


def step_vit(profile: Profile, device: torch.device, output: Path) -> dict[str, Any]:
    from benchmarks import caap_throughput

    step = _method_step(
        profile, device, output, "vit", ["grad_cam", "attention_rollout"], profile.cam_batch,
        model=profile.vit, layer="blocks.11.norm1",
        image_size=profile.vit_image_size,
    )  # fmt: skip
    caap = caap_throughput.main(
        [
            "--model", profile.vit.removeprefix("timm:"),
            "--image-size", str(profile.vit_image_size),
            "--batch-size", str(max(1, profile.perturbation_batch)),
            "--classes", "5", "--repeats", str(profile.repeats), "--loop-repeats", "1",
            "--device", str(device), "--output", str(output / "caap.json"),
        ]
    )  # fmt: skip
    vit_name = profile.vit.removeprefix("timm:")
    for row in caap["variants"]:
        step["summary"].append(
            {"item": f"{vit_name} caap {row['variant']}", "figure": "images/s K=5",
             "value": row["images_per_s"]}
        )  # fmt: skip
    step["checks"] = {**step["checks"], **caap["checks"]}
    return step


def step_metrics(profile: Profile, device: torch.device, output: Path) -> dict[str, Any]:
    from benchmarks import metrics_throughput

    result = metrics_throughput.main(
        [
            "--model", profile.cnn, "--image-size", str(profile.image_size),
            "--images", str(profile.metric_images),
            "--batch-sizes", *map(str, profile.metric_batch_sizes),
            "--metric-batch-size", str(max(profile.metric_batch_sizes)),
            "--device", str(device), "--output", str(output / "metrics.json"),
        ]
    )  # fmt: skip
    summary = [
        {"item": f"{profile.cnn} {row['metric']}", "figure": "ms/image",
         "value": 1000 / row["images_per_s"]}
        for row in result["metrics"]
    ]  # fmt: skip
    for row in result["deletion_insertion"]:
        summary.append(
            {"item": f"{profile.cnn} deletion+insertion, batch {row['forward_batch_size']}",
             "figure": "ms/image", "value": 1000 / row["images_per_s"]}
        )  # fmt: skip
    return {"ok": True, "result": "metrics.json", "summary": summary}


def step_study(profile: Profile, device: torch.device, output: Path) -> Job:
    from benchmarks.fabricated_imagenet import S_CLASSES, fabricate_imagenet_val

    folder = output / "study"
    folder.mkdir(parents=True, exist_ok=True)
    # images and run outputs (parquet, plots) stay out of the repository: a temp folder,
    # reused by later runs of the same size; GPU_SUITE_WORK overrides it
    work = Path(os.environ.get("GPU_SUITE_WORK", Path(tempfile.gettempdir()) / "gpu_suite"))
    data_root = work / f"imagenet-{profile.study_images}"
    run_dir = work / "outputs" / "class-sensitivity"
    start = time.perf_counter()
    # a small train split for the holdout confusion matrix: one image for each of the first
    # classes (random-init model, so the matrix only has to be computed the way a real one is)
    train_images = max(16, profile.study_images // 10)
    fabricate_imagenet_val(data_root, profile.study_images, train_images=train_images)
    fabricate_s = time.perf_counter() - start
    timer_file = folder / "loops.json"
    timer_file.unlink(missing_ok=True)
    import yaml

    # the study's methods without oracle_part: ImageNet-S gives object masks, no part masks
    study_methods = yaml.safe_load(Path(STUDY_CONFIG).read_text())["evaluation"]["methods"]
    methods = [method for method in study_methods if method != "oracle_part"]
    overrides = {
        "model": {"model_name": profile.study_model, "num_classes": 1000, "pretrained": False},
        "data": {
            "class_path": "datamodules.ImageNetDataModule",
            "init_args": {
                "root": str(data_root),
                "imagenet_s_root": str(data_root / "imagenet-s"),
                "imagenet_s_split": S_CLASSES,
                "transform": {
                    "image_size": profile.study_image_size,
                    "resize_size": profile.study_resize_size,
                    "train_augment": False,
                },
                "batch_size": profile.study_batch,
                "num_workers": profile.study_workers,
            },
        },
        "trainer": {
            "accelerator": "gpu" if device.type == "cuda" else "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "benchmarks.study_timer.StudyTimer",
                    "init_args": {"output": str(timer_file)},
                }
            ],
        },
        "evaluation": {
            # every image of the folder; CASE's confusion matrix from a held-out sample of
            # the train split, as the ImageNet configs compute it for a pretrained model (the
            # val split is the explained one); the data has object masks but no part masks
            "sample_size": None,
            "confusion_matrix": "holdout",
            "confusion_holdout_per_class": 1,
            "methods": methods,
            # a random-init network classifies almost nothing correctly: explain every image
            "correct_only": False,
            "metrics": [
                "feature_agreement",
                {
                    "name": "energy_pointing_game",
                    "label": "object_energy",
                    "kwargs": {"mask_key": "mask"},
                },
            ],
        },
        "output_dir": str(run_dir.parent),
        "run_name": "class-sensitivity",
        "wandb": {"mode": "disabled"},
    }
    if profile.study_sanity_check is not None:
        overrides["evaluation"]["sanity_check"] = profile.study_sanity_check
    if profile.study_gallery is not None:
        overrides["evaluation"]["gallery_size"] = profile.study_gallery
    override_file = folder / "overrides.yaml"
    override_file.write_text(json.dumps(overrides, indent=2) + "\n")  # JSON is YAML
    command = [
        sys.executable, "evaluate.py", "--config", STUDY_CONFIG, "--config", str(override_file),
    ]  # fmt: skip

    def finish(completed: subprocess.CompletedProcess, wall_s: float) -> dict[str, Any]:
        if completed.returncode != 0 or not timer_file.is_file():
            return {"ok": False, "command": " ".join(command), "returncode": completed.returncode,
                    "output_tail": completed.stdout[-4000:]}  # fmt: skip
        loops = json.loads(timer_file.read_text())
        images = loops["test"]["samples"]
        per_image_s = sum(loops[loop]["seconds"] for loop in ("validate", "test") if loop in loops)
        fixed_s = wall_s - per_image_s
        projected_s = fixed_s + per_image_s / images * IMAGENET_VAL_IMAGES
        for name in ("summary.csv", "stats.csv", "report.md"):  # the study's tables
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, folder / name)
        result = {
            "ok": images == profile.study_images and (folder / "summary.csv").is_file(),
            "run_directory": str(run_dir),
            "command": " ".join(command),
            "config": STUDY_CONFIG,
            "overrides": overrides,
            "images": images,
            "fabricate_seconds": fabricate_s,
            "wall_seconds": wall_s,
            "loops": loops,
            "fixed_seconds": fixed_s,
            "images_per_s_whole_study": images / wall_s,
            "images_per_s_loops": images / per_image_s,
            "projected_seconds_imagenet_val": projected_s,
            "projection": (
                f"fixed cost + {IMAGENET_VAL_IMAGES} × (validation + test loop time per "
                "image); the validation pass (CASE's confusion matrix) runs on the same images"
            ),
            "output_tail": completed.stdout[-3000:],
        }
        write_json(result, output / "study.json")
        item = f"study {profile.study_model} {images} images"
        result["summary"] = [
            {"item": item, "figure": "images/s (whole)", "value": result["images_per_s_whole_study"]},
            {"item": item, "figure": "images/s (loops)", "value": result["images_per_s_loops"]},
            {"item": "study projected ImageNet val (50k)", "figure": "minutes",
             "value": projected_s / 60},
        ]  # fmt: skip
        return result

    return Job(command, int(2 * profile.budgets.get("study", 60)) + 60, finish)


STEP_FUNCTIONS: dict[str, Callable[[Profile, torch.device, Path], dict[str, Any] | Job]] = {
    "tests": step_tests,
    "cams": step_cams,
    "study": step_study,
    "metrics": step_metrics,
    "score_cams": step_score_cams,
    "vit": step_vit,
    "input_gradients": step_input_gradients,
    "perturbation": step_perturbation,
}


# ----------------------------------------------------------------------------- helpers
class Job:
    """A step's subprocess (``pytest``, ``evaluate.py``): ``command``, a ``timeout`` and
    ``finish(completed, wall_seconds) -> step result``. :meth:`start` launches it in the
    repository root (stdout and stderr to ``log``); a thread records when it ends, so its wall
    time is right even when the suite collects it later (concurrent CPU mode)."""

    def __init__(
        self,
        command: list[str],
        timeout: int,
        finish: Callable[..., dict[str, Any]],
        environment: dict[str, str] | None = None,
    ) -> None:
        self.command, self.timeout, self.finish = command, timeout, finish
        self.environment = environment or {}

    def start(self, log: Path, threads: int | None) -> Job:
        environment_ = os.environ | {"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        environment_ |= self.environment
        if threads is not None:
            environment_ |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = log
        self._log_file = log.open("w")
        self._start = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=environment_, stdout=self._log_file,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.timed_out = False
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._waiter.start()
        return self

    def started_after(self, moment: float) -> float:
        """Seconds between ``moment`` and the launch (e.g. the study's fabrication)."""
        return self._start - moment

    def _wait(self) -> None:
        try:
            self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.process.kill()
            self.process.wait()
        self.wall_s = time.perf_counter() - self._start

    def result(self) -> dict[str, Any]:
        self._waiter.join()
        self._log_file.close()
        stdout = self.log.read_text()
        if self.timed_out:
            stdout += f"\n[timed out after {self.timeout} s]"
        completed = subprocess.CompletedProcess(self.command, self.process.returncode, stdout)
        result = self.finish(completed, self.wall_s)
        result["log"] = str(self.log)
        return result


def _junit_counts(report: Path) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if not report.is_file():
        return counts
    for suite in ElementTree.parse(report).getroot().iter("testsuite"):
        total = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts["failed"] += failed
        counts["skipped"] += skipped
        counts["passed"] += total - failed - skipped
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps and sizes")
    parser.add_argument("--output", default="benchmarks/results/gpu", help="JSON folder")
    parser.add_argument("--steps", nargs="*", choices=STEPS, default=None, help="default: all")
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds: do not start a step whose budget would end later (a fixed GPU window); "
        "such steps are recorded as not run and the exit status is 1",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_suite: --device cuda but CUDA is not available here (torch "
            f"{torch.__version__}); run on a GPU machine or pass --device cpu --quick",
            file=sys.stderr,
        )
        return 2
    profile = profile_for(device, args.quick)
    if profile.threads is not None:
        torch.set_num_threads(profile.threads)
    steps = args.steps or list(QUICK_STEPS if args.quick else STEPS)
    output = Path(args.output)
    if not output.is_absolute():
        output = REPO / output
    output.mkdir(parents=True, exist_ok=True)
    suite: dict[str, Any] = {
        "suite": "gpu_suite",
        "device": str(device),
        "quick": args.quick,
        "profile": dataclasses.asdict(profile),
        "environment": environment(device),
        "load_average_1min": {"before": load_average()},
        "concurrent": profile.concurrent,
        "steps": {},
    }
    start = time.perf_counter()
    pending: dict[str, tuple[Job, float]] = {}

    def record(name: str, result: dict[str, Any], seconds: float) -> None:
        result["seconds"] = seconds
        result["budget_seconds"] = profile.budgets.get(name)
        suite["steps"][name] = result
        suite["steps"] = {n: suite["steps"][n] for n in STEPS if n in suite["steps"]}
        suite["seconds"] = time.perf_counter() - start
        suite["load_average_1min"]["after"] = load_average()
        write_json(suite, output / "suite.json")

    try:
        _run_steps(steps, profile, device, output, pending, record, args.deadline)
    finally:  # interrupted: stop the subprocesses this run started
        for job, _ in pending.values():
            if job.process.poll() is None:
                job.process.kill()
    suite["ok"] = all(step["ok"] for step in suite["steps"].values())
    write_json(suite, output / "suite.json")
    _print_summary(suite, output)
    return 0 if suite["ok"] else 1


def _run_steps(steps, profile, device, output, pending, record, deadline) -> None:
    """Run ``steps`` in order; subprocess steps of a concurrent profile are collected last.
    A step whose budget would end after ``deadline`` (seconds from now) is not started."""
    start = time.perf_counter()
    for name in steps:
        print(f"\n=== {name} ===", flush=True)
        step_start = time.perf_counter()
        budget = profile.budgets.get(name, 0.0)
        if deadline is not None and step_start - start + budget > deadline:
            reason = f"not started: {step_start - start:.0f} s + budget {budget:.0f} s > --deadline {deadline:.0f} s"
            print(f"  {reason}", flush=True)
            record(name, {"ok": False, "not_run": reason}, 0.0)
            continue
        try:
            result = STEP_FUNCTIONS[name](profile, device, output)
            if isinstance(result, Job):
                result.start(output / f"{name}.log", profile.threads)
                print(f"  {' '.join(result.command)}  (log: {result.log})", flush=True)
                if profile.concurrent:
                    pending[name] = (result, step_start)
                    continue
                result = result.result()
        except Exception as error:  # one failing step must not cost the rest of the window
            result = _failure(error)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        record(name, result, time.perf_counter() - step_start)
    for name, (job, step_start) in pending.items():
        try:
            result = job.result()
        except Exception as error:
            result = _failure(error)
        record(name, result, job.wall_s + job.started_after(step_start))


def _failure(error: Exception) -> dict[str, Any]:
    result = {"ok": False, "error": f"{type(error).__name__}: {error}",
              "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
    print(result["traceback"], file=sys.stderr)
    return result


def _print_summary(suite: dict[str, Any], output: Path) -> None:
    rows = []
    for name, step in suite["steps"].items():
        rows.append(
            {"step": name, "item": "status",
             "figure": "NOT RUN" if "not_run" in step else "PASS" if step["ok"] else "FAIL",
             "value": step["seconds"], "budget_s": step["budget_seconds"]}
        )  # fmt: skip
        for row in step.get("summary", []):
            rows.append({"step": name, **row})
    load = suite["load_average_1min"]
    environment_ = suite["environment"]
    device = environment_.get("gpu", f"CPU ({environment_['cpu_threads']} threads)")
    print(
        f"\ngpu_suite on {device}, {'quick' if suite['quick'] else 'full'}: "
        f"{suite['seconds']:.0f} s; 1-min load average {load['before']:.1f} → "
        f"{load['after']:.1f} (status rows: value = seconds)"
    )
    print_table(rows, ["step", "item", "figure", "value", "budget_s"])
    print(f"{'PASS' if suite['ok'] else 'FAIL'}  wrote {output / 'suite.json'}")


if __name__ == "__main__":
    sys.exit(main())
