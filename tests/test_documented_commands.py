"""Every command the README, docs/ and the configs' comments show parses as written.

``train.py`` / ``evaluate.py`` commands run through their CLI parser with ``--print_config``
(in this process: a subprocess per command would cost a cold import each), with fabricated
dataset roots and placeholder paths (:mod:`tests.documented_commands`); ``python -m
experiments.*`` commands run with ``--help`` and every flag they use must be in that help.
A documented command that no longer parses fails here.
"""

from __future__ import annotations

import importlib
import re

import pytest

import evaluate
import train
from tests.documented_commands import REPO, ROOT, collect, config_variants

COMMANDS = collect()
ENTRY_POINTS = {"train.py": train, "evaluate.py": evaluate}
# Documented commands that are not the project's CLIs (a one-off snippet, throughput scripts).
NOT_PARSED = ("-c", "benchmarks/")


def _runnable(command) -> bool:
    return command.kind in ENTRY_POINTS or command.kind.startswith("experiments.")


def test_the_documentation_shows_the_commands_this_test_runs():
    kinds = {command.kind for command in COMMANDS}
    others = sorted(k for k in kinds if not k.startswith(("experiments.", *NOT_PARSED)))
    assert set(others) <= set(ENTRY_POINTS), f"commands this test does not know: {others}"
    readme = {c.kind for c in COMMANDS if c.source.startswith("README.md")}
    assert {"train.py", "evaluate.py"} <= readme
    assert any(kind.startswith("experiments.") for kind in readme)
    assert sum(map(_runnable, COMMANDS)) >= 20


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    """A folder standing in for dataset roots and users' files."""
    return tmp_path_factory.mktemp("documented")


def _prepare(arguments: list[str], root) -> list[str]:
    arguments = [argument.replace(ROOT, str(root)) for argument in arguments]
    for position in range(1, len(arguments)):
        value = arguments[position]
        if arguments[position - 1] == "--config" and not value.startswith("configs/"):
            # a user's own file (my_experiment.yaml, outputs/<run>/config.yaml)
            path = root / "user" / value
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("seed_everything: 0\n")
            arguments[position] = str(path)
    return arguments


@pytest.mark.parametrize(
    "command", [c for c in COMMANDS if _runnable(c)], ids=lambda c: f"{c.source} {c.kind}"
)
def test_documented_command_parses(command, fabricated, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    variants = [v for documented in command.variants() for v in config_variants(documented)]
    for arguments in variants:
        arguments = _prepare(arguments, fabricated)
        if command.kind in ENTRY_POINTS:
            code, printed = _print_config(command.kind, arguments, capsys)
            assert code in (0, None), (
                f"{command.source}: {command.text}\nparsed as {arguments}\n{printed.err[-2000:]}"
            )
            assert ("usage:" if "--help" in arguments else "trainer:") in printed.out
        else:
            _check_experiment(command, arguments, capsys)


def _print_config(kind: str, arguments: list[str], capsys):
    """Exit code and captured output of ``<kind> *arguments --print_config``."""
    with pytest.raises(SystemExit) as exit_info:
        ENTRY_POINTS[kind].main([*arguments, "--print_config"])
    return exit_info.value.code, capsys.readouterr()


def test_a_broken_documented_command_is_found_and_fails(tmp_path, capsys, monkeypatch):
    """The collection finds continued lines and ``...`` fragments, and a command with an
    unknown option does not parse (so this test can fail)."""
    (tmp_path / "configs" / "evaluate").mkdir(parents=True)
    (tmp_path / "configs" / "data").mkdir()
    (tmp_path / "configs" / "data" / "shapes.yaml").write_text(
        (REPO / "configs" / "data" / "shapes.yaml").read_text()
    )
    (tmp_path / "README.md").write_text(
        "```bash\nuv run python evaluate.py --evaluation.gallery_size 2 \\\n"
        "    --evaluation.galery_size 3   # a typo\n```\n"
    )
    (tmp_path / "configs" / "evaluate" / "study.yaml").write_text(
        "#   uv run python evaluate.py --config configs/evaluate/study.yaml\n"
        "#   ... --data configs/data/shapes.yaml\n"
        "#       --data.batch_sise 3\n"
        "evaluation:\n  gallery_size: 1\n"
    )
    found = {c.source: c for c in collect(tmp_path)}
    assert set(found) == {
        "README.md:2",
        "configs/evaluate/study.yaml:1",
        "configs/evaluate/study.yaml:2",
    }
    typo = found["README.md:2"]
    assert typo.variants() == [["--evaluation.gallery_size", "2", "--evaluation.galery_size", "3"]]
    fragment = found["configs/evaluate/study.yaml:2"]
    assert fragment.kind == "evaluate.py"
    assert fragment.variants() == [[
        "--config", "configs/evaluate/study.yaml", "--data", "configs/data/shapes.yaml",
        "--data.batch_sise", "3",
    ]]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    whole = found["configs/evaluate/study.yaml:1"]
    assert _print_config("evaluate.py", whole.variants()[0], capsys)[0] in (0, None)
    for broken, unknown in ((typo, "galery_size"), (fragment, "batch_sise")):
        code, printed = _print_config("evaluate.py", broken.variants()[0], capsys)
        assert code not in (0, None) and unknown in printed.err


def _check_experiment(command, arguments: list[str], capsys) -> None:
    """``--help`` after the command's own arguments (those before ``--``): it exits 0, and
    every ``--flag`` the documentation gives is one the help lists."""
    try:
        module = importlib.import_module(command.kind)
    except ModuleNotFoundError as error:
        pytest.fail(f"{command.source}: {command.text}: {error}")
    own = arguments[: arguments.index("--")] if "--" in arguments else arguments
    with pytest.raises(SystemExit) as exit_info:
        module.main([*own, "--help"])
    printed = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{command.source}: {printed.err[-2000:]}"
    listed = set(re.findall(r"--[\w.-]+", printed.out))
    unknown = [flag for flag in own if flag.startswith("--") and flag not in listed]
    assert not unknown, f"{command.source}: {command.text}: unknown flags {unknown}"
