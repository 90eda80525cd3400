"""Every ``uv run python …`` command that README.md, docs/ and the comments of configs/ show,
turned into an argument list the entry point can parse in this process.

Where commands are found:
- Markdown: code blocks and inline code; ``\\`` continues a line; a command ends at the end of
  its line or its inline-code span; a trailing ``# comment`` is dropped.
- YAML comments: a comment line holding ``uv run python``; it continues on the next comment
  line when it ends in ``\\`` or when that line is indented further and starts with ``--`` or
  ``[--``. A fragment ``... <arguments>`` continues the file's own command:
  ``uv run python <entry> --config <this file> <arguments>``.

How placeholders become something that parses:
- ``{a,b}`` (no spaces) and ``<a|b>`` expand into one command per alternative;
- ``[--flag ...]`` optional groups are included, or dropped when they hold a bare ``...``;
- a ``<placeholder>`` in a path under ``configs/`` is a wildcard over the existing files
  (``linear_probe_<dataset>_clip.yaml`` → every matching config); elsewhere it becomes a
  fabricated name (``outputs/<run>/…`` → ``outputs/placeholder-run/…``);
- dataset roots ``/data/…`` and ``/path/to/…`` move under :data:`ROOT` (a temporary folder the
  test fabricates); a bare ``...`` argument is dropped;
- a ``--config`` file outside ``configs/`` that does not exist (``my_experiment.yaml``,
  ``outputs/<run>/config.yaml``) is a user's file: the test writes a minimal one.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT = "{ROOT}"  # replaced by the test's fabricated folder
COMMAND = "uv run python"
_ALTERNATIVES = re.compile(r"\{([^{}\s:]*,[^{}\s:]*)\}|<([^<>\s]*\|[^<>\s]*)>")
_PLACEHOLDER = re.compile(r"<([^<>|]+)>")
_DATASET_ROOTS = ("/data/", "/path/to/")


@dataclass(frozen=True)
class DocumentedCommand:
    """One command as documented (``text``) and where (``source``: file and line)."""

    source: str
    text: str

    @property
    def kind(self) -> str:
        """``train.py``, ``evaluate.py``, ``experiments.<name>`` or what else follows python."""
        words = self.text.split()
        target = words[3] if len(words) > 3 else ""
        if target == "-m":
            return words[4] if len(words) > 4 else "-m"
        return target

    def variants(self) -> list[list[str]]:
        """The argument lists (after the script or module) of every expansion."""
        return [_arguments(text) for text in _expand(self.text)]


def collect(repo: Path = REPO) -> list[DocumentedCommand]:
    """Every documented command of the README, docs/ and the configs' comments."""
    commands = []
    for path in [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]:
        commands += _markdown_commands(path, repo)
    for path in sorted((repo / "configs").rglob("*.yaml")):
        commands += _comment_commands(path, repo)
    return commands


# ------------------------------------------------------------------------------ finding


def _markdown_commands(path: Path, repo: Path) -> list[DocumentedCommand]:
    found = []
    lines = path.read_text().splitlines()
    number = 0
    while number < len(lines):
        first = number
        line = lines[number]
        while line.rstrip().endswith("\\") and number + 1 < len(lines):
            number += 1
            line = line.rstrip()[:-1] + " " + lines[number].strip()
        for match in re.finditer(re.escape(COMMAND) + r"[^`\n]*", line):
            text = _strip_comment(match.group(0))
            found.append(DocumentedCommand(f"{path.relative_to(repo)}:{first + 1}", text))
        number += 1
    return found


def _comment_commands(path: Path, repo: Path) -> list[DocumentedCommand]:
    lines = path.read_text().splitlines()
    comments = {
        number: line.split("#", 1)[1]
        for number, line in enumerate(lines)
        if line.lstrip().startswith("#")
    }
    found: list[DocumentedCommand] = []
    relative = path.relative_to(repo).as_posix()
    for number, content in comments.items():
        stripped = content.strip()
        fragment = stripped.startswith("... ")
        if COMMAND not in content and not fragment:
            continue
        indent = len(content) - len(content.lstrip())
        text = stripped
        following = number + 1
        while following in comments:
            next_content = comments[following]
            next_indent = len(next_content) - len(next_content.lstrip())
            continued = text.endswith("\\")
            hanging = next_indent > indent and next_content.lstrip().startswith(("--", "[--"))
            if not (continued or hanging):
                break
            text = text.removesuffix("\\").rstrip() + " " + next_content.strip()
            following += 1
        if fragment:
            text = f"{COMMAND} {_entry_of(relative, found, path)} --config {relative} {text[4:]}"
        else:
            text = text[text.index(COMMAND) :]
        found.append(DocumentedCommand(f"{relative}:{number + 1}", _strip_comment(text)))
    return found


def _entry_of(relative: str, earlier: list[DocumentedCommand], path: Path) -> str:
    """The entry point a ``...`` fragment continues: that of the file's own command, else
    ``evaluate.py`` for a config with an ``evaluation:`` key, else ``train.py``."""
    for command in reversed(earlier):
        if f"--config {relative}" in command.text:
            return command.kind
    has_evaluation = re.search(r"^evaluation:", path.read_text(), flags=re.MULTILINE)
    return "evaluate.py" if has_evaluation else "train.py"


def _strip_comment(text: str) -> str:
    """Without a trailing ``# comment`` and the punctuation of the sentence around it."""
    text = re.split(r"\s#(?:\s|$)", text, maxsplit=1)[0].strip()
    while text and (text[-1] in ".,;:" or (text[-1] == ")" and text.count(")") > text.count("("))):
        text = text[:-1].rstrip()
    return text


# ---------------------------------------------------------------------------- expanding


def _expand(text: str) -> list[str]:
    match = _ALTERNATIVES.search(text)
    if match is None:
        return [text]
    options = (match.group(1) or "").split(",") if match.group(1) else match.group(2).split("|")
    return [
        expanded
        for option in options
        for expanded in _expand(text[: match.start()] + option + text[match.end() :])
    ]


def _arguments(text: str) -> list[str]:
    """The arguments after ``uv run python <script>`` or ``uv run python -m <module>``."""
    text = _PLACEHOLDER.sub(lambda m: "<" + re.sub(r"\W+", "-", m.group(1)) + ">", text)
    tokens = shlex.split(text)[3:]
    tokens = tokens[2:] if tokens[:1] == ["-m"] else tokens[1:]
    tokens = _optional_groups(tokens)
    arguments = []
    for index, token in enumerate(tokens):
        if token == "...":
            continue
        previous = tokens[index - 1] if index else ""
        arguments.append(_substitute(token, previous))
    return arguments


def _optional_groups(tokens: list[str]) -> list[str]:
    """``[--flag value ...]`` groups included (brackets removed), or dropped with a ``...``."""
    kept: list[str] = []
    group: list[str] | None = None
    for token in tokens:
        if group is None and token.startswith("[--"):
            group, token = [], token[1:]
        if group is None:
            kept.append(token)
            continue
        closing = token.endswith("]")
        group.append(token[:-1] if closing else token)
        if closing:
            if "..." not in group:
                kept += [part for part in group if part]
            group = None
    return kept


def _substitute(token: str, previous: str) -> str:
    if token.startswith(_DATASET_ROOTS):
        prefix = next(root for root in _DATASET_ROOTS if token.startswith(root))
        token = f"{ROOT}/data/{token.removeprefix(prefix)}"
    if "<" not in token:
        return token
    if token.startswith("configs/"):
        return token  # a wildcard over config files: see config_variants
    return _PLACEHOLDER.sub(lambda m: f"placeholder-{m.group(1)}", token)


def config_variants(arguments: list[str], repo: Path = REPO) -> list[list[str]]:
    """One argument list per existing config file matching each ``configs/…<x>…`` wildcard
    (none matching: the argument is kept, and the parser will say the file is missing)."""
    choices = []
    for argument in arguments:
        if argument.startswith("configs/") and "<" in argument:
            pattern = _PLACEHOLDER.sub("*", argument)
            matches = sorted(p.relative_to(repo).as_posix() for p in repo.glob(pattern))
            choices.append(matches or [argument])
        else:
            choices.append([argument])
    return [list(combination) for combination in itertools.product(*choices)]
