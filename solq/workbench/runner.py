"""Run an experiment (one YAML per paper table or figure) through papermill, one notebook per grid point.

The YAML format, its grid and ``${...}`` parameters are described in :mod:`solq.workbench.experiment_file`.
Every point runs in ``runs_dir/<experiment>/<scale>/<point>/`` (executed ``notebook.ipynb``, ``metrics.json``,
figures, ``log.txt``) with the project root as working directory; the runner passes ``scale`` and
``output_dir`` itself. A point is complete when metrics.json and the marker ``.complete.json`` (holding the
parameters it ran with) exist; complete points are skipped. With seeds (``seeds:`` in the YAML or ``--seeds 0,1,2``)
every grid point runs once per seed, each into its own folder ``<point>__seed=N/`` (see
:mod:`solq.workbench.experiment_file`), and its metrics.json records ``seed``.

- :func:`run_experiment` -> one :class:`PointResult` per point (done | skipped | failed | pending);
  resumes by skipping complete points, reports a failing cell with its source and the log's path.
- ``jobs=N`` runs N points at once, each kernel with ``OMP_NUM_THREADS`` = cores / N (on a 2-core CPU two
  one-thread trainings make about twice the steps of one two-thread training); a point that reads another
  point's run waits for it with :func:`wait_for_point`.
- :func:`ensure_kernel`: a Jupyter kernel that starts this interpreter.
The ``solq run`` command's options and entry point are in :mod:`solq.workbench.run_command`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from solq import code_version
from solq.workbench.experiment_file import SCALES, Experiment, Point, load_experiment

__all__ = ["PointResult", "ensure_kernel", "run_experiment", "wait_for_point", "MARKER"]

MARKER = ".complete.json"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in kernel tracebacks


@dataclass
class PointResult:
    """Outcome of one point: ``status`` is done | skipped | failed | pending (dry run)."""

    experiment: str
    scale: str
    point: str
    status: str
    output_dir: Path
    seconds: float = 0.0
    error: str | None = None

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.json"


def ensure_kernel(name: str = "python3", private_dir: str | Path | None = None) -> list[str]:
    """Make sure the Jupyter kernel ``name`` exists and starts this interpreter (the one solq runs in).

    Installs ipykernel's spec into ``sys.prefix`` when no ``python3`` kernel is found. When the found
    spec starts another interpreter, writes a private spec into ``private_dir/kernels/<name>`` and
    puts ``private_dir`` first on ``JUPYTER_PATH`` for this process. Returns the kernel's argv.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        if name != "python3":
            raise ValueError(f"no Jupyter kernel named {name!r}; "
                             f"available: {sorted(KernelSpecManager().find_kernel_specs())}") from None
        from ipykernel.kernelspec import install

        install(kernel_name=name, prefix=sys.prefix)
        spec = KernelSpecManager().get_kernel_spec(name)
    exe = spec.argv[0] if spec.argv else ""
    ours = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    if exe in ours or (exe and os.path.realpath(exe) == os.path.realpath(sys.executable)):
        return list(spec.argv)
    if private_dir is None:
        raise ValueError(f"kernel {name!r} starts {exe!r}, not this interpreter {sys.executable}")
    kdir = Path(private_dir) / "kernels" / name
    kdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kdir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": f"solq ({name})",
                                                  "language": "python"}))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(Path(private_dir).resolve())] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p])
    return argv


def _normalise(params: dict) -> dict:
    return json.loads(json.dumps(params, sort_keys=True, default=str))


def _is_complete(out: Path, params: dict) -> tuple[bool, str]:
    marker, metrics = out / MARKER, out / "metrics.json"
    if not (marker.is_file() and metrics.is_file()):
        return False, "not run" if not out.exists() else "incomplete"
    try:
        done = json.loads(marker.read_text()).get("parameters")
    except (json.JSONDecodeError, AttributeError):
        return False, "marker unreadable"
    if done != _normalise(params):
        return False, "parameters changed"
    return True, "complete"


def _select(points: list[Point], wanted: Iterable[str | int] | None, where: Path) -> list[Point]:
    if wanted is None:
        return points
    chosen, names = [], [p.name for p in points]
    for w in wanted:
        if isinstance(w, int) or (isinstance(w, str) and w.isdigit()):
            i = int(w)
            if not 0 <= i < len(points):
                raise ValueError(f"{where}: point index {i} out of range 0..{len(points) - 1}")
            hits = [points[i]]
        else:
            hits = [p for p in points if fnmatch.fnmatchcase(p.name, w)]
            if not hits:
                raise ValueError(f"{where}: no point matches {w!r}; points: {names}")
        chosen += [p for p in hits if p not in chosen]
    return [p for p in points if p in chosen]  # keep grid order


def _failure_text(exp: Experiment, scale: str, point: Point, nb_out: Path, log: Path, err: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    lines = [f"FAILED {exp.name} [{scale}] point {point.name} (notebook {exp.notebook})"]
    if isinstance(err, PapermillExecutionError):
        lines.append(f"  cell {err.cell_index} (execution count {err.exec_count}) raised {err.ename}: {err.evalue}")
        src = (err.source or "").splitlines()
        lines.append("  cell source:")
        lines += [f"    | {s}" for s in src[:8]] + (["    | ..."] if len(src) > 8 else [])
    else:
        lines.append(f"  {type(err).__name__}: {err}")
    lines += [f"  partially executed notebook: {nb_out}", f"  log: {log}"]
    return "\n".join(lines)


def _run_point(exp: Experiment, scale: str, point: Point, out: Path, *, kernel_name: str,
               timeout: float | None) -> PointResult:
    import papermill

    from solq.workbench.papermill_engine import ENGINE_NAME  # imports papermill: lazy, as above

    out.mkdir(parents=True, exist_ok=True)
    for stale in (MARKER, "metrics.json", "failed.json"):
        (out / stale).unlink(missing_ok=True)
    nb_out, log = out / "notebook.ipynb", out / "log.txt"
    params = {**point.parameters, "output_dir": str(out)}
    start = time.perf_counter()
    error = None
    with open(log, "w") as fh:
        fh.write(f"# {exp.name} [{scale}] {point.name}  {datetime.now(timezone.utc).isoformat()}\n"
                 f"# notebook {exp.notebook}\n# parameters {json.dumps(params, default=str)}\n")
        fh.flush()
        try:
            papermill.execute_notebook(
                str(exp.notebook), str(nb_out), parameters=params, kernel_name=kernel_name,
                cwd=str(exp.root), progress_bar=False, stdout_file=fh, stderr_file=fh,
                execution_timeout=timeout, engine_name=ENGINE_NAME)  # an Output widget cannot stall a cell
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the point is reported, not raised
            error = _failure_text(exp, scale, point, nb_out, log, e)
            trace = _ANSI.sub("", "\n".join(getattr(e, "traceback", None) or [repr(e)]))
            fh.write(f"\n{error}\n\n{trace}\n")
    seconds = time.perf_counter() - start
    metrics_path = out / "metrics.json"
    if error is None and not metrics_path.is_file():
        error = (f"FAILED {exp.name} [{scale}] point {point.name}: {exp.notebook.name} finished without "
                 f"writing metrics.json into output_dir\n  notebook: {nb_out}\n  log: {log}")
    if error is None:
        error = _complete_metrics(exp, scale, point, metrics_path)
    if error is not None:
        (out / "failed.json").write_text(json.dumps({"error": error, "seconds": seconds}, indent=2))
        return PointResult(exp.name, scale, point.name, "failed", out, seconds, error)
    (out / MARKER).write_text(json.dumps({
        "parameters": _normalise(point.parameters), "seconds": round(seconds, 3),
        "finished": datetime.now(timezone.utc).isoformat(), "code_version": code_version()}, indent=2))
    return PointResult(exp.name, scale, point.name, "done", out, seconds)


def _complete_metrics(exp: Experiment, scale: str, point: Point, path: Path) -> str | None:
    """Add ``experiment``, ``scale``, ``point`` and the grid values to metrics.json when missing;
    return an error text when the notebook recorded a different scale or experiment."""
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return f"FAILED {exp.name} [{scale}] point {point.name}: {path} is not valid JSON ({e})"
    if not isinstance(metrics, dict):
        return f"FAILED {exp.name} [{scale}] point {point.name}: {path} must hold a JSON object"
    for key, want in (("scale", scale), ("experiment", exp.name)):
        if key in metrics and metrics[key] != want:
            return (f"FAILED {exp.name} [{scale}] point {point.name}: {path} records {key}="
                    f"{metrics[key]!r} but the run is {key}={want!r}; scales are never mixed")
    metrics.update({"experiment": exp.name, "scale": scale, "point": point.name})
    if point.seed is not None:
        metrics["seed"] = point.seed
    for k, v in point.values.items():
        metrics.setdefault(k, v)
    metrics.setdefault("parameters", _normalise(point.parameters))  # the report's layouts may refer to them
    path.write_text(json.dumps(metrics, indent=2, default=str))
    return None


def _check_notebook_parameters(exp: Experiment, points: list[Point]) -> None:
    import papermill

    declared = papermill.inspect_notebook(str(exp.notebook))
    if not declared:
        raise ValueError(f"{exp.notebook}: no code cell tagged 'parameters'")
    for p in points:
        unknown = sorted((set(p.parameters) | {"output_dir"}) - set(declared))
        if unknown:
            raise ValueError(f"{exp.path}: parameter(s) {unknown} are not parameters of {exp.notebook} "
                             f"(its parameters: {sorted(declared)})")


def _check_requires(exp: Experiment, scale: str, runs_dir: Path) -> None:
    for req in exp.requires(scale):
        done = list((runs_dir / req / scale).glob(f"*/{MARKER}"))
        if not done:
            raise ValueError(f"{exp.name} [{scale}] reads runs of {req!r} at scale {scale!r}, and there are "
                             f"none under {runs_dir / req / scale}: run `solq run experiments/{req}.yaml "
                             f"--scale {scale}` first")


def wait_for_point(folder: str | Path, *, timeout_s: float = 3600.0, stale_s: float = 1800.0,
                   poll_s: float = 5.0) -> str:
    """Wait until the experiment point in ``folder`` is complete, when it is running now (another job of a
    parallel ``solq run --jobs N``). Returns "done" (its marker exists), "failed" (its failed.json exists),
    "not running" (neither, and its log.txt is missing or unchanged for ``stale_s``: nothing to wait for) or
    "timeout" (still running after ``timeout_s``)."""
    folder = Path(folder)
    deadline = time.monotonic() + timeout_s
    while True:
        if (folder / MARKER).is_file():
            return "done"
        if (folder / "failed.json").is_file():
            return "failed"
        log = folder / "log.txt"
        if not log.is_file() or time.time() - log.stat().st_mtime > stale_s:
            return "not running"
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(poll_s)


@contextmanager
def _threads_per_job(jobs: int) -> Iterator[None]:
    """OMP_NUM_THREADS = cores / jobs for the kernels started inside (they inherit the environment); restored
    afterwards. Set once, before any job starts, so no thread changes the environment under another."""
    if jobs <= 1:
        yield
        return
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def run_experiment(yaml_path: str | Path, scale: str, *, runs_dir: str | Path = "experiments/runs",
                   points: Iterable[str | int] | None = None, force: bool = False, progress: bool = True,
                   keep_going: bool = True, overrides: dict | None = None, dry_run: bool = False,
                   kernel_name: str = "python3", jobs: int = 1, seeds=None) -> list[PointResult]:
    """Execute every grid point of an experiment at ``scale`` through papermill.

    ``points``: names (glob patterns) or indices selecting points; ``force``: rerun complete points;
    ``keep_going``: go on after a failing point (else stop there; with ``jobs`` > 1 the points already
    started finish); ``overrides``: notebook parameters replacing the YAML's (not grid parameters);
    ``dry_run``: report status without running; ``jobs``: points run at once (each kernel on cores / jobs
    threads); ``seeds``: run every grid point once per seed (a list or "0,1,2"; replaces the YAML's ``seeds``),
    each into ``<point>__seed=N``. Returns one PointResult per selected point that was considered (in grid order).
    """
    from tqdm.auto import tqdm

    if scale not in SCALES:
        raise ValueError(f"scale {scale!r} is not one of {list(SCALES)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    exp = load_experiment(yaml_path)
    runs_dir = Path(runs_dir).resolve()
    selected = _select(exp.points(scale, overrides, runs_dir, seeds=seeds), points, exp.path)
    _check_notebook_parameters(exp, selected)
    scale_dir = runs_dir / exp.name / scale
    if dry_run:
        results = []
        for p in selected:
            done, why = _is_complete(scale_dir / p.name, p.parameters)
            results.append(PointResult(exp.name, scale, p.name, "skipped" if done and not force else "pending",
                                       scale_dir / p.name, error=None if done else why))
        return results
    if force or not all(_is_complete(scale_dir / p.name, p.parameters)[0] for p in selected):
        _check_requires(exp, scale, runs_dir)
    ensure_kernel(kernel_name, private_dir=runs_dir / ".jupyter")
    scale_dir.mkdir(parents=True, exist_ok=True)
    # the report reads the layout from this copy, so runs stay self-describing
    (scale_dir / "experiment.yaml").write_text(exp.path.read_text())
    timeout = exp.scale_spec(scale).get("timeout")
    results: dict[str, PointResult] = {}
    pending = []
    for p in selected:
        out = scale_dir / p.name
        done, why = _is_complete(out, p.parameters)
        if done and not force:
            results[p.name] = PointResult(exp.name, scale, p.name, "skipped", out)
            continue
        if why == "parameters changed" and progress:
            tqdm.write(f"{p.name}: parameters changed since the completed run; running again", file=sys.stderr)
        pending.append(p)
    bar = tqdm(total=len(selected), initial=len(results), desc=f"{exp.name} [{scale}]", unit="point",
               disable=not progress, file=sys.stderr)
    stop = False

    def one(p: Point) -> PointResult:
        nonlocal stop
        if stop:  # an earlier point failed and keep_going is off
            return PointResult(exp.name, scale, p.name, "pending", scale_dir / p.name, error="not run")
        if jobs == 1:
            bar.set_postfix_str(p.name)
        r = _run_point(exp, scale, p, scale_dir / p.name, kernel_name=kernel_name, timeout=timeout)
        if r.status == "failed":
            tqdm.write(r.error, file=sys.stderr)
            stop = stop or not keep_going
        elif progress:
            tqdm.write(f"{p.name}: done in {r.seconds:.1f} s", file=sys.stderr)
        bar.update(1)
        return r

    cwd = os.getcwd()
    with _threads_per_job(jobs):
        if jobs == 1:
            ran = [one(p) for p in pending]
        else:
            try:
                with ThreadPoolExecutor(max_workers=jobs) as pool:
                    ran = list(pool.map(one, pending))
            finally:  # papermill's cwd= changes the process's folder and back; interleaved, two jobs can leave
                os.chdir(cwd)  # it in the project root (both enter the same folder, so only the restore is wrong)
    bar.close()
    results.update((r.point, r) for r in ran if r.status != "pending")
    return [results[p.name] for p in selected if p.name in results]
