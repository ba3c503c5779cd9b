"""In a real browser (issue 17): JupyterLab in headless Chromium runs the explorer notebook and its widgets answer
the controls; an executed decoder_attention notebook and the HTML report of ``solq report`` show every table and
image. Marked ``browser``; skipped only when no Chromium is installed (``apt-get install -y chromium``).

Playwright drives Debian's Chromium (``executable_path``); nothing downloads a browser. Each test starts its own
JupyterLab on a free localhost port with a random token and fresh settings and workspaces folders, and saves a
screenshot of each step under its tmp dir (their paths are in any failure message)."""
import io
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml
from PIL import Image

from solq.data.synthetic import generate
from solq.workbench.report import build_report
from solq.workbench.runner import ensure_kernel, run_experiment

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                                             if Path(p).is_file()), None)
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install -y chromium); "
                                                          "the browser tests drive the system's Chromium")]


class Steps:
    """Screenshots of a test's steps, numbered, under ``folder``; ``check`` fails naming all of them."""

    def __init__(self, page, folder: Path):
        self.page, self.folder, self.paths = page, folder, []
        folder.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str, locator=None) -> bytes:
        """Save the page (or one element) as NN_name.png; returns the PNG bytes."""
        path = self.folder / f"{len(self.paths):02d}_{name}.png"
        png = (locator or self.page).screenshot(path=str(path))
        self.paths.append(path)
        return png

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.shot("failure")
            raise AssertionError(f"{message}\nscreenshots: " + ", ".join(map(str, self.paths)))


@contextmanager
def _steps(page, folder: Path):
    """Steps for a page; any failure inside (a timeout included) gets a last screenshot and the list of them."""
    steps = Steps(page, folder)
    try:
        yield steps
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - e.g. a Playwright timeout: same report as a failed check
        try:
            steps.shot("failure")
            (folder / "failure.html").write_text(page.content())  # the DOM, to see what the locator missed
        except Exception:  # noqa: BLE001 - the page may be gone
            pass
        raise AssertionError(f"{type(e).__name__}: {e}\nscreenshots: " + ", ".join(map(str, steps.paths))) from e


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # the dev extra installs it

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _jupyterlab(root: Path, work: Path):
    """A JupyterLab server on root (fresh config, settings, workspaces and runtime folders under work; kernels
    see this worktree through PYTHONPATH). Yields (base url, token)."""
    work.mkdir(parents=True, exist_ok=True)
    ensure_kernel("python3", private_dir=work / "kernels")  # a kernel that starts this interpreter
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    settings = {"apputils-extension/notification": {"fetchNews": "false"},  # no news pop-up over the page
                "notebook-extension/tracker": {"windowingMode": "none"}}  # every cell in the DOM, not only visible ones
    for name, value in settings.items():
        path = work / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTER_RUNTIME_DIR", "runtime")):
        env[var] = str(work / sub)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--allow-root"]
    log = open(work / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; log: {work / 'jupyterlab.log'}") from None
                time.sleep(0.5)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _open_notebook(page, url: str, token: str, path: str) -> None:
    """Open a notebook and wait until its kernel is really idle (else Run All asks to select a kernel)."""
    page.goto(f"{url}/lab/tree/{path}?token={token}")
    page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=90_000)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _explorer_copy(folder: Path, data_root: Path) -> Path:
    """notebooks/explorer.ipynb with its data, its output folder and 2 images set at the end of the parameters
    cell (as papermill injects them), so the repository stays clean."""
    nb = nbformat.read(ROOT / "notebooks" / "explorer.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += f"\ndata_root = {str(data_root)!r}\noutput_dir = {str(folder / 'explorer_out')!r}\nmax_images = 2"
    path = folder / "explorer.ipynb"
    nbformat.write(nb, path)
    return path


def _status_count(page) -> int:
    text = page.locator(".widget-html-content").filter(has_text="detections shown").first.inner_text()
    return int(re.search(r"(\d+) detections shown", text).group(1))


def _set_slider(page, label: str, value) -> None:
    """Type a value into a slider's readout (what a user does for an exact value) and wait for the redraw."""
    slider = page.locator(".widget-slider").filter(has=page.get_by_text(label, exact=True))
    readout = slider.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")


def _figure(page):
    return page.locator(".widget-output img").first


def _redrawn(page, before: bytes, steps: Steps, name: str, timeout: float = 30.0) -> bytes:
    """Wait until the explorer's figure differs from ``before``; returns the new PNG (a screenshot step)."""
    from playwright.sync_api import Error as PlaywrightError

    deadline = time.monotonic() + timeout
    while True:
        page.wait_for_timeout(300)
        try:
            png = _figure(page).screenshot()
            if png != before and _figure(page).evaluate("i => i.complete && i.naturalWidth > 0"):
                break
        except PlaywrightError:  # the widget replaced its <img> between finding and shooting it (a busy CPU
            pass  # makes that window wider): look again until the deadline
        if time.monotonic() > deadline:
            break
    return steps.shot(name, _figure(page))


def _no_error_outputs(page, steps: Steps) -> None:
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    texts = [t for t in errors.all_inner_texts() if re.search(r"Traceback|Error", t)]
    steps.check(not texts, f"error output in a cell: {texts[:2]}")


def test_explorer_runs_in_jupyterlab_and_follows_its_controls(browser, tmp_path):
    data = tmp_path / "synthetic"
    generate(data, 2, 2, 128, seed=0)
    _explorer_copy(tmp_path, data)
    with _jupyterlab(tmp_path, tmp_path / "lab") as (url, token):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        with _steps(page, tmp_path / "screenshots") as steps:
            _open_notebook(page, url, token, "explorer.ipynb")
            steps.shot("opened_kernel_idle")
            page.locator("#jp-MainMenu").get_by_text("Run", exact=True).click()
            page.get_by_text("Run All Cells", exact=True).click()
            last = page.locator(".jp-OutputArea-output").filter(has_text="metrics:")
            last.first.wait_for(timeout=150_000)  # the last cell printed where it wrote metrics.json
            page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=30_000)
            steps.shot("ran_all_cells")
            _no_error_outputs(page, steps)
            counts = json.loads(page.locator(".jp-OutputArea-output").filter(
                has_text="detections at or above each threshold").first.inner_text()
                .split("threshold:", 1)[1].split("\n")[0].strip().replace("'", '"'))
            figure = _figure(page)
            figure.scroll_into_view_if_needed()
            steps.check(figure.evaluate("i => i.complete && i.naturalWidth > 0"), "the explorer shows no figure")
            start = steps.shot("widgets_after_the_scripted_tour", figure)

            # all detections above the threshold: the count shown follows the slider
            page.locator(".widget-dropdown").filter(has=page.get_by_text("query", exact=True)).locator(
                "select").select_option(label="all above threshold")
            at_all = _redrawn(page, start, steps, "query_all")
            _set_slider(page, "score ≥", 0)
            at_zero = _redrawn(page, at_all, steps, "threshold_0")
            n_zero = _status_count(page)
            _set_slider(page, "score ≥", 0.5)
            at_half = _redrawn(page, at_zero, steps, "threshold_0.5")
            n_half = _status_count(page)
            steps.check(n_zero == counts["0"] and n_half == (counts["0.5"] or 3) and n_half < n_zero,
                        f"shown detections {n_zero} at 0 and {n_half} at 0.5; the kernel counted {counts}")
            steps.check(np.abs(_pixels(at_zero) - _pixels(at_half)).max() > 0, "threshold 0 and 0.5 look the same")

            # one query, then another decoder layer: the attention points move
            query = page.locator(".widget-dropdown").filter(has=page.get_by_text("query", exact=True)).locator("select")
            options = [o for o in query.locator("option").all_inner_texts() if o.startswith("query")]
            query.select_option(label=options[1])
            one_query = _redrawn(page, at_half, steps, "second_query")
            steps.check(np.abs(_pixels(one_query) - _pixels(at_half)).max() > 0, "picking a query changed nothing")
            layer = page.locator(".widget-slider").filter(has=page.get_by_text("decoder layer", exact=True))
            first_layer = int(layer.locator(".widget-readout").inner_text())
            _set_slider(page, "decoder layer", 1 - first_layer)  # the smoke model has 2 decoder layers
            other_layer = _redrawn(page, one_query, steps, "other_decoder_layer")
            steps.check(np.abs(_pixels(other_layer) - _pixels(one_query)).max() > 0,
                        "another decoder layer changed nothing")
            _no_error_outputs(page, steps)
        page.close()


def _images_render(page, steps: Steps, what: str) -> int:
    """Every <img> loaded with a size; returns how many there are."""
    broken = page.evaluate("() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))"
                           ".map(i => i.src.slice(0, 80))")
    count = page.evaluate("() => document.images.length")
    steps.check(not broken, f"{what}: broken images {broken}")
    return count


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    """notebooks/decoder_attention.ipynb executed through the runner on the shipped smoke-uqr model, and the
    report compiled from that run."""
    root = tmp_path_factory.mktemp("attention")
    generate(root / "synthetic", 2, 2, 128, seed=0)
    (root / "experiments").mkdir()
    spec = {"title": "decoder attention", "notebook": str(ROOT / "notebooks" / "decoder_attention.ipynb"),
            "parameters": {"data_root": str(root / "synthetic"), "num_images": 2, "queries_per_image": 2},
            "scales": {"smoke": {"timeout": 300}, "paper": {"timeout": 300}}}
    (root / "experiments" / "attention.yaml").write_text(yaml.safe_dump(spec))
    [res] = run_experiment(root / "experiments" / "attention.yaml", "smoke", runs_dir=root / "runs", progress=False)
    assert res.status == "done", res.error
    report = build_report(root / "runs", root / "report")
    return root, res.output_dir / "notebook.ipynb", report


def test_executed_attention_notebook_shows_its_figures_in_jupyterlab(browser, attention_run, tmp_path):
    root, notebook, _ = attention_run
    images_in_file = sum("image/png" in o.get("data", {}) for c in nbformat.read(notebook, as_version=4).cells
                         if c.cell_type == "code" for o in c.outputs)
    assert images_in_file > 0
    with _jupyterlab(root, tmp_path / "lab") as (url, token):
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        with _steps(page, tmp_path / "screenshots") as steps:
            _open_notebook(page, url, token, str(notebook.relative_to(root)))
            outputs = page.locator(".jp-OutputArea-output img")
            outputs.first.wait_for(timeout=30_000)
            shown = outputs.count()
            for i in range(shown):  # images below the fold load when scrolled to (lazy windowing)
                outputs.nth(i).scroll_into_view_if_needed()
                steps.shot(f"figure_{i}", outputs.nth(i))
            steps.check(shown == images_in_file, f"{shown} images shown, the notebook holds {images_in_file}")
            _images_render(page, steps, "decoder_attention.ipynb")
            _no_error_outputs(page, steps)
        page.close()


def test_report_html_renders_every_table_and_image(browser, attention_run, tmp_path):
    _, _, report = attention_run
    html = Path(report["html"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
    with _steps(page, tmp_path / "screenshots") as steps:
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        steps.shot("report", None)
        tables = page.locator("table")
        steps.check(tables.count() > 0, "the report shows no table")
        for i in range(tables.count()):
            rows = tables.nth(i).locator("tr").count()
            steps.check(rows > 1 and tables.nth(i).is_visible(), f"table {i} has {rows} rows or is hidden")
        n = _images_render(page, steps, "report.html")
        steps.check(n > 0, "the report shows no image")
        steps.check(not failed, f"missing files or failed requests: {failed}")
    page.close()
