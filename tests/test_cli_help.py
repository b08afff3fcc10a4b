"""``--help`` of both console scripts, as a newcomer sees it: plain text, and every argument explained."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = ("deepfake", "deepfake-pipeline")  # pyproject.toml's [project.scripts], as installed here
SECTION = re.compile(r"^[a-z][a-z ]*:$")  # "options:", "positional arguments:"
MARKUP = re.compile(r"``|:(class|mod|func|meth|data|attr):`")  # reST that belongs in docstrings only


def help_page(*argv: str) -> str:
    result = subprocess.run([str(Path(sys.executable).parent / argv[0]), *argv[1:], "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def arguments(page: str) -> list[tuple[int, str, str]]:
    """(indent, name, help) of each argument listed in an argparse help page; help "" when it has none.

    Arguments start 2 spaces in (subcommands 4); help wrapped onto further lines is indented more.
    """
    found: list[list] = []
    in_section = False
    for line in page.splitlines():
        if SECTION.match(line):
            in_section = True
        elif in_section and line.strip():
            indent = len(line) - len(line.lstrip())
            if indent <= 4:
                name, _, help_ = line.strip().partition("  ")
                found.append([indent, name, help_.strip()])
            else:
                found[-1][2] = f"{found[-1][2]} {line.strip()}".strip()
    return [tuple(entry) for entry in found]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_help_page_is_plain_and_explains_every_argument(script: str) -> None:
    top = help_page(script)
    commands = [name for indent, name, _ in arguments(top) if indent == 4]
    assert commands, top
    for argv, page in [((script,), top), *(((script, c), help_page(script, c)) for c in commands)]:
        assert not MARKUP.search(page), f"{' '.join(argv)} --help shows docstring markup:\n{page}"
        listed = arguments(page)
        assert listed, page
        unexplained = [name for _, name, help_ in listed if not help_]
        assert not unexplained, f"{' '.join(argv)} --help: no help for {unexplained}:\n{page}"


@pytest.mark.parametrize("argv, option", [(("deepfake", "predict"), "--out"),
                                          (("deepfake-pipeline", "compile"), "--out"),
                                          (("deepfake-pipeline", "submit"), "--package")])
def test_generated_files_default_to_git_ignored_folders(argv: tuple[str, str], option: str) -> None:
    """What a command writes (or reads back) by default stays out of `git status`."""
    helps = {name.split()[0].rstrip(","): help_ for _, name, help_ in arguments(help_page(*argv))}
    default = re.search(r"\(default: ([^,)\s]+)", helps[option])[1]
    assert "/" in default, f"{default} is in the repository root"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--quiet", default], cwd=ROOT, timeout=60)
    assert ignored.returncode == 0, f"{' '.join(argv)} {option} defaults to {default}, which git does not ignore"
