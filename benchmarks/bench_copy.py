"""Time the copy engine against native tools and trollmoves 0.19, on servers on loopback.

    python benchmarks/bench_copy.py [--size-mib 512] [--files 1000] [--repeat 3] [--only NAME]

Large file (default 512 MiB): local copy vs ``cp``, SFTP upload vs OpenSSH ``sftp``, S3 upload vs
``aws s3 cp``, FTP upload vs ``curl -T``, each against the same server in the same run.
Many small files (default 1000 x 64 KiB) over SFTP through ``move_it``: ours vs trollmoves
0.19's ``move_it`` (run in its own virtual env, ``TROLLMOVES_REFERENCE_VENV``, default
/opt/trollmoves019) vs one ``sftp -b`` batch. Each case runs ``--repeat`` times, alternating
tools; the median is reported, with the ratio native_time / our_time (> 1: we are faster).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trollmoves
from tests import servers
from trollmoves.filesystems import POOL
from trollmoves.movers import move_it

REFERENCE = Path(os.environ.get("TROLLMOVES_REFERENCE_VENV", "/opt/trollmoves019"))


def timed(func: Callable[[], object]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def run(argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> None:
    """Run a native tool, failing loudly."""
    subprocess.run(argv, input=stdin.encode() if stdin else None, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


class Bench:
    """Collects alternating timings of (native, ours) pairs and prints a report."""

    def __init__(self, repeat: int) -> None:
        self.repeat = repeat
        self.rows: list[tuple[str, str, float, float]] = []

    def compare(self, case: str, native_name: str, native: Callable[[], object],
                ours: Callable[[], object], reset: Callable[[], object] = lambda: None) -> None:
        """Time both ``repeat`` times, alternating, and keep the medians."""
        native_times, our_times = [], []
        for _ in range(self.repeat):
            reset()
            native_times.append(timed(native))
            reset()
            our_times.append(timed(ours))
        tn, to = statistics.median(native_times), statistics.median(our_times)
        self.rows.append((case, native_name, tn, to))
        print(f"{case:<34} {native_name:<22} {tn:8.3f} s  ours {to:8.3f} s  "
              f"ratio {tn / to:5.2f}x", flush=True)

    def report(self) -> str:
        """Markdown table of all rows."""
        lines = ["| case | compared with | theirs (s) | ours (s) | ratio theirs/ours |",
                 "|---|---|---|---|---|"]
        lines += [f"| {c} | {n} | {tn:.3f} | {to:.3f} | {tn / to:.2f}x |"
                  for c, n, tn, to in self.rows]
        return "\n".join(lines)


def large_file_cases(bench: Bench, work: Path, size_mib: int, sshd: servers.SSHServer,
                     ftpd: servers.FTPServer, moto: servers.S3Server, only: str) -> None:
    """Single large file, every protocol, against the native tool."""
    src = work / "large.bin"
    with open(src, "wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(1024 * 1024))
    out = work / "out"
    out.mkdir()

    def clean() -> None:
        for path in out.iterdir():
            path.unlink()
        for path in ftpd.root.iterdir():
            path.unlink()

    if only in {"", "local"}:
        bench.compare(f"local {size_mib} MiB (no hard link)", "cp",
                      lambda: run(["cp", str(src), str(out / "cp.bin")]),
                      lambda: trollmoves.copy(src, out / "ours.bin", hardlink=False), clean)
    if only in {"", "sftp"}:
        ssh_target = f"{sshd.user}@{sshd.host}"
        bench.compare(f"sftp upload {size_mib} MiB", "OpenSSH sftp",
                      lambda: run(["sftp", "-q", *sshd.ssh_opts(), "-b", "-", ssh_target],
                                  stdin=f"put {src} {out}/native.bin\n"),
                      lambda: trollmoves.copy(src, sshd.url(out / "ours.bin"),
                                              ssh_key_filename=sshd.key_filename), clean)
        # the same cipher on both sides, so the ratio above is not only a choice of cipher
        bench.compare(f"sftp upload {size_mib} MiB", "sftp -c aes128-gcm",
                      lambda: run(["sftp", "-q", "-c", "aes128-gcm@openssh.com", *sshd.ssh_opts(),
                                   "-b", "-", ssh_target], stdin=f"put {src} {out}/native.bin\n"),
                      lambda: trollmoves.copy(src, sshd.url(out / "ours.bin"),
                                              ssh_key_filename=sshd.key_filename), clean)
    if only in {"", "s3"} and shutil.which("aws"):
        bucket = moto.create_bucket()
        env = dict(os.environ, **moto.env)
        bench.compare(f"s3 upload {size_mib} MiB", "aws s3 cp",
                      lambda: run(["aws", "s3", "cp", "--quiet", str(src),
                                   f"s3://{bucket}/native.bin",
                                   "--endpoint-url", moto.endpoint_url], env=env),
                      lambda: trollmoves.copy(src, f"s3://{bucket}/ours.bin",
                                              **moto.storage_options()))
    if only in {"", "ftp"}:
        curl_url = ftpd.url("native.bin", with_password=True)
        bench.compare(f"ftp upload {size_mib} MiB", "curl -T",
                      lambda: run(["curl", "-s", "-S", "-T", str(src), curl_url]),
                      lambda: trollmoves.copy(src, ftpd.url("ours.bin", with_password=True)),
                      clean)
    POOL.close_all()


REFERENCE_SCRIPT = textwrap.dedent("""
    import sys, time, logging
    from trollmoves.movers import move_it
    files, dest, key = sys.argv[1], sys.argv[2], sys.argv[3]
    names = open(files).read().split()
    start = time.perf_counter()
    for name in names:  # 0.19's SftpMover needs the file name in the destination
        move_it(name, dest + name.rsplit("/", 1)[-1], attrs={"ssh_private_key_file": key})
    print(time.perf_counter() - start)
""")


def small_files_case(bench: Bench, work: Path, count: int, sshd: servers.SSHServer) -> None:
    """Many 64 KiB files over SFTP: ours vs trollmoves 0.19's move_it vs one sftp batch."""
    src_dir = work / "small"
    src_dir.mkdir()
    names = []
    for index in range(count):
        path = src_dir / f"f{index:05d}.bin"
        path.write_bytes(os.urandom(64 * 1024))
        names.append(str(path))
    out = work / "small-out"
    out.mkdir()
    listing = work / "small.txt"
    listing.write_text("\n".join(names))
    dest = sshd.url(out) + "/"

    def clean() -> None:
        shutil.rmtree(out)
        out.mkdir()

    def ours() -> None:
        attrs = {"ssh_private_key_file": sshd.key_filename}
        for name in names:
            move_it(name, dest, attrs=attrs)
        POOL.close_all()  # the connection set-up counts, as for the others

    batch = "".join(f"put {name} {out}/\n" for name in names)
    bench.compare(f"sftp {count} x 64 KiB via move_it", "sftp -b batch",
                  lambda: run(["sftp", "-q", *sshd.ssh_opts(), "-b", "-",
                               f"{sshd.user}@{sshd.host}"], stdin=batch), ours, clean)
    python = REFERENCE / "bin" / "python"
    if python.exists():
        script = work / "reference_move_it.py"
        script.write_text(REFERENCE_SCRIPT)

        def reference() -> None:
            subprocess.run([str(python), str(script), str(listing), dest, sshd.key_filename],
                           check=True, capture_output=True, text=True)

        bench.repeat, saved = 1, bench.repeat  # 0.19 takes minutes; once is enough
        bench.compare(f"sftp {count} x 64 KiB via move_it", "trollmoves 0.19 move_it",
                      reference, ours, clean)
        bench.repeat = saved
    else:
        print(f"(no reference venv at {REFERENCE}: skipping the trollmoves 0.19 comparison)")


def main() -> None:
    """Parse options, start the servers, run the cases, print the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", choices=["", "local", "sftp", "s3", "ftp", "small"])
    args = parser.parse_args()
    bench = Bench(args.repeat)
    with tempfile.TemporaryDirectory(prefix="trollmoves-bench-", dir="/tmp") as tmp, \
            contextlib.ExitStack() as stack:
        work = Path(tmp)
        os.environ.update(servers.aws_test_env())
        stack.enter_context(servers.isolated_home(work / "home"))  # trusts the test sshd's key
        sshd = servers.start_sshd(work / "sshd")
        ftpd = servers.start_ftpd(work / "ftpd")
        moto = servers.start_moto(work / "moto")
        try:
            if args.only != "small":
                large_file_cases(bench, work, args.size_mib, sshd, ftpd, moto, args.only)
            if args.only in {"", "small"}:
                small_files_case(bench, work, args.files, sshd)
        finally:
            for server in (sshd, ftpd, moto):
                server.stop()
    print()
    print(bench.report())


if __name__ == "__main__":
    main()
