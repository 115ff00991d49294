"""`homenet bench cloud`: simulated homes onboarding devices against `homenet cloud run` on PostgreSQL.

Each home says hello, then for each of its devices asks the service server for the device's
equipment profile (Sequence 1) and sends its inventory report: 1 + 2 x devices signed requests
per home, each verified and committed by the server (seq window, report stored once). The same
load runs against one and then two server processes on one PostgreSQL (a fresh database each),
side by side; homes are spread over the processes as a load balancer would. The load generator
is `--processes` processes x `--threads` threads with keep-alive connections; it signs every
request before the clock starts and checks each reply's status (200), not its signature, so
that its own CPU stays small beside the servers'.
CPU seconds used by the servers, PostgreSQL and the load generator say what bounds a run.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import psutil

from homenet.keys import KeyPair
from homenet.netutil import free_port
from homenet.postgres import Postgres, postgres_bin
from homenet.schemas import encode
from homenet.schemas.cloud import CLOUD_BODIES, Hello, ProfileQuery, Report, ReportKind
from homenet.schemas.signing import b64

TOKEN = "bench-operator-token-0123456789"
MODELS = [("Acme", f"Model {i}") for i in range(10)]
"""Half of them get a profile: a lookup finds one or finds none, as in a real home."""


@dataclass
class Run:
    servers: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    load: tuple[float, float, float]
    cpu: dict[str, float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def _requests(index: int, devices: int) -> list[tuple[str, bytes]]:
    """One home's onboarding of `devices` devices, signed in advance (the load generator must
    not be what is measured)."""
    key, seq, home_id = KeyPair.generate(), count(1), f"bench-home-{index}"

    def signed(path: str, kind: str, body: Any) -> tuple[str, bytes]:
        return path, encode(kind, body, sender=home_id, seq=next(seq), sign=key.sign, bodies=CLOUD_BODIES)[1]

    out = [signed("/v1/hello", "cloud.hello", Hello(public_key=b64(key.public), region=f"r{index % 10}"))]
    for d in range(devices):
        maker, model = MODELS[(index + d) % len(MODELS)]
        out.append(signed("/v1/service/profile", "cloud.profile.get", ProfileQuery(maker=maker, model=model)))
        out.append(signed("/v1/service/report", "cloud.report", Report(
            report_id=f"{index:06d}-{d:04d}", kind=ReportKind.INVENTORY, device_id=f"dev-{d}",
            data={"state": "configured", "profile": "generic", "address": f"192.168.1.{100 + d}", "version": 1})))
    return out


def _home(requests: list[tuple[str, bytes]], conn: http.client.HTTPConnection, latencies: list[float]) -> int:
    """Send one home's requests in order; the number refused."""
    errors = 0
    for path, payload in requests:
        start = time.perf_counter()
        conn.request("POST", path, payload, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        reply.read()
        latencies.append(time.perf_counter() - start)
        errors += reply.status != 200
    return errors


def _load(args: tuple[list[int], int, list[int], int, Any]) -> tuple[list[float], int]:
    """One load process: its homes over `threads` threads, after the common start."""
    homes, devices, ports, threads, start = args
    signed = {index: _requests(index, devices) for index in homes}
    start.wait()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    todo = iter(homes)

    def worker() -> None:
        conns = {port: http.client.HTTPConnection("127.0.0.1", port, timeout=60) for port in ports}
        mine: list[float] = []
        while True:
            with lock:
                index = next(todo, None)
            if index is None:
                break
            bad = _home(signed[index], conns[ports[index % len(ports)]], mine)
            with lock:
                errors[0] += bad
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, errors[0]


def _cloud(database: str, tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    token = tmp / "token"
    token.write_text(TOKEN)
    homenet = str(Path(sys.executable).with_name("homenet"))
    proc = subprocess.Popen([homenet, "cloud", "run", "--database", database, "--listen", f"127.0.0.1:{port}",
                             "--operator-token-file", str(token)],
                            stdout=(tmp / f"{name}.log").open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"cloud run did not start: {(tmp / f'{name}.log').read_text()[-2000:]}") from None
            time.sleep(0.1)


def _profiles(port: int) -> None:
    for maker, model in MODELS[::2]:
        body = json.dumps({"maker": maker, "model": model, "name": "bench", "qos": "video", "igmp": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/operator/profiles/{maker}/{model.replace(' ', '%20')}",
                                         data=body, method="PUT", headers={"Authorization": f"Bearer {TOKEN}"})
        urllib.request.urlopen(request, timeout=10).read()


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_once(pg: Postgres, tmp: Path, servers: int, homes: int, devices: int, processes: int, threads: int) -> Run:
    database = pg.create_database(f"bench{servers}_{int(time.time())}")
    clouds = [_cloud(database, tmp, f"cloud-{servers}-{i}") for i in range(servers)]
    try:
        _profiles(clouds[0][1])
        ports = [port for _, port in clouds]
        ctx = multiprocessing.get_context("fork")
        start = ctx.Manager().Event()
        slices = [list(range(i, homes, processes)) for i in range(processes)]
        server_ps = [psutil.Process(p.pid) for p, _ in clouds]
        assert pg.proc is not None
        pg_ps = [psutil.Process(pg.proc.pid), *psutil.Process(pg.proc.pid).children()]
        with ctx.Pool(processes) as pool:
            pending = pool.map_async(_load, [(s, devices, ports, threads, start) for s in slices])
            time.sleep(0.5 + homes * (1 + 2 * devices) * 0.0002 / processes)  # signing in advance
            others = {p.pid for p in server_ps + pg_ps}
            load_ps = [p for p in psutil.Process().children(recursive=True) if p.pid not in others]
            before = {"servers": _cpu(server_ps), "postgres": _cpu(pg_ps), "load": _cpu(load_ps)}
            began = time.perf_counter()
            start.set()
            results = pending.get()
            seconds = time.perf_counter() - began
            pg_ps = [psutil.Process(pg.proc.pid), *psutil.Process(pg.proc.pid).children()]
            after = {"servers": _cpu(server_ps), "postgres": _cpu(pg_ps), "load": _cpu(load_ps)}
        latencies = sorted(x for lat, _ in results for x in lat)
        return Run(servers, len(latencies), sum(e for _, e in results), seconds,
                   statistics.median(latencies) * 1000, latencies[int(len(latencies) * 0.99) - 1] * 1000,
                   os.getloadavg(), {k: after[k] - before[k] for k in after})
    finally:
        for proc, _ in clouds:
            proc.terminate()
            proc.wait(10)


def run_cloud(homes: int, devices: int, servers: list[int], processes: int, threads: int,
              json_out: Path | None = None) -> list[Run]:
    if postgres_bin() is None:
        raise SystemExit("bench cloud needs PostgreSQL (Debian package postgresql)")
    requests = homes * (1 + 2 * devices)
    print(f"bench cloud: {homes} homes x {devices} devices = {requests} signed requests per run "
          f"(hello, then per device a profile lookup and an inventory report); PostgreSQL on loopback, "
          f"load {processes} processes x {threads} threads; {os.cpu_count()} CPUs", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="homenet-bench-cloud-") as tmp:
        pg = Postgres()
        pg.start()
        try:
            for n in servers:
                run = run_once(pg, Path(tmp), n, homes, devices, processes, threads)
                runs.append(run)
                print(f"  {n} server process{'es' if n > 1 else ''}: {run.seconds:6.1f} s  {run.rate:7.0f} req/s  "
                      f"p50 {run.p50_ms:6.1f} ms  p99 {run.p99_ms:7.1f} ms  errors {run.errors}  "
                      f"load avg {run.load[0]:.2f} {run.load[1]:.2f} {run.load[2]:.2f}  CPU s: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in run.cpu.items()), flush=True)
        finally:
            pg.stop()
    if len(runs) > 1:
        print(f"  ratio {runs[-1].servers} vs {runs[0].servers} processes: {runs[-1].rate / runs[0].rate:.2f}x")
    if json_out:
        json_out.write_text(json.dumps([{**r.__dict__, "rate": r.rate} for r in runs], indent=2))
    return runs
