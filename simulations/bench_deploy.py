"""Performance suite, section 6: what the coordinator's public front costs a deployment round.

Round latency of a real coordinator (SuperLink + public front, TLS, node authentication)
with two nodes connected through the front, then two connected straight to the
SuperLink's loopback port, same run; and the time one Fleet call (small, and a 5 MiB
body: Flower's array chunk) takes through the front and without it. Run it with
``python -m simulations.bench_perf --sections 6``.
"""

from __future__ import annotations

import os
import signal
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEPLOY_RUN = ["--set", "model=tiny", "--set", "max-rank=16", "--set", "eval-examples=8", "--set", "local-steps=2",
              "--set", "max-seq-len=48", "--set", "clients-per-round=2", "--set", "min-clients=2"]


def _fedlora(args: list, log: Path) -> subprocess.Popen:
    with log.open("wb") as fh:  # own process group: stopped as a whole
        return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(process: subprocess.Popen, log: Path, needle: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.name}: no {needle!r} (exit {process.poll()}):\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: Flower's own children too
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _fleet_call_ms(address: str, ca: Path, body: bytes, repeats: int) -> float:
    """Median wall time of one POST /v1/fleet/get-run on a kept-alive connection (unsigned: the SuperLink
    authenticates it and answers 401, after reading the whole body)."""
    import httpx

    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=60) as client:
        url = f"https://{address}/v1/fleet/get-run"
        client.post(url, content=body)  # connection and TLS set up outside the timing
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            status = client.post(url, content=body, headers={"content-type": "application/x-protobuf"}).status_code
            times.append(time.perf_counter() - start)
    if status >= 500:
        raise RuntimeError(f"the SuperLink answered {status} at {address}")
    return 1000 * statistics.median(times)


def start_nodes(root: Path, label: str, coordinator: str, ca: Path, home: Path, extra: tuple = ()) -> list:
    """Two nodes through the CLI (keygen, register, demo data, client start), connected: [(process, log)]."""
    from cli.local_superlink import free_port

    started = []
    for i in range(2):
        name, node_home = f"{label}-{i}", root / f"{label}-{i}"
        for args in (["client", "keygen", "--home", node_home],
                     ["coordinator", "register", "--name", name, "--public-key", node_home / "node.pub",
                      "--home", home],
                     ["client", "demo-data", "--out", root / f"{name}.jsonl", "--partition-id", i,
                      "--num-partitions", 2]):
            step = _fedlora(args, root / f"{name}-setup.log")
            if step.wait(timeout=180) != 0:
                raise RuntimeError((root / f"{name}-setup.log").read_text()[-2000:])
        node = _fedlora(["client", "start", "--coordinator", coordinator, "--ca", ca, "--home", node_home,
                         "--data", root / f"{name}.jsonl", "--rank", 4, "--max-rank", 16, "--device", "cpu",
                         "--runtime-port", free_port(), *extra], root / f"{name}.log")
        started.append((node, root / f"{name}.log"))
    for node, log in started:
        _wait_for(node, log, "node connected")
    return started


def deployment_latency(workdir: Path, quick: bool) -> dict:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from server.db.models import Run
    from server.db.session import open_database
    from cli.local_superlink import free_port

    root = workdir / "deployment"
    root.mkdir()
    public, local = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    db, home, ca = f"sqlite:///{root / 'runs.db'}", root / "coordinator", root / "coordinator" / "certs" / "ca.crt"
    rounds = 2 if quick else 3
    started = [_fedlora(["coordinator", "start", "--host", "127.0.0.1", "--port", public.split(":")[1], "--local-port",
                         local.split(":")[1], "--hostname", "127.0.0.1", "--home", home, "--db", db],
                        root / "coordinator.log")]
    out: dict = {"rounds_per_run": rounds}
    try:
        _wait_for(started[0], root / "coordinator.log", "fedlora coordinator ready")
        for label, address in (("through_front", public), ("direct", local)):
            nodes = start_nodes(root, label, address, ca, home)
            started.extend(node for node, _ in nodes)
            tag = f"bench-{label}-{os.getpid()}"
            submitted = _fedlora(["run", "--coordinator", local, "--ca", ca, "--home", root / f"cli-{label}",
                                  "--rounds", rounds, *DEPLOY_RUN, "--set", f"run-tag={tag}"],
                                 root / f"run-{label}.log")
            if submitted.wait(timeout=900) != 0:
                raise RuntimeError(f"run {label} failed: {(root / f'run-{label}.log').read_text()[-2000:]}")
            with Session(open_database(db)) as s:
                run = s.scalars(select(Run).where(Run.tag == tag)).one()
                per_round = [(r.finished_at - r.started_at).total_seconds() for r in run.rounds]
            out[label] = {"round_s": per_round, "mean_round_s": statistics.mean(per_round),
                          "mean_after_first_s": statistics.mean(per_round[1:])}
            for node, _ in nodes:
                _stop(node)
        for label, address in (("through_front", public), ("direct", local)):
            out[label]["fleet_call_ms"] = _fleet_call_ms(address, ca, b"", repeats=200 if not quick else 50)
            out[label]["fleet_call_5MiB_ms"] = _fleet_call_ms(address, ca, os.urandom(5 * 2**20), repeats=10)
        out["front_adds_per_round_s"] = out["through_front"]["mean_round_s"] - out["direct"]["mean_round_s"]
        out["front_adds_per_call_ms"] = out["through_front"]["fleet_call_ms"] - out["direct"]["fleet_call_ms"]
    finally:
        for process in reversed(started):
            _stop(process)
    return out


def print_deployment(result: dict) -> None:
    for label in ("through_front", "direct"):
        row = result[label]
        rounds = ", ".join(f"{s:.1f}" for s in row["round_s"])
        print(f"  {label:14s} rounds {rounds} s  mean {row['mean_round_s']:.1f} s"
              f" (after the first {row['mean_after_first_s']:.1f} s)   Fleet call {row['fleet_call_ms']:.2f} ms,"
              f" 5 MiB body {row['fleet_call_5MiB_ms']:.1f} ms")
    print(f"  the front adds {result['front_adds_per_call_ms']:.2f} ms per Fleet call; round difference "
          f"{result['front_adds_per_round_s']:+.1f} s (within run-to-run noise: polling is 3 s)")


