#!/usr/bin/env python3
"""bench.py: what the broker costs, beside direct access, nginx and a bare aiohttp proxy (issue 5).

    .venv/bin/python bench.py              # every measurement; prints one table and writes BENCH.md
    .venv/bin/python bench.py --quick      # fewer rounds: a smoke run (writes BENCH.md only with --md)

Every server runs as its own process on 127.0.0.1: mgpusim's simulated consumers and GPU, an echo consumer
of our own (``bench.py echo-consumer``), the broker (``mgpumanager.py``, once per event loop), nginx as a
plain reverse proxy (Debian's, when installed or installable), and a bare aiohttp proxy (``bench.py
bare-proxy``: one shared ClientSession, read the body, forward it, answer), which is the floor any Python
proxy can reach. The client is this process: one aiohttp ClientSession with keep-alive.

Measurement 8 (issue 12) plays mixed workloads, TTS and image jobs arriving together, to brokers of their
own, side by side: one as configured by default, one with ``scheduler.max_overtake_s: 0`` (strict arrival
order; where the loader does not know the key yet, the strict one alone, the other marked so); issue 12's
burst also a third time, split between two clients (issue 23's fair share: ``auth.clients``, where the loader
knows them).

Measurements 9 and 10 are issue 21's: admission (200, then 2,000 jobs sent at once behind a job that holds
the GPU: how long until all are queued, per job, and /healthz's answers meanwhile, asked by a process of its
own, ``bench.py healthz-pinger``), and the cost of a GPU reading through NVML and through nvidia-smi, each
timed by mgpumanager's own reader in a process of its own (``bench.py reading-cost``): the real library
and nvidia-smi where there is a GPU, else the NVML stub (fixtures/nvml/stub.c) and mgpusim's stand-in.

Contenders are interleaved round by round (the order rotates), each round's figures are compared within
the round, and the tables show medians of the per-round figures, so that drift hits all alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import http.client
import itertools
import json
import math
import os
import platform
import py_compile
import re
import resource
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

import mgpumanager
import mgpusim

HERE = Path(__file__).resolve().parent
PY = sys.executable
MGPUSIM = HERE / "mgpusim.py"
MANAGER = HERE / "mgpumanager.py"
KiB = 1024
MiB = 1024 * KiB
LOOPBACK = "127.0.0.1"

#: The simulated GPU and the swap: a 16 GiB card, comfyui's 13 GiB freed 300 ms after its unload returns.
GPU_TOTAL_MIB = 16384
GPU_RESERVED_MIB = 480
RELEASE_S = 0.3
SWAP_SLACK_S = 0.150
SEED_SLEEP_S = 1.0
#: Streaming: 200 token lines 5 ms apart (ollama's sim adds a final "done" line).
STREAM_LINES = 200
STREAM_INTERVAL_S = 0.005
#: How the broker is started when its loop is forced (the plain command line uses the daemon's own choice).
BROKER_SHIM = """\
import runpy, sys
mode = sys.argv[1]
if mode == "asyncio":
    sys.modules["uvloop"] = None  # the daemon's `import uvloop` fails: the default loop
elif mode == "uvloop":
    import asyncio, uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
PROFILE_INTERVAL_S = 0.001
#: Frames where an event loop waits for work: not where the broker spends its CPU.
IDLE_FRAMES = re.compile(
    r"select|epoll|poll\b|run_forever|run_until_complete|_run_once|runners|<module>|run_path"
)


# =====================================================================================================
# Small helpers
# =====================================================================================================


def component(filename: str) -> str:
    """Which part of the program a profiled frame's file belongs to."""
    for marker, name in (
        ("mgpumanager.py", "mgpumanager.py"),
        ("/aiohttp/", "aiohttp"),
        ("/multidict/", "multidict/yarl"),
        ("/yarl/", "multidict/yarl"),
        ("/logging/", "logging"),
        ("/asyncio/", "asyncio"),
        ("/uvloop/", "uvloop"),
    ):
        if marker in filename:
            return name
    return "other (stdlib, C calls)"


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def med(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def proc_status_kib(pid: int, key: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uses_uvloop(pid: int) -> bool:
    """Whether uvloop's extension is mapped into the process (so its loop is uvloop's)."""
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); whether it worked."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def count_lines(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all CPUs), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listening socket's backlog was full
    (TcpExt ListenOverflows, the whole machine's), or None where /proc/net/netstat does not say."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            counts = dict(zip(names.split(), values.split(), strict=False))
            return int(counts["ListenOverflows"]) if "ListenOverflows" in counts else None
    return None


def own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have been waited for (servers, nvidia-smi)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def have_module(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def ms(seconds: float, digits: int = 2) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.{digits}f} ms"


def secs(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    return f"{seconds:.2f} s" if abs(seconds) < 10 else f"{seconds:.1f} s"


def counted(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def shown(value: Any) -> str:
    """A figure of the broker's JSON: seconds as secs() writes them, null as "not seen"."""
    if value is None:
        return "not seen"
    return secs(value) if isinstance(value, (int, float)) else str(value)


def plus_ms(seconds: float, digits: int = 2) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:+.{digits}f} ms"


# =====================================================================================================
# The servers of our own: echo consumer and bare proxy (each run as its own process)
# =====================================================================================================


async def serve_app(app: web.Application, port: int) -> None:
    """Serve app on loopback:port, print READY, run until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, LOOPBACK, port, backlog=2048).start()
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await runner.cleanup()


def echo_app() -> web.Application:
    """A consumer that answers fast and records, in its own process, when each /echo began and ended.

    POST /echo?n=N[&sleep=S]   read the body, answer N bytes; the span (request received, answer written)
                               is kept for GET /gaps
    POST /sink                 read the body as it comes without keeping it, answer its length
    POST /slow?max=S           answer once POST /release is called (or after S seconds, at most 120)
    GET  /state, /gaps, /health
    """
    spans: list[tuple[float, float]] = []
    slow: dict[str, Any] = {"event": asyncio.Event(), "waiting": 0}

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "loaded": True})

    async def echo(request: web.Request) -> web.StreamResponse:
        start = time.monotonic()
        await request.read()
        n = min(int(request.query.get("n", "1024")), 64 * MiB)
        pause = min(float(request.query.get("sleep", "0")), 10.0)
        if pause > 0:
            await asyncio.sleep(pause)
        resp = web.Response(body=b"x" * n, content_type="application/octet-stream")
        await resp.prepare(request)
        await resp.write_eof()
        if len(spans) < 100_000:
            spans.append((start, time.monotonic()))
        return resp

    async def sink(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        return web.json_response({"bytes": n})

    async def slow_route(request: web.Request) -> web.Response:
        await request.read()
        event = slow["event"]
        slow["waiting"] += 1
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), min(float(request.query.get("max", "60")), 120.0))
        finally:
            slow["waiting"] -= 1
        return web.json_response({"released": event.is_set()})

    async def release(request: web.Request) -> web.Response:
        slow["event"].set()
        slow["event"] = asyncio.Event()
        return web.json_response({"released": True})

    async def state(request: web.Request) -> web.Response:
        return web.json_response({"slow_waiting": slow["waiting"], "spans": len(spans)})

    async def gaps(request: web.Request) -> web.Response:
        data = list(spans)
        spans.clear()
        return web.json_response({"spans": data})

    app = web.Application(client_max_size=128 * MiB)
    app.router.add_get("/health", health)
    app.router.add_post("/echo", echo)
    app.router.add_post("/sink", sink)
    app.router.add_post("/slow", slow_route)
    app.router.add_post("/release", release)
    app.router.add_get("/state", state)
    app.router.add_get("/gaps", gaps)
    return app


SESSION = web.AppKey("session", aiohttp.ClientSession)


def bare_proxy_app(upstream: str, lock: bool, stream: bool = False) -> web.Application:
    """The floor: one shared session; read the body, forward it, read the answer, answer.

    With ``lock``, one asyncio.Lock around the forward serialises the jobs as the broker's GPU lock does.
    With ``stream``, the answer is relayed chunk by chunk as it comes (the floor for streaming).
    """
    gate = asyncio.Lock() if lock else None
    upstream = upstream.rstrip("/")

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session = request.app[SESSION]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/octet-stream")}

        async def go() -> web.StreamResponse:
            async with session.request(
                request.method, upstream + request.path_qs, data=body, headers=headers
            ) as r:
                ctype = r.headers.get("Content-Type", "application/octet-stream")
                if stream:
                    resp = web.StreamResponse(status=r.status, headers={"Content-Type": ctype})
                    await resp.prepare(request)
                    while chunk := await r.content.readany():
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp
                data = await r.read()
                return web.Response(body=data, status=r.status, headers={"Content-Type": ctype})

        if gate is None:
            return await go()
        async with gate:
            return await go()

    async def session_ctx(app: web.Application) -> Any:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        yield
        await app[SESSION].close()

    app = web.Application(client_max_size=128 * MiB)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def run_server(app_factory: Callable[[], web.Application], port: int, use_uvloop: bool) -> int:
    if use_uvloop:
        import uvloop  # noqa: PLC0415 (optional)

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def main() -> None:
        await serve_app(app_factory(), port)

    asyncio.run(main())
    return 0


def healthz_pinger(url: str, interval_s: float) -> int:
    """``bench.py healthz-pinger``: GET ``url`` one at a time (keep-alive), ``interval_s`` apart, until a line
    (or the end) comes on stdin; then print every sample as JSON: [wall-clock start, seconds, status].

    A process of its own, with a blocking client: what it measures is the broker's answer, not the
    benchmark's own event loop, busy sending thousands of requests meanwhile."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or LOOPBACK, parts.port or 80, timeout=120)
    samples: list[tuple[float, float, int]] = []
    print("READY", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        wall, t0 = time.time(), time.perf_counter()
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        resp.read()
        samples.append((wall, time.perf_counter() - t0, resp.status))
        time.sleep(interval_s)
    conn.close()
    print(json.dumps(samples), flush=True)
    return 0


async def reading_cost(args: argparse.Namespace) -> int:
    """``bench.py reading-cost``: time GPU readings through one reader (gpu.reader), as the broker makes
    them (mgpumanager.GpuReader); print JSON: the reader, seconds per reading of the GPU line alone and of
    a whole one, seconds per raw NVML memory call (NVML only), and one reading's figures; exit status 3
    where that reader does not read (NVML does not load)."""
    gpu = mgpumanager.GpuConfig(nvidia_smi=tuple(shlex.split(args.smi)), reader=args.reader)
    config = mgpumanager.parse_config(
        {
            "consumers": {
                "x": {
                    "url": "http://127.0.0.1:9",
                    "health": {"path": "/"},
                    "paths": {"k": {"path": "/"}},
                    "vram_resident_mib": 1,
                }
            }
        }
    )
    reader = mgpumanager.GpuReader(mgpumanager.Shared(dataclasses.replace(config, gpu=gpu)))
    out: dict[str, Any] = {"memory": [], "whole": [], "call": []}
    try:
        try:
            first = await reader.read(own=True)  # (the choice, and NVML's initialisation: not timed)
        except mgpumanager.GpuError as e:
            out["error"] = str(e)
        out["reader"] = reader.reader  # (named, never chosen: an NVML that does not load fails, above)
        if "error" in out:
            print(json.dumps(out))
            return 3
        out["reading"] = {
            "name": first.name,
            "total_mib": first.total_mib,
            "used_mib": first.used_mib,
            "free_mib": first.free_mib,
            "processes": [[p.pid, p.used_mib] for p in first.processes],
            "names": [p.name for p in first.processes],
        }
        for key, read in (
            ("memory", reader.read_memory),
            ("whole", functools.partial(reader.read, own=True)),
        ):
            for _ in range(args.n):
                t0 = time.perf_counter()
                await read()
                out[key].append(time.perf_counter() - t0)
        if args.reader == "nvml" and args.calls:
            import pynvml  # noqa: PLC0415 (NVML's own call, beside the reader: only here)

            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            for _ in range(args.calls):
                t0 = time.perf_counter()
                pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
                out["call"].append(time.perf_counter() - t0)
    finally:
        await reader.close()
    print(json.dumps(out))
    return 0


# =====================================================================================================
# Child processes
# =====================================================================================================


def open_log(path: Path) -> Any:
    return open(path, "wb")  # the caller's with-block closes it


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Children:
    """Every server the benchmark starts; all stopped (by their pid) at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.children: list[Child] = []
        self._drains: set[asyncio.Task[None]] = set()

    async def spawn(self, name: str, argv: Sequence[str], *, ready_line: bytes | None = None) -> Child:
        """Start a child; with ready_line, wait (at most 30 s) until its stdout prints that line."""
        log = self.workdir / f"{name}.log"
        with open_log(log) as err:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if ready_line else err,
                stderr=err,
                start_new_session=True,
                cwd=HERE,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        if ready_line is not None:
            assert proc.stdout is not None
            deadline = time.monotonic() + 30
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{name} did not print {ready_line!r} within 30 s; see {log}")
                try:
                    line = await asyncio.wait_for(proc.stdout.readline(), left)
                except asyncio.TimeoutError:
                    continue
                if not line:
                    raise RuntimeError(f"{name} exited before it was ready: {log.read_text()[-2000:]}")
                if line.strip() == ready_line:
                    break
            task = asyncio.create_task(self._drain(proc.stdout))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        return child

    @staticmethod
    async def _drain(stream: asyncio.StreamReader) -> None:
        while await stream.read(65536):
            pass

    async def stop(self, child: Child) -> None:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(child.proc.wait(), 10)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await asyncio.wait_for(child.proc.wait(), 5)
        if child in self.children:
            self.children.remove(child)

    async def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            await self.stop(child)
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)


# =====================================================================================================
# The setup: config, nginx
# =====================================================================================================


def broker_config(port: int, smi: str, ports: dict[str, int], max_queue: int = 1100) -> str:
    """The broker's config: consumers.yaml's shape, pointed at the simulated consumers and the echo one."""
    q = json.dumps
    return f"""\
# Written by bench.py: mgpusim's consumers on a simulated 16 GiB GPU, and bench.py's echo consumer.
listen: {LOOPBACK}:{port}
gpu: {{nvidia_smi: {q(smi)}, reader: nvidia-smi, index: 0, cushion_mib: 256, query_timeout_s: 5}}
scheduler: {{max_queue: {max_queue}, queue_timeout_s: 120, max_evictions: 5, vram_wait_s: 10, aging_s: 60,
            max_body_mib: 64}}
health: {{interval_s: 5, timeout_s: 2}}
routing: {{echo: echo, slow: echo, sink: echo, stt: mvoice, tts: mvoice, llm: ollama, image: comfyui}}
consumers:
  echo:                         # bench.py echo-consumer: reports loaded=true, never evicted
    url: http://{LOOPBACK}:{ports["echo"]}
    health: {{method: GET, path: /health}}
    paths:
      echo: {{method: POST, path: /echo}}
      slow: {{method: POST, path: /slow}}
      sink: {{method: POST, path: /sink}}
    vram_resident_mib: 100
    can_coexist_with: [mvoice, comfyui, ollama]
  mvoice:
    url: http://{LOOPBACK}:{ports["mvoice"]}
    health: {{method: GET, path: /health}}
    paths:
      tts: {{method: POST, path: /api/synthesize}}
      stt: {{method: POST, path: /api/transcribe}}
    vram_resident_mib: 2800
    unload: {{method: POST, path: /api/admin/unload}}
    load: {{method: POST, path: /api/admin/load}}
    can_coexist_with: [ollama]
    priority: 3
  comfyui:
    url: http://{LOOPBACK}:{ports["comfyui"]}
    health: {{method: GET, path: /system_stats}}
    paths:
      image:
        method: POST
        path: /prompt
        hold_until: {{method: GET, path: "/history/{{prompt_id}}", poll_s: 0.05, timeout_s: 30}}
    vram_resident_mib: 13000
    unload: {{method: POST, path: /free, body: {{free_memory: true}}}}
    can_coexist_with: [ollama]
  ollama:
    url: http://{LOOPBACK}:{ports["ollama"]}
    health: {{method: GET, path: /}}
    paths:
      llm: {{method: POST, path: /api/generate}}
    vram_resident_mib: 100
    vram_managed: true
"""


def nginx_config(workdir: Path, port: int, upstream_port: int) -> str:
    tmp = workdir / "nginx"
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 128m;
    upstream consumer {{ server {LOOPBACK}:{upstream_port}; keepalive 32; }}
    server {{
        listen {LOOPBACK}:{port};
        location / {{
            proxy_pass http://consumer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx_version(path: str) -> str:
    done = subprocess.run([path, "-v"], capture_output=True, text=True, check=False, timeout=10)
    return (done.stderr or done.stdout).strip()


def find_nginx(notes: list[str]) -> str | None:
    """Debian's nginx: on the PATH, in /usr/sbin, or installed now with apt-get (as root, if quick)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        notes.append("nginx is not installed (and this is not root with apt-get): its column is skipped.")
        return None
    print("bench: nginx not found; trying `apt-get install -y nginx` (at most 150 s) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "nginx"],
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        notes.append(f"nginx is not installed and `apt-get install nginx` failed ({e}): skipped.")
        return None
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        notes.append(f"nginx is not installed and `apt-get install nginx` failed ({tail[0]}): skipped.")
        return None
    notes.append("nginx was not installed; bench.py installed Debian's package with apt-get.")
    return found


# =====================================================================================================
# The mixed workload (issue 12): the traces, their lower bound, overtaking
# =====================================================================================================

#: mgpusim's mvoice and ComfyUI as issue 12 times them (seconds): the load (mvoice's load route; ComfyUI
#: loads its model in its first render after an unload), one job's GPU work, and how long after its unload
#: answered a consumer's memory shows up free. Together they do not fit the 16 GiB card.
MIX_SIMS: dict[str, dict[str, float]] = {
    "mvoice": {"load_s": 1.0, "work_s": 0.2, "release_s": 0.5},
    "comfyui": {"load_s": 4.0, "work_s": 2.0, "release_s": 0.5},
}
#: Which consumer serves each kind of the mixed workload; mvoice is loaded when a trace starts.
MIX_ROUTES = {"tts": "mvoice", "image": "comfyui"}
MIX_LOADED_AT_START = "mvoice"
#: ComfyUI's hold polls /history this often, as in consumers.yaml.
MIX_HOLD_POLL_S = 0.5
#: A mixed-workload job not answered (or its hold not ended) within this counts as failed.
MIX_JOB_TIMEOUT_S = 240.0
#: The longest a whole trace may take before its run is given up.
MIX_RUN_TIMEOUT_S = 300.0
#: The broker's aging_s in these runs (consumers.yaml's): the overtaking figure uses it too.
MIX_AGING_S = 60.0
#: Issue 21's per-job targets: added latency p50 at most this times the bare aiohttp proxy's (each loop); a
#: stream's first line at most this much after the bare streaming proxy's (s).
ADDED_RATIO_TARGET = 1.2
FIRST_LINE_TARGET_S = 0.0003
#: Issue 12's targets for trace 1: time to idle within 1.3x of the lower bound, TTS p95 under 5 s.
MIX_RATIO_TARGET = 1.3
MIX_TTS_P95_TARGET_S = 5.0
#: Issue 23: the burst split between two clients (the trace's jobs taking turns), each with its token; the
#: admin's token reads the status and the events.
MIX_CLIENTS = ("a", "b")
MIX_ADMIN_TOKEN = "bench-admin-token-0123456789"


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for ``token`` (none for None)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def mix_token(client: str) -> str:
    """The bench's token for a client of the split burst."""
    return f"bench-client-{client}-token-0123456789"


#: Measurement 9 (issue 21): N jobs sent at once behind a job that holds the GPU, for each N; its broker's
#: max_queue (the issue's largest); /healthz asked by a process of its own every so often meanwhile; the
#: targets: per job, the larger N at most ADMISSION_RATIO_TARGET x the smaller's, /healthz p99 under 20 ms.
ADMISSION_SIZES = (200, 2000)
ADMISSION_MAX_QUEUE = 10000
HEALTHZ_INTERVAL_S = 0.005
ADMISSION_RATIO_TARGET = 2.0
#: Measurement 11 (issue 20): starts of each command line, and the target (launcher vs the import).
CLI_ROUNDS = 20
CLI_RATIO_TARGET = 2.0
HEALTHZ_P99_TARGET_S = 0.020
#: What issue 21 measured on main before it (N, seconds to queue, /healthz's longest stall).
ADMISSION_ISSUE_FIGURES = ((250, 0.9, 0.5), (1000, 7.4, 6.5), (2000, 28.8, 27.0))
#: Measurement 10 (issue 21): readings per round through NVML and through nvidia-smi (each kind: the GPU
#: line alone, and whole), the rounds alternating the two; raw NVML calls timed once per round.
READING_ROUNDS = 3
NVML_READINGS = 300
SMI_READINGS = 15
NVML_CALLS = 2000


@dataclass(frozen=True)
class Trace:
    """A mixed workload: which jobs arrive when, and the consumers' priorities."""

    name: str
    #: One line for the report: what arrives when.
    title: str
    #: (offset in s from the first request, kind), in arrival order.
    jobs: tuple[tuple[float, str], ...]
    #: consumer -> priority (0-4) in the broker's config.
    priority: dict[str, int]


def trace_burst() -> Trace:
    """Issue 12's trace: 8 TTS and 4 images at equal priority, interleaved, over one second."""
    pattern = "TTITITTITITT"
    step = 1.0 / (len(pattern) - 1)
    jobs = tuple((round(i * step, 3), "tts" if c == "T" else "image") for i, c in enumerate(pattern))
    title = (
        f"8 TTS and 4 images at equal priority (2), one every {step * 1000:.0f} ms in the order"
        f" {' '.join(pattern)} (T: TTS, I: image), the first at 0 s, the last at 1 s"
    )
    return Trace("trace 1", title, jobs, {"mvoice": 2, "comfyui": 2})


def trace_stream(quick: bool) -> Trace:
    """A steady stream of TTS (priority 3) with bursts of images at a lower priority (2)."""
    length, bursts = (10.0, ((3.0, 2), (6.0, 2))) if quick else (20.0, ((5.0, 3), (12.0, 3)))
    jobs = [(round(i * 0.5, 3), "tts") for i in range(int(length / 0.5))]
    for at, n in bursts:  # 10 ms apart, just after the TTS of the same second
        jobs += [(round(at + 0.01 * (k + 1), 3), "image") for k in range(n)]
    jobs.sort()
    burst_text = " and ".join(f"{n} at {at:g} s" for at, n in bursts)
    title = (
        f"TTS (priority 3) every 0.5 s for {length:g} s ({int(length / 0.5)} jobs), images (priority 2)"
        f" in bursts: {burst_text} (10 ms apart)"
    )
    return Trace("trace 2", title, tuple(jobs), {"mvoice": 3, "comfyui": 2})


def lower_bound(trace: Trace, sims: Mapping[str, Mapping[str, float]] = MIX_SIMS) -> float:
    """The soonest any scheduler could finish the trace, knowing it all in advance (s from its first job).

    The GPU runs one job at a time; each consumer's jobs are alike, so serving them in arrival order loses
    nothing, and a schedule is an interleaving of the consumers' queues: a dynamic programme over (jobs done
    per consumer, which one is loaded) keeps the earliest time each state can be reached. A job starts once
    it arrived and the GPU is free, after a swap if its consumer is not the loaded one (the loaded one's
    release_s, then its own load_s; like the broker, no swap starts before a job needs it). Priorities are
    ignored, and the broker's own costs (GPU readings, polls, HTTP) count 0.
    """
    names = sorted({MIX_ROUTES[kind] for _, kind in trace.jobs} | {MIX_LOADED_AT_START})
    arrivals = {n: [at for at, kind in trace.jobs if MIX_ROUTES[kind] == n] for n in names}
    frontier: dict[tuple[tuple[int, ...], str], float] = {((0,) * len(names), MIX_LOADED_AT_START): 0.0}
    for _ in trace.jobs:  # each step runs one more job
        reached: dict[tuple[tuple[int, ...], str], float] = {}
        for (done, loaded), t in frontier.items():
            for i, name in enumerate(names):
                if done[i] == len(arrivals[name]):
                    continue
                swap = 0.0 if name == loaded else sims[loaded]["release_s"] + sims[name]["load_s"]
                end = max(t, arrivals[name][done[i]]) + swap + sims[name]["work_s"]
                key = ((*done[:i], done[i] + 1, *done[i + 1 :]), name)
                if end < reached.get(key, math.inf):
                    reached[key] = end
        frontier = reached
    return min(frontier.values())


@dataclass
class MixJob:
    """One job of a mixed-workload run: what the client saw, and the broker's events for it."""

    index: int
    kind: str
    #: Planned offset from the first request (s).
    at: float
    request_id: str
    #: Wall-clock times (time.time()): request sent; answer read whole.
    sent: float = math.nan
    answered: float = math.nan
    status: int | None = None
    error: str | None = None
    #: From /v1/events: the broker's job id and base priority; each event's (position in the stream,
    #: wall-clock time); eta_s if the queued event carries one.
    job: int | None = None
    priority: int = 0
    queued: tuple[int, float] | None = None
    granted: tuple[int, float] | None = None
    ended: tuple[int, float] | None = None
    hold_ended: tuple[int, float] | None = None
    eta_s: float | None = None
    #: Filled by overtaking(): how long it was overtaken, and by which jobs (their indexes).
    overtaken_s: float = 0.0
    overtakers: list[int] = field(default_factory=list)

    @property
    def done(self) -> float:
        """When it let the GPU go (wall clock): its hold's end, else its own end, else its answer."""
        for mark in (self.hold_ended, self.ended):
            if mark is not None:
                return mark[1]
        return self.answered

    @property
    def latency(self) -> float:
        """Request sent to answer complete (TTS), or to the end of its hold (images)."""
        if self.status != 200:
            return math.nan
        if self.kind == "image":
            return self.hold_ended[1] - self.sent if self.hold_ended is not None else math.nan
        return self.answered - self.sent


def effective_priority(job: MixJob, t: float, aging_s: float) -> int:
    """The broker's rule: the base priority plus one level per aging_s waited, at most PRIORITY_MAX."""
    assert job.queued is not None
    return min(mgpumanager.PRIORITY_MAX, job.priority + int((t - job.queued[1]) // aging_s))


def overtaking(jobs: Sequence[MixJob], aging_s: float) -> None:
    """Set each job's overtaken_s: how long, while it waited, the GPU was held by jobs that overtook it.

    K overtook J when K arrived after J (its queued event came later in the stream), was granted before J,
    and its effective priority at that grant was not above J's. J is overtaken from K's grant to K's end
    (its hold's end for an image), cut at J's own grant; the union over all such K is J's time.
    """
    seen = [j for j in jobs if j.queued is not None and j.granted is not None]
    for j in seen:
        assert j.queued is not None and j.granted is not None
        spans = []
        for k in seen:
            assert k.queued is not None and k.granted is not None
            if k is j or k.queued[0] < j.queued[0] or k.granted[0] > j.granted[0]:
                continue
            at = k.granted[1]
            if effective_priority(k, at, aging_s) > effective_priority(j, at, aging_s):
                continue
            end = min(k.done if not math.isnan(k.done) else j.granted[1], j.granted[1])
            spans.append((max(at, j.queued[1]), max(at, end)))
            j.overtakers.append(k.index)
        j.overtaken_s = union_length(spans)


def union_length(spans: Sequence[tuple[float, float]]) -> float:
    """The total length of the union of [start, end] intervals."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


@dataclass
class MixRun:
    """One broker serving one trace with one scheduler setting: its processes, jobs, events, figures."""

    trace: Trace
    #: "default" (scheduler.max_overtake_s left out of the config) or "strict" (max_overtake_s: 0).
    name: str
    label: str
    #: What the config says (None: the key is left out).
    overtake: float | None
    #: The overtaking bound the run is held to (s).
    bound_s: float
    #: False: this version's loader refuses max_overtake_s (or auth.clients), so the run could not be made.
    available: bool
    #: The clients the trace's jobs are split between, taking turns (none: no auth).
    clients: tuple[str, ...] = ()
    url: str = ""
    children: list[Child] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    jobs: list[MixJob] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    #: /v1/status's scheduler.stats before the trace (after the warm-up job) and once idle after it.
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    #: /v1/status's per-consumer timings at the end (None where this version has none).
    timings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Filled by compute().
    to_idle_s: float = math.nan
    bound_lb_s: float = math.nan
    evictions: int = 0
    evicted: dict[str, int] = field(default_factory=dict)
    loads: int = 0
    evict_s: float = 0.0
    load_s: float = 0.0
    gpu_free_s: float = math.nan
    #: How many times images got the GPU after another kind (ComfyUI loads its model each time).
    image_batches: int = 0
    longest: MixJob | None = None

    def ok(self) -> list[MixJob]:
        return [j for j in self.jobs if j.status == 200 and not math.isnan(j.latency)]

    @property
    def token(self) -> str | None:
        """The admin's token, for the status and the events (None: no auth)."""
        return MIX_ADMIN_TOKEN if self.clients else None

    def client_of(self, job: MixJob) -> str | None:
        """The client that sends ``job`` (they take turns), or None."""
        return self.clients[job.index % len(self.clients)] if self.clients else None

    def latencies(self, kind: str) -> list[float]:
        return [j.latency for j in self.ok() if j.kind == kind]

    @property
    def ratio(self) -> float:
        return self.to_idle_s / self.bound_lb_s

    @property
    def longest_s(self) -> float:
        return self.longest.overtaken_s if self.longest is not None else 0.0

    def compute(self) -> None:
        """The run's figures from its jobs and events."""
        by_request = {j.request_id: j for j in self.jobs}
        by_id: dict[int, MixJob] = {}
        evicting: dict[str, float] = {}
        loading: dict[str, float] = {}
        for seq, ev in enumerate(self.events):
            name, ts = ev.get("event"), parse_ts(ev["ts"])
            if name == "queued" and ev.get("request_id") in by_request:
                job = by_request[ev["request_id"]]
                job.job, job.priority, job.queued = ev["job"], ev["priority"], (seq, ts)
                job.eta_s = ev.get("eta_s")
                by_id[job.job] = job
            elif name in ("granted", "finished", "failed", "cancelled", "rejected", "hold_ended"):
                job = by_id.get(ev.get("job"))  # type: ignore[arg-type]
                if job is None:
                    continue
                if name == "granted":
                    job.granted = (seq, ts)
                elif name == "hold_ended":
                    job.hold_ended = (seq, ts)
                else:
                    job.ended = (seq, ts)
            elif name == "evicting":
                evicting[ev["consumer"]] = ts
            elif name == "evicted":
                self.evicted[ev["consumer"]] = self.evicted.get(ev["consumer"], 0) + 1
                self.evict_s += ts - evicting.pop(ev["consumer"], ts)
            elif name == "loading":
                loading[ev["consumer"]] = ts
            elif name == "loaded":
                self.load_s += ts - loading.pop(ev["consumer"], ts)
        missing = [j.index for j in self.jobs if j.job is None]
        if missing:
            self.notes.append(f"no queued event was seen for jobs {missing}")
        self.evictions = self.after.get("evictions", 0) - self.before.get("evictions", 0)
        self.loads = self.after.get("loads", 0) - self.before.get("loads", 0)
        self.image_batches = sum(1 for k, _ in itertools.groupby(self.granted_kinds()) if k == "image")
        first = min(j.sent for j in self.jobs)
        idle = max(j.done for j in self.jobs)
        self.to_idle_s = idle - first
        self.bound_lb_s = lower_bound(self.trace)
        held = [(j.granted[1], j.done) for j in self.jobs if j.granted is not None]
        self.gpu_free_s = self.to_idle_s - union_length(held)
        overtaking(self.jobs, MIX_AGING_S)
        self.longest = max(self.jobs, key=lambda j: j.overtaken_s)
        if self.longest.overtaken_s == 0:
            self.longest = None
        answered = {j.index for j in self.ok()}
        failed = [
            f"{j.index} {j.kind}: {j.error or 'no end seen'}" for j in self.jobs if j.index not in answered
        ]
        if failed:
            self.notes.append(f"{len(failed)} jobs failed ({'; '.join(failed[:5])})")

    def granted_kinds(self) -> list[str]:
        """The kinds of the jobs in the order the broker granted them."""
        granted = sorted((j for j in self.jobs if j.granted is not None), key=lambda j: j.granted or (0, 0))
        return [j.kind for j in granted]

    def grant_order(self) -> str:
        """The grant order with runs counted: "2T I T I 2T" (T: TTS, I: image)."""
        runs = [(k, len(list(g))) for k, g in itertools.groupby(self.granted_kinds())]
        return " ".join(f"{n if n > 1 else ''}{'T' if k == 'tts' else 'I'}" for k, n in runs)


def overtake_default() -> float:
    """scheduler.max_overtake_s's default as the loader has it (issue 12 says 30; so where it is unknown)."""
    fields = getattr(getattr(mgpumanager, "SchedulerConfig", None), "__dataclass_fields__", {})
    default = getattr(fields.get("max_overtake_s"), "default", None)
    return float(default) if isinstance(default, (int, float)) else 30.0


def parse_ts(text: str) -> float:
    """An event's ts ("2026-11-27T03:24:01.123Z") as a Unix time."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def mixed_config(
    port: int,
    smi: str,
    ports: dict[str, int],
    trace: Trace,
    overtake: float | None,
    clients: Sequence[str] = (),
) -> str:
    """The broker's config for a mixed-workload run: what matters here of consumers.yaml's mvoice, ComfyUI;
    with ``clients``, the admin's token and one token per client."""
    q = json.dumps
    bound = "" if overtake is None else f", max_overtake_s: {overtake:g}"
    auth = ""
    if clients:
        each = ", ".join(f"{c}: {{token: {mix_token(c)}}}" for c in clients)
        auth = f"auth: {{token: {MIX_ADMIN_TOKEN}, clients: {{{each}}}}}\n"
    return (
        auth
        + f"""\
# Written by bench.py (measurement 8): mgpusim's mvoice and ComfyUI on a simulated 16 GiB GPU.
listen: {LOOPBACK}:{port}
gpu: {{nvidia_smi: {q(smi)}, reader: nvidia-smi, index: 0, cushion_mib: 256, query_timeout_s: 5}}
scheduler: {{max_queue: 64, queue_timeout_s: 300, max_evictions: 5, vram_wait_s: 10,
            aging_s: {MIX_AGING_S:g}{bound}}}
health: {{interval_s: 5, timeout_s: 2}}
routing: {{tts: mvoice, image: comfyui}}
consumers:
  mvoice:
    url: http://{LOOPBACK}:{ports["mvoice"]}
    health: {{method: GET, path: /health}}
    paths:
      tts: {{method: POST, path: /api/synthesize}}
    vram_resident_mib: 2800
    unload: {{method: POST, path: /api/admin/unload}}
    load: {{method: POST, path: /api/admin/load}}
    priority: {trace.priority["mvoice"]}
  comfyui:
    url: http://{LOOPBACK}:{ports["comfyui"]}
    health: {{method: GET, path: /system_stats}}
    paths:
      image:
        method: POST
        path: /prompt
        hold_until:
          {{method: GET, path: "/history/{{prompt_id}}", poll_s: {MIX_HOLD_POLL_S:g}, timeout_s: 900}}
    vram_resident_mib: 13000
    unload: {{method: POST, path: /free, body: {{free_memory: true}}}}
    priority: {trace.priority["comfyui"]}
"""
    )


# =====================================================================================================
# The benchmark
# =====================================================================================================


@dataclass
class Row:
    measurement: str
    broker: str
    contenders: str
    target: str
    met: bool | None  # None: no target


@dataclass
class Bench:
    quick: bool
    workdir: Path
    children: Children
    notes: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    targets: list[tuple[str, bool | None, str]] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    #: Figures the closing analysis needs (seconds): gap broker/bare, first line broker/bare over direct,
    #: CPU per job broker/bare.
    facts: dict[str, tuple[float, float]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    loops: dict[str, str] = field(default_factory=dict)
    session: aiohttp.ClientSession | None = None
    counter: Path = Path()
    broker_log: Path = Path()
    ports: dict[str, int] = field(default_factory=dict)
    smi: str = ""
    config: Path = Path()
    nginx: str | None = None
    #: Measurement 8: its runs, its section of BENCH.md, and its part of the closing analysis.
    mix_runs: list[MixRun] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)
    mix_analysis: list[str] = field(default_factory=list)

    # ---- setup ------------------------------------------------------------------------------------

    async def start(self) -> None:
        names = [
            "mvoice",
            "comfyui",
            "ollama",
            "echo",
            "broker",
            "broker_alt",
            "bare",
            "bare_uv",
            "bare_lock",
            "bare_stream",
        ]
        names += ["nginx", "profiled", "fresh"]
        self.ports = dict(zip(names, mgpusim.free_ports(len(names)), strict=True))
        state = self.workdir / "gpu.json"
        self.counter = self.workdir / "nvidia-smi.count"
        wrapper = self.workdir / "nvidia-smi"
        wrapper.write_text(
            "#!/bin/sh\n# Counts every nvidia-smi process the broker starts, then answers as mgpusim.\n"
            f"echo x >> {shlex.quote(str(self.counter))}\n"
            f"exec {shlex.quote(PY)} {shlex.quote(str(MGPUSIM))} nvidia-smi"
            f' --state {shlex.quote(str(state))} "$@"\n'
        )
        wrapper.chmod(0o755)
        self.smi = str(wrapper)
        p = self.ports
        specs = [
            f"mvoice=mvoice:{p['mvoice']}",
            f"comfyui=comfyui:{p['comfyui']},vram_mib=13000,release_s={RELEASE_S},loaded=true,work_s=0.05",
            f"ollama=ollama:{p['ollama']},vram_mib=100,lines={STREAM_LINES},line_interval_s={STREAM_INTERVAL_S}",
        ]
        argv = [PY, str(MGPUSIM), "consumers", "--state", str(state)]
        argv += ["--gpu-total-mib", str(GPU_TOTAL_MIB), "--reserved-mib", str(GPU_RESERVED_MIB), *specs]
        await self.children.spawn("consumers", argv, ready_line=b"READY all")
        await self.children.spawn(
            "echo",
            [PY, str(HERE / "bench.py"), "echo-consumer", "--port", str(p["echo"])],
            ready_line=b"READY",
        )
        self.urls["direct"] = f"http://{LOOPBACK}:{p['echo']}"
        self.urls["mvoice"] = f"http://{LOOPBACK}:{p['mvoice']}"
        self.urls["ollama"] = f"http://{LOOPBACK}:{p['ollama']}"

        self.config = self.workdir / "broker.yaml"
        self.config.write_text(broker_config(p["broker"], "nvidia-smi", p))
        check = await asyncio.create_subprocess_exec(
            PY, str(MANAGER), "--check", "--config", str(self.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(check.communicate(), 30)
        if check.returncode != 0:
            raise RuntimeError(f"mgpumanager --check refused the generated config:\n{out.decode()}")

        # The broker as the unit runs it (the launcher: the byte-compiled file run as a module; uvloop when it
        # is installed), and once with the other loop.
        self.broker_log = await self.start_broker("broker", [PY, "-c", self.launcher()])
        have_uv = have_module("uvloop")
        if have_uv:
            other = "asyncio" if self.loops["broker"] == "uvloop" else "uvloop"
            await self.start_broker("broker_alt", [PY, "-c", BROKER_SHIM, other, str(MANAGER)])
        else:
            self.notes.append(
                "uvloop is not installed in .venv: measurement 1 ran with asyncio's default loop only."
            )

        direct = self.urls["direct"]
        bench = [PY, str(HERE / "bench.py"), "bare-proxy", "--upstream", direct]
        await self.children.spawn("bare", [*bench, "--port", str(p["bare"])], ready_line=b"READY")
        self.urls["bare"] = f"http://{LOOPBACK}:{p['bare']}"
        self.loops["bare"] = "asyncio"
        if have_uv:
            await self.children.spawn(
                "bare_uv", [*bench, "--port", str(p["bare_uv"]), "--uvloop"], ready_line=b"READY"
            )
            self.urls["bare_uv"] = f"http://{LOOPBACK}:{p['bare_uv']}"
            self.loops["bare_uv"] = "uvloop"
        child = await self.children.spawn(
            "bare_lock", [*bench, "--port", str(p["bare_lock"]), "--lock"], ready_line=b"READY"
        )
        self.pids["bare_lock"] = child.pid
        self.urls["bare_lock"] = f"http://{LOOPBACK}:{p['bare_lock']}"
        # The streaming floor, in front of the simulated ollama, on the broker's own loop.
        argv = [PY, str(HERE / "bench.py"), "bare-proxy", "--upstream", self.urls["ollama"], "--stream"]
        argv += ["--port", str(p["bare_stream"])] + (["--uvloop"] if self.loops["broker"] == "uvloop" else [])
        await self.children.spawn("bare_stream", argv, ready_line=b"READY")
        self.urls["bare_stream"] = f"http://{LOOPBACK}:{p['bare_stream']}"

        self.nginx = find_nginx(self.notes)
        if self.nginx:
            (self.workdir / "nginx").mkdir()
            conf = self.workdir / "nginx" / "nginx.conf"
            conf.write_text(nginx_config(self.workdir, p["nginx"], p["echo"]))
            argv = [self.nginx, "-p", str(self.workdir / "nginx"), "-c", str(conf)]
            argv += ["-e", str(self.workdir / "nginx" / "error.log")]
            await self.children.spawn("nginx", argv)
            self.urls["nginx"] = f"http://{LOOPBACK}:{p['nginx']}"
            await self.wait_http(self.urls["nginx"] + "/health", "nginx")
            self.notes.append(
                f"nginx: {nginx_version(self.nginx)}, master_process off, upstream keepalive 32."
            )

    def broker_argv(self, argv: list[str], port: int) -> list[str]:
        """The broker's command line after ``argv`` (the interpreter, maybe a profiler, the script)."""
        return [
            *argv,
            "--config",
            str(self.config),
            "--listen",
            f"{LOOPBACK}:{port}",
            "--nvidia-smi",
            self.smi,
        ]

    def launcher(self) -> str:
        """The code of the launcher `make deploy` installs (the unit's and the command line's), for a copy of
        the file byte-compiled as `make deploy` compiles it: ``python -c`` runs it."""
        home = self.workdir / "opt"
        if not (home / "mgpumanager.py").exists():
            home.mkdir(exist_ok=True)
            shutil.copy(MANAGER, home / "mgpumanager.py")
            py_compile.compile(str(home / "mgpumanager.py"), doraise=True)
        return (
            f"import runpy, sys; sys.path.insert(0, {str(home)!r});"
            " runpy.run_module('mgpumanager', run_name='__main__')"
        )

    async def start_broker(self, name: str, argv: list[str]) -> Path:
        port = self.ports[name]
        child = await self.children.spawn(name, self.broker_argv(argv, port))
        self.urls[name] = f"http://{LOOPBACK}:{port}"
        await self.wait_http(self.urls[name] + "/healthz", name, child)
        self.pids[name] = child.pid
        self.loops[name] = "uvloop" if uses_uvloop(child.pid) else "asyncio"
        assert child.log is not None
        return child.log

    async def wait_http(self, url: str, name: str, child: Child | None = None) -> None:
        assert self.session is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if child is not None and child.proc.returncode is not None:
                log = child.log.read_text()[-3000:] if child.log else ""
                raise RuntimeError(f"{name} exited with {child.proc.returncode}:\n{log}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{name} did not answer {url} within 30 s")

    # ---- client helpers ----------------------------------------------------------------------------

    async def post(
        self, url: str, body: bytes, *, timeout: float = 30, token: str | None = None
    ) -> tuple[int, bytes]:
        assert self.session is not None
        headers = {"Content-Type": "application/octet-stream"} | bearer(token)
        async with self.session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            return r.status, await r.read()

    async def get_json(self, url: str, token: str | None = None) -> Any:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=10)
        async with self.session.get(url, timeout=timeout, headers=bearer(token)) as r:
            return await r.json(content_type=None)

    async def status(self) -> dict[str, Any]:
        return await self.get_json(self.urls["broker"] + "/v1/status")

    def rounds(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def label(self, name: str) -> str:
        return {
            "direct": "direct",
            "nginx": "nginx",
            "bare": "bare aiohttp proxy (asyncio)",
            "bare_uv": "bare aiohttp proxy (uvloop)",
            "broker": f"broker ({self.loops.get('broker')})",
            "broker_alt": f"broker ({self.loops.get('broker_alt')})",
        }.get(name, name)

    # ---- 1: added latency of a small job -------------------------------------------------------------

    async def m1_latency(self) -> None:
        body = b"b" * KiB
        contenders = {"direct": self.urls["direct"] + "/echo?n=1024"}
        if "nginx" in self.urls:
            contenders["nginx"] = self.urls["nginx"] + "/echo?n=1024"
        for name in ("bare", "bare_uv"):
            if name in self.urls:
                contenders[name] = self.urls[name] + "/echo?n=1024"
        for name in ("broker", "broker_alt"):
            if name in self.urls:
                contenders[name] = self.urls[name] + "/v1/echo?n=1024"
        for url in contenders.values():  # warm-up: connections, first-job paths
            for _ in range(30):
                status, data = await self.post(url, body)
                assert status == 200 and len(data) == KiB, (url, status, data[:200])
        # As issue 5 asks: per round, each contender in turn gets a block of sequential requests.
        rounds, n = self.rounds(12, 3), self.rounds(200, 60)
        p50, p99 = await self.latency_rounds(contenders, body, rounds, n, alternate=False)
        self.report_latency(contenders, p50, p99, n, alternate=False)
        # Another view: the contenders take turns request by request, so each request finds its proxy
        # idle since its previous one (as a job arriving now and then does), not warm from a burst.
        rounds, n = self.rounds(8, 2), self.rounds(60, 20)
        p50, p99 = await self.latency_rounds(contenders, body, rounds, n, alternate=True)
        self.report_latency(contenders, p50, p99, n, alternate=True)

    async def latency_rounds(
        self, contenders: dict[str, str], body: bytes, rounds: int, n: int, *, alternate: bool
    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Per contender, the p50 and p99 latency of each round (the contenders' order rotates)."""
        names = list(contenders)
        p50: dict[str, list[float]] = {k: [] for k in names}
        p99: dict[str, list[float]] = {k: [] for k in names}
        deadline = time.monotonic() + 45

        async def one(name: str) -> float:
            t0 = time.perf_counter()
            status, data = await self.post(contenders[name], body)
            took = time.perf_counter() - t0
            assert status == 200 and len(data) == KiB, (name, status)
            return took

        for r in range(rounds):
            if time.monotonic() > deadline:
                self.notes.append(f"measurement 1 stopped after {r} rounds (its time budget)")
                break
            order = names[r % len(names) :] + names[: r % len(names)]
            lat: dict[str, list[float]] = {k: [] for k in names}
            if alternate:
                for _ in range(n):
                    for name in order:
                        lat[name].append(await one(name))
            else:
                for name in order:
                    lat[name] = [await one(name) for _ in range(n)]
            for name in names:
                p50[name].append(pct(lat[name], 50))
                p99[name].append(pct(lat[name], 99))
        return p50, p99

    def report_latency(
        self,
        contenders: dict[str, str],
        p50: dict[str, list[float]],
        p99: dict[str, list[float]],
        n: int,
        *,
        alternate: bool,
    ) -> None:
        rounds_done = len(p50["direct"])

        def added(name: str, q: dict[str, list[float]]) -> float:
            return med([q[name][i] - q["direct"][i] for i in range(rounds_done)])

        if alternate:
            self.details.append(
                f"Measurement 1, alternating: {rounds_done} rounds x {n} turns; in each turn every contender"
                " serves one request, so each request finds its proxy idle since its previous one (about"
                f" {len(contenders)} requests ago) rather than warm from a burst. Same figures as above."
            )
        else:
            self.details.append(
                f"Measurement 1: {rounds_done} rounds x {n} sequential requests per contender (1 KiB in,"
                " 1 KiB out; echo consumer, resident); added = contender - direct in the same round;"
                " medians of the rounds. The target rows use these figures."
            )
        lines = ["| contender | p50 | p99 | added p50 | added p99 |", "|---|---|---|---|---|"]
        for name in contenders:
            lines.append(
                f"| {self.label(name)} | {ms(med(p50[name]))} | {ms(med(p99[name]))} |"
                f" {plus_ms(added(name, p50)) if name != 'direct' else '-'} |"
                f" {plus_ms(added(name, p99)) if name != 'direct' else '-'} |"
            )
        self.details.append("\n".join(lines))
        bare_for = {"asyncio": "bare", "uvloop": "bare_uv"}
        for name in ("broker", "broker_alt"):
            if name not in contenders:
                continue
            loop = self.loops[name]
            bare = bare_for[loop] if bare_for[loop] in contenders else "bare"
            b50, b99, f50 = added(name, p50), added(name, p99), added(bare, p50)
            ratio = b50 / f50 if f50 > 0 else math.inf
            ok50 = b50 <= ADDED_RATIO_TARGET * f50
            cont = f"bare {plus_ms(f50)}, direct {ms(med(p50['direct']))}"
            if "nginx" in contenders:
                cont += f", nginx {plus_ms(added('nginx', p50))}"
            how = ", alternating" if alternate else ""
            self.rows.append(
                Row(
                    f"1 added latency p50, {loop}{how}",
                    f"{plus_ms(b50)} ({ratio:.2f}x bare)",
                    cont,
                    f"<= {ADDED_RATIO_TARGET:g}x bare",
                    ok50,
                )
            )
            cont99 = f"bare {plus_ms(added(bare, p99))}, direct p99 {ms(med(p99['direct']))}"
            self.rows.append(
                Row(f"1 added latency p99, {loop}{how}", plus_ms(b99), cont99, "<= 5 ms", b99 <= 0.005)
            )
            per_round = sorted(
                (p50[name][i] - p50["direct"][i]) / (p50[bare][i] - p50["direct"][i])
                for i in range(rounds_done)
                if p50[bare][i] > p50["direct"][i]
            )
            spread = f"; per-round ratios {per_round[0]:.2f}-{per_round[-1]:.2f}" if per_round else ""
            view = " (alternating view, not the issue's figure)" if alternate else ""
            self.targets.append(
                (
                    f"Added latency per small job, p50 ({loop} loop){view}: within {ADDED_RATIO_TARGET:g}x"
                    " of the bare aiohttp proxy (issue 21)",
                    ok50,
                    f"broker {plus_ms(b50)} vs bare aiohttp proxy ({self.loops[bare]}) {plus_ms(f50)}"
                    f" = {ratio:.2f}x (limit {ADDED_RATIO_TARGET:.2f}x){spread}",
                )
            )
            self.targets.append(
                (
                    f"Added latency per small job, p99 ({loop} loop){view}: <= 5 ms",
                    b99 <= 0.005,
                    f"broker p99 {ms(med(p99[name]))} vs direct p99 {ms(med(p99['direct']))}: {plus_ms(b99)}",
                )
            )

    # ---- profile (during a measurement-1 workload) ---------------------------------------------------

    async def profile_broker(self) -> None:
        if not have_module("pyinstrument"):
            self.profile.append(
                "pyinstrument is not installed in .venv (`.venv/bin/pip install pyinstrument`): no profile."
            )
            return
        out = self.workdir / "profile.pstats"
        argv = [PY, "-m", "pyinstrument", "-i", str(PROFILE_INTERVAL_S), "-r", "pstats", "-o", str(out)]
        argv.append(str(MANAGER))
        port = self.ports["profiled"]
        child = await self.children.spawn("profiled", self.broker_argv(argv, port))
        url = f"http://{LOOPBACK}:{port}"
        await self.wait_http(url + "/healthz", "profiled broker", child)
        loop = "uvloop" if uses_uvloop(child.pid) else "asyncio"
        body = b"b" * KiB
        n = self.rounds(1500, 200)
        cpu0 = cpu_seconds(child.pid)
        t0 = time.perf_counter()
        for _ in range(n):
            status, _ = await self.post(url + "/v1/echo?n=1024", body)
            assert status == 200
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(child.pid) - cpu0
        await self.children.stop(child)
        if not out.exists():
            self.profile.append(f"pyinstrument wrote no profile (see {child.log}).")
            return
        import pstats  # noqa: PLC0415 (only here)

        stats = pstats.Stats(str(out))
        rows = []  # (own s, cumulative s, "file:line function", component)
        for (filename, line, func), (_, _, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append((tottime, cumtime, f"{Path(filename).name}:{line} {func}", component(filename)))
        busy = sorted((r for r in rows if not IDLE_FRAMES.search(r[2])), reverse=True)
        total = sum(r[0] for r in rows)
        busy_total = sum(r[0] for r in busy) or math.nan
        self.profile.append(
            f"The broker ran under pyinstrument (`-i {PROFILE_INTERVAL_S}`, {loop} loop) while it served {n}"
            f" small jobs one at a time (measurement 1's workload): {wall:.1f} s wall, {cpu:.2f} s CPU of the"
            f" broker ({cpu / n * 1e6:.0f} us per job including the profiler's own overhead); {total:.1f} s"
            f" sampled, {busy_total:.2f} s of it outside the event loop's wait for I/O. Top 5 frames by own"
            " time (the loop's wait excluded):"
        )
        self.profile += ["", "| own time | share | frame |", "|---|---|---|"]
        for tottime, _, where, _ in busy[:5]:
            self.profile.append(f"| {tottime * 1000:.0f} ms | {tottime / busy_total:.0%} | `{where}` |")
        shares: dict[str, float] = {}
        for tottime, _, _, comp in busy:
            shares[comp] = shares.get(comp, 0.0) + tottime
        ranked = sorted(shares.items(), key=lambda x: -x[1])
        own = [f"`{w.split(' ', 1)[1]}` {t * 1000:.0f} ms" for t, _, w, c in busy if c == "mgpumanager.py"]
        self.profile.append("")
        self.profile.append(
            "Own time by component: "
            + ", ".join(f"{c} {t / busy_total:.0%}" for c, t in ranked)
            + ". mgpumanager.py's functions by own time: "
            + ", ".join(own[:10])
            + "."
        )

    # ---- 2: hand-over gap ------------------------------------------------------------------------------

    async def m2_gap(self) -> None:
        direct = self.urls["direct"]
        body = b"g" * KiB
        ways = {
            "broker": (self.urls["broker"] + "/v1/slow?max=20", self.urls["broker"] + "/v1/echo?n=1024"),
            "bare_lock": (self.urls["bare_lock"] + "/slow?max=20", self.urls["bare_lock"] + "/echo?n=1024"),
        }
        rounds = self.rounds(8, 2)
        p50: dict[str, list[float]] = {k: [] for k in ways}
        p99: dict[str, list[float]] = {k: [] for k in ways}
        for r in range(rounds):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for name in order:
                slow_url, echo_url = ways[name]
                await self.get_json(direct + "/gaps")  # clear
                plug = asyncio.create_task(self.post(slow_url, body, timeout=60))
                for _ in range(100):  # until the plug holds the lock (at most 5 s)
                    if (await self.get_json(direct + "/state"))["slow_waiting"] >= 1:
                        break
                    await asyncio.sleep(0.05)
                jobs = [asyncio.create_task(self.post(echo_url, body, timeout=60)) for _ in range(40)]
                await asyncio.sleep(0.5)  # all 40 queued behind the plug
                await self.post(direct + "/release", b"")
                results = await asyncio.wait_for(asyncio.gather(plug, *jobs), 60)
                assert all(s == 200 for s, _ in results), [s for s, _ in results]
                spans = sorted((await self.get_json(direct + "/gaps"))["spans"])
                assert len(spans) == 40, len(spans)
                gaps = [spans[k + 1][0] - spans[k][1] for k in range(len(spans) - 1)]
                assert min(gaps) >= 0, "jobs overlapped at the consumer"
                p50[name].append(pct(gaps, 50))
                p99[name].append(pct(gaps, 99))
        b50, b99, f50, f99 = (
            med(p50["broker"]),
            med(p99["broker"]),
            med(p50["bare_lock"]),
            med(p99["bare_lock"]),
        )
        ok = b50 <= f50
        self.facts["gap"] = (b50, f50)
        ratio = med([p50["broker"][i] / p50["bare_lock"][i] for i in range(len(p50["broker"]))])
        self.rows.append(
            Row(
                "2 hand-over gap p50 / p99",
                f"{ms(b50)} / {ms(b99)}",
                f"bare+lock {ms(f50)} / {ms(f99)}",
                "p50 <= bare+lock",
                ok,
            )
        )
        self.targets.append(
            (
                "Hand-over gap p50 no worse than the bare proxy with one asyncio.Lock",
                ok,
                f"broker {ms(b50)} (p99 {ms(b99)}) vs bare+lock {ms(f50)} (p99 {ms(f99)});"
                f" per-round ratio median {ratio:.2f}x",
            )
        )
        self.details.append(
            f"Measurement 2: {len(p50['broker'])} rounds per contender; each round a plug job (`/slow`) holds"
            " the lock while 40 small jobs queue behind it for 0.5 s, then the plug is released; the echo"
            " consumer records, in its own process, when it received each request and when it had written"
            " its answer; gap = receipt of job k+1 - end of job k's answer (39 gaps per round)."
            f" Per round p50 broker: {', '.join(ms(v) for v in p50['broker'])};"
            f" bare+lock: {', '.join(ms(v) for v in p50['bare_lock'])}."
        )

    # ---- 3: streaming -------------------------------------------------------------------------------

    async def stream_once(self, url: str) -> tuple[float, float, list[float], int, float, int]:
        """POST a generate request: (first line s, last line s, per-line lag after its creation s, lines,
        answer's headers s, lines that arrived within 1 ms of the one before though written 5 ms apart)."""
        assert self.session is not None
        body = json.dumps({"model": "bench", "prompt": "why is the sky blue"}).encode()
        lags = []
        first = last = math.nan
        n = together = 0
        t0 = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=30)
        async with self.session.post(
            url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout
        ) as r:
            headers = time.perf_counter() - t0
            assert r.status == 200, r.status
            async for line in r.content:
                now_wall, now = time.time(), time.perf_counter()
                if not line.strip():
                    continue
                if n == 0:
                    first = now - t0
                elif now - t0 - last < 0.001:
                    together += 1
                last = now - t0
                n += 1
                created = datetime.datetime.fromisoformat(
                    json.loads(line)["created_at"].replace("Z", "+00:00")
                )
                lags.append(now_wall - created.timestamp())
        return first, last, lags, n, headers, together

    async def m3_stream(self) -> None:
        ways = {
            "direct": self.urls["ollama"] + "/api/generate",
            "broker": self.urls["broker"] + "/v1/llm",
            "bare": self.urls["bare_stream"] + "/api/generate",
        }
        for url in ways.values():
            await self.stream_once(url)  # warm-up (the broker's first ollama job reads the GPU)
        rounds = self.rounds(8, 2)
        first: dict[str, list[float]] = {k: [] for k in ways}
        last: dict[str, list[float]] = {k: [] for k in ways}
        lags: dict[str, list[list[float]]] = {k: [] for k in ways}
        counts: dict[str, list[int]] = {k: [] for k in ways}
        heads: dict[str, list[float]] = {k: [] for k in ways}
        together = dict.fromkeys(ways, 0)
        for r in range(rounds):
            for name in list(ways) if r % 2 == 0 else list(reversed(ways)):
                f, la, lg, n, h, t = await self.stream_once(ways[name])
                together[name] += t
                heads[name].append(h)
                first[name].append(f)
                last[name].append(la)
                lags[name].append(lg)
                counts[name].append(n)
        rounds_done = len(first["direct"])
        d_first = med([first["broker"][i] - first["direct"][i] for i in range(rounds_done)])
        d_bare = med([first["bare"][i] - first["direct"][i] for i in range(rounds_done)])
        self.facts["first"] = (d_first, d_bare)
        d_last = med([last["broker"][i] - last["direct"][i] for i in range(rounds_done)])
        all_lag = {k: [x for lg in v for x in lg] for k, v in lags.items()}
        late = {k: sum(1 for x in v if x > STREAM_INTERVAL_S) for k, v in all_lag.items()}
        extra = [
            b - d
            for i in range(rounds_done)
            for b, d in zip(lags["broker"][i], lags["direct"][i], strict=False)
        ]
        total_lines = len(all_lag["broker"])
        # A line held back is released together with a later one: it arrives with it, although they were
        # written 5 ms apart. Lines late by more than an interval are counted too, but on a shared machine
        # the scheduler's noise does that to a line now and then, direct or not.
        held_ok = together["broker"] <= together["direct"] + rounds_done
        ok_first = d_first - d_bare <= FIRST_LINE_TARGET_S
        self.rows.append(
            Row(
                "3 stream: first line",
                f"{ms(med(first['broker']))} ({plus_ms(d_first)})",
                f"direct {ms(med(first['direct']))}, bare streaming proxy {ms(med(first['bare']))}"
                f" ({plus_ms(d_bare)})",
                f"<= bare streaming + {FIRST_LINE_TARGET_S * 1000:g} ms",
                ok_first,
            )
        )
        self.rows.append(
            Row(
                "3 stream: last line",
                f"{ms(med(last['broker']), 1)} ({plus_ms(d_last)})",
                f"direct {ms(med(last['direct']), 1)}",
                "-",
                None,
            )
        )
        self.rows.append(
            Row(
                "3 stream: line lag p50/p99/max",
                f"{ms(pct(all_lag['broker'], 50))}/{ms(pct(all_lag['broker'], 99))}/"
                f"{ms(max(all_lag['broker']), 1)}; {late['broker']} > 5 ms; {together['broker']} together",
                f"direct {ms(pct(all_lag['direct'], 50))}/{ms(pct(all_lag['direct'], 99))}/"
                f"{ms(max(all_lag['direct']), 1)}; {late['direct']} > 5 ms; {together['direct']} together",
                "no line held back",
                held_ok,
            )
        )
        self.targets.append(
            (
                f"Streaming: first line within {FIRST_LINE_TARGET_S * 1000:g} ms of the bare streaming"
                " proxy's (issue 21)",
                ok_first,
                f"broker {ms(med(first['broker']))} vs direct {ms(med(first['direct']))}: {plus_ms(d_first)}"
                " (median of per-round differences); the floor, a bare aiohttp proxy that relays each chunk"
                f" as it comes (same loop), {ms(med(first['bare']))}: {plus_ms(d_bare)}, so the broker's own"
                f" share is {plus_ms(d_first - d_bare)}",
            )
        )
        self.targets.append(
            (
                "Streaming: no line held back",
                held_ok,
                f"of {total_lines} lines per contender, {together['broker']} (broker) and"
                f" {together['direct']} (direct) arrived within 1 ms of the line before them though written"
                f" 5 ms apart (a line held back arrives with the next one); {late['broker']} (broker) and"
                f" {late['direct']} (direct) arrived more than one interval (5 ms) after the consumer wrote"
                " them; per-line lag"
                f" p50"
                f" {ms(pct(all_lag['broker'], 50))} vs {ms(pct(all_lag['direct'], 50))}, p99"
                f" {ms(pct(all_lag['broker'], 99))} vs {ms(pct(all_lag['direct'], 99))}; broker minus direct"
                f" for the same line of the same round: p50 {plus_ms(pct(extra, 50))}, p99"
                f" {plus_ms(pct(extra, 99))}, max {plus_ms(max(extra))}",
            )
        )
        self.details.append(
            f"Measurement 3: mgpusim's ollama ({STREAM_LINES} lines {STREAM_INTERVAL_S * 1000:g} ms apart,"
            f" plus the final line: {counts['broker'][0]} lines), {rounds_done} rounds per contender;"
            " first/last ="
            " time from sending the request to the line's arrival; lag = arrival (client's wall clock) -"
            " the line's created_at (the consumer's wall clock just before it wrote the line). The answer's"
            f" headers arrived after {ms(med(heads['broker']))} through the broker,"
            f" {ms(med(heads['bare']))} through the bare streaming proxy, {ms(med(heads['direct']))} direct."
            " The last line comes later through the broker because the"
            " simulated consumer's own 5 ms sleeps drift when three processes share two CPUs; the per-line"
            " lag, measured against each line's own creation time, is what shows holding back."
        )

    # ---- 4: the swap ---------------------------------------------------------------------------------

    async def wait_unheld(self) -> None:
        """Until the broker's GPU lock is free (holds included), then let any GPU reading settle."""
        for _ in range(200):
            st = await self.status()
            if st["scheduler"]["holder"] is None:
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the broker's lock stayed held for 10 s")
        await asyncio.sleep(0.3)

    async def image_job(self) -> None:
        """comfyui renders: it is resident afterwards and mvoice is not (the broker evicts it)."""
        body = json.dumps({"prompt": {}}).encode()
        status, data = await self.post(self.urls["broker"] + "/v1/image", body)
        assert status == 200, (status, data[:300])
        await self.wait_unheld()
        st = await self.status()
        loaded = {n: st["consumers"][n]["loaded"] for n in ("comfyui", "mvoice")}
        assert loaded == {"comfyui": True, "mvoice": False}, loaded

    def log_times(self, since: int) -> dict[str, float]:
        """Wall-clock times of the first evicting/evicted/loading/loaded lines after byte `since`."""
        text = self.broker_log.read_bytes()[since:].decode(errors="replace")
        found: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"ts=(\S+) level=\w+ msg=(\w+)", line)
            if m and m.group(2) in ("evicting", "evicted", "loading", "loaded") and m.group(2) not in found:
                ts = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
                found[m.group(2)] = ts.timestamp()
        return found

    async def m4_swap(self) -> None:
        stt = self.urls["broker"] + "/v1/stt"
        audio = b"a" * KiB
        rounds = self.rounds(5, 2)
        swap, seed, unload_call = [], [], []
        parts: dict[str, list[float]] = {"read": [], "unload+wait": [], "load+forward": []}
        for _ in range(rounds):
            # The broker's cycle: mvoice is not resident, comfyui's 13000 MiB must go first.
            await self.image_job()
            since = self.broker_log.stat().st_size
            wall0, t0 = time.time(), time.perf_counter()
            status, data = await self.post(stt, audio)
            t1 = time.perf_counter()
            assert status == 200, (status, data[:300])
            swap.append(t1 - t0)
            await asyncio.sleep(0.1)  # the log lines are written
            times = self.log_times(since)
            if {"evicting", "evicted", "loaded"} <= times.keys():
                parts["read"].append(times["evicting"] - wall0)
                parts["unload+wait"].append(times["evicted"] - times["evicting"])
                parts["load+forward"].append(wall0 + (t1 - t0) - times["evicted"])
            await self.wait_unheld()
            # The seed's cycle: the unload call, a fixed 1 s, then the same job (GPU read, load, forward).
            await self.image_job()
            t0 = time.perf_counter()
            status, data = await self.post(self.urls["broker"] + "/v1/consumers/comfyui/unload", b"")
            assert status == 200, (status, data[:300])
            unload_call.append(time.perf_counter() - t0)
            await asyncio.sleep(SEED_SLEEP_S)
            status, data = await self.post(stt, audio)
            assert status == 200, (status, data[:300])
            seed.append(time.perf_counter() - t0)
            await self.wait_unheld()
        reading = await self.time_reading()
        b, s = med(swap), med(seed)
        limit = RELEASE_S + SWAP_SLACK_S
        ok = b <= limit
        self.facts["swap"] = (b, reading)
        self.rows.append(
            Row(
                "4 swap (13 GiB victim, 300 ms release)",
                ms(b, 0),
                f"fixed 1 s wait {ms(s, 0)} ({s / b:.1f}x slower)",
                f"<= {limit * 1000:.0f} ms",
                ok,
            )
        )
        self.targets.append(
            (
                "Swap: <= the consumer's own release time + 150 ms",
                ok,
                f"request -> answer {ms(b, 0)} (rounds: {', '.join(ms(v, 0) for v in swap)}),"
                f" limit {ms(limit, 0)}; the seed's fixed 1 s cycle {ms(s, 0)}, {s / b:.1f}x slower;"
                f" beyond the release itself: {ms(b - RELEASE_S, 0)} vs {ms(s - RELEASE_S, 0)}"
                f" ({(s - RELEASE_S) / (b - RELEASE_S):.1f}x; the issue's '>= 5x' can hold only for"
                " this part: a cycle that contains the consumer's 300 ms release cannot be 5x shorter"
                " than one that contains a 1 s sleep, about 1.1 s / 0.3 s = 3.7x at best). Where the"
                " broker's time went (its log): GPU reading before the unload"
                f" {ms(med(parts['read']), 0)}, unload call + wait for the memory"
                f" {ms(med(parts['unload+wait']), 0)}, load + forward {ms(med(parts['load+forward']), 0)};"
                " one reading of the GPU line (one nvidia-smi process, what the broker runs before the"
                f" unload and every {mgpumanager.VRAM_POLL_S * 1000:.0f} ms after it) takes"
                f" {ms(reading, 0)} here (mgpusim's stand-in, a Python process; the real nvidia-smi"
                " answered in about 25 ms on the H100 of the fixtures)",
            )
        )
        breakdown = ", ".join(f"{k} {ms(med(v), 0)}" for k, v in parts.items() if v)
        self.details.append(
            f"Measurement 4: {len(swap)} rounds. Each round an image job makes comfyui resident (13000 MiB;"
            " mvoice evicted), then `POST /v1/stt` for mvoice (not resident, 2800 MiB + 256 cushion do not"
            " fit beside comfyui) is timed from request to answer; mvoice's own work is 0 s, so this is"
            " request -> target received plus one small answer's way back. Where the broker's time went"
            f" (from its log, ms resolution): {breakdown}. The seed's cycle is emulated on the same broker"
            " and consumers: `POST /v1/consumers/comfyui/unload` (the unload call, median"
            f" {ms(med(unload_call), 1)}), a fixed {SEED_SLEEP_S:g} s sleep in the benchmark, then the same"
            " `POST /v1/stt` (GPU reading, load, forward), timed from the unload request to the answer."
        )

    async def time_reading(self) -> float:
        """How long one reading takes here as the broker makes room: the GPU line, one nvidia-smi."""
        fmt = "--format=csv,noheader,nounits"
        queries = [[self.smi, "-i", "0", "--query-gpu=" + ",".join(mgpumanager.GPU_FIELDS), fmt]]

        async def one(argv: list[str]) -> None:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            await asyncio.wait_for(proc.wait(), 10)

        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            await asyncio.gather(*(one(q) for q in queries))
            times.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
        return med(times)

    # ---- 5: memory ----------------------------------------------------------------------------------

    async def fresh_rss_mib(self, argv: list[str]) -> float:
        """VmRSS of a broker started anew with ``argv`` (as the other, on the same config), a second after
        it answered /healthz; stopped again."""
        port = self.ports["fresh"]
        child = await self.children.spawn("fresh", self.broker_argv(argv, port))
        try:
            await self.wait_http(f"http://{LOOPBACK}:{port}/healthz", "fresh", child)
            await asyncio.sleep(1.0)
            return proc_status_kib(child.pid, "VmRSS") / KiB
        finally:
            await self.children.stop(child)

    async def m5_memory(self) -> None:
        # How it is started: as the unit starts it (the launcher) against the file's path, each anew, twice.
        starts: dict[str, list[float]] = {"launcher": [], "path": []}
        for _ in range(2):
            starts["launcher"].append(await self.fresh_rss_mib([PY, "-c", self.launcher()]))
            starts["path"].append(await self.fresh_rss_mib([PY, str(MANAGER)]))
        launched, by_path = med(starts["launcher"]), med(starts["path"])
        self.rows.append(
            Row(
                "5 RSS just started, as the unit starts it",
                f"{launched:.1f} MiB",
                f"by the file's path {by_path:.1f} MiB",
                "-",
                None,
            )
        )
        pid = self.pids["broker"]
        await asyncio.sleep(1.0)
        idle = proc_status_kib(pid, "VmRSS")
        reset = reset_peak_rss(pid)
        rss0, hwm0 = proc_status_kib(pid, "VmRSS"), proc_status_kib(pid, "VmHWM")
        big = bytes(64 * MiB)
        status, data = await self.post(self.urls["broker"] + "/v1/sink", big, timeout=120)
        assert status == 200 and json.loads(data)["bytes"] == len(big), (status, data[:300])
        del big
        hwm1 = proc_status_kib(pid, "VmHWM")
        rise = (hwm1 - (rss0 if reset else hwm0)) / KiB
        after_body = proc_status_kib(pid, "VmRSS")

        # 1,000 clients queued behind a job that holds the lock.
        clients = 1000
        body = b"q" * KiB
        direct = self.urls["direct"]
        conn = aiohttp.TCPConnector(limit=0)
        queued_rss = math.nan
        peak_queued = 0
        async with aiohttp.ClientSession(connector=conn) as crowd:

            async def one(url: str) -> int:
                async with crowd.post(url, data=body, timeout=aiohttp.ClientTimeout(total=120)) as r:
                    await r.read()
                    return r.status

            plug = asyncio.create_task(one(self.urls["broker"] + "/v1/slow?max=60"))
            for _ in range(100):
                if (await self.get_json(direct + "/state"))["slow_waiting"] >= 1:
                    break
                await asyncio.sleep(0.05)
            jobs = [asyncio.create_task(one(self.urls["broker"] + "/v1/echo?n=1024")) for _ in range(clients)]
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                peak_queued = max(peak_queued, (await self.status())["scheduler"]["stats"]["queued"])
                if peak_queued >= clients:
                    break
            await asyncio.sleep(0.5)
            queued_rss = proc_status_kib(pid, "VmRSS") / KiB
            await self.post(direct + "/release", b"")
            results = await asyncio.wait_for(asyncio.gather(plug, *jobs, return_exceptions=True), 120)
        served = sum(1 for r in results[1:] if r == 200)
        await asyncio.sleep(0.5)
        drained = proc_status_kib(pid, "VmRSS") / KiB
        ok_q = queued_rss <= 80 and peak_queued >= clients
        ok_b = rise <= 80
        self.rows.append(Row("5 RSS idle", f"{idle / KiB:.1f} MiB", "-", "-", None))
        self.rows.append(
            Row(f"5 RSS, {peak_queued} clients queued", f"{queued_rss:.1f} MiB", "-", "<= 80 MiB", ok_q)
        )
        self.rows.append(Row("5 peak RSS rise, 64 MiB body", f"+{rise:.1f} MiB", "-", "<= 80 MiB", ok_b))
        self.targets.append(
            (
                "RSS <= 80 MiB with 1,000 clients queued",
                ok_q,
                "the broker as the unit runs it (the launcher: the byte-compiled file run as a module; by the"
                f" file's path a broker just started holds {by_path - launched:.1f} MiB more: {by_path:.1f}"
                f" against {launched:.1f} MiB, a second after it answered, medians of two starts each):"
                f" VmRSS {queued_rss:.1f} MiB with {peak_queued} jobs queued behind a lock-holding job (idle:"
                f" {idle / KiB:.1f} MiB; {served} of {clients} answered 200 once the lock was released; VmRSS"
                f" {drained:.1f} MiB after they drained)",
            )
        )
        how = "VmHWM reset to VmRSS via /proc/PID/clear_refs before" if reset else "VmHWM before/after"
        self.targets.append(
            (
                "A 64 MiB body raises peak RSS by <= 80 MiB",
                ok_b,
                f"VmHWM rose {rise:.1f} MiB ({how}; VmRSS {rss0 / KiB:.1f} MiB before, VmHWM"
                f" {hwm1 / KiB:.1f} MiB after, VmRSS {after_body / KiB:.1f} MiB once answered); the body went"
                " client -> broker -> echo consumer's /sink",
            )
        )

    # ---- 6: /v1/status under load -------------------------------------------------------------------

    async def m6_status(self) -> None:
        rate, seconds = 500, 5.0
        total = int(rate * seconds)
        url = self.urls["broker"] + "/v1/status"
        await asyncio.sleep(1.2)  # the last reading is older than the status cache's second
        before = count_lines(self.counter)
        served = 0
        conn = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def one() -> None:
                nonlocal served
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
                    await r.read()
                    served += r.status == 200

            tasks = []
            start = time.perf_counter()
            for i in range(total):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one()))
            offered = time.perf_counter() - start
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            elapsed = time.perf_counter() - start
        await asyncio.sleep(0.5)
        procs = count_lines(self.counter) - before
        readings = procs / 3  # (a whole reading: the GPU's line, the process list, the line again)
        ok = readings <= math.floor(elapsed) + 1
        self.rows.append(
            Row(
                f"6 /v1/status {rate}/s for {seconds:g} s",
                f"{served} served in {elapsed:.1f} s; {procs} nvidia-smi = {readings:g} readings",
                "-",
                f"<= 1 reading/s (<= {math.floor(elapsed) + 1})",
                ok,
            )
        )
        self.targets.append(
            (
                "<= 1 nvidia-smi reading per second whatever the status load",
                ok,
                f"{total} requests offered over {offered:.1f} s ({total / offered:.0f}/s), {served} answered"
                f" 200 by {elapsed:.1f} s; {procs} nvidia-smi processes = {readings:g} readings (3 processes"
                " each), counted by the --nvidia-smi wrapper script",
            )
        )

    # ---- 7: CPU per job ---------------------------------------------------------------------------------

    async def m7_cpu(self) -> None:
        body = b"c" * KiB
        ways = {
            "broker": (self.pids["broker"], self.urls["broker"] + "/v1/echo?n=1024"),
            "bare_lock": (self.pids["bare_lock"], self.urls["bare_lock"] + "/echo?n=1024"),
        }
        rounds, n, conc = self.rounds(3, 1), self.rounds(800, 200), 8
        per_job: dict[str, list[float]] = {k: [] for k in ways}
        rate: dict[str, list[float]] = {k: [] for k in ways}
        for r in range(rounds):
            for name in list(ways) if r % 2 == 0 else list(reversed(ways)):
                pid, url = ways[name]
                left = n

                async def worker(url: str = url) -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        status, _ = await self.post(url, body)
                        assert status == 200

                c0, t0 = cpu_seconds(pid), time.perf_counter()
                await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(conc))), 120)
                c1, t1 = cpu_seconds(pid), time.perf_counter()
                per_job[name].append((c1 - c0) / n)
                rate[name].append(n / (t1 - t0))
        b, f = med(per_job["broker"]), med(per_job["bare_lock"])
        self.facts["cpu"] = (b, f)
        self.rows.append(
            Row(
                "7 CPU per job at saturation (conc. 8)",
                f"{b * 1e6:.0f} us ({med(rate['broker']):.0f} jobs/s)",
                f"bare+lock {f * 1e6:.0f} us ({med(rate['bare_lock']):.0f} jobs/s)",
                "-",
                None,
            )
        )
        self.details.append(
            f"Measurement 7: {rounds} rounds x {n} small jobs at concurrency {conc} per contender; CPU ="
            " utime + stime of the proxy's process from /proc/PID/stat (10 ms ticks) over the round. Both"
            " serialise"
            " the jobs on the consumer (the broker's lock, max_concurrency 1; the bare proxy's asyncio.Lock)."
        )

    # ---- 8: mixed workload (issue 12) ----------------------------------------------------------------

    async def loader_knows(self, key: str, overtake: float | None, clients: Sequence[str] = ()) -> bool:
        """Whether this version's loader knows ``key`` (a mixed-workload config with it passes --check; one
        it refuses as an unknown key: an older version); any other refusal of the config is an error."""
        path = self.workdir / "loader-check.yaml"
        ports = dict(zip(("mvoice", "comfyui"), mgpusim.free_ports(2), strict=True))
        path.write_text(
            mixed_config(mgpusim.free_ports(1)[0], "nvidia-smi", ports, trace_burst(), overtake, clients)
        )
        check = await asyncio.create_subprocess_exec(
            PY, str(MANAGER), "--check", "--config", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(check.communicate(), 30)
        except asyncio.TimeoutError:
            check.kill()
            await check.wait()
            raise RuntimeError("mgpumanager --check did not answer within 30 s") from None
        if check.returncode == 0:
            return True
        if check.returncode == 2 and re.search(re.escape(key).encode() + rb"\S*:? unknown key", out):
            return False
        raise RuntimeError(f"mgpumanager --check refused the mixed-workload config:\n{out.decode()}")

    async def m8_mixed(self) -> None:
        # (main refused max_overtake_s before issue 12, auth.clients before issue 23)
        available = await self.loader_knows("max_overtake_s", 0)
        with_clients = await self.loader_knows("auth.clients", None, MIX_CLIENTS)
        default = overtake_default()
        for trace in (trace_burst(), trace_stream(self.quick)):
            runs = [
                MixRun(trace, "default", f"max_overtake_s {default:g} (default)", None, default, available),
                MixRun(trace, "strict", "max_overtake_s 0 (strict order)", 0.0, 0.0, available),
            ]
            if trace.name == "trace 1":  # issue 23: the burst split between two clients, taking turns
                label = f"max_overtake_s {default:g}, split between clients {' and '.join(MIX_CLIENTS)}"
                runs.append(MixRun(trace, "clients", label, None, default, with_clients, MIX_CLIENTS))
            if not available:  # the loader refuses the key: this version's only order is the strict one
                runs[1] = MixRun(trace, "strict", "strict order (this version's only order)", None, 0.0, True)
            live = [r for r in runs if r.available]
            try:
                for run in live:
                    await self.mix_start(run)
                await asyncio.wait_for(self.mix_play(trace, live), MIX_RUN_TIMEOUT_S)
            finally:
                for run in live:
                    await self.mix_stop(run)
            for run in live:
                run.compute()
            self.mix_runs += runs
        self.mix_report(available)

    async def mix_start(self, run: MixRun) -> None:
        """Start the run's own simulated GPU, consumers and broker; warm mvoice up; subscribe to events."""
        tag = f"mix{run.trace.name[-1]}-{run.name}"
        work = self.workdir / tag
        work.mkdir()
        ports = dict(zip(("mvoice", "comfyui", "broker"), mgpusim.free_ports(3), strict=True))
        state = work / "gpu.json"
        specs = []
        for name, kind in (("mvoice", "mvoice"), ("comfyui", "comfyui")):
            opts = ",".join(f"{k}={v:g}" for k, v in MIX_SIMS[name].items())
            loaded = ",loaded=true" if name == MIX_LOADED_AT_START else ""
            specs.append(f"{name}={kind}:{ports[name]},{opts}{loaded}")
        argv = [PY, str(MGPUSIM), "consumers", "--state", str(state)]
        argv += ["--gpu-total-mib", str(GPU_TOTAL_MIB), "--reserved-mib", str(GPU_RESERVED_MIB), *specs]
        run.children.append(await self.children.spawn(f"{tag}-consumers", argv, ready_line=b"READY all"))
        smi = shlex.join([PY, str(MGPUSIM), "nvidia-smi", "--state", str(state)])
        config = work / "broker.yaml"
        config.write_text(mixed_config(ports["broker"], smi, ports, run.trace, run.overtake, run.clients))
        child = await self.children.spawn(f"{tag}-broker", [PY, str(MANAGER), "--config", str(config)])
        run.children.append(child)
        run.url = f"http://{LOOPBACK}:{ports['broker']}"
        await self.wait_http(run.url + "/healthz", f"{tag}-broker", child)
        # One TTS job first: mvoice is known resident and every connection is open when the trace starts.
        warm = json.dumps({"text": "warm up"}).encode()
        status, data = await self.post(run.url + "/v1/tts", warm, token=run.token)
        assert status == 200, (status, data[:300])
        await self.mix_wait_idle(run, 30)
        run.before = (await self.get_json(run.url + "/v1/status", run.token))["scheduler"]["stats"]
        ready = asyncio.Event()
        run.reader = asyncio.create_task(self.mix_events(run, ready))
        await asyncio.wait_for(ready.wait(), 10)

    async def mix_events(self, run: MixRun, ready: asyncio.Event) -> None:
        """Collect the broker's /v1/events into run.events until cancelled."""
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        async with self.session.get(run.url + "/v1/events", timeout=timeout, headers=bearer(run.token)) as r:
            async for line in r.content:
                ready.set()
                if line.startswith(b"data: "):
                    run.events.append(json.loads(line[6:]))
        run.notes.append("its /v1/events stream ended before the run did: figures may lack events")

    async def mix_wait_idle(self, run: MixRun, timeout_s: float) -> None:
        """Until the broker's GPU is free and nothing waits; then a moment for the trailing events."""
        deadline = time.monotonic() + timeout_s
        while True:
            sched = (await self.get_json(run.url + "/v1/status", run.token))["scheduler"]
            if sched["holder"] is None and not sched["queue"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{run.url}: the GPU stayed busy for {timeout_s:g} s")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)

    async def mix_play(self, trace: Trace, runs: Sequence[MixRun]) -> None:
        """Send the trace to every run's broker at the same moments; wait until each is idle again."""
        for run in runs:
            run.jobs = [
                MixJob(i, kind, at, f"bench-{run.trace.name[-1]}-{run.name}-{i:03d}-{kind}")
                for i, (at, kind) in enumerate(trace.jobs)
            ]
        start = asyncio.get_running_loop().time() + 0.2
        await asyncio.gather(*(self.mix_send(run, job, start) for run in runs for job in run.jobs))
        for run in runs:
            await self.mix_wait_idle(run, MIX_JOB_TIMEOUT_S)
            st = await self.get_json(run.url + "/v1/status", run.token)
            run.after = st["scheduler"]["stats"]
            run.timings = {name: c.get("timings") for name, c in st["consumers"].items()}

    async def mix_send(self, run: MixRun, job: MixJob, start: float) -> None:
        """One job of the trace, sent at its offset; what came back is recorded, never raised."""
        assert self.session is not None
        await asyncio.sleep(max(0.0, start + job.at - asyncio.get_running_loop().time()))
        body = {"text": f"job {job.index}"} if job.kind == "tts" else {"prompt": {}}
        headers = {"Content-Type": "application/json", "X-Request-ID": job.request_id}
        client = run.client_of(job)
        if client is not None:
            headers |= bearer(mix_token(client))
        job.sent = time.time()
        try:
            async with self.session.post(
                f"{run.url}/v1/{job.kind}",
                data=json.dumps(body).encode(),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=MIX_JOB_TIMEOUT_S),
            ) as r:
                data = await r.read()
                job.status = r.status
                if r.status != 200:
                    job.error = f"{r.status} {data[:200].decode(errors='replace')}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            job.error = f"{type(e).__name__}: {e}"
        job.answered = time.time()

    async def mix_stop(self, run: MixRun) -> None:
        if run.reader is not None:
            run.reader.cancel()
            (outcome,) = await asyncio.gather(run.reader, return_exceptions=True)
            if isinstance(outcome, Exception):
                run.notes.append(f"its /v1/events reader failed: {type(outcome).__name__}: {outcome}")
        for child in reversed(run.children):
            await self.children.stop(child)

    def mix_report(self, available: bool) -> None:
        """Rows, targets, the mixed-workload section and its analysis, from the runs of measurement 8."""
        runs1 = [r for r in self.mix_runs if r.trace.name == "trace 1" and not r.clients]
        runs2 = [r for r in self.mix_runs if r.trace.name == "trace 2"]
        split = next((r for r in self.mix_runs if r.clients), None)
        # The targets hold the broker as configured by default; without max_overtake_s that is strict order.
        main1, other1 = (runs1[0], runs1[1]) if available else (runs1[1], runs1[0])
        main2, other2 = (runs2[0], runs2[1]) if available else (runs2[1], runs2[0])
        absent = "not available in this version"

        def idle(r: MixRun) -> str:
            return (
                f"{r.label}: {secs(r.to_idle_s)} = {r.ratio:.2f}x" if r.available else f"{r.label}: {absent}"
            )

        def tts95(r: MixRun) -> float:
            return pct(r.latencies("tts"), 95)

        def clean(r: MixRun) -> bool:
            return len(r.ok()) == len(r.jobs)

        live = [r for r in self.mix_runs if r.available]
        ratio_ok = clean(main1) and main1.ratio <= MIX_RATIO_TARGET
        split_ok = split is not None and split.available and clean(split) and split.ratio <= MIX_RATIO_TARGET
        tts_ok = clean(main1) and tts95(main1) < MIX_TTS_P95_TARGET_S
        bound_ok = all(clean(r) and r.longest_s <= r.bound_s for r in live)
        self.rows += [
            Row(
                "8 mixed, trace 1: first request -> GPU idle",
                f"{idle(main1)} the bound {secs(main1.bound_lb_s)}",
                idle(other1),
                f"<= {MIX_RATIO_TARGET:g}x the bound",
                ratio_ok,
            ),
            Row(
                "8 mixed, trace 1 split between two clients: first request -> GPU idle",
                f"{idle(split)} the bound {secs(split.bound_lb_s)}; {counted(split.evictions, 'eviction')}"
                if split is not None
                else absent,
                f"one client: {main1.ratio:.2f}x, {counted(main1.evictions, 'eviction')}",
                f"<= {MIX_RATIO_TARGET:g}x the bound",
                split_ok if split is not None and split.available else None,
            ),
            Row(
                "8 mixed, trace 1: TTS p95",
                f"{main1.label}: {secs(tts95(main1))}",
                f"{other1.label}: {secs(tts95(other1))}" if other1.available else f"{other1.label}: {absent}",
                f"< {MIX_TTS_P95_TARGET_S:g} s",
                tts_ok,
            ),
            Row(
                "8 mixed: longest overtaken, trace 1 / trace 2",
                f"{main1.label}: {secs(main1.longest_s)} / {secs(main2.longest_s)}",
                f"{other1.label}: {secs(other1.longest_s)} / {secs(other2.longest_s)}"
                if other1.available
                else f"{other1.label}: {absent}",
                "<= max_overtake_s",
                bound_ok,
            ),
            Row(
                "8 mixed, trace 2: first request -> GPU idle; TTS p95",
                f"{idle(main2)} the bound {secs(main2.bound_lb_s)}; TTS p95 {secs(tts95(main2))}",
                f"{idle(other2)}; TTS p95 {secs(tts95(other2))}" if other2.available else idle(other2),
                "-",
                None,
            ),
        ]
        version = (
            ""
            if available
            else "This version has no scheduler.max_overtake_s (its loader refuses the key): the broker as it"
            " is serves strictly by priority, then arrival, and these are that order's figures; "
        )

        def beside(r: MixRun, text: str) -> str:
            return f"; beside it, {r.label}: {text}" if r.available else f"; {r.label}: {absent}"

        self.targets += [
            (
                "Mixed workload, trace 1 (issue 12's burst): first request to GPU idle within"
                f" {MIX_RATIO_TARGET:g}x of its lower bound",
                ratio_ok,
                f"{version}{main1.label}: {secs(main1.to_idle_s)} against a bound of"
                f" {secs(main1.bound_lb_s)}, {main1.ratio:.2f}x, {counted(main1.evictions, 'eviction')} and"
                f" {counted(main1.loads, 'load')}, grant order {main1.grant_order()}"
                + beside(
                    other1,
                    f"{secs(other1.to_idle_s)}, {other1.ratio:.2f}x, {counted(other1.evictions, 'eviction')}"
                    f" and {counted(other1.loads, 'load')}, grant order {other1.grant_order()}",
                ),
            ),
            (
                "Mixed workload, trace 1 split between two clients (issue 23: fair share must not bring"
                " back the swap storm): first request to GPU idle within"
                f" {MIX_RATIO_TARGET:g}x of its lower bound",
                split_ok,
                f"{split.label}: {secs(split.to_idle_s)} against a bound of {secs(split.bound_lb_s)},"
                f" {split.ratio:.2f}x, {counted(split.evictions, 'eviction')} and"
                f" {counted(split.loads, 'load')},"
                f" grant order {split.grant_order()}; beside it, one client: {main1.ratio:.2f}x,"
                f" {counted(main1.evictions, 'eviction')}"
                if split is not None and split.available
                else f"{absent} (this version's loader does not know auth.clients)",
            ),
            (
                f"Mixed workload, trace 1: TTS p95 under {MIX_TTS_P95_TARGET_S:g} s",
                tts_ok,
                f"{version}{main1.label}: p95 {secs(tts95(main1))}"
                f" (p50 {secs(pct(main1.latencies('tts'), 50))};"
                " of 8 jobs the p95 is the slowest)" + beside(other1, f"p95 {secs(tts95(other1))}"),
            ),
            (
                "Mixed workload: no job overtaken beyond max_overtake_s (each run against its own bound)",
                bound_ok,
                "; ".join(
                    f"{r.trace.name}, {r.label}: longest {secs(r.longest_s)} (bound {secs(r.bound_s)})"
                    for r in live
                )
                + ("" if available else f"; {runs1[0].label}: {absent}"),
            ),
        ]

        out = [
            f"Trace 1 (issue 12's): {runs1[0].trace.title}. Trace 2: {runs2[0].trace.title}. How each figure"
            " was taken: measurement 8 below.",
            "",
            "| trace | scheduler | jobs answered | evictions | loads | first request -> GPU idle | lower"
            " bound | ratio | TTS p50 / p95 | image p50 / p95 | longest overtaken | GPU held by no job"
            " | eviction waits | load waits |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.mix_runs:
            if not r.available:
                out.append(f"| {r.trace.name} | {r.label} | {absent} |" + " - |" * 11)
                continue
            victims = ", ".join(f"{n} {r.evicted.get(n, 0)}" for n in ("mvoice", "comfyui"))
            t, i = r.latencies("tts"), r.latencies("image")
            longest = secs(r.longest_s)
            if r.longest is not None:
                longest += f" (job {r.longest.index}, {r.longest.kind}, by {len(r.longest.overtakers)} jobs)"
            out.append(
                f"| {r.trace.name} | {r.label} | {len(r.ok())} of {len(r.jobs)} | {r.evictions} ({victims})"
                f" | {r.loads} | {secs(r.to_idle_s)} | {secs(r.bound_lb_s)} | {r.ratio:.2f}x"
                f" | {secs(pct(t, 50))} / {secs(pct(t, 95))} | {secs(pct(i, 50))} / {secs(pct(i, 95))}"
                f" | {longest} | {secs(r.gpu_free_s)} | {secs(r.evict_s)} | {secs(r.load_s)} |"
            )
        out.append("")
        for r in live:
            said = [f"grant order {r.grant_order()}", *r.notes]
            timings = {n: t for n, t in r.timings.items() if isinstance(t, dict)}
            if timings:
                said.append(
                    "learned timings at the end: "
                    + "; ".join(
                        f"{n} " + ", ".join(f"{k} {shown(v)}" for k, v in t.items())
                        for n, t in timings.items()
                    )
                )
            etas = [
                (j.eta_s, j.granted[1] - j.queued[1])
                for j in r.jobs
                if isinstance(j.eta_s, (int, float)) and j.granted is not None and j.queued is not None
            ]
            if etas:
                errors = [abs(wait - eta) for eta, wait in etas]
                said.append(
                    f"eta_s of the queued events against the waits that followed ({len(etas)} jobs): median"
                    f" error {secs(med(errors))}, largest {secs(max(errors))}"
                )
            out.append(f"- {r.trace.name}, {r.label}: " + "; ".join(said) + ".")
        if not any(isinstance(t, dict) for r in live for t in r.timings.values()):
            out.append("- This version's /v1/status has no per-consumer timings.")
        if not any(j.eta_s is not None for r in live for j in r.jobs):
            out.append("- This version's queued events carry no eta_s.")
        self.mixed = out

        mv, cu = MIX_SIMS["mvoice"], MIX_SIMS["comfyui"]
        n_tts = sum(1 for _, k in runs1[0].trace.jobs if k == "tts")
        n_img = len(runs1[0].trace.jobs) - n_tts
        work = n_tts * mv["work_s"] + n_img * cu["work_s"]
        self.details.append(
            "Measurement 8 (mixed workload, issue 12): each trace ran once per scheduler setting, the"
            " settings side by side (each its own mgpusim consumers, simulated 16 GiB GPU, nvidia-smi"
            " stand-in and broker; the same jobs sent at the same moments by this process). mgpusim's"
            f" mvoice: load {mv['load_s']:g} s (its load route), work {mv['work_s']:g} s, memory free"
            f" {mv['release_s']:g} s after its unload answered; ComfyUI: loads its model ({cu['load_s']:g} s)"
            f" in its first render after an unload, renders {cu['work_s']:g} s, memory free"
            f" {cu['release_s']:g} s after /free; 2800 + 13610 MiB do not fit the 15904 MiB the card offers."
            " An image job holds the GPU until /history/<prompt_id> is filled, polled every"
            f" {MIX_HOLD_POLL_S:g} s as in consumers.yaml. At the start mvoice is loaded and ComfyUI is not,"
            " after one warm-up TTS job that is not counted. Evictions and loads: /v1/status's"
            " scheduler.stats after the trace minus before (loads are the broker's load calls, mvoice's;"
            " ComfyUI loads itself each time images get the GPU after TTS); evictions by victim from the"
            " `evicted` events. Latency, client side: a TTS job from its request sent to its answer read"
            " whole; an image job from its request sent to the `hold_ended` event of its job (the broker's"
            " clock, same machine; the job is found by the X-Request-ID its `queued` event carries); p50/p95"
            " are nearest-rank (of 8 TTS jobs the p95 is the slowest). First request -> GPU idle: from the"
            " first request sent to the end of the job that let the GPU go last (its `hold_ended` event,"
            " else its `finished` event). Lower bound: the soonest any scheduler could finish the trace"
            " knowing it all in advance, from the trace's offsets and the parameters above: the GPU runs one"
            " job at a time, a job starts once it arrived and the GPU is free, after a swap if its consumer"
            " is not the loaded one (the loaded one's release time, then its own load time; no swap before a"
            " job needs it); each consumer's jobs are alike, so a dynamic programme over (jobs done per"
            " consumer, which one is loaded) finds the best interleaving. The broker's own costs (GPU"
            " readings, hold polls, HTTP) and priorities count nothing. For trace 1 it is all the work"
            f" ({n_tts} x {mv['work_s']:g} + {n_img} x {cu['work_s']:g} = {work:g} s) plus the one swap no"
            f" order avoids ({mv['release_s']:g} s for mvoice's memory, {cu['load_s']:g} s for ComfyUI's"
            f" load): {secs(lower_bound(runs1[0].trace))}, serving the TTS jobs first as they come."
            " Overtaken: job K overtook job J when K's `queued` event came after J's in the event stream,"
            " K's `granted` event before J's, and K's effective priority at its grant (its `queued` priority"
            f" plus one level per aging_s = {MIX_AGING_S:g} s waited, at most {mgpumanager.PRIORITY_MAX}) was"
            " not above J's; J is overtaken from K's grant to K's end (`hold_ended` for an image, else its"
            " end event), cut at J's own grant; a job's figure is the union of those spans, and the table"
            " shows the largest. GPU held by no job: first request -> GPU idle minus the union of the jobs'"
            " grant-to-end spans. Eviction and load waits: `evicting` -> `evicted` and `loading` -> `loaded`"
            " summed (event timestamps have millisecond resolution)."
        )

        # The analysis: each target not met, and what this run says about why.
        notes = []
        if not ratio_ok or not tts_ok:
            r = main1
            slowest = max((j for j in r.ok() if j.kind == "tts"), key=lambda j: j.latency, default=None)
            why = (
                " This version serves the queue strictly by priority, then arrival (it has no"
                " max_overtake_s): the interleaved burst swaps at every change of kind."
                if not available
                else ""
            )
            text = (
                f"- Mixed workload, trace 1: {secs(r.to_idle_s)} = {r.ratio:.2f}x its lower bound of"
                f" {secs(r.bound_lb_s)} (target {MIX_RATIO_TARGET:g}x), TTS p95 {secs(tts95(r))} (target"
                f" {MIX_TTS_P95_TARGET_S:g} s).{why} Grant order {r.grant_order()}:"
                f" {counted(r.evictions, 'eviction')} and {counted(r.loads, 'load')} of mvoice where the"
                " bound has one eviction and no load, and ComfyUI loaded its model"
                f" {counted(r.image_batches, 'time')} ({r.image_batches} x {cu['load_s']:g} s) where the"
                f" bound loads it once. Of the {secs(r.to_idle_s)}, eviction waits took {secs(r.evict_s)},"
                f" mvoice's loads {secs(r.load_s)}, and the GPU was held by no job for {secs(r.gpu_free_s)}."
            )
            if slowest is not None and slowest.granted is not None and slowest.queued is not None:
                g = slowest.granted
                ahead = sum(
                    1
                    for j in r.jobs
                    if j.kind == "image" and j.granted is not None and slowest.queued < j.granted < g
                )
                text += (
                    f" The slowest TTS job (job {slowest.index}, sent at +{slowest.at:g} s) waited"
                    f" {secs(g[1] - slowest.queued[1])} for the GPU; {counted(ahead, 'image job')} had it"
                    " meanwhile."
                )
            if not clean(r):
                text += f" Not every job was answered: {'; '.join(r.notes)}."
            notes.append(text)
        for r in live:
            if r.longest_s > r.bound_s:
                j = r.longest
                assert j is not None
                notes.append(
                    f"- Mixed workload, {r.trace.name} with {r.label}: job {j.index} ({j.kind}, sent at"
                    f" +{j.at:g} s) was overtaken for {secs(r.longest_s)} by {len(j.overtakers)} later jobs"
                    f" (jobs {', '.join(map(str, j.overtakers[:12]))}), beyond the bound of"
                    f" {secs(r.bound_s)}."
                )
        self.mix_analysis = notes

    # ---- 9: admission with a queue (issue 21) ----------------------------------------------------------

    async def m9_admission(self) -> None:
        """N jobs sent at once behind a job that holds the GPU, for each N: how long until every one is
        queued, and /healthz's answers meanwhile, on a broker of its own (max_queue 10,000)."""
        port = mgpusim.free_ports(1)[0]
        config = self.workdir / "admission.yaml"
        config.write_text(broker_config(port, self.smi, self.ports, max_queue=ADMISSION_MAX_QUEUE))
        argv = [PY, str(MANAGER), "--config", str(config), "--nvidia-smi", self.smi]
        child = await self.children.spawn("admission", argv)
        url = f"http://{LOOPBACK}:{port}"
        await self.wait_http(url + "/healthz", "admission broker", child)
        results: list[dict[str, Any]] = []
        try:
            for n in ADMISSION_SIZES if not self.quick else (ADMISSION_SIZES[0], ADMISSION_SIZES[0] * 2):
                results.append(await self.admit_round(url, n))
        finally:
            await self.children.stop(child)
        self.report_admission(results)

    async def admit_round(self, url: str, n: int) -> dict[str, Any]:
        """One burst of ``n`` jobs: its figures (seconds; /healthz samples within the window)."""
        assert self.session is not None
        direct = self.urls["direct"]
        conn = aiohttp.TCPConnector(limit=0)
        pinger = await asyncio.create_subprocess_exec(
            PY, str(HERE / "bench.py"), "healthz-pinger", "--url", url + "/healthz",
            "--interval", str(HEALTHZ_INTERVAL_S),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert pinger.stdin is not None and pinger.stdout is not None
        try:
            assert (await asyncio.wait_for(pinger.stdout.readline(), 30)).strip() == b"READY"
            async with aiohttp.ClientSession(connector=conn) as crowd:

                async def one(path: str) -> int:
                    timeout = aiohttp.ClientTimeout(total=600)
                    async with crowd.post(url + path, data=b"q", timeout=timeout) as r:
                        await r.read()
                        return r.status

                plug = asyncio.create_task(one("/v1/slow?max=300"))
                for _ in range(200):
                    if (await self.get_json(direct + "/state"))["slow_waiting"] >= 1:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("the plug job never reached the echo consumer")
                await asyncio.sleep(0.5)  # a quiet moment of /healthz samples before the burst
                overflows = listen_overflows()
                sent = time.time()
                jobs = [asyncio.create_task(one("/v1/echo?n=16")) for _ in range(n)]
                deadline = time.monotonic() + 300
                while True:  # every job queued, or answered already (its connection closed meanwhile)
                    waiting = await self.queued_now(url)
                    lost = sum(1 for job in jobs if job.done())
                    if waiting + lost >= n:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{n} jobs were not all queued within 300 s")
                    await asyncio.sleep(0.25)
                detected = time.time()
                after = listen_overflows()
                overflowed = None if overflows is None or after is None else after - overflows
                await asyncio.sleep(0.5)  # queued, waiting: /healthz goes on being asked
                pinger.stdin.write(b"stop\n")
                await pinger.stdin.drain()
                out, _ = await asyncio.wait_for(pinger.communicate(), 60)
                queued = await self.queued_times(url, sent, waiting)
                await self.post(direct + "/release", b"")
                statuses = await asyncio.wait_for(asyncio.gather(plug, *jobs, return_exceptions=True), 600)
        finally:
            if pinger.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    pinger.kill()
                await pinger.wait()
        last = max(queued) if queued else detected
        window = [s for s in json.loads(out) if sent <= s[0] <= last + 0.5]
        before = [s for s in json.loads(out) if s[0] < sent]
        return {
            "n": n,
            "to_queue": last - sent,
            "first": min(queued) - sent if queued else math.nan,
            "events": len(queued),
            "healthz": [s[1] for s in window],
            "healthz_ok": all(s[2] == 200 for s in window),
            "quiet": [s[1] for s in before],
            "served": sum(1 for st in statuses[1:] if st == 200),
            "lost": lost,
            "overflowed": overflowed,
            "errors": sorted(
                {type(st).__name__ if isinstance(st, BaseException) else str(st) for st in statuses[1:]}
            ),
        }

    async def queued_now(self, url: str) -> int:
        """How many jobs wait now (/v1/status, which may take as long as the broker's loop is stalled; a
        connection it closed meanwhile, its head unread past http.header_timeout_s, is asked again)."""
        assert self.session is not None
        for _ in range(10):
            with contextlib.suppress(aiohttp.ClientConnectionError):
                timeout = aiohttp.ClientTimeout(total=300)
                async with self.session.get(url + "/v1/status", timeout=timeout) as r:
                    return (await r.json())["scheduler"]["stats"]["queued"]
        raise RuntimeError(f"{url}/v1/status: the connection was lost 10 times")

    async def queued_times(self, url: str, sent: float, n: int) -> list[float]:
        """When each of the burst's jobs was queued (its `queued` event's ts, the broker's clock), read back
        from the event ring once they all are (no subscriber while they were coming in)."""
        assert self.session is not None
        since = math.ceil(time.time() - sent) + 2
        times: list[float] = []
        timeout = aiohttp.ClientTimeout(total=60)
        async with self.session.get(url + f"/v1/events?since={since}", timeout=timeout) as r:
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("event") == "queued" and parse_ts(event["ts"]) >= sent - 0.001:
                    times.append(parse_ts(event["ts"]))
                    if len(times) >= n:
                        break
        return times

    def report_admission(self, results: list[dict[str, Any]]) -> None:
        small, large = results[0], results[-1]
        per = {r["n"]: r["to_queue"] / r["n"] for r in results}
        ratio = per[large["n"]] / per[small["n"]] if per[small["n"]] > 0 else math.inf
        ok_ratio = ratio <= ADMISSION_RATIO_TARGET
        for r in results:
            p99, worst = pct(r["healthz"], 99), max(r["healthz"], default=math.nan)
            ok = p99 < HEALTHZ_P99_TARGET_S and r["healthz_ok"] and r["served"] == r["n"]
            r["ok"] = ok
            lost = f"; {r['n'] - r['served']} not served" if r["served"] != r["n"] else ""
            if r["overflowed"]:  # (their SYN dropped: each client sent it again, 1 s or more later)
                lost += f"; {r['overflowed']} connects overflowed the listen backlog"
            self.rows.append(
                Row(
                    f"9 admission, {r['n']} jobs at once",
                    f"{secs(r['to_queue'])} to queue ({ms(per[r['n']], 2)} per job);"
                    f" /healthz p99 {ms(p99, 1)}, max {ms(worst, 0)}{lost}",
                    "-",
                    f"/healthz p99 < {HEALTHZ_P99_TARGET_S * 1000:.0f} ms",
                    ok,
                )
            )
        self.rows.append(
            Row(
                f"9 admission per job, {large['n']} vs {small['n']}",
                f"{ratio:.1f}x",
                "-",
                f"<= {ADMISSION_RATIO_TARGET:g}x",
                ok_ratio,
            )
        )
        issue = "; ".join(
            f"N = {n:,}: {t:g} s to queue, /healthz stalls {stall:g} s"
            for n, t, stall in ADMISSION_ISSUE_FIGURES
        )
        self.targets.append(
            (
                f"Queueing {large['n']:,} jobs costs at most {ADMISSION_RATIO_TARGET:g}x per job what"
                f" queueing {small['n']:,} costs",
                ok_ratio,
                f"{ms(per[small['n']], 2)} per job for {small['n']} ({secs(small['to_queue'])} in all),"
                f" {ms(per[large['n']], 2)} per job for {large['n']} ({secs(large['to_queue'])}):"
                f" {ratio:.1f}x;"
                f" issue 21 measured on main: {issue}",
            )
        )
        for r in results:
            self.targets.append(
                (
                    f"/healthz p99 under {HEALTHZ_P99_TARGET_S * 1000:.0f} ms while {r['n']:,} jobs are"
                    " queued",
                    r["ok"],
                    f"p50 {ms(pct(r['healthz'], 50), 1)}, p99 {ms(pct(r['healthz'], 99), 1)}, max"
                    f" {ms(max(r['healthz'], default=math.nan), 0)} over {len(r['healthz'])} answers"
                    f" (before the burst: p99 {ms(pct(r['quiet'], 99), 1)}); {r['served']} of {r['n']} jobs"
                    " answered 200 once the GPU was free"
                    + ("" if r["healthz_ok"] else "; some /healthz answers were not 200")
                    + (
                        f"; {r['lost']} ended before they were queued (the broker's loop stalled past"
                        " http.header_timeout_s, 10 s, before it read their requests: it closed their"
                        f" connections), answers: {', '.join(r['errors'])}"
                        if r["lost"]
                        else ""
                    ),
                )
            )
        self.details.append(
            f"Measurement 9 (issue 21): a broker of its own (max_queue {ADMISSION_MAX_QUEUE:,}, the echo"
            " consumer, max_concurrency 1). A job to `/slow` takes the GPU and holds it (as a render does);"
            f" then N small jobs are sent at once (N = {', '.join(str(r['n']) for r in results)}), each on a"
            " connection of its own, and wait behind it. Time to queue: from the first request sent to the"
            " last job's `queued` event (its ts, the broker's clock on the same machine, ms resolution;"
            " read back from the event ring once `/v1/status` shows all N queued, so no subscriber makes the"
            f" broker do more meanwhile); per job = that / N. Meanwhile a process of its own asks /healthz,"
            f" one request at a time every {HEALTHZ_INTERVAL_S * 1000:g} ms on one keep-alive connection,"
            " from the burst until 0.5 s after the last job was queued (they sit queued); its p99 and"
            " longest answer are shown. Then the GPU is released and every job must be answered 200. The"
            " kernel's ListenOverflows count (/proc/net/netstat, the whole machine's) is read before the"
            " burst and once all are queued: a connect beyond the listen backlog has its SYN dropped and"
            " is sent again 1 s or more later. "
            + " ".join(
                f"N = {r['n']}: first job queued {ms(r['first'], 0)} after the first request, {r['events']}"
                f" queued events, {len(r['healthz'])} /healthz answers."
                for r in results
            )
        )
        self.facts["admission"] = (per[small["n"]], per[large["n"]])
        self.facts["admission_n"] = (small["n"], large["n"])
        self.facts["admission_p99"] = (pct(small["healthz"], 99), pct(large["healthz"], 99))
        self.facts["admission_max"] = (max(small["healthz"], default=0.0), max(large["healthz"], default=0.0))
        self.facts["admission_overflowed"] = (small["overflowed"], large["overflowed"])

    # ---- 10: reading cost, NVML vs nvidia-smi (issue 21) ----------------------------------------------

    async def m10_reading(self) -> None:
        """Readings through NVML and through nvidia-smi side by side, each through mgpumanager's reader in a
        process of its own: the stub libnvidia-ml.so.1 and mgpusim's nvidia-smi over the same state where
        there is no GPU; the real library and nvidia-smi where there is."""
        state = self.workdir / "gpu.json"
        stand_in = shlex.join([PY, str(MGPUSIM), "nvidia-smi", "--state", str(state)])
        base = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "MGPUSIM_STATE")}
        setups: list[tuple[str, str, dict[str, str], str]] = []
        real = await self.reading_run("nvml", base, "nvidia-smi", n=1, calls=0)
        if real is not None and shutil.which("nvidia-smi"):
            setups.append(("real GPU", "the GPU's libnvidia-ml.so.1 and nvidia-smi", base, "nvidia-smi"))
        if not have_module("pynvml"):
            self.notes.append("measurement 10: nvidia-ml-py is not installed in .venv: no NVML figures.")
        else:
            try:
                stub = mgpusim.build_nvml_stub(self.workdir)
            except (FileNotFoundError, subprocess.CalledProcessError) as e:
                self.notes.append(f"measurement 10: the NVML stub could not be built ({e}).")
            else:
                env = {**base, "LD_LIBRARY_PATH": str(stub.parent), "MGPUSIM_STATE": str(state)}
                stub_label = "no GPU: the NVML stub and mgpusim's nvidia-smi stand-in over one state"
                setups.append(("stub", stub_label, env, stand_in))
        rounds = self.rounds(READING_ROUNDS, 1)
        counts = {"nvml": self.rounds(NVML_READINGS, 60), "nvidia-smi": self.rounds(SMI_READINGS, 5)}
        for short, label, env, smi in setups:
            figures: dict[str, dict[str, list[float]]] = {"nvml": {}, "nvidia-smi": {}}
            readings: dict[str, Any] = {}
            for _ in range(rounds):
                for reader, n in counts.items():
                    out = await self.reading_run(reader, env, smi, n=n, calls=NVML_CALLS)
                    if out is None:
                        raise RuntimeError(f"reading-cost {reader} ({label}) did not read through {reader}")
                    readings[reader] = out["reading"]
                    for key in ("memory", "whole", "call"):
                        if out[key]:
                            figures[reader].setdefault(key, []).append(med(out[key]))
                            figures[reader].setdefault(key + "99", []).append(pct(out[key], 99))
            self.report_reading(short, label, figures, readings, rounds, counts)

    async def reading_run(self, reader: str, env: dict[str, str], smi: str, *, n: int, calls: int) -> Any:
        """One `bench.py reading-cost` process: its JSON, or None when it did not read through ``reader``."""
        argv = [PY, str(HERE / "bench.py"), "reading-cost", "--reader", reader, "--smi", smi]
        argv += ["--n", str(n), "--calls", str(calls)]
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=HERE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 300)
        if proc.returncode != 0:
            return None
        return json.loads(out)

    def report_reading(
        self,
        short: str,
        label: str,
        figures: dict[str, dict[str, list[float]]],
        readings: dict[str, Any],
        rounds: int,
        counts: dict[str, int],
    ) -> None:
        nv, smi = figures["nvml"], figures["nvidia-smi"]
        names = {reader: reading.pop("names") for reader, reading in readings.items()}
        same = readings["nvml"] == readings["nvidia-smi"]
        named = sum(1 for a, b in zip(names["nvml"], names["nvidia-smi"], strict=False) if a == b)
        for key, what in (("memory", "the GPU line (making room)"), ("whole", "whole, with processes")):
            a, b = med(nv[key]), med(smi[key])
            self.rows.append(
                Row(
                    f"10 reading, {what}, {short}",
                    f"NVML {ms(a, 3)} (p99 {ms(med(nv[key + '99']), 3)})",
                    f"nvidia-smi {ms(b, 1)} (p99 {ms(med(smi[key + '99']), 1)}): {b / a:,.0f}x",
                    "-",
                    None,
                )
            )
        call = (
            f"; one raw NVML call (nvmlDeviceGetMemoryInfo v2, pynvml) {med(nv['call']) * 1e6:.1f} us"
            if nv.get("call")
            else ""
        )
        self.details.append(
            f"Measurement 10 (issue 21), {label}: mgpumanager's GpuReader (gpu.reader nvml, then nvidia-smi),"
            f" each in a process of its own, alternating, {rounds} rounds; per round {counts['nvml']} NVML"
            f" readings and {counts['nvidia-smi']} nvidia-smi ones of each kind (the GPU line alone, as"
            " making room reads; whole, with the process list, as /v1/status reads), one after the other,"
            " after one reading that is not timed (the choice and NVML's initialisation); medians of the"
            f" rounds' medians and p99s{call}. The two readers' figures (the GPU's name, total, used and free"
            " memory, each process's pid and memory)"
            f" {'are the same' if same else 'differ: ' + json.dumps(readings)}; {named} of"
            f" {len(names['nvml'])} process names agree (NVML's come from /proc/<pid>/cmdline: a simulated"
            " process's made-up pid has none there)."
        )
        if label.startswith("no GPU"):
            self.notes.append(
                "measurement 10 ran without a GPU: NVML's figures are the stub's (a C library answering from"
                " mgpusim's state file, read again when it changed), nvidia-smi's are mgpusim's stand-in (a"
                " Python process); on the H100 of fixtures/ nvidia-smi took 25 ms per call and NVML 0.02 ms"
                " per call (fixtures/nvidia-smi/README.md)."
            )

    # ---- 11: how fast a command-line verb starts (issue 20) ------------------------------------------

    async def m11_cli(self) -> None:
        """A verb (``ps`` against the running broker) started as `make deploy` installs it (the launcher: the
        byte-compiled file run as a module) and by the file's path, beside the issue's baseline, `python3
        -c 'import json, urllib.request'`; the same interpreter, each started anew, alternating."""
        home = self.workdir / "opt"
        url = ["--url", self.urls["broker"]]
        commands = {
            "baseline": [PY, "-c", "import json, urllib.request"],
            "launcher": [PY, "-c", self.launcher(), "ps", *url],
            "script": [PY, str(home / "mgpumanager.py"), "ps", *url],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(self.rounds(CLI_ROUNDS, 5)):
            for name, argv in commands.items():
                t0 = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=home
                )
                _, err = await asyncio.wait_for(proc.communicate(), 30)
                times[name].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} exited {proc.returncode}: {err.decode()[-300:]}")
        base, launch, script = (med(times[k]) for k in ("baseline", "launcher", "script"))
        ok = launch <= CLI_RATIO_TARGET * base
        self.rows.append(
            Row(
                "11 CLI verb start (ps), launcher",
                f"{ms(launch, 1)} ({launch / base:.2f}x)",
                f"python3 -c 'import json, urllib.request' {ms(base, 1)}; by the file's path {ms(script, 1)}"
                f" ({script / base:.2f}x)",
                f"<= {CLI_RATIO_TARGET:g}x the import",
                ok,
            )
        )
        self.targets.append(
            (
                f"A command-line verb starts in at most {CLI_RATIO_TARGET:g}x the time of python3 -c 'import"
                " json, urllib.request' (issue 20)",
                ok,
                "`mgpumanager ps` through the launcher `make deploy` installs (the byte-compiled file run"
                f" as a module) {ms(launch, 1)}, {launch / base:.2f}x the import's {ms(base, 1)}; by the"
                f" file's path (compiled anew at every start) {ms(script, 1)}, {script / base:.2f}x;"
                f" medians of {len(times['baseline'])} starts each, alternating, wall time from start to exit"
                " (the verb asks the running broker once)",
            )
        )

    # ---- report ------------------------------------------------------------------------------------

    def table(self) -> str:
        head = ("measurement", "broker", "contender(s)", "target", "met?")
        cells = [
            (
                r.measurement,
                r.broker,
                r.contenders,
                r.target,
                "-" if r.met is None else ("yes" if r.met else "NO"),
            )
            for r in self.rows
        ]
        widths = [max(len(str(c[i])) for c in [head, *cells]) for i in range(5)]
        lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)

    def markdown(self, machine: list[str], elapsed: float) -> str:
        out = ["# BENCH: what the broker costs", ""]
        out.append(
            "Written by `bench.py` (`make bench`): every server its own process on 127.0.0.1, the client is"
            " the benchmark (one aiohttp session, keep-alive). Contenders are interleaved round by round and"
            " compared within each round; figures are medians of the per-round figures. See issue 5;"
            " measurement 8, the mixed workload, is issue 12's; 9 (admission with a queue) and 10 (reading"
            " the GPU) are issue 21's, 11 (a command-line verb's start) issue 20's."
        )
        out += ["", "## Machine", ""]
        out += [f"- {m}" for m in machine]
        out.append(f"- run took {elapsed:.0f} s")
        out += ["", "## Results", ""]
        out.append("| measurement | broker | contender(s) | target | met? |")
        out.append("|---|---|---|---|---|")
        for r in self.rows:
            met = "-" if r.met is None else ("met" if r.met else "**not met**")
            out.append(f"| {r.measurement} | {r.broker} | {r.contenders} | {r.target} | {met} |")
        out += ["", "## Targets (issues 5, 12 and 21)", ""]
        for name, ok, evidence in self.targets:
            mark = "n/a" if ok is None else ("**met**" if ok else "**not met**")
            out.append(f"- {name}: {mark}. {evidence}.")
        if self.mixed:
            out += ["", "## Mixed workload (issue 12)", ""]
            out += self.mixed
        out += ["", "## How each figure was taken", ""]
        for d in self.details:
            out += [d, ""]
        out += ["## Profile", ""]
        out += self.profile or ["(not run)"]
        out += ["", "## The targets not met, and why", ""]
        out += self.analysis()
        if self.notes:
            out += ["", "## Notes", ""]
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out).rstrip() + "\n"

    def analysis(self) -> list[str]:
        """What the figures of this run say about the targets that are not met."""
        out = []
        if "first" in self.facts:
            broker, bare = self.facts["first"]
            out.append(
                f"- First streamed line: the broker adds {plus_ms(broker)}; the floor, a bare aiohttp proxy"
                f" that relays each chunk as it comes, adds {plus_ms(bare)} in the same rounds. The broker's"
                f" own share is {plus_ms(broker - bare)} (target {FIRST_LINE_TARGET_S * 1000:g} ms): routing,"
                " admission and accounting."
            )
        if "gap" in self.facts and "cpu" in self.facts:
            (gap, gap_bare), (cpu, cpu_bare) = self.facts["gap"], self.facts["cpu"]
            out.append(
                f"- Hand-over gap: {ms(gap)} vs {ms(gap_bare)} for the bare proxy with one lock. The broker"
                " ends a job when the consumer's answer is read whole, not when the client has it, and lets"
                " the job it granted send its request before it writes the previous client's last bytes;"
                " a grant looks at the first job of each consumer's bucket, not at every waiting job;"
                " a job's metrics, event and log line are written after the next job's request left. What"
                f" remains is CPU: {cpu * 1e6:.0f} us per job against {cpu_bare * 1e6:.0f} us (measurement"
                " 7), and on 2 CPUs shared by the client, the broker and the consumer, that CPU delays the"
                " consumer's next request. It buys what the bare proxy does not do: a log line per job, an"
                " X-Request-ID, hop-by-hop and auth filtering and X-Forwarded-* both ways, admission, health"
                ' and residency checks, metrics and events. docs/development.md ("The hand-over gap: where'
                " it goes\") times each step of a hand-over: the broker's own is the shorter; it reads the"
                " consumer's answer later, busy with the previous job's tail."
            )
        if "swap" in self.facts and self.facts["swap"][0] > RELEASE_S + SWAP_SLACK_S:
            swap, reading = self.facts["swap"]
            out.append(
                f"- Swap: {ms(swap, 0)} against a limit of {ms(RELEASE_S + SWAP_SLACK_S, 0)}. Beyond the"
                f" consumer's own {RELEASE_S * 1000:.0f} ms, the broker reads the GPU once before the unload"
                f" and polls every {mgpumanager.VRAM_POLL_S * 1000:.0f} ms after it; each reading of"
                f" mgpusim's nvidia-smi stand-in (a Python process) took {ms(reading, 0)} in this run,"
                " against about 25 ms for the real nvidia-smi in the fixtures' timings: the swap here carries"
                " two to three of those readings."
            )
        out += self.mix_analysis
        if "admission" in self.facts:
            (small, large), (n_small, n_large) = self.facts["admission"], self.facts["admission_n"]
            p99s, longest = self.facts["admission_p99"], self.facts["admission_max"]
            overflowed = self.facts["admission_overflowed"][1]
            if large > ADMISSION_RATIO_TARGET * small:
                why = (
                    f"{overflowed} of the {n_large:,.0f} connects overflowed the broker's listen backlog:"
                    " the kernel dropped their SYN (its ListenOverflows count rose by as much) and"
                    " each client sent it again 1 s or more later, which the time to queue includes; on"
                    " this machine the same burst queues in about a second when nothing overflows"
                    " (docs/development.md, From run to run)"
                    if overflowed
                    else "the cost grows with the queue"
                )
                out.append(
                    f"- Admission: queueing {n_small:,.0f} jobs at once costs {ms(small, 2)} per job,"
                    f" {n_large:,.0f} cost {ms(large, 2)} per job ({large / small:.1f}x): {why}"
                    " (measurement 9)."
                )
            if max(p99s) >= HEALTHZ_P99_TARGET_S:
                out.append(
                    f"- /healthz while jobs are queued: p99 {ms(p99s[0], 1)} with {n_small:,.0f} and"
                    f" {ms(p99s[1], 1)} with {n_large:,.0f} (longest {ms(longest[0], 0)} and"
                    f" {ms(longest[1], 0)}). The admission itself no longer grows with the queue (the"
                    " forecast is played once per turn of the loop, a grant looks at each consumer's first"
                    " job); what stalls the loop is the burst: each turn admits what arrived meanwhile, up"
                    " to the listen backlog of new connections, at about a third of a millisecond"
                    " each (reading the body, the headers, admission, the queued event), and /healthz waits"
                    " for that turn. A bare aiohttp app whose handlers only read the body and wait shows"
                    " the floor: docs/development.md gives its figures."
                )
        out.append(
            "- Added latency: its ratio to the bare proxy moves from run to run on this shared machine, as"
            " the direct round trip itself does (docs/development.md, Performance, lists the runs); the CPU"
            " per job above is its steady part."
        )
        return out


def package_notes() -> list[str]:
    """Optional packages this run used that the pinned requirements do not (yet) name."""
    pinned = ""
    for name in ("requirements.txt", "requirements-dev.txt"):
        with contextlib.suppress(OSError):
            pinned += (HERE / name).read_text().lower()
    notes = []
    for module in ("uvloop", "pyinstrument"):
        if have_module(module) and module not in pinned:
            version = getattr(__import__(module), "__version__", "?")
            notes.append(f"{module} {version} is installed in .venv but not pinned in requirements*.txt.")
    return notes


def machine_lines() -> list[str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    loops = "uvloop " + __import__("uvloop").__version__ if have_module("uvloop") else "uvloop not installed"
    return [
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}",
        f"Linux {platform.release()}",
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {loops}",
        f"date {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]


async def run_bench(args: argparse.Namespace) -> int:
    started = time.monotonic()
    busy0, own0 = busy_cpu_seconds(), own_cpu_seconds()
    workdir = Path(tempfile.mkdtemp(prefix="mgpu-bench-"))
    children = Children(workdir)
    bench = Bench(quick=args.quick, workdir=workdir, children=children)
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("1 added latency", bench.m1_latency),
        ("profile", bench.profile_broker),
        ("2 hand-over gap", bench.m2_gap),
        ("3 streaming", bench.m3_stream),
        ("4 swap", bench.m4_swap),
        ("5 memory", bench.m5_memory),
        ("6 status load", bench.m6_status),
        ("7 CPU per job", bench.m7_cpu),
        ("8 mixed workload", bench.m8_mixed),
        ("9 admission", bench.m9_admission),
        ("10 reading cost", bench.m10_reading),
        ("11 CLI start", bench.m11_cli),
    ]
    if args.only:
        wanted = {part.strip() for part in args.only.split(",")}
        steps = [(name, step) for name, step in steps if name.split()[0] in wanted]
    # Measurement 8 starts servers of its own; the others share those that start() makes.
    shared = any(name.split()[0] != "8" for name, _ in steps)
    failed = False
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as session:
        bench.session = session
        try:
            print(f"bench: starting the servers (files in {workdir}) ...", flush=True)
            if shared:
                await bench.start()
            bench.notes += package_notes()
            loops = ", ".join(f"{k}={v}" for k, v in bench.loops.items() if k.startswith("broker"))
            print(f"bench: ready{f' ({loops})' if loops else ''}; measuring", flush=True)
            for name, step in steps:
                t0 = time.monotonic()
                try:
                    await step()
                except Exception as e:
                    failed = True
                    bench.notes.append(f"measurement {name} failed: {type(e).__name__}: {e}")
                    print(f"bench: {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                print(f"bench: {name}: {time.monotonic() - t0:.1f} s", flush=True)
        finally:
            await children.stop_all()
    elapsed = time.monotonic() - started
    busy, own = busy_cpu_seconds() - busy0, own_cpu_seconds() - own0
    others = max(0.0, busy - own)
    bench.notes.append(
        f"CPU time during the run: {busy:.0f} s busy on this machine, {own:.0f} s of it the benchmark and its"
        f" servers, {others:.0f} s other processes ({others / elapsed:.0%} of one CPU on average"
        f"{'; the figures may be disturbed' if others / elapsed > 0.1 else ''})."
    )
    print()
    print(bench.table())
    for n in bench.notes:
        print(f"note: {n}")
    print(f"\nbench: {elapsed:.0f} s")
    md = args.md if args.md is not None else (None if args.quick or args.only else HERE / "BENCH.md")
    if md is not None:
        write_text(Path(md), bench.markdown(machine_lines(), elapsed))
        print(f"bench: wrote {md}")
    if failed:
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--md", type=Path, help="where to write the report (default BENCH.md; none with --quick or --only)"
    )
    parser.add_argument(
        "--only", metavar="N,N", help="run only these measurements (1-11, profile): a developer's look"
    )
    sub = parser.add_subparsers(dest="command")
    ping = sub.add_parser(
        "healthz-pinger", help="ask /healthz until a line comes on stdin; print the samples"
    )
    ping.add_argument("--url", required=True)
    ping.add_argument("--interval", type=float, default=HEALTHZ_INTERVAL_S)
    cost = sub.add_parser("reading-cost", help="time GPU readings through one reader; print JSON")
    cost.add_argument("--reader", choices=("nvml", "nvidia-smi"), required=True)
    cost.add_argument("--smi", default="nvidia-smi", help="the nvidia-smi command (split like a shell would)")
    cost.add_argument("--n", type=int, default=100, help="readings of each kind")
    cost.add_argument("--calls", type=int, default=0, help="raw NVML memory calls to time")
    echo = sub.add_parser("echo-consumer", help="the echo consumer, as its own process")
    echo.add_argument("--port", type=int, required=True)
    bare = sub.add_parser("bare-proxy", help="the bare aiohttp proxy, as its own process")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument("--upstream", required=True)
    bare.add_argument("--lock", action="store_true", help="one asyncio.Lock around the forward")
    bare.add_argument("--uvloop", action="store_true")
    bare.add_argument("--stream", action="store_true", help="relay the answer chunk by chunk")
    args = parser.parse_args(argv)
    if args.command == "healthz-pinger":
        if not args.url.startswith(f"http://{LOOPBACK}:"):
            parser.error("--url must be on 127.0.0.1")
        return healthz_pinger(args.url, args.interval)
    if args.command == "reading-cost":
        if have_module("uvloop"):  # the daemon's loop where it is installed
            import uvloop  # noqa: PLC0415 (optional)

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return asyncio.run(reading_cost(args))
    if args.command == "echo-consumer":
        return run_server(echo_app, args.port, False)
    if args.command == "bare-proxy":
        if not args.upstream.startswith(f"http://{LOOPBACK}:"):
            parser.error("--upstream must be on 127.0.0.1")
        app = functools.partial(bare_proxy_app, args.upstream, args.lock, args.stream)
        return run_server(app, args.port, args.uvloop)
    return asyncio.run(run_bench(args))


if __name__ == "__main__":
    sys.exit(main())
