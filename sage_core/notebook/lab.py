"""`make lab`: JupyterLab on this project, as its users expect it.

Lab serves the project root (so `figures/`, `README.md` and `notebooks/` are one click
apart) and opens on `notebooks/`; it listens on localhost only, with a token, on the first
free port from 8888 (or the one given); it runs as root too (containers, cloud notebooks),
where Jupyter otherwise refuses to start. The project's kernelspec is checked first, so every
notebook opens with its `sage-dtype-trust` kernel. The browser test starts Lab with the same
command (`lab_command`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sage_core.notebook.runner import ensure_kernelspec
from sage_core.paths import NOTEBOOKS, ROOT

HOST = "127.0.0.1"
START_PAGE = f"/lab/tree/{NOTEBOOKS.relative_to(ROOT).as_posix()}"
# Lab's application settings: overrides.json turns off the news feed and update checks, so
# no "get notified about Jupyter news?" question pops up and nothing is fetched.
APP_SETTINGS = Path(__file__).resolve().parent / "lab_settings"


def lab_command(
    port: int | None = None, token: str | None = None, open_browser: bool = True
) -> list[str]:
    """The `jupyter lab` command line `make lab` runs; `port`/`token` fix what Jupyter would
    otherwise pick (the first free port from 8888, a random token)."""
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={ROOT}",
        f"--ServerApp.ip={HOST}",
        f"--LabApp.default_url={START_PAGE}",
        f"--LabApp.app_settings_dir={APP_SETTINGS}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if os.geteuid() == 0:
        command.append("--allow-root")
    if port is not None:
        command += [f"--ServerApp.port={port}", "--ServerApp.port_retries=0"]
    if token is not None:
        command.append(f"--IdentityProvider.token={token}")
    if not open_browser:
        command.append("--no-browser")
    return command


def main() -> None:
    ensure_kernelspec()
    command = lab_command()
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
