"""Running Flower's own executables for a deployment: environment, config files, processes.

Every Flower process gets a project-local FLWR_HOME (its apps, its ``config.toml``) and
runtime dependency installation off: it would re-resolve the app's dependencies for each
run, which fails offline and is slow online. Connections for the ``flwr`` CLI live in
that FLWR_HOME's ``config.toml`` (Flower 1.41's format), never in the app's
pyproject.toml, which Flower would otherwise migrate and rewrite. Default homes sit under
``./.flwr/``, which Flower leaves out of the app bundle ``flwr run`` builds from the
project directory (keys, config files and installed bundles must not travel with it).

``Daemon`` runs a long-lived Flower process (SuperLink, SuperNode) in the foreground:
its output is echoed, SIGTERM/SIGINT are forwarded so it shuts down cleanly (also as
PID 1 in a container), and a readiness check bounds the start-up time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cli.console import console
from cli.local_superlink import flower_bin, stop_process, toml_value

CONNECTION = "fedlora"
DEFAULT_PORT = 9093  # the coordinator's public port (the front: Fleet API and enrollment)
OPERATOR_PORT = 9092  # the SuperLink itself, on loopback: Control and Runtime APIs
LOOPBACK = "127.0.0.1"
COORDINATOR_HOME = ".flwr/coordinator"
Handler = Callable[[argparse.Namespace], int]


def reported(handler: Handler) -> Handler:
    """Network and process failures end the command with one line naming the value, like ValueError."""

    @functools.wraps(handler)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (OSError, RuntimeError) as exc:
            console.print(f"error: {exc}", style="red", markup=False, highlight=False)
            return 2

    return wrapper


def add_connection_args(p: argparse.ArgumentParser, *, port: int = DEFAULT_PORT) -> None:
    p.add_argument("--coordinator", default=f"{LOOPBACK}:{port}", help=f"coordinator address HOST:PORT "
                                                                        f"(default: {LOOPBACK}:{port})")
    p.add_argument("--ca", default=None, help="the coordinator's CA certificate (PEM)")
    p.add_argument("--insecure", action="store_true", help="the coordinator runs without TLS")


def connection_ca(args: argparse.Namespace) -> Path | None:
    """The CA for a client-side connection, or None with --insecure; errors name the file."""
    if args.insecure:
        if args.ca:
            raise ValueError(f"--insecure and --ca {args.ca!r} contradict each other")
        return None
    if not args.ca:
        raise ValueError("--ca is required (the coordinator's CA certificate), or --insecure")
    ca = Path(args.ca).expanduser().resolve()
    if not ca.is_file():
        raise FileNotFoundError(f"CA certificate {args.ca!r} does not exist")
    return ca


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name: use this venv's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.update(extra or {})
    return env


def write_connection(home: Path, *, address: str, ca: Path | None) -> str:
    """A ``[superlink.fedlora]`` connection in ``home/config.toml``; returns its name."""
    home.mkdir(parents=True, exist_ok=True)
    tls = f"root-certificates = {toml_value(str(ca.resolve()))}\n" if ca else "insecure = true\n"
    (home / "config.toml").write_text(
        f"[superlink]\ndefault = {toml_value(CONNECTION)}\n\n"
        f"[superlink.{CONNECTION}]\naddress = {toml_value(address)}\n{tls}"
    )
    return CONNECTION


def write_toml(path: Path, values: Mapping[str, Any]) -> Path:
    """Flat key = value TOML; Flower accepts such a file wherever it takes ``k=v`` pairs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return path


def run_flwr(args: Sequence[str], *, home: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """One ``flwr`` CLI call, bounded in time; the error names the command."""
    command = [flower_bin("flwr"), *args]
    try:
        return subprocess.run(command, env=flower_env(home), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"'flwr {' '.join(args)}' did not finish within {timeout:.0f}s") from None


def flwr_json(result: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    """The answer of a ``flwr ... --format json`` call.

    With ``--format json`` Flower 1.41 exits 0 even when the call failed and reports it as
    ``{"success": false, "error-message": ...}``: callers must read ``success``.
    """
    try:
        return json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise RuntimeError(f"{what} failed (exit {result.returncode}): {output}") from None


class Daemon:
    """A Flower daemon in the foreground: output echoed and kept, SIGTERM/SIGINT forwarded.

    Forwarding starts with the process, so ``docker stop`` (fedlora is PID 1 there, and
    PID 1 ignores signals it has no handler for) or Ctrl-C stops Flower cleanly at any time.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, command: Sequence[str], env: Mapping[str, str], ready_line: str = "") -> None:
        self.command = list(command)
        self.env = dict(env)
        self.ready_line = ready_line
        self.tail: deque[str] = deque(maxlen=60)
        self.ready = threading.Event()
        self.process: subprocess.Popen[str] | None = None
        self._pump_thread: threading.Thread | None = None
        self._previous: dict[int, Any] = {}
        self.signalled: int | None = None  # the first signal forwarded to it (SIGTERM, SIGINT)
        self._signals = 0

    def start(self) -> None:
        # Same process group as fedlora: a signal to our group (Ctrl-C, a test's killpg) reaches it too.
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {sig: signal.signal(sig, self._forward) for sig in self.SIGNALS}

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.tail.append(line)
            if self.ready_line and self.ready_line in line:
                self.ready.set()

    def wait_ready(self, check: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Until ``check()`` holds; fails if the daemon exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                self._finish()
                raise RuntimeError(f"{what} exited with code {self.process.returncode} before it was ready")
            if check():
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{what} was not ready within {timeout:.0f}s")

    def output(self) -> str:
        return "".join(self.tail)

    def wait(self) -> int:
        """Block until the daemon exits; a second signal kills it."""
        assert self.process is not None
        try:
            return self.process.wait()
        finally:
            self._finish()

    def exit_status(self) -> int:
        """``wait``, then report as a shell does: 128 + N when our forwarded signal N stopped it
        (143 after SIGTERM, like ``fedlora simulate``), else the daemon's own exit code."""
        code = self.wait()
        return 128 + self.signalled if self.signalled else code

    def _forward(self, signum: int, _frame: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self._signals += 1
        self.signalled = self.signalled or signum
        self.process.send_signal(signal.SIGTERM if self._signals == 1 else signal.SIGKILL)

    def terminate(self) -> None:
        """Ask the daemon to stop; safe from any thread (``stop`` restores signal handlers: main thread only)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self, grace: float = 10.0) -> None:
        stop_process(self.process, grace=grace)
        self._finish()

    def _finish(self) -> None:
        """After exit: drain the output (its last lines explain failures) and restore handlers."""
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
