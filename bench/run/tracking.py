"""MLflow tracking of a benchmark, written from the driver only.

Layout in the tracking store:
  experiment      one per benchmark (``--experiment``)
  parent run      one per invocation of the pipeline: the resolved config as params, git commit, pip
                  freeze, and at the end the report
  nested run      one per finished cell (``mlflow.parentRunId`` = the parent of the invocation that
                  finished it): params, digests, per-step losses, metrics per ratio bin, artifacts

Cells are logged after their folder is complete (``cell.json`` exists), by reading that folder, so
runs exist only for finished cells and only one process ever writes to the store (no sqlite write
contention). A cell is identified by the sha256 of its ``cell.json``: re-running the pipeline logs
only cells not logged before, so a re-run never duplicates a run; a cell that was run again from
scratch (new ``cell.json``) gets a new run, and readers take the newest run per cell key.

Metric names: ``<metric>/<bin>`` (``psnr/0.2-0.4``, ``FID/all``), ``n/<metric>/<bin>`` (pairs
behind the value), ``loss/<term>`` (one value per logged training step), ``time/...``, ``params/...``;
a sharded cell adds ``eval_shards`` (the count) and ``time/eval_shard_seconds`` (one value per shard, the
shard index as step).
"""
from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import io
import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from bench.errors import UserError
from bench.files import atomic_write_bytes, sha256_file

# Tags (dotted names need backticks in MLflow search filters).
ROLE_TAG = "sahn.role"  # "benchmark" (parent) or "cell" (nested)
CELL_KEY_TAG = "sahn.cell_key"  # dataset/method/seedN
CELL_PATH_TAG = "sahn.cell_path"  # cell folder relative to --out (orders cells like the folder reader)
RECORD_DIGEST_TAG = "sahn.record_sha256"  # sha256 of cell.json: identity of one finished cell
RECORD_ARTIFACT = "cell_record.json"  # the cell's cell.json
DRIVER_TAG = "sahn.driver"  # host:pid of the invocation that owns a parent run
OUT_TAG = "sahn.out"  # the output folder
PARENT_TAG = "mlflow.parentRunId"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# MLflow 3's UI opens an experiment on the view this tag names; without it, it lands on the (empty) GenAI
# overview and the runs table is one click away.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

LOSS_TERMS_TAG = "sahn.loss_terms"  # JSON list: the order of losses.csv columns (legend order of the figure)
LOSS_PREFIX = "loss"
COUNT_PREFIX = "n"
RESERVED_PREFIXES = (LOSS_PREFIX, COUNT_PREFIX, "time", "params")
ALL_BIN = "All"
_BIN_LABEL = re.compile(r"^\((\d+(?:\.\d+)?),(\d+(?:\.\d+)?)\]$")
_BIN_KEY = re.compile(r"^(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)$")
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")
SUPPORTED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
PROBE_TIMEOUT_SECONDS = "10"
BATCH_METRICS = 1000  # MLflow's per-request limits
BATCH_PARAMS = 100
MAX_PARAM_CHARS = 6000


# ------------------------------------------------------------------------------------ names
def bin_key(label: str) -> str:
    """``"(0.2,0.4]"`` → ``"0.2-0.4"``, ``"All"`` → ``"all"`` (MLflow names allow no brackets or commas)."""
    if label == ALL_BIN:
        return "all"
    match = _BIN_LABEL.match(label.replace(" ", ""))
    if not match:
        raise ValueError(f"ratio bin {label!r} is neither 'All' nor '(a,b]'")
    return f"{match.group(1)}-{match.group(2)}"


def bin_label_of_key(key: str) -> str | None:
    """Inverse of :func:`bin_key`; ``None`` when ``key`` is not a bin."""
    if key == "all":
        return ALL_BIN
    match = _BIN_KEY.match(key)
    return f"({match.group(1)},{match.group(2)}]" if match else None


def summary_metric_name(metric: str, label: str) -> str:
    return f"{metric}/{bin_key(label)}"


def parse_summary_metric_name(name: str) -> tuple[str, str] | None:
    """``"psnr/0.2-0.4"`` → ``("psnr", "(0.2,0.4]")``; other metric names → ``None``."""
    parts = name.split("/")
    if len(parts) != 2 or parts[0] in RESERVED_PREFIXES:
        return None
    label = bin_label_of_key(parts[1])
    return (parts[0], label) if label else None


def parse_count_metric_name(name: str) -> tuple[str, str] | None:
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != COUNT_PREFIX:
        return None
    label = bin_label_of_key(parts[2])
    return (parts[1], label) if label else None


def safe_name(name: str) -> str:
    """A param/metric name MLflow accepts (it rejects brackets, commas, ...)."""
    return _INVALID_NAME_CHARS.sub("_", name)


# ------------------------------------------------------------------------------------ URIs
def default_uri(out: str | os.PathLike) -> str:
    """``sqlite:////abs/out/mlflow.db``: absolute, so it means the same in every process and folder."""
    return "sqlite:///" + str(Path(out).expanduser().resolve() / "mlflow.db")


def resolve_uri(uri: str | None, out: str | os.PathLike) -> str:
    """The tracking URI to use: ``uri`` (relative sqlite paths made absolute) or the default in ``out``."""
    if not uri:
        return default_uri(out)
    scheme = urlparse(uri).scheme
    if "://" not in uri or scheme not in SUPPORTED_SCHEMES:
        raise UserError(f"--mlflow-uri {uri}: expected sqlite:////absolute/path/mlflow.db or "
                        f"http(s)://host:port of an MLflow server (supported schemes: {', '.join(SUPPORTED_SCHEMES)})")
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not os.path.isabs(path):
            return "sqlite:///" + os.path.abspath(path)
    return uri


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return Path(path) if path and path != ":memory:" else None


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep artifacts: beside a sqlite file (MLflow's default would be ``./mlruns``
    relative to whatever the current folder is); a server or database decides itself (``None``)."""
    path = sqlite_path(uri)
    return (path.parent / "mlartifacts").as_uri() if path else None


def _bounded_http_requests() -> contextlib.AbstractContextManager[None]:
    """MLflow retries an unreachable server with backoff for minutes; a probe must fail in seconds."""
    return _environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=PROBE_TIMEOUT_SECONDS)


@contextlib.contextmanager
def _environment(**overrides: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# ------------------------------------------------------------------------------------ run context
@dataclass(frozen=True)
class RunContext:
    """What every run of one invocation records about the code and environment."""

    git_commit: str
    git_dirty: bool
    pip_freeze: str  # ``name==version`` of every installed distribution, sorted
    user: str

    @classmethod
    def collect(cls) -> "RunContext":
        commit, dirty = git_state(Path(__file__).resolve().parent.parent)
        try:
            user = getpass.getuser()
        except Exception:  # no passwd entry (containers)
            user = "unknown"
        return cls(commit, dirty, installed_packages(), user)


def git_state(folder: Path) -> tuple[str, bool]:
    """(commit, uncommitted changes to tracked files) of the repository holding ``folder``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def installed_packages() -> str:
    """The equivalent of ``pip freeze`` (name==version), read from package metadata in milliseconds."""
    names = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            names[name.lower()] = f"{name}=={dist.version}"
    return "\n".join(names[key] for key in sorted(names)) + "\n"


# ------------------------------------------------------------------------------------ the tracker
def search_runs(client: Any, experiment_id: str, filter_string: str) -> Iterator[Any]:
    """Every active run matching ``filter_string`` (MLflow pages results by 1000)."""
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


@dataclass
class TrackedCellRun:
    run_id: str
    key: str
    record_digest: str
    status: str


class Tracker:
    """One benchmark's experiment in one tracking store; all writes of an invocation go through it."""

    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient  # mlflow takes ~1 s to import: only runs that track pay it

        self.uri = uri
        self.experiment_name = experiment
        self.parent_run_id: str | None = None
        self.context: RunContext | None = None
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._open_experiment()

    @classmethod
    def open(cls, uri: str, experiment: str) -> "Tracker":
        """Connect and create the experiment if needed; any failure is a :class:`UserError` naming the URI,
        raised before the benchmark does any work."""
        path = sqlite_path(uri)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"--mlflow-uri {uri}: cannot create {path.parent}: {exc.strerror}") from exc
        try:
            with _bounded_http_requests():
                return cls(uri, experiment)
        except UserError:
            raise
        except Exception as exc:  # mlflow raises many types (MlflowException, OperationalError, ConnectionError)
            raise UserError(f"--mlflow-uri {uri}: cannot open the MLflow tracking store "
                            f"({_one_line(exc)})") from exc

    def _open_experiment(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            return self.client.create_experiment(self.experiment_name, artifact_location=artifact_root(self.uri),
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if experiment.lifecycle_stage != "active":
            raise UserError(f"MLflow experiment {self.experiment_name!r} in {self.uri} is deleted: restore it "
                            "(mlflow experiments restore) or choose another --experiment")
        # Experiments made by older versions of the harness lack the kind; one a user set is theirs to keep.
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    # -------------------------------------------------------------------------------- search
    def _search(self, filter_string: str) -> Iterator[Any]:
        return search_runs(self.client, self.experiment_id, filter_string)

    def cell_runs(self) -> list[TrackedCellRun]:
        runs = self._search(f"tags.`{ROLE_TAG}` = 'cell'")
        return [TrackedCellRun(r.info.run_id, r.data.tags.get(CELL_KEY_TAG, ""), r.data.tags.get(RECORD_DIGEST_TAG, ""),
                               r.info.status) for r in runs]

    def logged_digests(self) -> set[str]:
        """Digests of cells with a complete (FINISHED) run: those are never logged again."""
        return {run.record_digest for run in self.cell_runs() if run.status == "FINISHED"}

    # -------------------------------------------------------------------------------- parent run
    def start_benchmark(self, config_values: dict[str, Any], out: Path, context: RunContext | None = None,
                        run_name: str | None = None) -> str:
        """Create this invocation's parent run; parent runs of dead drivers on this host are marked KILLED."""
        self.context = context or RunContext.collect()
        self.close_orphaned_parents()
        self.start_parent(config_values, role="benchmark", source="pipelines.full_benchmark",
                          run_name=run_name or f"benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}",
                          tags={OUT_TAG: str(out), DRIVER_TAG: driver_id()}, context=self.context)
        self._log_text(self.parent_run_id, json.dumps(config_values, indent=2, default=str), "config.json")
        return self.parent_run_id

    def start_parent(self, config_values: dict[str, Any], *, role: str, source: str, run_name: str,
                     tags: dict[str, str] | None = None, context: RunContext | None = None) -> str:
        """Create a pipeline's parent run (``role`` its ROLE_TAG, ``source`` the entry point's module): the config
        as params, the code's and environment's tags, and the pip freeze."""
        self.context = context or self.context or RunContext.collect()
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={ROLE_TAG: role, **self._source_tags(source), **(tags or {})})
        self.parent_run_id = run.info.run_id
        self._log_params(self.parent_run_id, config_params(config_values))
        self._log_text(self.parent_run_id, self.context.pip_freeze, "environment/pip-freeze.txt")
        return self.parent_run_id

    def resume_parent(self, run_id: str) -> None:
        """Continue an interrupted invocation's parent run (RUNNING again); raises what MLflow raises when the
        store has no such run."""
        self.client.update_run(run_id, status="RUNNING")
        self.parent_run_id = run_id

    def finish_benchmark(self, status: str = "FINISHED", metrics: dict[str, float] | None = None,
                         artifacts: Iterable[tuple[Path, str | None]] = (), tags: dict[str, str] | None = None) -> None:
        """Close the parent run (a benchmark's or a search's); ``artifacts`` are (local file or folder, artifact
        folder) pairs."""
        if self.parent_run_id is None:
            return
        from mlflow.entities import Metric

        now = _now_ms()
        if metrics:
            self.client.log_batch(self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for key, value in (tags or {}).items():
            self.client.set_tag(self.parent_run_id, key, value)
        for path, folder in artifacts:
            if path.is_dir():
                self.client.log_artifacts(self.parent_run_id, str(path), folder)
            elif path.exists():
                self.client.log_artifact(self.parent_run_id, str(path), folder)
        self.client.set_terminated(self.parent_run_id, status)

    @contextlib.contextmanager
    def closing_parent_on_failure(self) -> Iterator[None]:
        """The parent run ends KILLED when the block is interrupted (Ctrl-C) and FAILED when it raises; the
        block's own error is what propagates, never a tracking error met while closing."""
        try:
            yield
        except BaseException as exc:
            try:
                self.finish_benchmark("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except Exception:  # noqa: BLE001 - never hide the original error behind a tracking error
                pass
            raise

    def close_orphaned_parents(self) -> list[str]:
        """Parent runs left RUNNING by a driver on this host that no longer exists (killed) → KILLED."""
        closed = []
        host = socket.gethostname()
        for run in self._search(f"tags.`{ROLE_TAG}` = 'benchmark' and attributes.status = 'RUNNING'"):
            owner_host, _, pid = run.data.tags.get(DRIVER_TAG, "").rpartition(":")
            if owner_host == host and pid.isdigit() and not _process_exists(int(pid)):
                self.client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
        return closed

    # -------------------------------------------------------------------------------- cell runs
    def log_cell(self, cell_dir: str | os.PathLike, *, out: str | os.PathLike, config_values: dict[str, Any],
                 extra_tags: dict[str, str] | None = None, logged: set[str] | None = None) -> str | None:
        """Log one finished cell folder as a run nested in the current parent; returns its run id, or
        ``None`` when this exact cell (same ``cell.json``) has a complete run already.

        ``logged`` (from :meth:`logged_digests`) saves one search per cell; it is updated in place.
        """
        if self.parent_run_id is None:
            raise RuntimeError("start_benchmark() must be called before log_cell()")
        cell_dir = Path(cell_dir)
        done = cell_dir / "cell.json"
        digest = sha256_file(done)
        if logged is None:
            logged = self.logged_digests()
        if digest in logged:
            return None
        self._delete_partial_runs(digest)
        record = json.loads(done.read_text())
        key = f"{record['dataset']}/{record['method']}/seed{record['seed']}"
        elapsed_ms = int(1000 * (record.get("train_seconds", 0) + record.get("eval_seconds", 0)))
        now = _now_ms()
        tags = {PARENT_TAG: self.parent_run_id, ROLE_TAG: "cell", CELL_KEY_TAG: key, RECORD_DIGEST_TAG: digest,
                CELL_PATH_TAG: _relative_posix(cell_dir, out), OUT_TAG: str(out),
                "sahn.method": record["method"], "sahn.dataset": record["dataset"], "sahn.seed": str(record["seed"]),
                "sahn.paper_name": str(record.get("paper_name")), "sahn.protocol": str(record.get("protocol")),
                "sahn.manifest_digest": str(record.get("manifest_digest")), **self._source_tags(),
                **(extra_tags or {})}
        if (cell_dir / "losses.csv").exists():
            columns = pd.read_csv(cell_dir / "losses.csv", nrows=0).columns
            tags[LOSS_TERMS_TAG] = json.dumps([safe_name(c) for c in columns if c != "step"])
        run = self.client.create_run(self.experiment_id, start_time=now - elapsed_ms, tags=tags, run_name=key)
        run_id = run.info.run_id
        self._log_params(run_id, {**config_params(config_values), **cell_params(record)})
        self._log_metrics(run_id, cell_metrics(cell_dir, record, now))
        # cell.json is stored as cell_record.json: artifacts live under --out by default, and folder
        # readers find cells by the name cell.json.
        self._log_text(run_id, done.read_text(), RECORD_ARTIFACT)
        for name in ("summary.csv", "per_image.csv", "losses.csv"):
            if (cell_dir / name).exists():
                self.client.log_artifact(run_id, str(cell_dir / name))
        if (cell_dir / "model.pt").exists():
            self.client.log_artifact(run_id, str(cell_dir / "model.pt"), "checkpoint")
        grid = write_sample_grid(cell_dir)
        if grid is not None:
            self.client.log_artifact(run_id, str(grid))
        else:  # said in the run, not left for a reader to wonder about
            self._log_text(run_id, NO_SAMPLES_NOTE, NO_SAMPLES_ARTIFACT)
        if self.context is not None:
            self._log_text(run_id, self.context.pip_freeze, "environment/pip-freeze.txt")
        self.client.set_terminated(run_id, "FINISHED", end_time=_now_ms())
        logged.add(digest)
        return run_id

    def _delete_partial_runs(self, digest: str) -> None:
        """A driver killed while logging leaves an unfinished run for a cell: replace it, don't duplicate it."""
        for run in self.cell_runs():
            if run.record_digest == digest and run.status != "FINISHED":
                self.client.delete_run(run.run_id)

    # -------------------------------------------------------------------------------- low level
    def _source_tags(self, source: str = "pipelines.full_benchmark") -> dict[str, str]:
        context = self.context or RunContext.collect()
        return {GIT_COMMIT_TAG: context.git_commit, "sahn.git_dirty": str(context.git_dirty).lower(),
                "mlflow.source.name": source, "mlflow.source.type": "LOCAL", "mlflow.user": context.user}

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[start:start + BATCH_PARAMS])

    def _log_metrics(self, run_id: str, metrics: list[Any]) -> None:
        for start in range(0, len(metrics), BATCH_METRICS):
            self.client.log_batch(run_id, metrics=metrics[start:start + BATCH_METRICS])

    def _log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)


# ------------------------------------------------------------------------------------ what a cell logs
def config_params(values: dict[str, Any]) -> dict[str, str]:
    """The resolved config as flat MLflow params (``train.steps`` → ``"150"``)."""
    from bench.config import flatten

    return {safe_name(k): _param_value(v) for k, v in flatten(values).items()}


def cell_params(record: dict[str, Any]) -> dict[str, str]:
    """What differs between the cells of one benchmark: the cell, the method's config, its training config."""
    params = {"cell.method": record["method"], "cell.dataset": record["dataset"],
              "cell.dataset_entry": record.get("dataset_entry", record["dataset"]), "cell.seed": record["seed"],
              "cell.device": record.get("device")}
    if "tf32" in record:  # what a CUDA cell's networks ran with, read back from torch (CPU cells have no TF32)
        params["cell.tf32"] = record["tf32"]
    from bench.config import flatten

    params.update({f"cell.method_config.{k}": v for k, v in flatten(record.get("method_config") or {}).items()})
    params.update({f"cell.train.{k}": v for k, v in flatten(record.get("train") or {}).items()})
    params.update({f"cell.weights.{k}": v for k, v in (record.get("weights") or {}).items()})
    return {safe_name(k): _param_value(v) for k, v in params.items()}


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 1] + "…"


def cell_metrics(cell_dir: Path, record: dict[str, Any], timestamp: int) -> list[Any]:
    """Summary values and counts per bin, per-step losses, timings (per shard too) and parameter counts."""
    from mlflow.entities import Metric

    metrics = []
    summary = pd.read_csv(cell_dir / "summary.csv")
    for row in summary.itertuples(index=False):
        name = summary_metric_name(safe_name(str(row.metric)), str(row.bin))
        metrics.append(Metric(name, float(row.value), timestamp, 0))
        metrics.append(Metric(f"{COUNT_PREFIX}/{name}", float(row.n), timestamp, 0))
    losses_path = cell_dir / "losses.csv"
    if losses_path.exists():
        losses = pd.read_csv(losses_path)
        for term in [c for c in losses.columns if c != "step"]:
            name = f"{LOSS_PREFIX}/{safe_name(term)}"
            metrics += [Metric(name, float(value), timestamp, int(step))
                        for step, value in zip(losses["step"], losses[term]) if not pd.isna(value)]
    for key in ("train_seconds", "eval_seconds"):
        metrics.append(Metric(f"time/{key}", float(record.get(key, 0.0)), timestamp, 0))
    # Shards are not runs: a sharded cell stays one run, and the shard index as the step makes MLflow draw
    # the shards' timings as one series (a straggler stands out).
    shards = record.get("eval_shards") or []
    metrics += [Metric("time/eval_shard_seconds", float(shard["seconds"]), timestamp, index)
                for index, shard in enumerate(shards)]
    if shards:
        metrics.append(Metric("eval_shards", float(len(shards)), timestamp, 0))
    metrics.append(Metric("pairs", float(record.get("pairs", 0)), timestamp, 0))
    for network, count in (record.get("num_parameters") or {}).items():
        metrics.append(Metric(f"params/{safe_name(network)}", float(count), timestamp, 0))
    return metrics


GRID_ROWS = 6
NO_SAMPLES_ARTIFACT = "samples.txt"
NO_SAMPLES_NOTE = ("No samples.png: this cell saved no composite images (save_images: none). Its per_image.csv "
                   "holds every pair's scores and the digest of its composite.\n")


def write_sample_grid(cell_dir: Path, rows: int = GRID_ROWS) -> Path | None:
    """``samples.png``: one scored pair per ratio bin (up to ``rows``), as masked input | composite.

    Built from the saved composites and masks only (a report never runs a model): the first saved pair of each
    bin, so ``save_images: sample`` gives the grid too; ``None`` when no composite was saved (``none``)."""
    from PIL import Image

    per_image = pd.read_csv(cell_dir / "per_image.csv", usecols=lambda column: column in ("bin", "mask", "output"),
                            dtype=str, keep_default_na=False)
    if per_image.empty or "output" not in per_image:
        return None
    saved = per_image[per_image["output"].astype(bool)]
    if saved.empty:
        return None
    chosen = saved.groupby("bin", sort=False).head(1).head(rows)
    tiles = []
    for row in chosen.itertuples(index=False):
        composite = np.asarray(Image.open(row.output).convert("RGB"))
        hole = np.asarray(Image.open(row.mask).convert("L").resize(composite.shape[1::-1], Image.NEAREST)) > 127
        masked = composite.copy()
        masked[hole] = 255  # white = hole, as in mask files
        tiles.append(np.concatenate([masked, composite], axis=1))
    width = max(t.shape[1] for t in tiles)
    grid = np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles])
    path = cell_dir / "samples.png"
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------ reading back
@dataclass
class TrackedCell:
    """One finished cell read from MLflow; the same attributes the folder reader's ``CellResult`` has."""

    record: dict[str, Any]
    summary_frame: pd.DataFrame
    losses_frame: pd.DataFrame | None
    run_id: str
    path: str  # cell folder relative to the benchmark's --out

    @property
    def method(self) -> str:
        return self.record["method"]

    @property
    def dataset(self) -> str:
        return self.record["dataset"]

    def summary(self) -> pd.DataFrame:
        return self.summary_frame.copy()

    def losses(self) -> pd.DataFrame | None:
        return None if self.losses_frame is None else self.losses_frame.copy()


def load_cells(uri: str, experiment: str) -> list[TrackedCell]:
    """The newest finished run of every cell in ``experiment``, ordered like the folder reader orders
    cell folders. Values come from MLflow metrics, loss curves from metric histories."""
    try:
        with _bounded_http_requests():
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
    except Exception as exc:
        raise UserError(f"--mlflow-uri {uri}: cannot open the MLflow tracking store ({_one_line(exc)})") from exc
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(f"no MLflow experiment {experiment!r} in {uri} (experiments there: {names})")
    newest: dict[str, Any] = {}
    for run in search_runs(client, found.experiment_id, f"tags.`{ROLE_TAG}` = 'cell' and attributes.status = 'FINISHED'"):
        key = run.data.tags.get(CELL_KEY_TAG, "")
        if key not in newest or _logged_at(run) > _logged_at(newest[key]):
            newest[key] = run
    if not newest:
        raise UserError(f"MLflow experiment {experiment!r} in {uri} has no finished cell runs")
    cells = [_tracked_cell(client, run) for run in newest.values()]
    return sorted(cells, key=lambda c: (*Path(c.path).parts, "cell.json"))


def _tracked_cell(client: Any, run: Any) -> TrackedCell:
    import tempfile

    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as folder, _environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        record = json.loads(Path(client.download_artifacts(run_id, RECORD_ARTIFACT, folder)).read_text())
    values, counts = {}, {}
    for name, value in run.data.metrics.items():
        if (parsed := parse_summary_metric_name(name)) is not None:
            values[parsed] = value
        elif (parsed := parse_count_metric_name(name)) is not None:
            counts[parsed] = value
    rows = [{"bin": label, "metric": metric, "value": value, "n": int(counts.get((metric, label), 0))}
            for (metric, label), value in values.items()]
    summary = pd.DataFrame(rows, columns=["bin", "metric", "value", "n"])
    terms = json.loads(run.data.tags.get(LOSS_TERMS_TAG, "[]"))
    terms += sorted(n.split("/", 1)[1] for n in run.data.metrics
                    if n.startswith(LOSS_PREFIX + "/") and n.split("/", 1)[1] not in terms)
    losses = None
    if terms:
        series = {}
        for term in terms:
            history = client.get_metric_history(run_id, f"{LOSS_PREFIX}/{term}")
            series[term] = pd.Series({m.step: m.value for m in history}, dtype=float)
        losses = pd.DataFrame(series).sort_index().rename_axis("step").reset_index()
    return TrackedCell(record, summary, losses, run_id, run.data.tags.get(CELL_PATH_TAG, run.data.tags.get(CELL_KEY_TAG)))


# ------------------------------------------------------------------------------------ helpers
def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _logged_at(run: Any) -> tuple[int, int]:
    """When a cell run was completed (its start time is back-dated to when the cell started)."""
    return run.info.end_time or 0, run.info.start_time or 0


def _relative_posix(path: Path, root: str | os.PathLike) -> str:
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _now_ms() -> int:
    return int(time.time() * 1000)
