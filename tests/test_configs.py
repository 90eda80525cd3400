"""Every shipped YAML config parses against the entry point it belongs to."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import evaluate
import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TRAIN_CONFIGS = sorted(
    p for folder in ("data", "model", "trainer") for p in (CONFIGS / folder).glob("*.yaml")
)
EVALUATE_CONFIGS = sorted((CONFIGS / "evaluate").glob("*.yaml"))


@pytest.mark.parametrize(
    ("entry", "config"),
    [(train, p) for p in TRAIN_CONFIGS] + [(evaluate, p) for p in EVALUATE_CONFIGS],
    ids=lambda value: value.name if isinstance(value, Path) else value.__name__,
)
def test_config_parses(entry, config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path" in printed and "trainer:" in printed


def test_a_config_with_an_unknown_key_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  init_args:\n    batch_sise: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(bad), "--print_config"])
    assert exit_info.value.code not in (0, None)
    assert "batch_sise" in capsys.readouterr().err


DATA_CONFIGS = sorted((CONFIGS / "data").glob("*.yaml"))


@pytest.mark.parametrize("entry", [train, evaluate], ids=lambda e: e.__name__)
@pytest.mark.parametrize("config", DATA_CONFIGS, ids=lambda p: p.name)
def test_every_data_config_works_with_the_data_flag(entry, config, capsys):
    """LightningCLI's form (``class_path``/``init_args`` at the top) given with ``--data``,
    then one of its arguments overridden; ``--config`` of the same files is tested above."""
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["--data", str(config), "--data.batch_size", "3", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    class_path = yaml.safe_load(config.read_text())["class_path"]
    assert f"class_path: {class_path}" in printed and "batch_size: 3" in printed


def test_group_files_are_routed_to_the_flag_their_form_needs(tmp_path):
    from lightning_modules.group_files import route_group_files

    wrapped = tmp_path / "wrapped.yaml"  # a user's file in the older form, {data: {...}}
    wrapped.write_text("data:\n  class_path: datamodules.ShapesDataModule\n")
    data = str(CONFIGS / "data" / "cub.yaml")
    routed = route_group_files(
        ["--config", data, f"--data={wrapped}", "--data", "ShapesDataModule", "--seed", "3"]
    )
    assert routed == [
        "--data", data, "--config", str(wrapped), "--data", "ShapesDataModule", "--seed", "3",
    ]  # fmt: skip
