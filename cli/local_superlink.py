"""Run the app on Flower's simulation engine from Python, the way ``flwr run`` does.

``LocalSuperLink`` starts Flower's own ``flower-superlink --simulation`` on a free
loopback port, with runtime dependency installation disabled (it would re-resolve the
project's dependencies per run, and fail offline). It is always stopped on exit, also
when the run fails, the user presses Ctrl-C or the CLI gets SIGTERM, and with it every
process it started (Ray included). ``submit`` then hands the app to it with
``flwr run`` and streams Flower's log to a file.

Each SuperLink gets a Flower home of its own (``<home>/links/link-XXXX``: the connection
config ``flwr run`` reads, the SuperLink's state database), removed when it stops. A
shared ``<home>/config.toml`` would let two simulations started from one directory
rewrite each other's connection, and the first run's submission would go to the
second SuperLink.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

CONNECTION = "fedlora-local"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (venv-safe)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"Flower's '{name}' executable is not installed next to {sys.executable}")
    return found


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    return " ".join(f"{key}={toml_value(value)}" for key, value in overrides.items())


class LocalSuperLink:
    def __init__(self, *, flwr_home: Path, log_dir: Path) -> None:
        self.parent_home = flwr_home.resolve()
        self.flwr_home = self.parent_home  # replaced by this link's own directory on __enter__
        self.log_dir = log_dir.resolve()
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"superlink-{self.flwr_home.name}.log"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the SuperLink spawns flower-superexec / flwr-simulation by name: use this venv's
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        return env

    def __enter__(self) -> LocalSuperLink:
        links = self.parent_home / "links"
        links.mkdir(parents=True, exist_ok=True)
        self.flwr_home = Path(tempfile.mkdtemp(prefix="link-", dir=links))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        command = [
            flower_bin("flower-superlink"), "--insecure", "--simulation",
            "--isolation", "subprocess", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.flwr_home / "superlink-state.db"),
        ]
        try:
            with open(self.log_path, "ab") as log_file:
                self.process = subprocess.Popen(
                    command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
                )
            self._wait_ready(timeout=60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {self.process.returncode}; see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"flower-superlink did not become ready on port {self.port} in {timeout:.0f}s")

    def submit(
        self, app_dir: Path, *, run_config: Mapping[str, Any], federation: Mapping[str, Any], log_path: Path
    ) -> subprocess.Popen[bytes]:
        """``flwr run APP CONNECTION --stream`` in the background, logging to ``log_path``."""
        command = [
            flower_bin("flwr"), "run", str(app_dir), CONNECTION,
            "--run-config", run_config_arg(run_config),
            "--federation-config", run_config_arg(federation),
            "--stream",
        ]
        log_file = open(log_path, "ab")
        try:
            return subprocess.Popen(command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log_file.close()

    def stop(self) -> None:
        if self.process is not None:
            terminate_tree(self.process)
        if self.flwr_home != self.parent_home:  # this link's own state: nothing in it outlives the run
            shutil.rmtree(self.flwr_home, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(process: subprocess.Popen | None, *, grace: float = 10.0) -> None:
    """SIGTERM one process we started, SIGKILL it after ``grace`` seconds; reaped either way."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def terminate_tree(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM ``process`` and every process under it, then SIGKILL whatever is left.

    Signalling the process group is not enough: the SuperLink's simulation process
    starts Ray, whose GCS, raylet and workers run in a session of their own, and which
    outlive a killed parent (adopted by init) unless they are found first. So the whole
    tree is collected *before* anything is signalled, and collected again before SIGKILL
    in case something was spawned meanwhile.
    """
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        procs = _tree(process.pid)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(procs, timeout=wait)
        if not alive:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)  # reap it: no zombie left behind


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


