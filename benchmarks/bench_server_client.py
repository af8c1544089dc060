"""Server + client on loopback: ours against trollmoves 0.19, measured in the same run.

    python benchmarks/bench_server_client.py            # full run (about 5 minutes)
    python benchmarks/bench_server_client.py --quick    # smaller counts, for a smoke test

Both sides run as processes (``move_it_server.py`` and ``move_it_client.py``), 1 KiB files,
``file://`` destination. Latency is from the moment a file written in the watched directory is
closed to the moment the client's final ``file`` message arrives,
which the client sends once the file is complete at the destination. Measured:

- sustained throughput: files dropped as fast as they are delivered (at most 200 waiting),
  delivered files per second after the first 20 % of the run, and the CPU time server and
  client spent per file meanwhile (user + system, from /proc);
- latency at 20 files/s: median and 99th percentile;
- a burst of 10 000 files: none lost, none duplicated (messages and files counted);
- the client's resident memory over 100 000 files (ours only; 0.19 would need hours).

trollmoves 0.19 runs from its own virtual environment (``TROLLMOVES_REFERENCE_VENV``,
default /opt/trollmoves019); pass ``--no-reference`` to measure ours only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posttroll.message import Message

from tests.moveit import Deployment, Listener, drop, ports, reference_available

PAYLOAD = b"x" * 1024
GOALS = {"files/s": 1000.0, "median ms": 5.0, "p99 ms": 50.0}


class Arrivals:
    """Records, in a thread, when each client ``file`` message arrives (by uid)."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.times: dict[str, list[float]] = {}
        self.count = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self.listener.sock
        while not self._stop.is_set():
            if not sock.poll(50):
                continue
            while sock.poll(0):
                raw = sock.recv()
                now = time.monotonic()
                # only the client's final "file" messages are parsed (the type is the 2nd word)
                if raw.split(b" ", 2)[1] != b"file":
                    continue
                message = Message(rawstr=raw)
                if "origin" not in message.data:
                    continue
                with self._changed:
                    self.times.setdefault(message.data["uid"], []).append(now)
                    self.count += 1
                    self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], stall: float) -> bool:
        """Wait until ``predicate()``; False once nothing arrived for ``stall`` seconds."""
        with self._changed:
            while not predicate():
                before = self.count
                self._changed.wait(stall)
                if self.count == before and not predicate():
                    return False
        return True

    def first_times(self) -> list[float]:
        """When each distinct file first arrived."""
        with self._changed:
            return [times[0] for times in self.times.values()]

    def close(self) -> None:
        """Stop recording."""
        self._stop.set()
        self._thread.join()


@dataclass
class Pipeline:
    """A running server + client pair and where its files go."""

    src: Path
    dst: Path
    arrivals: Arrivals
    deployment: Deployment
    client_pid: int
    server_pid: int
    sent: dict[str, float] = field(default_factory=dict)

    def drop(self, stem: str) -> None:
        """Write and close the file ``<stem>.dat`` in the watched directory; note when."""
        name = f"{stem}.dat"
        drop(self.src, name, PAYLOAD, rename=False)
        self.sent[name] = time.monotonic()


@contextlib.contextmanager
def pipeline(kind: str, workdir: Path, server_extra: dict[str, str] | None = None
             ) -> Iterator[Pipeline]:
    """Start a server and a client of ``kind`` ("ours" or "0.19") in ``workdir``."""
    reference = kind == "0.19"
    src, dst = workdir / "src", workdir / "dst"
    src.mkdir(parents=True)
    dst.mkdir()
    deployment = Deployment(workdir, reference_server=reference, verbose=False)
    server_port, _ = deployment.server({"bench": {
        "origin": f"{src}/{{name}}.dat", "topic": "/bench", **(server_extra or {})}})
    (client_port,) = ports(1)
    client = deployment.client({"bench": {
        "providers": f"127.0.0.1:{server_port}", "topic": "/bench",
        "destination": f"file://{dst}/", "publish_port": client_port}}, reference=reference)
    arrivals = None
    try:
        deployment.run()
        arrivals = Arrivals(deployment.listen(client_port))
        server = next(proc for proc in deployment.procs if proc is not client)
        assert client.pid is not None and server.pid is not None
        yield Pipeline(src, dst, arrivals, deployment, client.pid, server.pid)
    finally:
        if arrivals is not None:
            arrivals.close()
        deployment.close()


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def pace(count: int, rate: float, action: Callable[[int], None]) -> None:
    """Call ``action(i)`` ``count`` times at ``rate`` per second on an absolute schedule."""
    start = time.monotonic()
    for number in range(count):
        delay = start + number / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        action(number)


# ------------------------------------------------------------------------------- measurements

def stream(pipe: Pipeline, prefix: str, window: int, *, count: int | None = None,
           seconds: float | None = None, tick: Callable[[int], None] = lambda n: None) -> int:
    """Drop files, never more than ``window`` of them undelivered, until ``count`` files or
    ``seconds`` have passed; ``tick(n)`` is called before the n-th file. Returns the count.

    Delivered files are removed from the destination (and the server removes the sources when
    configured to), so the directories stay small however long the stream.
    """
    arrivals = pipe.arrivals
    end = None if seconds is None else time.monotonic() + seconds
    number = 0
    while (count is None or number < count) and (end is None or time.monotonic() < end):
        if number - len(arrivals.times) >= window:
            arrivals.wait(lambda n=number: n - len(arrivals.times) < window // 2, stall=30)
            _remove_delivered(pipe.dst)
        tick(number)
        pipe.drop(f"{prefix}{number:08d}")
        number += 1
    arrivals.wait(lambda: len(arrivals.times) >= number, stall=30)
    return number


def measure_sustained(kind: str, workdir: Path, seconds: float, window: int = 200
                      ) -> dict[str, float]:
    """Files as fast as they are delivered (at most ``window`` waiting) for ``seconds``;
    delivered files per second after the first 20 % of the run."""
    with pipeline(kind, workdir, {"delete": "true", "remove_delay": "0"}) as pipe:
        cpu = {"server": _cpu_seconds(pipe.server_pid), "client": _cpu_seconds(pipe.client_pid)}
        started = time.monotonic()
        total = stream(pipe, "s", window, seconds=seconds)
        ended = time.monotonic()
        cpu = {"server": _cpu_seconds(pipe.server_pid) - cpu["server"],
               "client": _cpu_seconds(pipe.client_pid) - cpu["client"]}
        window_start = started + 0.2 * (ended - started)
        delivered = sum(1 for t in pipe.arrivals.first_times() if window_start <= t <= ended)
        return {"files/s": delivered / (ended - window_start), "files": total,
                "server ms/file": cpu["server"] * 1000 / max(1, total),
                "client ms/file": cpu["client"] * 1000 / max(1, total)}


def measure_latency(kind: str, workdir: Path, count: int, rate: float) -> dict[str, float]:
    """Files at ``rate``/s; median and p99 of closed-at-source to announced-at-destination."""
    with pipeline(kind, workdir) as pipe:
        pace(count, rate, lambda n: pipe.drop(f"l{n:07d}"))
        pipe.arrivals.wait(lambda: len(pipe.arrivals.times) >= count, stall=30)
        latencies = [(pipe.arrivals.times[name][0] - sent) * 1000
                     for name, sent in pipe.sent.items() if name in pipe.arrivals.times]
    if not latencies:
        return {"median ms": float("nan"), "p99 ms": float("nan"), "lost": count}
    return {"median ms": statistics.median(latencies), "p99 ms": percentile(latencies, 0.99),
            "lost": count - len(latencies)}


def measure_burst(kind: str, workdir: Path, count: int, stall: float) -> dict[str, float]:
    """Drop ``count`` files at once; count lost and duplicated deliveries."""
    with pipeline(kind, workdir) as pipe:
        started = time.monotonic()
        for number in range(count):
            pipe.drop(f"b{number:07d}")
        complete = pipe.arrivals.wait(lambda: len(pipe.arrivals.times) >= count, stall=stall)
        elapsed = time.monotonic() - started
        pipe.arrivals.wait(lambda: False, stall=2.0)  # let late duplicates, if any, come
        times = pipe.arrivals.times
        on_disk = sum(1 for _ in pipe.dst.glob("b*.dat"))
    return {"files": count, "complete": float(complete), "seconds": elapsed,
            "files/s": len(times) / elapsed, "lost": count - len(times),
            "duplicated": sum(len(t) - 1 for t in times.values()), "on disk": on_disk}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure_memory(kind: str, workdir: Path, count: int, window: int, samples: int
                   ) -> tuple[list[tuple[int, int]], float]:
    """Stream ``count`` files through the pipeline; sample the client's RSS ``samples`` times.

    Returns the samples (files so far, KiB) and the rate over the whole stream (files/s).
    """
    rss: list[tuple[int, int]] = []
    every = max(1, count // samples)
    with pipeline(kind, workdir, {"delete": "true", "remove_delay": "0"}) as pipe:
        def sample(number: int) -> None:
            if number % every == 0:
                rss.append((number, _rss_kib(pipe.client_pid)))

        started = time.monotonic()
        stream(pipe, "m", window, count=count, tick=sample)
        rate = count / (time.monotonic() - started)
        rss.append((count, _rss_kib(pipe.client_pid)))
    return rss, rate


def _remove_delivered(dst: Path) -> None:
    for path in dst.glob("*.dat"):
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- report

def ratio(ours: float, ref: float, higher_is_better: bool) -> str:
    """``ours / ref`` (or the inverse) as "12.3x better"."""
    if not ours or not ref or ours != ours or ref != ref:
        return "-"
    value = ours / ref if higher_is_better else ref / ours
    return f"{value:,.1f}x"


def default_workdir() -> str | None:
    """/dev/shm when it is a writable directory (both versions measured there), else $TMPDIR."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    parser.add_argument("--no-reference", action="store_true", help="measure ours only")
    parser.add_argument("--burst", type=int, default=10_000, help="files in our burst")
    parser.add_argument("--reference-burst", type=int, default=300,
                        help="files in 0.19's burst (it moves about 10 files/s)")
    parser.add_argument("--memory-files", type=int, default=100_000,
                        help="files streamed through our client for the memory check")
    parser.add_argument("--workdir", default=default_workdir(),
                        help="where the watched and destination directories go (default: "
                             "/dev/shm when there is one, so that the benchmark's own file "
                             "creation does not set the pace on a slow disk)")
    args = parser.parse_args(argv)
    if args.quick:
        args.burst, args.reference_burst, args.memory_files = 1000, 50, 5000
    kinds = ["ours"] + ([] if args.no_reference or not reference_available() else ["0.19"])
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-server-client-", dir=args.workdir) as tmp:
        root = Path(tmp)
        print(f"working directory: {root}", flush=True)
        for kind in kinds:
            ref = kind == "0.19"
            print(f"[{kind}] sustained ...", flush=True)
            sustained = measure_sustained(kind, root / f"{kind}-sustained",
                                          seconds=5 if args.quick else (15 if ref else 20))
            print(f"[{kind}] latency at 20 files/s ...", flush=True)
            latency = measure_latency(kind, root / f"{kind}-latency",
                                      count=60 if args.quick or ref else 400, rate=20)
            print(f"[{kind}] burst ...", flush=True)
            burst = measure_burst(kind, root / f"{kind}-burst",
                                  args.reference_burst if ref else args.burst,
                                  stall=60 if ref else 20)
            results[kind] = {"sustained": sustained, "latency": latency, "burst": burst}
        print("[ours] client memory ...", flush=True)
        memory, rate = measure_memory("ours", root / "ours-memory", args.memory_files,
                                      window=500, samples=10)
    _report(results, memory, rate)
    return 0


def _report(results: dict[str, dict[str, dict[str, float]]], memory: list[tuple[int, int]],
            rate: float) -> None:
    ours, ref = results["ours"], results.get("0.19")
    rows = [("sustained files/s", "sustained", "files/s", True),
            ("median latency ms @20/s", "latency", "median ms", False),
            ("p99 latency ms @20/s", "latency", "p99 ms", False),
            ("burst files/s", "burst", "files/s", True)]
    print(f"\n{'':28}{'ours':>12}{'0.19':>12}{'ratio':>10}{'goal':>10}")
    for label, group, key, higher in rows:
        mine = ours[group][key]
        theirs = ref[group][key] if ref else float("nan")
        goal = GOALS.get(key) if group != "burst" else None
        print(f"{label:28}{mine:12,.1f}{theirs:12,.1f}{ratio(mine, theirs, higher):>10}"
              f"{'' if goal is None else ('>=' if higher else '<=') + f'{goal:g}':>10}")
    for kind, result in results.items():
        sustained = result["sustained"]
        print(f"CPU per file while sustained [{kind}]: server "
              f"{sustained['server ms/file']:.3f} ms, client {sustained['client ms/file']:.3f} ms")
        burst = result["burst"]
        print(f"burst [{kind}]: {int(burst['files'])} files in {burst['seconds']:.1f} s, "
              f"lost {int(burst['lost'])}, duplicated {int(burst['duplicated'])}, "
              f"on disk {int(burst['on disk'])}")
        if result["latency"].get("lost"):
            print(f"latency [{kind}]: {int(result['latency']['lost'])} file(s) never arrived")
    print(f"client RSS [ours] over {memory[-1][0]:,} files at {rate:,.0f} files/s "
          "(files: MiB): " + ", ".join(f"{n:,}: {kib / 1024:.1f}" for n, kib in memory))
    settled = [kib for n, kib in memory if n >= memory[-1][0] // 5]
    print(f"  growth after the first 20 %: {(max(settled) - min(settled)) / 1024:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
