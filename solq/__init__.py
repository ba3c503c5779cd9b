"""solq: a research workbench for SOLQ instance segmentation (Dong et al., NeurIPS 2021).

Subpackages: ``config`` (one typed config), ``data``, ``coding`` (mask codecs), ``models``,
``engine`` (train/evaluate), ``evaluation`` (COCO AP, Boundary AP), ``viz``, ``workbench``.
"""
__version__ = "0.1.0"


def code_version() -> str:
    """The package version plus the git commit of the working tree when available."""
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__
