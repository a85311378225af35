"""Check a folder of downloaded published checkpoints: what each release is, what it serves, whether it loads.

    python -m pipelines.weights check WEIGHTS

walks WEIGHTS and prints one row per release: its path, the method variant it loads into, the dataset it
serves (guessed from the path: celeba, celeba_hq, paris, places2, imagenet, else "?"), its format, its
sha256 (for a folder release, a digest over the files the release is read from) and whether it loads. A
release is a file, or a folder that is one (an EdgeConnect folder, a LaMa folder with models/best.ckpt),
reported once, never its inner files. Files that are no checkpoint get a row saying so. At the end it
prints a ``weights:`` block mapping what loaded (method -> dataset -> path), ready to paste into a config;
docs/checkpoints.md gives the layout the paper preset expects. Where an author publishes no model for one of
the paper's datasets, the block says which release serves it instead (LaMa: the CelebA-HQ model serves
celeba, the Places model paris and places2).

Each release is read once (inspection and loading share the read) and hashed once.

Exit code 0 when every release loads, 1 when one does not, 2 for a missing folder.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from bench.weights import checkpoint_sha256
from bench.cli import run_main
from bench.errors import CheckpointError, UserError
from bench.methods import create_method, get_factory, identify_checkpoint
from bench.checkpoint_format import CheckpointInfo, CheckpointReads, checkpoint_reads

#: dataset labels a benchmark's weights mapping uses per dataset (the paper's three datasets)
BENCHMARK_LABELS = ("celeba", "paris", "places2")
#: words in a release's path that name the dataset it was trained on, most specific first
DATASET_WORDS = (("celeba_hq", ("celeba_hq", "celebahq")), ("celeba", ("celeba",)), ("paris", ("paris",)),
                 ("places2", ("places",)), ("imagenet", ("imagenet",)))
#: file endings of torch checkpoints: such a file that cannot be read is a failed release, not an unrelated file
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
NOT_A_CHECKPOINT = "not a checkpoint sahn-bench reads"
#: per paper column, the releases (by guessed dataset, in order of preference) that serve one of the paper's
#: datasets when the authors publish no model of it. LaMa publishes Places models (its general ones) and a
#: CelebA-HQ model, no CelebA or Paris StreetView one: the faces model serves celeba, the Places model
#: paris (street scenes, as Places' outdoor scenes), and a release whose path names no dataset is a Places one.
STAND_INS = {column: {"celeba": ("celeba_hq", "places2", "?"), "paris": ("places2", "?"), "places2": ("?",)}
             for column in ("LaMa-Fourier", "big-LaMa")}
GENERATOR_ONLY_NOTE = (
    "# loads (generator only): the release holds no discriminator weights. Evaluating needs the generator "
    "alone,\n# so the column is the published model; fine-tuning it starts the discriminator from scratch.")
LAMA_GENERATOR_ONLY_NOTE = (
    "# LaMa publishes its models so: its make_checkpoint step drops discriminator.* and loss_*; to fine-tune "
    "LaMa,\n# use the authors' big-lama-with-discr folder (docs/checkpoints.md).")


@dataclass
class Release:
    """One row of the check."""

    path: Path
    relative: str
    info: CheckpointInfo | None  # None: unreadable, broken, or no checkpoint at all
    problem: str | None = None  # why it could not be identified
    status: str = ""
    loads: bool | None = None  # None: not a checkpoint (does not count for the exit code)
    sha256: str = "-"
    reads: CheckpointReads | None = None  # what identifying it read, reused by check() and then dropped
    generator_only: bool = False

    @property
    def dataset(self) -> str:
        return guess_dataset(self.relative)


def guess_dataset(relative_path: str) -> str:
    text = relative_path.lower().replace("-", "_")
    for label, words in DATASET_WORDS:
        if any(word in text for word in words):
            return label
    return "?"


def identify(path: Path, reads: CheckpointReads | None = None) -> tuple[CheckpointInfo | None, str | None]:
    """What the registered methods read ``path`` as: (info, None), (None, why not), or (None, None)."""
    try:
        with checkpoint_reads(reads):
            found = identify_checkpoint(path)
    except CheckpointError as exc:
        return None, str(exc)
    return (found[0], None) if found else (None, None)


def find_releases(root: Path) -> Iterator[Release]:
    """Every release under ``root`` (a folder release is not descended into) and every other file, found
    lazily: each carries what identifying it read, for :func:`check` to load from before the next is read."""
    seen: set[Path] = set()

    def visit(folder: Path) -> Iterator[Release]:
        real = folder.resolve()
        if real in seen:  # a symlink cycle
            return
        seen.add(real)
        reads = CheckpointReads()
        info, problem = identify(folder, reads)
        if info is not None or problem is not None:  # a folder release, or a broken one
            yield Release(folder, relative(folder), info, problem, reads=reads)
            return
        for child in sorted(folder.iterdir()):
            if child.name.startswith("."):  # .DS_Store, .git, partial downloads of some tools
                continue
            if child.is_dir():
                yield from visit(child)
            elif child.is_file():
                reads = CheckpointReads()
                info, problem = identify(child, reads)
                yield Release(child, relative(child), info, problem, reads=reads)

    def relative(path: Path) -> str:
        return path.relative_to(root).as_posix() if path != root else "."

    yield from visit(root)


def check(release: Release) -> None:
    """Fill the digest and the load result of one row, loading from what identifying it read."""
    try:
        with checkpoint_reads(release.reads):
            _check(release)
    finally:
        release.reads = None  # its payloads go now: one release in memory at a time


def _check(release: Release) -> None:
    path, info = release.path, release.info
    if info is None and release.problem is None:
        release.status = NOT_A_CHECKPOINT
        return
    if info is None and path.is_file() and not path.name.lower().endswith(CHECKPOINT_SUFFIXES):
        release.status = NOT_A_CHECKPOINT  # a config or text file torch cannot read: nothing to report
        return
    release.sha256 = checkpoint_sha256(path, info.files if info else ())
    if info is None:
        release.status, release.loads = f"fails: {release.problem}", False
        return
    method = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method = create_method(info.variant)
            method.load(path)
        release.generator_only = any("generator-only" in str(w.message) for w in caught)
        release.status = "loads" + (" (generator only)" if release.generator_only else "")
        release.loads = True
    except UserError as exc:
        release.status, release.loads = f"fails: {exc}", False
    finally:
        del method
        gc.collect()  # paper-size networks: one at a time


def table(releases: Sequence[Release]) -> str:
    header = ("path", "method", "dataset", "format", "sha256", "loads")
    def method(release: Release) -> str:
        return release.info.variant if release.info else "?" if release.loads is False else "-"

    rows = [(r.relative, method(r), r.dataset if r.loads is not None else "-", r.info.format if r.info else "-",
             r.sha256, r.status) for r in releases]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def stand_ins(method: str) -> dict[str, tuple[str, ...]]:
    """The releases that serve a paper dataset the method's authors publish no model of (:data:`STAND_INS`)."""
    try:
        column = getattr(get_factory(method), "paper_name", None)
    except UserError:
        return {}
    return STAND_INS.get(column, {})


def weights_block(releases: Sequence[Release]) -> str:
    """The ``weights:`` YAML block for what loaded. Releases of the paper's datasets map per dataset label,
    with the stand-ins of :data:`STAND_INS` (named in a comment) where the authors publish no model of one;
    a method with none of them (a DDNM prior, big-lama in a folder named after no dataset) gets one path that
    serves every dataset. Further candidates appear as comments."""
    per_method: dict[str, list[Release]] = {}
    for release in releases:
        if release.loads and release.info is not None:
            per_method.setdefault(release.info.variant, []).append(release)
    if not per_method:
        return "# no loadable release found: nothing to map"
    lines = ["weights:"]
    for method, found in sorted(per_method.items()):
        first: dict[str, Release] = {}
        for release in found:
            first.setdefault(release.dataset, release)
        sources = stand_ins(method)
        served: dict[str, Release] = {}
        notes = []
        for label in BENCHMARK_LABELS:
            source = next((s for s in (label, *sources.get(label, ())) if s in first), None)
            if source is not None:
                served[label] = first[source]
                if source != label:
                    notes.append(f"  # {method}: {label} is served by its {source} release; its authors "
                                 f"publish no {label} model (docs/checkpoints.md)")
        if all(release is first.get("?") for release in served.values()):
            served, notes = {}, []  # only a release named after no dataset: one path, as for any method
        used = {id(r) for r in served.values()}
        others = [r for r in found if id(r) not in used]
        if served:
            lines.append(f"  {method}:")
            lines += [f"    {label}: {quoted(served[label].path)}" for label in BENCHMARK_LABELS if label in served]
        else:
            lines.append(f"  {method}: {quoted(others.pop(0).path)}")
        lines += notes
        lines += [f"  # also found for {method}: {quoted(r.path)} (dataset {r.dataset})" for r in others]
    return "\n".join(lines)


def quoted(path: Path) -> str:
    return json.dumps(str(path.resolve()))  # a JSON string is a valid YAML scalar, whatever the path holds


def run_check(folder: str | Path, *, progress: bool = True) -> int:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"weights folder not found: {root}" if not root.exists() else f"{root}: not a folder")
    releases = []
    # each release is loaded right after it is identified, from the same read, before the next one is read
    for release in tqdm(find_releases(root), desc="checking", unit="release", disable=not progress, file=sys.stderr):
        check(release)
        releases.append(release)
    print(table(releases))
    generator_only = [r for r in releases if r.generator_only]
    if generator_only:
        print(GENERATOR_ONLY_NOTE)
    if any(stand_ins(r.info.variant) for r in generator_only if r.info is not None):
        print(LAMA_GENERATOR_ONLY_NOTE)
    print()
    print("# paste into a benchmark config; keep the methods your run includes (docs/checkpoints.md)")
    print(weights_block(releases))
    return 0 if all(r.loads is not False for r in releases) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser(
        "check", help="list the releases in a folder, their sha256, and whether each loads",
        description="Walk DIR and print, per release, the method variant it loads into, the dataset it serves, "
                    "its format and sha256, and whether it loads; then a weights: block for a config.")
    checking.add_argument("folder", metavar="DIR", help="folder of downloaded releases (layout: docs/checkpoints.md)")
    checking.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    options = parser.parse_args(argv)
    return run_check(options.folder, progress=not options.no_progress)


if __name__ == "__main__":
    run_main(lambda: sys.exit(main(sys.argv[1:])))
