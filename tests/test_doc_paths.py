"""Docs name only what the repository has: every repository path, Markdown file or absolute path that a Markdown
file, a docstring or a comment names exists inside the repository. String literals are code, not docs, and are
not read (tests build made-up trees from them)."""
from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("bench", "sahn", "baselines", "pipelines", "reports", "tests", "docs", ".ci")
# A path into one of the repository's own folders, e.g. docs/protocol.md or pipelines/presets/.
REPOSITORY_PATH = re.compile(r"(?<![\w./-])(?:%s)/[\w./*-]*[\w*/]" % "|".join(re.escape(f) for f in TOP_FOLDERS))
MARKDOWN_NAME = re.compile(r"(?<![\w/.-])[\w-]+\.md\b")
# A path of the machine the project is developed on, outside the checkout (examples of a user's own paths, such
# as ``--datasets celeba:/data/celeba``, are the user's and not checked).
OUTSIDE_PATH = re.compile(r"(?<![\w.:/])(?:/work/[\w./-]*[\w/]|\.\./shared\b[\w./-]*|shared/docs/[\w./-]*[\w/])")


# The target of a relative Markdown link: [text](../docs/protocol.md#section) gives ../docs/protocol.md.
MARKDOWN_LINK = re.compile(r"\]\(([^()\s#]+)(?:#[^()\s]*)?\)")


def tracked_files() -> list[Path]:
    """The repository's files: tracked ones and new ones git does not ignore (they are committed with the change
    that adds them)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPOSITORY,
                            capture_output=True, text=True, check=True)
    return [REPOSITORY / name for name in dict.fromkeys(listed.stdout.split("\0")) if name]


def prose_of_python(source: str) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a module."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring and node.body:
                found.append((node.body[0].lineno, docstring))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
    return found


def prose(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return prose_of_python(text)
    return [(number, line) for number, line in enumerate(text.splitlines(), 1)]


def exists(name: str, root: Path) -> bool:
    name = name.rstrip(".")
    return any(root.glob(name)) if "*" in name else (root / name).exists()


def markdown_outputs(files: list[Path]) -> set[str]:
    """The Markdown files the code writes (``report.md``): string literals, not docs."""
    names = set()
    for path in files:
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    names.update(MARKDOWN_NAME.findall(node.value))
    return names


def missing_paths(files: list[Path], root: Path) -> list[str]:
    markdown_names = {path.name for path in root.rglob("*.md")} | markdown_outputs(files)
    found = []
    for path in files:
        relative = path.relative_to(root).as_posix()
        for line, text in prose(path):
            for match in REPOSITORY_PATH.findall(text):
                if not exists(match, root):
                    found.append(f"{relative}:{line} names {match}, which the repository does not have")
            for match in MARKDOWN_NAME.findall(text):
                if match not in markdown_names:
                    found.append(f"{relative}:{line} names {match}, which the repository does not have")
            for match in OUTSIDE_PATH.findall(text):
                found.append(f"{relative}:{line} names {match}, a path outside the repository")
            if path.suffix == ".md":
                for target in MARKDOWN_LINK.findall(text):
                    if "://" in target or target.startswith("mailto:"):
                        continue
                    if not (path.parent / target).resolve().is_relative_to(root.resolve()):
                        found.append(f"{relative}:{line} links to {target}, a path outside the repository")
                    elif not (path.parent / target).exists():
                        found.append(f"{relative}:{line} links to {target}, which the repository does not have")
    return found


def documented_files() -> list[Path]:
    return [path for path in tracked_files() if path.suffix in (".md", ".py") and path.is_file()]


def test_every_path_the_docs_name_is_in_the_repository():
    found = missing_paths(documented_files(), REPOSITORY)
    assert not found, "docs name paths the repository does not have:\n" + "\n".join(found)


def test_the_check_finds_missing_and_outside_paths_but_not_literals(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "protocol.md").write_text("The protocol; see notes.md and docs/protocol.md.\n"
                                                   "[same](protocol.md), [gone](../bench/gone.py#top), "
                                                   "[outside](../../etc/hosts), [web](https://example.org/a.md)\n")
    made_up = tmp_path / "made_up.py"
    made_up.write_text('"""See bench/no_such_room/x.py, docs/protocol.md and /work/shared/docs/protocol.md."""\n'
                       'value = "bench/also_missing.py"  # a literal is code; see docs/nowhere.md\n')
    found = missing_paths([made_up, tmp_path / "docs" / "protocol.md"], tmp_path)
    assert sorted(found) == [
        "docs/protocol.md:1 names notes.md, which the repository does not have",
        "docs/protocol.md:2 links to ../../etc/hosts, a path outside the repository",
        "docs/protocol.md:2 links to ../bench/gone.py, which the repository does not have",
        "made_up.py:1 names /work/shared/docs/protocol.md, a path outside the repository",
        "made_up.py:1 names bench/no_such_room/x.py, which the repository does not have",
        "made_up.py:2 names docs/nowhere.md, which the repository does not have",
    ]


@pytest.mark.parametrize("named", ["docs/protocol.md", "pipelines/presets/*/*.yaml", "bench/", "docs/protocol.md."])
def test_paths_that_exist_pass(named):
    assert exists(named, REPOSITORY)
