"""``client start``'s resident worker: started beside flower-supernode, restarted if it dies.

The worker (``client.worker``) is a plain child process in fedlora's process group, so a
Ctrl-C or a ``docker stop`` reaches it as it reaches the SuperNode. It stops on its own
after SIGTERM (exit 0); any other exit (a crash, the OOM killer, SIGKILL) is a failure
the supervisor answers by starting a new worker, so the round in flight is reported
``failed`` by the ClientApp and the next round finds a worker again.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cli.console import console
from cli.local_superlink import stop_process
from client.channel import SOCKET_PATH_MAX, ping

READY_TIMEOUT = 120.0  # importing torch, transformers and PEFT on a slow disk
RESTART_BACKOFF = 1.0
QUICK_EXIT = 10.0  # a worker that dies this soon after starting is failing to start at all
QUICK_EXITS_ALLOWED = 3


def worker_socket(home: Path) -> Path:
    """The worker's socket under the node's home, or in a private temp dir if that path is too long."""
    socket = home / "worker" / "worker.sock"
    if len(str(socket)) <= SOCKET_PATH_MAX:
        return socket
    return Path(tempfile.mkdtemp(prefix="fedlora-node-")) / "worker.sock"  # mkdtemp: 0700


class WorkerSupervisor:
    """Runs ``python -m client.worker`` and keeps one running until ``stop``."""

    def __init__(self, *, socket: Path, env: Mapping[str, str], on_give_up: Callable[[str], None]) -> None:
        self.socket = socket
        self.env = dict(env)
        self.on_give_up = on_give_up
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.gave_up = ""
        self._started_at = 0.0
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Spawn the worker and watch it; ``wait_ready`` waits for it to serve."""
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="node-worker-supervisor")
        self._watcher.start()

    def _spawn(self) -> None:
        self._started_at = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-m", "client.worker", "--socket", str(self.socket)],
                                        env=self.env, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gave_up:
                raise RuntimeError(self.gave_up)
            if ping(str(self.socket), timeout=1.0):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the node worker did not answer on {self.socket} within {timeout:.0f} s")

    def _watch(self) -> None:
        quick = 0
        while not self._stopping.is_set():
            assert self.process is not None
            code = self.process.wait()
            if self._stopping.is_set() or code == 0:
                return  # asked to stop (by us, or by a signal to the whole group)
            quick = quick + 1 if time.monotonic() - self._started_at < QUICK_EXIT else 0
            if quick > QUICK_EXITS_ALLOWED:
                self.gave_up = (f"the node worker exited with code {code} within {QUICK_EXIT:.0f} s of starting, "
                                f"{quick} times in a row; see its output above")
                self.on_give_up(self.gave_up)
                return
            self.restarts += 1
            console.print(f"node worker exited with code {code}; restarting it (restart {self.restarts})",
                          markup=False)
            time.sleep(RESTART_BACKOFF)
            if self._stopping.is_set():
                return
            self._spawn()

    def stop(self, grace: float = 10.0) -> None:
        self._stopping.set()
        stop_process(self.process, grace=grace)
