"""Tests for mgpumanager: real HTTP servers on port 0, real subprocesses, the real nvidia-smi captures.

One entry point, grouped by capability. No test asserts wall-clock speed: they assert order, counts and
structure. Helpers used by more than one section come first; a section's own helpers open it.

Contents
 1. Config: every rule of consumers.yaml, each naming its key; the parser's failures; mgpumanager --check.
 2. GPU reading: nvidia-smi's output from the real captures, its failures and timeouts, processes and their
    owners; NVML against a stub libnvidia-ml.so.1 over the same simulated GPU, its errors and hangs.
 3. Consumers and residency: health probes, what the GPU and the services show against the broker's own
    record, restarts.
 4. Scheduling order, the lock and the queue: grant order, overtaking, aging, joins, the queue's bounds,
    property tests.
 5. Eviction and loading: making room, unload and load routes and commands, idle unload, preload.
 6. Proxying and streaming: what reaches the consumer and what comes back, streamed; a consumer failing
    mid-answer.
 7. Holds: a job's GPU kept until its consumer says the work is done, and every way a hold ends.
 8. Mounts, consumer ports and WebSockets: unmodified clients through /c/{name}/ and a consumer's own port.
 9. Presets and the simulated services: each preset against mgpusim playing what the real servers do.
10. Operations
    10.1 Status, metrics, events and logs: one record shown everywhere.
    10.2 Reload: POST /v1/reload and SIGHUP, with jobs, probes and reservations in flight.
    10.3 The daemon, systemd and shutdown: the daemon as a subprocess, notify, SIGTERM, the unit, make demo.
    10.4 Admin unload and load, reserving the GPU: /v1/consumers/*, POST/DELETE /v1/reserve.
    10.5 The command line: verbs against a running broker, in this process or as their own; what they import.
    10.6 The dashboard: a real browser; the timeline of the last 15 minutes.
11. Hostile input: tokens, path guards, bodies, floods, malformed requests; every error in one shape.
12. The benchmark's arithmetic: bench.py's lower bound and overtaking on made-up traces.
13. The documentation: the README as a front door under 2,000 words, every link in it and docs/ resolving,
    every error code and config key (with its default) in the manual.
14. Attack findings (branch attack): each test fails on main for the defect its docstring names.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import errno
import functools
import gc
import gzip
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import py_compile
import re
import resource
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

import bench
import mgpumanager as m
import mgpusim

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "nvidia-smi"
PY = sys.executable


# =====================================================================================================
# Shared helpers
# Config shapes, fake clock/GPU/consumer calls, the in-process rig, the daemon.
# =====================================================================================================


def base_raw(**urls: str) -> dict[str, Any]:
    """The shape of mrock's config, with URLs to fill in (defaults point nowhere useful)."""
    url = {
        name: urls.get(name, f"http://127.0.0.1:9/{name}")
        for name in ("mvoice", "comfyui", "ollama", "whisper")
    }
    return {
        "listen": "127.0.0.1:0",
        # (The simulated GPU is mgpusim's nvidia-smi stand-in: never NVML, even where one loads.)
        "gpu": {
            "nvidia_smi": "nvidia-smi",
            "reader": "nvidia-smi",
            "index": 0,
            "cushion_mib": 256,
            "query_timeout_s": 5,
        },
        "scheduler": {
            "max_queue": 64,
            "queue_timeout_s": 300,
            "max_evictions": 5,
            "vram_wait_s": 10,
            "aging_s": 60,
            "max_body_mib": 64,
        },
        "health": {"interval_s": 5, "timeout_s": 2},
        "routing": {"tts": "mvoice", "stt": "mvoice", "llm": "ollama", "image": "comfyui"},
        "audio_proxy": "mvoice",
        "consumers": {
            "mvoice": {
                "url": url["mvoice"],
                "health": {"method": "GET", "path": "/health"},
                "paths": {
                    "tts": {"method": "POST", "path": "/api/synthesize"},
                    "stt": {"method": "POST", "path": "/api/transcribe"},
                },
                "vram_resident_mib": 2800,
                "unload": {"method": "POST", "path": "/api/admin/unload"},
                "load": {"method": "POST", "path": "/api/admin/load"},
                "can_coexist_with": ["ollama", "whisper"],
                "priority": 3,
            },
            "comfyui": {
                "url": url["comfyui"],
                "health": {"path": "/system_stats"},
                "paths": {
                    "image": {
                        "path": "/prompt",
                        "hold_until": {"path": "/history/{prompt_id}", "poll_s": 0.02, "timeout_s": 30},
                    }
                },
                "vram_resident_mib": 13000,
                "unload": {"path": "/free", "body": {"free_memory": True}},
            },
            "ollama": {
                "url": url["ollama"],
                "health": {"path": "/"},
                "paths": {"llm": {"path": "/api/generate"}},
                "vram_resident_mib": 8000,
                "vram_managed": True,
            },
            "whisper": {
                "url": url["whisper"],
                "health": {"path": "/health"},
                "paths": {"stt": {"path": "/inference"}},
                "vram_resident_mib": 1500,
            },
        },
    }


def problems_of(raw: Any) -> list[str]:
    with pytest.raises(m.ConfigError) as info:
        m.parse_config(raw)
    return info.value.problems


def _bomb(levels: int) -> str:
    """A billion-laughs document of about 1 KiB: ``levels`` levels of ten aliases each."""
    lines = ['l0: &l0 "lol"']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie is its new parent's to reap, not ours)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sim_smi(state: Path) -> tuple[str, ...]:
    return (PY, str(HERE / "mgpusim.py"), "nvidia-smi", "--state", str(state))


class FakeClock:
    """Simulated time: ``sleep`` advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class FakeGpu:
    """A GPU whose memory is what the fake consumers hold; records which readings were asked for."""

    def __init__(self, total: int = 16384, reserved: int = 480) -> None:
        self.total, self.reserved = total, reserved
        self.held: dict[str, int] = {}
        #: "memory" (the GPU line alone) or "whole" (with the process list), in order.
        self.reads: list[str] = []
        #: Memory still held by unloaded consumers, released after this many further reads.
        self.releasing: dict[str, int] = {}
        self.error: str | None = None
        self.last: m.GpuReading | None = None

    def last_free_mib(self) -> int | None:
        return self.last.free_mib if self.last is not None else None

    def last_reading(self) -> m.GpuReading | None:
        return self.last

    async def read_memory(self) -> m.GpuReading:
        return await self._read("memory")

    async def read(self, *, max_age: float = 0.0, own: bool = False) -> m.GpuReading:
        return await self._read("whole")

    async def _read(self, what: str) -> m.GpuReading:
        self.reads.append(what)
        if self.error:
            raise m.GpuError(self.error)
        for name in list(self.releasing):
            self.releasing[name] -= 1
            if self.releasing[name] < 0:
                del self.releasing[name]
                self.held.pop(name, None)
        used = sum(self.held.values())
        procs = tuple(
            m.GpuProcess(100 + i, f"/usr/bin/{n}", mib) for i, (n, mib) in enumerate(self.held.items())
        )
        self.last = m.GpuReading(
            0, "GPU-x", "Fake", self.total, used, self.total - self.reserved - used, 0, 40, procs, 0, 0
        )
        return self.last


class FakeOps:
    """Consumer calls that record themselves and move memory on the FakeGpu."""

    def __init__(self, config: m.Config, gpu: FakeGpu, clock: FakeClock | None = None) -> None:
        self.config, self.gpu = config, gpu
        self.clock = clock or FakeClock()
        self.states = {name: m.ConsumerState(name, self.clock) for name in config.consumers}
        self.calls: list[tuple[str, str]] = []
        #: (name, reason) of every consumer the scheduler reported gone.
        self.gone_calls: list[tuple[str, str]] = []
        #: name -> "fail" | "hang" | "keep" (answers ok, never frees) | int (frees after that many reads)
        #: | "gated" (takes effect once ``gate`` is set) | ("keep_mib", n) (frees all but n MiB)
        self.unload_behaviour: dict[str, Any] = {}
        self.gate = asyncio.Event()
        self.load_fails: set[str] = set()
        #: What each consumer's probe reports of its residency (absent: nothing it can tell), and the probes
        #: the scheduler asked for, in order.
        self.reports: dict[str, bool] = {}
        self.probes: list[str] = []

    async def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        how = self.unload_behaviour.get(name)
        if how == "gated":
            await self.gate.wait()
        if how == "fail":
            raise m.CallError("unload answered 500: boom")
        if how == "bug":
            raise TypeError("a bug in the broker's own call")
        if how == "hang":  # the unload takes effect, but its answer never comes
            self.gpu.held.pop(name, None)
            await asyncio.Event().wait()
        if isinstance(how, int):
            self.gpu.releasing[name] = how
        elif isinstance(how, tuple):
            self.gpu.held[name] = how[1]
        elif how != "keep":
            self.gpu.held.pop(name, None)

    def gone(self, name: str, reason: str) -> None:
        self.gone_calls.append((name, reason))
        self.states[name].seen_down(reason)

    def owners(self) -> dict[int, str]:
        """pid -> consumer: FakeGpu's processes are numbered from 100 in the order they took memory."""
        return {100 + i: name for i, name in enumerate(self.gpu.held) if name in self.config.consumers}

    async def probe_now(self, name: str) -> None:
        """A probe that answers at once, healthy, with what ``reports`` says of it."""
        self.probes.append(name)
        self.states[name].probed(True, None, "consumer_unreachable", self.clock(), self.reports.get(name))

    async def load(self, name: str) -> None:
        self.calls.append(("load", name))
        if name in self.load_fails:
            raise m.CallError("load answered 503: no")
        self.gpu.held[name] = self.config.consumers[name].vram_resident_mib


def small_config(**tweaks: Any) -> m.Config:
    """Target t and three others x, y, z of 4000 MiB each, all with unload routes."""
    consumers = {}
    for name in ("t", "x", "y", "z"):
        consumers[name] = {
            "url": f"http://127.0.0.1:9/{name}",
            "health": {"path": "/health"},
            "paths": {f"k{name}": {"path": "/work"}},
            "vram_resident_mib": 4000,
            "unload": {"path": "/unload"},
            "load": {"path": "/load"},
        }
    raw = {
        "gpu": {"cushion_mib": 256},
        "scheduler": {"aging_s": 60, "vram_wait_s": 1, "queue_timeout_s": 300},
        "routing": {},
        "consumers": consumers,
    }
    for dotted, value in tweaks.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for key in parents:
            node = node[key]
        node[leaf] = value
    return m.parse_config(raw)


def gpu_reader(gpu: m.GpuConfig, *, index: int | None = None) -> m.GpuReader:
    """A reader of the GPU that ``gpu`` describes (GPU ``index``, else gpu.index), as the broker makes one."""
    return m.GpuReader(m.Shared(m.replace(small_config(), gpu=gpu)), index=index)


def make_scheduler(config: m.Config) -> tuple[m.Scheduler, FakeGpu, FakeOps, FakeClock]:
    clock = FakeClock()
    gpu = FakeGpu()
    ops = FakeOps(config, gpu, clock)
    return m.Scheduler(m.Shared(config), gpu, ops, clock=clock, sleep=clock.sleep), gpu, ops, clock


def snapshot(s: m.Scheduler) -> dict[str, Any]:
    """A GPU's part of /v1/status: holder, stats, reservation and its queue with the forecast's etas."""
    parts, snap = m.scheduler_status(s)
    return {**parts, "queue": m.queue_entries(snap)}


def internal_jobs(s: m.Scheduler) -> m.InternalJobs:
    """Idle unloads and preloads on this scheduler's GPU, as the broker runs them on all of its GPUs."""
    return m.InternalJobs(s.shared, {s.index: s})


def books_balance(s: m.Scheduler) -> bool:
    st = s.stats
    return st.jobs == st.completed + st.failed + st.cancelled + st.rejected + s.running + len(s.queue())


def crowd(gpu: FakeGpu, ops: FakeOps, used: dict[str, float]) -> None:
    """x, y, z resident with 4000 MiB each (free 3904 < t's 4256); ``used`` stamps their last use."""
    for name in ("x", "y", "z"):
        gpu.held[name] = 4000
        ops.states[name].loaded()
        ops.states[name].last_used = used.get(name)
    ops.states["t"].unloaded()


async def _queued(s: m.Scheduler, consumer: str, client: str | None = None) -> asyncio.Task[m.Job]:
    task = asyncio.ensure_future(s.acquire(consumer, "k" + consumer, client=client))
    for _ in range(5):
        await asyncio.sleep(0)
    return task


def _raising_once(real: Any, when: Any = None) -> Any:
    """``real``, except that its first call (for which ``when(*args)`` holds) raises RuntimeError."""
    calls = []

    def wrapper(*args: Any, **kw: Any) -> Any:
        if not calls and (when is None or when(*args)):
            calls.append(1)
            raise RuntimeError("injected")
        return real(*args, **kw)

    return wrapper


class BrokerServer:
    """The broker's app on port 0 served as the daemon serves it (make_runner, a ListenerSite: its client
    connections watched), with the few attributes of aiohttp's TestServer that the tests use."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner = m.make_runner(app)
        self.host = "127.0.0.1"
        self.port = 0
        self.closed = False

    async def start_server(self) -> None:
        await self.runner.setup()
        site = m.ListenerSite(self.runner, self.host, 0, self.app[m.BROKER].connections, "listen")
        await site.start()
        self.port = site.port

    def make_url(self, path: str) -> URL:
        return URL(f"http://{self.host}:{self.port}").join(URL(path))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.runner.cleanup()


class Rig:
    """Simulated GPU and consumers, and the broker in front of them, all on real sockets."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[TestServer] = []
        self.sims: dict[str, mgpusim.SimConsumer] = {}
        self.sim_servers: dict[str, TestServer] = {}
        #: The ports of killed consumers, for their revival.
        self.ports: dict[str, int | None] = {}
        self.expected_internal_errors = 0

    async def start(
        self,
        *,
        total_mib: int = 16384,
        sims: dict[str, dict[str, Any]] | None = None,
        tweak: Any = None,
        urls: dict[str, str] | None = None,
        remote: str | None = None,
        gpus: int = 1,
        extra: dict[str, tuple[Any, dict[str, Any]]] | None = None,
    ) -> Rig:
        """``extra``: name -> (a simulated consumer's factory, its config without url) besides the four."""
        self.state = self.tmp_path / "gpu.json"
        self.gpu = mgpusim.SimGPU(self.state, total_mib=total_mib, reserved_mib=480, gpus=gpus)
        kinds = {
            "mvoice": mgpusim.MvoiceSim,
            "comfyui": mgpusim.ComfySim,
            "ollama": mgpusim.OllamaSim,
            "whisper": mgpusim.WhisperSim,
        }
        for name, cls in kinds.items():
            # ComfySim keeps a CUDA context like the real one; tests that are not about it do without.
            options = {"vram_mib": 8000} if name == "ollama" else {"context_mib": 0}
            sim = cls(name, self.gpu, **options | (sims or {}).get(name, {}))
            server = TestServer(sim.app, host="127.0.0.1", port=0)
            await server.start_server()
            self.sims[name], self.sim_servers[name] = sim, server
        for name, (factory, _) in (extra or {}).items():
            self.sims[name] = factory(name, self.gpu)
            self.sim_servers[name] = TestServer(self.sims[name].app, host="127.0.0.1", port=0)
            await self.sim_servers[name].start_server()
        raw = base_raw(
            **{n: str(s.make_url("")).rstrip("/") for n, s in self.sim_servers.items()} | (urls or {})
        )
        for name, (_, spec) in (extra or {}).items():
            raw["consumers"][name] = {"url": str(self.sim_servers[name].make_url("")).rstrip("/"), **spec}
        raw["gpu"]["nvidia_smi"] = list(sim_smi(self.state))
        raw["health"] = {"interval_s": 3600, "timeout_s": 2}  # tests probe explicitly
        if tweak:
            tweak(raw)
        # The config goes through a file, as in production, so that reloads can read it again.
        self.raw, self.config_path = raw, self.tmp_path / "consumers.yaml"
        self.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        source = m.ConfigSource(self.config_path)
        self.config = source.load()
        self.app = m.create_app(self.config, source)
        if remote is not None:  # every client looks as if it came from elsewhere than loopback
            self.app.middlewares.insert(0, from_elsewhere(remote))
        self.server = BrokerServer(self.app)
        await self.server.start_server()
        self.broker = self.app[m.BROKER]
        self.session = aiohttp.ClientSession(auto_decompress=False)
        return self

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def kill(self, name: str) -> None:
        """The consumer's process dies: its server is gone (connections refused), its work with it."""
        self.ports[name] = self.sim_servers[name].port
        await self.sim_servers[name].close()
        self.sims[name].restart()

    async def revive(self, name: str) -> None:
        """The consumer's service is back on its port: a new process that knows nothing of before."""
        port = self.ports.pop(name)
        self.sims[name].app = self.sims[name].make_app()
        server = TestServer(self.sims[name].app, host="127.0.0.1", port=port)
        await server.start_server()
        self.sim_servers[name] = server

    async def restart(self, name: str) -> None:
        """The consumer restarts between two of the broker's looks at it: no probe sees it down."""
        await self.kill(name)
        await self.revive(name)

    @property
    def stats(self) -> m.Stats:
        return self.broker.scheduler.stats

    async def post(self, kind: str, payload: Any = None, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        async with self.session.post(self.url(f"/v1/{kind}"), json=payload, **kw) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def status(self) -> dict[str, Any]:
        async with self.session.get(self.url("/v1/status")) as resp:
            assert resp.status == 200
            return await resp.json()

    async def close(self) -> None:
        await self.session.close()
        await self.server.close()
        for server in self.sim_servers.values():
            await server.close()


@pytest.fixture(autouse=True)
def no_bug_caught(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every test fails on a bug the broker caught in itself. The broker counts and logs such a bug, then
    goes on, so a test's own checks can pass over it: a check of the invariant fuzz test that raised inside
    the scheduler was caught there as a bug, 36 times in one run, and the test passed. A test marked
    ``catches_bug`` makes one on purpose and counts it itself."""
    caught: list[str] = []
    internal_error = m.Shared.internal_error

    def recorded(self: m.Shared, msg: str, exc: BaseException | None = None, **fields: Any) -> None:
        caught.append(m.logfmt(msg=msg, **fields))
        internal_error(self, msg, exc, **fields)

    monkeypatch.setattr(m.Shared, "internal_error", recorded)
    # What asyncio and aiohttp catch and log with a traceback (an exception in a callback, a task's that
    # nobody retrieved, a handler's), but a request aiohttp could not parse: the client's fault.
    libraries = _TracebacksLogged(caught)
    for name in ("asyncio", "aiohttp"):
        logging.getLogger(name).addHandler(libraries)
    yield
    for name in ("asyncio", "aiohttp"):
        logging.getLogger(name).removeHandler(libraries)
    if request.node.get_closest_marker("catches_bug") is None:
        assert caught == [], "the broker caught bugs of its own (each logged with its traceback above)"


class _TracebacksLogged(logging.Handler):
    """Records each line a library logs with a traceback, but a request aiohttp could not parse and a
    simulated service's out-of-memory (its 500, as a real one that died of it)."""

    def __init__(self, caught: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.caught = caught

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError):
            exc = exc.__cause__
        if record.exc_info and not isinstance(exc, (m.HttpProcessingError, mgpusim.SimOOM)):
            self.caught.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture
async def rig(tmp_path):
    rigs: list[Rig] = []

    async def make(**kw: Any) -> Rig:
        home = tmp_path / f"rig{len(rigs)}"
        home.mkdir()
        r = await Rig(home).start(**kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        await r.close()
    # Whatever a test did, the broker itself must not have crashed (unless the test made it).
    assert [r.broker.internal_errors() for r in rigs] == [r.expected_internal_errors for r in rigs]


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Wait for a condition the broker reaches on its own (bounded: a hang fails the test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def status_until(r: Rig, predicate: Any, timeout: float = 10) -> dict[str, Any]:
    """Poll the broker's /v1/status until ``predicate(status)`` holds; that status."""
    deadline = time.monotonic() + timeout
    while not predicate(status := await r.status()):
        assert time.monotonic() < deadline, f"status never matched: {status['scheduler']}"
        await asyncio.sleep(0.02)
    return status


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


class StandIn:
    """A tiny consumer written for one fault: an aiohttp app on port 0 whose routes the test gives."""

    def __init__(self, routes: list[tuple[str, str, Any]]) -> None:
        self.app = web.Application()
        for method, path, handler in routes:
            self.app.router.add_route(method, path, handler)
        self.server = TestServer(self.app, host="127.0.0.1", port=0)

    async def __aenter__(self) -> StandIn:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.server.close()

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @staticmethod
    def serving(app: web.Application) -> StandIn:
        """A stand-in that serves ``app`` (a simulated service's own) on a port of its own."""
        stand_in = StandIn([])
        stand_in.app, stand_in.server = app, TestServer(app, host="127.0.0.1", port=0)
        return stand_in


def held_llm(gate: asyncio.Event) -> StandIn:
    """A stand-in ollama whose /api/generate answers only once ``gate`` is set: it holds the GPU lock."""

    async def held(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"response": "done"})

    return StandIn([("POST", "/api/generate", held), ("GET", "/", _ok)])


#: The issue's table of error codes, written out again so that a change in the daemon shows up here.
SPEC_ERRORS = {
    "bad_request": 400,
    "not_found": 404,
    "no_consumer": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "consumer_unreachable": 502,
    "load_failed": 502,
    "bad_consumer_url": 502,
    "scheduler_error": 500,
    "queue_full": 503,
    "queue_timeout": 503,
    "insufficient_vram": 503,
    "out_of_descriptors": 503,  # issue 19: the broker's own shortage, never the consumer's
    "gpu_unavailable": 503,
    "consumer_timeout": 504,
    # Issue 3 (security) and the admin API:
    "unauthorized": 401,
    "forbidden": 403,
    "bad_config": 422,
    "unload_failed": 502,
    # Issue 4 (graceful shutdown):
    "shutting_down": 503,
    # Issue 10 (limits):
    "too_many_requests": 429,
    "request_timeout": 408,
    # Issue 14 (the GPU given to something else):
    "gpu_reserved": 503,
    # Issue 19 (a release while the reservation waits):
    "reservation_released": 409,
    # Issue 18 (a consumer the broker stopped):
    "consumer_stopped": 503,
    # Issue 22 (a stranger holds what a job would need):
    "gpu_in_use": 503,
    # Issue 23 (a client's own limit):
    "client_queue_full": 429,
    # An Expect other than 100-continue (the attack on issues 18-20: aiohttp's plain text before):
    "expectation_failed": 417,
}


#: Retryable as docs/api.md documents it (load_failed and insufficient_vram as the issue says).
SPEC_RETRYABLE = {c for c, st in SPEC_ERRORS.items() if st >= 500} - {"bad_consumer_url", "scheduler_error"}


SPEC_RETRYABLE |= {"too_many_requests", "client_queue_full"}


def error_of(status: int, headers: dict[str, str], body: bytes, code: str) -> dict[str, Any]:
    """Assert the broker's error shape and code; return the parsed error."""
    data = json.loads(body)
    assert set(data) == {"error", "message", "consumer", "retryable"}, data
    assert data["error"] == code, data
    assert status == SPEC_ERRORS[code] and data["retryable"] is (code in SPEC_RETRYABLE)
    assert isinstance(data["message"], str) and data["message"]
    if status in (429, 503):
        assert headers["Retry-After"].isdigit()
    return data


def overlaps(records: list[mgpusim.Record]) -> list[tuple[mgpusim.Record, mgpusim.Record]]:
    spans = sorted(records, key=lambda r: r.start)
    return [(a, b) for a, b in itertools.pairwise(spans) if b.start < (a.end or float("inf"))]


async def raw_get(r: Rig, target: str, port: int | None = None) -> tuple[int, bytes]:
    """Send a request line exactly as written (a client library would normalise the path); to the broker's
    port, or another of its ports."""
    host, port = r.server.host, port or r.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def comfy_measured(raw: dict[str, Any]) -> None:
    """ComfyUI's processes are recognised in nvidia-smi's list: its memory is measured."""
    raw["consumers"]["comfyui"]["processes"] = {"name": "*/ComfyUI/*"}


REAL_COMFY = {"context_mib": 610, "work_s": 0.05}


async def _render(r: Rig, path: str = "/v1/image") -> str:
    """An image job, and the end of its hold; the prompt id."""
    async with r.session.post(r.url(path), json={"prompt": {}}) as resp:
        assert resp.status == 200, await resp.read()
        prompt_id = (await resp.json())["prompt_id"]
    await until(lambda: r.broker.scheduler.holder is None)
    return prompt_id


def free_port() -> int:
    return mgpusim.free_ports(1)[0]


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for ``token`` (none for None)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class Daemon:
    """mgpumanager.py as its own process on a free port, for what only a real process shows."""

    #: Python run in the daemon's process before its ``main()`` ("": none). The mutation test of issue 18
    #: disables eviction there with it (``no_overfill``).
    prelude = ""
    #: The bearer token ``status`` and ``until`` send (None: none).
    token: str | None = None

    def __init__(
        self,
        raw: dict[str, Any],
        home: Path,
        smi: tuple[str, ...],
        env: dict[str, str] | None = None,
        *,
        nofile: int | None = None,
        uvloop: bool = True,
    ) -> None:
        self.env = {**os.environ, **(env or {})}
        #: Its soft and hard RLIMIT_NOFILE (None: this process's); its event loop (uvloop where installed).
        self.nofile = nofile
        self.uvloop = uvloop
        self.config = home / "daemon.yaml"
        self.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.port = free_port()
        self.smi = smi
        #: Its stderr goes to a file: a pipe nobody reads would fill up and block its logging.
        self.log_path = home / "daemon.log"
        self.log = ""
        self.terminated = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url("/v1/status"), headers=bearer(self.token)) as resp:
            return await resp.json()

    async def until(
        self, session: aiohttp.ClientSession, predicate: Any, timeout: float = 10
    ) -> dict[str, Any]:
        """Poll /v1/status until ``predicate(status)`` holds; that status."""
        deadline = time.monotonic() + timeout
        while not predicate(status := await self.status(session)):
            assert time.monotonic() < deadline, f"status never matched: {status['scheduler']}"
            await asyncio.sleep(0.05)
        return status

    async def __aenter__(self) -> Daemon:
        self.log_file = self.log_path.open("wb")
        program = [str(HERE / "mgpumanager.py")]
        prelude = self.prelude
        if not self.uvloop:  # asyncio's own event loop even where uvloop is installed: its import fails
            prelude = "; ".join(filter(None, ["sys.modules['uvloop'] = None", prelude]))
        if prelude:
            run = f"import sys; sys.path.insert(0, {str(HERE)!r}); import mgpumanager as m; {prelude}"
            program = ["-c", run + "; sys.exit(m.main(sys.argv[1:]))"]
        nofile = self.nofile
        self.proc = await asyncio.create_subprocess_exec(
            PY,
            *program,
            "--config",
            str(self.config),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--nvidia-smi",
            " ".join(self.smi),
            stderr=self.log_file,
            env=self.env,
            preexec_fn=None
            if nofile is None
            else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(self.url("/healthz")) as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline or self.proc.returncode is not None:
                    await self.__aexit__()
                    raise AssertionError(f"the daemon did not start:\n{self.log}")
                await asyncio.sleep(0.05)

    def terminate(self) -> None:
        """SIGTERM, as systemd stops a service: once."""
        if not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    async def __aexit__(self, *exc: Any) -> None:
        if self.proc.returncode is None:
            self.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except asyncio.TimeoutError:  # hung: killed, not left running after the test, and its log shown
            self.proc.kill()
            await self.proc.wait()
            self.log_file.close()
            raise AssertionError(f"the daemon did not stop:\n{self.log_path.read_text()}") from None
        self.log_file.close()
        self.log = self.log_path.read_text()
        # A bug the daemon caught in itself is logged with its traceback (no_bug_caught, in a process).
        if not exc or exc[0] is None:  # (its own lines carry it as traceback=, Python's raw at its exit)
            assert "Traceback (most recent call last)" not in self.log, f"a bug in the daemon:\n{self.log}"
            assert "Exception ignored" not in self.log, f"a bug in the daemon:\n{self.log}"


def nothing_overfilled(gpu: mgpusim.SimGPU) -> None:
    """No allocation exceeded the simulated GPU so far: what every no-overfill test asserts, through this
    one check (``no_overfill`` proves it can fail)."""
    ooms = gpu.ooms()
    assert ooms == [], f"overfilled: {ooms}"


def _plan_nothing(snap: m.RoomSnapshot) -> m.RoomPlan:
    """Eviction disabled: every target fits, nothing is unloaded for it."""
    return m.RoomPlan(0, snap.free_mib)


def no_overfill(test: Any) -> Any:
    """A test that asserts (with ``nothing_overfilled``) that no allocation exceeded the GPU. It runs twice:
    ``[evicting]`` as written, and ``[not-evicting]`` with eviction disabled (plan_room planning nothing, in
    this process and in every daemon the test starts), where its overfill check must fail: the mutation test
    of issue 18, which proves that the check can fail. Its other assertions come after that check."""
    signature = inspect.signature(test)
    extra = [name for name in ("evicting", "monkeypatch") if name not in signature.parameters]

    @functools.wraps(test)
    async def run(*args: Any, **kw: Any) -> None:
        evicting, monkeypatch = kw["evicting"], kw["monkeypatch"]
        own = {name: value for name, value in kw.items() if name in signature.parameters}
        if evicting:
            await test(*args, **own)
            return
        monkeypatch.setattr(m, "plan_room", _plan_nothing)
        monkeypatch.setattr(Daemon, "prelude", "m.plan_room = lambda snap: m.RoomPlan(0, snap.free_mib)")
        with pytest.raises(AssertionError, match=r"^overfilled: "):
            await test(*args, **own)

    params = list(signature.parameters.values())
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in extra]
    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.no_overfill = True  # type: ignore[attr-defined]
    return pytest.mark.parametrize("evicting", [True, False], ids=["evicting", "not-evicting"])(run)


class Bed:
    """Issue 18's end-to-end bed: a simulated GPU and consumers on real sockets, the consumers named by the
    test, and the broker as a process of its own (``daemon()``) reading the GPU through mgpusim's
    nvidia-smi."""

    def __init__(self, home: Path, total_mib: int) -> None:
        self.home = home
        self.state = home / "gpu.json"
        self.gpu = mgpusim.SimGPU(self.state, total_mib=total_mib, reserved_mib=480)
        self.sims: dict[str, mgpusim.SimConsumer] = {}
        self.servers: list[TestServer] = []
        self.raw: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "gpu": {"nvidia_smi": list(sim_smi(self.state)), "cushion_mib": 256},
            "scheduler": {"vram_wait_s": 0.5},
            "health": {"interval_s": 3600, "timeout_s": 2},  # the first round, then on demand only
            "routing": {},
            "consumers": {},
        }
        self.session = aiohttp.ClientSession()

    async def add(self, sim: mgpusim.SimConsumer, spec: dict[str, Any], *kinds: str) -> None:
        """Serve ``sim`` on a port of its own and configure it as ``spec`` (no url), routed for ``kinds``."""
        server = TestServer(sim.app, host="127.0.0.1", port=0)
        await server.start_server()
        self.servers.append(server)
        self.sims[sim.name] = sim
        self.raw["consumers"][sim.name] = {"url": str(server.make_url("")).rstrip("/"), **spec}
        self.raw["routing"].update(dict.fromkeys(kinds, sim.name))

    def daemon(self) -> Daemon:
        return Daemon(self.raw, self.home, sim_smi(self.state))

    async def render(self, daemon: Daemon, path: str = "/v1/image") -> tuple[int, dict[str, str], bytes]:
        """An image job (its answer), and the end of its hold."""
        async with self.session.post(daemon.url(path), json={"prompt": {}}) as resp:
            answer = resp.status, dict(resp.headers), await resp.read()
        await daemon.until(self.session, lambda st: st["scheduler"]["holder"] is None)
        return answer

    async def close(self) -> None:
        await self.session.close()
        for server in self.servers:
            await server.close()


@pytest.fixture
async def bed(tmp_path):
    beds: list[Bed] = []

    async def make(total_mib: int) -> Bed:
        home = tmp_path / f"bed{len(beds)}"
        home.mkdir()
        beds.append(Bed(home, total_mib))
        return beds[-1]

    yield make
    for b in beds:
        await b.close()


def mvoice_like(mib: int, kind: str) -> dict[str, Any]:
    """A consumer's config for an MvoiceSim of ``mib`` MiB: its health tells ``loaded``; unload and load
    routes; one kind (``kind``: its synthesize)."""
    return {
        "health": {"path": "/health"},
        "paths": {kind: {"path": "/api/synthesize"}},
        "vram_resident_mib": mib,
        "unload": {"path": "/api/admin/unload"},
        "load": {"path": "/api/admin/load"},
    }


def _unscheduled_show(raw: dict[str, Any]) -> None:
    raw["consumers"]["ollama"]["unscheduled"] = [{"method": "POST", "path": "/api/show"}]


def job_lines(caplog: Any) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("msg=job ")]


TOKEN = "s3cret-token-0123456789"


def with_token(raw: dict[str, Any]) -> None:
    raw["auth"] = {"token": TOKEN}


def from_elsewhere(address: str = "192.0.2.7") -> Any:
    """A middleware that makes every request look as if it came from ``address`` (not loopback)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request.clone(remote=address))

    return middleware


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError((sample, labels))


def recent_events(events: m.Events, since_s: float = 900) -> list[dict[str, Any]]:
    """The ring's events of the last ``since_s`` seconds, read back from the bytes the stream sends."""
    return [json.loads(frame.split(b"\ndata: ", 1)[1]) for frame in events.recent(since_s)]


async def _read_events(resp: aiohttp.ClientResponse, until_event: str) -> list[dict[str, Any]]:
    events = []
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 10)
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
            if events[-1]["event"] == until_event:
                return events


class Browser:
    """Headless Chromium driven over the DevTools protocol, with aiohttp's own websocket client."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.ids = itertools.count(1)

    async def __aenter__(self) -> Browser:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.skip("chromium is not installed (.ci/run installs it)")
        self.log = (self.home / "chromium.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1000,1100",
            f"--user-data-dir={self.home / 'profile'}",
            "--remote-debugging-port=0",
            "about:blank",
            stderr=self.log,
            stdout=asyncio.subprocess.DEVNULL,
        )
        port_file = self.home / "profile" / "DevToolsActivePort"
        await until(port_file.exists, timeout=30)
        await until(lambda: len(port_file.read_text().split()) >= 2, timeout=30)
        port = port_file.read_text().split()[0]
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            page = next(t for t in await resp.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), 30)
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"never true in the page: {expression}"
            await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await self.session.close()
        self.proc.kill()
        await self.proc.wait()
        self.log.close()
        # Killed, it leaves the directory of its singleton socket in /tmp (1,387 had piled up there). That
        # path must stay short, so it cannot be in the test's directory: the profile's link to it says where.
        with contextlib.suppress(OSError):
            left = Path(os.readlink(self.home / "profile" / "SingletonSocket")).parent
            if left.is_absolute() and left.name.startswith("org.chromium.Chromium."):
                shutil.rmtree(left)


def use_presets(raw: dict[str, Any]) -> None:
    """comfyui, ollama and whisper as consumers.yaml has them: their presets, a URL and a size."""
    for name, preset in (("comfyui", "comfyui"), ("ollama", "ollama"), ("whisper", "whisper-cpp")):
        c = raw["consumers"][name]
        raw["consumers"][name] = {
            "preset": preset,
            "url": c["url"],
            "vram_resident_mib": c["vram_resident_mib"],
        }


def _gated_unloads(ops: FakeOps, *names: str) -> tuple[asyncio.Event, list[str]]:
    """Make the unloads of ``names`` (every consumer's if none is named) wait until the event is set; the
    list of the unloads started."""
    gate, started = asyncio.Event(), []
    real = ops.unload

    async def gated(name: str) -> None:
        started.append(name)
        if not names or name in names:
            await gate.wait()
        await real(name)

    ops.unload = gated  # type: ignore[method-assign]
    return gate, started


# =====================================================================================================
# 1. Config
# Every rule of consumers.yaml, each naming its key; the parser's failures; mgpumanager --check.
# =====================================================================================================


def put(raw: dict[str, Any], keys: Sequence[str], value: Any) -> dict[str, Any]:
    """``raw`` with the value at the path ``keys`` set to ``value`` (``KeyError``: the key deleted)."""
    *parents, leaf = keys
    node = raw
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return raw


def _mutated(path: str, value: Any) -> dict[str, Any]:
    return put(base_raw(), path.split("."), value)


def _config_text(**extra: str) -> str:
    return yaml.safe_dump(base_raw(), sort_keys=False) + "".join(extra.values())


def test_shipped_config_is_valid_and_check_prints_summary():
    config = m.load_config(HERE / "consumers.yaml")
    assert list(config.consumers) == ["mvoice", "comfyui", "ollama", "whisper"]
    # Issue 22: consumers.yaml turns yielding on (every consumer measured) and keeps state where the unit's
    # StateDirectory= is.
    assert config.gpu.yield_ == m.YieldConfig(2048, 512, 30, 2)
    assert all(c.processes is not None for c in config.consumers.values())
    assert config.state_file == "/var/lib/mgpumanager/state.json"
    assert config.routing == {"tts": "mvoice", "stt": "mvoice", "llm": "ollama", "image": "comfyui"}
    text = m.summary(config)
    for expected in (
        "mvoice",
        "last resort (vram_managed): POST /api/generate for each of GET /api/ps models",
        "POST /free; measured: unit comfyui.service",
        "command: systemctl stop whisper-server, load command: systemctl start whisper-server",
        "mvoice+ollama",
        "/v1/image",
    ):
        assert expected in text


def test_defaults_are_the_documented_ones():
    raw = base_raw()
    del raw["scheduler"], raw["health"], raw["gpu"]
    config = m.parse_config(raw)
    assert config.scheduler == m.SchedulerConfig(64, 300, 5, 10, 60, 64)
    assert config.health == m.HealthConfig(5, 2)
    assert config.gpu == m.GpuConfig(("nvidia-smi",), 0, 256, 5)
    assert (config.gpu.reader, config.gpu.max_output_mib) == ("auto", 8)
    whisper = config.consumers["whisper"]
    assert (whisper.priority, whisper.max_concurrency, whisper.timeout_s, whisper.vram_managed) == (
        2,
        1,
        300,
        False,
    )
    assert whisper.health.method == "GET" and whisper.paths["stt"].method == "POST"
    comfy = config.consumers["comfyui"]
    assert comfy.unload == m.Route("POST", "/free", {"free_memory": True}, 60)
    raw = base_raw()
    raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"] = {"path": "/history/{prompt_id}"}
    hold = m.parse_config(raw).consumers["comfyui"].paths["image"].hold_until
    assert hold == m.Hold("GET", "/history/{prompt_id}", 0.5, 600)


def test_coexistence_is_symmetric():
    config = m.parse_config(base_raw())
    assert config.consumers["ollama"].can_coexist_with == {"mvoice"}
    assert config.consumers["whisper"].can_coexist_with == {"mvoice"}
    assert config.consumers["comfyui"].can_coexist_with == set()


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("scheduler.max_queu", 3, "scheduler.max_queu: unknown key"),
        ("consumers.mvoice.pririty", 3, "consumers.mvoice.pririty: unknown key"),
        ("consumers.mvoice.paths.tts.methd", "POST", "consumers.mvoice.paths.tts.methd: unknown key"),
        ("consumers.mvoice.paths.tts.method", "FETCH", "consumers.mvoice.paths.tts.method: must be one of"),
        ("consumers.mvoice.url", "ftp://host/", "consumers.mvoice.url: must be an http(s) URL with a host"),
        ("consumers.mvoice.url", "http://", "consumers.mvoice.url: must be an http(s) URL with a host"),
        ("routing.tts", "nobody", "routing.tts: names unknown consumer 'nobody'"),
        ("routing.image", "mvoice", "routing.image: consumer 'mvoice' has no path for kind 'image'"),
        ("audio_proxy", "nobody", "audio_proxy: names unknown consumer 'nobody'"),
        ("consumers.mvoice.can_coexist_with", ["ghost"], "consumers.mvoice.can_coexist_with: names unknown"),
        ("consumers.mvoice.priority", 5, "consumers.mvoice.priority: must be an integer from 0 to 4"),
        ("consumers.mvoice.priority", -1, "consumers.mvoice.priority: must be an integer from 0 to 4"),
        ("scheduler.max_queue", 0, "scheduler.max_queue: must be positive"),
        ("scheduler.aging_s", -1, "scheduler.aging_s: must be positive"),
        ("health.timeout_s", "2s", "health.timeout_s: must be a number"),
        ("consumers.mvoice.max_concurrency", 1.5, "consumers.mvoice.max_concurrency: must be an integer"),
        ("gpu.index", -1, "gpu.index: must be >= 0"),
        ("consumers.comfyui.gpu", -1, "consumers.comfyui.gpu: must be >= 0"),
        ("consumers.comfyui.gpu", "1", "consumers.comfyui.gpu: must be an integer"),
        ("consumers.mvoice.vram_resident_mib", KeyError, "consumers.mvoice.vram_resident_mib: missing"),
        ("consumers.mvoice.url", KeyError, "consumers.mvoice.url: missing"),
        ("consumers.mvoice.health", KeyError, "consumers.mvoice.health: missing"),
        ("consumers.mvoice.health", {"method": "GET"}, "consumers.mvoice.health.path: missing"),
        ("consumers.mvoice.paths", {}, "consumers.mvoice.paths: needs at least one path"),
        ("consumers.mvoice.paths", KeyError, "consumers.mvoice.paths: missing"),
        (
            "consumers.mvoice.paths.tts.path",
            "api/synthesize",
            "consumers.mvoice.paths.tts.path: must start with",
        ),
        ("consumers.mvoice.unload.timeout_s", 0, "consumers.mvoice.unload.timeout_s: must be positive"),
        ("consumers.mvoice.vram_managed", "yes", "consumers.mvoice.vram_managed: must be true or false"),
        (
            "consumers.mvoice.paths.Tts",
            {"path": "/x"},
            "consumers.mvoice.paths.Tts: kinds are lowercase words",
        ),
        (
            "consumers.mvoice.paths.status",
            {"path": "/x"},
            "consumers.mvoice.paths.status: 'status' is reserved",
        ),
        ("routing.events", "mvoice", "routing.events: 'events' is reserved"),
        ("consumers.comfyui.paths.image.hold_until.poll_s", 0, "hold_until.poll_s: must be positive"),
        ("listen", "8770", "listen: must be HOST:PORT"),
        # Digits that are not ASCII: superscript two made int() raise (a traceback), Arabic-Indic ones a port.
        ("listen", "127.0.0.1:\u00b2", "listen: must be HOST:PORT"),
        ("consumers.mvoice.listen", "0.0.0.0:\u0661\u0661", "consumers.mvoice.listen: must be HOST:PORT"),
        ("gpu.nvidia_smi", "", "gpu.nvidia_smi: must be a command"),
        ("gpu.reader", "nvidia_smi", "gpu.reader: must be one of auto, nvml, nvidia-smi, not 'nvidia_smi'"),
        ("gpu.reader", ["nvml"], "gpu.reader: must be one of auto, nvml, nvidia-smi, not ['nvml']"),
        # Issue 22: gpu.yield, state_file.
        ("gpu.yield", {}, "consumers.mvoice.processes: required with gpu.yield (or vram_resident_mib: 0)"),
        ("gpu.yield", [], "gpu.yield: must be a mapping, not list"),
        ("gpu.yield", {"keep_free": 1}, "gpu.yield.keep_free: unknown key"),
        ("gpu.yield", {"keep_free_mib": 0}, "gpu.yield.keep_free_mib: must be positive"),
        ("gpu.yield", {"keep_free_mib": 2.5}, "gpu.yield.keep_free_mib: must be an integer"),
        ("gpu.yield", {"ignore_mib": 10**9}, "gpu.yield.ignore_mib: must be at most 1048576 MiB"),
        ("gpu.yield", {"restore_after_s": -1}, "gpu.yield.restore_after_s: must be >= 0"),
        ("gpu.yield", {"poll_s": 0.05}, "gpu.yield.poll_s: must be at least 0.1 s"),
        ("gpu.yield", {"poll_s": math.nan}, "gpu.yield.poll_s: must be a finite number"),
        ("gpu.yield", {"restore_after_s": 10**9}, "gpu.yield.restore_after_s: must be at most 604800 s"),
        ("state_file", "", "state_file: must be a path (a non-empty string), not ''"),
        ("state_file", ["/var/lib/x"], "state_file: must be a path"),
    ],
)
def test_each_config_rule_names_the_key(path, value, expected):
    problems = problems_of(_mutated(path, value))
    assert any(expected in p for p in problems), problems


@settings(max_examples=300, deadline=None)
@given(
    mutations=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    ("listen",),
                    ("gpu",),
                    ("gpu", "nvidia_smi"),
                    ("scheduler",),
                    ("scheduler", "max_queue"),
                    ("routing",),
                    ("routing", "tts"),
                    ("audio_proxy",),
                    ("consumers",),
                    ("consumers", "mvoice"),
                    ("consumers", "mvoice", "paths"),
                    ("consumers", "mvoice", "paths", "tts"),
                    ("consumers", "mvoice", "health"),
                    ("consumers", "mvoice", "unload"),
                    ("consumers", "mvoice", "can_coexist_with"),
                    ("consumers", "comfyui", "paths", "image", "hold_until"),
                    ("consumers", "ollama", "vram_resident_mib"),
                    ("consumers", "ollama", "preset"),
                    ("consumers", "ollama", "paths"),
                    ("consumers", "ollama", "unload"),
                    ("consumers", "ollama", "listen"),
                    ("consumers", "comfyui", "residency"),
                    ("consumers", "comfyui", "unscheduled"),
                ]
            ),
            st.one_of(
                st.none(),
                st.booleans(),
                st.integers(-5, 10**7),
                st.floats(),
                st.text(max_size=6),
                st.lists(st.text(max_size=3), max_size=2),
                st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
            ),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_malformed_config_is_a_config_error_never_a_crash(mutations):
    raw = yaml.safe_load((HERE / "consumers.yaml").read_text())
    for path, value in mutations:
        node = raw
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[path[-1]] = value
    try:
        m.parse_config(raw)
    except m.ConfigError as e:
        assert e.problems and all(":" in p for p in e.problems)


def test_every_problem_is_reported_at_once():
    raw = _mutated("scheduler.max_queu", 3)
    raw["consumers"]["mvoice"]["priority"] = 9
    raw["routing"]["tts"] = "nobody"
    assert len(problems_of(raw)) == 3


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("scheduler.aging_s", math.nan, "scheduler.aging_s: must be a finite number"),
        ("scheduler.queue_timeout_s", math.inf, "scheduler.queue_timeout_s: must be a finite number"),
        ("health.interval_s", -math.inf, "health.interval_s: must be a finite number"),
        ("health.timeout_s", math.nan, "health.timeout_s: must be a finite number"),
        (
            "consumers.mvoice.unload.timeout_s",
            math.nan,
            "consumers.mvoice.unload.timeout_s: must be a finite",
        ),
        (
            "consumers.comfyui.paths.image.hold_until.timeout_s",
            math.inf,
            "hold_until.timeout_s: must be a fin",
        ),
        ("scheduler.max_body_mib", 10_000_000_000_000, "scheduler.max_body_mib: must be at most 16384 MiB"),
        ("consumers.mvoice.vram_resident_mib", 10**13, "vram_resident_mib: must be at most 1048576 MiB"),
        ("gpu.cushion_mib", 10**9, "gpu.cushion_mib: must be at most 1048576 MiB"),
        ("scheduler.max_queue", 10**9, "scheduler.max_queue: must be at most 10000"),
        ("scheduler.max_evictions", 10**6, "scheduler.max_evictions: must be at most 10000"),
        (
            "consumers.mvoice.max_concurrency",
            10**6,
            "consumers.mvoice.max_concurrency: must be at most 10000",
        ),
        ("consumers.mvoice.timeout_s", 1e9, "consumers.mvoice.timeout_s: must be at most 604800 s"),
        ("scheduler.shutdown_timeout_s", 1e300, "scheduler.shutdown_timeout_s: must be at most 604800 s"),
        (
            "consumers.mvoice.idle_unload_s",
            10**20,
            "consumers.mvoice.idle_unload_s: must be at most 604800 s",
        ),
        ("consumers.comfyui.gpu", 10**6, "consumers.comfyui.gpu: must be at most 255"),
        ("gpu.index", 256, "gpu.index: must be at most 255"),
        ("scheduler.aging_s", 5e-324, "scheduler.aging_s: must be at least 0.001 s"),
        (
            "consumers.comfyui.paths.image.hold_until.poll_s",
            1e-9,
            "hold_until.poll_s: must be at least 0.001 s",
        ),
        ("consumers.mvoice.idle_unload_s", 1e-6, "consumers.mvoice.idle_unload_s: must be at least 0.001 s"),
        (
            "consumers.mvoice.unload.body",
            {"x": math.nan},
            "consumers.mvoice.unload.body: cannot be sent as JSON",
        ),
        ("consumers.mvoice.load.body", {"x": math.inf}, "consumers.mvoice.load.body: cannot be sent as JSON"),
        # (A mutation audit: none of these three was tested.) YAML's true is no count; gpu.max_output_mib is a
        # body size (16 GiB), not a memory size (1 TiB); max_bodies_mib holds at least one whole body.
        ("scheduler.max_queue", True, "scheduler.max_queue: must be an integer, not True"),
        ("gpu.max_output_mib", 16385, "gpu.max_output_mib: must be at most 16384 MiB"),
        ("scheduler.max_bodies_mib", 32, "scheduler.max_bodies_mib: must be at least max_body_mib (64)"),
    ],
)
def test_every_number_is_finite_and_sane_naming_the_key(path, value, expected):
    """Item 3 of issue 10: ``aging_s: .nan`` passed --check and wedged the lock; 10**13 MiB bodies passed."""
    problems = problems_of(_mutated(path, value))
    assert any(expected in p for p in problems), problems


def test_the_largest_sane_numbers_are_accepted():
    raw = base_raw()
    raw["scheduler"] |= {"max_body_mib": 16384, "max_bodies_mib": 16384, "max_queue": 10000}
    raw["scheduler"] |= {"queue_timeout_s": 604800, "body_timeout_s": 604800}
    raw["consumers"]["mvoice"] |= {"vram_resident_mib": 1048576, "idle_unload_s": 0}
    raw["consumers"]["comfyui"]["gpu"] = 255
    raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["poll_s"] = 0.001
    m.parse_config(raw)


def test_nan_in_yaml_is_refused_by_check(tmp_path):
    bad = tmp_path / "nan.yaml"
    bad.write_text(yaml.safe_dump(base_raw()).replace("aging_s: 60", "aging_s: .nan"))
    res = subprocess.run(
        [PY, str(HERE / "mgpumanager.py"), "--check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and "scheduler.aging_s: must be a finite number, not nan" in res.stderr


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cretpw@127.0.0.1:8765",
        "https://s3cretpw@host",
        "http://:s3cretpw@host/x",
        "http:u:s3cretpw@h",
    ],
)
def test_credentials_in_a_consumer_url_are_refused_and_never_echoed(url):
    """Item 2 of issue 10: the URL is shown in /v1/status to anyone who may call the broker."""
    problems = problems_of(_mutated("consumers.mvoice.url", url))
    assert any(p.startswith("consumers.mvoice.url: must") for p in problems), problems
    assert not any("s3cretpw" in p for p in problems), problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_config_text(dup="scheduler: {max_queue: 3}\n"), "column 1: found a duplicate key 'scheduler'"),
        (
            _config_text().replace("    priority: 3\n", "    priority: 3\n    priority: 4\n"),
            "found a duplicate key 'priority'",
        ),
        ("x-bomb:\n" + "".join(f"  {line}\n" for line in _bomb(9).splitlines()), "aliases expand it beyond"),
        ("x: &a [1, *a]\n", "found an alias inside its own anchor"),
        ("x: &a {y: *a}\n", "found an alias inside its own anchor"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("# " + "x" * (300 * 1024) + "\n", "larger than 262144 bytes"),
        ("listen: 1" + "0" * 5000 + "\n", "not valid YAML: ValueError"),
        ("when: 2001-02-30\n", "not valid YAML: ValueError"),
        # A value PyYAML cannot build that is no ValueError (a mutation audit: only ValueErrors were tested).
        ("x: !!bool maybe\n", "not valid YAML: KeyError"),
        ("consumers: {\n", "not valid YAML at line"),
    ],
)
def test_every_parser_failure_is_one_config_error(tmp_path, text, expected):
    """Item 6 of issue 10: duplicate keys, alias bombs, recursion and oversized files are config errors."""
    path = tmp_path / "consumers.yaml"
    path.write_text(text)
    with pytest.raises(m.ConfigError) as info:
        m.load_config(path)
    [problem] = info.value.problems
    assert expected in problem and str(path) not in problem, problem  # (whoever shows it names the file)
    assert "\n" not in problem


def test_an_alias_bomb_in_an_unload_body_is_refused_but_merge_keys_and_small_aliases_still_work(tmp_path):
    raw = base_raw()
    raw["consumers"]["comfyui"]["unload"]["body"] = {"free_memory": "BOMB"}
    text = yaml.safe_dump(raw, sort_keys=False).replace("free_memory: BOMB", "free_memory: *l8")
    path = tmp_path / "consumers.yaml"
    path.write_text(_bomb(8) + text)  # 1 KiB of YAML, 10**8 strings once expanded
    with pytest.raises(m.ConfigError, match="aliases expand it beyond"):
        m.load_config(path)
    # Anchors, aliases and merge keys of sane size (overriding a merged key is no duplicate) still load.
    text = yaml.safe_dump(base_raw(), sort_keys=False)
    text = text.replace("    health:\n      method: GET\n", "    health: &health\n      method: GET\n", 1)
    text = text.replace("    health:\n      path: /system_stats\n", "    health:\n      <<: *health\n")
    text = text.replace("    health:\n      path: /\n", "    health:\n      <<: *health\n      path: /\n")
    path.write_text(text)
    consumers = m.load_config(path).consumers
    assert consumers["comfyui"].health == consumers["mvoice"].health == m.Route("GET", "/health")
    assert consumers["ollama"].health == m.Route("GET", "/")


def test_aliases_may_expand_a_config_to_max_config_expansion_and_not_one_more(tmp_path):
    """MAX_CONFIG_EXPANSION (1 Mi nodes and scalar characters, every alias expanded) is the bound itself: a
    5 KiB document whose aliases expand it to exactly that many loads whole, one character more is refused.
    (Found by a mutation audit: the bombs tested expand to 10**8 strings and more, so a bound up to 100
    times higher, or one that left the characters uncounted, failed no test.)"""
    # The root mapping (1), its keys (1 + length each), the string (1 + 969) and the list (1) of 1,080
    # aliases to it: 1 + 2 + 970 + 2 + 1 + 1080 * 970 = 1,048,576 with a key of one character.
    text = '{key}: &s "' + "s" * 969 + '"\ny: [' + ", ".join(["*s"] * 1080) + "]\n"
    path = tmp_path / "consumers.yaml"
    path.write_text(text.format(key="x"))
    doc = m.read_config(path)
    assert len(doc["y"]) == 1080 and doc["y"][-1] == doc["x"] == "s" * 969
    path.write_text(text.format(key="xx"))
    with pytest.raises(m.ConfigError) as info:
        m.read_config(path)
    assert info.value.problems == [
        "not valid YAML at line 1, column 1: its aliases expand it beyond 1048576 nodes and characters"
    ]


def test_unload_and_load_bodies_are_serialised_once_when_the_config_is_loaded():
    config = m.parse_config(base_raw())
    assert config.consumers["comfyui"].unload.data == b'{"free_memory": true}'
    raw = base_raw()
    raw["consumers"]["comfyui"]["unload"]["body"] = {"when": datetime.date(2001, 2, 3)}
    problems = problems_of(raw)
    assert any(p.startswith("consumers.comfyui.unload.body: cannot be sent as JSON") for p in problems)


@pytest.mark.parametrize(
    ("name", "text"),
    [("nesting", "[" * 100_000 + "]" * 100_000), ("bomb", _bomb(9)), ("recursion", "x: &a [*a]\n")],
)
def test_check_exits_2_with_one_line_whatever_the_parser_finds(tmp_path, name, text):
    bad = tmp_path / f"{name}.yaml"
    bad.write_text(text)
    res = subprocess.run(
        [PY, str(HERE / "mgpumanager.py"), "--check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "not valid YAML" in res.stderr and "Traceback" not in res.stderr, res.stderr
    # The file is named once, as for a key's problem (it was "bad.yaml: bad.yaml: not valid YAML ...").
    assert res.stderr.startswith(f"{bad}: not valid YAML") and res.stderr.count(str(bad)) == 1, res.stderr


def test_check_of_a_config_it_cannot_read_names_the_file_once(tmp_path):
    """Found walking the README: ``--check --config FILE`` of a missing file printed ``FILE: FILE: No such
    file or directory``, the loader's message naming the file and --check naming it again."""
    missing = tmp_path / "missing.yaml"
    res = subprocess.run(
        [PY, str(HERE / "mgpumanager.py"), "--check", "--config", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr == f"{missing}: cannot read it: No such file or directory\n", res.stderr


def test_cli_check_exits_0_or_2_naming_the_key(tmp_path):
    ok = subprocess.run(
        [PY, "mgpumanager.py", "--check"], cwd=HERE, capture_output=True, text=True, timeout=30
    )
    assert ok.returncode == 0, ok.stderr
    assert "routing:" in ok.stdout and "comfyui" in ok.stdout
    # The routing lines, /audio/* among them, are one table: their arrows in one column.
    routes = ok.stdout.partition("routing:\n")[2].partition("\n\n")[0].splitlines()
    assert any("/audio/*" in line for line in routes) and len({line.index(" -> ") for line in routes}) == 1, (
        routes
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text((HERE / "consumers.yaml").read_text().replace("max_queue:", "max_queu:"))
    res = subprocess.run(
        [PY, str(HERE / "mgpumanager.py"), "--check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2
    assert "scheduler.max_queu: unknown key" in res.stderr
    # A bad config at start-up (no --check) exits 2 the same way and never serves.
    res = subprocess.run(
        [PY, str(HERE / "mgpumanager.py"), "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 2 and "scheduler.max_queu: unknown key" in res.stderr


@pytest.mark.parametrize(
    "listen",
    ["http://127.0.0.1:8770", "[::1:8770", "[::1]x:8770", "exa mple:8770", "[mrock]:8770", "a..b:8770"],
)
def test_a_listen_no_listener_can_bind_is_a_bad_config_exit_2_never_a_start_that_fails(tmp_path, listen):
    """Found by the attack on issue 19's surfaces: ``--check`` accepted a ``listen`` whose HOST is no address
    or name (a URL, a bracket left open, a space), and the broker then stopped at start-up with exit 1,
    "cannot listen", which the unit restarts for ever (only exit 2, a bad config, is not restarted). Now the
    loader refuses it, naming the key, for the broker's listen and a consumer's alike."""
    raw = base_raw()
    raw["listen"] = listen
    assert f"listen: must be HOST:PORT, not {listen!r}" in problems_of(raw)
    raw["listen"] = "127.0.0.1:0"
    raw["consumers"]["ollama"]["listen"] = listen
    assert f"consumers.ollama.listen: must be HOST:PORT, not {listen!r}" in problems_of(raw)
    res = subprocess.run(
        [
            PY,
            str(HERE / "mgpumanager.py"),
            "--check",
            "--config",
            str(HERE / "consumers.yaml"),
            "--listen",
            listen,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and f"listen: must be HOST:PORT, not {listen!r}" in res.stderr, res


def test_every_spelling_of_a_listen_a_listener_can_bind_is_still_accepted():
    """Beside the refusals above: none, an address (IPv6 bare or between brackets), a name."""
    for listen, host in [
        (":8770", "0.0.0.0"),
        ("0.0.0.0:8770", "0.0.0.0"),
        ("[::]:8770", "::"),
        ("[::1]:8770", "::1"),
        ("::1:8770", "::1"),
        ("localhost:8770", "localhost"),
        ("mrock.lan.:8770", "mrock.lan."),
        ("127.1:8770", "127.1"),
        ("192.168.1.5:0", "192.168.1.5"),
    ]:
        raw = base_raw()
        raw["listen"] = listen
        config = m.parse_config(raw)
        assert (config.listen_host, config.listen_port) == (host, int(listen.rpartition(":")[2])), listen


def test_cli_overrides_listen_and_nvidia_smi(tmp_path):
    config = m.load_config(
        HERE / "consumers.yaml",
        overrides={
            "listen": "127.0.0.1:9999",
            "gpu.nvidia_smi": "python3 mgpusim.py nvidia-smi --state 's s.json'",
        },
    )
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 9999)
    assert config.gpu.nvidia_smi == ("python3", "mgpusim.py", "nvidia-smi", "--state", "s s.json")


def test_consumers_run_on_the_default_gpu_unless_they_name_one_and_coexist_only_on_one():
    raw = base_raw()
    raw["gpu"]["index"] = 1
    raw["consumers"]["comfyui"]["gpu"] = 0
    config = m.parse_config(raw)
    assert {n: c.gpu for n, c in config.consumers.items()} == {
        "mvoice": 1,
        "comfyui": 0,
        "ollama": 1,
        "whisper": 1,
    }
    assert m.gpu_indexes(config) == [0, 1]
    assert "(GPU 0)" in m.summary(config) and "(GPU 1)" in m.summary(config)
    raw["consumers"]["whisper"]["gpu"] = 0  # mvoice (GPU 1) names whisper in can_coexist_with
    with pytest.raises(m.ConfigError) as info:
        m.parse_config(raw)
    assert info.value.problems == [
        "consumers.mvoice.can_coexist_with: names whisper, which runs on GPU 0, not 1: coexistence is a"
        " question for one GPU (consumers on different GPUs never wait for each other)"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"path": "/api/show"}, "consumers.ollama.unscheduled: must be a list"),
        ([{"path": "/api/show", "verb": "POST"}], "consumers.ollama.unscheduled[0].verb: unknown key"),
        ([{"method": "POST"}], "consumers.ollama.unscheduled[0].path: missing"),
        ([{"path": "api/show"}], "consumers.ollama.unscheduled[0].path: must start with '/'"),
        ([{"path": "/a/*/b"}], "consumers.ollama.unscheduled[0].path: '*' may only end a path"),
        ([{"method": "FETCH", "path": "/x"}], "consumers.ollama.unscheduled[0].method: must be one of"),
        (["/api/show"], "consumers.ollama.unscheduled[0]: must be a mapping"),
        (
            [{"path": "/api/show"}, {"path": "/api/gen*"}],
            "consumers.ollama.unscheduled[1]: POST /api/generate is the path of kind 'llm'",
        ),
    ],
)
def test_unscheduled_config_rules_name_the_key(value, expected):
    problems = problems_of(_mutated("consumers.ollama.unscheduled", value))
    assert any(expected in p for p in problems), problems


def test_unscheduled_defaults_to_post_and_a_trailing_star_is_a_prefix():
    config = m.parse_config(
        _mutated("consumers.comfyui.unscheduled", [{"path": "/upload/*"}, {"path": "/x"}])
    )
    prefix, exact = config.consumers["comfyui"].unscheduled
    assert (prefix.method, exact.method) == ("POST", "POST")
    assert prefix.matches("POST", "/upload/image") and not prefix.matches("POST", "/uploadx")
    assert exact.matches("POST", "/x") and not exact.matches("POST", "/x/y")
    assert not exact.matches("PUT", "/x")
    assert config.consumers["mvoice"].unscheduled == ()
    shipped = m.load_config(HERE / "consumers.yaml").consumers
    assert any(u.matches("POST", "/api/show") for u in shipped["ollama"].unscheduled)


def test_token_file_and_token_rules(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    raw = base_raw()
    raw["auth"] = {"token_file": str(secret)}
    assert m.parse_config(raw).auth.token == TOKEN
    raw["auth"] = {"token_file": str(tmp_path / "missing")}
    assert any(p.startswith("auth.token_file: cannot read") for p in problems_of(raw))
    raw["auth"] = {"token": "short"}
    assert any(p.startswith("auth.token: the token must be at least 16") for p in problems_of(raw))
    raw["auth"] = {"token": TOKEN, "token_file": str(secret)}
    assert any("not both" in p for p in problems_of(raw))


def test_a_token_written_where_its_files_path_belongs_is_not_shown_back(tmp_path, monkeypatch):
    """A secret pasted as ``token_file`` (or given to --token-file) is named in no message: a path in a
    directory that exists shows, any other value does not (it may be the token itself)."""
    monkeypatch.chdir(tmp_path)  # (the token is no file here)
    raw = base_raw()
    raw["auth"] = {"token_file": TOKEN}
    problems = problems_of(raw)
    assert any(p.startswith("auth.token_file: cannot read (the value, not shown") for p in problems), problems
    base64ish = "Zm9v/YmFy+YmF6/cXV4cXV1eA=="  # (openssl rand -base64 makes such tokens)
    raw["auth"] = {"token_file": base64ish}
    assert not any(base64ish in p or "Zm9v" in p for p in problems_of(raw))
    with_clients(raw, wa={"token": None, "token_file": WA_TOKEN})
    del raw["auth"]["clients"]["wa"]["token"], raw["auth"]["token"]
    raw["auth"]["token_file"] = str(tmp_path / "missing")
    problems = problems_of(raw)
    assert any(p.startswith("auth.clients.wa.token_file: cannot read (the value") for p in problems), problems
    assert any(f"cannot read {tmp_path / 'missing'}: " in p for p in problems), problems  # a path shows
    assert not any(TOKEN in p or WA_TOKEN in p for p in problems), problems
    with pytest.raises(m.CliError) as refused:
        m.cli_token(TOKEN, {})
    assert refused.value.code == 2 and "cannot read --token-file (the value, not shown" in str(refused.value)
    assert TOKEN not in str(refused.value)


def test_a_token_file_is_read_bounded_from_a_regular_file_only(tmp_path, caplog):
    """Item 7 of issue 10: /dev/zero hung start-up; a token file others may read was accepted silently."""
    raw = base_raw()
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    secret.chmod(0o600)
    raw["auth"] = {"token_file": str(secret)}
    assert m.parse_config(raw).auth.token == TOKEN
    assert "readable by others" not in caplog.text
    secret.chmod(0o644)
    assert m.parse_config(raw).auth.token == TOKEN
    assert f'msg="token file is readable by others" path="{secret}" mode=644' in caplog.text
    big = tmp_path / "big"
    big.write_bytes(b"x" * 100_000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, expected in (
        ("/dev/zero", "/dev/zero is not a regular file"),
        (str(fifo), f"{fifo} is not a regular file"),  # opening it must not wait for a writer
        (str(big), f"{big} is larger than 4096 bytes"),
        (str(tmp_path), f"{tmp_path} is not a regular file"),
    ):
        raw["auth"] = {"token_file": path}
        problems = problems_of(raw)
        assert any(p.startswith(f"auth.token_file: {expected}") for p in problems), problems


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (
            "consumers.whisper.unload",
            {"command": "systemctl stop w"},
            "whisper.unload.command: must be a list",
        ),
        ("consumers.whisper.unload", {"command": []}, "consumers.whisper.unload.command: must be a list"),
        ("consumers.whisper.load", {"command": ["systemctl", ""]}, "consumers.whisper.load.command: must be"),
        ("consumers.whisper.unload", {"command": ["x"], "path": "/u"}, "whisper.unload: set command or an"),
        (
            "consumers.whisper.unload",
            {"command": ["x"], "timeout_s": 0},
            "unload.timeout_s: must be positive",
        ),
        ("consumers.whisper.unload", {"command": ["x"], "shell": True}, "whisper.unload.shell: unknown key"),
        ("consumers.mvoice.idle_unload_s", -1, "consumers.mvoice.idle_unload_s: must be >= 0"),
        ("consumers.mvoice.idle_unload_s", "10m", "consumers.mvoice.idle_unload_s: must be a number"),
        ("consumers.whisper.idle_unload_s", 60, "consumers.whisper.idle_unload_s: needs an unload route"),
        ("consumers.ollama.idle_unload_s", 60, "consumers.ollama.idle_unload_s: a vram_managed consumer"),
        ("consumers.mvoice.preload", "yes", "consumers.mvoice.preload: must be true or false"),
        ("consumers.comfyui.preload", True, "consumers.comfyui.preload: needs a load route or command"),
        ("consumers.whisper.unload", {"command": ["x"]}, "consumers.whisper.load: a consumer unloaded by a"),
        ("consumers.mvoice.unload", {"command": ["x"]}, "consumers.mvoice.load: a consumer unloaded by a"),
    ],
)
def test_command_idle_and_preload_config_rules_name_the_key(path, value, expected):
    problems = problems_of(_mutated(path, value))
    assert any(expected in p for p in problems), problems


def test_command_routes_parse_and_show_in_the_summary():
    raw = base_raw()
    whisper = raw["consumers"]["whisper"]
    whisper["unload"] = {"command": ["systemctl", "stop", "whisper-server"], "timeout_s": 30}
    whisper["load"] = {"command": ["systemctl", "start", "whisper server"]}
    whisper["idle_unload_s"] = 600
    raw["consumers"]["mvoice"]["preload"] = True
    config = m.parse_config(raw)
    c = config.consumers["whisper"]
    assert c.unload == m.Command(("systemctl", "stop", "whisper-server"), 30)
    assert c.load == m.Command(("systemctl", "start", "whisper server"), 60.0)
    assert c.started_by_command and not config.consumers["mvoice"].started_by_command
    assert (c.idle_unload_s, c.preload, config.consumers["mvoice"].preload) == (600, False, True)
    assert config.consumers["mvoice"].idle_unload_s == 0  # absent: never
    text = m.summary(config)
    assert "command: systemctl stop whisper-server, load command: systemctl start 'whisper server'" in text
    assert "idle unload after 600 s" in text and "load POST /api/admin/load; preload" in text


def test_config_problems_never_echo_the_token(tmp_path):
    raw = base_raw()
    raw["auth"] = {"token": 12345678901234567890}
    assert not any("1234567890" in p for p in problems_of(raw))
    with pytest.raises(m.ConfigError) as info:
        bad = tmp_path / "consumers.yaml"
        bad.write_text(yaml.safe_dump(base_raw()) + f'auth: {{token: "{TOKEN}\n')
        m.load_config(bad)
    assert TOKEN not in "\n".join(info.value.problems) and "line" in info.value.problems[0]


WA_TOKEN = "wa-token-0123456789abcdef"
BATCH_TOKEN = "batch-token-0123456789ab"


def with_clients(raw: dict[str, Any], **clients: dict[str, Any]) -> None:
    """The admin's TOKEN and clients wa and batch (each with its token; more settings per client given)."""
    raw["auth"] = {
        "token": TOKEN,
        "clients": {"wa": {"token": WA_TOKEN, "priority": 4}, "batch": {"token": BATCH_TOKEN, "priority": 0}},
    }
    for name, extra in clients.items():
        raw["auth"]["clients"].setdefault(name, {}).update(extra)


def test_clients_parse_each_with_its_token_priority_and_limit(tmp_path):
    raw = base_raw()
    secret = tmp_path / "batch"
    secret.write_text(BATCH_TOKEN + "\n")
    with_clients(raw, batch={"token": None, "token_file": str(secret), "max_queued": 200})
    del raw["auth"]["clients"]["batch"]["token"]
    config = m.parse_config(raw)
    wa, batch = config.auth.clients["wa"], config.auth.clients["batch"]
    assert (wa.name, wa.token, wa.priority, wa.max_queued) == ("wa", WA_TOKEN, 4, None)
    assert (batch.token, batch.priority, batch.max_queued) == (BATCH_TOKEN, 0, 200)
    assert config.auth.required and config.auth.token == TOKEN
    assert WA_TOKEN not in repr(config) and BATCH_TOKEN not in repr(config)  # never shown
    text = m.summary(config)
    assert "wa           priority 4" in text and "batch        priority 0, at most 200 queued" in text
    assert WA_TOKEN not in text and TOKEN not in text
    # A client without a priority of its own runs at its consumers' priorities.
    raw["auth"]["clients"]["wa"] = {"token": WA_TOKEN}
    assert m.parse_config(raw).auth.clients["wa"].priority is None
    # Without auth.clients, none: everything as before.
    assert m.parse_config(base_raw()).auth.clients == {} and not m.parse_config(base_raw()).auth.required


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ({"token": "short-one"}, "auth.clients.x.token: the token must be at least 16 printable"),
        ({"token": "has a space in it, 16+"}, "auth.clients.x.token: the token must be at least 16"),
        ({}, "auth.clients.x: needs its token or token_file"),
        ({"token": "x-token-0123456789abc", "token_file": "/f"}, "auth.clients.x: set token or token_file"),
        ({"token_file": "/nonexistent/x"}, "auth.clients.x.token_file: cannot read (the value, not shown"),
        ({"token_file": "/etc/nonexistent"}, "auth.clients.x.token_file: cannot read /etc/nonexistent: "),
        ({"token": "x-token-0123456789abc", "priority": 5}, "auth.clients.x.priority: must be an integer"),
        ({"token": "x-token-0123456789abc", "priority": True}, "auth.clients.x.priority: must be an integer"),
        ({"token": "x-token-0123456789abc", "max_queued": 0}, "auth.clients.x.max_queued: must be positive"),
        ({"token": "x-token-0123456789abc", "max_queued": 1.5}, "auth.clients.x.max_queued: must be an int"),
        (
            {"token": "x-token-0123456789abc", "max_queued": 10**6},
            "auth.clients.x.max_queued: must be at most",
        ),
        ({"token": "x-token-0123456789abc", "weight": 2}, "auth.clients.x.weight: unknown key"),
        ({"token": WA_TOKEN}, "auth.clients.x.token: the same token as auth.clients.wa.token: each client"),
        ({"token": TOKEN}, "auth.clients.x.token: the same token as auth.token (the admin's): each client"),
        ("x-token-0123456789abc", "auth.clients.x: must be a mapping"),
    ],
)
def test_client_config_rules_name_the_key_and_never_the_token(client, expected):
    raw = base_raw()
    with_clients(raw)
    raw["auth"]["clients"]["x"] = client
    problems = problems_of(raw)
    assert any(p.startswith(expected) for p in problems), problems
    text = "\n".join(problems)
    assert WA_TOKEN not in text and TOKEN not in text and "x-token-0123456789abc" not in text


def test_clients_need_the_admins_token_and_names_like_consumers():
    raw = base_raw()
    raw["auth"] = {"clients": {"wa": {"token": WA_TOKEN}}}
    assert problems_of(raw) == [
        "auth.clients: needs the admin's auth.token or auth.token_file: once clients are configured, the"
        " admin routes (unload, load, reload, reserve) answer the admin's token alone"
    ]
    with_clients(raw)
    raw["auth"]["clients"]["no/slash"] = {"token": "x-token-0123456789abc"}
    assert problems_of(raw) == ["auth.clients.no/slash: client names are letters, digits, '_', '.', '-'"]


def test_a_consumer_cannot_be_named_like_the_reservation():
    """The reservation holds the GPU as a job of "reservation", with a ConsumerState of that name: a
    consumer so named shared it (its job count, what `ps` and the timeline show) and was unloaded by, and
    joined to, the reservation's books."""
    raw = base_raw()
    raw["consumers"]["reservation"] = raw["consumers"].pop("whisper")
    raw["consumers"]["mvoice"]["can_coexist_with"] = ["ollama"]
    assert problems_of(raw) == ["consumers.reservation: 'reservation' is reserved (the GPU's reservation)"]


# =====================================================================================================
# 2. GPU reading
# Nvidia-smi's output from the real captures, its failures and timeouts, processes and their owners; NVML
# against a stub libnvidia-ml.so.1 (gpu.reader), its errors and hangs.
# =====================================================================================================


# The field list the fixtures were captured with (see fixtures/nvidia-smi/README.md).
FIXTURE_GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.used",
    "memory.free",
    "memory.reserved",
    "utilization.gpu",
    "temperature.gpu",
    "power.draw",
    "pstate",
)


def _as_daemon_query(name: str) -> str:
    """A fixture line cut down to the daemon's own field list (the captures asked for more fields)."""
    rows = m.parse_smi_csv(fixture(name), FIXTURE_GPU_FIELDS)
    return "".join(", ".join(str(r[f]) for f in m.GPU_FIELDS) + "\n" for r in rows)


def _smi_script(tmp_path: Path, body: str) -> tuple[str, ...]:
    script = tmp_path / "fake-smi.sh"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return (str(script),)


def children() -> set[int]:
    """This process's child processes, living or zombie. A thread that ends between the listing and its
    read has none: it is passed over, not a FileNotFoundError that fails the test (seen once, at a load of
    10). Threads end here all the time: asyncio's child watcher runs one per process the tests start on
    Python 3.11, and the broker's ``in_own_thread`` one per bounded call."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found.update(int(pid) for pid in (task / "children").read_text().split())
    return found


def test_parse_every_gpu_fixture():
    idle = m.parse_smi_csv(fixture("query_gpu_idle.csv"), FIXTURE_GPU_FIELDS)
    assert idle == [
        {
            "index": "0",
            "uuid": "GPU-d6a06d66-1d66-7b88-4bcc-675c6e19fb1a",
            "name": "NVIDIA H100 80GB HBM3",
            "memory.total": "81559",
            "memory.used": "0",
            "memory.free": "81079",
            "memory.reserved": "480",
            "utilization.gpu": "0",
            "temperature.gpu": "39",
            "power.draw": "73.46",
            "pstate": "P0",
        }
    ]
    # The header-and-units form reads the same.
    assert m.parse_smi_csv(fixture("query_gpu_idle_header.csv"), FIXTURE_GPU_FIELDS) == idle
    two = m.parse_smi_csv(fixture("query_gpu_two_procs.csv"), FIXTURE_GPU_FIELDS)[0]
    assert (two["memory.used"], two["memory.free"]) == ("17415", "63665")
    end = m.parse_smi_csv(fixture("query_gpu_end.csv"), FIXTURE_GPU_FIELDS)[0]
    assert (end["memory.used"], end["utilization.gpu"]) == ("0", "9")


def test_parse_every_apps_fixture():
    assert m.parse_smi_csv(fixture("query_apps_idle.csv"), m.APP_FIELDS) == []
    two = m.parse_smi_csv(fixture("query_apps_two_procs.csv"), m.APP_FIELDS)
    assert [(r["pid"], r["used_memory"]) for r in two] == [("678", "13922"), ("699", "3478")]
    after = m.parse_smi_csv(fixture("query_apps_after_empty_cache.csv"), m.APP_FIELDS)
    assert [(r["pid"], r["used_memory"]) for r in after] == [("678", "610"), ("699", "3478")]


def test_gpu_reading_from_fixtures():
    r = m.parse_gpu_reading(
        _as_daemon_query("query_gpu_two_procs.csv"),
        fixture("query_apps_two_procs.csv"),
        index=0,
        started=1.0,
        read_at=2.0,
    )
    assert (r.total_mib, r.used_mib, r.free_mib, r.utilization_pct, r.temperature_c) == (
        81559,
        17415,
        63665,
        0,
        41,
    )
    assert r.name == "NVIDIA H100 80GB HBM3"
    assert r.processes == (
        m.GpuProcess(678, "/opt/torch/.venv/bin/python3", 13922),
        m.GpuProcess(699, "/opt/torch/.venv/bin/python3", 3478),
    )


def test_na_values_become_none():
    line = "0, GPU-x, Some GPU, 16384, 100, 16000, [N/A], [Not Supported]\n"
    r = m.parse_gpu_reading(line, "", index=0, started=0, read_at=0)
    assert r.utilization_pct is None and r.temperature_c is None and r.free_mib == 16000


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-inf", "1e999"])
def test_a_figure_that_is_no_whole_number_is_a_gpu_error(value):
    # (inf and 1e999 raised OverflowError: a broker bug, a job's scheduler_error, instead of gpu_unavailable.)
    line = f"0, GPU-x, Some GPU, 16384, {value}, 8000, 0, 40\n"
    with pytest.raises(m.GpuError, match=f"unexpected nvidia-smi value for memory.used: '{value}'"):
        m.parse_gpu_reading(line, "", index=0, started=0, read_at=0)
    with pytest.raises(m.GpuError, match=f"unexpected nvidia-smi value for used_memory: '{value}'"):
        m.parse_gpu_reading(
            "0, GPU-x, Some GPU, 16384, 100, 8000, 0, 40\n",
            f"42, python, {value}, GPU-x\n",
            index=0,
            started=0,
            read_at=0,
        )


@pytest.mark.parametrize(
    "name", ["q_memory_idle.txt", "smi_plain_two_procs.txt", "smi_dash_version.txt", "err_bad_field.txt"]
)
def test_other_outputs_are_refused_as_unparsable(name):
    with pytest.raises(m.GpuError, match="unexpected nvidia-smi output"):
        m.parse_smi_csv(fixture(name), FIXTURE_GPU_FIELDS)


async def test_nvidia_smi_error_exit_carries_its_own_message(tmp_path):
    argv = _smi_script(tmp_path, f"cat {FIXTURES / 'err_bad_index.txt'}; exit 6")
    with pytest.raises(m.GpuError, match="exited with status 6: No devices were found"):
        await m.run_nvidia_smi(argv, 5)
    argv = _smi_script(tmp_path, f"cat {FIXTURES / 'err_bad_field.txt'}; exit 2")
    with pytest.raises(m.GpuError, match='status 2: Field "bogus_field" is not a valid field'):
        await m.run_nvidia_smi(argv, 5)


async def test_a_reading_counts_the_nvidia_smi_processes_it_started(tmp_path):
    """mgpumanager_gpu_readings_total is nvidia-smi processes started plus NVML readings: a whole reading
    whose first process failed counted 3, the two it never started among them (found by an attack)."""
    reader = gpu_reader(m.GpuConfig(nvidia_smi=_smi_script(tmp_path, "exit 6"), reader="nvidia-smi"))
    with pytest.raises(m.GpuError, match="exited with status 6"):
        await reader.read()
    assert reader.queries == 1


async def test_nvidia_smi_missing_is_a_gpu_error(tmp_path):
    with pytest.raises(m.GpuError, match="cannot run"):
        await m.run_nvidia_smi([str(tmp_path / "no-such-nvidia-smi")], 5)


async def test_nvidia_smi_garbage_is_a_gpu_error(tmp_path):
    reader = gpu_reader(
        m.GpuConfig(
            nvidia_smi=_smi_script(tmp_path, "echo 'hello, world'"), query_timeout_s=5, reader="nvidia-smi"
        )
    )
    with pytest.raises(m.GpuError, match="unexpected nvidia-smi output"):
        await reader.read()


async def test_nvidia_smi_timeout_kills_the_process(tmp_path):
    pidfile = tmp_path / "pid"
    argv = _smi_script(tmp_path, f"echo $$ > {pidfile}; exec sleep 30")
    with pytest.raises(m.GpuError, match=r"did not answer within 0\.3 s"):
        await m.run_nvidia_smi(argv, 0.3)
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped: no zombie left behind
        os.kill(pid, 0)


async def test_nvidia_smi_timeout_kills_what_it_started_too(tmp_path):
    # A wrapper whose child keeps the output pipe open must not keep the read waiting.
    pids = tmp_path / "pids"
    argv = _smi_script(tmp_path, f"sleep 30 & echo $! >> {pids}; echo $$ >> {pids}; wait")
    with pytest.raises(m.GpuError, match="did not answer"):
        await m.run_nvidia_smi(argv, 0.3)
    # SIGKILL is delivered at once but acted on when each process next runs: gone within moments.
    await until(lambda: [pid for pid in map(int, pids.read_text().split()) if running(pid)] == [], 5)


async def test_a_reader_closed_while_nvidia_smi_hangs_leaves_no_process(tmp_path):
    """Shutdown (or a reload that drops a GPU) cancels a reading under way: its nvidia-smi and whatever that
    started are killed then, not left to run out query_timeout_s, or for ever behind a hung driver."""
    pids = tmp_path / "pids"
    argv = _smi_script(tmp_path, f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait")
    reader = gpu_reader(m.GpuConfig(nvidia_smi=argv, reader="nvidia-smi", query_timeout_s=300))
    reading = asyncio.ensure_future(reader.read())
    try:
        await until(lambda: pids.exists() and len(pids.read_text().split()) == 2)
        await reader.close()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await until(lambda: [pid for pid in map(int, pids.read_text().split()) if running(pid)] == [], 5)
    finally:
        for pid in map(int, pids.read_text().split()) if pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_a_process_whose_caller_is_cancelled_before_it_waits_is_killed_too(tmp_path):
    """Found by a fresh clone's CI: a cancellation that came between the process's start and the wait for
    its exit (while the pipes of its output were being connected) left it running: nvidia-smi behind a hung
    driver for good. Whenever the caller is cancelled, its process group is killed."""
    pids = tmp_path / "pids"
    argv = _smi_script(tmp_path, f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait")
    before = children()
    running_now = asyncio.ensure_future(m.run_process(argv, 300, kill_group=True))
    await asyncio.sleep(0)  # it starts the process, then waits to connect its output
    started = children() - before
    running_now.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running_now
    try:
        assert len(started) == 1  # (the script: whatever it started is in the pids file)
        await until(lambda: not any(map(running, started)), 5)
        written = [int(pid) for pid in pids.read_text().split()] if pids.exists() else []
        await until(lambda: not any(map(running, written)), 5)  # (a SIGKILL takes effect when it is run)
    finally:
        for pid in map(int, pids.read_text().split()) if pids.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_reader_against_mgpusim_subprocess(tmp_path):
    gpu = mgpusim.SimGPU(tmp_path / "gpu.json", total_mib=16384, reserved_mib=480)
    gpu.allocate("comfyui", 13000)
    reader = gpu_reader(m.GpuConfig(nvidia_smi=sim_smi(tmp_path / "gpu.json"), reader="nvidia-smi"))
    r = await reader.read()
    assert (r.total_mib, r.used_mib, r.free_mib) == (16384, 13000, 16384 - 480 - 13000)
    assert [p.used_mib for p in r.processes] == [13000]
    assert r.processes[0].name == "mgpusim-comfyui"


async def test_a_whole_reading_shows_no_memory_its_process_list_cannot_account_for(tmp_path):
    """The GPU's line and its process list are two questions: a consumer that freed 13 GiB between them
    left 13 GiB used by no process listed, a stranger that was not there (make demo's yield of nobody, found
    by the full suite); one that allocated between them the same. The line is read again after the list,
    and the one with less used counts: nothing unaccounted for in either case."""
    state = tmp_path / "gpu.json"
    gpu = mgpusim.SimGPU(state, total_mib=16384, reserved_mib=480)
    gpu.allocate("comfyui", 13000)
    calls = tmp_path / "calls"
    smi = tmp_path / "nvidia-smi"

    def changing_after_the_first_question(mib: int) -> None:
        """An nvidia-smi that answers as mgpusim's, and makes comfyui hold ``mib`` once it answered its
        first question (the GPU's line)."""
        calls.write_text("")
        smi.write_text(
            "import subprocess, sys\n"
            f"sys.path.insert(0, {str(HERE)!r})\n"
            "import mgpusim\n"
            f"with open({str(calls)!r}, 'a') as f: f.write('x')\n"
            f"out = subprocess.run({list(sim_smi(state))!r} + sys.argv[1:], capture_output=True, text=True)\n"
            "sys.stdout.write(out.stdout)\n"
            f"if len(open({str(calls)!r}).read()) == 1:\n"
            f"    mgpusim.SimGPU({str(state)!r}, create=False).allocate('comfyui', {mib})\n"
        )

    changing_after_the_first_question(610)
    reader = gpu_reader(m.GpuConfig(nvidia_smi=(PY, str(smi)), reader="nvidia-smi"))
    freed = await reader.read()
    assert [p.used_mib for p in freed.processes] == [610]  # the list, asked after the free
    assert freed.used_mib == 610  # the line after the list: nobody's 12,390 MiB is not there
    assert freed.free_mib == 16384 - 480 - 610
    assert freed.moved_mib == 12390  # (what the list may be off by: Strangers.seen)
    # Allocating between them: the line before the list, which has not got it yet, counts.
    changing_after_the_first_question(13000)
    reader = gpu_reader(m.GpuConfig(nvidia_smi=(PY, str(smi)), reader="nvidia-smi"))
    grown = await reader.read()
    assert [p.used_mib for p in grown.processes] == [13000] and grown.used_mib == 610
    assert grown.moved_mib == 12390


async def test_concurrent_readers_share_one_query_and_memory_readings_do_not(tmp_path):
    gpu = mgpusim.SimGPU(tmp_path / "gpu.json")
    reader = gpu_reader(m.GpuConfig(nvidia_smi=sim_smi(tmp_path / "gpu.json"), reader="nvidia-smi"))
    readings = await asyncio.gather(*(reader.read() for _ in range(10)))
    assert reader.queries == 3  # --query-gpu, --query-compute-apps, --query-gpu again: shared by all ten
    assert len({r.started for r in readings}) == 1
    # A memory reading started after the memory changed sees the change, even with one in flight, and
    # costs one nvidia-smi (the GPU line, no process list).
    inflight = asyncio.ensure_future(reader.read())
    await asyncio.sleep(0)
    gpu.allocate("mvoice", 2800)
    memory = await reader.read_memory()
    older = await inflight
    assert memory.used_mib == 2800 and memory.processes == () and memory.started > older.started
    assert reader.queries == 7
    # max_age answers from the last whole reading (memory readings are not kept) without a new query.
    again = await reader.read(max_age=60)
    assert again is older and reader.queries == 7


async def test_a_reading_is_its_own_gpus_line_and_processes_and_a_name_with_a_comma_is_read_whole(tmp_path):
    """nvidia-smi lists every GPU, and every GPU's processes, where it is not given ``-i``: a reading is its
    own GPU's line and its own processes alone, whatever it is given. A process name may itself hold ", ",
    the csv's separator (a game's folder): it is read whole, not a line refused (which made every reading
    gpu_unavailable for as long as that process ran)."""
    state = tmp_path / "gpu.json"
    gpu = mgpusim.SimGPU(state, total_mib=16384, reserved_mib=480, gpus=2)
    game = "/opt/Games/Hollow, Knight/game.x86_64"
    gpu.allocate("game", 3000, 0, process=game)
    gpu.allocate("comfyui", 13000, 1, process="/opt/ComfyUI/.venv/bin/python3")
    fmt = "--format=csv,noheader,nounits"

    def smi(query: str) -> str:
        return subprocess.run(
            [*sim_smi(state), query, fmt], capture_output=True, text=True, check=True
        ).stdout

    lines = smi(f"--query-gpu={','.join(m.GPU_FIELDS)}")
    apps = smi(f"--query-compute-apps={','.join(m.APP_FIELDS)}")
    assert (len(lines.splitlines()), len(apps.splitlines())) == (2, 2)  # both GPUs', as without -i
    for index, used, processes in (
        (0, 3000, [(game, 3000)]),
        (1, 13000, [("/opt/ComfyUI/.venv/bin/python3", 13000)]),
    ):
        r = m.parse_gpu_reading(lines, apps, index=index, started=0, read_at=0)
        assert (r.index, r.uuid, r.used_mib) == (index, mgpusim.gpu_uuid(index), used)
        assert [(p.name, p.used_mib) for p in r.processes] == processes
    # Through the reader (with -i, as the broker asks): the name whole.
    reader = gpu_reader(m.GpuConfig(nvidia_smi=sim_smi(state), reader="nvidia-smi"))
    assert [p.name for p in (await reader.read()).processes] == [game]


def test_a_reading_of_a_gpu_without_a_line_of_its_own_is_refused_not_another_gpus():
    """Of several GPUs' lines none is GPU 2's (gone, or renumbered): the reading is refused, naming GPU 2,
    never the first line taken for it (GPU 0's memory and processes read as GPU 2's would let the broker
    load into a GPU it never measured). Taking the first line where several are printed failed no test."""
    lines = "".join(
        f"{i}, {mgpusim.gpu_uuid(i)}, NVIDIA GeForce RTX 4090, 24564, {used}, {24564 - used}, 0, 40\n"
        for i, used in ((0, 3000), (1, 13000))
    )
    # (The lines are well formed: GPU 1's is read.)
    assert m.parse_gpu_reading(lines, "", index=1, started=0, read_at=0).used_mib == 13000
    with pytest.raises(m.GpuError, match="nvidia-smi printed no line for GPU 2: "):
        m.parse_gpu_reading(lines, "", index=2, started=0, read_at=0)


async def test_a_reading_of_its_own_is_never_an_older_one_and_the_newest_is_the_one_kept(tmp_path):
    """read(own=True) (making room, waiting for an eviction's memory, a restore) starts a reading after the
    call: one already under way began before the eviction freed its memory, or before a stranger took some,
    and is not its answer. Readings may end out of order: the one kept for max_age readers (status, metrics,
    gpu_in_use's check) is the newest begun, not the last to end. Here the first nvidia-smi's answer (the
    GPU line, read before mvoice allocated) is held back until a reading of its own has ended."""
    state = tmp_path / "gpu.json"
    gpu = mgpusim.SimGPU(state, total_mib=16384, reserved_mib=480)
    calls, held, release = tmp_path / "calls", tmp_path / "held", tmp_path / "release"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "import os, subprocess, sys, time\n"
        f"with open({str(calls)!r}, 'a') as f: f.write('x')\n"
        f"out = subprocess.run({list(sim_smi(state))!r} + sys.argv[1:], capture_output=True, text=True)\n"
        f"if len(open({str(calls)!r}).read()) == 1:\n"
        f"    open({str(held)!r}, 'w').close()\n"
        f"    while not os.path.exists({str(release)!r}): time.sleep(0.01)\n"
        "sys.stdout.write(out.stdout)\n"
    )
    reader = gpu_reader(m.GpuConfig(nvidia_smi=(PY, str(smi)), reader="nvidia-smi", query_timeout_s=60))
    try:
        under_way = asyncio.ensure_future(reader.read())
        await until(held.exists)  # its GPU line is read: nothing used yet
        gpu.allocate("mvoice", 2800)
        own = await asyncio.wait_for(reader.read(own=True), 10)
        assert own.used_mib == 2800
        release.touch()
        older = await under_way
        assert older.used_mib == 0 and older.started < own.started
        assert await reader.read(max_age=60) is own
    finally:
        release.touch()
        await reader.close()


async def test_a_failed_reading_answers_max_age_readers_without_asking_again(tmp_path):
    """A broken nvidia-smi (or a hung one, each reading waiting out query_timeout_s): /v1/status, metrics
    and the dashboard (max_age readers) get the newest reading's error, as they would its reading, instead
    of each starting nvidia-smi again."""
    reader = gpu_reader(m.GpuConfig(nvidia_smi=_smi_script(tmp_path, "exit 6"), reader="nvidia-smi"))
    with pytest.raises(m.GpuError, match="exited with status 6"):
        await reader.read()
    with pytest.raises(m.GpuError, match="exited with status 6"):
        await reader.read(max_age=60)
    assert reader.queries == 1 and reader.last_reading() is None
    with pytest.raises(m.GpuError, match="exited with status 6"):
        await reader.read()  # (max_age 0: asked again)
    assert reader.queries == 2


async def test_gpu_unavailable_when_nvidia_smi_fails_but_the_broker_serves(rig, tmp_path):
    def broken(raw):
        raw["gpu"]["nvidia_smi"] = str(tmp_path / "no-nvidia-smi")

    r = await rig(tweak=broken, sims={"mvoice": {"loaded": False}})
    status, headers, body = await r.post("tts", {"text": "x"})
    assert "cannot run" in error_of(status, headers, body, "gpu_unavailable")["message"]
    st = await r.status()
    assert st["gpu"]["error"].startswith("cannot run") and st["gpu"]["free_mib"] is None
    r.broker.consumers.states["mvoice"].loaded()  # a resident target needs no reading
    assert (await r.post("tts", {"text": "x"}))[0] == 200
    async with r.session.get(r.url("/healthz")) as resp:
        assert resp.status == 200 and await resp.text() == "ok\n"


def test_processes_are_attributed_by_name_and_by_the_unit_in_their_cgroup(tmp_path):
    """A consumer's processes: a shell pattern on nvidia-smi's name and/or its systemd unit (or a container's
    scope) read from /proc/<pid>/cgroup; every key given must match; the first consumer listed wins."""
    raw = base_raw()
    raw["consumers"]["comfyui"]["processes"] = {"unit": "comfyui.service"}
    raw["consumers"]["mvoice"]["processes"] = {"unit": "mvoice.service", "name": "*/python3"}
    raw["consumers"]["ollama"]["processes"] = {"name": "*/ollama*"}
    raw["consumers"]["whisper"]["processes"] = {"unit": "docker-*.scope"}
    config = m.parse_config(raw)
    cgroups = {  # cgroup v2 (one line) and v1 (several), as /proc/<pid>/cgroup holds them
        10: "0::/system.slice/comfyui.service\n",
        11: "0::/system.slice/mvoice.service\n",
        12: "12:memory:/system.slice/docker-4f2a9c.scope\n11:pids:/system.slice/docker-4f2a9c.scope\n",
        13: "0::/user.slice/user-1000.slice/session-2.scope\n",
    }
    for pid, text in cgroups.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text.replace("\\n", "\n"))
    consumers = m.Consumers(m.Shared(config), session=None)  # type: ignore[arg-type] (no call is made)
    consumers.processes.proc_root = tmp_path
    procs = [
        m.GpuProcess(10, "/opt/ComfyUI/.venv/bin/python3", 13610),
        m.GpuProcess(11, "/opt/mvoice/.venv/bin/python3", 2800),
        m.GpuProcess(12, "/usr/local/bin/whisper-server", 1500),
        m.GpuProcess(13, "/usr/bin/python3", 4000),  # someone's notebook: nobody's
        m.GpuProcess(14, "/usr/local/bin/ollama", 8000),  # gone from /proc: name alone decides
    ]
    measured = list(config.consumers.values())
    owners = m.process_owners(procs, measured, consumers.processes.cgroups_of)
    assert owners == {10: "comfyui", 11: "mvoice", 12: "whisper", 14: "ollama"}
    # Two consumers whose processes both match one: the first listed wins.
    both = [
        m.replace(config.consumers[name], processes=m.ProcessMatch(name="*/python3"))
        for name in ("mvoice", "comfyui")
    ]
    notebook = [m.GpuProcess(13, "/usr/bin/python3", 4000)]
    assert m.process_owners(notebook, both, consumers.processes.cgroups_of) == {13: "mvoice"}
    # mvoice needs both keys: a python3 in another unit is not its.
    assert (
        m.process_owners(
            [m.GpuProcess(10, "/usr/bin/python3", 1)],
            [config.consumers["mvoice"]],
            consumers.processes.cgroups_of,
        )
        == {}
    )
    assert problems_of(
        base_raw()
        | {
            "consumers": {
                **base_raw()["consumers"],
                "ollama": {**base_raw()["consumers"]["ollama"], "processes": {}},
            }
        }
    )


async def test_each_gpus_processes_are_attributed_and_measured_among_that_gpus_consumers_alone(tmp_path):
    """Two GPUs, one ComfyUI-like service on each, both recognised by the same process name: a reading of a
    GPU attributes its processes to that GPU's consumers only (the first listed, on the other GPU, took
    them), measures only them (a reading of the other GPU, where its processes are not, measured it 0 MiB:
    not resident), and the owners of every GPU's newest reading are kept side by side (status and
    insufficient_vram name them)."""
    state = tmp_path / "gpu.json"
    gpu = mgpusim.SimGPU(state, total_mib=16384, reserved_mib=480, gpus=2)
    gpu.allocate("comfyui", 13000, 0, process="/opt/ComfyUI/.venv/bin/python3")
    gpu.allocate("mvoice", 2800, 1, process="/opt/mvoice/.venv/bin/python3")
    raw = base_raw()
    raw["gpu"]["nvidia_smi"] = list(sim_smi(state))
    raw["consumers"]["mvoice"] |= {"gpu": 1, "processes": {"name": "*/python3"}, "can_coexist_with": []}
    raw["consumers"]["comfyui"] |= {"processes": {"name": "*/python3"}}
    shared = m.Shared(m.parse_config(raw))
    consumers = m.Consumers(shared, session=None)  # type: ignore[arg-type] (no call is made)
    readers = []
    for index in (0, 1):  # wired as the broker wires each GPU's reader
        reader = m.GpuReader(shared, index=index)
        reader.attribute = consumers.processes.attribute
        reader.listeners.append(consumers.processes.measure)
        readers.append(reader)
    try:
        for order in ((0, 1), (1, 0)):  # each GPU's reading measured after the other's
            readings = {index: await readers[index].read(own=True) for index in order}
            assert set(readings[0].owners.values()) == {"comfyui"}
            assert set(readings[1].owners.values()) == {"mvoice"}
            comfyui, mvoice = consumers.states["comfyui"], consumers.states["mvoice"]
            assert (comfyui.used_mib, comfyui.resident) == (13000, True)
            assert (mvoice.used_mib, mvoice.resident) == (2800, True)
            assert consumers.processes.owners() == {**readings[0].owners, **readings[1].owners}
    finally:
        for reader in readers:
            await reader.close()


def test_a_consumer_whose_processes_all_leave_the_list_did_not_restart_and_several_are_summed():
    """What each measured consumer holds is the sum of its processes' memory (Ollama runs a runner per
    model); a consumer whose processes all leave the GPU's list (Ollama's runner exits when its model is
    unloaded) is not resident and did not restart: only processes replaced by others are a restart (a
    mutation audit: the first process's memory alone, and every process gone taken for a restart, failed
    no test)."""
    raw = base_raw()
    raw["consumers"]["ollama"]["processes"] = {"name": "*/ollama*"}
    consumers = m.Consumers(m.Shared(m.parse_config(raw)), session=None)  # type: ignore[arg-type] (no call)
    gone: list[tuple[str, str]] = []
    consumers.gone_listeners.append(lambda name, reason: gone.append((name, reason)))
    state = consumers.states["ollama"]

    def measure(*procs: tuple[int, int], started: float) -> None:
        listed = tuple(m.GpuProcess(pid, "/usr/local/bin/ollama", mib) for pid, mib in procs)
        used = sum(mib for _, mib in procs)
        reading = m.GpuReading(0, "GPU-x", "sim", 16384, used, 16384 - used, 0, 40, listed, 0, started)
        consumers.processes.measure(dataclasses.replace(reading, owners={p.pid: "ollama" for p in listed}))

    measure((20, 5000), (21, 3000), started=1)  # two models, two runners
    assert (state.used_mib, state.pids, state.resident) == (8000, {20, 21}, True)
    measure(started=2)  # both unloaded: the runners exit, Ollama itself holds nothing on the GPU
    assert (state.used_mib, state.pids, state.resident) == (0, frozenset(), False)
    assert gone == []
    measure((22, 5000), started=3)  # a model loaded again: a new runner, no restart either
    assert (state.used_mib, state.resident, gone) == (5000, True, [])
    measure((23, 5000), started=4)  # its runner replaced while it held memory: that is a restart
    assert gone == [("ollama", "its processes were replaced (restarted)")]


def strangers(gpu: mgpusim.SimGPU, count: int) -> None:
    """``count`` processes of nobody's on the simulated GPU (pids from 100000, holding nothing)."""
    uuid = mgpusim.gpu_uuid(0)
    with gpu.edit() as state:
        state["processes"] += [
            {"pid": 100000 + i, "name": f"/usr/bin/python3-stranger-{i}", "used_mib": 0, "gpu_uuid": uuid}
            for i in range(count)
        ]


async def test_nvidia_smi_output_is_read_whole_up_to_max_output_mib_and_more_is_an_error(tmp_path):
    """Issue 19, item 10: only the last 1 MiB of nvidia-smi's output was kept, and the cut first line made
    every reading unparsable. Now up to gpu.max_output_mib is read from its start; more is refused, saying
    so (never a part of it parsed)."""
    two_mib = _smi_script(tmp_path, "head -c 2097152 /dev/zero | tr '\\0' x")
    assert len(await m.run_nvidia_smi(two_mib, 5, 8)) == 2 * m.MiB  # whole
    with pytest.raises(m.GpuError, match=r"more than 1 MiB \(gpu.max_output_mib\): not read"):
        await m.run_nvidia_smi(two_mib, 5, 1)
    assert len(await m.run_nvidia_smi(_smi_script(tmp_path, "head -c 1048576 /dev/zero"), 5, 1)) == m.MiB


def test_cgroups_are_read_once_per_process_while_it_stays_in_the_list_under_its_name(tmp_path):
    """Issue 19, item 10: every reading read /proc/<pid>/cgroup for every process (8,000 processes: a second
    of the event loop's). Now a process's cgroups are read once and kept while it stays in the GPU's list
    under the same name, CGROUP_CACHE_S at most; a pid that left the list, or shows another name, is read
    anew (a pid reused by another process)."""
    raw = base_raw()
    raw["consumers"]["comfyui"]["processes"] = {"unit": "comfyui.service"}
    config = m.parse_config(raw)
    for pid, unit in ((10, "comfyui"), (11, "sshd")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(f"0::/system.slice/{unit}.service\n")
    clock = FakeClock()
    consumers = m.Consumers(m.Shared(config), session=None, clock=clock)  # type: ignore[arg-type] (no call is made)
    consumers.processes.proc_root = tmp_path
    reads: list[int] = []
    read_cgroups = consumers.processes.cgroups_of

    def counted(pid: int) -> list[str]:
        reads.append(pid)
        return read_cgroups(pid)

    consumers.processes.cgroups_of = counted  # type: ignore[method-assign]

    def attribute(*procs: tuple[int, str]) -> dict[int, str]:
        reading = m.parse_gpu_reading(
            "0, GPU-x, sim, 16384, 0, 16384, 0, 30\n",
            "".join(f"{pid}, {name}, 100, GPU-x\n" for pid, name in procs),
            index=0,
            started=clock(),
            read_at=0,
        )
        reads.clear()
        return consumers.processes.attribute(reading)

    comfy, sshd = (10, "/opt/ComfyUI/python3"), (11, "/usr/sbin/sshd")
    assert (attribute(comfy, sshd), reads) == ({10: "comfyui"}, [10, 11])
    assert (attribute(comfy, sshd), reads) == ({10: "comfyui"}, [])  # kept
    assert (attribute(sshd), reads) == ({}, [])
    # Pid 10 left the list; it comes back as another unit's process: read anew.
    (tmp_path / "10" / "cgroup").write_text("0::/system.slice/backup.service\n")
    assert (attribute(comfy, sshd), reads) == ({}, [10])
    (tmp_path / "11" / "cgroup").write_text("0::/system.slice/comfyui.service\n")
    assert (attribute(comfy, sshd), reads) == ({}, [])  # the same names: kept ...
    assert (attribute(comfy, (11, "/opt/ComfyUI/python3")), reads) == ({11: "comfyui"}, [11])  # ... not these
    clock.now += m.CGROUP_CACHE_S
    assert (attribute(comfy, (11, "/opt/ComfyUI/python3")), reads) == ({11: "comfyui"}, [10, 11])


def test_a_unit_recognised_consumer_whose_old_process_exits_nameless_beside_its_new_one_restarted(tmp_path):
    """A consumer recognised by its unit alone (``processes.unit``) restarts: its old process, exiting, is
    still listed without a name and its cgroups can no longer be read, while the new one holds its context.
    The old pid is not carried over as the consumer's (only a consumer recognised by a name the nameless
    process cannot match keeps it, as memory of its that is no live process): the new process alone is
    its, and the restart is seen (a mutation audit: carrying the old pid over for every consumer, the
    restart never seen while the old one lingered nor after it, failed no test)."""
    raw = base_raw()
    raw["consumers"]["comfyui"]["processes"] = {"unit": "comfyui.service"}
    consumers = m.Consumers(m.Shared(m.parse_config(raw)), session=None)  # type: ignore[arg-type] (no call)
    consumers.processes.proc_root = tmp_path
    gone: list[tuple[str, str]] = []
    consumers.gone_listeners.append(lambda name, reason: gone.append((name, reason)))
    for pid in (10, 11):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text("0::/system.slice/comfyui.service\n")

    def reading(*procs: tuple[int, str, int], started: float) -> None:
        whole = m.parse_gpu_reading(
            "0, GPU-x, sim, 16384, 0, 16384, 0, 30\n",
            "".join(f"{pid}, {name}, {mib}, GPU-x\n" for pid, name, mib in procs),
            index=0,
            started=started,
            read_at=0,
        )
        whole = dataclasses.replace(whole, owners=consumers.processes.attribute(whole))
        consumers.processes.measure(whole)

    reading((10, "/opt/ComfyUI/python3", 13610), started=1)
    assert consumers.states["comfyui"].pids == {10} and gone == []
    (tmp_path / "10" / "cgroup").unlink()  # exiting: its /proc entry goes with its name
    reading((10, "", 13610), (11, "/opt/ComfyUI/python3", 610), started=2)
    assert consumers.states["comfyui"].pids == {11}
    assert gone == [("comfyui", "its processes were replaced (restarted)")]


async def test_a_huge_reading_is_parsed_attributed_and_written_out_off_the_event_loop(rig, monkeypatch):
    """Issue 19, item 10: with 8,000 process lines and a processes.unit consumer, each reading took 1.3 s of
    the event loop (parsing, a cgroup read per process, 2.7 MB of status JSON) and /healthz stalled. Now
    parsing, attributing and writing /v1/status out run in worker threads; what the loop does per process
    is one pass. (The stalls measured are printed; the structure is what is asserted.)"""

    def measured(raw: dict[str, Any]) -> None:
        raw["consumers"]["whisper"]["processes"] = {"unit": "whisper.service"}

    r = await rig(tweak=measured)
    strangers(r.gpu, 20000)
    loop_thread = threading.get_ident()
    threads: dict[str, set[int]] = {"parse": set(), "attribute": set(), "status": set()}

    def spied(what: str, real: Any) -> Any:
        def spy(*args: Any, **kwargs: Any) -> Any:
            threads[what].add(threading.get_ident())
            return real(*args, **kwargs)

        return spy

    monkeypatch.setattr(m, "parse_gpu_reading", spied("parse", m.parse_gpu_reading))
    monkeypatch.setattr(m, "status_text", spied("status", m.status_text))
    r.broker.gpu.attribute = spied("attribute", r.broker.gpu.attribute)
    gaps: list[float] = []

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        async with r.session.get(r.url("/v1/status")) as resp:
            body = await resp.read()  # (parsed after: the test's own parsing would stall the loop too)
    finally:
        ticker.cancel()
    st = json.loads(body)
    assert len(st["gpu"]["processes"]) == 20000
    assert all(p["consumer"] is None for p in st["gpu"]["processes"])
    await r.broker.gpu.read_memory()  # a memory reading's (one line, as nvidia-smi prints it) too
    assert all(ids and loop_thread not in ids for ids in threads.values()), threads
    print(f"20,000 process lines: the event loop's longest stall was {max(gaps) * 1000:.1f} ms")


async def test_a_reading_of_20000_processes_serves_jobs_and_status_and_beyond_max_output_mib_says_so(rig):
    """Issue 19, item 10, end to end: 20,000 process lines are 1.5 MB of nvidia-smi output; only its last
    MiB was kept, so every job got gpu_unavailable. Now the job is served and /v1/status lists them all;
    with gpu.max_output_mib below the output, jobs get gpu_unavailable that names the key."""

    def measured(raw: dict[str, Any]) -> None:
        raw["consumers"]["whisper"]["processes"] = {"unit": "whisper.service"}

    r = await rig(tweak=measured, sims={"mvoice": {"loaded": False}})
    strangers(r.gpu, 20000)
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon:
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
            assert resp.status == 200, await resp.read()
        healthz: list[float] = []

        async def ping() -> None:
            while True:
                started = time.monotonic()
                async with r.session.get(daemon.url("/healthz")) as resp:
                    assert resp.status == 200
                healthz.append(time.monotonic() - started)

        pinging = asyncio.create_task(ping())
        try:
            async with r.session.get(daemon.url("/v1/status")) as resp:
                body = await resp.read()
        finally:
            pinging.cancel()
        st = json.loads(body)
        assert len(st["gpu"]["processes"]) >= 20000 and st["gpu"]["error"] is None
        print(f"/healthz during a status of 20,000 processes: at most {max(healthz) * 1000:.0f} ms")
        raw = copy.deepcopy(r.raw)
        raw["gpu"]["max_output_mib"] = 1
        daemon.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(daemon.url("/v1/reload")) as resp:
            assert resp.status == 200
        async with r.session.post(daemon.url("/v1/consumers/mvoice/unload")) as resp:
            assert resp.status == 200
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
            message = error_of(resp.status, dict(resp.headers), await resp.read(), "gpu_unavailable")[
                "message"
            ]
        assert "more than 1 MiB (gpu.max_output_mib)" in message
    spaced = m.GC_FULL_AFTER if gc.get_threshold()[2] else ""  # (none on an incremental collector)
    assert re.search(rf'msg="start-up objects frozen" objects=\d+ full_gc_after={spaced}$', daemon.log, re.M)


@pytest.mark.parametrize("fault", ["fail", "garbage", "hang"])
async def test_nvidia_smi_failing_is_gpu_unavailable_and_leaves_no_process(rig, fault):
    def quick_smi(raw):
        raw["gpu"]["query_timeout_s"] = 0.5

    r = await rig(sims={"mvoice": {"loaded": False}}, tweak=quick_smi)
    before = children()
    r.gpu.set_fault(fault)
    status, headers, body = await r.post("tts", {"text": "x"})
    message = error_of(status, headers, body, "gpu_unavailable")["message"]
    expected = {
        "fail": "exited with status 15",
        "garbage": "unexpected nvidia-smi output",
        "hang": "did not answer within 0.5 s (killed)",  # gpu.query_timeout_s, not a limit of its own
    }
    assert expected[fault] in message
    await until(lambda: children() <= before)  # every nvidia-smi reaped: no zombie left
    r.gpu.set_fault(None)
    assert (await r.post("tts", {"text": "x"}))[0] == 200


async def test_nvidia_smi_leaving_a_child_behind_has_it_killed_once_it_exited(tmp_path, caplog):
    """Item 9 of issue 10: a wrapper whose child keeps the output open cost every reading 0.5 s and left an
    orphan per reading. A load command's service, by contrast, is left running (test above)."""
    pids = tmp_path / "pids"
    argv = _smi_script(tmp_path, f"echo reading; sleep 30 & echo $! > {pids}")
    assert await m.run_nvidia_smi(argv, 5) == "reading\n"
    assert "left its output open" not in caplog.text
    child = int(pids.read_text())
    await until(lambda: not running(child), 5)


# ---- NVML (gpu.reader: nvml) against a stub libnvidia-ml.so.1 ----------------------------------------
# fixtures/nvml/stub.c, compiled here with cc, answers nvidia-ml-py's calls from the same mgpusim state
# file that mgpusim's nvidia-smi stand-in reads ($MGPUSIM_STATE), so both readers see one GPU.


@pytest.fixture(scope="session")
def nvml_stub(tmp_path_factory) -> Path:
    """The stub library, built once per run (skipped where there is no C compiler or nvidia-ml-py)."""
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    try:
        return mgpusim.build_nvml_stub(tmp_path_factory.mktemp("nvml"))
    except FileNotFoundError as e:
        pytest.skip(str(e))


@dataclasses.dataclass
class NvmlBed:
    gpu: mgpusim.SimGPU
    state: Path
    #: Every NVML call the stub answered, one name a line.
    calls_path: Path

    def calls(self, name: str | None = None) -> list[str]:
        text = self.calls_path.read_text() if self.calls_path.exists() else ""
        return [c for c in text.split() if name is None or c == name]


@pytest.fixture
def nvml(nvml_stub, tmp_path, monkeypatch):
    """This process's nvidia-ml-py pointed at the stub, answering from a fresh simulated GPU pair."""
    import pynvml  # noqa: PLC0415 (only where the stub was built)

    if getattr(pynvml.nvmlLib, "_name", None) != str(nvml_stub):
        # As LD_LIBRARY_PATH does for a process: the binding loads ``nvmlLib`` only while it is None, and
        # keeps the function pointers of the library it used (none, or another test run's).
        pynvml.nvmlLib = ctypes.CDLL(str(nvml_stub))
        pynvml._nvmlGetFunctionPointer_cache.clear()
    state = tmp_path / "gpu.json"
    bed = NvmlBed(
        mgpusim.SimGPU(state, total_mib=16384, reserved_mib=480, gpus=2), state, tmp_path / "nvml.log"
    )
    monkeypatch.setenv("MGPUSIM_STATE", str(state))
    monkeypatch.setenv("MGPUSIM_NVML_LOG", str(bed.calls_path))
    yield bed
    assert m.NVML.users == 0, "a reader kept NVML after it closed"


def nvml_config(**kw: Any) -> m.GpuConfig:
    return m.GpuConfig(**{"reader": "nvml", "query_timeout_s": 5.0} | kw)


def cmdline0(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def unstamped(reading: m.GpuReading) -> m.GpuReading:
    return dataclasses.replace(reading, started=0.0, read_at=0.0)


async def test_nvml_reader_gives_exactly_the_reading_nvidia_smis_parser_gives_for_the_same_state(nvml):
    """Issue 21: the GPU's line (memory info v2: the reserved memory neither used nor free, as nvidia-smi
    shows it), its compute processes with their memory (unknown: None, nvidia-smi's [N/A]) and names from
    /proc/<pid>/cmdline, on each GPU: what the nvidia-smi parser makes of mgpusim's stand-in, field for
    field. A name comes from /proc, not from NVML: a pid that is gone has none."""
    sleep = shutil.which("sleep") or "/bin/sleep"
    sleepers = [await asyncio.create_subprocess_exec(sleep, "60") for _ in range(2)]
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    me, a, b = os.getpid(), sleepers[0].pid, sleepers[1].pid
    gpu0, gpu1 = mgpusim.gpu_uuid(0), mgpusim.gpu_uuid(1)
    with nvml.gpu.edit() as state:
        state["gpus"][0].update(utilization_pct=37, temperature_c=51)
        state["processes"] = [
            {"pid": me, "name": cmdline0(me), "used_mib": 13000, "gpu_uuid": gpu0},
            {"pid": a, "name": sleep, "used_mib": 1500, "gpu_uuid": gpu0},
            {"pid": b, "name": sleep, "used_mib": None, "gpu_uuid": gpu0},
            {"pid": b, "name": sleep, "used_mib": 900, "gpu_uuid": gpu1},
        ]
    try:
        for index in (0, 1):
            smi = gpu_reader(m.GpuConfig(nvidia_smi=sim_smi(nvml.state), reader="nvidia-smi"), index=index)
            nv = gpu_reader(nvml_config(), index=index)
            try:
                by_smi, by_nvml = await smi.read(), await nv.read()
                assert nv.reader == "nvml" and smi.reader == "nvidia-smi"
                assert unstamped(by_nvml) == unstamped(by_smi)
                assert unstamped(await nv.read_memory()) == unstamped(await smi.read_memory())
            finally:
                await smi.close()
                await nv.close()
            if index == 0:
                r = by_nvml
                assert (r.used_mib, r.free_mib, r.utilization_pct, r.temperature_c) == (14500, 1404, 37, 51)
                assert r.processes == (
                    m.GpuProcess(me, cmdline0(me), 13000),
                    m.GpuProcess(a, sleep, 1500),
                    m.GpuProcess(b, sleep, None),
                )
            else:
                assert (by_nvml.index, by_nvml.used_mib, by_nvml.processes) == (
                    1,
                    900,
                    (m.GpuProcess(b, sleep, 900),),
                )
        with nvml.gpu.edit() as state:  # the stand-in prints the state's name; NVML has none to give
            state["processes"][1].update(pid=gone.pid, name="/usr/bin/gone")
        reader = gpu_reader(nvml_config())
        try:
            assert (await reader.read()).processes[1] == m.GpuProcess(gone.pid, None, 1500)
        finally:
            await reader.close()
    finally:
        for proc in sleepers:
            proc.kill()
            await proc.wait()


async def test_an_nvml_whole_reading_shows_no_memory_its_process_list_cannot_account_for(nvml):
    """NVML's memory and its process list are two calls, as nvidia-smi's are two questions
    (test_a_whole_reading_shows_no_memory_its_process_list_cannot_account_for): the memory is asked again
    after the list and the one with less used counts. The stub holds the list's call (its hang fault)
    while comfyui's memory changes, then answers it from the changed state."""
    call = "nvmlDeviceGetComputeRunningProcesses_v3"
    nvml.gpu.allocate("comfyui", 13000)

    async def changing_during_the_list(mib: int) -> m.GpuReading:
        nvml.gpu.set_nvml_fault(call, hang=True)
        asked = len(nvml.calls(call))
        reader = gpu_reader(nvml_config())
        try:
            reading = asyncio.ensure_future(reader.read())
            await until(lambda: len(nvml.calls(call)) > asked)  # the memory answered, the list held
            nvml.gpu.allocate("comfyui", mib)
            nvml.gpu.set_nvml_fault(None)
            return await asyncio.wait_for(reading, 10)
        finally:
            await reader.close()

    freed = await changing_during_the_list(610)
    assert [p.used_mib for p in freed.processes] == [610]  # the list, answered after the free
    assert freed.used_mib == 610  # the memory after the list: nobody's 12,390 MiB is not there
    assert freed.free_mib == 16384 - 480 - 610
    # Allocating meanwhile: the memory before the list, which has not got it yet, counts.
    grown = await changing_during_the_list(13000)
    assert [p.used_mib for p in grown.processes] == [13000] and grown.used_mib == 610


async def test_nvml_memory_info_v1_where_v2_is_missing_counts_the_reserved_memory_as_used(nvml, caplog):
    """A driver before R510 has no memory info v2: the reader says so once and reads v1, where the reserved
    memory counts as used (as that driver's nvidia-smi showed it); free is the same."""
    nvml.gpu.allocate("comfyui", 13000)
    nvml.gpu.set_nvml_fault("nvmlDeviceGetMemoryInfo_v2", error=13)  # NVML_ERROR_FUNCTION_NOT_FOUND
    reader = gpu_reader(nvml_config())
    try:
        r = await reader.read_memory()
        assert (r.total_mib, r.used_mib, r.free_mib) == (16384, 13000 + 480, 16384 - 480 - 13000)
        await reader.read_memory()
    finally:
        await reader.close()
    assert caplog.text.count("NVML has no memory info v2") == 1
    assert len(nvml.calls("nvmlDeviceGetMemoryInfo")) == 2


async def test_nvml_errors_are_gpu_unavailable_and_a_reading_after_them_finds_the_gpu_again(
    rig, nvml, caplog
):
    """An NVML error code is a GpuError naming the call (gpu_unavailable for a job), never a crash; a figure
    the GPU does not have (NVML_ERROR_NOT_SUPPORTED) is None, as nvidia-smi's [N/A]; once the fault is gone
    the next reading finds the GPU again (a new handle) and answers. "NVML loaded" is said at the first
    reading that answers (it was said at each that failed, found by an attack)."""
    reader = gpu_reader(nvml_config())
    try:
        nvml.gpu.set_nvml_fault("nvmlDeviceGetMemoryInfo_v2", error=15)  # NVML_ERROR_GPU_IS_LOST
        for _ in range(2):
            with pytest.raises(m.GpuError, match="NVML nvmlDeviceGetMemoryInfo: GPU is lost"):
                await reader.read()
        assert 'msg="NVML loaded"' not in caplog.text
        nvml.gpu.set_nvml_fault("nvmlDeviceGetComputeRunningProcesses_v3", error=999)
        with pytest.raises(m.GpuError, match="NVML nvmlDeviceGetComputeRunningProcesses: Unknown Error"):
            await reader.read()
        # A figure a GPU has, failing, is an error as any other (not taken for one it does not have).
        nvml.gpu.set_nvml_fault("nvmlDeviceGetTemperature", error=999)
        with pytest.raises(m.GpuError, match="NVML nvmlDeviceGetTemperature: Unknown Error"):
            await reader.read()
        nvml.gpu.set_nvml_fault("nvmlDeviceGetUtilizationRates", error=3)  # NVML_ERROR_NOT_SUPPORTED
        r = await reader.read()
        assert r.utilization_pct is None and r.temperature_c == 35 and r.free_mib == 16384 - 480
        assert caplog.text.count('msg="NVML loaded"') == 1
        nvml.gpu.set_nvml_fault(None)
        assert (await reader.read()).utilization_pct == 0
        assert len(nvml.calls("nvmlDeviceGetHandleByIndex_v2")) == 5  # at the start and after each error
        assert reader.shared.internal_errors == 0  # no bug caught
    finally:
        await reader.close()
    # Through the broker: a job that needs a reading gets gpu_unavailable with NVML's message.
    r = await rig(sims={"mvoice": {"loaded": False}}, tweak=lambda raw: raw["gpu"].update(reader="nvml"))
    os.environ["MGPUSIM_STATE"] = str(r.state)  # (monkeypatched: restored after the test)
    r.gpu.set_nvml_fault("nvmlDeviceGetMemoryInfo_v2", error=15)
    status, headers, body = await r.post("tts", {"text": "x"})
    assert (
        "NVML nvmlDeviceGetMemoryInfo: GPU is lost"
        in error_of(status, headers, body, "gpu_unavailable")["message"]
    )
    st = await r.status()
    assert st["gpu"]["reader"] == "nvml" and "GPU is lost" in st["gpu"]["error"]
    r.gpu.set_nvml_fault(None)
    assert (await r.post("tts", {"text": "x"}))[0] == 200
    await r.close()  # (its reader lets NVML go before the fixture checks)


def nvml_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nvml-gpu")]


async def test_a_hung_nvml_call_is_left_to_its_thread_and_readings_fail_at_once_until_it_returns(
    nvml, caplog
):
    """NVML can hang after a driver fault. A call past query_timeout_s is gpu_unavailable and left to its
    thread (never awaited again); while it hangs, every reading fails at once, asking NVML nothing and
    starting no thread; when it returns, readings work again, through the same one thread."""
    before = nvml_threads()
    reader = gpu_reader(nvml_config(query_timeout_s=1.0))
    try:
        await reader.read()
        nvml.gpu.set_nvml_fault("nvmlDeviceGetMemoryInfo_v2", hang=True)
        with pytest.raises(m.GpuError, match=r"NVML did not answer within 1 s"):
            await reader.read()
        asked, counted = len(nvml.calls()), reader.queries
        for _ in range(5):
            with pytest.raises(m.GpuError, match="not asked again until it answers"):
                await reader.read_memory()
            with pytest.raises(m.GpuError, match="NVML has not answered for"):
                await reader.read(own=True)
        assert len(nvml.calls()) == asked  # nothing more was asked of NVML
        assert reader.queries == counted  # (and no reading counted: mgpumanager_gpu_readings_total)
        assert len(nvml_threads()) == len(before) + 1  # and no thread more started
        assert "NVML call hung: left to its thread" in caplog.text
        nvml.gpu.set_nvml_fault(None)  # the driver recovers: the hung call returns
        await until(lambda: "NVML answered again" in caplog.text, 5)
        r = await reader.read()
        assert r.free_mib == 16384 - 480 and len(nvml_threads()) == len(before) + 1
        assert reader.shared.internal_errors == 0  # no bug caught
    finally:
        await reader.close()
    await until(lambda: len(nvml_threads()) == len(before), 5)  # closed: its thread ended
    assert nvml.calls()[-1] == "nvmlShutdown"


async def test_nvml_is_initialised_once_per_process_and_shut_down_after_its_last_reader(nvml):
    """nvmlInit once for every GPU and reading, nvmlShutdown once, when the last reader closes."""
    readers = [gpu_reader(nvml_config(), index=i) for i in (0, 1)]
    for _ in range(3):
        await asyncio.gather(*(r.read(own=True) for r in readers), *(r.read_memory() for r in readers))
    assert nvml.calls("nvmlInitWithFlags") == ["nvmlInitWithFlags"] and m.NVML.users == 2
    await readers[0].close()
    assert nvml.calls("nvmlShutdown") == [] and m.NVML.users == 1
    assert (await readers[1].read()).index == 1
    await readers[1].close()
    assert nvml.calls("nvmlShutdown") == ["nvmlShutdown"] and m.NVML.users == 0
    assert [r.queries for r in readers] == [6, 7]  # one NVML reading each time, no process


async def test_where_nvml_does_not_load_nvml_is_gpu_unavailable_until_it_does_and_auto_reads_nvidia_smi(
    nvml, monkeypatch, caplog
):
    """gpu.reader nvml where NVML does not load (here: no driver): the broker still starts, each reading is
    gpu_unavailable saying why, and one after the driver came back answers. auto reads through nvidia-smi
    instead, and says so."""
    monkeypatch.delenv("MGPUSIM_STATE")  # the stub has no GPU: nvmlInit answers "Driver Not Loaded"
    strict = gpu_reader(nvml_config())
    auto = gpu_reader(m.GpuConfig(nvidia_smi=sim_smi(nvml.state), reader="auto"))
    try:
        for _ in range(2):
            with pytest.raises(m.GpuError, match=r"NVML nvmlInit: Driver Not Loaded \(libnvidia-ml.so.1"):
                await strict.read()
        assert strict.reader == "nvml" and 'msg="gpu reader nvml did not load"' in caplog.text
        r = await auto.read()
        assert auto.reader == "nvidia-smi" and r.free_mib == 16384 - 480
        assert (
            'msg="gpu reader" gpu=0 reader=nvidia-smi nvml="NVML nvmlInit: Driver Not Loaded' in caplog.text
        )
        monkeypatch.setenv("MGPUSIM_STATE", str(nvml.state))
        assert (await strict.read()).free_mib == 16384 - 480 and 'msg="NVML loaded"' in caplog.text
        assert auto.reader == "nvidia-smi"  # chosen once: until a restart, or a reload of gpu.reader
    finally:
        await strict.close()
        await auto.close()


async def test_a_reload_that_changes_gpu_reader_switches_the_reader_and_lets_nvml_go(rig, nvml):
    r = await rig(sims={"mvoice": {"loaded": False}})
    os.environ["MGPUSIM_STATE"] = str(r.state)  # (monkeypatched: restored after the test)

    async def reload_with(reader: str) -> dict[str, Any]:
        r.raw["gpu"]["reader"] = reader
        r.config_path.write_text(yaml.safe_dump(r.raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert resp.status == 200
        assert (await r.post("tts", {"text": "x"}))[0] == 200
        await r.broker.gpu.read(own=True)
        return (await r.status())["gpu"]

    assert (await reload_with("nvidia-smi"))["reader"] == "nvidia-smi" and m.NVML.users == 0
    gpu = await reload_with("nvml")
    assert gpu["reader"] == "nvml" and m.NVML.users == 1 and gpu["free_mib"] == r.gpu.free_mib()
    assert (await reload_with("nvidia-smi"))["reader"] == "nvidia-smi" and m.NVML.users == 0
    assert nvml.calls("nvmlShutdown") == ["nvmlShutdown"]


# =====================================================================================================
# 3. Consumers and residency
# Health probes, what the GPU and the services show against the broker's own record, restarts.
# =====================================================================================================


#: A small card (13920 MiB usable): FLUX's 13000 MiB, the cushion and ComfyUI's 610 MiB context fit,
#: mvoice's 2800 beside them do not.
SMALL_CARD = {"total_mib": 14400}


async def test_a_health_round_much_later_than_due_puts_every_resident_record_in_doubt(caplog):
    """The loop stalled or the machine slept: a restart may have gone unseen, so no resident record is
    acted on without a reading; a round on time leaves them trusted."""
    routes = [("GET", f"/{name}/health", _ok) for name in "txyz"]
    async with StandIn(routes) as svc, aiohttp.ClientSession() as session:
        urls = {f"consumers__{name}__url": f"{svc.url}/{name}" for name in "txyz"}
        # (A probe's timeout of its own: 50 ms, as it was, timed out on a busy machine, and a failed probe
        # clears trust too.)
        cfg = small_config(health={"interval_s": 0.05, "timeout_s": 5}, **urls)
        now, stalling = [0.0], [False]

        def clock() -> float:
            # Stalling, a minute passes between any two looks at the clock: whichever step of its round the
            # health loop is at (a single jump of a minute during a round's probes was taken in before the
            # next round's due time, so that round was on time, and every one after).
            if stalling[0]:
                now[0] += 60.0
            return now[0]

        consumers = m.Consumers(m.Shared(cfg), session, clock=clock)
        x = consumers.states["x"]
        x.loaded()
        health = asyncio.ensure_future(consumers.run_health())
        try:
            await until(lambda: x.last_probe is not None)  # a round on time
            assert x.trusted and x.resident is True
            stalling[0] = True  # the next round comes a minute late
            await until(lambda: not x.trusted)
            assert x.resident is True  # still what it was, but a job will read the GPU first
            assert "health round late" in caplog.text
        finally:
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health


async def test_unreachable_consumer_is_refused_at_once_and_served_again_after_a_good_probe(rig):
    r = await rig()
    await r.sim_servers["mvoice"].close()
    await r.broker.consumers.probe_all()
    status, headers, body = await r.post("tts", {"text": "x"})
    data = error_of(status, headers, body, "consumer_unreachable")
    assert data["message"] == "upstream mvoice last probe failed: connection refused"
    assert data["consumer"] == "mvoice" and r.stats.jobs == 0
    # The consumer comes back (on a new port here: a new server) and a probe finds it.
    revived = TestServer(r.sims["mvoice"].app, host="127.0.0.1", port=0)
    await revived.start_server()
    r.sim_servers["mvoice"] = revived
    r.broker.consumers.config.consumers["mvoice"] = m.replace(
        r.config.consumers["mvoice"], url=str(revived.make_url("")).rstrip("/")
    )
    await r.broker.consumers.probe_all()
    assert (await r.post("tts", {"text": "x"}))[0] == 200


async def test_health_loaded_reports_residency_but_the_brokers_own_record_wins_until_the_next_probe(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    states = r.broker.consumers.states
    assert states["mvoice"].resident is True  # from /health's "loaded"
    assert states["comfyui"].resident is None  # its health has no such field
    # The broker's own record, made while a probe was on its way, is not overwritten by that probe.
    probe = asyncio.ensure_future(r.broker.consumers.probe("mvoice"))
    await asyncio.sleep(0)  # the probe has started
    states["mvoice"].unloaded()
    await probe
    assert states["mvoice"].resident is False
    await r.broker.consumers.probe("mvoice")  # a probe started after the record wins
    assert states["mvoice"].resident is True


def test_a_learned_figure_is_the_median_of_its_recent_samples_after_every_new_one():
    """The medians are kept between samples (a job's end asks for all three); each new sample, or the
    state file's, makes its own figure anew, and only its own."""
    state = m.ConsumerState("x", FakeClock())
    assert state.timing("job") is None
    state.learned("job", 1.0)
    state.learned("load", 5.0)
    assert (state.timing("job"), state.timing("load")) == (1.0, 5.0)
    state.learned("job", 3.0)
    assert state.timing("job") == 2.0 and state.timings()["job_s"] == 2.0
    state.learned("job", 10.0)
    assert state.timing("job") == 3.0 and state.timing("load") == 5.0
    state.remembered(None, None, {"job": [7.0], "unload": [2.0]})
    assert state.timings() == {"load_s": 5.0, "unload_s": 2.0, "job_s": 7.0}


def test_observations_override_the_brokers_record_only_when_they_started_after_it():
    clock = FakeClock()
    state = m.ConsumerState("x", clock)
    started = clock.now
    clock.now += 1
    state.unloaded()  # the broker's record, made while the probe was on its way
    state.probed(True, None, "consumer_unreachable", started, reported=True)
    assert state.resident is False and state.healthy is True
    state.measured(4000, frozenset({7}), True, started)  # a reading that started before it: no more
    assert state.resident is False and state.used_mib == 4000 and state.peak_mib == 4000
    clock.now += 1
    state.measured(3000, frozenset({7}), True, clock.now)  # one started after it: resident
    assert state.resident is True and state.peak_mib == 4000 and state.trusted
    reading_started = clock.now
    clock.now += 1
    state.touched("another consumer was granted the GPU")  # after that reading began ...
    state.measured(3000, frozenset({7}), True, reading_started)
    assert state.resident is True and not state.trusted  # ... so it does not vouch for it any more
    # While the broker unloads it, readings change its figures, not its residency; nor does a refusal
    # seen meanwhile (a service being stopped or started refuses connections).
    state.unloading()
    clock.now += 1
    state.measured(3000, frozenset({7}), True, clock.now)
    assert state.resident is None and state.used_mib == 3000
    state.seen_down("connection refused", stopped=True)
    assert state.resident is None and state.healthy is False
    state.unloaded()
    assert state.resident is False
    # A job on one of its paths that answered 2xx: resident, trusted, used now.
    state.served()
    assert (state.resident, state.trusted, state.last_used) == (True, True, clock.now)
    assert state.known_resident()
    state.touched("another consumer was granted the GPU")
    assert state.resident is True and not state.known_resident()


def test_a_failed_probe_a_job_timing_out_and_replaced_processes_each_put_a_resident_record_in_doubt():
    """Each may mean the service restarted behind the broker's back, its model gone: a resident record is
    then acted on only after a reading ([3] and [4] of ConsumerState's table). Trusted, a job would go in
    without one, and the model it loads again could overfill the GPU."""
    clock = FakeClock()

    def probe_fails(state: m.ConsumerState) -> None:
        state.probed(False, "timed out", "consumer_unreachable", clock.now)

    def job_times_out(state: m.ConsumerState) -> None:
        state.timed_out("no answer within 60 s")

    def processes_replaced(state: m.ConsumerState) -> None:
        # A reading (begun before it ends) finds another process holding its memory: restarted, reloaded.
        state.measured(3000, frozenset({8}), True, clock.now - 0.5)

    for doubt in (probe_fails, job_times_out, processes_replaced):
        state = m.ConsumerState("x", clock)
        state.measured(3000, frozenset({7}), True, clock.now)
        assert state.known_resident()
        clock.now += 1
        doubt(state)
        assert state.resident is True and not state.known_resident(), doubt.__name__
    clock.now += 1
    state.measured(3000, frozenset({8}), True, clock.now)  # the next reading vouches for it again
    assert state.known_resident()


@no_overfill
async def test_a_restart_behind_the_brokers_back_never_overfills_the_gpu(rig):
    """Issue 11, case 1: ComfyUI restarts unseen (its model gone), mvoice loads, then an image job: the
    broker does not trust ComfyUI's old record, reads the GPU and evicts mvoice first."""
    r = await rig(**SMALL_CARD, sims={"comfyui": REAL_COMFY, "mvoice": {"loaded": False}})
    first = await _render(r)
    assert first in r.sims["comfyui"].finished
    await r.restart("comfyui")  # between probes: the broker sees nothing
    assert (await r.post("tts", {"text": "hi"}))[0] == 200  # fits beside ComfyUI's bare context
    assert r.sims["mvoice"].unloads == 0 and r.gpu.used_mib("mvoice") == 2800
    second = await _render(r)
    nothing_overfilled(r.gpu)
    assert second in r.sims["comfyui"].finished  # the render ran
    assert r.sims["mvoice"].unloads == 1 and r.stats.evictions == 1


@no_overfill
async def test_the_uis_own_unload_button_leaves_no_false_record(rig):
    """Issue 11, case 2: ComfyUI's web UI posts /api/free through the mount. A mount call outside the
    consumer's paths never marks it resident, and its record is not trusted any more."""
    r = await rig(**SMALL_CARD, sims={"comfyui": REAL_COMFY, "mvoice": {"loaded": False}})
    await _render(r)
    async with r.session.post(r.url("/c/comfyui/api/free"), json={"unload_models": True}) as resp:
        assert resp.status == 200
    assert r.sims["comfyui"].unloads == 1 and r.stats.jobs == 2  # a job of kind mount, through the lock
    assert not r.broker.consumers.states["comfyui"].known_resident()
    assert (await r.post("tts", {"text": "hi"}))[0] == 200
    await _render(r, "/c/comfyui/api/prompt")  # the UI's own prompt, through the mount
    nothing_overfilled(r.gpu)
    assert r.sims["mvoice"].unloads == 1


async def test_a_consumer_that_is_back_is_served_at_once(rig):
    """Issue 11, case 4: marked unhealthy, mvoice comes back: its next job probes it once more, right away,
    instead of answering consumer_unreachable until the next health round (an hour away here)."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    await r.kill("mvoice")
    status, headers, body = await r.post("tts", {"text": "down"})
    error_of(status, headers, body, "consumer_unreachable")
    assert r.broker.consumers.states["mvoice"].healthy is False
    await r.revive("mvoice")
    status, _, body = await r.post("tts", {"text": "back"})
    assert status == 200 and body.startswith(b"RIFF")
    assert r.broker.consumers.states["mvoice"].healthy is True


@pytest.mark.parametrize("measured", [False, True])
async def test_after_a_broker_restart_mid_render_the_refusal_names_owners_truthfully(rig, measured):
    """Issue 11, case 6: the broker starts while ComfyUI renders (its /free waits for the render's end).
    The refusal says what became of ComfyUI's unload and, where processes are recognised, whose they are."""

    def setup(raw: dict[str, Any]) -> None:
        raw["scheduler"]["vram_wait_s"] = 0.3
        if measured:
            comfy_measured(raw)

    r = await rig(sims={"comfyui": {"context_mib": 610, "work_s": 60, "loaded": True}}, tweak=setup)
    async with r.session.post(str(r.sim_servers["comfyui"].make_url("/prompt")), json={}) as resp:
        assert resp.status == 200  # a render the broker knows nothing of
    whisper_fills = {"vram_mib": 2000}
    r.sims["whisper"].vram_mib = whisper_fills["vram_mib"]
    status, headers, body = await r.post("stt", None, data=b"audio")  # mvoice: 2800 do not fit
    message = error_of(status, headers, body, "insufficient_vram")["message"]
    assert "already unloaded" not in message
    comfy_pid = r.sims["comfyui"].pid
    if measured:
        assert (
            "comfyui (unloaded, memory not freed within 0.3 s; its processes still hold 13610 MiB)" in message
        )
        assert f"pid {comfy_pid} /opt/ComfyUI/.venv/bin/python3 13610 MiB (comfyui)" in message
    else:
        assert "comfyui (unloaded, memory not freed within 0.3 s)" in message
        assert f"pid {comfy_pid} /opt/ComfyUI/.venv/bin/python3 13610 MiB (no consumer)" in message


async def test_measured_memory_in_status_metrics_and_the_warning_when_above_the_declared(rig, caplog):
    """processes: status shows vram_used_mib and vram_peak_mib and each process's owner; metrics carry the
    measured bytes; a consumer measured above its vram_resident_mib is warned about once."""

    def bigger(raw: dict[str, Any]) -> None:
        comfy_measured(raw)
        raw["consumers"]["comfyui"]["vram_resident_mib"] = 12000  # it really takes 13000 + its context

    r = await rig(sims={"comfyui": REAL_COMFY}, tweak=bigger)
    st = await r.status()
    comfy = st["consumers"]["comfyui"]
    assert (comfy["vram_used_mib"], comfy["vram_peak_mib"], comfy["loaded"]) == (610, 610, False)
    assert st["consumers"]["mvoice"]["vram_used_mib"] is None  # no `processes`: not measured
    await _render(r)
    await asyncio.sleep(m.STATUS_MAX_AGE_S)
    st = await r.status()
    comfy = st["consumers"]["comfyui"]
    assert (comfy["vram_used_mib"], comfy["vram_peak_mib"], comfy["loaded"]) == (13610, 13610, True)
    owners = {p["name"]: p["consumer"] for p in st["gpu"]["processes"]}
    assert owners == {"/opt/ComfyUI/.venv/bin/python3": "comfyui"}
    text = await (await r.session.get(r.url("/metrics"))).text()
    assert f'mgpumanager_consumer_vram_used_bytes{{consumer="comfyui"}} {13610 * m.MiB}' in text
    assert 'mgpumanager_consumer_vram_used_bytes{consumer="mvoice"}' not in text
    await asyncio.sleep(m.STATUS_MAX_AGE_S)
    assert (await r.status())["consumers"]["comfyui"]["vram_used_mib"] == 13610  # read again, still above
    warnings = [
        rec.getMessage() for rec in caplog.records if "holds 13610 MiB, declared 12000" in rec.getMessage()
    ]
    assert len(warnings) == 1  # once, though read several times
    # Making room uses the larger figure: mvoice (2800) after ComfyUI's 13610 needs ComfyUI gone.
    await r.sims["comfyui"].do_unload()
    await asyncio.sleep(m.STATUS_MAX_AGE_S)
    comfy = (await r.status())["consumers"]["comfyui"]
    assert comfy["loaded"] is False  # measured: 610 < 6000
    # Used is now; the peak is the most it was seen holding, in status and metrics alike.
    assert (comfy["vram_used_mib"], comfy["vram_peak_mib"]) == (610, 13610)
    text = await (await r.session.get(r.url("/metrics"))).text()
    assert f'mgpumanager_consumer_vram_used_bytes{{consumer="comfyui"}} {610 * m.MiB}' in text
    assert f'mgpumanager_consumer_vram_peak_bytes{{consumer="comfyui"}} {13610 * m.MiB}' in text


async def test_a_consumer_measured_by_its_processes_is_resident_exactly_when_they_hold_half_its_size(
    tmp_path,
):
    """A consumer with ``processes`` is resident when a reading finds them holding at least half its
    vram_resident_mib: a CUDA context, or a model partly loaded, is not. Resident, and trusted by the
    reading, a job for it would go in without making room for the rest of its model."""
    state = tmp_path / "gpu.json"
    gpu = mgpusim.SimGPU(state, total_mib=16384, reserved_mib=480)
    raw = base_raw()
    raw["gpu"]["nvidia_smi"] = list(sim_smi(state))
    comfy_measured(raw)
    shared = m.Shared(m.parse_config(raw))
    consumers = m.Consumers(shared, session=None)  # type: ignore[arg-type] (no call is made)
    reader = m.GpuReader(shared)  # wired as the broker wires it
    reader.attribute = consumers.processes.attribute
    reader.listeners.append(consumers.processes.measure)
    comfyui = consumers.states["comfyui"]
    half = (shared.config.consumers["comfyui"].vram_resident_mib + 1) // 2
    try:
        for mib, resident in ((half - 1, False), (half, True), (610, False)):
            gpu.allocate("comfyui", mib, process="/opt/ComfyUI/.venv/bin/python3")
            await reader.read(own=True)
            assert (comfyui.used_mib, comfyui.resident, comfyui.known_resident()) == (mib, resident, resident)
    finally:
        await reader.close()


async def test_health_is_probed_periodically_and_a_consumer_that_comes_back_is_served(rig):
    def often(raw):
        raw["health"]["interval_s"] = 0.05

    r = await rig(tweak=often)
    state = r.broker.consumers.states["mvoice"]
    r.sims["mvoice"].faults["health_status"] = 503
    await until(lambda: state.healthy is False)
    status, headers, body = await r.post("tts", {"text": "x"})
    assert "health answered 503" in error_of(status, headers, body, "consumer_unreachable")["message"]
    del r.sims["mvoice"].faults["health_status"]
    await until(lambda: state.healthy is True)
    assert (await r.post("tts", {"text": "x"}))[0] == 200


async def test_a_probe_timing_out_while_the_consumer_works_does_not_mark_it_unhealthy(tmp_path):
    busy = asyncio.Event()
    probed_while_busy = []

    async def health(request: web.Request) -> web.Response:
        if busy.is_set():
            probed_while_busy.append(1)
            await asyncio.sleep(1)  # a single-threaded service answers late while it renders
        return web.json_response({"ok": True})

    async def work(request: web.Request) -> web.Response:
        busy.set()
        await until(lambda: len(probed_while_busy) >= 3)  # so two probes timed out while it worked
        busy.clear()
        return web.json_response({"text": "done"})

    async with StandIn([("GET", "/health", health), ("POST", "/inference", work)]) as whisper:
        raw = base_raw(whisper=whisper.url)
        raw["routing"] = {"stt": "whisper"}
        raw["gpu"]["nvidia_smi"] = str(tmp_path / "none")  # never read: whisper fits, and it is resident
        raw["health"] = {"interval_s": 0.05, "timeout_s": 0.1}
        app = m.create_app(m.parse_config(raw))
        async with TestServer(app, host="127.0.0.1", port=0) as server, aiohttp.ClientSession() as session:
            broker = app[m.BROKER]
            broker.consumers.states["whisper"].loaded()
            async with session.post(server.make_url("/v1/stt"), data=b"x") as resp:
                assert resp.status == 200
            assert broker.consumers.states["whisper"].healthy is True
            assert len(probed_while_busy) >= 2  # probes ran, and timed out, during the job
            busy.set()  # now slow without a job: that is a failure
            await until(lambda: broker.consumers.states["whisper"].healthy is False)
            assert broker.consumers.states["whisper"].last_error == "timed out"


async def test_a_probe_older_than_a_job_failure_does_not_heal_the_consumer(rig):
    r = await rig()
    consumers = r.broker.consumers
    gate = asyncio.Event()
    sim = r.sims["whisper"]

    async def slow_health(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({"status": "ok"})

    # Swap whisper for a stand-in whose health answers only when told to.
    async with StandIn([("GET", "/health", slow_health)]) as stand_in:
        consumers.config.consumers["whisper"] = m.replace(r.config.consumers["whisper"], url=stand_in.url)
        probe = asyncio.ensure_future(consumers.probe("whisper"))
        await asyncio.sleep(0.05)
        consumers.job_failed("whisper", ConnectionResetError(), "connection reset")  # a job failed meanwhile
        gate.set()
        await probe
        assert consumers.states["whisper"].healthy is False
        await consumers.probe("whisper")  # the next probe heals it
        assert consumers.states["whisper"].healthy is True
    assert sim.records == []


def test_a_job_that_finds_a_command_started_service_failing_records_it_stopped():
    config = m.parse_config(yaml.safe_load(Path("consumers.yaml").read_text()))
    consumers = m.Consumers(m.Shared(config), session=None)  # type: ignore[arg-type] (no call is made)
    for name in ("whisper", "mvoice"):
        consumers.states[name].loaded()
        consumers.gone(name, "connection reset")
    assert consumers.states["whisper"].resident is False  # stopped: the next job starts it again
    assert consumers.states["mvoice"].resident is None  # an HTTP service gone: it may be back without it


async def test_a_failing_probe_older_than_a_successful_health_wait_is_ignored():
    clock = FakeClock()
    config = m.parse_config(base_raw(whisper=f"http://127.0.0.1:{free_port()}"))
    async with aiohttp.ClientSession() as session:
        consumers = m.Consumers(m.Shared(config), session, clock=clock)
        state = consumers.states["whisper"]
        probe = asyncio.ensure_future(consumers.probe("whisper"))  # it starts now ...
        await asyncio.sleep(0)
        clock.now += 1
        state.came_up()  # ... and a health wait succeeds meanwhile
        await probe  # refused: nothing listens
        assert state.healthy is True and state.last_probe is not None
        clock.now += 2
        await consumers.probe("whisper")  # a probe started since: it counts
        assert state.healthy is False


async def test_a_stopped_service_of_unknown_residency_is_started_before_its_job():
    """An unload command that failed half-way leaves residency unknown; failing health says stopped."""
    commands = {"command": ["x"]}
    s, _, ops, clock = make_scheduler(
        small_config(consumers__t__load=commands, consumers__t__unload=commands)
    )
    state = ops.states["t"]
    state.unload_failed()
    state.probed(False, "connection refused", "consumer_unreachable", clock.now)
    job = await s.acquire("t", "kt")
    assert ops.calls == [("load", "t")]
    job.release("completed", success=True)
    ops.states["t"] = state = m.ConsumerState("t", clock)  # unknown and never probed: a cold start, no load
    job = await s.acquire("t", "kt")
    assert ops.calls == [("load", "t")]
    job.release("completed")


async def test_ollama_unloading_itself_is_seen_at_the_next_probe(rig):
    r = await rig(tweak=use_presets, sims={"ollama": {"keep_alive_s": 0.2}})
    state = r.broker.consumers.states["ollama"]
    assert (await r.post("llm", {"model": "a", "prompt": "p", "stream": False}))[0] == 200
    assert state.resident is True  # its job's answer
    await until(lambda: not r.sims["ollama"].models)
    await r.broker.consumers.probe("ollama")
    assert state.resident is False and r.gpu.used_mib("ollama") == 0


async def test_a_residency_query_outranks_health_and_an_unreadable_one_is_logged_when_it_changes(rig, caplog):
    vllm = functools.partial(mgpusim.ServiceSim, service="vllm", vram_mib=1000, loaded=True)
    r = await rig(extra={"v": (vllm, {"preset": "vllm", "vram_resident_mib": 1000})})
    sim, consumers, state = r.sims["v"], r.broker.consumers, r.broker.consumers.states["v"]
    assert state.resident is True  # the first round, before serving
    await sim.do_unload()  # asleep behind the broker's back
    await consumers.probe("v")
    assert state.resident is False
    sim.faults["state_status"] = 404  # as without VLLM_SERVER_DEV_MODE
    caplog.clear()
    for _ in range(3):
        await consumers.probe("v")
    warnings = [rec for rec in caplog.records if "residency unknown" in rec.getMessage()]
    assert len(warnings) == 1 and "GET /is_sleeping answered 404" in warnings[0].getMessage()
    assert state.resident is False and state.healthy is True  # unknown answers change nothing
    sim.faults.clear()
    await sim.do_load()
    await consumers.probe("v")
    assert state.resident is True and "residency readable again" in caplog.text


# =====================================================================================================
# 4. Scheduling order, the lock and the queue
# Grant order, overtaking, aging, joins, the queue's bounds, property tests.
# =====================================================================================================


async def _grants(s: m.Scheduler, tasks: list[asyncio.Task[m.Job]]) -> list[str]:
    """Finish jobs one at a time as they are granted; the order in which tasks got the lock."""
    order = []
    pending = list(tasks)
    while pending:
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "two jobs held the lock at once"
        task = done.pop()
        pending.remove(task)
        job = task.result()
        order.append(job.consumer)
        job.release("completed")
    return order


def swap_config(max_overtake_s: float, **tweaks: Any) -> m.Config:
    """t and x of 6000 MiB each on a GPU where only one of them fits: a job of the other needs a swap."""
    return small_config(
        consumers__t__vram_resident_mib=6000,
        consumers__x__vram_resident_mib=6000,
        scheduler__max_overtake_s=max_overtake_s,
        **tweaks,
    )


async def _run_in_turn(
    s: m.Scheduler, clock: FakeClock, job: m.Job, tasks: list[asyncio.Task[m.Job]], job_s: float
) -> list[tuple[str, float]]:
    """Let ``job`` and then each job granted after it run ``job_s`` on the fake clock, one at a time, each
    answering 2xx; (consumer, grant time) of the ones granted after it, in order."""
    order = []
    pending = list(tasks)
    while True:
        clock.now += job_s
        job.release("completed", status=200, success=True)
        if not pending:
            return order
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "two jobs held the lock at once"
        task = done.pop()
        pending.remove(task)
        job = task.result()
        order.append((job.consumer, clock.now))


async def _raising_hold() -> None:
    raise RuntimeError("injected")


#: Each step of a job's life, and how to make it raise once (a bug there): (scheduler, monkeypatch) -> None.
JOB_STEPS = {
    "queueing": lambda s, mp: mp.setattr(  # (its queued event, with its eta: the queueing's own work)
        s.recorder, "job_event", _raising_once(s.recorder.job_event, lambda name, job, **_: name == "queued")
    ),
    "granting": lambda s, mp: mp.setattr(s.lock, "dispatch", _raising_once(s.lock.dispatch)),
    "grant bookkeeping": lambda s, mp: mp.setattr(s, "_touch_others", _raising_once(s._touch_others)),
    "making room": lambda s, mp: mp.setattr(m, "plan_room", _raising_once(m.plan_room)),
    "loading": lambda s, mp: mp.setattr(s.ops, "load", _raising_once(s.ops.load)),
    "started": lambda s, mp: mp.setattr(
        s.recorder, "job_event", _raising_once(s.recorder.job_event, lambda name, job, **_: name == "started")
    ),
    "release": lambda s, mp: mp.setattr(s.states["t"], "served", _raising_once(s.states["t"].served)),
    "hold": lambda s, mp: None,  # the hold itself raises: see below
    "hold's end": lambda s, mp: mp.setattr(s.recorder, "job_line", _raising_once(s.recorder.job_line)),
    "accounting": lambda s, mp: mp.setattr(
        s.recorder, "_account_now", _raising_once(s.recorder._account_now)
    ),
}


async def _interleaved_burst(
    r: Rig, gate: asyncio.Event, tokens: Mapping[str, str] | None = None, admin: str | None = None
) -> list[str]:
    """While an LLM job holds the GPU, 8 TTS and 4 image jobs queue interleaved (T T I T I T T I T I T T),
    each kind sent with its token in ``tokens`` ("T", "I"; the LLM job with ``admin``'s); then the GPU is
    let go. The consumers their grants went to, in order, once all are done."""
    llm = asyncio.ensure_future(
        r.post("llm", {"model": "m", "prompt": "holds the GPU"}, headers=bearer(admin))
    )
    await until(lambda: r.broker.scheduler.holder == "ollama")
    jobs = []
    for i, kind in enumerate("TTITITTITITT"):
        path = ("tts", {"text": str(i)}) if kind == "T" else ("image", {"prompt": {}})
        headers = bearer(tokens[kind] if tokens else None)
        jobs.append(asyncio.ensure_future(r.post(*path, headers=headers)))
        await until(lambda i=i: len(r.broker.scheduler.queue()) == i + 1)
    gate.set()
    assert all(status == 200 for status, _, _ in await asyncio.gather(llm, *jobs))
    await until(lambda: r.broker.scheduler.holder is None)
    return [e["consumer"] for e in recent_events(r.broker.events) if e["event"] == "granted"][1:]


INV_NAMES = ("a", "b", "c", "d", "e")


END_CODES = {
    "queue_full",
    "client_queue_full",
    "queue_timeout",
    "insufficient_vram",
    "gpu_unavailable",
    "load_failed",
    "unload_failed",
}


def invariant_config(max_overtake_s: float = 30) -> m.Config:
    def consumer(mib: int, **extra: Any) -> dict[str, Any]:
        return {
            "url": "http://127.0.0.1:9",
            "health": {"path": "/health"},
            "paths": {"k": {"path": "/work"}},
            "vram_resident_mib": mib,
            **extra,
        }

    route = {"path": "/r"}
    return m.parse_config(
        {
            "scheduler": {
                "max_queue": 6,
                "max_evictions": 3,
                "vram_wait_s": 1,
                "aging_s": 10,
                "max_overtake_s": max_overtake_s,
                "fair_window_s": 8,
            },
            # Jobs of two clients and of none: p's priority replaces the consumer's; q may queue 2.
            "auth": {
                "token": "admin-token-0123456789",
                "clients": {
                    "p": {"token": "p-token-0123456789abc", "priority": 2},
                    "q": {"token": "q-token-0123456789abc", "max_queued": 2},
                },
            },
            "consumers": {
                "a": consumer(
                    6000,
                    priority=1,
                    max_concurrency=2,
                    can_coexist_with=["b"],
                    unload=route,
                    load=route,
                    idle_unload_s=5,
                ),
                "b": consumer(3000, priority=3, unload=route, load=route),
                "c": consumer(5000, vram_managed=True, unload=route),
                "d": consumer(4000, unload=route, max_concurrency=3, idle_unload_s=2),
                "e": consumer(2000, priority=0),
            },
        }
    )


class InvariantBroken(AssertionError):
    pass


class CheckedScheduler(m.Scheduler):
    """The real scheduler, with every grant and every end checked against the documented rules."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ended: dict[int, str] = {}
        self.granted: dict[int, m.Job] = {}
        #: The target the scheduler chose to unload itself (its residency unknown, nothing else left).
        self.resetting: str | None = None
        #: Job id -> the consumers unloaded (or tried) for it.
        self.tried: dict[int, set[str]] = {}
        #: Each slot a job of a client (or of none) held: job id -> (client, its grant, its release or
        #: None); what its GPU time must add up to.
        self.held: dict[int, tuple[str | None, float, float | None]] = {}
        self.lock.dispatch = self._checked_dispatch(self.lock.dispatch)  # type: ignore[method-assign]
        self.internal = internal_jobs(self)
        self._real_unload = self.rooms.unload
        self.rooms.unload = self._unload  # type: ignore[method-assign]

    async def _unload(self, job: m.Job, victim: str, *, by: str | None = None) -> None:
        violations = self.ops.violations  # type: ignore[attr-defined]
        if job.kind == "preload":
            violations.append(f"a preload of {job.consumer} unloaded {victim}")
        if by == "idle" and not (
            self.holder == victim == job.consumer
            and self.exclusive
            and self.states[victim].resident is True
            and self.clock() >= (self.internal.idle_deadline(victim) or math.inf)
            and not any(j.consumer == victim for j in self.lock.waiting)
        ):
            violations.append(f"idle unload of {victim} while not idle, not resident or wanted")
        if by is None and victim != job.consumer and self.config.consumers[victim].vram_managed:
            # Ollama goes last: only once no other candidate is left for this job.
            cfg, target = self.config, self.config.consumers[job.consumer]
            left = [
                n
                for n, c in cfg.consumers.items()
                if n not in (victim, job.consumer)
                and not c.vram_managed
                and c.unload is not None
                and n not in target.can_coexist_with
                and self.jobs_of(n) == 0
                and self.states[n].resident is not False
                and n not in self.tried.get(job.id, ())
            ]
            if left:
                violations.append(f"vram_managed {victim} unloaded for {job} while {left} could go")
        self.tried.setdefault(job.id, set()).add(victim)
        if by is None and victim == job.consumer:
            # The documented last resort: a target whose residency is in doubt unloaded to find out
            # whether it is what fills the GPU.
            state = self.states[victim]
            if state.resident is False or state.known_resident():
                violations.append(f"{victim} unloaded itself although its residency is known")
            self.resetting = victim
        return await self._real_unload(job, victim, by=by)

    def _checked_dispatch(self, dispatch: Any) -> Any:
        """The lock's dispatch, with every grant it makes checked against the documented grant order."""

        def checked() -> bool:
            lock, now = self.lock, self.clock()
            aging_s, bound = self.config.scheduler.aging_s, self.config.scheduler.max_overtake_s
            window = self.config.scheduler.fair_window_s
            waiting = [j for j in lock.waiting if not j.granted.done()]
            holder, exclusive = lock.holder, lock.exclusive
            overtaken = {j.id: j.overtaken_since for j in waiting}
            # The clients' GPU time the grant order reads (the fair order; one client: arrival).
            served = lock.use.served({j.client for j in waiting}, now, window)
            result = dispatch()
            granted = [j for j in waiting if j.state == "running"]
            if result != bool(granted):
                raise InvariantBroken(f"dispatch said {result} but granted {granted}")
            self.granted.update((j.id, j) for j in granted)
            self.held.update((j.id, (j.client, now, None)) for j in granted if not j.exclusive)

            def eff(j: m.Job) -> int:
                return m.effective_priority(j, now, aging_s)

            left = [j for j in waiting if j not in granted]
            for g in granted:
                higher = [w for w in left if eff(w) > eff(g)]
                if higher:
                    raise InvariantBroken(f"{g} granted while {higher[0]} of higher priority waited")
                for w in left:
                    since = overtaken[w.id]
                    # (Overtaking is against the fair order: the least-served client first, then arrival.)
                    passed = eff(w) == eff(g) and m.fair_key(w, served) < m.fair_key(g, served)
                    if passed and (bound <= 0 or (since is not None and now - since >= bound)):
                        raise InvariantBroken(f"{g} overtook {w}, overtaken since {since} (bound {bound})")
                    if passed and w.overtaken_since is None:  # (its bound runs from now on)
                        raise InvariantBroken(f"{g} overtook {w}, which does not know it")
            consumers = {g.consumer for g in granted} | ({holder} if holder else set())
            if len(consumers) > 1:
                raise InvariantBroken(f"{granted} granted beside {holder}")
            if (exclusive and granted) or sum(g.exclusive for g in granted) > (holder is None):
                raise InvariantBroken(f"{granted} joined an exclusive holder, or an exclusive job joined")
            if lock.holder is None and any(not j.granted.done() for j in lock.waiting):
                raise InvariantBroken("lock free while jobs wait")
            # Dispatch grants until the grant order says nobody more: asked again, it names no one.
            c = self.config.consumers.get(lock.holder or "")
            holder_now = (
                None
                if lock.holder is None
                else m.Holder(lock.holder, lock.exclusive, (c.max_concurrency if c else 0) - lock.slots)
            )
            still = m.next_grant(
                list(lock.waiting),
                holder_now,
                now,
                aging_s=aging_s,
                max_overtake_s=bound,
                warm=lock.warm,
                served=lock.use.served({j.client for j in lock.waiting}, now, window),
            )
            if still is not None:
                raise InvariantBroken(f"{still} should have been granted too")
            return result

        return checked

    def release_slot(self, job: m.Job, *, held: bool = False) -> bool:
        if job.id in self.held:
            client, start, end = self.held[job.id]
            if end is not None:
                raise InvariantBroken(f"{job}'s slot released twice")
            self.held[job.id] = (client, start, self.clock())
        return super().release_slot(job, held=held)

    def gpu_time_adds_up(self) -> None:
        """Each client's GPU time over the fair window is what its slots held in it, holds included."""
        now, window = self.clock(), self.config.scheduler.fair_window_s
        for client in (None, *self.config.auth.clients):
            spans = [(a, b if b is not None else now) for c, a, b in self.held.values() if c == client]
            expected = sum(max(0.0, min(b, now) - max(a, now - window)) for a, b in spans)
            got = self.lock.use.seconds(client, now, window)
            if abs(got - expected) > 1e-6:
                raise InvariantBroken(f"client {client}: {got} s of GPU time, its slots held {expected} s")

    def end(
        self,
        job: m.Job,
        outcome: str,
        code: str | None = None,
        status: int | None = None,
        *,
        log_now: bool = True,
    ) -> None:
        if job.id in self.ended:
            raise InvariantBroken(f"{job} ended twice")
        if outcome == "failed" and code not in END_CODES | {"consumer_unreachable", "scheduler_error"}:
            raise InvariantBroken(f"{job} failed with undocumented code {code}")
        self.ended[job.id] = outcome
        super().end(job, outcome, code, status, log_now=log_now)


class CheckingOps(FakeOps):
    """Consumer calls that check every victim against the rules at the moment it is unloaded."""

    scheduler: CheckedScheduler
    violations: list[str]

    async def unload(self, name: str) -> None:
        s, cfg = self.scheduler, self.config
        target = s.holder
        victim = cfg.consumers[name]
        if (s.exclusive or s.resetting == name) and name == target:
            # An admin unload of the holder, or the documented last resort: a target of unknown
            # residency unloaded to find out whether it is what fills the GPU.
            s.resetting = None
            await super().unload(name)
            return
        if (
            name == target
            or victim.unload is None
            or target is None
            or name in cfg.consumers[target].can_coexist_with
            or s.jobs_of(name) > 0
        ):
            # Recorded, not raised: the scheduler rightly treats an exception here as a failed unload.
            self.violations.append(f"{name} is no valid victim for {target}")
        await super().unload(name)

    async def load(self, name: str) -> None:
        self.gpu.releasing.pop(name, None)  # a reload cancels a pending release, as real services do
        # Never load where it does not fit: the broker decided from a reading taken just before.
        gpu, size = self.gpu, self.config.consumers[name].vram_resident_mib
        free = gpu.total - gpu.reserved - sum(gpu.held.values())
        if free < size - gpu.held.get(name, 0):
            self.violations.append(f"{name} ({size} MiB) loaded with {free} MiB free")
        await super().load(name)

    def gone(self, name: str, reason: str) -> None:
        """As the broker wires it: the consumer's state says so, and its holds end."""
        super().gone(name, reason)
        self.scheduler.holding.abandon(name, reason)


class InvariantDriver:
    def __init__(self, max_overtake_s: float = 30) -> None:
        self.config = invariant_config(max_overtake_s)
        self.clock = FakeClock()
        self.gpu = FakeGpu(total=11000)  # tight: most targets need an eviction
        self.ops = CheckingOps(self.config, self.gpu, self.clock)
        for name in ("b", "d", "e"):  # resident from the start (a probe said so), never used
            self.gpu.held[name] = self.config.consumers[name].vram_resident_mib
            self.ops.states[name].probed(True, None, "consumer_unreachable", self.clock.now, True)
        self.s = CheckedScheduler(
            m.Shared(self.config), self.gpu, self.ops, clock=self.clock, sleep=self.clock.sleep
        )
        self.ops.scheduler, self.ops.violations = self.s, []
        #: Consumers whose memory went behind the broker's back (a crash, a restart): its record may lag.
        self.drifted: set[str] = set()
        self.tasks: list[asyncio.Task[m.Job]] = []
        #: Admin operations: they end their own jobs.
        self.admin: list[asyncio.Task[m.Job]] = []
        self.finished: set[int] = set()
        self.holds: list[asyncio.Event] = []

    async def settle(self) -> None:
        for _ in range(12):
            await asyncio.sleep(0)

    def granted_unfinished(self) -> list[m.Job]:
        jobs = []
        for t in self.tasks:
            if (
                t.done()
                and not t.cancelled()
                and t.exception() is None
                and t.result().id not in self.finished
            ):
                jobs.append(t.result())
        return jobs

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind, *args = op
        s = self.s
        if kind == "arrive":
            client = args[1] if len(args) > 1 else None
            self.tasks.append(asyncio.ensure_future(s.acquire(args[0], "k", client=client)))
        elif kind == "admin":
            name, action = args
            if action == "load" or self.config.consumers[name].unload is not None:
                op = s.load_now(name) if action == "load" else s.unload_now(name)
                self.admin.append(asyncio.ensure_future(op))
        elif kind == "idle_race":
            # A job of e takes the lock if it is free; behind it an idle unload, and a job for the same
            # consumer right behind that: the unload must find it wanted when its turn comes.
            self.tasks.append(asyncio.ensure_future(s.acquire("e", "k")))
            self.admin.append(asyncio.ensure_future(s.internal.idle_unload(args[0])))
            self.tasks.append(asyncio.ensure_future(s.acquire(args[0], "k")))
        elif kind == "internal":
            name, what = args
            op = s.internal.idle_unload(name) if what == "idle_unload" else s.internal.preload(name)
            if what == "idle_unload" or self.config.consumers[name].load is not None:
                self.admin.append(asyncio.ensure_future(op))
            else:
                op.close()
        elif kind == "cancel":
            live = [t for t in self.tasks + self.admin if not t.done()]
            if live:
                live[args[0] % len(live)].cancel()
        elif kind == "finish":
            jobs = self.granted_unfinished()
            if jobs:
                job = jobs[args[0] % len(jobs)]
                self.finished.add(job.id)
                how = args[1]
                if how in ("ok", "hold"):
                    self.gpu.held[job.consumer] = self.config.consumers[job.consumer].vram_resident_mib
                    self.gpu.releasing.pop(job.consumer, None)
                if how == "ok":
                    job.release("completed", status=200, success=True)
                elif how == "error_status":
                    job.release("completed", status=500)
                elif how == "failed":
                    job.release("failed", code="consumer_unreachable")
                else:
                    event = asyncio.Event()
                    self.holds.append(event)
                    job.release("completed", status=200, success=True, hold=event.wait, hold_timeout_s=1e6)
        elif kind == "release_hold":
            pending = [e for e in self.holds if not e.is_set()]
            if pending:
                pending[args[0] % len(pending)].set()
        elif kind == "advance":
            self.clock.now += args[0]
        elif kind == "unload_behaviour":
            name, how = args
            if how is None:
                self.ops.unload_behaviour.pop(name, None)
            else:
                self.ops.unload_behaviour[name] = how
        elif kind == "load_fails":
            (self.ops.load_fails.add if args[1] else self.ops.load_fails.discard)(args[0])
        elif kind == "outside":
            self.gpu.held["outside-process"] = args[0]
        elif kind == "probe":  # an honest health probe: resident iff it holds its model (not releasing it)
            name = args[0]
            loaded = name in self.gpu.held and name not in self.gpu.releasing
            self.ops.states[name].probed(True, None, "consumer_unreachable", self.clock.now, loaded)
        elif kind == "restart":  # behind the broker's back, unseen: its model is gone
            self.gpu.held.pop(args[0], None)
            self.gpu.releasing.pop(args[0], None)
            self.drifted.add(args[0])
        elif kind == "crash":  # seen: a poll or a probe finds the connection refused
            self.gpu.held.pop(args[0], None)
            self.gpu.releasing.pop(args[0], None)
            self.drifted.add(args[0])
            self.ops.gone(args[0], "connection refused")
        elif kind == "settle":
            for _ in range(args[0]):
                await asyncio.sleep(0)

    def check(self) -> None:
        s, cfg = self.s, self.config
        if self.ops.violations:
            raise InvariantBroken(self.ops.violations[0])
        if s.shared.internal_errors:  # (a check raised inside the scheduler is caught there, as a bug)
            raise InvariantBroken(f"{s.shared.internal_errors} bugs caught inside the scheduler")
        if (s.holder is None) != (s.slots == 0):
            raise InvariantBroken(f"holder {s.holder} with {s.slots} slots")
        if s.holder is not None and s.slots > cfg.consumers[s.holder].max_concurrency:
            raise InvariantBroken(f"{s.holder} runs {s.slots} jobs")
        for name, state in self.ops.states.items():
            if name != s.holder and s.jobs_of(name) != 0:
                raise InvariantBroken(f"{name} has {s.jobs_of(name)} jobs but does not hold the lock")
            if state.resident is True and name not in self.gpu.held and name not in self.drifted:
                raise InvariantBroken(f"{name} is recorded resident but holds no memory")
        running = [j for i, j in s.granted.items() if i not in s.ended]
        if s.slots != len(running) + s.holds:
            raise InvariantBroken(f"{s.slots} slots for {len(running)} running jobs and {s.holds} holds")
        if not books_balance(s):
            raise InvariantBroken(
                f"books do not balance: {s.stats} running={s.running} queued={len(s.queue())}"
            )
        for job in s.queue():
            if job.id in s.ended:
                raise InvariantBroken(f"{job} ended but still queued")
        s.gpu_time_adds_up()
        for t in self.tasks + self.admin:
            if t.done() and not t.cancelled() and t.exception() is not None:
                e = t.exception()
                if not isinstance(e, m.BrokerError) or e.code not in END_CODES | {"scheduler_error"}:
                    raise InvariantBroken(f"a job ended with {e!r}")

    async def run(self, ops: list[tuple[Any, ...]]) -> None:
        for op in ops:
            # Tasks run only at "settle" steps, so cancels and ends also land between a grant and the
            # granted task running again: the races a real event loop produces.
            await self.apply(op)
            self.check()
        # Wind down: every hold released, every waiter cancelled, every granted job finished, and every
        # unload or load still running on for a job whose caller left ends (at its timeout, in life).
        for round_ in range(50):
            for e in self.holds:
                e.set()
            for t in self.tasks + self.admin:
                if not t.done():
                    t.cancel()
            if round_ > 0:
                for t in list(self.s.tasks):
                    t.cancel()
            for job in self.granted_unfinished():
                self.finished.add(job.id)
                job.release("completed")
            await self.settle()
            self.check()
            if all(t.done() for t in self.tasks + self.admin) and self.s.holder is None and not self.s.tasks:
                break
        st = self.s.stats
        assert self.s.holder is None and self.s.slots == 0 and self.s.queue() == []
        # A task cancelled before it first ran never became a job (its client left before admission).
        assert st.jobs == st.completed + st.failed + st.cancelled + st.rejected == len(self.s.ended)
        # An idle unload or preload that was not due (None) never became a job either.
        became_jobs = [
            t
            for t in self.tasks + self.admin
            if not t.cancelled() and (t.exception() is not None or t.result() is not None)
        ]
        assert st.jobs >= len(became_jobs)


_ARRIVE = st.tuples(st.just("arrive"), st.sampled_from(INV_NAMES), st.sampled_from((None, "p", "q")))


_FINISH = st.tuples(
    st.just("finish"), st.integers(0, 30), st.sampled_from(["ok", "error_status", "failed", "hold"])
)


_SETTLE = st.tuples(st.just("settle"), st.integers(0, 12))


INV_OPS = st.one_of(
    # Weighted towards what makes the queue interesting: arrivals, ends and letting tasks run.
    _ARRIVE,
    _ARRIVE,
    _FINISH,
    _FINISH,
    _SETTLE,
    _SETTLE,
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("release_hold"), st.integers(0, 30)),
    st.tuples(st.just("advance"), st.floats(0, 6)),
    st.tuples(st.just("advance"), st.floats(0, 6)),
    st.tuples(st.just("idle_race"), st.sampled_from(["a", "d"])),
    st.tuples(st.just("idle_race"), st.sampled_from(["a", "d"])),
    st.tuples(
        st.just("unload_behaviour"),
        st.sampled_from(INV_NAMES),
        st.sampled_from([None, "fail", "hang", "keep", 2, 30]),
    ),
    st.tuples(st.just("load_fails"), st.sampled_from(INV_NAMES), st.booleans()),
    st.tuples(st.just("outside"), st.integers(0, 9000)),
    st.tuples(st.just("probe"), st.sampled_from(INV_NAMES)),
    st.tuples(st.just("restart"), st.sampled_from(INV_NAMES)),
    st.tuples(st.just("crash"), st.sampled_from(INV_NAMES)),
    st.tuples(st.just("admin"), st.sampled_from(INV_NAMES), st.sampled_from(["unload", "load"])),
    st.tuples(st.just("internal"), st.sampled_from(INV_NAMES), st.sampled_from(["idle_unload", "preload"])),
)


class PolicyJob:
    """A waiting job as the grant order sees it (no event loop: ``granted`` is a settled-or-not flag)."""

    class _Granted:
        def __init__(self, done: bool) -> None:
            self._done = done

        def done(self) -> bool:
            return self._done

    def __init__(self, i: int, consumer: str, priority: int, arrived: float, **kw: Any) -> None:
        self.id, self.consumer, self.priority, self.arrived = i, consumer, priority, arrived
        self.client = kw.get("client")
        self.exclusive = kw.get("exclusive", False)
        self.overtaken_since = kw.get("overtaken_since")
        self.granted = self._Granted(kw.get("cancelled", False))

    def __repr__(self) -> str:
        client = f" for {self.client}" if self.client is not None else ""
        return f"<{self.id} {self.consumer}{client} p{self.priority} @{self.arrived}>"


#: The clients a job may run for (None: no client: the admin's, the broker's own).
POLICY_CLIENTS = (None, "p", "q")


_POLICY_JOB = st.tuples(
    st.sampled_from("abcd"),
    st.integers(0, 4),
    st.floats(0, 100),
    st.booleans(),  # exclusive
    st.one_of(st.none(), st.floats(0, 100)),  # overtaken since
    st.booleans(),  # cancelled
    st.sampled_from(POLICY_CLIENTS),
)

#: Each client's GPU time over the window, as the lock hands the grant order a snapshot (None: none, as
#: with one client or none).
_SERVED = st.one_of(
    st.none(), st.fixed_dictionaries({c: st.sampled_from([0.0, 1.5, 7.0, 30.0]) for c in POLICY_CLIENTS})
)


FUZZ_SECONDS = float(os.environ.get("MGPU_FUZZ_SECONDS", "0"))


async def test_grant_order_is_effective_priority_then_arrival():
    cfg = small_config(consumers__x__priority=1, consumers__y__priority=3, consumers__z__priority=3)
    s, _, ops, clock = make_scheduler(cfg)
    for name in ops.states:
        ops.states[name].loaded()
    first = await s.acquire("t", "kt")
    x = await _queued(s, "x")
    clock.now += 1
    z = await _queued(s, "z")
    clock.now += 1
    y = await _queued(s, "y")
    assert [j.consumer for j in s.queue()] == ["z", "y", "x"]
    first.release("completed")
    assert await _grants(s, [x, y, z]) == ["z", "y", "x"]
    assert books_balance(s)


async def test_aging_raises_a_waiting_jobs_priority():
    cfg = small_config(consumers__x__priority=1, consumers__y__priority=3)
    s, _, ops, clock = make_scheduler(cfg)
    for name in ops.states:
        ops.states[name].loaded()
    first = await s.acquire("t", "kt")
    x = await _queued(s, "x")  # priority 1
    clock.now += 130  # two aging steps: x is at 3 now
    y = await _queued(s, "y")  # priority 3, arrived later
    # (eta_s: t's job, which holds the GPU, has no learned time; it counts as at least RUNNING_FLOOR_S.)
    expected = {
        **{"consumer": "x", "kind": "kx", "priority": 3, "waited_s": 130.0, "eta_s": m.RUNNING_FLOOR_S},
        "client": None,  # (issue 23: the client it runs for; none here)
    }
    assert snapshot(s)["queue"][0] == expected
    first.release("completed")
    assert await _grants(s, [x, y]) == ["x", "y"]


async def test_aging_stops_at_priority_4():
    s, _, ops, clock = make_scheduler(small_config(consumers__x__priority=1))
    ops.states["t"].loaded()
    first = await s.acquire("t", "kt")
    x = await _queued(s, "x")
    clock.now += 3600
    assert snapshot(s)["queue"][0]["priority"] == 4
    first.release("completed")
    (await x).release("completed")


@pytest.mark.parametrize("leaves", ["cancelled", "timed out"])
async def test_a_holder_job_joins_as_soon_as_the_job_that_kept_it_out_leaves(leaves):
    # Strict order (max_overtake_s: 0): a job of the holder never goes before an equal one of another.
    cfg = small_config(
        consumers__t__max_concurrency=2, scheduler__queue_timeout_s=0.2, scheduler__max_overtake_s=0
    )
    s, _, ops, _ = make_scheduler(cfg)
    for name in ops.states:
        ops.states[name].loaded()
    a = await s.acquire("t", "kt")
    x = await _queued(s, "x")  # same priority as t: t may not join while x waits
    c = await _queued(s, "t")
    assert not c.done()
    if leaves == "cancelled":
        x.cancel()
    await asyncio.gather(x, return_exceptions=True)
    b = await asyncio.wait_for(c, 5)  # joined the holder without waiting for a to finish
    assert s.running == 2
    a.release("completed")
    b.release("completed")
    assert books_balance(s)


@pytest.mark.parametrize("max_overtake_s", [30, 0])
async def test_jobs_that_need_no_swap_go_before_those_that_would_need_one(max_overtake_s):
    """Interleaved arrivals of t (resident) and x (not: only one fits). t's jobs overtake x's of equal
    priority, one batch per swap; with max_overtake_s 0 the queue is served strictly in arrival order."""
    s, gpu, ops, clock = make_scheduler(swap_config(max_overtake_s))
    gpu.total = 12000  # 11520 usable: t's 6000 and x's 6000 (and the cushion) do not fit together
    for name in ("x", "y", "z"):
        ops.states[name].unloaded()
    ops.states["t"].loaded()
    gpu.held["t"] = 6000
    running = await s.acquire("t", "kt")
    tasks = []
    for name in ("x", "t", "x", "t", "t"):
        clock.now += 0.1
        tasks.append(await _queued(s, name))
    order = [name for name, _ in await _run_in_turn(s, clock, running, tasks, job_s=1)]
    if max_overtake_s:
        assert order == ["t", "t", "t", "x", "x"] and ops.calls == [("unload", "t"), ("load", "x")]
    else:
        assert order == ["x", "t", "x", "t", "t"] and len(ops.calls) == 8  # a swap for each change
    assert books_balance(s)


async def test_no_job_is_overtaken_beyond_max_overtake_s():
    """A steady stream of jobs that need no swap does not starve one that needs a swap: once it has been
    overtaken for max_overtake_s, it goes next, before the stream's later jobs."""
    s, gpu, ops, clock = make_scheduler(swap_config(10))
    gpu.total = 12000
    for name in ("x", "y", "z"):
        ops.states[name].unloaded()
    ops.states["t"].loaded()
    gpu.held["t"] = 6000
    running = await s.acquire("t", "kt")
    x = await _queued(s, "x")
    granted = []
    while not x.done():
        clock.now += 0.5
        t_next = await _queued(s, "t")  # the stream: one more job of t every 3 s
        clock.now += 2.5
        running.release("completed", status=200, success=True)
        done, _ = await asyncio.wait([x, t_next], return_when=asyncio.FIRST_COMPLETED)
        running = done.pop().result()
        granted.append((running.consumer, clock.now))
    job = running
    assert job is x.result() and job.overtaken_since is not None
    assert len([g for g in granted if g[0] == "t"]) >= 3
    # Overtaken from its first overtaking grant on; granted at the first grant once that lasted 10 s.
    assert granted[-1][1] - job.overtaken_since >= 10 > granted[-2][1] - job.overtaken_since
    last = await _run_in_turn(s, clock, job, [t_next], job_s=1)  # the stream's last job
    assert [name for name, _ in last] == ["t"]
    assert books_balance(s)


async def test_a_higher_effective_priority_is_never_overtaken_and_aging_counts():
    """A job that needs no swap never goes before one of higher effective priority (aging included)."""
    cfg = swap_config(30, consumers__x__priority=3, consumers__t__priority=2)
    s, gpu, ops, clock = make_scheduler(cfg)
    gpu.total = 12000
    for name in ("x", "y", "z"):
        ops.states[name].unloaded()
    ops.states["t"].loaded()
    gpu.held["t"] = 6000
    running = await s.acquire("t", "kt")
    x = await _queued(s, "x")
    clock.now += 0.1
    t = await _queued(s, "t")
    order = [name for name, _ in await _run_in_turn(s, clock, running, [x, t], job_s=1)]
    assert order == ["x", "t"]


#: auth with two clients, p and q (of no priority of their own), and the admin's token that clients need.
CLIENT_AUTH = {
    "token": "admin-token-0123456789",
    "clients": {"p": {"token": "p-token-0123456789abc"}, "q": {"token": "q-token-0123456789abc"}},
}


def client_auth(**clients: dict[str, Any]) -> dict[str, Any]:
    """CLIENT_AUTH with each client's settings (``p={"priority": 4}``) added."""
    auth = copy.deepcopy(CLIENT_AUTH)
    for name, extra in clients.items():
        auth["clients"].setdefault(name, {"token": f"{name}-token-0123456789abc"}).update(extra)
    return auth


async def _granted_in_turn(s: m.Scheduler, clock: FakeClock, job: m.Job, job_s: float) -> list[m.Job]:
    """Let ``job`` and each job granted after it run ``job_s`` on the fake clock, one at a time, until the
    queue is empty; the jobs granted after it, in order."""
    order: list[m.Job] = []
    while True:
        clock.now += job_s
        job.release("completed", status=200, success=True)
        for _ in range(5):
            await asyncio.sleep(0)
        if s.holder is None:
            return order
        job = next(iter(s.lock.taken))
        order.append(job)


@pytest.mark.parametrize("clients", [True, False])
async def test_among_equals_the_client_with_the_least_gpu_time_goes_first(clients):
    """Fair share: p's job has held the GPU 5 s; q's job, which came after p's next one, goes first. It
    passed p's in the fair order, not by overtaking it. Without clients: arrival order, as ever."""
    s, _, ops, clock = make_scheduler(small_config(**({"auth": CLIENT_AUTH} if clients else {})))
    ops.states["t"].loaded()
    p, q = ("p", "q") if clients else (None, None)
    running = await s.acquire("t", "kt", client=p)
    p_next = await _queued(s, "t", p)
    clock.now += 1
    q_next = await _queued(s, "t", q)
    clock.now += 4
    assert m.client_use(s, "p")["gpu_s_window"] == (5.0 if clients else 0.0)
    order = await _granted_in_turn(s, clock, running, job_s=1)
    expected = [q_next.result(), p_next.result()] if clients else [p_next.result(), q_next.result()]
    assert order == expected
    assert p_next.result().overtaken_since is None  # fairness is no overtaking: no bound runs for p's job
    assert books_balance(s)


async def test_a_warm_job_that_passes_a_less_served_clients_job_overtakes_it():
    """p (served) and q (not): p's job that needs no swap goes before q's that needs one, though q's is
    first in the fair order: q's is overtaken from then on (its max_overtake_s bound runs), although it
    came later than p's."""
    s, gpu, ops, clock = make_scheduler(swap_config(30, auth=CLIENT_AUTH))
    gpu.total = 12000  # t and x do not fit together
    for name in ("x", "y", "z"):
        ops.states[name].unloaded()
    ops.states["t"].loaded()
    gpu.held["t"] = 6000
    running = await s.acquire("t", "kt", client="p")
    clock.now += 5
    p_t = await _queued(s, "t", "p")
    clock.now += 1
    q_x = await _queued(s, "x", "q")
    running.release("completed", status=200, success=True)
    granted = await asyncio.wait_for(p_t, 5)
    assert not q_x.done() and s.queue()[0].overtaken_since == clock.now
    granted.release("completed", status=200, success=True)
    (await q_x).release("completed")
    assert books_balance(s)


async def test_fair_share_keeps_the_batches_of_a_bound_that_applies():
    """The swap storm fairness must not bring back: p keeps t's jobs coming (t resident), q has ten x jobs
    queued (each a swap away). Past max_overtake_s, q's jobs go; x then holds the GPU and q's overtaken jobs
    need no swap: they all go, in one batch, even once q has had more GPU time than p. (Served in the fair
    order alone while the bound applies, the two would alternate, a swap at every grant.)"""
    s, gpu, ops, clock = make_scheduler(
        swap_config(5, auth=CLIENT_AUTH, scheduler__fair_window_s=1000, scheduler__queue_timeout_s=10**5)
    )
    gpu.total = 12000
    for name in ("x", "y", "z"):
        ops.states[name].unloaded()
    ops.states["t"].loaded()
    gpu.held["t"] = 6000
    job = await s.acquire("t", "kt", client="p")
    xs = [await _queued(s, "x", "q") for _ in range(10)]
    ts = [await _queued(s, "t", "p") for _ in range(2)]
    granted: list[m.Job] = []
    while not all(x.done() for x in xs):
        clock.now += 1
        job.release("completed", status=200, success=True)
        for _ in range(5):
            await asyncio.sleep(0)
        job = next(iter(s.lock.taken))
        granted.append(job)
        if job.consumer == "t":
            ts.append(await _queued(s, "t", "p"))  # p keeps its jobs coming
    consumers = "".join(j.consumer for j in granted)
    assert consumers == "ttttt" + "x" * 10, consumers  # one swap, after 5 s of overtaking
    assert m.client_use(s, "q")["gpu_s_window"] > m.client_use(s, "p")["gpu_s_window"]
    job.release("completed")
    for t in ts:
        (await t).release("completed")


async def test_a_clients_priority_replaces_the_consumers():
    """batch (priority 0) has jobs queued for t (priority 2); wa (priority 4) sends one: it goes next."""
    auth = client_auth(wa={"priority": 4}, batch={"priority": 0})
    s, _, ops, clock = make_scheduler(small_config(auth=auth))
    ops.states["t"].loaded()
    running = await s.acquire("t", "kt", client="batch")
    batch = [await _queued(s, "t", "batch") for _ in range(3)]
    clock.now += 1
    wa = await _queued(s, "t", "wa")
    assert [(j.client, j.priority) for j in s.queue()] == [("wa", 4)] + [("batch", 0)] * 3
    order = await _granted_in_turn(s, clock, running, job_s=1)
    assert [j.client for j in order] == ["wa", "batch", "batch", "batch"] and order[0] is wa.result()
    assert all(b.done() for b in batch) and books_balance(s)


async def test_max_queued_refuses_that_client_alone_with_client_queue_full():
    """q may queue 2: its third job gets client_queue_full (429, Retry-After when q's first is expected to
    go); p still queues; max_queue bounds the others' room (queue_full), which q's jobs do not take."""
    cfg = small_config(auth=client_auth(q={"max_queued": 2}), scheduler__max_queue=2)
    s, _, ops, clock = make_scheduler(cfg)
    ops.states["t"].loaded()
    ops.states["t"].learned("job", 10.0)
    running = await s.acquire("t", "kt", client="p")
    waiting = [await _queued(s, "t", "p"), await _queued(s, "t", "q"), await _queued(s, "t", "q")]
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt", client="q")
    e = info.value
    assert (e.code, e.status, e.retryable) == ("client_queue_full", 429, True)
    # q's first job waits for the running one (10 s) and p's before it (10 s): a place of q's frees then.
    assert e.retry_after == 20 and "client q has 2 jobs waiting" in e.message
    waiting.append(await _queued(s, "t", "p"))  # p's room is untouched by q's two
    assert not waiting[-1].done() and len(s.queue()) == 4
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt", client="p")
    assert info.value.code == "queue_full" and "2 jobs are waiting already" in info.value.message
    assert s.stats.rejected == 2 and books_balance(s)
    order = await _granted_in_turn(s, clock, running, job_s=0)
    assert len(order) == 4


async def test_a_client_refused_again_and_again_plays_the_queue_forward_once_a_second():
    """The Retry-After of client_queue_full is its first waiting job's expected wait: a script retrying in a
    loop played the whole queue forward at each refusal, on the event loop. Now once per CLIENT_ETA_S,
    counted down in between; and the forecast stops at that client's first job."""
    cfg = small_config(auth=client_auth(q={"max_queued": 1}), scheduler__max_queue=100)
    s, _, ops, clock = make_scheduler(cfg)
    ops.states["t"].loaded()
    ops.states["t"].learned("job", 10.0)
    running = await s.acquire("t", "kt")  # (nobody's: p and q equal in the fair order, which is arrival)
    waiting = [await _queued(s, "t", "p") for _ in range(10)]
    waiting += [await _queued(s, "t", "q")] + [await _queued(s, "t", "p") for _ in range(10)]
    played: list[int] = []
    real = s.forecast

    def counted(until: Any = None, count: Any = None) -> list[tuple[m.Job, float]]:
        out = real(until, count)
        played.append(len(out))
        return out

    s.forecast = counted  # type: ignore[method-assign]
    refusals = []
    for step in range(30):
        clock.now += 0.05 if step % 10 else 0  # 1.5 s in all
        with pytest.raises(m.BrokerError) as info:
            await s.acquire("t", "kt", client="q")
        refusals.append(info.value)
    assert {e.code for e in refusals} == {"client_queue_full"}
    # Twice in 1.35 s, each stopped at q's first job: it goes second (after p's first, p has had GPU time
    # in the fair order), and the 19 jobs of p's after it are not played.
    assert played == [2, 2]
    assert refusals[0].retry_after == 20  # q's job waits for the running one and p's first
    assert refusals[19].retry_after == 20 and refusals[20].retry_after == 20  # 19.1 s: counted down
    order = await _granted_in_turn(s, clock, running, job_s=0)
    assert len(order) == len(waiting)


async def test_a_client_with_max_queued_above_max_queue_cannot_fill_the_others_room():
    """The issue's own example: batch may queue 200, max_queue is 64. batch's runaway script queues 70 and
    is told client_queue_full only past its 200; wa, the admin and p (no max_queued) still queue, up to
    max_queue of their own between them."""
    cfg = small_config(
        auth=client_auth(batch={"max_queued": 200}, wa={"max_queued": 8}), scheduler__max_queue=3
    )
    s, _, ops, clock = make_scheduler(cfg)
    ops.states["t"].loaded()
    running = await s.acquire("t", "kt", client="batch")
    waiting = [await _queued(s, "t", "batch") for _ in range(70)]
    waiting += [await _queued(s, "t", "wa"), await _queued(s, "t", None), await _queued(s, "t", "p")]
    waiting.append(await _queued(s, "t", "p"))
    assert not any(t.done() for t in waiting) and len(s.queue()) == 74
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")  # the shared room: the admin, p and p's second
    assert info.value.code == "queue_full"
    waiting.append(await _queued(s, "t", "wa"))  # wa's own room
    assert not waiting[-1].done()
    assert s.stats.rejected == 1 and books_balance(s)
    order = await _granted_in_turn(s, clock, running, job_s=0)
    assert len(order) == 75


async def test_a_refused_clients_retry_after_counts_down_between_two_plays_of_the_queue():
    """Between two plays (CLIENT_ETA_S apart), client_queue_full's Retry-After is the wait played last,
    less the time since: q's first job, expected in 20.6 s, is expected in 19.9 s 0.7 s later (Retry-After
    20, as a play then would say), not still in 20.6 s (21)."""
    cfg = small_config(auth=client_auth(q={"max_queued": 1}))
    s, _, ops, clock = make_scheduler(cfg)
    ops.states["t"].loaded()
    ops.states["t"].learned("job", 10.3)
    running = await s.acquire("t", "kt")
    waiting = [await _queued(s, "t", "p"), await _queued(s, "t", "q")]  # q's waits for two jobs: 20.6 s
    after, start = {}, clock.now
    for at in (0.0, 0.7, 1.2):  # played at 0, counted down at 0.7, played again at 1.2 (19.4 s)
        clock.now = start + at
        with pytest.raises(m.BrokerError) as info:
            await s.acquire("t", "kt", client="q")
        assert info.value.code == "client_queue_full"
        after[at] = info.value.retry_after
    assert after == {0.0: 21, 0.7: 20, 1.2: 20}
    order = await _granted_in_turn(s, clock, running, job_s=0)
    assert order == [w.result() for w in waiting]


async def test_an_exclusive_job_is_nobodys_gpu_time():
    """Admin operations, idle unloads and preloads count for nobody in fair share: the admin's unload that
    held the GPU 5 s does not count against the jobs of no client (the admin's own), whose next one still
    goes before p's (p has had 1 s). (Counted as the jobs of no client, it would go after p's.)"""
    s, _, ops, clock = make_scheduler(small_config(auth=CLIENT_AUTH))
    ops.states["t"].loaded()
    p = await s.acquire("t", "kt", client="p")
    clock.now += 1
    p.release("completed", status=200, success=True)

    async def nothing(job: m.Job) -> None:
        pass

    unload = await s.job("x", "unload", exclusive=True, step=nothing).__aenter__()  # the lock, alone
    p_next = await _queued(s, "t", "p")
    clock.now += 0.1
    admins = await _queued(s, "t", None)
    order = await _granted_in_turn(s, clock, unload, job_s=5)
    assert order == [admins.result(), p_next.result()]
    assert books_balance(s)


async def test_a_clients_gpu_time_in_status_is_what_it_held_within_the_fair_window():
    """/v1/status's gpu_s_window is the window's (fair_window_s, 60 s): p's job held the GPU from 0 to 5 s;
    at 63 s, 2 s of it fall within the window; at 66 s, none (not the 5 s p ever had)."""
    s, _, ops, clock = make_scheduler(small_config(auth=CLIENT_AUTH))
    ops.states["t"].loaded()
    job, start = await s.acquire("t", "kt", client="p"), clock.now
    clock.now = start + 5
    assert m.client_use(s, "p")["gpu_s_window"] == 5.0  # (held still: counted up to now)
    job.release("completed", status=200, success=True)
    clock.now = start + 63
    assert m.client_use(s, "p")["gpu_s_window"] == pytest.approx(2.0)
    clock.now = start + 66
    assert m.client_use(s, "p") == {"queued": 0, "running": 0, "jobs_total": 1, "gpu_s_window": 0.0}


async def test_a_job_of_a_client_that_a_reload_removed_meanwhile_is_refused_not_queued():
    """A request let in with q's token, whose job comes to be admitted after a reload removed q (its
    connection is being closed), gets unauthorized: never queued or counted, nor run as nobody's with the
    consumer's priority in place of q's."""
    s, _, ops, _ = make_scheduler(small_config(auth=client_auth(q={"priority": 0})))
    ops.states["t"].loaded()
    running = await s.acquire("t", "kt", client="p")
    auth = copy.deepcopy(CLIENT_AUTH)
    del auth["clients"]["q"]
    s.shared.config = small_config(auth=auth)  # (as Broker.apply swaps it)
    refused = await _queued(s, "t", "q")
    assert refused.done() and s.queue() == [], "q's job was queued"
    error = refused.exception()
    assert isinstance(error, m.BrokerError)
    assert (error.code, error.status) == ("unauthorized", 401) and "client q" in error.message
    assert s.stats.jobs == 1 and books_balance(s)
    running.release("completed")


async def test_queue_full_rejects_beyond_max_queue():
    s, _, ops, _ = make_scheduler(small_config(scheduler__max_queue=2))
    ops.states["t"].loaded()
    first = await s.acquire("t", "kt")
    waiting = [await _queued(s, "t"), await _queued(s, "t")]
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert (info.value.code, info.value.status, info.value.retryable) == ("queue_full", 503, True)
    assert s.stats.rejected == 1 and books_balance(s)
    first.release("completed")
    assert await _grants(s, waiting) == ["t", "t"]
    assert books_balance(s) and s.stats.jobs == 4


async def test_queue_timeout_answers_a_job_that_waited_too_long():
    s, _, ops, _ = make_scheduler(small_config(scheduler__queue_timeout_s=0.05))
    ops.states["t"].loaded()
    first = await s.acquire("t", "kt")
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert info.value.code == "queue_timeout" and s.stats.failed == 1
    assert s.queue() == [] and books_balance(s)
    assert info.value.retry_after == 1  # nothing learned yet: at least 1
    # With t's jobs known to take 40 s, the one refused now is told to come back when the holder is done.
    ops.states["t"].learned("job", 40.0)
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert info.value.code == "queue_timeout" and info.value.retry_after == 40
    first.release("completed")


async def test_cancelled_waiter_leaves_no_trace_and_the_lock_passes_on():
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    first = await s.acquire("t", "kt")
    x = await _queued(s, "x")
    y = await _queued(s, "y")
    x.cancel()
    await asyncio.gather(x, return_exceptions=True)
    assert [j.consumer for j in s.queue()] == ["y"] and s.stats.cancelled == 1
    first.release("completed")
    job = await y
    assert job.consumer == "y" and s.holder == "y" and books_balance(s)
    job.release("completed")


async def test_waiter_cancelled_while_being_granted_passes_the_grant_on():
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    first = await s.acquire("t", "kt")
    x = await _queued(s, "x")
    y = await _queued(s, "y")
    first.release("completed")  # grants x ...
    x.cancel()  # ... which is cancelled before it runs again
    await asyncio.gather(x, return_exceptions=True)
    job = await asyncio.wait_for(y, 5)
    assert job.consumer == "y" and s.stats.cancelled == 1 and books_balance(s)
    job.release("completed")


async def test_max_concurrency_lets_the_holder_join_but_never_another_consumer():
    s, _, ops, _ = make_scheduler(small_config(consumers__t__max_concurrency=2, scheduler__max_overtake_s=0))
    for name in ops.states:
        ops.states[name].loaded()
    a = await s.acquire("t", "kt")
    b = await s.acquire("t", "kt")  # joins: nobody else waits
    assert (s.holder, s.running) == ("t", 2)
    x = await _queued(s, "x")
    c = await _queued(s, "t")  # x waits with equal priority: t may not join any more
    a.release("completed")
    await asyncio.sleep(0)
    assert not c.done() and not x.done() and s.running == 1
    b.release("completed")
    assert (await x).consumer == "x" and not c.done()
    x.result().release("completed")
    (await c).release("completed")
    assert books_balance(s)


@pytest.mark.catches_bug
@pytest.mark.parametrize("step", list(JOB_STEPS))
async def test_whatever_raises_while_a_job_is_granted_or_running_it_ends_and_frees_its_slot(
    step, monkeypatch
):
    """The scheduler's invariant, with a failure injected at each step of a job's life: the job ends once
    (the books balance), its slot is free, its consumer counts no job, and the next job is served."""
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {"x": 1.0})  # t needs room: x is unloaded, t loaded
    JOB_STEPS[step](s, monkeypatch)
    try:
        job = await s.acquire("t", "kt")
    except m.BrokerError as e:
        assert e.code in ("scheduler_error", "load_failed"), e.code
    else:
        hold = _raising_hold if step == "hold" else asyncio.Event().wait if step == "hold's end" else None
        job.release("completed", status=200, success=True, hold=hold, hold_timeout_s=0.01 if hold else 0)
        assert job.release("completed") is False  # released once: a second call does nothing
        await until(lambda: s.holder is None)
    for _ in range(3):
        await asyncio.sleep(0)  # the accounting runs after the hand-over
    assert (s.holder, s.slots, s.holds) == (None, 0, 0)
    assert all(s.jobs_of(name) == 0 for name in ops.states) and books_balance(s)
    assert s.shared.internal_errors + s.stats.load_failures >= 1 or step == "hold's end"
    again = await s.acquire("t", "kt")  # the GPU is not wedged
    again.release("completed", status=200, success=True)
    assert s.holder is None and books_balance(s)


@pytest.mark.catches_bug
async def test_a_bug_in_the_books_of_a_jobs_end_starts_no_hold_and_the_slot_goes_at_once(monkeypatch):
    """The invariant above, for a job that ends with a hold (ComfyUI's render): a bug while its end is
    accounted (its consumer's residency record raising) ends it and gives its slot to the job waiting at
    once; the hold never starts (it would keep the GPU until the render or its hold_timeout_s ended). (A
    mutation audit: a hold that still started after that bug went unseen, the test above ending that step
    with no hold.)"""
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {})
    gpu.held.pop("z")  # t fits beside x and y: 7904 MiB free
    ops.states["z"].unloaded()
    JOB_STEPS["release"](s, monkeypatch)  # t's served() raises once
    job = await s.acquire("t", "kt")
    waiting = await _queued(s, "x")
    started: list[int] = []

    async def render() -> None:
        started.append(job.id)
        await asyncio.Event().wait()

    assert job.release("completed", status=200, success=True, hold=render, hold_timeout_s=3600) is True
    assert job.state == "ended" and job.outcome == "completed" and s.holds == 0
    after = await asyncio.wait_for(waiting, 5)
    for _ in range(3):
        await asyncio.sleep(0)  # (a hold's task would have begun by now)
    assert started == [] and s.shared.internal_errors == 1
    after.release("completed", status=200, success=True)
    assert (s.holder, s.slots, s.holds) == (None, 0, 0) and books_balance(s)


async def test_jobs_of_different_consumers_never_overlap(rig):
    r = await rig(sims={"mvoice": {"work_s": 0.03}, "ollama": {"work_s": 0.03, "line_interval_s": 0.005}})
    calls = [r.post("tts", {"text": "a"}) for _ in range(3)] + [
        r.post("llm", {"model": "m", "prompt": "p"}) for _ in range(3)
    ]
    calls += [r.post("stt", None, data=b"x") for _ in range(2)]
    results = await asyncio.gather(*calls)
    assert [s for s, _, _ in results] == [200] * 8
    work = r.sims["mvoice"].work + r.sims["ollama"].work
    assert len(work) == 8 and overlaps(work) == []


async def test_max_concurrency_two_overlaps_one_consumer_never_another(rig):
    def two(raw):
        raw["consumers"]["mvoice"]["max_concurrency"] = 2

    r = await rig(sims={"mvoice": {"work_s": 1.0, "loaded": True}, "ollama": {"work_s": 0.05}}, tweak=two)
    mvoice, ollama = r.sims["mvoice"], r.sims["ollama"]
    # b joins a while nothing else waits, and works longer: the llm job, queued meanwhile, must wait for b
    # too. (Sent together, a and b ended together: a grant to ollama on a's end, while b still held its
    # slot, overlapped no work, and this test passed.)
    calls = [asyncio.ensure_future(r.post("tts", {"text": "a"}))]
    await until(lambda: mvoice.active == 1)
    mvoice.work_s = 2.0
    calls.append(asyncio.ensure_future(r.post("tts", {"text": "b"})))
    await until(lambda: mvoice.active == 2)
    calls.append(asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"})))
    await until(lambda: len(r.broker.scheduler.queue()) == 1)
    results = await asyncio.gather(*calls)
    assert [s for s, _, _ in results] == [200, 200, 200]
    assert mvoice.max_active == 2 and len(mvoice.work) == 2 and len(ollama.work) == 1
    for a in mvoice.work:
        for b in ollama.work:
            assert b.start >= a.end or a.start >= b.end


async def test_queue_full_and_queue_timeout_end_to_end(rig):
    def tight(raw):
        raw["scheduler"]["max_queue"] = 1
        raw["scheduler"]["queue_timeout_s"] = 0.3

    r = await rig(tweak=tight, sims={"mvoice": {"work_s": 1.0, "loaded": True}})
    busy = asyncio.ensure_future(r.post("tts", {"text": "long"}))
    await until(lambda: r.broker.scheduler.holder is not None)
    waiting = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
    await until(lambda: len(r.broker.scheduler.queue()) == 1)
    status, headers, body = await r.post("llm", {"model": "m", "prompt": "p"})
    error_of(status, headers, body, "queue_full")
    error_of(*await waiting, "queue_timeout")
    assert (await busy)[0] == 200
    st = (await r.status())["scheduler"]["stats"]
    assert (st["jobs"], st["completed"], st["rejected"], st["failed"]) == (3, 1, 1, 1)
    assert r.sims["ollama"].records == []


@pytest.mark.parametrize("max_overtake_s", [30, 0])
@no_overfill
async def test_an_interleaved_burst_is_served_in_batches_with_one_swap(rig, max_overtake_s):
    """Issue 12's trace, shortened: TTS (mvoice, resident) and image jobs (ComfyUI) of equal priority,
    interleaved, on a GPU where the two do not fit together. Served what is loaded first: the TTS batch,
    one swap, the images. Strict arrival order (max_overtake_s 0) swaps at every change."""
    gate = asyncio.Event()

    def setup(raw: dict[str, Any]) -> None:
        raw["scheduler"]["max_overtake_s"] = max_overtake_s
        for name in ("mvoice", "comfyui"):
            raw["consumers"][name]["priority"] = 2

    async with held_llm(gate) as ollama:
        r = await rig(
            **SMALL_CARD,  # (on 16 GiB they fitted together, but for the cushion: no overfill was possible)
            tweak=setup,
            urls={"ollama": ollama.url},
            sims={"mvoice": {"loaded": True, "work_s": 0.02}, "comfyui": {"work_s": 0.05}},
        )
        order = await _interleaved_burst(r, gate)
    nothing_overfilled(r.gpu)
    swaps = sum(a != b for a, b in itertools.pairwise(order))
    if max_overtake_s:
        assert order == ["mvoice"] * 8 + ["comfyui"] * 4 and swaps == 1
        assert (r.stats.evictions, r.sims["mvoice"].unloads) == (1, 1)
    else:
        assert order == ["mvoice" if k == "T" else "comfyui" for k in "TTITITTITITT"] and swaps == 8
        assert r.stats.evictions == 8  # the issue's 8 evictions


@no_overfill
async def test_an_interleaved_burst_split_between_two_clients_keeps_its_one_swap(rig):
    """Issue 23: fair share must not bring back the swap storm. The same burst split between two clients at
    equal priority, a sending the TTS jobs and b the images: once a's first job has run, b has had less GPU
    time, yet a's jobs, which need no swap, still go first: the TTS batch, one swap, the images (fairness
    decides among what warmth leaves open, never for a swap at every turn)."""
    gate = asyncio.Event()

    def setup(raw: dict[str, Any]) -> None:
        for name in ("mvoice", "comfyui"):
            raw["consumers"][name]["priority"] = 2
        raw["auth"] = client_auth(a={}, b={}) | {"token": TOKEN}

    async with held_llm(gate) as ollama:
        r = await rig(
            **SMALL_CARD,
            tweak=setup,
            urls={"ollama": ollama.url},
            sims={"mvoice": {"loaded": True, "work_s": 0.02}, "comfyui": {"work_s": 0.05}},
        )
        tokens = {"T": "a-token-0123456789abc", "I": "b-token-0123456789abc"}
        order = await _interleaved_burst(r, gate, tokens, admin=TOKEN)
    nothing_overfilled(r.gpu)
    assert order == ["mvoice"] * 8 + ["comfyui"] * 4  # one swap, as for one client
    assert (r.stats.evictions, r.sims["mvoice"].unloads) == (1, 1)
    clients = r.broker.clients()
    assert (clients["a"]["jobs_total"], clients["b"]["jobs_total"]) == (8, 4)


async def test_a_job_held_back_by_a_stream_runs_once_overtaken_for_max_overtake_s(rig):
    """A steady stream of TTS jobs (resident: no swap) and one image job that needs a swap: the stream
    goes first, but only until the image has been overtaken for max_overtake_s."""

    def setup(raw: dict[str, Any]) -> None:
        raw["scheduler"]["max_overtake_s"] = 0.5
        for name in ("mvoice", "comfyui"):
            raw["consumers"][name]["priority"] = 2

    r = await rig(tweak=setup, sims={"mvoice": {"loaded": True, "work_s": 0.1}, "comfyui": {"work_s": 0.05}})
    stream = [asyncio.ensure_future(r.post("tts", {"text": "first"}))]
    await until(lambda: r.broker.scheduler.holder == "mvoice")
    image = asyncio.ensure_future(r.post("image", {"prompt": {}}))
    await until(lambda: len(r.broker.scheduler.queue()) == 1)
    started = time.monotonic()
    while not image.done() and time.monotonic() - started < 10:  # a TTS job every 50 ms
        stream.append(asyncio.ensure_future(r.post("tts", {"text": "more"})))
        await asyncio.sleep(0.05)
    assert (await image)[0] == 200
    for job in stream:
        assert (await job)[0] == 200

    def at(event: dict[str, Any]) -> float:
        return datetime.datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()

    grants = [e for e in recent_events(r.broker.events) if e["event"] == "granted"]
    image_at = next(i for i, e in enumerate(grants) if e["consumer"] == "comfyui")
    overtakers = grants[1:image_at]  # TTS jobs that came after the image and went before it
    assert len(overtakers) >= 2 and all(e["consumer"] == "mvoice" for e in overtakers)
    # Granted at the first grant after it had been overtaken for 0.5 s, not after the stream ended.
    assert at(grants[image_at]) - at(overtakers[0]) >= 0.5
    assert any(e["consumer"] == "mvoice" for e in grants[image_at + 1 :])


async def test_learned_timings_and_the_expected_waits_in_status_events_and_retry_after(rig):
    """What loads, unloads and jobs took (running medians) shows per consumer; each queued job has eta_s
    (status, the queued event), and a refusal's Retry-After is the wait the figures foresee."""

    def tight(raw):
        raw["scheduler"]["max_queue"] = 2
        raw["scheduler"]["queue_timeout_s"] = 2

    r = await rig(tweak=tight, sims={"mvoice": {"work_s": 0.3, "load_s": 0.2}, "comfyui": {"work_s": 0.1}})
    assert (await r.post("tts", {"text": "a"}))[0] == 200  # loads mvoice (0.2 s), then works
    assert (await r.post("tts", {"text": "b"}))[0] == 200
    await _render(r)  # evicts mvoice; comfyui loads itself on its first prompt (a cold start)
    st = (await r.status())["consumers"]
    mv, comfy = st["mvoice"]["timings"], st["comfyui"]["timings"]
    assert mv["load_s"] >= 0.2 and mv["job_s"] >= 0.3 and mv["unload_s"] is not None
    assert comfy["load_s"] is not None and comfy["job_s"] is None  # its only job was its cold start
    text = await (await r.session.get(r.url("/metrics"))).text()
    assert 'mgpumanager_job_seconds_count{consumer="mvoice"} 2' in text
    assert 'mgpumanager_load_seconds_count{consumer="mvoice"} 1' in text
    # A queue behind a render: each waiting job knows roughly when it will run.
    events = await r.session.get(r.url("/v1/events"))
    first = asyncio.ensure_future(r.post("tts", {"text": "c"}))  # mvoice again: a swap
    await until(lambda: r.broker.scheduler.holder == "mvoice")
    waiting = [asyncio.ensure_future(r.post("tts", {"text": str(i)})) for i in range(2)]
    await until(lambda: len(r.broker.scheduler.queue()) == 2)
    queue = (await r.status())["scheduler"]["queue"]
    etas = [q["eta_s"] for q in queue]
    assert etas == sorted(etas) and etas[1] >= mv["job_s"] > 0
    text = await (await r.session.get(r.url("/metrics"))).text()
    assert float(re.search(r'mgpumanager_queue_eta_seconds\{gpu="0"\} (\S+)', text)[1]) > 0
    status, headers, body = await r.post("tts", {"text": "one too many"})
    error_of(status, headers, body, "queue_full")
    assert int(headers["Retry-After"]) == max(1, math.ceil(etas[0]))
    queued = []
    while len(queued) < 3:
        queued += [e for e in await _read_events(events, "queued") if e["event"] == "queued"]
    # Each job's queued event has its eta_s: 0 for the one granted at once, the forecast's for those behind.
    assert queued[0]["eta_s"] == 0 and queued[2]["eta_s"] >= mv["job_s"] > 0
    for done in [first, *waiting]:
        assert (await done)[0] == 200
    # Each figure learned is an event too: the job's consumer, what, how long, and its figures now.
    learned = [e for e in await _read_events(events, "learned") if e["event"] == "learned"]
    while not any(e["what"] == "job" for e in learned):
        learned += [e for e in await _read_events(events, "learned") if e["event"] == "learned"]
    assert {(e["consumer"], e["what"]) for e in learned} >= {("comfyui", "unload"), ("mvoice", "load")}
    for e in learned:
        timings = (await r.status())["consumers"][e["consumer"]]["timings"]
        assert e["seconds"] >= 0 and set(e["timings"]) == set(timings) and e["timings"][e["what"] + "_s"]
    events.close()
    text = await (await r.session.get(r.url("/metrics"))).text()
    assert 'mgpumanager_queue_eta_seconds{gpu="0"} 0' in text  # nothing queued


@settings(
    max_examples=int(os.environ.get("MGPU_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=st.lists(INV_OPS, min_size=20, max_size=100), bound=st.sampled_from([0, 3, 30]))
def test_scheduler_invariants_hold_under_any_interleaving(ops, bound):
    asyncio.run(InvariantDriver(bound).run(ops))


@settings(max_examples=int(os.environ.get("MGPU_FUZZ_EXAMPLES", "150")) * 4, deadline=None)
@given(
    specs=st.lists(_POLICY_JOB, max_size=12),
    holder=st.one_of(st.none(), st.tuples(st.sampled_from("abcd"), st.booleans(), st.integers(0, 3))),
    warm=st.sets(st.sampled_from("abcd")),
    bound=st.sampled_from([0, 5, 30]),
    aging_s=st.sampled_from([1, 10, 60]),
    served=_SERVED,
)
def test_the_grant_order_keeps_its_rules(specs, holder, warm, bound, aging_s, served):
    """The pure grant order (next_grant), driven directly: never a higher effective priority passed
    over; among equals the fair order (the least-served client first, then arrival; arrival alone without
    clients); a job that needs a swap overtaken only by one that needs none, and none past a job
    overtaken for max_overtake_s (with 0, strict fair order); only the holder's own jobs join; and the few
    candidates the lock hands it (WaitQueue.candidates) give the same answer as every waiting job.

    (With fair share, "overtaken" and "once the bound applies" are stated against the fair order: then no
    job after the first overdue one goes, and a warm job before it still may; the oldest no longer goes
    regardless. Without clients and without aging across levels the two read the same.)"""
    now = 100.0
    jobs = [
        PolicyJob(
            i,
            c,
            p,
            a,
            exclusive=x,
            overtaken_since=min(o, a) if o is not None else None,
            cancelled=k,
            client=client,
        )
        for i, (c, p, a, x, o, k, client) in enumerate(specs)
    ]

    def fair(job: Any) -> tuple[float, float, int]:
        return m.fair_key(job, served)

    # As the lock keeps them: a grant marks every waiting job of its effective priority before it in the
    # fair order, so within a base priority and client an older job was overtaken no later than a younger.
    for level, client in itertools.product(range(m.PRIORITY_MAX + 1), POLICY_CLIENTS):
        earliest = math.inf
        mine = (j for j in jobs if j.priority == level and j.client == client)
        for job in sorted(mine, key=lambda j: (j.arrived, j.id), reverse=True):
            if job.overtaken_since is not None:
                earliest = min(earliest, job.overtaken_since)
            if earliest < math.inf:
                job.overtaken_since = min(job.overtaken_since or math.inf, earliest)
    view = None if holder is None else m.Holder(*holder)

    def is_warm(job: Any) -> bool:
        return job.consumer in warm

    kw = {"aging_s": aging_s, "max_overtake_s": bound, "warm": is_warm, "served": served}
    got = m.next_grant(jobs, view, now, **kw)
    live = [j for j in jobs if not j.granted.done()]
    if got is None:
        if view is None:
            assert not live
        return
    assert got in live
    eff = {j.id: m.effective_priority(j, now, aging_s) for j in live}  # type: ignore[arg-type]
    assert eff[got.id] == max(eff.values())  # never a higher effective priority passed over
    top = sorted((j for j in live if eff[j.id] == eff[got.id]), key=fair)
    first = top[0]
    # The first job overtaken for the bound, in the fair order (with 0: every job counts as such).
    cut = (
        0
        if bound == 0
        else next(
            (
                i
                for i, j in enumerate(top)
                if j.overtaken_since is not None and now - j.overtaken_since >= bound
            ),
            len(top),
        )
    )
    if got is not first:  # only a job that needs no swap (the holder's own, joining) overtakes, in time
        assert top.index(got) <= cut and not got.exclusive and (is_warm(got) or view is not None)
    if view is not None:
        assert not view.exclusive and view.room > 0 and got.consumer == view.consumer and not got.exclusive
        assert got is next(j for j in top if j.consumer == view.consumer)  # its first, in the fair order
    else:
        warm_allowed = [j for j in top[: cut + 1] if is_warm(j) and not j.exclusive]
        assert got is (warm_allowed[0] if warm_allowed else first)
    # The lock's few candidates decide alike (jobs in arrival order per level, as the queue keeps them).
    queue = m.WaitQueue()
    for job in sorted(jobs, key=lambda j: (j.arrived, j.id)):
        queue.append(job)  # type: ignore[arg-type]
    candidates = queue.candidates(is_warm, view.consumer if view else None)  # type: ignore[arg-type]
    assert m.next_grant(candidates, view, now, **kw) is got


async def test_the_jobs_queued_in_one_turn_of_the_loop_are_announced_from_one_forecast(monkeypatch):
    """Issue 21: each job's queued event played the whole queue forward for its eta_s, so N jobs arriving
    at once cost N plays of up to N jobs. The jobs queued in one turn of the loop are announced together
    after it, from one forecast, each with its own eta; a job granted at once needs no forecast."""
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    ops.states["x"].learned("job", 2.0)
    plays = []
    real = m.expected_waits

    def counting(*args: Any, **kwargs: Any) -> Any:
        plays.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(m, "expected_waits", counting)
    stream = s.events.subscribe()
    first = await s.acquire("t", "kt")  # granted at once
    waiting = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(20)]  # one turn: all 20
    await until(lambda: len(s.queue()) == 20)
    await asyncio.sleep(0)  # (the turn after theirs: the announcement)
    assert len(plays) == 1  # one forecast for the 20, none for the job granted at once
    queued = []
    while not stream.empty():
        event = json.loads(stream.get_nowait().partition(b"data: ")[2])
        queued += [event] if event["event"] == "queued" else []
    assert [e["eta_s"] for e in queued[:1]] == [0.0]  # t's, granted at once
    etas = [e["eta_s"] for e in queued[1:]]  # x's 20: each 2 s (x's learned job) after the one before
    assert len(etas) == 20 and all(b - a == pytest.approx(2.0) for a, b in itertools.pairwise(etas))
    first.release("completed")
    for task in waiting:
        (await task).release("completed")
    assert books_balance(s)


async def test_a_long_queues_queued_events_are_played_off_the_loop_and_each_still_comes_first(monkeypatch):
    """Issue 21: with 2,000 jobs waiting, the forecast for a turn's queued events held the event loop about
    20 ms at each turn of a burst, and /healthz with it. From FORECAST_OFF_LOOP waiting jobs on, it plays in
    a worker thread from a snapshot of the turn's end, with the etas the loop would have given; jobs queued
    meanwhile go with the next play; a job granted or leaving before its play is done gets its queued event
    first, alone (eta_s 0, or null: nobody played the queue for it), and once."""
    monkeypatch.setattr(m, "FORECAST_OFF_LOOP", 6)
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    ops.states["x"].learned("job", 2.0)
    gate, plays, real = threading.Event(), [], m.expected_waits

    def gated(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():  # (the loop's own plays run through)
            plays.append(threading.current_thread().name)
            assert gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(m, "expected_waits", gated)
    stream = s.events.subscribe()
    first = await s.acquire("t", "kt")  # granted at once: the x jobs wait behind it
    batch = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(8)]
    await until(lambda: len(plays) == 1)  # the turn's 8 play off the loop; the loop goes on meanwhile
    expected = dict(s.forecast())  # what the loop would give (the clock stands still)
    later = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(2)]
    await until(lambda: len(s.queue()) == 10)
    batch[3].cancel()  # leaves while its play is under way
    with pytest.raises(asyncio.CancelledError):
        await batch[3]
    first.release("completed")  # batch[0] is granted while its play is under way
    head = await asyncio.wait_for(batch[0], 5)
    gate.set()
    await until(lambda: len(plays) == 2 and s.lock.queued.play is None and not s.lock.queued.pending)
    events = []
    while not stream.empty():
        events.append(json.loads(stream.get_nowait().partition(b"data: ")[2]))
    queued = {e["job"]: e for e in events if e["event"] == "queued"}
    assert len(queued) == len([e for e in events if e["event"] == "queued"]) == 11  # each once
    ids = [j.id for j in expected]
    for job_id, then in ((ids[0], "granted"), (ids[3], "cancelled")):  # its queued event first
        assert [e["event"] for e in events if e["job"] == job_id][:2] == ["queued", then]
    assert queued[ids[0]]["eta_s"] == 0.0 and queued[ids[3]]["eta_s"] is None
    for job, eta in expected.items():  # the others: from the play, as the loop would have said
        if job.id not in (ids[0], ids[3]):
            assert queued[job.id]["eta_s"] == eta
    assert all(queued[j.id]["eta_s"] is not None for j in s.queue()[-2:])  # later's: from the second play
    assert all(name != threading.main_thread().name for name in plays)
    head.release("completed")
    for task in [*batch[1:3], *batch[4:], *later]:
        (await asyncio.wait_for(task, 5)).release("completed")
    assert books_balance(s)


async def test_the_forecast_plays_a_snapshot_of_who_waits_without_a_waiter_cancelled_before_it():
    """A waiter whose task was cancelled stays in the queue until its task runs again; a snapshot taken
    meanwhile is not to count it, and a play of that snapshot is not to change with what the loop settles
    afterwards (a grant), since it may run in a thread."""
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    ops.states["x"].learned("job", 2.0)
    first = await s.acquire("t", "kt")
    tasks = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(3)]
    await until(lambda: len(s.queue()) == 3)
    a, b, c = s.queue()
    tasks[0].cancel()  # (its future now; its task takes it off the queue at its next step)
    assert a in s.lock.waiting
    snap = m.queue_snapshot(s.lock, s.rooms, s.config)
    assert [(j, eta) for j, eta in m.expected_waits(snap)] == [(b, 1.0), (c, 3.0)]
    first.release("completed")  # b is granted: the snapshot still has it waiting
    assert b.granted.done() and [j for j, _ in m.expected_waits(snap)] == [b, c]
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    (await tasks[1]).release("completed")
    (await asyncio.wait_for(tasks[2], 5)).release("completed")
    assert books_balance(s)


@pytest.mark.catches_bug
async def test_a_bug_starting_a_play_off_the_loop_strands_no_queued_event(monkeypatch):
    """Starting a play off the loop (its snapshot, its task) raising (a bug): the turn's jobs are announced
    at once (eta_s null) and counted, and the jobs queued after them are played as ever, not left to wait
    for a turn that nothing would schedule any more."""
    monkeypatch.setattr(m, "FORECAST_OFF_LOOP", 3)
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    ops.states["x"].learned("job", 2.0)
    stream = s.events.subscribe()
    first = await s.acquire("t", "kt")
    monkeypatch.setattr(s.lock.queued, "start_play", _raising_once(s.lock.queued.start_play))
    batch = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(4)]
    await until(lambda: s.shared.internal_errors == 1)
    more = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(4)]
    await until(lambda: len(s.queue()) == 8 and not s.lock.queued.pending and s.lock.queued.play is None)
    events = []
    while not stream.empty():
        events.append(json.loads(stream.get_nowait().partition(b"data: ")[2]))
    etas = [e["eta_s"] for e in events if e["event"] == "queued"]
    assert etas[:5] == [0.0, None, None, None, None] and None not in etas[5:] and len(etas) == 9
    first.release("completed")
    for task in [*batch, *more]:
        (await asyncio.wait_for(task, 5)).release("completed")
    assert books_balance(s)


async def test_a_play_of_a_snapshot_does_not_change_with_an_overtaking_after_it():
    """Rule 4 reads when each job was first overtaken, which the loop marks at grants: a snapshot keeps
    the marks as they were, so its play (in a thread, maybe) gives what it would have given then."""
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    ops.states["z"].unloaded()
    ops.states["x"].learned("job", 2.0)
    ops.states["z"].learned("job", 2.0)
    first = await s.acquire("x", "kx")
    z = asyncio.ensure_future(s.acquire("z", "kz"))  # needs a swap: x's jobs, warm, overtake it
    await until(lambda: len(s.queue()) == 1)
    xs = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(30)]
    await until(lambda: len(s.queue()) == 31)
    snap = m.queue_snapshot(s.lock, s.rooms, s.config)
    before = m.expected_waits(snap)
    first.release("completed")  # the first x waiting goes before z: z is overtaken from now
    assert next(j for j in s.lock.waiting if j.consumer == "z").overtaken_since is not None
    assert m.expected_waits(snap) == before
    for task in [*xs, z]:
        (await asyncio.wait_for(task, 60)).release("completed")
    assert books_balance(s)


@pytest.mark.catches_bug
async def test_a_forecast_bug_while_announcing_loses_no_queued_event_and_stops_no_grant(monkeypatch):
    """The forecast for a turn's queued events raising (a bug): each job's queued event still goes out
    (eta_s null), the bug is counted, and the jobs are granted as ever."""
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    stream = s.events.subscribe()
    first = await s.acquire("t", "kt")
    monkeypatch.setattr(s, "forecast", _raising_once(s.forecast))
    waiting = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(3)]
    await until(lambda: len(s.queue()) == 3)
    await asyncio.sleep(0)
    events = []
    while not stream.empty():
        events.append(json.loads(stream.get_nowait().partition(b"data: ")[2]))
    assert [e["eta_s"] for e in events if e["event"] == "queued"][1:] == [None, None, None]
    assert s.shared.internal_errors == 1
    first.release("completed")
    for task in waiting:
        (await asyncio.wait_for(task, 5)).release("completed")
    assert books_balance(s)


def test_a_grant_looks_at_the_first_job_of_each_consumer_not_at_every_waiting_one():
    """Issue 21: a grant costs the same with 10 or 10,000 jobs waiting. 5,000 image jobs wait (their
    consumer not resident: each needs a swap), then one TTS job whose consumer is resident: the lock's
    candidates find the TTS job (warm first) asking "does it need a swap?" once per consumer, where a scan
    asked it of all 5,001."""
    queue = m.WaitQueue()
    for i in range(5000):
        queue.append(PolicyJob(i, "comfyui", 2, i / 1000))  # type: ignore[arg-type]
    tts = PolicyJob(5000, "mvoice", 2, 5.0)
    queue.append(tts)  # type: ignore[arg-type]
    asked: list[str] = []

    def warm(job: Any) -> bool:
        asked.append(job.consumer)
        return job.consumer == "mvoice"

    candidates = queue.candidates(warm, None)
    assert sorted(asked) == ["comfyui", "mvoice"]
    kw = {"aging_s": 60.0, "max_overtake_s": 30.0, "warm": warm}
    assert m.next_grant(candidates, None, 5.5, **kw) is tts
    # Taken off the front of its bucket, the next image job is the lane's first as before.
    queue.remove(tts)  # type: ignore[arg-type]
    assert [j.id for j in queue.candidates(warm, None)] == [0] and len(queue) == 5000


def test_marking_whom_a_grant_overtook_starts_where_the_last_mark_stopped(monkeypatch):
    """Issue 21: 2,000 jobs that need a swap wait while 50 warm ones overtake them one after the other.
    The first grant marks all 2,000 (their bound runs from then); the next ones look at each lane where the
    last mark stopped, not at the 2,000 again (the lock's dispatch once looked at every waiting job at each
    grant). The marks are those a look at every job gives."""
    queue = m.WaitQueue()
    cold = [PolicyJob(i, "comfyui", 2, i / 1000) for i in range(2000)]
    for job in cold:
        queue.append(job)  # type: ignore[arg-type]
    looked = 0
    real = m.effective_priority

    def counting(job: Any, now: float, aging_s: float) -> int:
        nonlocal looked
        looked += 1
        return real(job, now, aging_s)

    monkeypatch.setattr(m, "effective_priority", counting)
    for n in range(50):
        warm = PolicyJob(2000 + n, "mvoice", 2, 2.0 + n / 1000)
        queue.append(warm)  # type: ignore[arg-type]
        queue.remove(warm)  # type: ignore[arg-type]  (granted: off the queue, then the marks)
        queue.overtaken(warm, 3.0 + n, 600.0, None)  # type: ignore[arg-type]
    assert all(job.overtaken_since == 3.0 for job in cold)  # marked by the first, never moved
    assert looked <= 2000 + 2 * 50, looked  # (a look at every job: 50 x 2,000)
    # A younger cold job is marked by the next grant that overtakes it, from where the marks stopped.
    late = PolicyJob(9000, "comfyui", 2, 2.1)
    queue.append(late)  # type: ignore[arg-type]
    warm = PolicyJob(9001, "mvoice", 2, 2.2)
    queue.overtaken(warm, 60.0, 600.0, None)  # type: ignore[arg-type]
    assert late.overtaken_since == 60.0 and cold[0].overtaken_since == 3.0


@settings(max_examples=int(os.environ.get("MGPU_FUZZ_EXAMPLES", "150")) * 2, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["grant", "release", "ask"]), st.sampled_from(POLICY_CLIENTS), st.floats(0, 4)
        ),
        max_size=60,
    ),
    window=st.sampled_from([0.5, 3.0, 10.0, 100.0]),
)
def test_gpu_time_is_the_seconds_each_clients_slots_held_within_the_window(steps, window):
    """GpuTime (fair share's figure) against the plain sum: each slot's [grant, release] (or now, while held)
    clipped to the last ``window`` seconds, per client, several slots at once each counting."""
    use, now = m.GpuTime(), 0.0
    held: dict[str | None, list[float]] = {c: [] for c in POLICY_CLIENTS}
    spans: list[tuple[str | None, float, float]] = []
    for op, client, dt in steps:
        now += dt
        if op == "grant":
            use.granted(client, now, window)
            held[client].append(now)
        elif op == "release" and held[client]:
            use.released(client, now, window)
            spans.append((client, held[client].pop(0), now))
        elif op == "ask":  # (only some steps ask: the breakpoints are also forgotten on grants and releases)
            for c in POLICY_CLIENTS:
                mine = [(a, b) for who, a, b in spans if who == c] + [(a, now) for a in held[c]]
                expected = sum(max(0.0, b - max(a, now - window)) for a, b in mine)
                assert use.seconds(c, now, window) == pytest.approx(expected, abs=1e-6), (c, now)


@pytest.mark.skipif(not FUZZ_SECONDS, reason="`make fuzz` runs this for MGPU_FUZZ_SECONDS")
@pytest.mark.timeout(FUZZ_SECONDS + 300)
def test_fuzz_scheduler_invariants_and_config_for_a_while():
    """The property tests above, over and over with fresh random examples, until time is up."""
    examples = st.lists(INV_OPS, min_size=20, max_size=100)

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=examples, bound=st.sampled_from([0, 3, 30]))
    def scheduler_round(ops: list[tuple[Any, ...]], bound: float) -> None:
        asyncio.run(InvariantDriver(bound).run(ops))

    deadline, rounds = time.monotonic() + FUZZ_SECONDS, 0
    while time.monotonic() < deadline:
        scheduler_round()
        test_the_grant_order_keeps_its_rules()
        test_any_malformed_config_is_a_config_error_never_a_crash()
        rounds += 1
    print(
        f"fuzz: {rounds} rounds of 500 scheduler interleavings, the grant order's rules and 300 configs,"
        " no counter-example"
    )


async def test_an_eta_counts_only_the_unloads_of_consumers_on_its_own_gpu():
    """The forecast took every resident consumer the broker knows as one a swap would unload: with two
    GPUs, a job's eta_s (and Retry-After) on GPU 0 paid the unloads of GPU 1's consumers too."""
    s, _, ops, _ = make_scheduler(small_config(consumers__z__gpu=1))
    for name in ("t", "z"):
        ops.states[name].loaded()
        ops.states[name].learned("unload", 10.0)
    ops.states["x"].unloaded()
    ops.states["x"].learned("load", 1.0)
    holding = await s.acquire("t", "kt")
    first, second = await _queued(s, "x"), await _queued(s, "x")
    # The second waits for the first's swap: t's unload and x's load, not z's unload on GPU 1. (Both wait
    # for t's job, which has no learned time: at least m.RUNNING_FLOOR_S, never 0: issue 18.)
    assert [eta for _, eta in s.forecast()] == [1.0, 12.0]
    holding.release("completed")
    (await first).release("completed")
    (await second).release("completed")
    assert books_balance(s)


async def test_a_prompt_queued_behind_a_long_render_is_told_to_wait(rig):
    """Issue 18, as seen from ComfyUI's UI in front of the real server: a prompt queued behind a render
    that had run past ComfyUI's learned job time was told eta_s 0.0, then waited 52.7 s. A long render
    (mgpusim's ComfySim) counts as at least RUNNING_FLOOR_S more."""
    r = await rig(tweak=use_presets, sims={"comfyui": {"work_s": 0.05}})
    comfy = r.sims["comfyui"]
    await _render(r)  # a cold start: its load is learned
    await _render(r)  # its job time
    learned = r.broker.consumers.states["comfyui"].timing("job")
    comfy.work_s = 3600  # the next render is a long one
    async with r.session.post(r.url("/v1/image"), json={"prompt": {}}) as resp:
        assert resp.status == 200
    await until(lambda: r.broker.scheduler.holds == 1)
    await until(lambda: snapshot(r.broker.scheduler)["holder"]["held_s"] > learned)
    ui = asyncio.ensure_future(r.session.post(r.url("/c/comfyui/api/prompt"), json={"prompt": {}}))
    try:
        await until(lambda: len(r.broker.scheduler.queue()) == 1)
        (queued,) = (await r.status())["scheduler"]["queue"]
        assert queued["kind"] == "image_ui" and queued["eta_s"] >= m.RUNNING_FLOOR_S
    finally:
        ui.cancel()
        await asyncio.gather(ui, return_exceptions=True)
        await r.kill("comfyui")  # the render dies with it: its hold ends, the GPU is free
        await until(lambda: r.broker.scheduler.holder is None)


async def test_the_forecast_charges_a_swap_what_plan_room_would_unload_and_no_more():
    """The forecast asks plan_room what a swap unloads, on the GPU as the newest reading shows it: x fits
    beside t, so x's jobs pay its load, not t's unload (the forecast's own swap model unloaded every
    resident consumer that may not coexist: 10 s more). With no reading yet it takes nothing as free: then
    t goes, as plan_room decides for a full GPU."""
    s, gpu, ops, _ = make_scheduler(small_config())
    gpu.held["t"] = 4000
    ops.states["t"].loaded()
    ops.states["t"].learned("unload", 10.0)
    for name in ("x", "y", "z"):
        ops.states[name].unloaded()
    ops.states["x"].learned("load", 1.0)
    holding = await s.acquire("t", "kt")
    first, second = await _queued(s, "x"), await _queued(s, "x")
    # Both wait for t's job (no learned time: at least RUNNING_FLOOR_S); the second also for x's swap.
    assert [eta for _, eta in s.forecast()] == [1.0, 12.0]  # nothing read yet: none free
    await gpu.read_memory()  # 16384 - 480 - 4000 MiB free: x's 4000 + 256 fit beside t
    assert [eta for _, eta in s.forecast()] == [1.0, 2.0]
    holding.release("completed")
    (await first).release("completed")
    (await second).release("completed")
    assert ops.calls == [("load", "x")] and books_balance(s)


async def test_a_running_job_counts_as_at_least_what_it_has_run_plus_a_floor():
    """Issue 18: a holder that had run past its learned job time added 0 to the forecast, so a prompt
    queued behind a long render said eta_s 0.0 and then waited 52.7 s. It counts as at least
    RUNNING_FLOOR_S more."""
    s, _, ops, clock = make_scheduler(small_config())
    ops.states["t"].loaded()
    ops.states["t"].learned("job", 5.0)
    holding = await s.acquire("t", "kt")
    waiting = await _queued(s, "t")
    clock.now += 2
    assert [eta for _, eta in s.forecast()] == [3.0]  # the rest of its learned 5 s
    clock.now += 60  # a render far longer than usual
    assert [eta for _, eta in s.forecast()] == [m.RUNNING_FLOOR_S]
    holding.release("completed")
    (await waiting).release("completed")
    assert books_balance(s)


async def test_a_load_is_learned_as_the_load_alone_and_a_job_from_when_it_went_to_work():
    """Issue 18: a cold start's load time was what its job took from the grant, evictions before it
    included, and those unloads were learned on their own as well: a forecast counted them twice (3.88 s
    learned where the evictions took 3.26 s). A job's time, likewise, included its load. Each is learned
    once now: the unload from its start, the load alone, the job from when it went to work."""
    config = small_config()
    config = m.replace(
        config, consumers={**config.consumers, "t": m.replace(config.consumers["t"], load=None)}
    )  # t loads itself on its first request (ComfyUI)
    s, gpu, ops, clock = make_scheduler(config)
    crowd(gpu, ops, {"y": 1.0, "z": 2.0})  # x (never used) goes first
    real_unload, real_load = ops.unload, ops.load

    async def slow_unload(name: str) -> None:
        clock.now += 3.0
        await real_unload(name)

    async def slow_load(name: str) -> None:
        clock.now += 2.0
        await real_load(name)

    ops.unload, ops.load = slow_unload, slow_load  # type: ignore[method-assign]
    cold = await s.acquire("t", "kt")
    assert cold.cold and ops.calls == [("unload", "x")]
    clock.now += 5.0  # t loads its model and answers
    cold.release("completed", status=200, success=True)
    for _ in range(3):  # (learned once the GPU changed hands)
        await asyncio.sleep(0)
    assert (ops.states["x"].timing("unload"), ops.states["t"].timing("load")) == (3.0, 5.0)  # not 8.0
    # x comes back through its load route (2 s), after t's unload (3 s), then works for 1 s.
    job = await s.acquire("x", "kx")
    clock.now += 1.0
    job.release("completed", status=200, success=True)
    for _ in range(3):
        await asyncio.sleep(0)
    assert (ops.states["x"].timing("load"), ops.states["x"].timing("job")) == (2.0, 1.0)  # not 6.0
    assert books_balance(s)


async def test_a_jobs_time_counts_at_its_release_and_is_shown_after_the_hand_over():
    """The next forecast (and status) counts a job's time from its release on; its histogram and learned
    event, like the job's other metrics and its end event, come once the GPU changed hands."""
    s, _, ops, clock = make_scheduler(small_config())
    seen: list[str] = []
    s.recorder.events.listeners.append(lambda event: seen.append(event.name))
    job = await s.acquire("x", "kx")
    clock.now += 1.0
    job.release("completed", status=200, success=True)
    assert ops.states["x"].timing("job") == 1.0
    assert "mgpumanager_job_seconds_count" not in s.recorder.metrics.render([])
    assert "learned" not in seen and "finished" not in seen
    for _ in range(3):
        await asyncio.sleep(0)
    assert 'mgpumanager_job_seconds_count{consumer="x"} 1' in s.recorder.metrics.render([])
    assert seen[-2:] == ["finished", "learned"]


async def test_a_jobs_queue_wait_ends_at_its_grant_or_at_its_end_where_it_was_never_granted():
    """mgpumanager_queue_wait_seconds measures a job from its arrival to its grant: y waits the 2 s x holds
    the GPU, then runs 5 s, and waited 2 s (not 7). z, whose caller leaves after 3 s in the queue, was never
    granted: it waited until it left. (Found by a mutation audit: measuring every wait to the job's end
    failed no test.)"""
    s, _, _, clock = make_scheduler(small_config())
    x = await s.acquire("x", "kx")
    y_granted = asyncio.ensure_future(s.acquire("y", "ky"))
    await until(lambda: len(s.lock.waiting) == 1)
    clock.now += 2.0
    x.release("completed", status=200, success=True)
    y = await asyncio.wait_for(y_granted, 5)
    z_waiting = asyncio.ensure_future(s.acquire("z", "kz"))
    await until(lambda: len(s.lock.waiting) == 1)
    clock.now += 3.0
    z_waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await z_waiting
    clock.now += 2.0
    y.release("completed", status=200, success=True)
    metrics = s.recorder.metrics
    # (Its metrics come after the hand-over.)
    await until(lambda: 'mgpumanager_run_seconds_count{consumer="y"}' in metrics.render([]))
    families = _families(metrics.render([]))
    waits = {n: _value(families, "mgpumanager_queue_wait_seconds_sum", consumer=n) for n in "xyz"}
    assert waits == {"x": 0.0, "y": 2.0, "z": 3.0}
    assert _value(families, "mgpumanager_run_seconds_sum", consumer="y") == 5.0


# ---- found by a mutation audit of the lock core: each fails under a change that failed no test before --


def test_a_grant_marks_as_overtaken_only_the_jobs_of_its_own_effective_priority():
    """Found by a mutation audit of the lock core: marking whom a grant overtook without looking at their
    effective priority (a job of a lower one, before the granted job in the fair order, marked too) failed
    no test. Rule 1 put that job behind, nobody overtook it: its bound must not run from then. Marked, it
    counted as overtaken for max_overtake_s as soon as aging lifted it to the others' level, and a job
    that needs no swap could no longer go before it."""
    queue = m.WaitQueue()
    low = PolicyJob(0, "comfyui", 1, 0.0)  # needs a swap
    queue.append(low)  # type: ignore[arg-type]
    high = PolicyJob(1, "mvoice", 2, 1.0)
    queue.append(high)  # type: ignore[arg-type]
    queue.remove(high)  # type: ignore[arg-type]  (granted at 2 s: off the queue, then the marks)
    queue.overtaken(high, 2.0, 10.0, None)  # type: ignore[arg-type]
    assert low.overtaken_since is None
    # At 10 s aging lifts low to 2: a warm job of 2 still goes before it (low's bound starts then).
    warm = PolicyJob(2, "mvoice", 2, 9.0)
    queue.append(warm)  # type: ignore[arg-type]

    def is_warm(job: Any) -> bool:
        return job.consumer == "mvoice"

    kw = {"aging_s": 10.0, "max_overtake_s": 5.0, "warm": is_warm}
    assert m.next_grant(queue.candidates(is_warm, None), None, 10.0, **kw) is warm


async def test_a_job_of_the_holder_never_joins_past_an_exclusive_job_of_its_consumer():
    """Found by a mutation audit of the lock core: letting a later job of the holder's consumer join when
    that consumer's first waiting job is exclusive (the admin's unload of it) failed no test (the grant
    order's property test states it; its random examples seldom meet it). A join is the holder's first
    waiting job in the fair order or none (next_grant's rule 5): while t's unload waits, t's next job does
    not take t's free slot. (t's jobs have priority 4, an admin operation's, so the unload is not simply
    above them. Once the GPU is free, t's job, warm, goes before the unload, within max_overtake_s.)"""
    s, _, ops, _ = make_scheduler(small_config(consumers__t__max_concurrency=2, consumers__t__priority=4))
    ops.states["t"].loaded()
    first = await s.acquire("t", "kt")
    unload = asyncio.ensure_future(s.unload_now("t"))
    await until(lambda: len(s.queue()) == 1)
    second = await _queued(s, "t")
    assert not second.done() and s.slots == 1  # room for one more of t's, but t's first waiting is the unload
    first.release("completed")
    (await second).release("completed")
    await unload
    assert ops.calls == [("unload", "t")]
    assert books_balance(s)


async def _t_at_work_unloaded_y_then_z_waiting(s: m.Scheduler, ops: Any) -> m.Job:
    """t resident and at work (its job, returned); y's job, then z's, waiting, neither consumer resident."""
    ops.states["t"].loaded()
    for name in ("y", "z"):
        ops.states[name].unloaded()
    running = await s.acquire("t", "kt")
    await _queued(s, "y")
    await _queued(s, "z")
    return running


async def test_a_job_of_a_consumer_without_gpu_memory_needs_no_swap_even_unloaded():
    """Found by a mutation audit of the lock core: needs_no_swap without its first case (a consumer of
    vram_resident_mib 0 counted as needing no swap only while resident) failed no test. Such a consumer
    (whisper.cpp on the CPU) costs no swap, loaded or not: its job goes before an earlier one that needs
    a swap, as a resident consumer's does."""
    s, _, ops, clock = make_scheduler(small_config(consumers__z__vram_resident_mib=0))
    running = await _t_at_work_unloaded_y_then_z_waiting(s, ops)
    order = await _granted_in_turn(s, clock, running, job_s=1)
    assert [j.consumer for j in order] == ["z", "y"]


async def test_the_forecast_counts_a_job_that_may_stay_beside_the_holder_as_needing_no_swap():
    """Found by a mutation audit of the lock core: needs_no_swap without can_coexist_with (only the holder's
    own consumer warm beside it) failed no test: the lock grants with nobody holding, so only the forecast
    reads it. x, resident and allowed beside t, needs no swap while t holds: the forecast puts its job
    before y's earlier one that needs a swap, as the grants then go."""
    s, _, ops, clock = make_scheduler(small_config(consumers__x__can_coexist_with=["t"]))
    for name in ("t", "x"):
        ops.states[name].loaded()
    ops.states["y"].unloaded()
    running = await s.acquire("t", "kt")
    await _queued(s, "y")
    await _queued(s, "x")
    assert [j.consumer for j, _ in s.forecast()] == ["x", "y"]
    order = await _granted_in_turn(s, clock, running, job_s=1)
    assert [j.consumer for j in order] == ["x", "y"]


async def test_held_s_counts_from_when_the_holder_took_the_gpu_not_from_its_last_join():
    """Found by a mutation audit of the lock core: taking the lock's held_since at every grant (a join too),
    not when the holder took the free GPU, failed no test. /v1/status's holder.held_s is how long the
    holder has held the GPU (api.md), and the forecast counts the holder's time left from it: t, whose
    jobs take 10 s, took the GPU 5 s ago and was joined 1 s ago; x's job is expected in 5 s, not 9 s."""
    s, _, ops, clock = make_scheduler(small_config(consumers__t__max_concurrency=2))
    for name in ("t", "x"):
        ops.states[name].loaded()
    ops.states["t"].learned("job", 10.0)
    first = await s.acquire("t", "kt")
    clock.now += 4
    second = await s.acquire("t", "kt")  # joins
    clock.now += 1
    x = await _queued(s, "x")
    status = snapshot(s)
    assert status["holder"]["held_s"] == 5.0
    assert [(e["consumer"], e["eta_s"]) for e in status["queue"]] == [("x", 5.0)]
    first.release("completed")
    second.release("completed")
    (await x).release("completed")
    assert books_balance(s)


async def test_whether_a_waiting_job_needs_a_swap_follows_its_consumers_config_as_it_is_now():
    """Found by a mutation audit of the lock core: GpuLock.warm reading a waiting job's consumer config as it
    was when the job was queued (job.target), not as it is now, failed no test. A reload that moves z's
    model off the GPU (vram_resident_mib 0) makes z's waiting job one that needs no swap: it goes before
    y's earlier one, as a job of z queued after the reload would (jobs of one consumer alike, whenever
    queued: the queue's buckets rely on it)."""
    s, _, ops, clock = make_scheduler(small_config())
    running = await _t_at_work_unloaded_y_then_z_waiting(s, ops)
    s.shared.config = small_config(consumers__z__vram_resident_mib=0)  # a reload (as Broker.apply swaps it)
    order = await _granted_in_turn(s, clock, running, job_s=1)
    assert [j.consumer for j in order] == ["z", "y"]


async def test_queue_full_tells_when_the_first_waiting_job_is_expected_to_run():
    """Found by a mutation audit of the lock core: queue_full answered with Retry-After 1, whatever the
    queue, failed no test. It is the wait expected for the first waiting job: t's jobs take 10.3 s and the
    running one started 3 s ago, so the next is expected in 7.3 s: Retry-After 8."""
    s, _, ops, clock = make_scheduler(small_config(scheduler__max_queue=1))
    ops.states["t"].loaded()
    ops.states["t"].learned("job", 10.3)
    first = await s.acquire("t", "kt")
    waiting = await _queued(s, "t")
    clock.now += 3
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert (info.value.code, info.value.retry_after) == ("queue_full", 8)
    first.release("completed")
    (await waiting).release("completed")
    assert books_balance(s)


async def test_the_forecast_keeps_to_a_job_overtaken_for_max_overtake_s_as_the_grants_do():
    """Found by a mutation audit of the lock core: the queue's snapshot forgetting since when each job was
    overtaken (the forecast then let a warm job overtake without a bound) failed no test. y's job, overtaken
    by t's 31 s ago, goes next, before t's newer job that needs no swap; the forecast (/v1/status's queue,
    the queued events' eta_s, Retry-After) says so too."""
    s, _, ops, clock = make_scheduler(small_config(scheduler__max_overtake_s=30))
    ops.states["t"].loaded()
    ops.states["y"].unloaded()
    first = await s.acquire("t", "kt")
    await _queued(s, "y")
    second = await _queued(s, "t")
    first.release("completed")
    running = await second  # warm, it went before y's: y's is overtaken from now on
    clock.now += 31
    await _queued(s, "t")
    assert [j.consumer for j, _ in s.forecast()] == ["y", "t"]
    order = await _granted_in_turn(s, clock, running, job_s=1)
    assert [j.consumer for j in order] == ["y", "t"]


async def test_a_job_that_ended_is_off_the_count_at_work_and_lends_its_consumer_no_credit():
    """Found by a mutation audit of the lock core: GpuLock.release not taking a job off the count of jobs at
    work failed no test. That count lets the planner credit a target another job of it is at work on with
    the memory nobody accounts for (what that job has loaded since). Left over from t's first job, ended
    long ago, it made t's next job (t restarted unseen meanwhile, and a stranger came) take the stranger's
    8000 MiB for t's own: nothing was evicted, and t loaded itself where it did not fit."""
    cfg = small_config()
    t = dataclasses.replace(cfg.consumers["t"], load=None)  # t loads itself on its first request
    s, gpu, ops, _ = make_scheduler(dataclasses.replace(cfg, consumers={**cfg.consumers, "t": t}))
    gpu.held["x"] = 4000
    ops.states["x"].loaded()
    for name in ("t", "y", "z"):
        ops.states[name].unloaded()
    first = await s.acquire("t", "kt")  # 11,904 MiB free: nothing to evict
    gpu.held["t"] = 4000  # what it loaded for its request
    first.release("completed", status=200, success=True)
    del gpu.held["t"]  # it restarted behind the broker's back (its record in doubt); a stranger came
    ops.states["t"].touched("a health round was missed")
    gpu.held["someone's notebook"] = 8000  # 3,904 MiB free: t's 4000 do not fit beside x
    second = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "x")]
    second.release("completed", status=200, success=True)
    assert s.holder is None and books_balance(s)


async def test_a_warm_job_goes_before_an_earlier_exclusive_job_whose_consumer_is_resident():
    """Found by a mutation audit of the lock core: the queue's candidates taking as a lane's first warm job
    an exclusive one too (the admin's unload of a resident consumer, which never overtakes) failed no test:
    it hid the lane's warm job behind it, and the grant went by arrival. t's job (priority 4, an admin
    operation's: the same lane) needs no swap and goes before the earlier unload of y (rule 3, within
    max_overtake_s)."""
    s, _, ops, _ = make_scheduler(small_config(consumers__t__priority=4))
    for name in ("t", "x", "y"):
        ops.states[name].loaded()
    running = await s.acquire("x", "kx")
    unload = asyncio.ensure_future(s.unload_now("y"))
    await until(lambda: len(s.queue()) == 1)
    waiting = await _queued(s, "t")
    running.release("completed")
    job = await waiting
    assert ops.calls == [] and not unload.done()  # t's went first
    job.release("completed")
    await unload
    assert ops.calls == [("unload", "y")]
    assert books_balance(s)


def test_a_lane_that_drops_its_departed_front_still_marks_whom_a_grant_overtakes():
    """Found by a mutation audit of the lock core: WaitQueue.remove dropping a lane's departed front (past 64
    jobs) without moving its mark back by as many failed no test. The mark, left where it was, pointed past
    the lane's end: a job queued after that was never marked as overtaken, so a stream of warm jobs could
    pass it for ever (max_overtake_s never ran for it)."""
    queue = m.WaitQueue()
    early = [PolicyJob(i, "x", 2, float(i)) for i in range(65)]
    image = PolicyJob(65, "comfyui", 2, 65.0)  # needs a swap
    tts = [PolicyJob(66 + i, "mvoice", 2, 66.0 + i) for i in range(2)]
    for job in [*early, image, *tts]:
        queue.append(job)  # type: ignore[arg-type]
    queue.remove(tts[0])  # type: ignore[arg-type]  (granted at 100 s, before all the others)
    queue.overtaken(tts[0], 100.0, 1000.0, None)  # type: ignore[arg-type]
    assert all(j.overtaken_since == 100.0 for j in [*early, image])
    for job in early:  # granted in turn: 65 gone from the lane's front, which is dropped then
        queue.remove(job)  # type: ignore[arg-type]
    later = PolicyJob(67, "comfyui", 2, 67.0)
    last = PolicyJob(68, "mvoice", 2, 68.0)
    queue.append(later)  # type: ignore[arg-type]
    queue.append(last)  # type: ignore[arg-type]
    queue.remove(last)  # type: ignore[arg-type]  (granted at 101 s, before tts[1] and later)
    queue.overtaken(last, 101.0, 1000.0, None)  # type: ignore[arg-type]
    assert (image.overtaken_since, tts[1].overtaken_since, later.overtaken_since) == (100.0, 101.0, 101.0)


async def test_a_job_of_the_holder_that_needs_a_swap_joins_it_like_any_of_its_jobs():
    """Found by a mutation audit of the lock core: WaitQueue.candidates leaving out the holder's first job
    in each lane failed no test, as the holder's job is nearly always warm (found as the lane's first warm
    one). It is not while the holder's consumer is not known to be resident: t, loading itself on its first
    request (a cold start), has room for one more job; t's next one joins at once, before y's earlier one
    (rule 5), as next_grant over every waiting job says."""
    cfg = small_config(consumers__t__max_concurrency=2)
    t = m.replace(cfg.consumers["t"], load=None)  # t loads itself on its first request
    s, _, ops, clock = make_scheduler(m.replace(cfg, consumers={**cfg.consumers, "t": t}))
    for name in ("t", "y"):
        ops.states[name].unloaded()
    first = await s.acquire("t", "kt")
    y = await _queued(s, "y")
    second = await _queued(s, "t")
    assert ops.states["t"].resident is not True  # (so t's job needs a swap, as the lock sees it)
    assert second.done() and not y.done() and s.slots == 2
    (await second).release("completed")
    assert [j.consumer for j in await _granted_in_turn(s, clock, first, job_s=1)] == ["y"]
    assert books_balance(s)


async def test_of_two_warm_jobs_after_one_that_needs_a_swap_the_earlier_goes_first():
    """Found by a mutation audit of the lock core: WaitQueue.candidates taking a lane's last warm job (of its
    consumers' first ones) instead of its earliest failed no test. y's job needs a swap; x's and t's that
    came after it need none: x's goes first (rule 3: the first warm job in the fair order), then t's, then
    y's."""
    s, _, ops, clock = make_scheduler(small_config())
    for name in ("x", "t", "z"):
        ops.states[name].loaded()
    ops.states["y"].unloaded()
    running = await s.acquire("z", "kz")
    for name in ("y", "x", "t"):
        await _queued(s, name)
    assert [j.consumer for j in await _granted_in_turn(s, clock, running, job_s=1)] == ["x", "t", "y"]
    assert books_balance(s)


async def test_a_waiter_that_leaves_lets_the_holders_next_job_join_at_once():
    """Found by a mutation audit of the lock core: GpuLock.wait not dispatching after a waiter left failed no
    test. The admin's unload of t (exclusive), waiting, keeps t's next job from joining t (rule 5: t's first
    waiting job is the unload); when the admin gives up (the request cancelled), t's job joins at once, not
    when t's running job ends."""
    s, _, ops, _ = make_scheduler(small_config(consumers__t__max_concurrency=2, consumers__t__priority=4))
    ops.states["t"].loaded()
    first = await s.acquire("t", "kt")
    unload = asyncio.ensure_future(s.unload_now("t"))
    await until(lambda: len(s.queue()) == 1)
    second = await _queued(s, "t")
    assert not second.done()
    unload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unload
    for _ in range(5):
        await asyncio.sleep(0)
    assert second.done() and s.slots == 2
    (await second).release("completed")
    first.release("completed")
    assert ops.calls == [] and books_balance(s)


async def test_a_queue_timeout_lets_the_holders_next_job_join_at_once():
    """Found by a mutation audit of the lock core: GpuLock._expire not dispatching after it refused a job
    failed no test. The admin's unload of t (exclusive), waiting, keeps t's next job from joining t; when
    the unload's queue_timeout_s runs out, t's job joins at once, not when t's running job ends (by then its
    own queue_timeout_s has run out too)."""
    config = small_config(
        consumers__t__max_concurrency=2, consumers__t__priority=4, scheduler__queue_timeout_s=0.5
    )
    s, _, ops, _ = make_scheduler(config)
    ops.states["t"].loaded()
    first = await s.acquire("t", "kt")
    unload = asyncio.ensure_future(s.unload_now("t"))
    await until(lambda: len(s.queue()) == 1)
    second = await _queued(s, "t")  # (its queue timer starts after the unload's)
    with pytest.raises(m.BrokerError) as info:
        await asyncio.wait_for(unload, 5)
    assert info.value.code == "queue_timeout"
    for _ in range(5):
        await asyncio.sleep(0)
    assert second.done() and s.slots == 2
    (await second).release("completed")
    first.release("completed")
    assert ops.calls == [] and books_balance(s)


async def test_an_admin_operations_gpu_time_counts_for_no_client():
    """Found by a mutation audit of the lock core: GpuLock.dispatch counting an exclusive job's GPU time too
    failed no test. An admin operation holds the GPU for no client (GpuTime: exclusive jobs count for
    nobody); counted, it went to the callers without a token (client None), whose next job then went after
    a client's later one. Here the unload holds the GPU 50 s; the tokenless job, first, still goes first."""
    s, _, ops, clock = make_scheduler(small_config(auth=CLIENT_AUTH))
    for name in ("t", "y"):
        ops.states[name].loaded()
    ops.unload_behaviour["y"] = "gated"
    unload = asyncio.ensure_future(s.unload_now("y"))
    await until(lambda: ops.calls == [("unload", "y")])
    await _queued(s, "t")  # no client's
    await _queued(s, "t", "p")
    clock.now += 50
    ops.gate.set()
    await unload
    assert m.client_use(s, "p")["gpu_s_window"] == 0.0
    first = next(iter(s.lock.taken))
    order = [first, *await _granted_in_turn(s, clock, first, job_s=1)]
    assert [j.client for j in order] == [None, "p"]
    assert books_balance(s)


async def test_a_play_cancelled_at_shutdown_announces_the_jobs_queued_meanwhile(monkeypatch):
    """Found by a mutation audit of the lock core: QueuedEvents._played not announcing, after a play
    cancelled (the scheduler closing), the jobs queued while it was under way failed no test. Those jobs
    waited for the play's end to be announced; no play comes after a cancelled one, so they are announced
    then, from a forecast on the loop (the play's own jobs get theirs with eta_s null)."""
    monkeypatch.setattr(m, "FORECAST_OFF_LOOP", 3)
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    gate, real = threading.Event(), m.expected_waits

    def gated(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            assert gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(m, "expected_waits", gated)
    stream = s.events.subscribe()
    first = await s.acquire("t", "kt")
    batch = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(4)]
    await until(lambda: s.lock.queued.play is not None)
    more = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(2)]
    await until(lambda: len(s.queue()) == 6 and len(s.lock.queued.pending) == 2)
    try:
        await s.close()  # cancels the play under way, as at shutdown
        assert s.lock.queued.play is None and not s.lock.queued.pending
        events = []
        while not stream.empty():
            events.append(json.loads(stream.get_nowait().partition(b"data: ")[2]))
        etas = [e["eta_s"] for e in events if e["event"] == "queued"]
        assert etas[:5] == [0.0, None, None, None, None] and len(etas) == 7 and None not in etas[5:]
    finally:
        gate.set()
    first.release("completed")
    for task in [*batch, *more]:
        (await asyncio.wait_for(task, 5)).release("completed")
    assert books_balance(s)


@pytest.mark.catches_bug
async def test_a_play_off_the_loop_that_crashes_is_counted_and_its_jobs_announced(monkeypatch):
    """Found by a mutation audit of the lock core: QueuedEvents._played not recording a play that raised (a
    bug in the forecast, in its worker thread) failed no test. Its jobs get their queued events (eta_s
    null), and the bug is logged and counted, as one in a forecast on the loop is."""
    monkeypatch.setattr(m, "FORECAST_OFF_LOOP", 3)
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    real, plays = m.expected_waits, []

    def crashing(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            plays.append(1)
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(m, "expected_waits", crashing)
    stream = s.events.subscribe()
    first = await s.acquire("t", "kt")
    batch = [asyncio.ensure_future(s.acquire("x", "kx")) for _ in range(4)]
    await until(lambda: plays and s.lock.queued.play is None)
    events = []
    while not stream.empty():
        events.append(json.loads(stream.get_nowait().partition(b"data: ")[2]))
    assert [e["eta_s"] for e in events if e["event"] == "queued"] == [0.0, None, None, None, None]
    assert s.shared.internal_errors == 1
    first.release("completed")
    for task in batch:
        (await asyncio.wait_for(task, 5)).release("completed")
    assert books_balance(s)


async def test_the_forecast_counts_the_holders_consumer_as_loaded_during_its_cold_start():
    """Found by a mutation audit of the lock core: expected_waits not counting the holder's consumer as
    resident failed no test. During a cold start (t loads itself on its first request) the broker does not
    know t resident yet; t's next job will find it loaded all the same, so it costs no load (5 s learned):
    x's job, after it (max_overtake_s 0: the fair order), is expected when t's running job ends."""
    config = small_config(scheduler__max_overtake_s=0)
    t = m.replace(config.consumers["t"], load=None)  # t loads itself on its first request
    s, _, ops, clock = make_scheduler(m.replace(config, consumers={**config.consumers, "t": t}))
    ops.states["t"].unloaded()
    ops.states["t"].learned("load", 5.0)
    ops.states["x"].loaded()
    holding = await s.acquire("t", "kt")
    await _queued(s, "t")
    await _queued(s, "x")
    assert ops.states["t"].resident is not True
    assert [(j.consumer, eta) for j, eta in s.forecast()] == [("t", 1.0), ("x", 1.0)]
    await _granted_in_turn(s, clock, holding, job_s=1)
    assert books_balance(s)


async def test_the_forecast_plays_the_gpus_memory_forward_swap_after_swap():
    """Found by a mutation audit of the lock core: expected_waits not taking a load's memory off the free
    MiB, not giving a victim's back, not counting a victim as unloaded, or not stamping each consumer it
    plays as just used, each failed no test (its tests played one swap at most). Five jobs in the fair order
    (max_overtake_s 0) on a GPU with 11,904 MiB free beside t: x and y fit (1 s load each), z needs an
    eviction (t, the least recently used: 10 s unload), then t needs one (x: 20 s), then x (y: 30 s)."""
    s, gpu, ops, clock = make_scheduler(small_config(scheduler__max_overtake_s=0))
    gpu.held["t"] = 4000
    for i, name in enumerate(("t", "x", "y", "z")):
        if name != "t":
            ops.states[name].unloaded()
        ops.states[name].learned("unload", 10.0 * (i + 1))
        ops.states[name].learned("load", 1.0)
    ops.states["t"].loaded()
    ops.states["t"].last_used = clock.now
    holding = await s.acquire("t", "kt")
    await gpu.read_memory()
    for name in ("x", "y", "z", "t", "x"):
        await _queued(s, name)
    # Each eta: the holder's 1 s (RUNNING_FLOOR_S), then what each job before it paid (jobs take 0 s).
    expected = [("x", 1.0), ("y", 2.0), ("z", 3.0), ("t", 14.0), ("x", 35.0)]
    assert [(j.consumer, eta) for j, eta in s.forecast()] == expected
    await _granted_in_turn(s, clock, holding, job_s=1)
    assert books_balance(s)


async def test_the_forecast_counts_a_job_of_the_consumer_it_played_last_as_needing_no_swap():
    """Found by a mutation audit of the lock core: expected_waits keeping the holder it started from for
    every job it plays (``current`` never moved on) failed no test. Once x's first job is played, x holds
    the GPU: x's second job needs no swap and goes before y's earlier one, as the grants then go."""
    s, _, ops, clock = make_scheduler(small_config())
    ops.states["t"].loaded()
    for name in ("x", "y"):
        ops.states[name].unloaded()
    holding = await s.acquire("t", "kt")
    for name in ("x", "y", "x"):
        await _queued(s, name)
    assert [j.consumer for j, _ in s.forecast()] == ["x", "x", "y"]
    assert [j.consumer for j in await _granted_in_turn(s, clock, holding, job_s=1)] == ["x", "x", "y"]
    assert books_balance(s)


async def test_the_forecast_counts_an_admin_operations_time_for_no_client():
    """Found by a mutation audit of the lock core: expected_waits adding an exclusive job's time to its
    client's GPU time failed no test. The admin's unload of y (y's jobs take 5 s) counts for nobody, as the
    lock counts it: the tokenless job that came after it still goes before p's later one."""
    s, _, ops, clock = make_scheduler(small_config(auth=CLIENT_AUTH))
    for name in ops.states:
        ops.states[name].loaded()
    ops.states["y"].learned("job", 5.0)
    holding = await s.acquire("t", "kt", client="q")  # (q's: the tokenless callers have had no GPU time)
    unload = asyncio.ensure_future(s.unload_now("y"))
    await until(lambda: len(s.queue()) == 1)
    await _queued(s, "x")  # no client's
    await _queued(s, "x", "p")
    assert [(j.kind, j.client) for j, _ in s.forecast()] == [("unload", None), ("kx", None), ("kx", "p")]
    order = await _granted_in_turn(s, clock, holding, job_s=1)
    await unload
    assert [j.client for j in order if j.kind == "kx"] == [None, "p"]
    assert books_balance(s)


async def test_a_job_that_comes_after_the_lock_shut_down_is_refused_at_once():
    """Found by a mutation audit of the lock core: GpuLock.wait admitting a job after shut_down failed no
    test. While the broker drains (running jobs finish, bounded), a job that arrives then is answered
    shutting_down at once, even with the GPU free, and counted as refused: it never runs."""
    s, _, ops, _ = make_scheduler(small_config())
    s.lock.shut_down()
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("x", "kx")
    assert info.value.code == "shutting_down"
    assert s.holder is None and not s.queue() and ops.calls == []
    assert books_balance(s)


# ---- clients, end to end: the broker as a process, simulated consumers (issue 23) ----------------------


class GatedMvoice(mgpusim.MvoiceSim):
    """mvoice whose jobs wait while ``gate`` is clear before they work: a job holds the GPU until the test
    lets it go."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = asyncio.Event()
        self.gate.set()

    async def run_work(self, request: web.Request) -> None:
        await self.gate.wait()
        await super().run_work(request)


async def ring_events(session: aiohttp.ClientSession, daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's event ring, replayed (``/v1/events?since=900``), up to its ``: replayed N`` comment."""
    async with session.get(daemon.url("/v1/events?since=900"), headers=bearer(daemon.token)) as resp:
        assert resp.status == 200
        events = []
        while not (line := await asyncio.wait_for(resp.content.readline(), 10)).startswith(b": replayed"):
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
        return events


async def post_as(
    session: aiohttp.ClientSession, daemon: Daemon, kind: str, token: str | None, payload: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """``POST /v1/{kind}`` with ``token``: the answer's status, headers and body, within 120 s (a job the
    broker should have refused fails the test then, rather than wait for the queue's 300 s)."""
    body = payload if payload is not None else ({"prompt": {}} if kind == "image" else {"text": kind})
    limit = aiohttp.ClientTimeout(total=120)
    async with session.post(
        daemon.url(f"/v1/{kind}"), json=body, headers=bearer(token), timeout=limit
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def comfy_like(mib: int = 13000) -> dict[str, Any]:
    """A consumer's config for a ComfySim: images, held until /history tells (polled every 20 ms), /free."""
    return {
        "health": {"path": "/system_stats"},
        "paths": {
            "image": {
                "path": "/prompt",
                "hold_until": {"path": "/history/{prompt_id}", "poll_s": 0.02, "timeout_s": 30},
            }
        },
        "vram_resident_mib": mib,
        "unload": {"path": "/free", "body": {"free_memory": True}},
    }


async def test_a_clients_priority_puts_its_job_right_after_the_running_one_end_to_end(bed):
    """Issue 23: client batch (priority 0) keeps 30 TTS jobs queued, client wa (priority 4) sends one:
    wa's job is granted next, right after the running job. The job line and the events name the client."""
    b = await bed(total_mib=16384)
    mvoice = GatedMvoice("mvoice", b.gpu, loaded=True, work_s=0.005)
    await b.add(mvoice, mvoice_like(2800, "tts"), "tts")
    with_clients(b.raw)  # wa: priority 4, batch: priority 0; mvoice's own is 2
    async with b.daemon() as daemon:
        daemon.token = TOKEN
        mvoice.gate.clear()  # batch's first job holds the GPU until the gate opens
        batch = [asyncio.ensure_future(post_as(b.session, daemon, "tts", BATCH_TOKEN)) for _ in range(31)]
        await daemon.until(b.session, lambda st: len(st["scheduler"]["queue"]) == 30)
        wa = asyncio.ensure_future(post_as(b.session, daemon, "tts", WA_TOKEN))
        st = await daemon.until(b.session, lambda st: len(st["scheduler"]["queue"]) == 31)
        assert st["scheduler"]["queue"][0]["client"] == "wa" and st["scheduler"]["queue"][0]["priority"] == 4
        assert st["clients"]["batch"]["queued"] == 30 and st["clients"]["batch"]["running"] == 1
        (slot,) = st["scheduler"]["holder"]["slots"]
        assert (slot["client"], slot["hold"]) == ("batch", False)  # running: not a hold
        mvoice.gate.set()
        assert [a[0] for a in await asyncio.gather(wa, *batch)] == [200] * 32
        events = await ring_events(b.session, daemon)
    granted = [e["client"] for e in events if e["event"] == "granted"]
    assert granted == ["batch", "wa"] + ["batch"] * 30
    queued_at = next(i for i, e in enumerate(events) if e["event"] == "queued" and e["client"] == "wa")
    assert next(e for e in events[queued_at:] if e["event"] == "granted")["client"] == "wa"
    assert len(re.findall(r"msg=job .* client=wa$", daemon.log, re.M)) == 1
    assert len(re.findall(r"msg=job .* client=batch$", daemon.log, re.M)) == 31


def _grants_while_waiting(events: list[dict[str, Any]], client: str) -> list[list[float]]:
    """For each job of ``client``: the grants of other jobs while it waited, each as seconds since the first
    of them (by the broker's own timestamps): the job that ran when it came ended then, and it has been
    passed over since."""
    waits = []
    for i, e in enumerate(events):
        if e["event"] != "queued" or e["client"] != client:
            continue
        grants = []
        for later in events[i + 1 :]:
            if later["event"] == "granted" and later["job"] == e["job"]:
                break
            if later["event"] == "granted":
                grants.append(bench.parse_ts(later["ts"]))
        waits.append([t - grants[0] for t in grants])
    return waits


async def test_a_client_that_sends_a_few_jobs_waits_at_most_max_overtake_s_plus_one_job(bed):
    """Issue 23, at equal priority: client a keeps 40 TTS jobs queued (mvoice, resident); client b sends 5
    images over a few seconds (ComfyUI: each a swap away). Each of b's jobs is granted at the latest one job
    after it has waited max_overtake_s (scaled down to 1 s): b has had the least GPU time, so the bound
    counts against it, not a's 40 older jobs. (In arrival order, a's older jobs would all go first.)"""
    b = await bed(total_mib=16384)  # mvoice's 2800 MiB and ComfyUI's 13000 do not fit together
    await b.add(mgpusim.MvoiceSim("mvoice", b.gpu, loaded=True, work_s=0.02), mvoice_like(2800, "tts"), "tts")
    await b.add(mgpusim.ComfySim("comfyui", b.gpu, work_s=0.05, context_mib=0), comfy_like(), "image")
    b.raw["auth"] = client_auth(a={}, b={})
    b.raw["auth"]["token"] = TOKEN
    b.raw["scheduler"].update(max_overtake_s=1.0, max_queue=100)
    async with b.daemon() as daemon:
        daemon.token = TOKEN
        stop = asyncio.Event()

        async def keep_40_queued() -> int:
            sent = 0

            async def one() -> None:
                nonlocal sent
                while not stop.is_set():
                    status = (await post_as(b.session, daemon, "tts", "a-token-0123456789abc"))[0]
                    assert status == 200
                    sent += 1

            await asyncio.gather(*(one() for _ in range(41)))  # one running, 40 waiting
            return sent

        a = asyncio.ensure_future(keep_40_queued())
        await daemon.until(b.session, lambda st: st["clients"]["a"]["queued"] >= 35)
        images = []
        for _ in range(5):
            images.append(asyncio.ensure_future(post_as(b.session, daemon, "image", "b-token-0123456789abc")))
            await asyncio.sleep(1.5)
        assert [i[0] for i in await asyncio.gather(*images)] == [200] * 5
        stop.set()
        assert await a > 100
        events = await ring_events(b.session, daemon)
    waits = _grants_while_waiting(events, "b")
    assert len(waits) == 5
    # a's jobs, which need no swap, went first while b's waited (the bound is what let each go), unless one
    # of b's came while its previous one still had ComfyUI loaded (the last grant before it was b's): then
    # it needed no swap either, and as the least served it went first (a loaded machine does that) ...
    queued_b = [i for i, e in enumerate(events) if e["event"] == "queued" and e["client"] == "b"]
    before = [next(e for e in reversed(events[:i]) if e["event"] == "granted") for i in queued_b]
    assert all(len(g) > 1 or e["client"] == "b" for g, e in zip(waits, before, strict=True)), (
        [len(g) for g in waits],
        [e["client"] for e in before],
    )
    # ... but, once b's had been passed over for max_overtake_s, one more at most (the boundary's).
    late = [sum(t >= 1.0 for t in grants) for grants in waits]
    assert max(late) <= 1, (late, [round(g[-1], 2) for g in waits])


async def test_over_a_fair_window_of_saturation_neither_client_gets_more_than_two_thirds(bed):
    """Issue 23, at equal priority: client a keeps 40 TTS jobs queued and b 5, on the same consumer. Over
    the saturation (six fair windows, scaled down from 60 s to 1 s each), each gets about half of the GPU
    time, neither more than two thirds, as the broker's own counters (client_gpu_seconds_total) measure it.
    (In arrival order a would get some 40/45 of it.)"""
    b = await bed(total_mib=16384)
    await b.add(mgpusim.MvoiceSim("mvoice", b.gpu, loaded=True, work_s=0.01), mvoice_like(2800, "tts"), "tts")
    b.raw["auth"] = client_auth(a={}, b={})
    b.raw["auth"]["token"] = TOKEN
    b.raw["scheduler"].update(fair_window_s=1.0, max_queue=100)
    async with b.daemon() as daemon:
        daemon.token = TOKEN
        stop = asyncio.Event()

        async def keep_queued(client: str, n: int) -> None:
            async def one() -> None:
                while not stop.is_set():
                    status = (await post_as(b.session, daemon, "tts", f"{client}-token-0123456789abc"))[0]
                    assert status == 200

            await asyncio.gather(*(one() for _ in range(n)))

        clients = [asyncio.ensure_future(keep_queued("a", 41)), asyncio.ensure_future(keep_queued("b", 6))]
        await daemon.until(
            b.session, lambda st: st["clients"]["a"]["queued"] >= 30 and st["clients"]["b"]["queued"] >= 4
        )

        async def gpu_seconds() -> dict[str, float]:
            async with b.session.get(daemon.url("/metrics"), headers=bearer(TOKEN)) as resp:
                families = _families(await resp.text())
            return {c: _value(families, "mgpumanager_client_gpu_seconds_total", client=c) for c in "ab"}

        before = await gpu_seconds()
        await asyncio.sleep(6.0)  # six fair windows of saturation by both
        after = await gpu_seconds()
        st = await daemon.status(b.session)
        stop.set()
        await asyncio.gather(*clients)
    held = {c: after[c] - before[c] for c in "ab"}
    assert held["a"] > 0.5 and held["b"] > 0.5, held
    assert max(held.values()) <= 2 / 3 * sum(held.values()), held
    window = {c: st["clients"][c]["gpu_s_window"] for c in "ab"}  # the last window, as status shows it
    assert max(window.values()) <= 2 / 3 * sum(window.values()), window


async def test_max_queued_gives_client_queue_full_to_that_client_alone_end_to_end(bed):
    """Issue 23: batch may queue 3; its next job gets client_queue_full (429, retryable, Retry-After), while
    wa's still queue in the room max_queue has left, and are served."""
    b = await bed(total_mib=16384)
    mvoice = GatedMvoice("mvoice", b.gpu, loaded=True, work_s=0.005)
    await b.add(mvoice, mvoice_like(2800, "tts"), "tts")
    with_clients(b.raw, batch={"max_queued": 3}, wa={"priority": 0})
    async with b.daemon() as daemon:
        daemon.token = TOKEN
        mvoice.gate.clear()
        batch = [asyncio.ensure_future(post_as(b.session, daemon, "tts", BATCH_TOKEN)) for _ in range(4)]
        await daemon.until(b.session, lambda st: st["clients"]["batch"]["queued"] == 3)
        status, headers, body = await post_as(b.session, daemon, "tts", BATCH_TOKEN)
        error = error_of(status, headers, body, "client_queue_full")
        assert "client batch has 3 jobs waiting" in error["message"] and int(headers["Retry-After"]) >= 1
        wa = [asyncio.ensure_future(post_as(b.session, daemon, "tts", WA_TOKEN)) for _ in range(3)]
        st = await daemon.until(b.session, lambda st: st["clients"]["wa"]["queued"] == 3)
        assert st["clients"]["batch"] | {"gpu_s_window": 0} == {
            "queued": 3,
            "running": 1,
            "jobs_total": 1,  # the refused one
            "gpu_s_window": 0,
            "priority": 0,
            "max_queued": 3,
        }
        # ps shows it so: whom the holder works for, and each client's running and queued jobs apart.
        shown = m.render_ps(st, time.time())
        assert re.search(r"held by mvoice: 1 job \(for batch\), for ", "\n".join(shown)), shown
        start = next(i for i, line in enumerate(shown) if line.startswith("CLIENT"))
        rows = {line.split()[0]: line.split() for line in shown[start + 1 :] if line.strip()}
        assert rows["batch"][3:5] == ["1", "3"] and rows["wa"][3:5] == ["0", "3"], rows
        mvoice.gate.set()
        assert [r[0] for r in await asyncio.gather(*batch, *wa)] == [200] * 7
        async with b.session.get(daemon.url("/metrics"), headers=bearer(TOKEN)) as resp:
            families = _families(await resp.text())
    jobs = "mgpumanager_client_jobs_total"
    assert _value(families, jobs, client="batch", status="rejected") == 1
    assert _value(families, jobs, client="batch", status="completed") == 4
    assert _value(families, jobs, client="wa", status="completed") == 3
    with pytest.raises(KeyError):
        _value(families, jobs, client="wa", status="rejected")


@no_overfill
async def test_the_mixed_burst_split_between_two_clients_keeps_its_one_swap_end_to_end(bed):
    """Issue 23, the broker as a process: issue 12's burst (8 TTS and 4 images at equal priority, interleaved
    T T I T I T T I T I T T, on a GPU where mvoice and ComfyUI do not fit together), a sending the TTS jobs
    and b the images, queued behind a's first TTS job. Once a's first job has run, b has had less GPU time,
    so b's images come first in the fair order; but a's jobs need no swap, so they still go first: the TTS
    batch, one swap, the images, as for one client (the burst's finishing time within 1.3x of its lower
    bound is bench.py's measurement 8, which plays it split between two clients too)."""
    b = await bed(total_mib=16000)  # 2800 + 13000 MiB do not fit beside the driver's 480
    mvoice = GatedMvoice("mvoice", b.gpu, loaded=True, work_s=0.01)
    await b.add(mvoice, mvoice_like(2800, "tts"), "tts")
    await b.add(mgpusim.ComfySim("comfyui", b.gpu, work_s=0.02, context_mib=0), comfy_like(), "image")
    b.raw["auth"] = client_auth(a={}, b={})
    b.raw["auth"]["token"] = TOKEN
    tokens = {"T": "a-token-0123456789abc", "I": "b-token-0123456789abc"}
    async with b.daemon() as daemon:
        daemon.token = TOKEN
        mvoice.gate.clear()  # a's first TTS job holds the GPU while the burst queues behind it
        first = asyncio.ensure_future(post_as(b.session, daemon, "tts", tokens["T"]))
        await daemon.until(b.session, lambda st: st["scheduler"]["holder"] is not None)
        burst = []
        for i, kind in enumerate("TTITITTITITT"):
            path = "tts" if kind == "T" else "image"
            burst.append(asyncio.ensure_future(post_as(b.session, daemon, path, tokens[kind])))
            await daemon.until(b.session, lambda st, i=i: len(st["scheduler"]["queue"]) == i + 1)
        st = await daemon.status(b.session)
        assert [q["client"] for q in st["scheduler"]["queue"][:4]] == ["a"] * 4  # the forecast's order too
        mvoice.gate.set()
        assert [r[0] for r in await asyncio.gather(first, *burst)] == [200] * 13
        st = await daemon.until(b.session, lambda st: st["scheduler"]["holder"] is None)
        events = await ring_events(b.session, daemon)
    nothing_overfilled(b.gpu)
    granted = [(e["consumer"], e["client"]) for e in events if e["event"] == "granted"]
    assert granted == [("mvoice", "a")] * 9 + [("comfyui", "b")] * 4  # one swap, as for one client
    assert (st["scheduler"]["stats"]["evictions"], mvoice.unloads) == (1, 1)
    assert (st["clients"]["a"]["jobs_total"], st["clients"]["b"]["jobs_total"]) == (9, 4)


async def test_a_reload_that_removes_a_client_ends_its_queued_job_and_lets_the_others_run(bed):
    """Issue 23, the broker as a process: batch's job holds the GPU and wa's waits when a reload removes wa.
    The reload closes wa's connection (its token is gone): its job leaves the queue, counted cancelled (its
    client line too), and never reaches the consumer; batch's job, whose token stays, ends normally, and
    wa's token is refused from then on."""
    b = await bed(total_mib=16384)
    mvoice = GatedMvoice("mvoice", b.gpu, loaded=True, work_s=0.005)
    await b.add(mvoice, mvoice_like(2800, "tts"), "tts")
    with_clients(b.raw)
    async with b.daemon() as daemon:
        daemon.token = TOKEN
        mvoice.gate.clear()
        running = asyncio.ensure_future(post_as(b.session, daemon, "tts", BATCH_TOKEN, {"text": "batch"}))
        await daemon.until(b.session, lambda st: st["clients"]["batch"]["running"] == 1)
        waiting = asyncio.ensure_future(post_as(b.session, daemon, "tts", WA_TOKEN, {"text": "wa"}))
        await daemon.until(b.session, lambda st: st["clients"]["wa"]["queued"] == 1)
        del b.raw["auth"]["clients"]["wa"]
        daemon.config.write_text(yaml.safe_dump(b.raw, sort_keys=False))
        async with b.session.post(daemon.url("/v1/reload"), headers=bearer(TOKEN)) as resp:
            assert resp.status == 200
            changes = (await resp.json())["changes"]
        assert (
            "removed client wa" in changes
            and "closed 1 connection authenticated with a revoked token" in changes
        )
        with pytest.raises(aiohttp.ClientConnectionError):
            await asyncio.wait_for(waiting, 10)
        st = await daemon.until(b.session, lambda st: st["scheduler"]["stats"]["cancelled"] == 1)
        assert st["scheduler"]["queue"] == [] and set(st["clients"]) == {"batch"}
        mvoice.gate.set()
        assert (await running)[0] == 200
        assert (await post_as(b.session, daemon, "tts", WA_TOKEN))[0] == 401
        async with b.session.get(daemon.url("/metrics"), headers=bearer(TOKEN)) as resp:
            families = _families(await resp.text())
    assert [rec.body for rec in mvoice.records if rec.path == "/api/synthesize"] == [b'{"text": "batch"}']
    assert _value(families, "mgpumanager_client_jobs_total", client="wa", status="cancelled") == 1
    assert _value(families, "mgpumanager_client_jobs_total", client="batch", status="completed") == 1
    assert len(re.findall(r"msg=job .* status=cancelled .* client=wa$", daemon.log, re.M)) == 1


# =====================================================================================================
# 5. Eviction and loading
# Making room, unload and load routes and commands, idle unload, preload.
# =====================================================================================================


# ---- the plan: plan_room, a pure function of a snapshot (no event loop, no sockets) ----------------


def _room_snapshot(
    cfg: m.Config, free_mib: int, views: dict[str, dict[str, Any]] | None = None, **snap: Any
) -> m.RoomSnapshot:
    """t is the target; every consumer not resident unless ``views`` says otherwise."""
    consumers = {
        name: m.ConsumerView(c, **{"resident": False, **(views or {}).get(name, {})})
        for name, c in cfg.consumers.items()
    }
    return m.RoomSnapshot("t", consumers, free_mib, cfg.gpu.cushion_mib, **snap)


def _without_unload(cfg: m.Config, *names: str) -> m.Config:
    """The config with these consumers' unload taken away (the loader would want their load gone too)."""
    consumers = {
        n: dataclasses.replace(c, unload=None) if n in names else c for n, c in cfg.consumers.items()
    }
    return dataclasses.replace(cfg, consumers=consumers)


def _all_resident(**last_used: float | None) -> dict[str, dict[str, Any]]:
    return {name: {"resident": True, "last_used": last_used.get(name)} for name in ("x", "y", "z")}


def test_plan_nothing_to_do_when_the_target_fits():
    plan = m.plan_room(_room_snapshot(small_config(), 4256, _all_resident()))
    assert plan.fits and plan.victims == () and plan.need_mib == 4000 + 256 and not plan.exhausted


def test_plan_least_recently_used_first_and_only_as_many_as_the_figures_need():
    cfg = small_config()
    views = _all_resident(x=3.0, y=1.0, z=2.0)
    assert m.plan_room(_room_snapshot(cfg, 300, views)).victims == ("y",)  # 300 + 4000 >= 4256
    assert m.plan_room(_room_snapshot(cfg, 0, views)).victims == ("y", "z")
    # Never used counts as oldest; ties go to the consumer listed first.
    assert m.plan_room(_room_snapshot(cfg, 0, _all_resident(z=1.0))).victims == ("x", "y")
    # The same snapshot gives the same plan.
    assert m.plan_room(_room_snapshot(cfg, 0, views)) == m.plan_room(_room_snapshot(cfg, 0, views))


def test_plan_says_why_each_other_consumer_is_no_victim():
    cfg = _without_unload(small_config(consumers__x__can_coexist_with=["t"]), "z")
    views = {
        "x": {"resident": True},
        "y": {"resident": True, "jobs": 1},
        "z": {"resident": True},
    }
    plan = m.plan_room(_room_snapshot(cfg, 0, views))
    assert plan.victims == () and not plan.fits
    assert plan.why_not == {"x": "may coexist with t", "y": "has jobs running", "z": "no unload route"}
    tried = m.plan_room(_room_snapshot(cfg, 0, {"y": {"resident": None}}, tried={"y": "unloaded"}))
    assert tried.why_not["y"] == "unloaded"
    measured = {"y": {"resident": False, "used_mib": 700}}
    assert (
        m.plan_room(_room_snapshot(cfg, 0, measured)).why_not["y"]
        == "not resident (its processes hold 700 MiB)"
    )


def test_plan_a_vram_managed_consumer_only_as_the_last_resort():
    cfg = small_config(consumers__x__vram_managed=True)
    views = _all_resident(x=1.0, y=2.0, z=3.0)  # x is the least recently used, yet the last to go
    assert m.plan_room(_room_snapshot(cfg, 300, views)).victims == ("y",)
    assert m.plan_room(_room_snapshot(cfg, -8000, views)).victims == ("y", "z", "x")
    without_unload = _without_unload(cfg, "x")
    plan = m.plan_room(_room_snapshot(without_unload, -8000, views))
    assert plan.victims == ("y", "z") and plan.why_not == {"x": "vram_managed"}


def test_plan_uses_what_is_measured_over_what_is_declared():
    cfg = small_config()
    # The target was seen holding 5000 MiB once (declared 4000): it needs room for 5000.
    assert (
        m.plan_room(_room_snapshot(cfg, 5000, {"t": {"resident": False, "peak_mib": 5000}})).need_mib == 5256
    )
    # Its processes hold 3000 already (a restarted service's context, a partial load): 1000 more to go.
    assert m.plan_room(_room_snapshot(cfg, 0, {"t": {"resident": None, "used_mib": 3000}})).need_mib == 1256
    # A victim measured at 1000 MiB frees 1000, not its declared 4000: one more victim is planned.
    views = _all_resident(x=1.0, y=2.0, z=3.0)
    views["x"]["used_mib"] = 1000
    assert m.plan_room(_room_snapshot(cfg, 3300, views)).victims == ("x",)
    assert m.plan_room(_room_snapshot(cfg, 3000, views)).victims == ("x", "y")


#: t (4000 MiB) as the target beside x, y and z (4000 each, resident): t's record, the snapshot's other
#: fields, then the MiB it needs. The GPU shows 15000 used: 3000 that no consumer accounts for.
TARGET_ROWS = {
    "trusted: nothing to do": ({"resident": True, "trusted": True}, {}, 0),
    # Issue 18: in doubt (it was asked and could not tell), the 3000 nobody claims are not credited to it
    # (they were: need 1256, and a consumer that lied about itself was overfilled).
    "in doubt: its full size": ({"resident": True}, {}, 4256),
    "in doubt, restarted (the GPU shows only the others)": ({"resident": True}, {"used_mib": 12000}, 4256),
    "the broker loads it itself: its full size": ({"resident": True}, {"loads_target": True}, 4256),
    # A job of it at work already made room for all of it: what shows up since is most likely its load.
    "a job of it at work: credited with the 3000": ({"resident": None}, {"target_working": 1}, 1256),
    # In doubt and at work: credited all the same (a mutation audit: charging it its own size, its record
    # taken for memory it holds besides the reading's, failed no test).
    "in doubt, a job of it at work: credited with the 3000": (
        {"resident": True},
        {"target_working": 1},
        1256,
    ),
    "a job of it at work, a restart seen": (
        {"resident": None},
        {"target_working": 1, "used_mib": 12000},
        4256,
    ),
    "a job of it at work, loaded by the broker": (
        {"resident": None},
        {"target_working": 1, "loads_target": True},
        4256,
    ),
    "measured: what its processes do not hold yet": ({"resident": True, "used_mib": 3000}, {}, 1256),
}


@pytest.mark.parametrize(("view", "snap", "need"), TARGET_ROWS.values(), ids=TARGET_ROWS)
def test_plan_what_the_target_needs(view, snap, need):
    views = {**_all_resident(x=1.0), "t": view}
    plan = m.plan_room(_room_snapshot(small_config(), 0, views, **{"used_mib": 15000, **snap}))
    assert plan.need_mib == need


#: Whom the figures charge with the reading's used memory, and what is left nobody's (issue 18): x, y, z and
#: t of 4000 MiB each (t not resident, a job of it at work), the others' records, the reading's used MiB,
#: then what is unclaimed and t's credit. One of unknown residency is charged at most what is left, never
#: its size on top of it.
UNCLAIMED_ROWS = {
    "all accounted for": ({"x": True, "y": True, "z": True}, 12000, 0, 0),
    "a stranger's 3000": ({"x": True, "y": True, "z": True}, 15000, 3000, 3000),
    "one unknown takes what is left": ({"x": True, "y": True, "z": None}, 15000, 3000, 3000),
    "one unknown is charged only what is left": ({"x": True, "y": True, "z": None}, 10000, 0, 0),
    "two unknowns share what is left": ({"x": True, "y": None, "z": None}, 9000, 0, 0),
    "not resident: nothing": ({"x": False, "y": False, "z": False}, 5000, 5000, 4000),
    "measured: what it holds": ({"x": {"resident": False, "used_mib": 700}}, 5000, 4300, 4000),
    "no used figure: nothing known, nothing credited": ({"x": True}, None, 0, 0),
}


@pytest.mark.parametrize(
    ("records", "used", "unclaimed", "credit"), UNCLAIMED_ROWS.values(), ids=UNCLAIMED_ROWS
)
def test_memory_no_record_accounts_for_is_nobodys(records, used, unclaimed, credit):
    views = {name: rec if isinstance(rec, dict) else {"resident": rec} for name, rec in records.items()}
    views["t"] = {"resident": False}
    snap = _room_snapshot(small_config(), 0, views, used_mib=used, target_working=1)
    assert m.unclaimed_mib(snap.consumers, snap.used_mib) == unclaimed
    assert m.plan_room(snap).need_mib == 4256 - credit


def test_plan_charges_two_of_unknown_residency_only_what_the_reading_leaves_between_them():
    """Two victims of unknown residency (nothing measures them) share the 3000 MiB that the reading's used
    memory leaves once x's 4000 are counted: unloading y is expected to free 3000, z nothing, so x goes
    too (a mutation audit: each of them charged all that is left, the plan counting on 6000 from y and z and
    stopping short, failed no test)."""
    views = {**_all_resident(x=3.0, y=1.0, z=2.0), "t": {"resident": False}}
    views["y"]["resident"] = views["z"]["resident"] = None
    plan = m.plan_room(_room_snapshot(small_config(), 0, views, used_mib=7000))
    assert plan.victims == ("y", "z", "x") and plan.expected_mib == 7000


def test_plan_the_target_itself_last_when_its_residency_is_unknown_or_in_doubt():
    cfg = _without_unload(small_config(), "x", "y", "z")
    views = {**_all_resident(), "t": {"resident": None}}
    assert m.plan_room(_room_snapshot(cfg, 0, views)).victims == ("t",)
    assert m.plan_room(_room_snapshot(cfg, 0, views, tried={"t": "unloaded"})).victims == ()
    measured = {**views, "t": {"resident": None, "used_mib": 0}}  # measured: it holds nothing to unload
    assert m.plan_room(_room_snapshot(cfg, 0, measured)).victims == ()
    # Issue 18: recorded resident but in doubt (asked, it could not tell), it may hold nothing, or be what
    # fills the GPU. Trusted, it needs no room at all.
    doubt = {**views, "t": {"resident": True}}
    assert m.plan_room(_room_snapshot(cfg, 0, doubt, used_mib=15000)).victims == ("t",)
    trusted = {**views, "t": {"resident": True, "trusted": True}}
    assert m.plan_room(_room_snapshot(cfg, 0, trusted, used_mib=15000)).fits
    # Never while another job of it is at work (jobs counts this one too): that job uses what it holds.
    for doubtful in ({"resident": None}, {"resident": True}):
        busy = {**views, "t": {**doubtful, "jobs": 2}}
        assert m.plan_room(_room_snapshot(cfg, 0, busy, used_mib=15000, target_working=1)).victims == ()


def test_plan_stops_after_max_evictions():
    cfg = small_config()
    plan = m.plan_room(_room_snapshot(cfg, 0, _all_resident(), tried={"x": "unloaded"}, max_evictions=1))
    assert plan.exhausted and plan.victims == ()


def _two_candidates(raw: dict[str, Any]) -> None:
    """whisper (no unload route) as the target; mvoice (listed first) and comfyui as its victims."""
    raw["consumers"]["mvoice"]["can_coexist_with"] = ["ollama"]
    raw["routing"]["stt"] = "whisper"
    raw["scheduler"]["vram_wait_s"] = 0.3
    raw["consumers"]["mvoice"]["unload"]["timeout_s"] = 0.3
    raw["consumers"]["comfyui"]["unload"]["timeout_s"] = 0.3


def _whisper_as_a_service(r_home: Path, port: int) -> Any:
    """A tweak: whisper is a process of its own, stopped and started with mgpusim's stop and start."""
    pidfile = r_home / "whisper.pid"
    sim = [PY, str(HERE / "mgpusim.py")]

    def tweak(raw: dict[str, Any]) -> None:
        whisper = raw["consumers"]["whisper"]
        whisper["url"] = f"http://127.0.0.1:{port}"
        whisper["unload"] = {"command": [*sim, "stop", "--pidfile", str(pidfile)], "timeout_s": 30}
        start = [*sim, "start", "--pidfile", str(pidfile), "--state", str(r_home / "gpu.json")]
        start += ["--log", str(r_home / "whisper.log"), f"whisper=whisper:{port},loaded=true"]
        whisper["load"] = {"command": start, "timeout_s": 30}
        raw["routing"]["stt"] = "whisper"

    return tweak


async def _what_commands_inherit(tmp_path: Path) -> tuple[list[str], list[str], bool]:
    """The descriptors of a command and of a service it started in the background, its output redirected,
    while another command runs and the broker holds a descriptor without CLOEXEC; and whether that command
    returned without waiting for the service."""
    leak_read, leak_write = os.pipe()
    os.set_inheritable(leak_write, True)  # as a library might leave one: still not the child's business
    pidfile = tmp_path / "service.pid"
    service = None
    try:
        other = asyncio.ensure_future(m.run_process(["sleep", "0.5"], 5))
        await asyncio.sleep(0.05)
        listing = await m.run_process(["sh", "-c", "ls /proc/$$/fd"], 5)
        script = f"setsid sleep 30 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}"
        started = await m.run_process(["sh", "-c", script], 5)
        returned_at_exit = not other.done()  # it did not wait PIPE_GRACE_S for the service
        await other
        service = int(pidfile.read_text())
        service_fds = sorted(os.listdir(f"/proc/{service}/fd"))
        assert listing.returncode == started.returncode == 0
        return sorted(listing.stdout.decode().split()), service_fds, returned_at_exit
    finally:
        os.close(leak_read)
        os.close(leak_write)
        if service is not None:
            os.kill(service, signal.SIGKILL)


async def test_resident_target_reads_no_gpu_and_unloads_nothing():
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {})
    ops.states["t"].loaded()
    job = await s.acquire("t", "kt")
    assert gpu.reads == [] and ops.calls == []
    job.release("completed", status=200, success=True)
    assert s.holder is None and books_balance(s)


async def test_lru_victim_is_unloaded_then_target_loaded():
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {"x": 3.0, "y": 1.0, "z": 2.0})
    job = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "y"), ("load", "t")]
    assert (s.stats.evictions, s.stats.loads, job.evictions) == (1, 1, 1)
    assert ops.states["y"].resident is False and ops.states["t"].resident is True
    job.release("completed", status=200, success=True)
    assert ops.states["t"].last_used is not None


async def test_never_used_loses_first_and_ties_go_to_config_order():
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {"x": 5.0})  # y and z never used: y is listed first
    job = await s.acquire("t", "kt")
    assert ops.calls[0] == ("unload", "y")
    job.release("completed")


async def test_coexistent_consumer_is_never_picked_even_when_least_recently_used():
    s, gpu, ops, _ = make_scheduler(small_config(consumers__t__can_coexist_with=["x"]))
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    job = await s.acquire("t", "kt")
    assert ops.calls[0] == ("unload", "y")
    job.release("completed")


async def test_a_vram_managed_consumer_is_not_picked_while_another_can_go():
    s, gpu, ops, _ = make_scheduler(small_config(consumers__x__vram_managed=True))
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    job = await s.acquire("t", "kt")
    assert ops.calls[0] == ("unload", "y")
    job.release("completed")


async def test_a_target_of_unknown_residency_is_unloaded_itself_when_nothing_else_can_go():
    # After a restart: t holds most of the GPU, but the broker does not know it (no `loaded` in health).
    s, gpu, ops, _ = make_scheduler(small_config(consumers__t__vram_resident_mib=12000))
    gpu.held["t"] = 12000
    for name in ("x", "y", "z"):
        ops.states[name].unloaded()
    job = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "t"), ("load", "t")] and s.stats.evictions == 1
    job.release("completed")
    # Known not resident, it is not unloaded again: the job waits for room as usual.
    ops.states["t"].unloaded()
    del gpu.held["t"]
    gpu.held["x"] = 8000
    ops.states["x"].loaded()
    job = await s.acquire("t", "kt")
    assert ops.calls[2:] == [("unload", "x"), ("load", "t")]
    job.release("completed")


async def test_failing_unload_moves_on_to_the_next_candidate():
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.unload_behaviour["x"] = "fail"
    job = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "x"), ("unload", "y"), ("load", "t")]
    assert (s.stats.unload_failures, s.stats.evictions) == (1, 1)
    assert ops.states["x"].resident is None  # unknown after a failed unload
    job.release("completed")


@pytest.mark.catches_bug
async def test_a_bug_in_an_unload_is_a_counted_scheduler_error_not_the_consumers_unload_failed():
    """Found by a review: a bug in the broker's own unload or load call was taken for the consumer's
    failure (unload_failed, its message the exception's), with no traceback and no count. It is one bug
    now, counted once: the job ends as scheduler_error; the victim's residency is unknown, as after any
    unload that may or may not have freed anything."""
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.unload_behaviour["x"] = "bug"
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert info.value.code == "scheduler_error" and "a bug in the broker's own call" in info.value.message
    assert s.shared.internal_errors == 1 and s.stats.unload_failures == 0
    assert ops.calls == [("unload", "x")] and ops.states["x"].resident is None
    assert s.holder is None and books_balance(s)


@pytest.mark.catches_bug
async def test_a_bug_in_a_load_is_a_counted_scheduler_error_not_the_consumers_load_failed():
    """The load's side of the test above."""
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {})

    async def load(name: str) -> None:
        raise TypeError("a bug in the broker's own load call")

    ops.load = load  # type: ignore[method-assign]
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert (
        info.value.code == "scheduler_error" and "a bug in the broker's own load call" in info.value.message
    )
    assert s.shared.internal_errors == 1 and s.stats.load_failures == 0
    assert ops.states["t"].resident is None and s.holder is None and books_balance(s)


async def test_nothing_evictable_is_insufficient_vram_naming_processes_and_reasons():
    cfg = small_config(consumers__x__vram_managed=True, consumers__t__can_coexist_with=["y"])
    cfg.consumers["x"] = m.replace(cfg.consumers["x"], unload=None)  # Ollama without its unload
    cfg.consumers["z"] = m.replace(cfg.consumers["z"], unload=None)
    s, gpu, ops, _ = make_scheduler(cfg)
    crowd(gpu, ops, {})
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    e = info.value
    assert (e.code, e.status, e.retryable, e.consumer) == ("insufficient_vram", 503, True, "t")
    assert "3904 MiB free, 4256 MiB needed" in e.message
    assert "x (vram_managed)" in e.message and "y (may coexist with t)" in e.message
    assert "z (no unload route)" in e.message
    assert "pid 100 /usr/bin/x 4000 MiB (x)" in e.message  # each process with its owner
    assert ops.calls == [] and s.holder is None and s.stats.failed == 1 and books_balance(s)


async def test_a_vram_managed_consumer_with_an_unload_goes_last_and_only_if_the_others_are_not_enough():
    """Ollama (vram_managed) with its unload: evicted only as the last resort, after every other candidate."""
    cfg = small_config(consumers__x__vram_managed=True)
    s, gpu, ops, _ = make_scheduler(cfg)
    crowd(gpu, ops, {"y": 5.0, "z": 6.0})  # x was never used: plain LRU would pick it first
    job = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "y"), ("load", "t")]  # y was enough; x kept its models
    job.release("completed", success=True)
    # Now t needs more than y and z together can give: x goes too, and last.
    cfg2 = small_config(consumers__x__vram_managed=True, consumers__t__vram_resident_mib=12000)
    s, gpu, ops, _ = make_scheduler(cfg2)
    crowd(gpu, ops, {"y": 5.0, "z": 6.0})
    job = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "y"), ("unload", "z"), ("unload", "x"), ("load", "t")]
    job.release("completed", success=True)


async def test_a_scheduler_evicts_only_on_its_own_gpu():
    """x and z are resident on GPU 0 and least recently used; t on GPU 1 may only evict y, its neighbour."""
    cfg = small_config(consumers__t__gpu=1, consumers__y__gpu=1)
    clock, gpu1 = FakeClock(), FakeGpu(total=8000)  # GPU 1: y's 4000 leave 3520 < t's 4256
    ops = FakeOps(cfg, gpu1, clock)
    s1 = m.Scheduler(m.Shared(cfg), gpu1, ops, clock=clock, sleep=clock.sleep, index=1)
    gpu1.held["y"] = 4000
    for name, last in (("x", 1.0), ("y", 5.0), ("z", 2.0)):
        ops.states[name].loaded()
        ops.states[name].last_used = last
    ops.states["t"].unloaded()
    reading = await gpu1.read_memory()
    job0 = s1.admit("t", "kt")
    snap = s1.rooms.snapshot(job0, reading, {})
    assert list(snap.consumers) == ["t", "y"]  # x and z are not even considered
    assert m.plan_room(snap).victims == ("y",)
    s1.end(job0, "cancelled")
    job = await s1.acquire("t", "kt")
    assert ops.calls == [("unload", "y"), ("load", "t")] and job.evictions == 1
    assert ops.states["x"].resident is True and ops.states["z"].resident is True
    job.release("completed", success=True)
    # A job for a consumer of GPU 0 is not this scheduler's to run.
    with pytest.raises(m.BrokerError, match="x runs on GPU 0 now") as info:
        await s1.acquire("x", "kx")
    assert info.value.code == "no_consumer" and books_balance(s1)


async def test_a_consumer_of_zero_mib_needs_no_room_and_no_gpu_reading():
    """A consumer whose memory is elsewhere (another host's broker) is served even without a GPU here."""
    s, gpu, ops, _ = make_scheduler(small_config(consumers__t__vram_resident_mib=0))
    gpu.error = "nvidia-smi: not found"
    job = await s.acquire("t", "kt")
    assert gpu.reads == [] and ops.calls == [] and s.holder == "t"
    job.release("completed", success=True)
    with pytest.raises(m.BrokerError, match="cannot read the GPU"):
        await s.acquire("x", "kx")  # the others still need the GPU read


async def test_max_evictions_bounds_the_attempts():
    s, gpu, ops, _ = make_scheduler(small_config(scheduler__max_evictions=2))
    crowd(gpu, ops, {})
    for name in ("x", "y", "z"):
        ops.unload_behaviour[name] = "fail"
    with pytest.raises(m.BrokerError, match="gave up after 2 unload attempts"):
        await s.acquire("t", "kt")
    assert len(ops.calls) == 2 and s.stats.unload_failures == 2 and s.holder is None


async def test_memory_is_polled_with_readings_of_its_own_until_it_shows_up_free():
    s, gpu, ops, clock = make_scheduler(small_config())
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.unload_behaviour["x"] = 3  # frees its memory on the fourth reading after the unload
    t0 = clock.now
    job = await s.acquire("t", "kt")
    assert gpu.reads == ["memory"] * 5  # one reading before, four after: the GPU line alone
    assert ops.calls == [("unload", "x"), ("load", "t")]
    assert clock.now - t0 == pytest.approx(3 * m.VRAM_POLL_S)  # polled every 50 ms, no fixed sleep
    job.release("completed")


async def test_polling_stops_once_most_of_the_victims_memory_is_free_then_evicts_more():
    cfg = small_config(consumers__t__vram_resident_mib=9000)  # needs two victims
    s, gpu, ops, clock = make_scheduler(cfg)
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    gpu.held["x"] = 3500  # x frees 3500 of its declared 4000: 87% counts as freed
    t0 = clock.now
    job = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "x"), ("unload", "y"), ("load", "t")]
    assert clock.now - t0 < s.config.scheduler.vram_wait_s  # did not wait for the full fit
    assert s.stats.evictions == 2
    job.release("completed")


async def test_unload_that_never_frees_waits_vram_wait_s_then_tries_the_next():
    s, gpu, ops, clock = make_scheduler(small_config(scheduler__vram_wait_s=1))
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.unload_behaviour["x"] = "keep"
    t0 = clock.now
    job = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "x"), ("unload", "y"), ("load", "t")]
    assert 1.0 <= clock.now - t0 < 1.2
    job.release("completed")


async def test_an_unload_that_frees_part_of_its_memory_leaves_its_residency_unknown():
    """Within vram_wait_s a victim freed some of its memory, too little to call it unloaded: it may still be
    freeing the rest, or hold it for good, so its residency is unknown (a later reading or probe tells),
    never "not resident", which would make it no victim again. One that freed nothing was most likely not
    resident (unmeasured, its residency was a guess)."""
    s, gpu, ops, _ = make_scheduler(
        small_config(scheduler__vram_wait_s=1, consumers__t__vram_resident_mib=8000)
    )
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.unload_behaviour["x"] = ("keep_mib", 2000)  # half of its 4000 MiB comes free: t still does not fit
    job = await s.acquire("t", "kt")
    assert ops.calls == [("unload", "x"), ("unload", "y"), ("load", "t")]
    assert ops.states["x"].resident is None and ops.states["y"].resident is False
    job.release("completed")
    s, gpu, ops, _ = make_scheduler(
        small_config(scheduler__vram_wait_s=1, consumers__t__vram_resident_mib=8000)
    )
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.unload_behaviour["x"] = "keep"
    job = await s.acquire("t", "kt")
    assert ops.states["x"].resident is False  # (and FakeGpu still counts its 4000 MiB: y and z went)
    assert ops.calls == [("unload", "x"), ("unload", "y"), ("unload", "z"), ("load", "t")]
    job.release("completed")


async def test_gpu_error_is_gpu_unavailable():
    s, gpu, _, _ = make_scheduler(small_config())
    gpu.error = "nvidia-smi exited with status 15: Unknown Error"
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert info.value.code == "gpu_unavailable" and "Unknown Error" in info.value.message
    assert s.holder is None and books_balance(s)


async def test_failing_load_is_load_failed_and_state_unknown():
    s, _, ops, _ = make_scheduler(small_config())
    ops.states["t"].unloaded()
    ops.load_fails.add("t")
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert (info.value.code, info.value.status) == ("load_failed", 502)
    assert ops.states["t"].resident is None and s.holder is None and s.stats.failed == 1


async def test_target_of_unknown_state_without_pressure_is_not_loaded():
    s, gpu, ops, _ = make_scheduler(small_config())
    job = await s.acquire("t", "kt")  # unknown residency, plenty of room: cold start on first request
    assert ops.calls == [] and gpu.reads == ["memory"]
    job.release("completed", status=200, success=True)
    assert ops.states["t"].resident is True


async def test_a_known_unloaded_consumer_is_never_a_victim():
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.states["x"].unloaded()  # the broker unloaded it; its memory is something else's now
    job = await s.acquire("t", "kt")
    assert ops.calls[0] == ("unload", "y")
    job.release("completed")


async def test_a_client_leaving_during_an_eviction_does_not_cut_the_unload():
    """Making room belongs to the scheduler: the victim's unload runs to its end, then the job ends
    cancelled (nothing more is unloaded or loaded for it), and the victim's state is what the unload did."""
    s, gpu, ops, _ = make_scheduler(small_config(consumers__t__vram_resident_mib=9000))
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.unload_behaviour["x"] = "gated"
    task = await _queued(s, "t")
    task.cancel()  # the client leaves while x is being unloaded
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and s.holder == "t" and s.stats.cancelled == 0  # the unload runs on
    waiter = await _queued(s, "y")
    ops.gate.set()
    await until(waiter.done)
    assert ops.calls == [("unload", "x")] and ops.states["x"].resident is False  # y, z stay; t not loaded
    assert s.stats.cancelled == 1 and s.stats.evictions == 1 and ops.states["t"].resident is False
    waiter.result().release("completed")
    assert s.holder is None and books_balance(s)


async def test_comfyui_evicted_to_fit_mvoice_one_unload_one_load(rig):
    r = await rig(sims={"comfyui": {"loaded": True, "release_s": 0.05}, "mvoice": {"loaded": False}})
    assert r.gpu.free_mib() == 16384 - 480 - 13000  # 2904 MiB: mvoice's 2800 + 256 do not fit
    status, _, body = await r.post("tts", {"text": "hi"})
    assert status == 200 and body.startswith(b"RIFF")
    comfy, mvoice = r.sims["comfyui"], r.sims["mvoice"]
    assert (comfy.unloads, mvoice.loads) == (1, 1)
    assert [rec.path for rec in mvoice.records] == ["/api/admin/load", "/api/synthesize"]
    assert comfy.records[-1].path == "/free" and json.loads(comfy.records[-1].body) == {"free_memory": True}
    assert (r.stats.evictions, r.stats.loads, r.stats.unload_failures) == (1, 1, 0)
    st = await r.status()
    assert st["consumers"]["comfyui"]["loaded"] is False and st["consumers"]["mvoice"]["loaded"] is True


@pytest.mark.parametrize("path", ["/v1/image", "/c/comfyui/prompt"])
async def test_image_job_evicts_mvoice_and_holds_until_history(rig, caplog, path):
    """/v1/image, and ComfyUI's own /prompt through its mount, which takes the image path's hold."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    r.sims["comfyui"].may_finish.clear()  # it renders until the test has looked
    async with r.session.post(r.url(path), json={"prompt": {"1": {}}}) as resp:
        assert resp.status == 200
        prompt_id = (await resp.json())["prompt_id"]
    assert r.sims["mvoice"].unloads == 1 and r.stats.evictions == 1
    # The client has its answer; the render goes on and the hold keeps the next job out.
    st = await r.status()
    assert st["scheduler"]["holder"].items() >= {"consumer": "comfyui", "jobs": 0, "holds": 1}.items()
    # Its slot is the hold's (answered, the GPU still taken), not a running job's.
    slots = st["scheduler"]["holder"]["slots"]
    assert [(slot["kind"], slot["client"], slot["hold"]) for slot in slots] == [("image", None, True)]
    tts = asyncio.ensure_future(r.post("tts", {"text": "after"}))
    await status_until(r, lambda st: len(st["scheduler"]["queue"]) == 1)  # it waits for the render
    await until(lambda: any(rec.path == f"/history/{prompt_id}" for rec in r.sims["comfyui"].records))
    r.sims["comfyui"].may_finish.set()
    status, _, _ = await tts
    assert status == 200
    render = r.sims["comfyui"].work[0]
    synth = next(rec for rec in r.sims["mvoice"].records if rec.path == "/api/synthesize")
    assert render.end is not None and synth.start >= render.end
    history = [rec for rec in r.sims["comfyui"].records if rec.path == f"/history/{prompt_id}"]
    assert len(history) >= 2  # polled while empty, then once non-empty
    await until(lambda: len(job_lines(caplog)) == 2)
    assert " kind=image " in job_lines(caplog)[0] and "hold_ms=" in job_lines(caplog)[0]


async def test_failing_load_route_is_load_failed(rig):
    r = await rig(sims={"comfyui": {"loaded": True}, "mvoice": {"loaded": False}})
    r.sims["mvoice"].faults["load_status"] = 500
    status, headers, body = await r.post("tts", {"text": "x"})
    assert "load answered 500" in error_of(status, headers, body, "load_failed")["message"]
    assert r.sims["comfyui"].unloads == 1 and r.broker.scheduler.holder is None
    assert (await r.status())["consumers"]["mvoice"]["loaded"] is None


async def test_insufficient_vram_end_to_end_names_the_gpu_processes(rig):
    # Whisper (no unload route) and ollama (vram_managed) fill the GPU; comfyui cannot fit.
    def short_wait(raw: dict[str, Any]) -> None:
        raw["scheduler"]["vram_wait_s"] = 0.2  # for comfyui's unload, which frees nothing

    r = await rig(
        sims={"whisper": {"loaded": True, "vram_mib": 5000}, "ollama": {"loaded": True}}, tweak=short_wait
    )
    status, headers, body = await r.post("image", {"prompt": {}})
    data = error_of(status, headers, body, "insufficient_vram")
    assert "/usr/local/bin/whisper-server 5000 MiB (no consumer)" in data["message"]
    assert "/usr/local/bin/ollama 8000 MiB (no consumer)" in data["message"]  # nobody says which is whose
    assert "whisper (no unload route)" in data["message"] and "ollama (vram_managed)" in data["message"]
    # Its own residency unknown, comfyui was unloaded first as the last resort; the job never reached it.
    assert [rec.path for rec in r.sims["comfyui"].records] == ["/free"]


async def test_two_gpus_run_jobs_in_parallel_and_evict_each_on_its_own(rig):
    """GPU 0: ollama and whisper; GPU 1: mvoice (resident) and comfyui, which must evict mvoice."""

    def two_gpus(raw: dict[str, Any]) -> None:
        for name in ("mvoice", "comfyui"):
            raw["consumers"][name]["gpu"] = 1
        raw["consumers"]["mvoice"]["can_coexist_with"] = []

    r = await rig(
        gpus=2,
        sims={
            "mvoice": {"loaded": True, "gpu": 1},
            "comfyui": {"gpu": 1, "work_s": 0.05},
            "ollama": {"lines": 200, "line_interval_s": 0.05},
            "whisper": {"loaded": True},
        },
        tweak=two_gpus,
    )
    gpu0, gpu1 = r.broker.schedulers[0], r.broker.schedulers[1]
    assert r.gpu.free_mib(1) == 16384 - 480 - 2800  # 13104 < comfyui's 13000 + 256
    async with r.session.post(r.url("/v1/llm"), json={"model": "m", "prompt": "p"}) as stream:
        await stream.content.readline()
        assert gpu0.holder == "ollama"
        queries0 = r.broker.gpus[0].queries
        # GPU 1 does not wait for GPU 0's job: the image job evicts, loads, renders and holds meanwhile.
        status, _, body = await r.post("image", {"prompt": {}})
        assert status == 200 and "prompt_id" in json.loads(body)
        await until(lambda: gpu1.holder is None)
        assert gpu0.holder == "ollama" and not stream.content.at_eof()
        assert r.broker.gpus[0].queries == queries0  # GPU 1's eviction read GPU 1 only
        during = await r.status()
    assert r.sims["mvoice"].unloads == 1 and r.gpu.used_mib("mvoice") == 0
    assert r.gpu.used_mib("ollama") == 8000 and r.gpu.used_mib("whisper") == 1500
    assert r.sims["ollama"].unloads == 0 and r.sims["whisper"].unloads == 0
    assert (gpu1.stats.evictions, gpu1.stats.completed, gpu0.stats.evictions) == (1, 1, 0)
    by_index = {g["index"]: g for g in during["gpus"]}
    assert by_index[0]["consumers"] == ["ollama", "whisper"]
    assert by_index[1]["consumers"] == ["mvoice", "comfyui"]
    assert by_index[0]["scheduler"]["holder"]["consumer"] == "ollama"
    assert by_index[1]["scheduler"]["holder"] is None
    # Each GPU read by its own index (the reading may be up to a second old: not its free figure).
    assert [by_index[i]["uuid"] for i in (0, 1)] == [mgpusim.gpu_uuid(0), mgpusim.gpu_uuid(1)]
    assert mgpusim.WhisperSim.process_name in {p["name"] for p in by_index[0]["processes"]}
    assert not {p["name"] for p in by_index[0]["processes"]} & {
        mgpusim.MvoiceSim.process_name,
        mgpusim.ComfySim.process_name,
    }
    assert r.gpu.free_mib(1) == 16384 - 480 - 13000
    assert during["gpu"]["index"] == 0 and during["consumers"]["comfyui"]["gpu"] == 1
    # One sequence of job ids for both GPUs: "job 1" in the log names one job (each GPU counted its own).
    queued = [e.fields for _, e in r.broker.events.ring if e.name == "queued"]
    assert sorted((q["gpu"], q["job"]) for q in queued) == [(0, 1), (1, 2)]


@no_overfill
async def test_ollama_keeping_its_model_is_asked_to_let_go_for_an_image(rig):
    """Issue 11, case 5: after an LLM answer Ollama keeps its model (keep_alive, 5 minutes); an image job
    then needs its memory. Ollama (vram_managed) is unloaded as the last resort, through its /api/ps list
    (what `ollama stop` does), and the image runs."""

    r = await rig(tweak=use_presets, sims={"comfyui": REAL_COMFY})
    sim = r.sims["ollama"]
    assert (await r.post("llm", {"model": "llama3", "prompt": "why", "stream": False}))[0] == 200
    assert list(sim.models) == ["llama3"] and r.gpu.used_mib("ollama") == 8000  # kept after the answer
    prompt_id = await _render(r)
    nothing_overfilled(r.gpu)
    assert prompt_id in r.sims["comfyui"].finished
    unloads = [json.loads(rec.body) for rec in sim.records if rec.path == "/api/generate"][1:]
    assert unloads == [{"model": "llama3", "keep_alive": 0}] and sim.models == {}
    assert r.stats.evictions == 1 and r.broker.consumers.states["ollama"].resident is False


@pytest.mark.parametrize("fault", ["unload_hang", "unload_status", "unload_no_release"])
async def test_unloads_that_hang_fail_or_free_nothing_end_in_insufficient_vram(rig, fault):
    r = await rig(sims={"mvoice": {"loaded": True}, "comfyui": {"loaded": True}}, tweak=_two_candidates)
    for name in ("mvoice", "comfyui"):
        r.sims[name].faults[fault] = 500 if fault == "unload_status" else True
    status, headers, body = await r.post("stt", None, data=b"audio")
    data = error_of(status, headers, body, "insufficient_vram")
    assert "/opt/ComfyUI/.venv/bin/python3 13000 MiB" in data["message"]
    assert "/opt/mvoice/.venv/bin/python3 2800 MiB" in data["message"]
    attempts = [rec.path for name in ("mvoice", "comfyui") for rec in r.sims[name].records]
    assert [p for p in attempts if p in ("/api/admin/unload", "/free")] == ["/api/admin/unload", "/free"]
    assert r.sims["whisper"].records == [] and r.broker.scheduler.holder is None
    assert r.stats.unload_failures + r.stats.evictions == 2
    for name in ("mvoice", "comfyui"):
        r.sims[name].faults.clear()
    if fault == "unload_no_release":  # they are unloaded already; their memory never came back
        r.gpu.release("mvoice")
        r.gpu.release("comfyui")
    assert (await r.post("stt", None, data=b"audio"))[0] == 200


async def test_a_hanging_load_route_is_load_failed(rig):
    def quick_load(raw):
        raw["consumers"]["mvoice"]["load"]["timeout_s"] = 0.3

    r = await rig(sims={"mvoice": {"loaded": False}}, tweak=quick_load)
    r.sims["mvoice"].faults["load_hang"] = True
    status, headers, body = await r.post("tts", {"text": "x"})
    assert "did not answer within 0.3 s" in error_of(status, headers, body, "load_failed")["message"]
    assert r.broker.scheduler.holder is None
    del r.sims["mvoice"].faults["load_hang"]
    assert (await r.post("tts", {"text": "x"}))[0] == 200


async def test_idle_unload_waits_for_idle_unload_s_since_the_last_use_then_unloads_counted():
    s, gpu, ops, clock = make_scheduler(small_config(consumers__x__idle_unload_s=10))
    jobs = internal_jobs(s)
    crowd(gpu, ops, {})
    ops.states["x"].unload_failed()
    ops.states["x"].probed(True, None, "consumer_unreachable", clock.now, True)  # resident; never used
    assert jobs.idle_deadline("x") == clock.now + 10 and jobs.idle_deadline("y") is None
    clock.now += 9
    assert await jobs.idle_unload("x") is None and ops.calls == []  # not due yet
    job = await s.acquire("x", "kx")
    clock.now += 5
    assert await jobs.idle_unload("x") is None  # never while it has a job
    job.release("completed", status=200, success=True)
    assert jobs.idle_deadline("x") == clock.now + 10  # counted again from the job's end
    clock.now += 10
    done = await jobs.idle_unload("x")
    assert done is not None and done.kind == "idle_unload" and done.priority == 0
    assert ops.calls == [("unload", "x")] and ops.states["x"].resident is False and "x" not in gpu.held
    assert (s.stats.idle_unloads, s.stats.admin_unloads, s.stats.evictions) == (1, 0, 0)
    assert 'mgpumanager_idle_unloads_total{consumer="x"} 1' in s.metrics.render([])
    assert (
        jobs.idle_deadline("x") is None and await jobs.idle_unload("x") is None
    )  # not resident: nothing due
    assert s.holder is None and books_balance(s)


async def _idle_unload_queued(
    **tweaks: Any,
) -> tuple[m.Scheduler, FakeOps, FakeClock, m.InternalJobs, m.Job, asyncio.Future[m.Job | None]]:
    """x due for its idle unload (idle_unload_s 10, unused for 11 s), which queues behind t's running job."""
    s, gpu, ops, clock = make_scheduler(small_config(consumers__x__idle_unload_s=10, **tweaks))
    jobs = internal_jobs(s)
    crowd(gpu, ops, {"x": clock.now})
    ops.states["t"].loaded()
    clock.now += 11
    running = await s.acquire("t", "kt")  # the lock is busy: the idle unload has to queue
    idle = asyncio.ensure_future(jobs.idle_unload("x"))
    await asyncio.sleep(0)
    return s, ops, clock, jobs, running, idle


async def test_a_job_queued_while_the_idle_unload_waits_goes_first_and_cancels_it():
    s, ops, _, jobs, running, idle = await _idle_unload_queued()
    assert [j.kind for j in s.queue()] == ["idle_unload"]
    assert await jobs.idle_unload("x") is None  # never two pending for one consumer
    job_for_x = await _queued(s, "x")
    assert [j.kind for j in s.queue()] == ["kx", "idle_unload"]  # priority 0: everything goes first
    running.release("completed", status=200, success=True)
    job = await asyncio.wait_for(job_for_x, 5)
    assert not idle.done()
    job.release("completed", status=200, success=True)
    skipped = await asyncio.wait_for(idle, 5)
    assert skipped is not None and skipped.outcome == "completed"
    assert ("unload", "x") not in ops.calls and ops.states["x"].resident is True  # just used: not idle
    assert s.stats.idle_unloads == 0 and books_balance(s)


async def test_an_idle_unload_granted_ahead_of_a_job_for_its_consumer_leaves_it_loaded():
    """An idle unload that aged past a job for its consumer (priority 0, queued after it) is granted first,
    finds that job waiting for the consumer and skips: the job needs no load again."""
    s, ops, clock, _, running, idle = await _idle_unload_queued(consumers__x__priority=0)
    clock.now += 61  # aging_s 60: the idle unload is of effective priority 1 now
    job_for_x = await _queued(s, "x")
    assert [j.kind for j in s.queue()] == ["idle_unload", "kx"]
    running.release("completed", status=200, success=True)
    skipped = await asyncio.wait_for(idle, 5)
    assert skipped is not None and skipped.outcome == "completed"
    job = await asyncio.wait_for(job_for_x, 5)
    assert ("unload", "x") not in ops.calls and ("load", "x") not in ops.calls  # nor loaded again
    assert ops.states["x"].resident is True
    job.release("completed", status=200, success=True)
    assert s.stats.idle_unloads == 0 and books_balance(s)


async def test_a_job_arriving_while_the_idle_unload_runs_waits_and_loads_the_consumer_again():
    s, gpu, ops, clock = make_scheduler(small_config(consumers__x__idle_unload_s=10))
    jobs = internal_jobs(s)
    crowd(gpu, ops, {"x": clock.now})
    clock.now += 10
    gate = asyncio.Event()
    unload = ops.unload

    async def slow_unload(name: str) -> None:
        await gate.wait()
        await unload(name)

    ops.unload = slow_unload  # type: ignore[method-assign]
    idle = asyncio.ensure_future(jobs.idle_unload("x"))
    await until(lambda: s.holder == "x" and s.exclusive)
    job_for_x = await _queued(s, "x")
    assert not job_for_x.done()  # the unload holds the lock alone: nothing joins it
    gate.set()
    assert (await asyncio.wait_for(idle, 5)).outcome == "completed"
    job = await asyncio.wait_for(job_for_x, 5)
    assert ops.calls == [("unload", "x"), ("load", "x")] and ops.states["x"].resident is True
    job.release("completed", status=200, success=True)
    assert s.stats.idle_unloads == 1 and books_balance(s)


async def test_preload_loads_only_what_fits_without_evicting_anything():
    s, gpu, ops, _ = make_scheduler(small_config())
    jobs = internal_jobs(s)
    crowd(gpu, ops, {})  # 3904 MiB free: t's 4000 + 256 do not fit
    assert (await jobs.preload("t")).outcome == "completed"
    assert ops.calls == [] and s.stats.preload_skips == 1 and ops.states["t"].resident is False
    gpu.held.pop("z")
    ops.states["z"].unloaded()
    await jobs.preload("t")
    assert ops.calls == [("load", "t")] and ops.states["t"].resident is True and gpu.reads[-1] == "memory"
    await jobs.preload("t")  # resident already: nothing to do
    assert ops.calls == [("load", "t")] and s.stats.loads == 1 and books_balance(s)


async def test_idle_consumer_is_unloaded_by_the_broker_and_loaded_again_by_the_next_job(rig):
    def idle_mvoice(raw):
        raw["consumers"]["mvoice"]["idle_unload_s"] = 1.0

    r = await rig(sims={"mvoice": {"loaded": False}}, tweak=idle_mvoice)
    assert (await r.post("tts", {"text": "one"}))[0] == 200
    assert r.sims["mvoice"].loads == 1  # (its VRAM may be gone again by now: the clock runs)
    await until(lambda: r.stats.idle_unloads == 1)
    assert r.sims["mvoice"].unloads == 1 and r.gpu.used_mib("mvoice") == 0  # its VRAM is released
    await until(lambda: not [t for t in r.broker.tasks if t.get_name() == "idle unload mvoice"])  # (ended)
    st = await r.status()
    assert st["consumers"]["mvoice"]["loaded"] is False and st["scheduler"]["stats"]["idle_unloads"] == 1
    async with r.session.get(r.url("/metrics")) as resp:
        families = _families(await resp.text())
    assert _value(families, "mgpumanager_idle_unloads_total", consumer="mvoice") == 1
    assert (await r.post("tts", {"text": "two"}))[0] == 200
    assert r.sims["mvoice"].loads == 2
    assert [rec.path for rec in r.sims["mvoice"].records] == [
        "/api/admin/load",
        "/api/synthesize",
        "/api/admin/unload",
        "/api/admin/load",
        "/api/synthesize",
    ]
    assert r.stats.evictions == 0 and r.stats.admin_unloads == 0


async def test_preload_at_start_up_and_after_a_reload_never_evicts(rig):
    def preload_mvoice(raw):
        raw["consumers"]["mvoice"]["preload"] = True

    # comfyui fills the GPU: mvoice does not fit without evicting it, so it is skipped.
    r = await rig(sims={"comfyui": {"loaded": True}, "mvoice": {"loaded": False}}, tweak=preload_mvoice)
    await until(lambda: r.stats.preload_skips == 1 and r.broker.scheduler.holder is None)
    assert r.sims["comfyui"].unloads == 0 and r.sims["mvoice"].loads == 0 and r.stats.evictions == 0
    await r.sims["comfyui"].do_unload()  # the GPU gets free, outside the broker
    async with r.session.post(r.url("/v1/reload")) as resp:
        assert resp.status == 200
    await until(lambda: r.broker.consumers.states["mvoice"].resident is True)
    assert r.sims["mvoice"].loads == 1 and r.gpu.used_mib("mvoice") == 2800 and r.stats.jobs == 2
    assert [rec.path for rec in r.sims["mvoice"].records] == ["/api/admin/load"]  # no job did it


async def test_whisper_is_evicted_by_stopping_its_process_and_started_again_for_its_next_job(
    rig, tmp_path, caplog
):
    port = free_port()
    home = tmp_path / "rig0"  # where the rig fixture puts its first rig
    # 14000 MiB: comfyui (13000) and whisper (1500) do not fit together.
    r = await rig(total_mib=14000, tweak=_whisper_as_a_service(home, port))
    pidfile = home / "whisper.pid"
    try:
        # The service is stopped when the broker starts: stopped is "not resident", not "unreachable".
        whisper = r.broker.consumers.states["whisper"]
        assert whisper.healthy is False and whisper.resident is False
        status, _, body = await r.post("stt", None, data=b"audio")
        assert status == 200 and json.loads(body) == {"text": "simulated transcript"}
        first = int(pidfile.read_text())
        assert mgpusim.alive(first) and r.gpu.used_mib("whisper") == 1500
        assert whisper.healthy is True and whisper.resident is True

        assert (await r.post("image", {"prompt": {}}))[0] == 200  # evicts whisper: its process exits
        assert not mgpusim.alive(first) and r.gpu.used_mib("whisper") == 0 and not pidfile.exists()
        await r.broker.consumers.probe("whisper")  # its health fails now: that changes nothing
        assert whisper.resident is False
        await until(lambda: r.broker.scheduler.holder is None)

        status, _, body = await r.post("stt", None, data=b"again")  # evicts comfyui, starts whisper
        assert status == 200, body
        second = int(pidfile.read_text())
        assert second != first and mgpusim.alive(second) and r.gpu.used_mib("whisper") == 1500
        assert (r.stats.evictions, r.stats.loads, r.sims["comfyui"].unloads) == (2, 2, 1)
    finally:
        stop = await asyncio.create_subprocess_exec(
            PY, str(HERE / "mgpusim.py"), "stop", "--pidfile", str(pidfile)
        )
        assert await asyncio.wait_for(stop.wait(), 30) == 0
    commands = [line for line in caplog.text.splitlines() if "msg=command consumer=whisper" in line]
    assert [re.search(r"action=(\w+)", line)[1] for line in commands] == ["load", "unload", "load"]
    assert all("exit=0" in line for line in commands)
    # Each start was followed by waiting for the health route: the job came after a good health answer.
    log_text = caplog.text
    assert log_text.index("msg=health consumer=whisper healthy=True") < log_text.index("msg=job id=1")


def _llama_as_a_service(r_home: Path, port: int, **own: Any) -> Any:
    """A tweak: ``llama`` (the llama-cpp preset, 1000 MiB, routed for chat) is a process of its own,
    stopped and started with mgpusim's stop and start, as whisper is in ``_whisper_as_a_service``."""
    pidfile = r_home / "llama.pid"
    sim = [PY, str(HERE / "mgpusim.py")]

    def tweak(raw: dict[str, Any]) -> None:
        start = [*sim, "start", "--pidfile", str(pidfile), "--state", str(r_home / "gpu.json")]
        start += ["--log", str(r_home / "llama.log"), f"llama=llama-cpp:{port}"]
        raw["consumers"]["llama"] = {
            "preset": "llama-cpp",
            "url": f"http://127.0.0.1:{port}",
            "vram_resident_mib": 1000,
            "unload": {"command": [*sim, "stop", "--pidfile", str(pidfile)], "timeout_s": 30},
            "load": {"command": start, "timeout_s": 30},
            **own,
        }
        raw["routing"]["chat"] = "llama"

    return tweak


async def _stop_service(pidfile: Path) -> None:
    stop = await asyncio.create_subprocess_exec(
        PY, str(HERE / "mgpusim.py"), "stop", "--pidfile", str(pidfile)
    )
    assert await asyncio.wait_for(stop.wait(), 30) == 0


def _no_health_warning(caplog: Any, name: str) -> None:
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert not [line for line in warned if f"consumer={name} " in line], warned


async def test_a_consumer_the_broker_stopped_is_stopped_and_a_model_list_starts_it(rig, tmp_path, caplog):
    """Issue 18: llama-server, stopped by its unload command, answered an unscheduled GET through its mount
    (``/c/llama/v1/models``, what the OpenAI client's ``models.list()`` and Open WebUI ask first) with
    ``502 consumer_unreachable``, every command eviction logged a health warning, and ``ps`` showed it
    ``down``. Stopped is a state of its own: ``stopped`` in status and ``ps``, an info line; and since
    its preset says its calls need its model (``start_for_unscheduled``), the call starts it first."""
    port, home = free_port(), tmp_path / "rig0"
    caplog.set_level(logging.INFO, logger="mgpumanager")
    r = await rig(total_mib=14000, tweak=_llama_as_a_service(home, port))  # llama beside comfyui: no
    pidfile = home / "llama.pid"
    try:
        st = await r.status()
        assert {k: st["consumers"]["llama"][k] for k in ("healthy", "stopped", "loaded")} == {
            "healthy": False,
            "stopped": True,
            "loaded": False,
        }
        assert re.search(r"^llama +stopped +no ", "\n".join(m.render_ps(st, time.time())), re.M)
        async with r.session.get(r.url("/c/llama/v1/models")) as resp:
            assert resp.status == 200 and (await resp.json())["data"][0]["id"] == "sim-model"
        first = int(pidfile.read_text())
        state = r.broker.consumers.states["llama"]
        assert (state.stopped, state.healthy, state.resident) == (False, True, True)
        assert "kind=start status=completed" in job_lines(caplog)[-1]

        assert (await r.post("image", {"prompt": {}}))[0] == 200  # evicts llama: its stop command
        assert not mgpusim.alive(first) and state.stopped and state.resident is False
        st = await r.status()
        assert st["consumers"]["llama"]["stopped"] is True and st["consumers"]["llama"]["last_error"]
        await r.broker.consumers.probe("llama")  # refused: still stopped, nothing more said
        await until(lambda: r.broker.scheduler.holder is None)
        async with r.session.get(r.url("/c/llama/v1/models")) as resp:  # evicts comfyui, starts llama
            assert resp.status == 200
        assert int(pidfile.read_text()) != first and r.sims["comfyui"].unloads == 1
    finally:
        await _stop_service(pidfile)
    _no_health_warning(caplog, "llama")
    stopped = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("msg=stopped ")]
    assert stopped == [
        'msg=stopped consumer=llama reason="connection refused"',  # at start-up: not running
        'msg=stopped consumer=llama reason="stopped by its unload command"',
    ]


async def test_an_unscheduled_call_to_a_stopped_consumer_gets_consumer_stopped(rig, tmp_path, caplog):
    """Issue 18: where the consumer's calls do not need its model (whisper-server's, the default), an
    unscheduled call that finds it stopped is refused with ``503 consumer_stopped``, retryable, its
    ``Retry-After`` its learned load time (at least 1 s); WebSockets too. A job starts it, as before."""
    port, home = free_port(), tmp_path / "rig0"
    caplog.set_level(logging.INFO, logger="mgpumanager")
    r = await rig(total_mib=14000, tweak=_whisper_as_a_service(home, port))
    pidfile = home / "whisper.pid"

    async def refused() -> tuple[dict[str, Any], int]:
        async with r.session.get(r.url("/c/whisper/health")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "consumer_stopped")
            return data, int(resp.headers["Retry-After"])

    try:
        data, retry_after = await refused()
        assert data["message"] == "whisper is stopped; a job for it starts it again" and retry_after == 1
        with pytest.raises(aiohttp.WSServerHandshakeError) as ws:
            await r.session.ws_connect(r.url("/c/whisper/ws"))
        assert ws.value.status == 503
        assert (await r.post("stt", None, data=b"audio"))[0] == 200  # a job starts it
        async with r.session.get(r.url("/c/whisper/health")) as resp:
            assert resp.status == 200
        assert (await r.post("image", {"prompt": {}}))[0] == 200  # evicts whisper
        await until(lambda: r.broker.scheduler.holder is None)
        data, retry_after = await refused()
        load_s = r.broker.consumers.states["whisper"].timing("load")
        assert f"(its start takes {load_s:.1f} s)" in data["message"]
        assert retry_after == max(1, math.ceil(load_s))
        assert r.stats.jobs == 2 and r.sims["comfyui"].unloads == 0  # the refusals queued nothing
    finally:
        await _stop_service(pidfile)
    _no_health_warning(caplog, "whisper")


async def test_a_client_leaving_while_a_stop_script_runs_leaves_it_to_finish(rig, tmp_path):
    """Issue 10's case: a slow stop script (whisper-server's, which removes its pid file last) evicting the
    service for a client that leaves half-way is not killed: the service is stopped cleanly, the job ends
    cancelled, nothing is loaded for it."""
    port = free_port()
    home = tmp_path / "rig0"
    r = await rig(total_mib=14000, tweak=_whisper_as_a_service(home, port))
    pidfile = home / "whisper.pid"
    whisper = r.broker.config.consumers["whisper"]
    slow_stop = ("sh", "-c", "sleep 1 && exec " + shlex.join(whisper.unload.argv))
    r.broker.config.consumers["whisper"] = m.replace(
        whisper, unload=m.replace(whisper.unload, argv=slow_stop)
    )
    try:
        assert (await r.post("stt", None, data=b"audio"))[0] == 200  # starts whisper
        first = int(pidfile.read_text())
        image = asyncio.ensure_future(r.post("image", {"prompt": {}}))  # evicts whisper by the slow script
        state = r.broker.consumers.states["whisper"]
        await until(lambda: state.resident is None)  # its unload is under way
        image.cancel()  # the client leaves
        await asyncio.gather(image, return_exceptions=True)
        await until(lambda: r.broker.scheduler.holder is None, timeout=30)
        assert not mgpusim.alive(first) and not pidfile.exists()  # stopped whole, its pid file removed
        assert state.resident is False and r.gpu.used_mib("whisper") == 0
        assert r.stats.cancelled == 1 and r.stats.evictions == 1
        assert "/prompt" not in [rec.path for rec in r.sims["comfyui"].records]  # nothing ran for it
    finally:
        stop = await asyncio.create_subprocess_exec(
            PY, str(HERE / "mgpusim.py"), "stop", "--pidfile", str(pidfile)
        )
        assert await asyncio.wait_for(stop.wait(), 30) == 0


@pytest.mark.parametrize(
    ("action", "script", "code", "expected"),
    [
        ("unload", "echo cannot stop whisper-server >&2; exit 1", "unload_failed", "status 1: cannot stop"),
        ("load", "echo Unit whisper-server.service not found. >&2; exit 5", "load_failed", "status 5: Unit"),
        ("load", "exit 0", "load_failed", "not healthy within 0.5 s"),
    ],
)
async def test_a_failing_command_is_unload_failed_or_load_failed_with_its_stderr(
    rig, caplog, action, script, code, expected
):
    def failing(raw):
        whisper = raw["consumers"]["whisper"]
        whisper["url"] = f"http://127.0.0.1:{free_port()}"  # nothing listens: stopped
        whisper[action] = {"command": ["sh", "-c", script], "timeout_s": 0.5}
        whisper.setdefault("load", {"command": ["true"]})  # an unload command needs a load command
        raw["routing"]["stt"] = "whisper"

    r = await rig(tweak=failing)
    if action == "unload":
        async with r.session.post(r.url("/v1/consumers/whisper/unload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), code)
    else:
        data = error_of(*await r.post("stt", None, data=b"x"), code)
    assert expected in data["message"]
    assert expected in caplog.text and f'msg="{action} failed" consumer=whisper' in caplog.text
    assert r.broker.scheduler.holder is None and books_balance(r.broker.scheduler)
    assert r.broker.consumers.states["whisper"].resident is None  # unknown after a failed call


async def test_a_hanging_command_is_killed_at_its_timeout_with_everything_it_started(rig, tmp_path):
    pids = tmp_path / "pids"

    def hanging(raw):
        script = f"sleep 30 & echo $! >> {pids}; echo $$ >> {pids}; wait"
        raw["consumers"]["whisper"]["unload"] = {"command": ["sh", "-c", script], "timeout_s": 0.5}
        raw["consumers"]["whisper"]["load"] = {"command": ["true"]}

    r = await rig(tweak=hanging)
    async with r.session.post(r.url("/v1/consumers/whisper/unload")) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "unload_failed")
    assert "did not finish within 0.5 s (killed)" in data["message"]
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 2
    await until(lambda: [pid for pid in started if running(pid)] == [], 5)  # (SIGKILL acts when each runs)
    assert r.stats.unload_failures == 1 and r.broker.consumers.states["whisper"].resident is None


async def test_a_command_that_starts_a_service_returns_at_its_exit_and_leaves_the_service_running():
    """`sh -c 'server &'` exits at once while the server keeps its stdout: not waited for, nor killed."""
    done = await m.run_process(["sh", "-c", "sleep 30 & echo $!"], 10)
    service = int(done.stdout.decode().split()[0])
    try:
        assert done.returncode == 0 and running(service)
    finally:
        os.kill(service, signal.SIGKILL)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_command_gets_exactly_stdin_stdout_and_stderr_on_either_loop(tmp_path, caplog, loop):
    """Item 8 of issue 10: under uvloop a service started in the background held the broker's pipes (its
    loop left the child copies of them), so every command load waited 0.5 s and logged it."""
    run = asyncio.run if loop == "asyncio" else pytest.importorskip("uvloop").run
    command_fds, service_fds, returned_at_exit = run(_what_commands_inherit(tmp_path))
    assert command_fds == ["0", "1", "2"]
    assert service_fds == ["0", "1", "2"]
    assert returned_at_exit and "left its output open" not in caplog.text


async def test_without_pidfds_a_process_exit_is_polled_for(monkeypatch, tmp_path):
    """Kernels before 5.3 (and some sandboxes) have no pidfd: the exit is learnt by polling waitid."""

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    done = await m.run_process(["sh", "-c", "echo out; echo err >&2; exit 3"], 5)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
    pids = tmp_path / "pids"
    with pytest.raises(m.ProcessTimeout):
        await m.run_process(["sh", "-c", f"echo $$ > {pids}; sleep 30"], 0.3)
    await until(lambda: not running(int(pids.read_text())), 5)


async def test_a_hold_counts_as_use_for_the_idle_unload():
    s, _, ops, clock = make_scheduler(small_config(consumers__t__idle_unload_s=10))
    jobs = internal_jobs(s)
    ops.states["t"].loaded()
    job = await s.acquire("t", "kt")
    release = asyncio.Event()
    job.release("completed", status=200, success=True, hold=release.wait, hold_timeout_s=600)
    clock.now += 60  # a render far longer than idle_unload_s
    assert len(s.tasks) == 1  # the hold: a task the scheduler owns ...
    release.set()
    await until(lambda: s.holder is None)
    await until(lambda: not s.tasks)  # ... until it ends
    assert not jobs.idle_due("t")  # unused for 0 s, not 60
    clock.now += 10
    assert jobs.idle_due("t")


async def test_run_process_keeps_only_the_tail_of_a_chatty_process():
    script = "head -c 3000000 /dev/zero | tr '\\0' a; echo; echo the end >&2; exit 3"
    done = await m.run_process(["sh", "-c", script], 10, limit=1000)
    assert done.returncode == 3 and len(done.stdout) == 1000 and done.stderr_tail() == "the end"


async def test_a_job_joining_its_consumers_first_job_counts_what_that_job_loaded():
    """A consumer that loads itself (no load route: Ollama, llama-server) with max_concurrency 2, not
    resident when its first job came: while that job runs, the consumer loads its model. A second job
    joining it read the GPU, took the model's memory for someone else's, evicted the LRU consumer for
    nothing and was refused insufficient_vram, the message naming the consumer's own process."""
    config = small_config(consumers__t__max_concurrency=2, consumers__t__vram_resident_mib=8000)
    config = m.replace(
        config, consumers={**config.consumers, "t": m.replace(config.consumers["t"], load=None)}
    )
    s, gpu, ops, _ = make_scheduler(config)
    gpu.held["x"] = 3000
    ops.states["x"].loaded()
    for name in ("t", "y", "z"):
        ops.states[name].unloaded()
    first = await s.acquire("t", "kt")
    assert first.cold and ops.calls == []
    gpu.held["t"] = 8000  # it loads itself for its first job, which runs on
    second = await asyncio.wait_for(s.acquire("t", "kt"), 5)
    assert ops.calls == [] and gpu.held == {"x": 3000, "t": 8000}  # x stays, nothing is loaded twice
    second.release("completed", status=200, success=True)
    first.release("completed", status=200, success=True)
    assert s.holder is None and books_balance(s)


async def test_a_join_whose_first_job_left_before_working_credits_it_nothing():
    """The counterpart (found by `make fuzz`): only a job of the target at work may have loaded it. Its
    first job's client left while that job made room, so nothing was loaded; the join then planned alone
    and must not take a stranger's memory for the target's, nor load it where it does not fit."""
    config = small_config(consumers__t__max_concurrency=2, consumers__t__vram_resident_mib=9000)
    s, gpu, ops, _ = make_scheduler(config)
    gpu.held.update({"x": 3000, "someone's notebook": 7000})
    ops.states["x"].loaded()
    for name in ("t", "y", "z"):
        ops.states[name].unloaded()
    gate, started = _gated_unloads(ops, "x")
    first = asyncio.ensure_future(s.acquire("t", "kt"))
    await until(lambda: started == ["x"])
    first.cancel()  # its client leaves while x is unloaded for it
    await asyncio.gather(first, return_exceptions=True)
    second = asyncio.ensure_future(s.acquire("t", "kt"))  # joins t, waits for the room being made
    await until(lambda: s.jobs_of("t") == 2)
    gate.set()
    with pytest.raises(m.BrokerError) as refused:
        await asyncio.wait_for(second, 5)
    assert refused.value.code == "insufficient_vram" and ("load", "t") not in ops.calls
    assert s.holder is None and books_balance(s)


async def test_the_broker_never_loads_a_target_it_credited_with_a_strangers_memory():
    """A target recorded resident but in doubt is credited with the used memory nobody accounts for; when
    it restarted behind the broker's back and a stranger holds that memory, an admin load (warm-up)
    planned with that credit found room and then loaded the whole model where it did not fit (found by
    main's `make fuzz`). What the broker loads itself is planned at its full size."""
    s, gpu, ops, _ = make_scheduler(small_config())
    for name in ("x", "y"):
        gpu.held[name] = 4000
        ops.states[name].loaded()
    ops.states["z"].unloaded()
    ops.states["t"].loaded()  # then it restarts unseen (it holds nothing), and the record is put in doubt
    ops.states["t"].touched("a health round was missed")
    gpu.held["someone's training run"] = 5000  # 2904 MiB free: t's 4000 do not fit
    fits = []
    real_load = ops.load

    async def load(name: str) -> None:
        free = gpu.total - gpu.reserved - sum(gpu.held.values())
        fits.append(free >= ops.config.consumers[name].vram_resident_mib)
        await real_load(name)

    ops.load = load  # type: ignore[method-assign]
    job = await s.load_now("t")
    assert fits == [True] and job.evictions >= 1 and ops.calls[-1] == ("load", "t")
    assert s.holder is None and books_balance(s)


async def test_only_a_target_no_reading_measures_is_asked_its_residency():
    """Issue 18: a target recorded resident but in doubt is asked before room is made for it (one health
    probe, up to health.timeout_s: a busy service answers it late) only where no reading measures it; one
    with ``processes`` is decided by the reading that making room takes anyway, and is not asked. A fresh
    "resident" needs no room: no reading either (nvidia-smi is broken here: the job is served all the
    same)."""
    measured = m.ProcessMatch(name="/usr/bin/t")
    for processes, reports, asked, reads in (
        (None, None, ["t"], ["memory"]),  # it cannot tell: room is made from a reading
        (None, True, ["t"], []),
        (measured, None, [], ["whole"]),
    ):
        cfg = small_config()
        t = dataclasses.replace(cfg.consumers["t"], processes=processes)
        s, gpu, ops, _ = make_scheduler(dataclasses.replace(cfg, consumers={**cfg.consumers, "t": t}))
        if reports is not None:
            ops.reports["t"] = reports
            gpu.error = "nvidia-smi broken"
        ops.states["t"].loaded()
        ops.states["t"].touched("another consumer was granted the GPU")
        job = await s.acquire("t", "kt")
        job.release("completed", success=True)
        assert (ops.probes, gpu.reads) == (asked, reads), (processes, reports)


# ---- deciding from facts (issue 18): the broker as a process, consumers on sockets, mgpusim's nvidia-smi


async def test_a_resident_target_in_doubt_is_asked_and_nothing_is_evicted_for_it(bed):
    """Issue 18, case 1: a, b and c hold 6000 MiB each of 20,000 and say so in their health; t (6000
    declared) tells nothing and was never used. A job on b puts a's record in doubt; a's job then evicted c
    (t counted at its full size left none of the used memory to a). Now a is asked first: its fresh
    "loaded: true" settles it, and no unload call is made."""
    b = await bed(total_mib=20000)
    for name in ("a", "b", "c"):
        await b.add(
            mgpusim.MvoiceSim(name, b.gpu, vram_mib=6000, loaded=True),
            mvoice_like(6000, f"k{name}"),
            f"k{name}",
        )
    t_spec = {
        "health": {"path": "/health"},
        "paths": {"kt": {"path": "/inference"}},
        "vram_resident_mib": 6000,
    }
    await b.add(mgpusim.WhisperSim("t", b.gpu, vram_mib=6000), t_spec, "kt")
    async with b.daemon() as daemon:
        st = await daemon.status(b.session)
        assert [st["consumers"][n]["loaded"] for n in ("a", "b", "c", "t")] == [True, True, True, None]
        for kind in ("kb", "ka"):
            async with b.session.post(daemon.url(f"/v1/{kind}"), json={"text": kind}) as resp:
                assert resp.status == 200, await resp.read()
        st = await daemon.status(b.session)
    unloads = [rec.path for sim in b.sims.values() for rec in sim.records if rec.path.endswith("/unload")]
    assert unloads == [] and st["scheduler"]["stats"]["evictions"] == 0
    assert [b.sims[n].work[0].path for n in ("b", "a")] == ["/api/synthesize"] * 2
    assert b.sims["a"].probes == 2  # the first round's probe, and the one a's job asked for
    assert 'msg="residency asked" consumer=a answer=resident' in daemon.log


@no_overfill
async def test_memory_nobody_claims_is_never_credited_to_the_target(bed):
    """Issue 18, case 2: a consumer's health says ``loaded: false`` while its process holds 5000 MiB (it
    lies, or its report lags); ComfyUI's own unload button goes through the mount. The next image job was
    granted without an eviction, those 5000 MiB credited to ComfyUI, and the render ran out of memory. Now
    ComfyUI, in doubt and unable to tell, is planned at its full size: nothing is overfilled, and with no
    victim left the job is refused, naming the memory nobody claims."""
    b = await bed(total_mib=16384)
    comfy = mgpusim.ComfySim("comfyui", b.gpu, work_s=0.05)  # (its 610 MiB CUDA context, as the real one)
    await b.add(comfy, {"preset": "comfyui", "vram_resident_mib": 13000}, "image")
    liar = mgpusim.MvoiceSim("liar", b.gpu, vram_mib=5000)
    liar.faults["health_loaded"] = False
    await b.add(liar, mvoice_like(5000, "tts"), "tts")
    async with b.daemon() as daemon:
        assert (await b.render(daemon))[0] == 200 and len(comfy.finished) == 1
        async with b.session.post(daemon.url("/c/comfyui/api/free"), json={"unload_models": True}) as resp:
            assert resp.status == 200  # the web UI's "Unload Models" button, through the mount
        assert comfy.unloads == 1 and b.gpu.used_mib("comfyui") == 610
        await liar.do_load()  # its own doing: it holds 5000 MiB, its health says "loaded": false
        status, headers, body = await b.render(daemon)
        nothing_overfilled(b.gpu)
        error = error_of(status, headers, body, "insufficient_vram")
    assert len(comfy.work) == 1 and liar.unloads == 0  # no render started; the liar, "not resident", stays
    assert "5610 MiB used that no consumer accounts for" in error["message"], error["message"]
    assert "liar (not resident)" in error["message"]


def test_every_check_that_nothing_overfilled_is_proven_able_to_fail():
    """The mutation test's reach (issue 18): every test that checks that nothing overfilled the GPU does so
    through ``nothing_overfilled`` and is a ``no_overfill`` test, so it also runs with eviction disabled,
    where that check must fail."""
    me = test_every_check_that_nothing_overfilled_is_proven_able_to_fail
    tests = {
        name: f for name, f in globals().items() if name.startswith("test_") and callable(f) and f is not me
    }
    checking = [
        name for name, f in tests.items() if "nothing_overfilled(" in inspect.getsource(inspect.unwrap(f))
    ]
    unproven = [name for name in checking if not getattr(tests[name], "no_overfill", False)]
    assert len(checking) >= 5 and unproven == [], unproven
    # No other check of the kind: an assert on ``.ooms()`` being empty anywhere else.
    assert not re.findall(r"assert [^\n]*\.ooms\(\) == \[\]", Path(__file__).read_text())


@no_overfill
async def test_the_shipped_comfyui_size_covers_its_context_on_the_first_render_after_a_start(bed):
    """Found by an attack on issue 18: consumers.yaml measures ComfyUI by its processes and declared 13000,
    what its model takes; but an idle ComfyUI keeps a 610 MiB CUDA context (fixtures/nvidia-smi), which the
    broker credits against the declared size as part of it. The first render after a start, with 12654 MiB
    free, was planned at 12646 and took 13000: an overfill. The declared size is all its processes hold
    when loaded (docs/configuration.md), context included: the first render makes the room it needs."""
    shipped = yaml.safe_load((HERE / "consumers.yaml").read_text())["consumers"]["comfyui"]
    b = await bed(total_mib=16384)
    comfy = mgpusim.ComfySim("comfyui", b.gpu, work_s=0.05)
    measured = {"processes": {"name": "/opt/ComfyUI/*"}}  # (ComfySim's process, context held since its start)
    spec = {"preset": "comfyui", "vram_resident_mib": shipped["vram_resident_mib"], **measured}
    await b.add(comfy, spec, "image")
    mvoice = mgpusim.MvoiceSim("mvoice", b.gpu, vram_mib=2640, loaded=True)
    await b.add(mvoice, mvoice_like(2640, "tts"), "tts")
    assert b.gpu.free_mib() == 16384 - 480 - 610 - 2640  # 12654: the reserved, the context, mvoice
    async with b.daemon() as daemon:
        assert (await b.render(daemon))[0] == 200
    nothing_overfilled(b.gpu)
    assert mvoice.unloads == 1  # the room it really needed


async def test_an_allocation_that_does_not_fit_is_recorded(bed):
    """Issue 18, case 3: mgpusim's SimGPU recorded a failed allocation inside ``edit()`` and raised out of
    it, so the record was never written and every ``ooms() == []`` passed whatever happened. A consumer
    that takes more than it declares (whisper: 1500 declared, 4000 taken) is the one overfill the broker
    cannot prevent; it shows up in ``ooms()`` now."""
    b = await bed(total_mib=16384)
    comfy = mgpusim.ComfySim("comfyui", b.gpu, work_s=0.05)
    await b.add(comfy, {"preset": "comfyui", "vram_resident_mib": 13000}, "image")
    whisper = mgpusim.WhisperSim("whisper", b.gpu, vram_mib=4000)
    await b.add(whisper, {"preset": "whisper-cpp", "vram_resident_mib": 1500}, "stt")
    async with b.daemon() as daemon:
        assert (await b.render(daemon))[0] == 200
        form = aiohttp.FormData()
        form.add_field("file", b"RIFF", filename="a.wav")
        async with b.session.post(daemon.url("/v1/stt"), data=form) as resp:
            assert resp.status == 500  # whisper's own answer: its model did not fit
    free = 16384 - 480 - 13610
    assert b.gpu.ooms() == [{"owner": "whisper", "wanted_mib": 4000, "free_mib": free}]


# =====================================================================================================
# 5.1 Strangers (issue 22): the GPU yields to what else needs it, and takes back afterwards
# Unclaimed memory and the stranger it makes; whom yielding unloads; what fits beside a stranger; restores;
# the broker as a process beside a "game"; the state file a restart reads.
# =====================================================================================================


def _measured(cfg: m.Config, **views: dict[str, Any]) -> dict[str, m.ConsumerView]:
    """x, y and z resident, each measured holding its 4000 MiB; t not resident (measured holding nothing);
    ``views`` overrides a consumer's figures."""
    base = {name: {"resident": True, "used_mib": 4000} for name in ("x", "y", "z")}
    base["t"] = {"resident": False, "used_mib": 0}
    return {
        name: m.ConsumerView(c, **{**base[name], **views.get(name, {})}) for name, c in cfg.consumers.items()
    }


def _managed(cfg: m.Config, *names: str) -> m.Config:
    consumers = {
        n: dataclasses.replace(c, vram_managed=True) if n in names else c for n, c in cfg.consumers.items()
    }
    return dataclasses.replace(cfg, consumers=consumers)


#: plan_yield: x, y and z measured holding 4000 MiB each unless the row says otherwise (last use: x 3, y 1,
#: z 2); free MiB; keep_free_mib; the consumers tried already; whom to unload, in order.
YIELD_ROWS = {
    "keep_free_mib free already: nobody": ({}, 2048, 2048, (), ()),
    "least recently used first, and only as many as needed": ({}, 0, 2048, (), ("y",)),
    "as many as needed": ({}, 0, 6000, (), ("y", "z")),
    "one that frees exactly keep_free_mib is enough alone": ({}, 0, 4000, (), ("y",)),
    "all there is, when even that is not enough": ({}, 0, 20000, (), ("y", "z", "x")),
    "never used counts as oldest": ({"x": {"last_used": None}}, 0, 2048, (), ("x",)),
    "one at work is not idle": ({"y": {"jobs": 1}}, 0, 2048, (), ("z",)),
    "one not resident has nothing to give": ({"y": {"resident": False, "used_mib": 0}}, 0, 2048, (), ("z",)),
    "one measured holding nothing is no victim": (
        {"y": {"resident": None, "used_mib": 0}},
        0,
        2048,
        (),
        ("z",),
    ),
    "one of unknown residency that holds memory is": ({"y": {"resident": None}}, 0, 2048, (), ("y",)),
    "one whose yield failed is not asked again": ({}, 0, 2048, ("y",), ("z",)),
}


@pytest.mark.parametrize(("views", "free", "keep", "tried", "victims"), YIELD_ROWS.values(), ids=YIELD_ROWS)
def test_plan_yield_unloads_idle_consumers_least_recently_used_first(views, free, keep, tried, victims):
    cfg = small_config()
    used = {"x": {"last_used": 3.0}, "y": {"last_used": 1.0}, "z": {"last_used": 2.0}}
    figures = _measured(cfg, **{n: {**used.get(n, {}), **views.get(n, {})} for n in ("x", "y", "z")})
    held = sum(v.used_mib or 0 for v in figures.values())
    assert m.plan_yield(figures, free, held + 3000, keep, tried) == victims


def test_plan_yield_takes_a_consumer_a_job_waits_for_after_every_other():
    """Found by an attack on issue 22: a consumer a job waits for was yielded like any idle one, and then
    loaded again for that job, evicting another: three operations where one would do."""
    cfg = small_config()
    figures = _measured(cfg, x={"last_used": 3.0}, y={"last_used": 1.0}, z={"last_used": 2.0})
    assert m.plan_yield(figures, 0, 12000, 2048) == ("y",)
    assert m.plan_yield(figures, 0, 12000, 2048, awaited={"y"}) == ("z",)
    assert m.plan_yield(figures, 0, 12000, 6000, awaited={"y", "z"}) == ("x", "y")  # still, when needed


async def test_the_consumers_waiting_jobs_want_loaded_are_the_queue_s_awaited_ones():
    """What the yield takes last (plan_yield's ``awaited``): the consumers of waiting jobs, an admin's load
    among them, but not of those that only unload (an admin's unload, a yield's, an idle unload's)."""
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    first = await s.acquire("t", "kt")
    x = await _queued(s, "x")
    unloading = asyncio.ensure_future(s.unload_now("y"))
    loading = asyncio.ensure_future(s.load_now("z"))
    await until(lambda: len(s.lock.waiting) == 3)
    assert s.lock.waiting.awaited() == {"x", "z"}
    first.release("completed")
    (await x).release("completed")
    await unloading
    await loading


def test_plan_yield_takes_vram_managed_ones_last_and_never_one_without_an_unload():
    cfg = _without_unload(_managed(small_config(), "y"), "x")
    figures = _measured(cfg, x={"last_used": 1.0}, y={"last_used": 2.0}, z={"last_used": 3.0})
    assert m.plan_yield(figures, 0, 12000, 6000) == ("z", "y")  # y, managed, after z, though used before it
    assert m.plan_yield(figures, 0, 12000, 2048) == ("z",)


def test_beside_a_stranger_a_job_fits_only_if_it_leaves_keep_free_mib_free():
    cfg = small_config(consumers__x__can_coexist_with=["t"])
    figures = _measured(cfg)
    snap = m.RoomSnapshot("t", figures, 6304, 256, used_mib=12000, keep_free_mib=2048)
    assert m.plan_room(snap).need_mib == 4000 + 256 + 2048 and m.plan_room(snap).fits
    short = m.plan_room(dataclasses.replace(snap, free_mib=6303))
    # x may coexist with t, which was reckoned without the stranger: beside it, x is a victim like any.
    assert not short.fits and short.victims == ("x",) and not short.hopeless
    alone = m.plan_room(dataclasses.replace(snap, free_mib=6303, keep_free_mib=0))
    assert alone.fits and alone.need_mib == 4256
    # A target that holds its size already loads nothing: it needs what it always did (the cushion).
    resident = _measured(cfg, t={"resident": True, "used_mib": 4000})
    held = m.plan_room(m.RoomSnapshot("t", resident, 300, 256, used_mib=16000, keep_free_mib=2048))
    assert held.need_mib == 256 and held.fits


def test_a_job_that_could_not_fit_even_once_every_victim_is_unloaded_is_hopeless():
    cfg = _without_unload(small_config(), "x", "y")
    snap = m.RoomSnapshot("t", _measured(cfg), 1000, 256, used_mib=12000, keep_free_mib=2048)
    plan = m.plan_room(snap)  # 1000 free + z's 4000 < 6304
    assert plan.victims == ("z",) and plan.expected_mib == 5000 and plan.hopeless
    plan = m.plan_room(dataclasses.replace(snap, consumers=_measured(small_config())))
    assert plan.expected_mib >= plan.need_mib and not plan.hopeless


#: Unclaimed memory with every consumer measured (gpu.yield's loader rule): what the reading shows used
#: beyond what the consumers' processes hold, whatever their records say.
MEASURED_UNCLAIMED_ROWS = {
    "all theirs": ({}, 12000, 0),
    "a game's 6144 beside them": ({}, 18144, 6144),
    "one unloaded keeps its CUDA context: it is its": ({"x": {"resident": False, "used_mib": 610}}, 8610, 0),
    "a record says resident, its processes hold nothing: nobody's": (
        {"x": {"resident": True, "used_mib": 0}},
        12000,
        4000,
    ),
}


@pytest.mark.parametrize(
    ("views", "used", "unclaimed"), MEASURED_UNCLAIMED_ROWS.values(), ids=MEASURED_UNCLAIMED_ROWS
)
def test_unclaimed_memory_is_what_the_consumers_processes_do_not_hold(views, used, unclaimed):
    assert m.unclaimed_mib(_measured(small_config(), **views), used) == unclaimed


def _yield_config(keep: int = 2048, ignore: int = 512, **tweaks: Any) -> m.Config:
    """small_config with gpu.yield on and every consumer measured by its FakeGpu process name."""
    cfg = small_config(**tweaks)
    consumers = {
        n: dataclasses.replace(c, processes=m.ProcessMatch(name=f"/usr/bin/{n}"))
        for n, c in cfg.consumers.items()
    }
    y = m.YieldConfig(keep_free_mib=keep, ignore_mib=ignore, restore_after_s=30, poll_s=2)
    return dataclasses.replace(cfg, gpu=dataclasses.replace(cfg.gpu, yield_=y), consumers=consumers)


def _reading(s: m.Scheduler, used: dict[str, int], strangers: dict[int, int], started: float) -> m.GpuReading:
    """A whole reading: the consumers' processes (measured, as Consumers.measure would) and strangers' ones
    (pid -> MiB; a graphics process shows only in the used figure: a negative pid here)."""
    procs = [m.GpuProcess(100 + i, f"/usr/bin/{n}", mib) for i, (n, mib) in enumerate(used.items())]
    owners = {p.pid: n for p, n in zip(procs, used, strict=True)}
    procs += [m.GpuProcess(pid, f"/usr/bin/stranger{pid}", mib) for pid, mib in strangers.items() if pid > 0]
    total_used = sum(used.values()) + sum(strangers.values())
    for n, mib in used.items():
        s.states[n].measured(
            mib, frozenset({next(p for p, o in owners.items() if o == n)}), mib >= 2000, started
        )
    reading = m.GpuReading(
        0, "GPU-x", "Fake", 16384, total_used, 15904 - total_used, 0, 40, tuple(procs), 0, started
    )
    return dataclasses.replace(reading, owners=owners)


def test_a_stranger_is_present_while_unclaimed_memory_exceeds_ignore_mib_and_each_change_is_recorded():
    s, _, _, clock = make_scheduler(_yield_config(ignore=512))
    held = {"x": 4000, "y": 4000, "z": 0, "t": 0}
    s.strangers.seen(_reading(s, held, {-1: 512}, clock()))  # a desktop's own: no stranger
    assert (
        s.strangers.unclaimed_mib == 512 and not s.strangers.present and s.strangers.absent_since == clock()
    )
    clock.now += 5
    s.strangers.seen(_reading(s, held, {-1: 600, 4242: 6144}, clock()))
    assert s.strangers.present and s.strangers.since == clock() and s.strangers.unclaimed_mib == 6744
    assert [p.pid for p in s.strangers.processes] == [4242]  # the game (graphics) is not in the list
    assert s.strangers.keep_free_mib() == 2048
    # A reading begun earlier, ending later (a status reading and a yield's own overlap), is ignored.
    s.strangers.seen(_reading(s, held, {-1: 500}, clock() - 1))
    assert s.strangers.present and s.strangers.unclaimed_mib == 6744
    # gpu_in_use's Retry-After: GPU_IN_USE_RETRY_S, or gpu.yield.poll_s where that is longer.
    plan = m.RoomPlan(8000, 1000, expected_mib=3000)
    assert s.strangers.refusal("x", plan, 256).retry_after == m.GPU_IN_USE_RETRY_S == 10
    slow = _yield_config(ignore=512)
    slow = dataclasses.replace(
        slow, gpu=dataclasses.replace(slow.gpu, yield_=dataclasses.replace(slow.gpu.yield_, poll_s=30))
    )
    assert make_scheduler(slow)[0].strangers.refusal("x", plan, 256).retry_after == 30
    clock.now += 5
    s.strangers.seen(_reading(s, held, {-1: 500}, clock()))
    assert (
        not s.strangers.present and s.strangers.absent_since == clock() and s.strangers.keep_free_mib() == 0
    )
    events = [e for e in recent_events(s.events) if e["event"] == "stranger"]
    assert [(e["present"], e["unclaimed_mib"]) for e in events] == [(True, 6744), (False, 500)]
    assert events[0]["processes"] == [{"pid": 4242, "name": "/usr/bin/stranger4242", "used_mib": 6144}]
    # Without gpu.yield, unclaimed memory is still shown, but there is no stranger.
    s, _, _, clock = make_scheduler(small_config())
    s.strangers.seen(_reading(s, held, {4242: 6144}, clock()))
    assert s.strangers.unclaimed_mib == 6144 and not s.strangers.present and s.strangers.describe() is None


def test_a_stranger_is_not_taken_for_gone_by_a_reading_during_which_memory_moved():
    """Found by an attack on issue 22: a yield's victim that freed its memory after the process list was
    read and before the line after it (the reading's, the lower) left the list claiming the victim's 4000
    MiB of a line without them: a 4400 MiB game was seen as 400, gone, and back a reading later (events,
    restores started, jobs let in without keep_free_mib meanwhile). A stranger appears only by the lower
    figure and is gone only by the higher one."""
    s, _, _, clock = make_scheduler(_yield_config(ignore=512))
    held = {"x": 4000, "y": 4000, "z": 0, "t": 0}
    s.strangers.seen(_reading(s, held, {-1: 4400}, clock()))
    assert s.strangers.present and s.strangers.unclaimed_mib == 4400
    # x frees its 4000 between the list (which still shows them) and the line after it.
    clock.now += 1
    during = _reading(s, held, {-1: 4400}, clock())
    during = dataclasses.replace(during, used_mib=during.used_mib - 4000, moved_mib=4000)
    s.strangers.seen(during)
    assert s.strangers.present and s.strangers.unclaimed_mib == 4400  # not 400
    # The next reading, steady: x holds nothing; the game is still there.
    clock.now += 1
    s.strangers.seen(_reading(s, {**held, "x": 0}, {-1: 4400}, clock()))
    assert s.strangers.present and s.strangers.unclaimed_mib == 4400
    # The game goes while memory moves: gone only once the higher figure says so.
    clock.now += 1
    moving = dataclasses.replace(_reading(s, {**held, "x": 0}, {-1: 100}, clock()), moved_mib=4300)
    s.strangers.seen(moving)
    assert s.strangers.present  # 100 or 4400: in doubt, nothing changes
    clock.now += 1
    s.strangers.seen(_reading(s, {**held, "x": 0}, {-1: 100}, clock()))
    assert not s.strangers.present and s.strangers.unclaimed_mib == 100
    # And one that comes while memory moves appears only by the lower figure.
    clock.now += 1
    s.strangers.seen(dataclasses.replace(_reading(s, {**held, "x": 0}, {-1: 100}, clock()), moved_mib=6000))
    assert not s.strangers.present and s.strangers.unclaimed_mib == 100
    events = [(e["present"], e["unclaimed_mib"]) for e in recent_events(s.events) if e["event"] == "stranger"]
    assert events == [(True, 4400), (False, 100)]


def test_a_strangers_processes_are_named_the_largest_first_and_the_rest_counted():
    processes = [m.GpuProcess(pid, f"p{pid}", pid) for pid in range(1, 26)]
    text = m.describe_processes(processes)
    assert text.startswith("pid 25 p25 25 MiB, pid 24 p24 24 MiB") and text.endswith("and 15 more")
    assert "graphics" in m.describe_processes([])


def test_a_process_listed_without_a_pid_is_a_strangers_and_named_as_one():
    """nvidia-smi may list a process whose pid it shows as [N/A]: no consumer can
    claim it, so it is a stranger's, named in the stranger event and /v1/status (a mutation audit: dropping
    such processes from the strangers' failed no test)."""
    s, _, _, clock = make_scheduler(_yield_config(ignore=512))
    held = {"x": 4000, "y": 4000, "z": 0, "t": 0}
    reading = _reading(s, held, {}, clock())
    unnamed = m.GpuProcess(None, "/usr/bin/game", 6144)
    reading = dataclasses.replace(
        reading,
        processes=(*reading.processes, unnamed),
        used_mib=reading.used_mib + 6144,
        free_mib=reading.free_mib - 6144,
    )
    s.strangers.seen(reading)
    assert s.strangers.present and s.strangers.processes == (unnamed,)
    assert s.strangers.describe()["processes"] == [{"pid": None, "name": "/usr/bin/game", "used_mib": 6144}]
    event = next(e for e in recent_events(s.events) if e["event"] == "stranger")
    assert event["processes"] == [{"pid": None, "name": "/usr/bin/game", "used_mib": 6144}]


def _state(**over: Any) -> dict[str, Any]:
    """A state file's content as the broker writes it, written at 1,000,000 s (wall-clock)."""
    raw: dict[str, Any] = {
        "version": 1,
        "written_at": "1970-01-12T13:46:40.000Z",
        "written_at_s": 1_000_000.0,
        "gpus": {
            "0": {
                "reservation": {
                    "reason": "gaming",
                    "until_s": 1_003_600.0,
                    "restore": True,
                    "unloaded": ["mvoice", "comfyui"],
                    "to_restore": ["mvoice"],
                },
                "to_restore": ["ollama"],
            }
        },
        "consumers": {"mvoice": {"last_used_s": 999_000.0, "timings": {"load": [1.5, 2.5], "job": [0.2]}}},
    }
    for dotted, value in over.items():
        put(raw, dotted.split("__"), value)
    return raw


def test_the_state_file_is_read_as_of_now():
    rem = m.parse_state(_state(), 1_000_100.0)
    assert rem.reservations == {0: (3500.0, "gaming", True, ("mvoice", "comfyui"), ("mvoice",))}
    assert rem.to_restore == {0: ("ollama",)}
    assert rem.last_used == {"mvoice": (1100.0, 999_000.0)}
    assert rem.timings == {"mvoice": {"load": (1.5, 2.5), "job": (0.2,)}}
    # Ended while the broker was down: over, and what it unloaded (and was resident) waits to be restored.
    rem = m.parse_state(_state(), 1_004_000.0)
    assert rem.reservations == {} and rem.to_restore == {0: ("ollama", "mvoice")}
    rem = m.parse_state(_state(gpus__0__reservation__restore=False), 1_004_000.0)
    assert rem.to_restore == {0: ("ollama",)}


def test_a_wall_clock_set_back_never_lengthens_a_reservation_nor_puts_a_last_use_in_the_future():
    # The clock now says an hour before the file was written: nothing is taken to have happened since.
    rem = m.parse_state(_state(), 996_400.0)
    assert rem.reservations[0][0] == 3600.0  # what it had left when written, not 7200 s
    assert rem.last_used["mvoice"][0] == 1000.0  # as long before the writing as it was
    assert rem.last_used["mvoice"][1] == 995_400.0  # and so, on the clock of now, 1000 s before now


#: A state file set aside (a warning, a fresh start): what is wrong with it, and what the reason says.
BAD_STATE_ROWS = {
    "not an object": ([], "not a JSON object"),
    "a later format": ({**_state(), "version": 2}, "written by a later mgpumanager (format 2"),
    "no format": (_state(version=KeyError), "version: None is no format"),
    "a format as text": (_state(version="1"), "version: '1' is no format"),
    "no time written": (_state(written_at_s=KeyError), "written_at_s: None is no number"),
    "a time that is no number": (_state(written_at_s=math.inf), "written_at_s"),
    "a GPU that is no index": (_state(gpus={"a": {}}), "gpus.a: no GPU index"),
    "a GPU index too large": (_state(gpus={"256": {}}), "gpus.256: no GPU index"),
    "a week and more left": (
        _state(gpus__0__reservation__until_s=1_000_000.0 + 8 * 86400),
        "gpus.0.reservation: 691100 s left, more than a reservation may last",
    ),
    "a reason too long": (_state(gpus__0__reservation__reason="x" * 201), "no reason (at most 200"),
    "a restore flag that is not one": (_state(gpus__0__reservation__restore="yes"), "or restore flag"),
    "names that are not": (_state(gpus__0__to_restore=[1]), "gpus.0.to_restore: not a list of names"),
    "a list without end": (_state(gpus__0__to_restore=["a"] * 1001), "not a list of at most 1000 names"),
    "a last use after the writing": (
        _state(consumers__mvoice__last_used_s=1_000_001.0),
        "consumers.mvoice.last_used_s: after the file was written",
    ),
    "a negative time": (_state(consumers__mvoice__last_used_s=-1), "consumers.mvoice.last_used_s: -1"),
    "a timing of no kind": (_state(consumers__mvoice__timings={"boot": [1.0]}), "timings.boot: no list"),
    "too many samples": (_state(consumers__mvoice__timings={"job": [1.0] * 16}), "timings.job: no list"),
    "an absurd sample": (_state(consumers__mvoice__timings={"job": [1e12]}), "timings.job: 1000000000000"),
    "a sample that is no number": (_state(consumers__mvoice__timings={"job": [True]}), "timings.job: True"),
}


@pytest.mark.parametrize(("raw", "reason"), BAD_STATE_ROWS.values(), ids=BAD_STATE_ROWS)
def test_a_state_file_that_is_not_right_is_set_aside_naming_why(raw, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        m.parse_state(raw, 1_000_100.0)


def _own_process(sim: mgpusim.SimConsumer) -> dict[str, Any]:
    """The sim's process gets a name of its own (``/opt/<name>/python3``); its ``processes`` to match it."""
    sim.process_name = f"/opt/{sim.name}/python3"
    return {"processes": {"name": f"/opt/{sim.name}/*"}}


async def _events(daemon: Daemon, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """The daemon's events of the last 15 minutes."""
    async with session.get(daemon.url("/v1/events?since=900")) as resp:
        return await _read_replay(resp)


@no_overfill
async def test_a_stranger_gets_room_a_job_beside_it_gpu_in_use_and_what_yielded_comes_back(bed):
    """Issue 22, done when: on a 16 GiB GPU, a and b (4000 MiB each, measured by their processes) idle and
    resident, keep_free_mib 2048. A stranger (a game: a graphics process, only seen as used memory) takes
    6 GiB, leaving 1760 MiB free: b, the one used least recently, is unloaded (a stays: 5760 free is enough).
    c (8000 MiB) cannot fit beside it even with a unloaded: gpu_in_use at once, with Retry-After, naming the
    unclaimed MiB; nothing overfilled the GPU. The game ends: restore_after_s later, b is loaded again."""
    b = await bed(total_mib=16384)
    sims = {
        name: mgpusim.MvoiceSim(name, b.gpu, vram_mib=mib)
        for name, mib in (("a", 4000), ("b", 4000), ("c", 8000))
    }
    for name, sim in sims.items():
        spec = mvoice_like(sim.vram_mib, f"k{name}") | _own_process(sim)
        await b.add(sim, spec | ({"can_coexist_with": ["a"]} if name == "b" else {}), f"k{name}")
    b.raw["gpu"]["yield"] = {"keep_free_mib": 2048, "ignore_mib": 512, "restore_after_s": 1, "poll_s": 0.2}
    async with b.daemon() as daemon:
        for kind in ("kb", "ka"):  # b used first: the least recently used
            async with b.session.post(daemon.url(f"/v1/{kind}"), json={"text": kind}) as resp:
                assert resp.status == 200, await resp.read()
        await daemon.until(b.session, lambda st: st["consumers"]["a"]["vram_used_mib"] == 4000)
        b.gpu.allocate("game", 6144, graphics=True)  # free: 15904 - 8000 - 6144 = 1760
        st = await daemon.until(b.session, lambda st: st["consumers"]["b"]["loaded"] is False, timeout=30)
        # Yield rounds go by with the stranger there (a reading every poll_s): a is never asked. (Checked at
        # once, a broker that yielded a too passed, its second yield still under way.)
        await _readings_later(daemon, b.session, 15)
        st = await daemon.status(b.session)
        assert st["consumers"]["a"]["loaded"] is True and sims["a"].unloads == 0 and sims["b"].unloads == 1
        st = await daemon.until(b.session, lambda st: st["gpu"]["unclaimed_mib"] == 6144)
        assert st["gpu"]["strangers"]["present"] and st["gpu"]["strangers"]["processes"] == []
        async with b.session.post(daemon.url("/v1/kc"), json={"text": "c"}) as resp:
            answer = resp.status, dict(resp.headers), await resp.read()
        nothing_overfilled(b.gpu)
        error = error_of(*answer, "gpu_in_use")
        assert answer[1]["Retry-After"] == "10" and sims["c"].loads == 0 and sims["a"].unloads == 0
        assert "6144 MiB no consumer claims (no process listed: a graphics process" in error["message"]
        assert "c needs 10304 MiB free (8000 + cushion 256 + 2048 kept free for it)" in error["message"]
        b.gpu.release("game")
        st = await daemon.until(
            b.session,  # (loaded, and the restore's end recorded: a moment after)
            lambda st: st["consumers"]["b"]["loaded"] is True and st["scheduler"]["stats"]["restores"],
            timeout=30,
        )
        assert st["scheduler"]["stats"]["yields"] == 1 and st["scheduler"]["stats"]["restores"] == 1
        events = [
            e for e in await _events(daemon, b.session) if e["event"] in ("stranger", "yielded", "restored")
        ]
    assert [(e["event"], e.get("present"), e.get("consumer")) for e in events] == [
        ("stranger", True, None),
        ("yielded", None, "b"),
        ("stranger", False, None),
        ("restored", None, "b"),
    ]
    gone, restored = (datetime.datetime.fromisoformat(e["ts"].replace("Z", "+00:00")) for e in events[2:])
    assert (restored - gone).total_seconds() >= 1  # restore_after_s after the stranger was seen gone
    assert sims["b"].loads == 2 and sims["c"].loads == 0


async def _readings_later(daemon: Daemon, session: aiohttp.ClientSession, more: int) -> None:
    """Wait until the daemon has read its GPU ``more`` times more (its metrics' count): the yield loop reads
    every poll_s, /metrics (asked every 0.05 s here) every STATUS_MAX_AGE_S at most."""

    async def readings() -> float:
        async with session.get(daemon.url("/metrics")) as resp:
            return _value(_families(await resp.text()), "mgpumanager_gpu_readings_total", gpu="0")

    deadline, target = time.monotonic() + 30, await readings() + more
    while await readings() < target:
        assert time.monotonic() < deadline, f"fewer than {more} readings in 30 s"
        await asyncio.sleep(0.05)


def _yielding(**y: Any) -> Any:
    """A rig tweak: gpu.yield on (short times), every consumer measured by its process name; ollama holds no
    memory of this GPU's (a stand-in may take its place)."""

    def tweak(raw: dict[str, Any]) -> None:
        raw["gpu"]["yield"] = {"keep_free_mib": 2048, "restore_after_s": 3600, "poll_s": 0.2} | y
        for name, pattern in (
            ("mvoice", "*/mvoice/*"),
            ("comfyui", "*/ComfyUI/*"),
            ("whisper", "*/whisper*"),
        ):
            raw["consumers"][name]["processes"] = {"name": pattern}
        raw["consumers"]["ollama"]["vram_resident_mib"] = 0

    return tweak


async def test_status_shows_no_unclaimed_memory_beside_a_gpu_reading_that_failed(rig):
    """docs/api.md: ``gpu.unclaimed_mib`` (and each ``gpus[].unclaimed_mib``) is null when the GPU could not
    be read. The figure of the last good reading is kept for the strangers' record, but /v1/status shows it
    only beside the reading it came from, never beside an error; a good reading again shows it again."""
    r = await rig(tweak=_yielding())  # (every consumer measured by its processes: the game is nobody's)
    r.gpu.allocate("game", 8000, process="/usr/bin/train.py")  # nobody's: unclaimed
    st = await status_until(r, lambda st: (st["gpu"]["unclaimed_mib"] or 0) >= 8000)
    assert st["gpu"]["error"] is None
    r.gpu.set_fault("fail")
    st = await status_until(r, lambda st: st["gpu"]["error"] is not None)
    assert r.broker.scheduler.strangers.unclaimed_mib >= 8000  # (still known: the last good reading's)
    assert st["gpu"]["unclaimed_mib"] is None and st["gpus"][0]["unclaimed_mib"] is None
    r.gpu.set_fault(None)
    await status_until(r, lambda st: st["gpu"]["error"] is None and st["gpu"]["unclaimed_mib"] >= 8000)


async def test_a_job_that_cannot_fit_beside_a_stranger_is_refused_at_once_and_one_that_can_runs(rig):
    """Issue 22: gpu_in_use comes at admission, before the job is queued (nobody sits in the queue behind a
    game), having unloaded nothing for it; a job that fits beside the stranger, leaving keep_free_mib free,
    runs."""
    # mvoice resident (so that an unload for the refused job would show: unloading what holds nothing does
    # not count), and idle: 15904 - 2800 - 8000 = 5104 free leaves keep_free_mib free, so nothing yields.
    r = await rig(tweak=_yielding(), sims={"mvoice": {"loaded": True}})
    r.gpu.allocate("game", 8000, process="/usr/bin/train.py")  # a training run: in the process list
    await status_until(r, lambda st: st["gpu"]["strangers"]["present"])
    jobs = r.stats.jobs
    status, headers, body = await r.post("image", {"prompt": {}})
    error = error_of(status, headers, body, "gpu_in_use")
    assert headers["Retry-After"] == "10" and r.stats.jobs == jobs  # not a job: never queued
    assert f"(pid {mgpusim.fake_pid('/usr/bin/train.py')} /usr/bin/train.py 8000 MiB)" in error["message"]
    assert not [
        e for e in recent_events(r.broker.events) if e["event"] == "queued" and e["consumer"] == "comfyui"
    ]
    assert r.sims["comfyui"].work == [] and r.sims["mvoice"].unloads == 0
    async with r.session.post(r.url("/v1/consumers/mvoice/unload")) as resp:
        assert resp.status == 200 and r.sims["mvoice"].unloads == 1
    # mvoice's 2800 (+ 256) leave 15904 - 8000 - 3056 = 4848 >= 2048 free: it loads and runs.
    status, _, _ = await r.post("tts", {"text": "hi"})
    assert status == 200 and r.sims["mvoice"].loads == 1 and r.gpu.free_mib() >= 2048


async def test_jobs_waiting_when_a_stranger_comes_that_cannot_fit_beside_it_are_answered_at_once(rig):
    """A job queued behind a running one is answered gpu_in_use within poll_s of the stranger's coming, not
    when the GPU is free again (nor after queue_timeout_s)."""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(tweak=_yielding(), urls={"ollama": ollama.url})
        llm = asyncio.ensure_future(r.post("llm", {"prompt": "hold"}))
        await status_until(r, lambda st: st["scheduler"]["holder"] is not None)
        image = asyncio.ensure_future(r.post("image", {"prompt": {}}))
        await status_until(r, lambda st: len(st["scheduler"]["queue"]) == 1)
        r.gpu.allocate("game", 8000, graphics=True)
        status, headers, body = await asyncio.wait_for(image, 30)
        error_of(status, headers, body, "gpu_in_use")
        assert not llm.done() and r.broker.scheduler.holder == "ollama"  # the GPU is still busy
        gate.set()
        assert (await llm)[0] == 200
    assert r.stats.failed == 1 and r.sims["comfyui"].work == []


async def test_a_stranger_first_seen_by_the_jobs_own_reading_refuses_it_as_gpu_in_use_without_waiting(rig):
    """A stranger that came after the last poll passes admission; the job's own reading, when it makes room,
    shows it: gpu_in_use there too (not insufficient_vram), and the GPU is given back at once."""
    r = await rig(tweak=_yielding(poll_s=3600))  # (no poll sees the stranger: only the job's reading)
    await status_until(
        r, lambda st: st["gpu"]["strangers"] is not None and not st["gpu"]["strangers"]["present"]
    )
    r.gpu.allocate("game", 8000, graphics=True)
    status, headers, body = await r.post("image", {"prompt": {}})
    error = error_of(status, headers, body, "gpu_in_use")
    assert "8000 MiB no consumer claims" in error["message"]
    assert r.stats.failed == 1 and r.broker.scheduler.holder is None and r.sims["comfyui"].work == []


async def test_a_job_hopeless_beside_a_stranger_first_seen_by_its_own_reading_unloads_nothing(rig):
    """Issue 22: a job that cannot fit beside a stranger even after unloading the idle consumers is
    answered gpu_in_use at once. Seen first by the job's own reading, with mvoice resident and idle: even
    with mvoice unloaded, comfyui's 13000 + 256 + 2048 could not fit beside the game's 8000 (7904 free at
    most), so mvoice is not unloaded for nothing (a reload for its next job), and the job does not wait for
    its memory holding the GPU."""
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=_yielding(poll_s=3600))
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    r.gpu.allocate("game", 8000, graphics=True)  # 15904 - 2800 - 8000 = 5104 free: no yield needed
    status, headers, body = await r.post("image", {"prompt": {}})
    error = error_of(status, headers, body, "gpu_in_use")
    assert "at most 7904 MiB can be made free" in error["message"]
    assert r.sims["mvoice"].unloads == 0 and r.sims["mvoice"].loaded and r.stats.evictions == 0
    assert r.sims["comfyui"].work == [] and r.broker.scheduler.holder is None


async def test_a_reservations_end_loads_again_what_it_unloaded_unless_it_was_told_not_to(rig, capsys):
    """Issue 22: a reservation's end restores what it unloaded (and only what was resident: comfyui, not
    loaded before, is not loaded after), as an internal job of the lowest priority; ``restore: false``
    (``reserve --no-restore``) leaves it unloaded."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    async with r.session.post(r.url("/v1/reserve"), json={"for_s": 60, "reason": "gaming"}) as resp:
        answer = await resp.json()
    assert answer["restore"] is True and answer["unloaded"] == ["mvoice", "comfyui"]
    assert not r.sims["mvoice"].loaded
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert resp.status == 200
    await until(lambda: r.sims["mvoice"].loaded)
    await until(lambda: r.stats.restores == 1)
    events = [(e["event"], e.get("consumer")) for e in recent_events(r.broker.events)]
    after = events[events.index(("reservation_ended", "reservation")) :]
    assert [e for e in after if e[0] in ("loading", "loaded", "restored")] == [
        ("loading", "mvoice"),
        ("loaded", "mvoice"),
        ("restored", "mvoice"),
    ]
    assert r.sims["comfyui"].loads == 0
    rc, out, err = await verb(capsys, "reserve", "1m", "--no-restore", "--url", r.url(""))
    assert rc == 0 and "nothing is loaded again at its end" in out, (out, err)
    assert (await r.status())["gpu"]["reservation"]["restore"] is False and not r.sims["mvoice"].loaded
    assert r.broker.scheduler.reservation.to_restore == ["mvoice"]  # (what it would restore)
    assert r.broker.scheduler.reservations.release("released")  # (here: what its end decides, seen at once)
    assert r.broker.internal.to_restore[0] == [] and r.stats.restores == 1
    async with r.session.post(r.url("/v1/reserve"), json={"for_s": 60, "restore": "no"}) as resp:
        assert (await resp.json())["error"] == "bad_request"


async def test_a_restore_whose_own_reading_finds_a_stranger_back_waits_for_it_to_go_again(rig):
    """Issue 22: a stranger that comes back stops the restores; they go on once it has been gone
    restore_after_s again. The game comes back between the last poll and the restore's own reading (the
    restore found no stranger, then its reading shows one, and mvoice does not fit beside it): mvoice is
    not given up, and is loaded again once the game is gone."""
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=_yielding(restore_after_s=0.5))
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    async with r.session.post(r.url("/v1/reserve"), json={"for_s": 60, "reason": "gaming"}) as resp:
        assert (await resp.json())["unloaded"] == ["mvoice", "comfyui"]
    real, came = r.broker.internal._fits_then_load, []

    async def game_comes_back(job: m.Job, kind: str) -> bool:
        if kind == "restore" and not came:  # (after the restore saw no stranger, before its reading)
            came.append(job.id)
            r.gpu.allocate("game", 12000, graphics=True)  # 15904 - 12000 = 3904 free < 2800 + 256 + 2048
        return await real(job, kind)

    r.broker.internal._fits_then_load = game_comes_back  # type: ignore[method-assign]
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert resp.status == 200
    await until(
        lambda: any(e["event"] == "restore_skipped" for e in recent_events(r.broker.events)), timeout=10
    )
    assert not r.sims["mvoice"].loaded and came
    r.gpu.release("game")
    await until(lambda: r.sims["mvoice"].loaded, timeout=15)
    await until(lambda: r.stats.restores == 1)
    assert r.sims["mvoice"].loads == 1 and r.broker.internal.to_restore[0] == []


async def test_a_restore_waiting_for_the_gpu_when_a_stranger_comes_is_not_refused_and_loads_once_it_goes(rig):
    """Issue 22: gpu_in_use answers the client jobs waiting that could not fit beside a stranger, never the
    broker's own exclusive ones. A restore waiting behind a running job when a game comes that mvoice could
    not fit beside stays queued through the polls, and loads mvoice once the game is gone. (A mutation
    audit: a poll that refused exclusive jobs too gave the restore gpu_in_use, and mvoice was given up for
    good, never loaded again; no test saw it.)"""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(tweak=_yielding(restore_after_s=0.2), urls={"ollama": ollama.url})
        s = r.broker.scheduler
        llm = asyncio.ensure_future(r.post("llm", {"prompt": "hold"}))
        await status_until(r, lambda st: st["scheduler"]["holder"] is not None)
        try:
            r.broker.internal.to_restore[0] = ["mvoice"]  # (as a yield leaves it)
            await until(lambda: [j.kind for j in s.lock.waiting] == ["restore"], timeout=10)
            r.gpu.allocate("game", 12000, graphics=True)  # 15904 - 12000 = 3904 free < 2800 + 256 + 2048
            await until(lambda: s.strangers.present, timeout=10)
            queries = r.broker.gpus[0].queries
            await until(lambda: r.broker.gpus[0].queries >= queries + 3, timeout=10)  # polls beside it
            assert [j.kind for j in s.lock.waiting] == ["restore"]
            r.gpu.release("game")
            await until(lambda: not s.strangers.present, timeout=10)
        finally:
            gate.set()
        assert (await llm)[0] == 200
    await until(lambda: r.stats.restores == 1, timeout=15)
    assert r.sims["mvoice"].loads == 1 and r.broker.internal.to_restore[0] == []


async def test_a_restore_refused_by_a_full_queue_waits_for_later_not_given_up(rig):
    """Issue 22: what waits to be restored is loaded again once it may. A restore turned away at the queue's
    door (queue_full: jobs fill max_queue) was logged "restore failed" and given up for good, as if its load
    had failed; it now waits for the next round, as one refused by a reservation does."""
    r = await rig(
        sims={"ollama": {"lines": 40, "line_interval_s": 0.05}},
        tweak=lambda raw: raw["scheduler"].update(max_queue=1),
    )
    internal = r.broker.internal
    async with r.session.post(r.url("/v1/llm"), json={"model": "m", "prompt": "p"}) as stream:
        await stream.content.readline()  # ollama holds the GPU
        waiting = asyncio.create_task(r.post("llm", {"model": "m", "prompt": "q"}))
        await until(lambda: len(r.broker.scheduler.queue()) == 1)  # max_queue: full
        internal.to_restore[0] = ["mvoice"]
        await internal.restore_all(0, lambda: True)
        assert internal.to_restore[0] == ["mvoice"] and not r.sims["mvoice"].loaded
        await stream.read()
    assert (await waiting)[0] == 200
    await internal.restore_all(0, lambda: True)
    assert r.sims["mvoice"].loaded and internal.to_restore[0] == [] and r.stats.restores == 1


async def test_a_restore_that_does_not_fit_with_no_stranger_is_given_up_not_tried_every_round(rig):
    """Issue 22: a restore never evicts. One that does not fit when no stranger is present (memory the broker
    does not count as a stranger's: gpu.yield off) is skipped once and given up, not tried again each round;
    one already resident is done with likewise. (A mutation audit: keeping either to be tried again went
    unseen.)"""
    r = await rig(sims={"comfyui": {"loaded": True}})
    internal = r.broker.internal
    r.gpu.allocate("other", 1000)  # 15904 - 13000 - 1000 = 1904 free < mvoice's 2800 + 256
    internal.to_restore[0] = ["mvoice", "comfyui"]
    await internal.restore_all(0, lambda: True)
    assert internal.to_restore[0] == [] and not r.sims["mvoice"].loaded and r.stats.restores == 0
    events = [(e["event"], e.get("consumer")) for e in recent_events(r.broker.events)]
    assert ("restore_skipped", "mvoice") in events


async def test_restores_load_the_most_recently_used_first_when_room_runs_out_before_the_rest():
    """docs/decisions.md: restores go the most recently used first (the likeliest to be asked for next, and
    room may run out before the rest). t and z wait to be restored, t added first but z used last; there
    is room for one of them: z is loaded, t skipped and given up. (A mutation audit: restoring in the
    order they were added, or the least recently used first, went unseen.)"""
    s, gpu, ops, clock = make_scheduler(small_config())
    jobs = internal_jobs(s)
    crowd(gpu, ops, {"x": clock.now - 50, "y": clock.now - 40})
    gpu.held.pop("z")  # x and y resident: 15904 - 8000 = 7904 free, room for one of 4000 + 256
    ops.states["z"].unloaded()
    ops.states["t"].last_used, ops.states["z"].last_used = clock.now - 20, clock.now - 10
    jobs.to_restore[0] = ["t", "z"]
    await jobs.restore_all(0, lambda: True)
    assert ops.calls == [("load", "z")] and s.stats.restores == 1 and jobs.to_restore[0] == []
    assert ops.states["z"].resident is True and ops.states["t"].resident is False
    events = [(e["event"], e["consumer"]) for e in recent_events(s.events) if "restore" in e["event"]]
    assert events == [("restored", "z"), ("restore_skipped", "t")]
    assert s.holder is None and books_balance(s)


async def test_a_restore_granted_beside_a_stranger_that_came_while_it_waited_loads_nothing_and_waits():
    """docs/how-it-works.md: a stranger that comes back stops the restores; they go on once it is gone. t's
    restore waits behind x's job when a stranger comes (the poll sees it); granted, it loads nothing, though
    t would fit beside the stranger and keep_free_mib (8904 MiB free, 4000 + 256 + 2048 needed): restore
    skipped, "a stranger is present", and t still waits. Once the stranger is gone it is loaded. (A
    mutation audit: a restore that did not look for a stranger once granted went unseen; the tests' games
    left no room for the consumer, which was then skipped as not fitting.)"""
    s, gpu, ops, clock = make_scheduler(_yield_config())
    jobs = internal_jobs(s)
    gpu.held["x"] = 4000
    ops.states["x"].loaded()
    for name in ("t", "y", "z"):
        ops.states[name].unloaded()
    s.strangers.seen(_reading(s, {"x": 4000}, {}, clock()))  # the last poll: no stranger
    jobs.to_restore[0] = ["t"]
    running = await s.acquire("x", "kx")
    restore = asyncio.ensure_future(jobs.restore_all(0, lambda: True))
    await until(lambda: [j.kind for j in s.queue()] == ["restore"])
    gpu.held["game"] = 3000
    s.strangers.seen(_reading(s, {"x": 4000}, {4242: 3000}, clock()))  # a poll while it waits
    assert s.strangers.present
    running.release("completed", status=200, success=True)
    await asyncio.wait_for(restore, 5)
    assert ops.calls == [] and jobs.to_restore[0] == ["t"] and s.stats.restores == 0
    skipped = [e for e in recent_events(s.events) if e["event"] == "restore_skipped"]
    assert [(e["consumer"], e["reason"]) for e in skipped] == [("t", "a stranger is present")]
    gpu.held.pop("game")
    s.strangers.seen(_reading(s, {"x": 4000}, {}, clock()))
    assert not s.strangers.present
    await jobs.restore_all(0, lambda: True)
    assert ops.calls == [("load", "t")] and jobs.to_restore[0] == [] and s.stats.restores == 1
    assert s.holder is None and books_balance(s)


async def test_only_what_was_resident_when_it_yielded_is_restored_not_one_of_unknown_residency():
    """docs/decisions.md: only what was resident when it yielded is restored (loading afterwards what was
    not loaded before would be a change, not a restore). A game leaves 904 MiB free (keep_free_mib 6000):
    z (of unknown residency: its last unload failed) and then y (resident) yield, the least recently used
    first. Once the game is gone, y is loaded again and z is not. (A mutation audit: restoring every
    consumer that yielded went unseen.)"""
    s, gpu, ops, clock = make_scheduler(_yield_config(keep=6000))
    jobs = internal_jobs(s)
    crowd(gpu, ops, {"x": clock.now - 10, "y": clock.now - 20, "z": clock.now - 30})
    gpu.reserved += 3000  # the game's memory (a graphics process: in no process list)
    held = {"x": 4000, "y": 4000, "z": 4000}
    s.strangers.seen(_reading(s, held, {-1: 3000}, clock()))
    assert s.strangers.present
    ops.states["z"].unload_failed()  # (its memory still measured: 4000 MiB)
    assert ops.states["z"].resident is None and ops.states["y"].resident is True
    await jobs.yield_unload("z")
    await jobs.yield_unload("y")
    assert ops.calls == [("unload", "z"), ("unload", "y")] and s.stats.yields == 2
    assert jobs.to_restore[0] == ["y"]
    gpu.reserved -= 3000
    s.strangers.seen(_reading(s, {"x": 4000}, {}, clock()))  # the game is gone
    await jobs.restore_all(0, lambda: True)
    assert ops.calls[2:] == [("load", "y")] and s.stats.restores == 1 and jobs.to_restore[0] == []
    assert ops.states["z"].resident is False and s.holder is None and books_balance(s)


async def test_a_restore_whose_reading_fails_waits_for_the_next_round_not_given_up(rig):
    """Found by an attack on issue 22: a GPU reading that failed when a restore was due (gpu_unavailable:
    whether it fits is not known) gave the consumer up for good, and the state file forgot it; it now waits
    for the next round, and is loaded once the GPU can be read again."""
    r = await rig()
    internal = r.broker.internal
    internal.to_restore[0] = ["mvoice"]
    r.gpu.set_fault("fail")
    await internal.restore_all(0, lambda: True)
    assert internal.to_restore[0] == ["mvoice"] and not r.sims["mvoice"].loaded
    r.gpu.set_fault(None)
    await internal.restore_all(0, lambda: True)
    assert r.sims["mvoice"].loaded and internal.to_restore[0] == [] and r.stats.restores == 1


async def test_a_yield_cut_by_shutdown_after_its_unload_answered_still_waits_to_be_restored(rig, tmp_path):
    """Issue 22: the state file holds what waits to be restored. A yield whose unload answered (mvoice's
    model is gone) while its memory is still being waited for (vram_wait_s), cut there by the broker's
    shutdown (`make deploy` during a game; shutdown_timeout_s shorter than that wait): mvoice waits to be
    restored in the state file all the same, so the restarted broker loads it again once the game is
    gone."""
    path = tmp_path / "state.json"

    def tweak(raw: dict[str, Any]) -> None:
        _yielding()(raw)
        raw["state_file"] = str(path)
        raw["scheduler"]["shutdown_timeout_s"] = 0.5

    r = await rig(sims={"mvoice": {"loaded": True, "release_s": 30}}, tweak=tweak)
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    r.gpu.allocate("game", 12000, graphics=True)  # 15904 - 2800 - 12000 = 1104 free < 2048: mvoice yields
    await until(lambda: r.sims["mvoice"].unloads == 1, timeout=10)
    await asyncio.sleep(0.3)  # (its memory is being waited for: 30 s before the sim frees it)
    assert r.stats.yields == 0
    await r.server.close()  # SIGTERM's shutdown: the yield is cut
    written = json.loads(path.read_text())
    assert written["gpus"]["0"]["to_restore"] == ["mvoice"], written


async def test_a_restore_cut_by_shutdown_mid_load_still_waits_to_be_restored(rig, tmp_path):
    """Issue 22: the state file holds what waits to be restored. The game is gone and mvoice's restore is
    loading it (a slow load) when the broker shuts down and cuts it: the load did not end, so mvoice still
    waits to be restored in the state file (the restarted broker loads it again), not forgotten."""
    path = tmp_path / "state.json"

    def tweak(raw: dict[str, Any]) -> None:
        _yielding(restore_after_s=0)(raw)
        raw["state_file"] = str(path)
        raw["scheduler"]["shutdown_timeout_s"] = 0.5

    r = await rig(sims={"mvoice": {"loaded": True, "load_s": 30}}, tweak=tweak)
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    r.gpu.allocate("game", 12000, graphics=True)  # 15904 - 2800 - 12000 = 1104 free < 2048: mvoice yields
    await until(lambda: r.stats.yields == 1 and r.broker.internal.to_restore.get(0) == ["mvoice"], timeout=30)
    r.gpu.release("game")

    def restoring() -> bool:
        return any(
            e["event"] == "loading" and e["consumer"] == "mvoice" for e in recent_events(r.broker.events)
        )

    await until(restoring, timeout=15)
    await r.server.close()  # SIGTERM's shutdown: the restore's load is cut
    assert r.stats.restores == 0 and r.sims["mvoice"].loads == 0
    written = json.loads(path.read_text())
    assert written["gpus"].get("0", {}).get("to_restore") == ["mvoice"], written


async def test_a_reload_of_gpu_yield_takes_effect_at_once_not_after_the_old_poll_s(rig):
    """Found by an attack on issue 22: the yield's rounds slept the old poll_s (an hour here) or 5 s without
    gpu.yield whatever a reload said meanwhile, so a game already present was seen only then. A reload
    wakes them: the game is seen, and mvoice yields, at once."""
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=_yielding(poll_s=3600))
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    r.gpu.allocate("game", 12000, graphics=True)  # 1104 free < keep_free_mib 2048: mvoice should yield
    r.raw["gpu"]["yield"]["poll_s"] = 0.2
    r.config_path.write_text(yaml.safe_dump(r.raw, sort_keys=False))
    async with r.session.post(r.url("/v1/reload")) as resp:
        assert resp.status == 200, await resp.read()
    await until(lambda: r.stats.yields == 1 and not r.sims["mvoice"].loaded, timeout=30)


async def test_a_reload_that_turns_gpu_yield_off_ends_the_stranger_and_restores_what_waits(rig):
    """Issue 22: without gpu.yield there is no stranger, and what waits to be restored is restored at once,
    each if it fits. A reload turns gpu.yield off while a game holds 12000 MiB and mvoice waits to be
    restored for it: the stranger is gone (its event), and mvoice, which fits beside the game's memory, is
    loaded again; not skipped every round as if a stranger were still present."""
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=_yielding())
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    r.gpu.allocate("game", 12000, graphics=True)  # 15904 - 2800 - 12000 = 1104 free < 2048: mvoice yields
    await until(lambda: r.stats.yields == 1 and r.broker.internal.to_restore.get(0) == ["mvoice"], timeout=30)
    del r.raw["gpu"]["yield"]
    r.config_path.write_text(yaml.safe_dump(r.raw, sort_keys=False))
    async with r.session.post(r.url("/v1/reload")) as resp:
        assert resp.status == 200, await resp.read()
    # 3904 MiB free beside the game: mvoice's 2800 + 256 fit.
    await until(lambda: r.sims["mvoice"].loaded, timeout=15)
    await until(lambda: r.stats.restores == 1)
    events = recent_events(r.broker.events)
    assert [e["present"] for e in events if e["event"] == "stranger"] == [True, False]
    assert not [e for e in events if e["event"] == "restore_skipped"]
    assert not r.broker.scheduler.strangers.present


async def test_a_consumers_exiting_process_that_lost_its_name_is_no_stranger_and_yields_nothing(rig):
    """Issue 22: a stranger is memory that no consumer's processes hold. A process that exits has no name
    any more (its /proc cmdline is empty) a moment before its memory goes: ComfyUI stopped (or Ollama's
    runner ending at its keep_alive) leaves its 13000 MiB under its pid, nameless, for a few polls. That pid
    was comfyui's at the last reading and still is: no stranger appears, and idle mvoice (with 104 MiB
    free, below keep_free_mib) is not unloaded for nobody."""
    sims = {"mvoice": {"loaded": True}, "comfyui": {"loaded": True}}
    r = await rig(sims=sims, tweak=_yielding())  # 15904 - 2800 - 13000 = 104 MiB free
    await status_until(r, lambda st: st["consumers"]["comfyui"]["vram_used_mib"] == 13000)
    queries = r.broker.gpus[0].queries
    await until(lambda: r.broker.gpus[0].queries >= queries + 3, timeout=10)  # a poll: no stranger
    assert not r.broker.scheduler.strangers.present
    comfy = r.sims["comfyui"]
    r.gpu.allocate("comfyui", 13000, process="", pid=comfy.pid)  # exiting: its name gone, its memory not
    queries = r.broker.gpus[0].queries
    await until(lambda: r.broker.gpus[0].queries >= queries + 12, timeout=20)  # four polls and more
    r.gpu.release("comfyui")  # its memory goes
    await status_until(r, lambda st: st["consumers"]["comfyui"]["loaded"] is False, timeout=10)
    events = recent_events(r.broker.events)
    assert [e for e in events if e["event"] == "stranger"] == []
    assert r.sims["mvoice"].unloads == 0 and r.stats.yields == 0


async def test_a_yield_refused_by_a_reservation_is_no_failed_unload_and_the_consumer_yields_later(rig):
    """Issue 22: a consumer whose unload failed or freed nothing is not asked again while that stranger
    stays; one whose yield was only refused (gpu_reserved: a reservation asked for first took the GPU) has
    not failed. After the reservation, mvoice is loaded by a job beside the same game; when the game grows,
    mvoice is yielded for it, not left to starve it."""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(sims={"mvoice": {"loaded": True}}, tweak=_yielding(), urls={"ollama": ollama.url})
        await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
        s = r.broker.scheduler
        llm = asyncio.ensure_future(r.post("llm", {"prompt": "hold"}))
        await status_until(r, lambda st: st["scheduler"]["holder"] is not None)
        reserve = asyncio.ensure_future(
            r.session.post(r.url("/v1/reserve"), json={"for_s": 60, "reason": "gaming", "restore": False})
        )
        await until(lambda: len(s.lock.waiting) == 1)  # the reservation waits for the GPU
        r.gpu.allocate("game", 12000, graphics=True)  # 15904 - 2800 - 12000 = 1104 free: mvoice must yield
        await until(lambda: [j.kind for j in s.lock.waiting] == ["reservation", "yield"], timeout=10)
        gate.set()
        assert (await llm)[0] == 200
        async with await reserve as resp:
            assert resp.status == 200 and (await resp.json())["unloaded"][0] == "mvoice"
        async with r.session.delete(r.url("/v1/reserve")) as resp:
            assert resp.status == 200
    r.gpu.allocate("game", 8000, graphics=True)  # the same game, smaller for a while: still a stranger
    assert (await r.post("tts", {"text": "beside the game"}))[0] == 200  # 7904 free >= 2800 + 256 + 2048
    unloads = r.sims["mvoice"].unloads
    r.gpu.allocate("game", 12000, graphics=True)  # it grows again: 1104 free
    await until(lambda: r.sims["mvoice"].unloads == unloads + 1, timeout=15)
    await until(lambda: r.stats.yields == 1)  # (counted once its memory came free: a moment after)
    assert r.gpu.free_mib() >= 2048


async def test_a_reserved_gpu_asks_no_yield_of_what_its_reservation_could_not_unload(rig, caplog):
    """Issue 22: while the GPU is reserved, the reservation has it, strangers included: the polls ask no
    yield. mvoice's unload failed when the GPU was reserved, so it stays resident beside a game that leaves
    too little free; poll after poll asks nothing of it (each ask would be refused gpu_reserved and logged
    "yield failed", every poll_s for the whole game). A mutation audit found the poll's reservation check
    untested."""
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=_yielding())
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    r.sims["mvoice"].faults["unload_status"] = 500
    status, _, answer = await _reserve(r, for_s=60, reason="gaming")
    assert status == 200 and "mvoice" in answer["not_unloaded"]
    r.gpu.allocate("game", 12000, graphics=True)  # 15904 - 2800 - 12000 = 1104 free < 2048
    s = r.broker.scheduler
    await until(lambda: s.strangers.present, timeout=10)
    queries = r.broker.gpus[0].queries
    await until(lambda: r.broker.gpus[0].queries >= queries + 5, timeout=10)  # polls beside the game
    assert not [rec.getMessage() for rec in caplog.records if "yield" in rec.getMessage()]
    assert r.stats.yields == 0 and s.reservation is not None


async def test_a_reserved_gpu_tries_no_restore_until_its_reservation_ends(rig, caplog):
    """Issue 22: what waits to be restored (mvoice, yielded for a game that has gone) is not tried while the
    GPU is reserved: poll after poll asks nothing (each try would be refused gpu_reserved at the queue's
    door and put off, every poll_s for the whole reservation); once the reservation ends, mvoice is loaded
    again. (A mutation audit: the restores' reservation check in ``Yielding._may`` went unseen.)"""
    r = await rig(tweak=_yielding(restore_after_s=0.2))
    status, _, _ = await _reserve(r, for_s=60, reason="gaming", restore=False)
    assert status == 200
    r.broker.internal.to_restore[0] = ["mvoice"]  # (as a yield before the reservation left it)
    strangers, gpu = r.broker.scheduler.strangers, r.broker.gpus[0]

    def read_since(t: float | None) -> bool:
        reading = gpu.last_reading()
        return t is not None and reading is not None and reading.started > t

    # A poll when no stranger has been present for restore_after_s (the restores would be due), and the
    # next one: nothing tried.
    await until(lambda: read_since((strangers.absent_since or math.inf) + 0.2), timeout=10)
    mark = gpu.last_reading().started
    await until(lambda: read_since(mark), timeout=10)
    assert not [rec.getMessage() for rec in caplog.records if "restore" in rec.getMessage()]
    assert r.broker.internal.to_restore[0] == ["mvoice"] and not r.sims["mvoice"].loaded
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert resp.status == 200
    await until(lambda: r.stats.restores == 1, timeout=15)
    assert r.sims["mvoice"].loads == 1 and r.broker.internal.to_restore[0] == []


async def test_a_yield_granted_after_a_job_came_for_its_consumer_leaves_it_and_takes_another(rig):
    """Issue 22: a yield decides again once granted. mvoice's yield waits behind a running job; meanwhile a
    tts job comes for mvoice: once granted, the yield leaves mvoice (unloaded, it would be loaded again at
    once for that job) and comfyui goes instead. (A mutation audit: a yield that unloaded its consumer
    whoever the plan put first by then went unseen.)"""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(
            total_mib=24576,
            sims={"mvoice": {"loaded": True}, "comfyui": {"loaded": True}},
            tweak=_yielding(),
            urls={"ollama": ollama.url},
        )
        await status_until(r, lambda st: st["consumers"]["comfyui"]["vram_used_mib"] == 13000)
        await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
        s = r.broker.scheduler
        llm = asyncio.ensure_future(r.post("llm", {"prompt": "hold"}))
        try:
            await status_until(r, lambda st: st["scheduler"]["holder"] is not None)
            r.gpu.allocate("game", 8000, graphics=True)  # 24096 - 15800 - 8000 = 296 free
            await until(lambda: [(j.kind, j.consumer) for j in s.lock.waiting] == [("yield", "mvoice")])
            tts = asyncio.ensure_future(r.post("tts", {"text": "beside the game"}))
            await until(lambda: [j.consumer for j in s.lock.waiting] == ["mvoice", "mvoice"])
        finally:
            gate.set()
        assert (await llm)[0] == 200 and (await tts)[0] == 200
    await until(lambda: r.sims["comfyui"].unloads == 1, timeout=15)
    assert r.sims["mvoice"].unloads == 0 and r.sims["mvoice"].loads == 0
    skipped = [e for e in recent_events(r.broker.events) if e["event"] == "yield_skipped"]
    assert [(e["consumer"], e["reason"]) for e in skipped] == [("mvoice", "comfyui goes first")]


async def test_a_consumer_whose_unload_frees_nothing_is_not_asked_again_while_the_stranger_stays(rig):
    """mvoice answers its unload but keeps its memory: its yield fails (unload_failed, after vram_wait_s),
    the next idle consumer goes instead, and mvoice is not asked again while this stranger stays, however
    many polls find free memory short. Once that stranger is gone, the next one asks it again (a mutation
    audit found forgetting the failure untested: mvoice was never asked again, for any stranger)."""

    def tweak(raw: dict[str, Any]) -> None:
        _yielding()(raw)
        raw["scheduler"]["vram_wait_s"] = 0.5

    r = await rig(
        total_mib=24576, sims={"mvoice": {"loaded": True}, "comfyui": {"loaded": True}}, tweak=tweak
    )
    r.sims["mvoice"].faults["unload_no_release"] = True
    await status_until(r, lambda st: st["consumers"]["comfyui"]["vram_used_mib"] == 13000)
    r.gpu.allocate("game", 8000, graphics=True)  # 24096 - 15800 - 8000 = 296 free: both are asked
    # comfyui's yield done (its memory seen free) before the game grows into that memory.
    await until(
        lambda: any(
            e["event"] in ("finished", "failed") and e["kind"] == "yield" and e["consumer"] == "comfyui"
            for e in recent_events(r.broker.events)
        ),
        timeout=30,
    )
    assert r.sims["mvoice"].unloads == 1  # (never used, both: mvoice, listed first, was asked first)
    r.gpu.allocate("game", 20000, graphics=True)  # 24096 - 2800 - 20000 = 1296 free: short again
    queries = r.broker.gpus[0].queries
    await until(lambda: r.broker.gpus[0].queries >= queries + 9, timeout=30)  # three polls and more
    assert r.sims["mvoice"].unloads == 1 and r.stats.unload_failures == 0
    jobs = [e for e in recent_events(r.broker.events) if e["event"] == "failed" and e["kind"] == "yield"]
    assert [(e["consumer"], e["code"]) for e in jobs] == [("mvoice", "unload_failed")]
    assert r.stats.yields == 1  # comfyui's: mvoice's, which freed nothing, is not counted as a yield
    r.gpu.release("game")
    await until(lambda: not r.broker.scheduler.strangers.present, timeout=10)
    r.gpu.allocate("game", 20000, graphics=True)  # another game, as short of memory

    def mvoice_yields() -> int:
        jobs = [(e["event"], e.get("kind"), e.get("consumer")) for e in recent_events(r.broker.events)]
        return jobs.count(("failed", "yield", "mvoice"))

    await until(lambda: mvoice_yields() == 2, timeout=15)


async def test_a_yield_whose_memory_a_greedy_game_takes_at_once_still_freed_it(rig):
    """A game that takes memory the moment it comes free leaves the free figure where it was: whether a
    yield freed its memory is read from the victim's own processes, which no longer hold it. Both idle
    consumers yield, each counted once, and none is an unload_failed job."""

    def tweak(raw: dict[str, Any]) -> None:
        _yielding()(raw)
        raw["scheduler"]["vram_wait_s"] = 2

    r = await rig(
        total_mib=24576, sims={"mvoice": {"loaded": True}, "comfyui": {"loaded": True}}, tweak=tweak
    )
    await status_until(r, lambda st: st["consumers"]["comfyui"]["vram_used_mib"] == 13000)
    r.gpu.greedy("game", 20000)  # takes the 8296 MiB free, and whatever comes free later
    assert r.gpu.free_mib() == 0

    def yield_ends() -> list[tuple[str, str]]:  # (a job's end event comes a moment after its yielded one)
        return sorted(
            (e["event"], e["consumer"])
            for e in recent_events(r.broker.events)
            if e["event"] in ("finished", "failed") and e["kind"] == "yield"
        )

    await until(lambda: len(yield_ends()) == 2, timeout=30)
    assert yield_ends() == [("finished", "comfyui"), ("finished", "mvoice")]
    assert r.stats.yields == 2 and r.sims["mvoice"].unloads == 1 and r.sims["comfyui"].unloads == 1
    assert r.gpu.used_mib("game") == 20000 and r.gpu.free_mib() == 4096
    events = recent_events(r.broker.events)
    assert not [e for e in events if e["event"] == "memory_not_freed"]
    assert r.broker.consumers.states["mvoice"].resident is False


@no_overfill
async def test_a_victim_whose_process_loses_its_name_before_its_memory_is_waited_for_still(rig):
    """A process that exits has no name any more (its /proc cmdline is empty) a moment before its memory
    goes: the reading lists it, but no consumer's ``processes`` match it. What the victim's processes
    before the unload still hold is its memory all the same: the eviction waits for it to come free, and
    mvoice then runs (read from the attribution alone, comfyui's memory was gone at once, and there was no
    room and no other victim: insufficient_vram)."""

    def measured(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["processes"] = {"name": "*/ComfyUI/*"}
        raw["consumers"]["mvoice"]["processes"] = {"name": "*/mvoice/*"}

    sims = {"comfyui": {"loaded": True, "release_s": 0.5}, "mvoice": {"loaded": False}}
    r = await rig(total_mib=15000, sims=sims, tweak=measured)  # the two do not fit together
    await status_until(r, lambda st: st["consumers"]["comfyui"]["vram_used_mib"] == 13000)
    sim = r.sims["comfyui"]
    unload = sim.do_unload

    async def exiting() -> None:
        held = r.gpu.used_mib("comfyui")
        await unload()  # (its memory goes release_s later)
        r.gpu.allocate("comfyui", held, process="", pid=sim.pid)  # its name gone, its memory not yet

    sim.do_unload = exiting  # type: ignore[method-assign]
    status, _, body = await r.post("tts", {"text": "after the render"})
    nothing_overfilled(r.gpu)
    assert status == 200, body
    assert r.stats.evictions == 1 and sim.unloads == 1 and r.sims["mvoice"].loads == 1


def test_what_a_victim_holds_is_what_its_processes_from_before_and_those_attributed_to_it_hold():
    """``held_mib``, what an unload waits to see gone: the victim's processes from before the unload, whose
    ever the reading says they are (one that exits loses its name, and a consumer recognised by its unit
    alone then by its cgroup too), and any the reading attributes to it (one it started meanwhile); never
    another's or a stranger's (a mutation audit: either half dropped failed no test)."""
    procs = (
        m.GpuProcess(10, "", 3000),  # the victim's, exiting: nobody's by the reading
        m.GpuProcess(11, "/opt/ComfyUI/python3", 500),  # the victim's, new
        m.GpuProcess(12, "/opt/mvoice/python3", 2800),  # another consumer's
        m.GpuProcess(13, "/usr/bin/game", 6000),  # a stranger's
        m.GpuProcess(None, "/usr/bin/other", 700),  # no pid: nobody's
    )
    reading = m.GpuReading(0, "GPU-x", "sim", 16384, 13000, 2904, 0, 40, procs, 0, 0)
    reading = dataclasses.replace(reading, owners={11: "comfyui", 12: "mvoice"})
    assert m.held_mib(reading, "comfyui", frozenset({10})) == 3500
    assert m.held_mib(reading, "comfyui") == 500
    assert m.held_mib(reading, "mvoice", frozenset({99})) == 2800


async def test_status_metrics_events_and_ps_show_the_stranger_and_what_yielded_for_it(rig, capsys):
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=_yielding(restore_after_s=0.5))
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    pid = mgpusim.fake_pid("/usr/bin/train.py")
    r.gpu.allocate("train", 12000, process="/usr/bin/train.py")  # 15904 - 2800 - 12000 = 1104 free
    st = await status_until(r, lambda st: st["consumers"]["mvoice"]["loaded"] is False, timeout=30)
    st = await status_until(r, lambda st: st["gpu"]["unclaimed_mib"] == 12000)
    strangers = st["gpu"]["strangers"]
    assert strangers["present"] and strangers["since"].endswith("Z") and strangers["more_processes"] == 0
    assert strangers["processes"] == [{"pid": pid, "name": "/usr/bin/train.py", "used_mib": 12000}]
    assert st["gpus"][0]["strangers"] == strangers and st["gpus"][0]["unclaimed_mib"] == 12000
    assert st["scheduler"]["stats"]["yields"] == 1
    rc, out, _ = await verb(capsys, "ps", "--url", r.url(""))
    assert rc == 0
    line = next(x for x in out.splitlines() if "strangers:" in x)
    assert line.startswith("  strangers: 12000 MiB no consumer claims, since ")
    assert out.split("strangers:")[1].replace("\n", " ").split(": ", 1)[1].split() == [
        "pid",
        str(pid),
        "/usr/bin/train.py",
        "(12000",
        "MiB)",
    ]
    async with r.session.get(r.url("/metrics")) as resp:
        families = _families(await resp.text())
    assert _value(families, "mgpumanager_unclaimed_mib", gpu="0") == 12000
    assert _value(families, "mgpumanager_yields_total", consumer="mvoice") == 1
    assert _value(families, "mgpumanager_gpu_readings_total", gpu="0") == r.broker.gpus[0].queries
    r.gpu.release("train")
    await status_until(r, lambda st: st["consumers"]["mvoice"]["loaded"] is True, timeout=30)
    async with r.session.get(r.url("/metrics")) as resp:
        families = _families(await resp.text())
    assert _value(families, "mgpumanager_restores_total", consumer="mvoice") == 1
    named = [e for e in recent_events(r.broker.events) if e["event"] in ("stranger", "yielded", "restored")]
    assert [(e["event"], e.get("present"), e.get("consumer")) for e in named] == [
        ("stranger", True, None),
        ("yielded", None, "mvoice"),
        ("stranger", False, None),
        ("restored", None, "mvoice"),
    ]
    assert named[0]["processes"] == strangers["processes"] and named[1]["by"] == "yield"
    assert named[1]["unclaimed_mib"] == 12000 and named[1]["free_mib"] >= 2048
    rc, out, _ = await verb(capsys, "ps", "--url", r.url(""))
    assert "strangers:" not in out


async def test_the_gpu_is_read_once_per_poll_s_and_status_shows_that_reading(rig):
    """gpu.yield reads the GPU every poll_s, and /v1/status answers from that reading (it adds none of its
    own, however often it is asked): a reading per poll_s, not more."""
    r = await rig(tweak=_yielding(poll_s=0.5))
    await status_until(r, lambda st: st["gpu"]["read_at"] is not None)
    queries, t0 = r.broker.gpus[0].queries, time.monotonic()
    seen = set()
    while time.monotonic() - t0 < 2 or len(seen) < 2:  # (2 s at least, and a reading after the first)
        assert time.monotonic() - t0 < 30, "no new reading within 30 s"
        seen.add((await r.status())["gpu"]["read_at"])
        await asyncio.sleep(0.02)
    elapsed = time.monotonic() - t0
    polls = 1 + math.ceil(elapsed / 0.5)
    assert len(seen) <= polls and r.broker.gpus[0].queries - queries <= 3 * polls  # (3 nvidia-smi each)


async def test_the_state_file_is_written_within_a_second_of_a_change_atomically_and_for_its_user_alone(
    rig, tmp_path
):
    path = tmp_path / "state.json"
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=lambda raw: raw.update(state_file=str(path)))
    assert (await r.post("tts", {"text": "hi"}))[0] == 200
    await until(lambda: path.exists() and "mvoice" in json.loads(path.read_text())["consumers"], timeout=5)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = json.loads(path.read_text())
    assert first["version"] == 1 and first["consumers"]["mvoice"]["timings"]["job"]
    async with r.session.post(r.url("/v1/reserve"), json={"for_s": 600, "reason": "gaming"}) as resp:
        assert resp.status == 200
    await until(lambda: "reservation" in json.loads(path.read_text())["gpus"].get("0", {}), timeout=5)
    res = json.loads(path.read_text())["gpus"]["0"]["reservation"]
    assert res["reason"] == "gaming" and res["restore"] is True and res["to_restore"] == ["mvoice"]
    assert abs(res["until_s"] - (time.time() + 600)) < 60
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".state")] == []  # no temporary left
    st = await r.status()
    assert st["state_file"]["path"] == str(path) and st["state_file"]["write_failures"] == 0


def test_a_state_file_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """Written whole or not at all: a write that fails before its end (here its fsync: a full disk, an I/O
    error, power lost) leaves the file as it was, and no temporary beside it."""
    path = tmp_path / "state.json"
    m.write_state_file(str(path), b'{"version": 1, "old": true}\n')

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(m.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        m.write_state_file(str(path), b'{"version": 1, "new": true}\n')
    assert path.read_bytes() == b'{"version": 1, "old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


async def test_a_state_file_that_cannot_be_written_is_logged_once_counted_and_never_fatal(
    rig, caplog, tmp_path
):
    r = await rig(tweak=lambda raw: raw.update(state_file=str(tmp_path / "no" / "state.json")))
    st = await status_until(r, lambda st: st["state_file"]["write_failures"] >= 2)
    assert "No such file or directory" in st["state_file"]["error"] and st["state_file"]["written"] is None
    assert (await r.post("tts", {"text": "still serving"}))[0] == 200
    warnings = [rec.getMessage() for rec in caplog.records if "state file not written" in rec.getMessage()]
    assert len(warnings) == 1 and "No such file or directory" in warnings[0]
    async with r.session.get(r.url("/metrics")) as resp:
        assert _value(_families(await resp.text()), "mgpumanager_state_write_failures_total") >= 2
    (tmp_path / "no").mkdir()
    st = await status_until(r, lambda st: st["state_file"]["error"] is None and st["state_file"]["written"])
    assert any("state file written again" in rec.getMessage() for rec in caplog.records)


async def test_a_state_file_write_that_hangs_is_given_up_in_time_and_no_second_one_piles_up(
    rig, monkeypatch, tmp_path
):
    r = await rig(tweak=lambda raw: raw.update(state_file=str(tmp_path / "state.json")))
    for task in [t for t in r.broker.tasks if t.get_name() == "state file"]:
        task.cancel()  # (this test writes it itself)
    hung, started = threading.Event(), []
    real = m.write_state_file

    def hanging(path: str, data: bytes) -> None:
        started.append(path)
        hung.wait(30)  # the file system hangs (a dead network mount)
        real(path, data)

    monkeypatch.setattr(m, "write_state_file", hanging)
    monkeypatch.setattr(m, "STATE_IO_TIMEOUT_S", 0.2)
    state = r.broker.state
    assert await state.write() is False and state.failures == 1 and "not written within 0.2 s" in state.error
    assert await state.write() is False and len(started) == 1  # the hung one still runs: none more
    hung.set()
    inflight = state._inflight
    assert inflight is not None
    await until(inflight.done)
    assert await state.write() is True and state.error is None and len(started) == 2
    assert json.loads((tmp_path / "state.json").read_text())["version"] == 1


async def test_a_second_broker_on_the_same_state_file_does_not_start_nor_touch_anything(rig, tmp_path):
    """A second broker started by mistake (a manual run beside the unit, another port) read the state file,
    probed the consumers, started its preloads and idle unloads, and wrote the state file at its exit: two
    brokers over one GPU, each blind to the other's loads. The first holds ``<state_file>.lock`` now; the
    second exits 1 before it reads or asks anything, naming the first's pid, and starts once it is gone."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    path = tmp_path / "state.json"
    raw = r.raw | {"state_file": str(path)}
    (tmp_path / "second").mkdir()
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as first:
        async with r.session.post(first.url("/v1/tts"), json={"text": "x"}) as resp:
            assert resp.status == 200
        st = await first.until(r.session, lambda st: st["state_file"]["written"] is not None)
        await asyncio.sleep(2 * m.STATE_CHECK_S)  # (the job's learned timing written too)
        state, asked = path.read_bytes(), {name: len(sim.records) for name, sim in r.sims.items()}
        second = Daemon(raw, tmp_path / "second", sim_smi(r.state))
        with pytest.raises(AssertionError, match="the daemon did not start"):
            async with second:
                pass
        assert second.proc.returncode == 1
        assert (
            f'msg="another broker runs: not starting" error="{path} is another broker\'s'
            f" (pid {first.proc.pid}" in second.log
        )
        assert path.read_bytes() == state and {n: len(s.records) for n, s in r.sims.items()} == asked
        assert (await first.status(r.session))["state_file"] | {"written": None} == st["state_file"] | {
            "written": None
        }  # (the first's writes go on, none failed)
    async with Daemon(raw, tmp_path / "second", sim_smi(r.state)) as again:  # the first is gone: it starts
        assert (await again.status(r.session))["state_file"]["error"] is None
        assert (tmp_path / "state.json.lock").read_text() == f"{again.proc.pid}\n"


async def test_a_reload_to_a_state_file_another_broker_holds_writes_none_and_says_so(rig, tmp_path):
    """The lock follows ``state_file`` through a reload: a file another broker holds is not written (a
    failed write, counted, its reason in /v1/status), the file before goes on being this broker's until
    the new one is, and a reload back writes again."""
    path, theirs = tmp_path / "state.json", tmp_path / "theirs.json"
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=lambda raw: raw.update(state_file=str(path)))
    await status_until(r, lambda st: st["state_file"]["written"] is not None)
    held = m.lock_state_file(str(theirs))  # (another broker's: a lock of its own, on another descriptor)
    try:
        r.raw["state_file"] = str(theirs)
        r.config_path.write_text(yaml.safe_dump(r.raw, sort_keys=False))
        assert await r.broker.reload() == ["changed state_file"]  # (a reload's answer lists it)
        assert (await r.post("tts", {"text": "a change to write"}))[0] == 200
        st = await status_until(r, lambda st: st["state_file"]["write_failures"] >= 1)
        assert "is another broker's" in st["state_file"]["error"] and not theirs.exists()
        with pytest.raises(m.StateFileHeld):  # the file before is still this broker's
            m.lock_state_file(str(path))
    finally:
        os.close(held)
    r.raw["state_file"] = str(path)
    r.config_path.write_text(yaml.safe_dump(r.raw, sort_keys=False))
    await r.broker.reload()
    await status_until(r, lambda st: st["state_file"]["error"] is None)


def _lock_descriptors(path: Path) -> int:
    """How many of this process's descriptors are open on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


async def test_a_lock_taken_after_its_claim_gave_up_is_let_go_not_kept_for_good(
    rig, tmp_path, monkeypatch, caplog
):
    """Found by a review: a lock taken in its thread after the claim had stopped waiting stayed held by a
    descriptor nobody knew of, so every later claim met it (flock refuses a second descriptor, in one
    process too) and the broker wrote no state file again, calling itself "another broker". The late
    descriptor is closed; the timeout is said as such (on Python 3.11 it is an OSError, whose empty
    strerror the log line showed)."""
    path = tmp_path / "state.json"
    first, locked, real = threading.Event(), threading.Event(), m.lock_state_file

    def slow_once(where: str) -> int:
        if not first.is_set():  # the claim at start: locked after its claim stopped waiting (0.2 s)
            first.set()
            time.sleep(1.0)
            fd = real(where)
            locked.set()
            return fd
        locked.wait(10)  # (the writes' claims: only once that late lock is taken)
        return real(where)

    monkeypatch.setattr(m, "lock_state_file", slow_once)
    monkeypatch.setattr(m, "STATE_IO_TIMEOUT_S", 0.2)
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=lambda raw: raw.update(state_file=str(path)))
    assert 'msg="state file not locked"' in caplog.text and 'reason="not locked within 0.2 s"' in caplog.text
    await until(locked.is_set)  # the late lock is taken (and let go)
    assert (await r.post("tts", {"text": "a change to write"}))[0] == 200  # (a write claims the lock again)
    await until(lambda: r.broker.state._lock is not None)
    st = await r.status()
    assert st["state_file"]["error"] is None and _lock_descriptors(tmp_path / "state.json.lock") == 1


async def test_a_lock_that_hangs_is_tried_once_until_it_ends_not_once_a_write(rig, tmp_path, monkeypatch):
    """Found by a reading of the change: a lock whose open hung (a dead network mount) was tried again at
    every write, each try a thread that never ends. While one hangs, no other starts; the state file is
    written all the same (here the file system hangs for the lock alone), and once the try ends the lock
    it took is let go, and the next write takes it."""
    path = tmp_path / "state.json"
    hung, tries, real = threading.Event(), [], m.lock_state_file

    def hanging(where: str) -> int:
        tries.append(where)
        hung.wait(30)
        return real(where)

    monkeypatch.setattr(m, "lock_state_file", hanging)
    monkeypatch.setattr(m, "STATE_IO_TIMEOUT_S", 0.2)
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=lambda raw: raw.update(state_file=str(path)))
    await status_until(r, lambda st: st["state_file"]["written"] is not None)  # (the first, at start)
    for text in ("one", "two", "three"):  # each a change to write
        written = (await r.status())["state_file"]["written"]  # (before the job: its write may be quick)
        assert (await r.post("tts", {"text": text}))[0] == 200
        await status_until(r, lambda st, before=written: st["state_file"]["written"] != before)
    assert len(tries) == 1 and r.broker.state._lock is None
    hung.set()
    await until(lambda: r.broker.state._locking is not None and r.broker.state._locking.done())
    assert _lock_descriptors(tmp_path / "state.json.lock") == 0  # (taken late: let go)
    assert (await r.post("tts", {"text": "four"}))[0] == 200
    await until(lambda: r.broker.state._lock is not None)
    assert len(tries) == 2 and _lock_descriptors(tmp_path / "state.json.lock") == 1


async def test_a_lock_that_cannot_be_taken_still_lets_the_state_file_be_written(rig, tmp_path, caplog):
    """Found by a review: a lock file the broker cannot open (left by a run as root, mode 0600; here a
    directory in its place) made every write fail, where the state file itself could be written: the lock
    guards against another broker, and none is seen. It is a warning, said once, and the file is written."""
    path = tmp_path / "state.json"
    (tmp_path / "state.json.lock").mkdir()
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=lambda raw: raw.update(state_file=str(path)))
    assert (await r.post("tts", {"text": "x"}))[0] == 200
    st = await status_until(r, lambda st: st["state_file"]["written"] is not None)
    assert st["state_file"]["write_failures"] == 0 and json.loads(path.read_text())["version"] == 1
    assert caplog.text.count('msg="state file not locked"') == 1


async def test_a_reload_that_drops_the_state_file_lets_its_lock_go(rig, tmp_path):
    """Found by a review: a reload that removed ``state_file`` kept the old file's lock for the life of the
    broker, so another broker given that file was refused as if this one still kept it."""
    path = tmp_path / "state.json"
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=lambda raw: raw.update(state_file=str(path)))
    await status_until(r, lambda st: st["state_file"]["written"] is not None)
    with pytest.raises(m.StateFileHeld):
        m.lock_state_file(str(path))
    del r.raw["state_file"]
    r.config_path.write_text(yaml.safe_dump(r.raw, sort_keys=False))
    await r.broker.reload()
    free: list[int] = []

    def taken() -> bool:
        with contextlib.suppress(m.StateFileHeld):
            free.append(m.lock_state_file(str(path)))
        return bool(free)

    await until(taken)
    os.close(free[0])


async def test_a_write_hung_at_shutdown_keeps_the_lock_until_the_process_ends(rig, tmp_path, monkeypatch):
    """Found by a review: shutdown let go of the lock while the last write still hung in its thread, so a
    broker started next could write its file and then have it replaced by the hung write's. The lock stays
    while a write is under way (the kernel lets go of it when the process ends)."""
    path = tmp_path / "state.json"
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=lambda raw: raw.update(state_file=str(path)))
    await status_until(r, lambda st: st["state_file"]["written"] is not None)
    for task in [t for t in r.broker.tasks if t.get_name() == "state file"]:
        task.cancel()  # (this test writes it itself)
    hung, real = threading.Event(), m.write_state_file

    def hanging(where: str, data: bytes) -> None:
        hung.wait(30)
        real(where, data)

    monkeypatch.setattr(m, "write_state_file", hanging)
    monkeypatch.setattr(m, "STATE_IO_TIMEOUT_S", 0.2)
    assert (await r.post("tts", {"text": "a change to write"}))[0] == 200
    state = r.broker.state
    await state.close()  # its last write hangs
    with pytest.raises(m.StateFileHeld):
        m.lock_state_file(str(path))
    hung.set()
    inflight = state._inflight
    assert inflight is not None
    await until(inflight.done)
    await state.close()  # (nothing under way now: let go)
    os.close(m.lock_state_file(str(path)))


async def test_a_reservation_survives_sigterm_and_a_fresh_start_and_its_end_then_restores(rig, tmp_path):
    """Issue 22, done when: `make deploy` restarts the broker in the middle of a game. The reservation
    survives SIGTERM (the state file, mode 0600, holding no token) and the fresh start holds the GPU again at
    once: jobs get gpu_reserved with the time left; its release then loads again what it had unloaded."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    raw = copy.deepcopy(r.raw) | {"state_file": str(tmp_path / "state.json")}
    with_token(raw)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
        body = {"for_s": 3600, "reason": "gaming"}
        async with r.session.post(daemon.url("/v1/reserve"), json=body, headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["unloaded"] == ["mvoice", "comfyui"]
    path = tmp_path / "state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and TOKEN not in path.read_text()
    saved = json.loads(path.read_text())["gpus"]["0"]["reservation"]
    assert saved["reason"] == "gaming" and saved["to_restore"] == ["mvoice"]
    assert 'msg="reservation ended" consumer=reservation why=shutdown' in daemon.log
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as again:
        async with r.session.get(again.url("/v1/status"), headers=auth) as resp:
            st = await resp.json()
        assert (
            st["gpu"]["reservation"]["reason"] == "gaming"
            and st["scheduler"]["holder"]["consumer"] == "reservation"
        )
        assert 0 < st["gpu"]["reservation"]["left_s"] <= 3600
        async with r.session.post(again.url("/v1/tts"), json={"text": "x"}, headers=auth) as resp:
            status, headers, answer = resp.status, dict(resp.headers), await resp.read()
        error = error_of(status, headers, answer, "gpu_reserved")
        assert 0 < int(headers["Retry-After"]) <= 3600 and "is reserved (gaming) for" in error["message"]
        assert not r.sims["mvoice"].loaded
        async with r.session.delete(again.url("/v1/reserve"), headers=auth) as resp:
            assert (await resp.json())["released"] is True
        await until(lambda: r.sims["mvoice"].loaded, timeout=20)  # restored: it was resident when reserved
    assert 'msg="state file read"' in again.log and "reservations=1" in again.log
    assert "msg=restored consumer=mvoice" in again.log
    assert "reservation" not in json.loads(path.read_text())["gpus"].get("0", {})


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid: Expecting property name"),
        (b'{"version": 2, "written_at_s": 1}', "written by a later mgpumanager (format 2"),
        (b"\xff\xfe", "not valid"),
        (
            b'{"version": 1, "written_at_s": 1, "gpus": {"0": {"reservation": {"until_s": 1e300}}}}',
            "no number",
        ),
        (b"null", "not a JSON object"),  # (was taken for no file at all: an info line, no warning)
    ],
    ids=["corrupt", "a later version", "not text", "absurd", "null"],
)
async def test_a_state_file_that_is_not_right_gives_a_warning_and_a_working_broker(
    rig, tmp_path, content, reason
):
    r = await rig(sims={"mvoice": {"loaded": True}})
    path = tmp_path / "state.json"
    path.write_bytes(content)
    async with Daemon(r.raw | {"state_file": str(path)}, r.tmp_path, sim_smi(r.state)) as daemon:
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
            assert resp.status == 200
        await until(lambda: path.read_bytes() != content, timeout=10)  # written anew, whole
    assert json.loads(path.read_text())["version"] == 1
    line = next(x for x in daemon.log.splitlines() if "state file set aside" in x)
    assert "level=warning" in line and reason in line and "Traceback" not in daemon.log


async def test_after_a_wall_clock_set_back_the_state_file_written_is_one_the_next_start_reads(rig, tmp_path):
    """docs/operations.md, The clock: a wall clock set back since the file was written is not trusted
    blindly, and "a last use is never in the future". The broker that started under the set-back clock
    kept the file's last use as it was (an hour ahead of its own clock) and wrote it back beside its own
    written_at_s: the next start found "a last use after the file was written" and set the whole file aside,
    the reservation that the first start had resumed with it."""
    r = await rig(sims={"mvoice": {"loaded": False}})
    path = tmp_path / "state.json"
    ahead = time.time() + 3600  # the file was written an hour "later" than this machine's clock says now
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "written_at_s": ahead,
                "gpus": {
                    "0": {"reservation": {"reason": "gaming", "until_s": ahead + 600, "restore": False}}
                },
                "consumers": {"mvoice": {"last_used_s": ahead - 60}},
            }
        )
    )
    raw = r.raw | {"state_file": str(path)}
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
        st = await daemon.until(r.session, lambda st: st["gpu"]["reservation"] is not None)
        assert 0 < st["gpu"]["reservation"]["left_s"] <= 600
        used = datetime.datetime.fromisoformat(st["consumers"]["mvoice"]["last_used"].replace("Z", "+00:00"))
        assert used.timestamp() <= time.time()  # a minute before now, not 59 minutes after
        await until(lambda: json.loads(path.read_text())["written_at_s"] < ahead, timeout=10)
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as again:
        st = await again.status(r.session)
    assert "state file set aside" not in again.log, again.log
    assert st["gpu"]["reservation"] is not None and st["gpu"]["reservation"]["reason"] == "gaming"


async def test_a_wall_clock_set_back_while_the_broker_runs_leaves_a_state_file_the_next_start_reads(
    rig, tmp_path
):
    """The same, with the clock set back (an NTP step, a manual change) after a job while the broker runs:
    the last use it recorded is then after the wall-clock time of the next write, and that file was set
    aside as a whole at the next start (a reservation in it too). A last use is written no later than the
    file itself."""
    path = tmp_path / "state.json"
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=lambda raw: raw.update(state_file=str(path)))
    assert (await r.post("tts", {"text": "hi"}))[0] == 200
    state = r.broker.consumers.states["mvoice"]
    await until(lambda: state.last_used_at is not None)
    state.last_used_at += 3600  # used at what the clock, set back an hour since, calls an hour from now
    async with r.session.post(r.url("/v1/reserve"), json={"for_s": 600, "reason": "gaming"}) as resp:
        assert resp.status == 200
    written = lambda: path.exists() and json.loads(path.read_text())["gpus"].get("0", {})  # noqa: E731
    await until(lambda: "reservation" in (written() or {}), timeout=5)
    remembered = m.parse_state(json.loads(path.read_text()), time.time())  # the next start reads it whole
    assert remembered.reservations[0][1] == "gaming" and remembered.last_used["mvoice"][0] >= 0


async def test_a_consumer_idle_past_its_idle_unload_s_before_a_restart_is_unloaded_soon_after_it(
    rig, tmp_path
):
    """docs/decisions.md, "The last use survives, so a consumer idle for longer than its idle_unload_s
    before a restart is unloaded soon after it" (and operations.md, The state file). mvoice, last used two
    hours before the restart, idle_unload_s an hour: the first probe after the restart found it resident,
    and that moment counted as its becoming resident, so its idle hour began again at the restart."""
    path = tmp_path / "state.json"
    now = time.time()
    path.write_text(
        json.dumps(
            {"version": 1, "written_at_s": now - 60, "consumers": {"mvoice": {"last_used_s": now - 7200}}}
        )
    )

    def tweak(raw: dict[str, Any]) -> None:
        raw["state_file"] = str(path)
        raw["consumers"]["mvoice"]["idle_unload_s"] = 3600

    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=tweak)
    await until(lambda: r.stats.idle_unloads == 1, timeout=3 * m.IDLE_CHECK_S)
    assert r.sims["mvoice"].unloads == 1 and r.broker.consumers.states["mvoice"].resident is False


async def test_a_restart_resumes_what_waits_to_be_restored_and_the_learned_timings(rig, tmp_path):
    """Issue 22: what the state file kept is what the restarted broker goes on with. mvoice waited to be
    restored when the broker stopped (a game had it unloaded; the game is gone now): the restarted broker
    loads it again. Its learned times come back too (the forecast and Retry-After use them)."""
    path = tmp_path / "state.json"
    now = time.time()
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "written_at_s": now - 60,
                "gpus": {"0": {"to_restore": ["mvoice"]}},
                "consumers": {"mvoice": {"last_used_s": now - 600, "timings": {"job": [0.4, 0.2, 0.3]}}},
            }
        )
    )

    def tweak(raw: dict[str, Any]) -> None:
        _yielding(restore_after_s=0)(raw)
        raw["state_file"] = str(path)

    r = await rig(sims={"mvoice": {"loaded": False}}, tweak=tweak)
    assert r.broker.consumers.states["mvoice"].timing("job") == 0.3  # the median of the kept samples
    await until(lambda: r.sims["mvoice"].loads == 1 and r.stats.restores == 1, timeout=15)
    assert r.broker.consumers.states["mvoice"].resident is True and not r.broker.internal.to_restore.get(0)


async def test_what_a_restart_restores_gets_its_whole_idle_unload_s(rig, tmp_path):
    """The other side of the same rule: the remembered last use counts for a consumer found resident after
    a restart, not for one the broker loads itself. A reservation resumed at start, released: its restore
    loads mvoice (last used two hours ago), which then stays its idle_unload_s, as a restore does without a
    restart, rather than being due for its idle unload the moment it is back."""
    path = tmp_path / "state.json"
    now = time.time()
    reservation = {"reason": "gaming", "until_s": now + 600, "restore": True}
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "written_at_s": now - 60,
                "gpus": {
                    "0": {"reservation": reservation | {"unloaded": ["mvoice"], "to_restore": ["mvoice"]}}
                },
                "consumers": {"mvoice": {"last_used_s": now - 7200}},
            }
        )
    )

    def tweak(raw: dict[str, Any]) -> None:
        raw["state_file"] = str(path)
        raw["consumers"]["mvoice"]["idle_unload_s"] = 3600

    r = await rig(sims={"mvoice": {"loaded": False}}, tweak=tweak)
    assert r.broker.scheduler.reservation is not None
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert (await resp.json())["released"] is True
    await until(lambda: r.sims["mvoice"].loads == 1 and r.broker.consumers.states["mvoice"].resident, 20)
    due = r.broker.internal.idle_deadline("mvoice")
    assert due is not None and due - time.monotonic() > 3000


# =====================================================================================================
# 6. Proxying and streaming
# What reaches the consumer and what comes back, streamed; a consumer failing mid-answer.
# =====================================================================================================


async def _gzip_answer(request: web.Request) -> web.Response:
    body = gzip.compress(b'{"text": "compressed"}')
    headers = {"Content-Encoding": "gzip", "Keep-Alive": "timeout=5", "X-Upstream": "yes"}
    return web.Response(body=body, content_type="application/json", headers=headers)


async def _cut_off_upstream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    await resp.write(b'{"response": "tok", "done": false}\n')
    await asyncio.sleep(0.05)
    request.transport.abort()  # the consumer dies mid-stream
    return resp


async def test_tts_job_passes_through_with_headers_and_body(rig):
    r = await rig()
    status, headers, body = await r.post(
        "tts",
        {"text": "hello"},
        headers={"X-Custom": "1", "Connection": "keep-alive, X-Secret", "X-Secret": "s"},
    )
    assert status == 200 and body.startswith(b"RIFF") and headers["Content-Type"] == "audio/wav"
    assert headers["X-Audio-Path"].startswith("/audio/")
    seen = r.sims["mvoice"].records[-1]
    assert seen.path == "/api/synthesize" and json.loads(seen.body) == {"text": "hello"}
    assert seen.headers["X-Custom"] == "1"
    assert "X-Secret" not in seen.headers  # named in Connection: hop-by-hop
    assert seen.headers["Host"] == f"127.0.0.1:{r.sim_servers['mvoice'].port}"  # never the client's Host
    assert seen.headers["User-Agent"].startswith("Python/")  # the client's own, passed through
    st = await r.status()
    assert st["scheduler"]["stats"]["completed"] == 1 and st["consumers"]["mvoice"]["loaded"] is True
    # The audio the job made is fetched through the broker, unscheduled.
    async with r.session.get(r.url(headers["X-Audio-Path"])) as resp:
        assert resp.status == 200 and await resp.read() == body
    assert r.stats.jobs == 1


async def test_only_what_the_client_sent_reaches_the_consumer(rig):
    r = await rig()
    skip = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
    async with r.session.post(r.url("/v1/stt"), data=b"RIFF", skip_auto_headers=skip) as resp:
        assert resp.status == 200
    seen = r.sims["mvoice"].records[-1].headers
    assert [h for h in skip if h in seen] == []  # aiohttp's client added none of its own
    async with r.session.post(r.url("/v1/stt"), data=b"RIFF", headers={"Expect": "100-continue"}) as resp:
        assert resp.status == 200
    assert "Expect" not in r.sims["mvoice"].records[-1].headers


async def test_answer_bytes_and_headers_pass_unchanged_but_hop_by_hop(rig):
    async with StandIn([("POST", "/inference", _gzip_answer), ("GET", "/health", _ok)]) as whisper:

        def whisper_stt(raw):
            raw["routing"]["stt"] = "whisper"

        r = await rig(urls={"whisper": whisper.url}, tweak=whisper_stt)
        status, headers, body = await r.post("stt", None, data=b"audio")
        assert status == 200 and body == gzip.compress(b'{"text": "compressed"}')  # not decompressed
        assert headers["Content-Encoding"] == "gzip" and headers["X-Upstream"] == "yes"
        assert headers["Content-Length"] == str(len(body)) and "Keep-Alive" not in headers


async def test_no_hop_by_hop_header_crosses_the_broker_either_way(rig):
    """RFC 9110's hop-by-hop headers (and those a Connection header names) are the two ends' own: a
    client's Proxy-Authorization never reaches the consumer, a consumer's Proxy-Authenticate, Upgrade or
    Trailer never reaches the client; every other header passes."""
    seen: list[Mapping[str, str]] = []

    async def hop_by_hop_answer(request: web.Request) -> web.Response:
        seen.append(request.headers.copy())
        hops = {
            "Proxy-Authenticate": 'Basic realm="consumer"',
            "Upgrade": "h2c",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Keep-Alive": "timeout=5",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "X-End": "1",
        }
        return web.Response(body=b'{"text": "ok"}', content_type="application/json", headers=hops)

    async with StandIn([("POST", "/inference", hop_by_hop_answer), ("GET", "/health", _ok)]) as whisper:

        def whisper_stt(raw):
            raw["routing"]["stt"] = "whisper"

        r = await rig(urls={"whisper": whisper.url}, tweak=whisper_stt)
        sent = {
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "X-Custom": "1",
        }
        status, headers, _ = await r.post("stt", None, data=b"audio", headers=sent)
        assert status == 200 and headers["X-End"] == "1"
        hops = ("Proxy-Authenticate", "Upgrade", "TE", "Trailer", "Keep-Alive", "X-Hop")
        assert [h for h in hops if h in headers] == [], headers
        assert [h for h in sent if h in seen[-1]] == ["X-Custom"], seen[-1]


async def test_audio_is_served_while_the_gpu_is_busy(rig):
    r = await rig(sims={"mvoice": {"loaded": True}, "ollama": {"lines": 40, "line_interval_s": 0.05}})
    (r.sims["mvoice"].audio_dir / "old.wav").write_bytes(b"RIFFold")
    async with r.session.post(r.url("/v1/llm"), json={"model": "m", "prompt": "p"}) as stream:
        await stream.content.readline()
        assert r.broker.scheduler.holder == "ollama"
        async with r.session.get(r.url("/audio/old.wav?x=1")) as resp:
            assert resp.status == 200 and await resp.read() == b"RIFFold"
        assert r.broker.scheduler.holder == "ollama" and not stream.content.at_eof()
    assert r.sims["mvoice"].records[-1].query == "x=1" and r.stats.jobs == 1


async def test_fast_path_structure_no_gpu_reading_one_session_one_connection(rig):
    """What keeps a resident job cheap: no nvidia-smi, the app's one ClientSession, a pooled connection."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    session, queries = r.broker.session, r.broker.gpu.queries
    for _ in range(5):
        assert (await r.post("stt", None, data=b"x" * 1024))[0] == 200
    assert r.broker.gpu.queries == queries and r.broker.session is session
    assert len({rec.peer for rec in r.sims["mvoice"].records}) == 1


async def test_query_string_is_kept(rig):
    r = await rig()
    async with r.session.post(r.url("/v1/stt?lang=de&x=%20y"), data=b"\x00\x01audio") as resp:
        assert resp.status == 200 and (await resp.json())["bytes"] == 7
    assert r.sims["mvoice"].records[-1].query == "lang=de&x=%20y"


async def test_a_paths_entry_with_a_query_keeps_it_beside_the_clients_and_is_its_mount_job(rig, caplog):
    """Found by the attack on issue 19's surfaces: a ``paths`` entry may carry a query (the loader takes
    ``/api/synthesize?format=wav``), but the client's query was appended with a second '?', so mvoice got
    ``format=wav?lang=de`` (its format "wav?lang=de"); and through the mount the same request was no tts job
    (the entry's query made its path another), so it ran as kind mount. The client's query now follows the
    entry's after '&', and the mount matches the entry by its path, as the own-route guard does."""

    def with_query(raw: dict[str, Any]) -> None:
        raw["consumers"]["mvoice"]["paths"]["tts"]["path"] = "/api/synthesize?format=wav"

    r = await rig(tweak=with_query, sims={"mvoice": {"loaded": True}})
    for target, query in (("/v1/tts?lang=de", "format=wav&lang=de"), ("/v1/tts", "format=wav")):
        async with r.session.post(r.url(target), json={"text": "x"}) as resp:
            assert resp.status == 200
        assert (r.sims["mvoice"].records[-1].path, r.sims["mvoice"].records[-1].query) == (
            "/api/synthesize",
            query,
        )
    async with r.session.post(r.url("/c/mvoice/api/synthesize?lang=de"), json={"text": "x"}) as resp:
        assert resp.status == 200
    assert r.sims["mvoice"].records[-1].query == "lang=de"  # (a mount forwards what the client sent)
    await until(lambda: len(job_lines(caplog)) == 3)
    assert [" kind=tts " in line for line in job_lines(caplog)] == [True, True, True]


async def test_streaming_first_line_arrives_before_the_last_is_produced(rig):
    r = await rig(sims={"ollama": {"lines": 6, "line_interval_s": 0.1}})
    async with r.session.post(r.url("/v1/llm"), json={"model": "m", "prompt": "p"}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("application/x-ndjson")
        first = await resp.content.readline()
        got_first = time.monotonic()
        assert json.loads(first)["done"] is False
        rest = await resp.read()
    line_times = r.sims["ollama"].line_times[0]
    assert len(line_times) == 7 and got_first < line_times[-1]
    assert rest.count(b"\n") == 6 and json.loads(rest.splitlines()[-1])["done"] is True


async def test_consumer_error_status_passes_through_unchanged(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    r.broker.consumers.states["mvoice"].unload_failed()  # as after a failed unload
    r.sims["mvoice"].faults["status"] = 422
    status, headers, body = await r.post("tts", {"text": "x"})
    assert status == 422 and json.loads(body) == {"error": "simulated"}
    # An error answer proves nothing about residency and is no "use".
    assert r.broker.consumers.states["mvoice"].resident is None
    assert r.broker.consumers.states["mvoice"].last_used is None
    assert headers["Content-Type"].startswith("application/json")
    assert r.stats.completed == 1 and r.stats.failed == 0


async def test_disconnect_while_queued_never_reaches_the_consumer(rig):
    r = await rig(sims={"mvoice": {"work_s": 0.5, "loaded": True}})
    busy = asyncio.ensure_future(r.post("tts", {"text": "long"}))
    await until(lambda: r.broker.scheduler.holder is not None)
    with pytest.raises(asyncio.TimeoutError):
        await r.post("llm", {"model": "m", "prompt": "p"}, timeout=aiohttp.ClientTimeout(total=0.1))
    await until(lambda: r.stats.cancelled > 0)
    assert r.broker.scheduler.queue() == []
    assert (await busy)[0] == 200
    assert r.sims["ollama"].records == []
    st = await r.status()
    assert st["scheduler"]["stats"]["cancelled"] == 1 and st["scheduler"]["holder"] is None


async def test_disconnect_mid_stream_releases_the_lock(rig):
    r = await rig(sims={"ollama": {"lines": 50, "line_interval_s": 0.05}})
    resp = await r.session.post(r.url("/v1/llm"), json={"model": "m", "prompt": "p"})
    await resp.content.readline()
    resp.close()  # the client leaves mid-stream
    await until(lambda: r.stats.cancelled > 0)
    assert r.broker.scheduler.holder is None
    status, _, _ = await r.post("tts", {"text": "next"})
    assert status == 200 and len(r.sims["ollama"].line_times[0]) < 51


async def test_consumer_dying_mid_stream_truncates_the_answer_and_frees_the_lock(rig):
    async with StandIn([("POST", "/api/generate", _cut_off_upstream), ("GET", "/", _ok)]) as dying:
        r = await rig(urls={"ollama": dying.url})
        async with r.session.post(r.url("/v1/llm"), json={"model": "m", "prompt": "p"}) as resp:
            assert resp.status == 200
            assert await resp.content.readline() == b'{"response": "tok", "done": false}\n'
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert r.stats.failed == 1 and r.broker.scheduler.holder is None
        st = await r.status()
        assert st["consumers"]["ollama"]["healthy"] is False
        assert (await r.post("tts", {"text": "next"}))[0] == 200


def _ollama_timeout(timeout_s: float) -> Callable[[dict[str, Any]], None]:
    """A rig tweak: ollama's timeout_s."""
    return lambda raw: raw["consumers"]["ollama"].update(timeout_s=timeout_s)


async def test_a_consumer_silent_mid_answer_cuts_the_answer_and_ends_its_job_as_consumer_timeout(rig):
    """A consumer that sends the start of its answer and then nothing for its timeout_s: the client's answer
    is cut (no final chunk), and the job fails as consumer_timeout, not consumer_unreachable (it was
    reachable, and slow). (A mutation audit: every mid-answer failure named consumer_unreachable went
    unseen.)"""
    gate = asyncio.Event()

    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"response": "tok", "done": false}\n')
        await gate.wait()
        return resp

    async with StandIn([("POST", "/api/generate", stalls), ("GET", "/", _ok)]) as silent:
        try:
            r = await rig(urls={"ollama": silent.url}, tweak=_ollama_timeout(0.5))
            async with r.session.post(r.url("/v1/llm"), json={"model": "m", "prompt": "p"}) as resp:
                assert resp.status == 200
                assert await resp.content.readline() == b'{"response": "tok", "done": false}\n'
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
        finally:
            gate.set()
    await until(lambda: r.stats.failed == 1 and r.broker.scheduler.holder is None)
    (failed,) = [e for e in recent_events(r.broker.events) if e["event"] == "failed"]
    assert failed["consumer"] == "ollama" and failed["code"] == "consumer_timeout"


async def test_connection_refused_during_a_job_is_consumer_unreachable(rig):
    r = await rig()
    await r.sim_servers["ollama"].close()  # dies between probes
    status, headers, body = await r.post("llm", {"model": "m", "prompt": "p"})
    data = error_of(status, headers, body, "consumer_unreachable")
    assert "connection refused" in data["message"] and data["consumer"] == "ollama"
    assert r.stats.failed == 1 and r.broker.scheduler.holder is None
    assert (await r.status())["consumers"]["ollama"]["healthy"] is False


async def test_silent_consumer_is_consumer_timeout_and_the_lock_is_released(rig):
    def quick(raw):
        raw["consumers"]["ollama"]["timeout_s"] = 0.3

    r = await rig(tweak=quick)
    r.sims["ollama"].faults["hang"] = True
    status, headers, body = await r.post("llm", {"model": "m", "prompt": "p"})
    error_of(status, headers, body, "consumer_timeout")
    assert r.broker.scheduler.holder is None and r.stats.failed == 1
    assert r.broker.consumers.states["ollama"].healthy is False
    assert (await r.post("tts", {"text": "next"}))[0] == 200


async def test_unresolvable_consumer_url_is_bad_consumer_url(rig):
    r = await rig(urls={"ollama": "http://no-such-host.invalid:11434"})
    status, headers, body = await r.post("llm", {"model": "m", "prompt": "p"})
    error_of(status, headers, body, "bad_consumer_url")


async def test_upstream_connections_are_reused_between_jobs(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    for _ in range(3):
        assert (await r.post("tts", {"text": "x"}))[0] == 200
    peers = {rec.peer for rec in r.sims["mvoice"].records if rec.path == "/api/synthesize"}
    assert len(peers) == 1  # one pooled connection, not a new TCP connect per job


async def test_connect_timeout_is_consumer_unreachable(rig):
    # A listener that never accepts, with its backlog full: connecting hangs until the connect timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(8):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(listener.getsockname())
        fillers.append(f)
    try:

        def quick(raw):
            raw["consumers"]["ollama"]["timeout_s"] = 0.3

        host, port = listener.getsockname()
        r = await rig(urls={"ollama": f"http://{host}:{port}"}, tweak=quick)
        r.broker.consumers.states["ollama"].healthy = None  # its first probe timed out too; forget it
        status, headers, body = await r.post("llm", {"model": "m", "prompt": "p"})
        data = error_of(status, headers, body, "consumer_unreachable")
        assert data["message"] == "upstream ollama connect timed out"
        assert r.broker.consumers.states["ollama"].last_error == "connect timed out"
    finally:
        for f in fillers:
            f.close()
        listener.close()


def _firehose(mib: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A consumer's handler that streams ``mib`` MiB, a MiB a write, as fast as its client takes them."""

    async def firehose(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for _ in range(mib):
            await resp.write(b"x" * m.MiB)
        return resp

    return firehose


async def test_a_client_that_stops_reading_cannot_keep_the_gpu(rig):
    """A client that reads nothing of a long answer for the consumer's timeout_s: its job ends (cancelled),
    the GPU goes on, and its connection is cut: it sees its answer end truncated (a reset, or EOF once what
    was on the way is read), and the broker holds it open no more. (A mutation audit: _to_client not
    aborting the transport went unseen: aiohttp then wrote the broker's 499, head and final chunk, into the
    answer under way, so it ended like a whole one, before closing the connection itself.)"""
    firehose = _firehose(256)

    async with StandIn([("POST", "/api/generate", firehose), ("GET", "/", _ok)]) as ollama:

        def quick(raw):
            raw["consumers"]["ollama"]["timeout_s"] = 0.5

        r = await rig(urls={"ollama": ollama.url}, tweak=quick)
        reader, writer = await asyncio.open_connection(r.server.host, r.server.port)
        body = b'{"model": "m", "prompt": "p"}'
        head = f"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        await reader.read(1000)  # the answer begins ... and the client reads no more
        await until(lambda: r.stats.cancelled == 1, timeout=20)
        assert r.broker.scheduler.holder is None

        tail = bytearray()  # the last bytes the client gets

        async def to_the_end() -> None:
            with contextlib.suppress(ConnectionResetError):
                while data := await reader.read(1 << 20):
                    tail[:] = (tail + data)[-4096:]

        await asyncio.wait_for(to_the_end(), 20)  # (under load: MiBs on the way)
        await until(lambda: not r.broker.connections.open)
        # Cut: no second head written into the answer under way, and no final chunk to make it look whole.
        assert b"HTTP/1.1" not in tail and not tail.endswith(b"0\r\n\r\n"), bytes(tail[-200:])
        writer.close()
        assert (await r.post("tts", {"text": "next"}))[0] == 200


async def test_a_client_that_stops_reading_an_answer_of_small_chunks_cannot_keep_the_gpu(rig):
    """An answer streamed in small writes (a few KiB, as token streams are): each chunk is small, but once
    the client stops reading and the broker's buffer to it is past its high-water mark, every write is
    bounded by the consumer's timeout_s as a large one is: the job ends, the GPU goes on. (A mutation
    audit: a write let through unbounded while it fit four times the high-water mark, which waited for
    ever on such a client, went unseen.)"""

    async def lines(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            for _ in range(64 * 1024):  # 256 MiB, as fast as the broker takes them
                await resp.write(b"x" * 4095 + b"\n")
        return resp

    async with StandIn([("POST", "/api/generate", lines), ("GET", "/", _ok)]) as ollama:
        r = await rig(urls={"ollama": ollama.url}, tweak=_ollama_timeout(0.5))
        reader, writer = await asyncio.open_connection(r.server.host, r.server.port)
        body = b'{"model": "m", "prompt": "p"}'
        head = f"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        try:
            await reader.read(1000)  # the answer begins ... and the client reads no more
            await until(lambda: r.stats.cancelled == 1, timeout=20)
            assert r.broker.scheduler.holder is None
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def _firehose_rig(rig: Any) -> AsyncIterator[Rig]:
    """A rig whose ollama streams 64 MiB as fast as its client takes them, its timeout_s 1 s."""
    async with StandIn([("POST", "/api/generate", _firehose(64)), ("GET", "/", _ok)]) as ollama:
        yield await rig(
            urls={"ollama": ollama.url}, tweak=lambda raw: raw["consumers"]["ollama"].update(timeout_s=1)
        )


async def _llm_through_a_small_window(r: Rig, window: int) -> socket.socket:
    """A client's socket with a receive buffer of ``window`` bytes, its /v1/llm request sent (non-blocking,
    for the loop's sock_recv): how fast the broker's answer goes is how fast the test reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (r.server.host, r.server.port))
    body = b'{"model": "m", "prompt": "p"}'
    head = f"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    await loop.sock_sendall(sock, head.encode() + body)
    return sock


async def test_a_client_that_reads_slowly_but_steadily_is_not_cut_off(rig):
    """Found by an attack: each write to the client was bounded by the consumer's timeout_s as a whole, so
    a client reading steadily, but slower than a chunk per timeout_s, was cut off as if it had stopped
    (docs/decisions.md: one that accepts nothing for timeout_s is). A client that takes CLIENT_MIN_TAKEN
    (64 KiB) within each timeout_s reads on."""
    async with _firehose_rig(rig) as r:
        sock = await _llm_through_a_small_window(r, 16 * 1024)
        loop = asyncio.get_running_loop()
        got, started = 0, time.monotonic()
        try:
            while time.monotonic() - started < 4:  # about 800 KB/s: a MiB chunk takes longer than timeout_s
                data = await asyncio.wait_for(loop.sock_recv(sock, 16 * 1024), 5)
                assert data, f"cut off after {got} bytes"
                got += len(data)
                await asyncio.sleep(0.02)
            assert r.stats.cancelled == 0 and r.broker.scheduler.holder == "ollama"
        finally:
            sock.close()
        await until(lambda: r.stats.cancelled == 1, timeout=20)  # it left: the job ends, the GPU is free


async def test_a_client_that_trickles_is_cut_off_as_one_that_stopped(rig):
    """Found by a review of the test above's fix: taking anything at all in each timeout_s (a window's worth,
    a few KiB) kept the write going, so a client could hold the GPU for days with a large answer. One that
    takes less than CLIENT_MIN_TAKEN (64 KiB) in a timeout_s is cut off."""
    async with _firehose_rig(rig) as r:
        sock = await _llm_through_a_small_window(r, 4 * 1024)
        loop = asyncio.get_running_loop()

        async def trickle() -> None:  # 16 KiB every half second: about 32 KiB a timeout_s
            with contextlib.suppress(OSError):
                for _ in range(100):
                    if not await loop.sock_recv(sock, 16 * 1024):
                        return
                    await asyncio.sleep(0.5)

        reading = asyncio.ensure_future(trickle())
        try:
            await until(lambda: r.stats.cancelled == 1, timeout=20)
            assert r.broker.scheduler.holder is None
        finally:
            reading.cancel()
            sock.close()


async def test_a_client_that_reads_fast_then_stops_is_cut_off_after_a_timeout_s(rig):
    """What a client must take is counted in each timeout_s, not since the write began: one that read
    quickly (far more than CLIENT_MIN_TAKEN) and then stops reading, in the middle of a write, is cut off
    once a timeout_s passes with nothing taken; the job ends and the GPU goes on. (A mutation audit:
    _to_client counting what was taken since the write began, which let such a client hold the GPU for
    ever, went unseen.)"""
    async with _firehose_rig(rig) as r:
        sock = await _llm_through_a_small_window(r, 16 * 1024)
        loop = asyncio.get_running_loop()
        await until(lambda: r.broker.scheduler.holder == "ollama")
        await asyncio.sleep(0.3)  # the broker waits to write (the client's buffers full)
        got = 0
        try:
            while got < 512 * 1024:  # then half a MiB as fast as it comes, within the write that waits
                data = await asyncio.wait_for(loop.sock_recv(sock, 16 * 1024), 5)
                assert data, f"cut off after {got} bytes"
                got += len(data)
            await until(lambda: r.stats.cancelled == 1, timeout=20)  # ... and no more
            assert r.broker.scheduler.holder is None
        finally:
            sock.close()


async def test_only_a_connection_error_writing_to_a_client_is_the_client_leaving():
    """_send turns a ConnectionError of a write (aiohttp's "Connection lost", a broken pipe) into the
    client leaving (ConnectionResetError: the job is cancelled, no bug); any other OSError (EIO, EBADF: the
    broker's own trouble) goes on as itself, to be counted as one. (A mutation audit: catching OSError
    there, which hid such errors as clients that left, went unseen.)"""
    consumer = m.load_config(HERE / "consumers.yaml").consumers["ollama"]
    seen: list[type[BaseException]] = []

    async def handler(request: web.Request) -> web.Response:
        for error in (BrokenPipeError(errno.EPIPE, "pipe"), OSError(errno.EIO, "i/o error")):

            async def write(error: BaseException = error) -> None:
                raise error

            try:
                await m._send(request, write, 1, consumer)  # (1 byte: written at once, not bounded)
            except OSError as e:
                seen.append(type(e))
        return web.Response()

    async with (
        StandIn([("GET", "/", handler)]) as server,
        aiohttp.ClientSession() as session,
        session.get(server.url + "/") as resp,
    ):
        assert resp.status == 200
    assert seen == [ConnectionResetError, OSError]


async def test_a_client_that_resets_its_connection_mid_answer_is_a_client_that_left(rig):
    """Found by an attack: a client that closed its socket with data unread (a reset, as Ctrl-C on curl
    does) while the broker waited to write raised aiohttp's ConnectionError("Connection lost"), not a
    ConnectionResetError: the job failed as scheduler_error, counted as a bug, and a hold path lost its
    hold. It is a client that left: cancelled, nothing counted."""

    firehose = _firehose(256)

    async with StandIn([("POST", "/api/generate", firehose), ("GET", "/", _ok)]) as ollama:
        r = await rig(urls={"ollama": ollama.url})
        sock = socket.create_connection((r.server.host, r.server.port))
        body = b'{"model": "m", "prompt": "p"}'
        sock.sendall(
            f"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await asyncio.to_thread(sock.recv, 1 << 20)  # the answer began
        await asyncio.sleep(0.3)  # the broker waits to write (the client's buffers full)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        await until(lambda: r.stats.cancelled == 1, timeout=20)
        assert r.stats.failed == 0 and r.broker.shared.internal_errors == 0
        assert r.broker.scheduler.holder is None


async def test_a_compressed_request_body_reaches_the_consumer_as_it_came(rig):
    """Found by an attack: aiohttp's server decompressed a gzip request body, so one sent with its length
    was refused (bad_request: it ended before its Content-Length) and one sent chunked reached the consumer
    plain while still labelled Content-Encoding: gzip."""
    seen: list[tuple[str | None, bytes]] = []

    async def synthesize(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Content-Encoding"), await request.content.read()))
        return web.json_response({"ok": True})

    async with StandIn([("POST", "/api/synthesize", synthesize), ("GET", "/health", _ok)]) as mvoice:
        r = await rig(urls={"mvoice": mvoice.url})
        packed = gzip.compress(b'{"text": "hi"}')
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        async with r.session.post(r.url("/v1/tts"), data=packed, headers=headers) as resp:
            assert resp.status == 200, await resp.text()

        async def chunks() -> AsyncIterator[bytes]:
            yield packed

        async with r.session.post(r.url("/v1/tts"), data=chunks(), headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    # (The consumer's own aiohttp server decompresses what came compressed, as it would from the client.)
    assert seen == [("gzip", b'{"text": "hi"}'), ("gzip", b'{"text": "hi"}')]


async def test_an_answer_with_a_large_head_passes_through(rig):
    """Found by an attack: a header over 8190 bytes (a large Set-Cookie), or more than 128 headers, in a
    consumer's answer became 502 consumer_unreachable, retryable, and the consumer unhealthy."""

    async def synthesize(request: web.Request) -> web.Response:
        headers = {f"X-Many-{i}": str(i) for i in range(200)}
        return web.Response(body=b"audio", headers={"X-Big": "b" * 20000, **headers})

    async with StandIn([("POST", "/api/synthesize", synthesize), ("GET", "/health", _ok)]) as mvoice:
        r = await rig(urls={"mvoice": mvoice.url})
        # (Before aiohttp 3.13.4 a client took any number of headers, and could not be told a number.)
        many = {"max_headers": 1024} if "max_headers" in m.ANSWER_HEAD_LIMITS else {}
        async with (
            aiohttp.ClientSession(max_line_size=1 << 16, max_field_size=1 << 16, **many) as client,
            client.post(r.url("/v1/tts"), json={"text": "hi"}) as resp,
        ):
            assert resp.status == 200 and await resp.read() == b"audio"
            assert resp.headers["X-Big"] == "b" * 20000 and resp.headers["X-Many-199"] == "199"
        assert r.broker.consumers.states["mvoice"].healthy is True


async def test_an_answer_with_a_control_character_in_a_header_reaches_the_client_without_that_header(rig):
    """Found by an attack: aiohttp refuses to write a head with a control character (a header injection,
    RFC 9110 section 5.5), so the client got nothing at all, neither the answer nor an error, and a bug was
    counted. The answer goes out without that header, and the log names it."""

    async def consumer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (Raw: an aiohttp server would refuse to write such a head too.)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nX-Fine: ok\r\nContent-Length: 5\r\n\r\naudio")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(consumer, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        r = await rig(urls={"mvoice": url})
        async with r.session.post(r.url("/v1/tts"), json={"text": "hi"}) as resp:
            assert resp.status == 200 and await resp.read() == b"audio"
            assert resp.headers["X-Fine"] == "ok" and "X-Ctl" not in resp.headers
        assert r.broker.shared.internal_errors == 0 and r.stats.completed == 1


async def test_a_chunked_answer_stays_chunked_even_when_it_came_whole(rig):
    """Found by make test-real: a streamed chat that llama-server had finished before the broker read its
    head (16 tokens on a quiet machine) reached the client with a Content-Length, not chunked: the broker
    writes an answer that came whole with its head in one write, and took a chunked one for such. The
    consumer's framing is kept: a chunked answer goes out chunked (a client may take that for a stream),
    one framed by its Content-Length keeps it."""
    events = b'data: {"n": 1}\n\ndata: [DONE]\n\n'

    async def consumer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (Raw: head and body in one write, so the broker finds the answer whole with its head.)
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        if b"x-framing: length" in head.lower():
            framed = b"Content-Length: %d\r\n\r\n%s" % (len(events), events)
        else:
            framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(events), events)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + framed)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(consumer, "127.0.0.1", 0)
    async with server:
        r = await rig(urls={"mvoice": f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"})
        async with r.session.post(r.url("/v1/tts"), json={"text": "hi"}) as resp:
            assert resp.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in resp.headers
            assert resp.status == 200 and await resp.read() == events
        headers = {"X-Framing": "length"}
        async with r.session.post(r.url("/v1/tts"), json={"text": "hi"}, headers=headers) as resp:
            assert (
                resp.headers["Content-Length"] == str(len(events)) and "Transfer-Encoding" not in resp.headers
            )
            assert resp.status == 200 and await resp.read() == events
        assert r.stats.completed == 2


async def test_forwarding_adds_x_forwarded_and_never_follows_redirects_or_keeps_cookies(rig):
    seen: list[dict[str, str]] = []

    async def redirect(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        resp = web.Response(status=302, headers={"Location": "/api/admin/secret"})
        resp.set_cookie("session", "whisper-private")
        return resp

    async with StandIn([("POST", "/inference", redirect), ("GET", "/health", _ok)]) as whisper:

        def whisper_stt(raw):
            raw["routing"]["stt"] = "whisper"

        r = await rig(urls={"whisper": whisper.url}, tweak=whisper_stt)
        # What a proxy sets itself is the broker's to set: the client's own are dropped.
        spoofed = {"Forwarded": "for=10.0.0.1", "X-Real-IP": "10.0.0.1", "X-Forwarded-Host": "evil.example"}
        headers = {"X-Forwarded-For": "203.0.113.9", **spoofed}
        async with r.session.post(
            r.url("/v1/stt"), data=b"x", headers=headers, allow_redirects=False
        ) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/api/admin/secret"
            assert "whisper-private" in resp.headers["Set-Cookie"]  # the client's business, passed on
        async with (
            aiohttp.ClientSession() as other_client,
            other_client.post(r.url("/v1/stt"), data=b"y", allow_redirects=False) as resp,
        ):
            assert resp.status == 302
    assert len(seen) == 2  # the redirect was not followed by the broker
    assert seen[0]["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1" and seen[0]["X-Forwarded-Proto"] == "http"
    assert not {h.lower() for h in spoofed} & {h.lower() for h in seen[0]}, seen[0]
    assert seen[1]["X-Forwarded-For"] == "127.0.0.1"
    assert "Cookie" not in seen[1]  # the first client's cookie was never kept for the second


async def test_consumer_resetting_while_it_reads_the_body_is_consumer_unreachable(rig):
    async def reset(request: web.Request) -> web.Response:
        await request.content.read(10)
        request.transport.abort()
        return web.Response()

    async with StandIn([("POST", "/api/generate", reset), ("GET", "/", _ok)]) as ollama:
        r = await rig(urls={"ollama": ollama.url})
        status, headers, body = await r.post("llm", None, data=b"p" * 2_000_000)
        data = error_of(status, headers, body, "consumer_unreachable")
        assert data["consumer"] == "ollama" and r.broker.scheduler.holder is None
        assert r.broker.consumers.states["ollama"].healthy is False
        assert (await r.post("tts", {"text": "next"}))[0] == 200


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (500, b'{"error": "CUDA out of memory"}', "application/json"),
        (200, b"\x00\xffnot json{", "application/json"),
    ],
)
async def test_consumer_errors_and_garbage_pass_through_unchanged(rig, status, body, content_type):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)

    async with StandIn([("POST", "/api/generate", answer), ("GET", "/", _ok)]) as ollama:
        r = await rig(urls={"ollama": ollama.url})
        got_status, headers, got_body = await r.post("llm", {"model": "m", "prompt": "p"})
        assert (got_status, got_body, headers["Content-Type"]) == (status, body, content_type)
        assert r.stats.completed == 1 and r.broker.scheduler.holder is None
        assert (await r.post("tts", {"text": "next"}))[0] == 200


async def test_a_body_that_is_not_json_reaches_the_consumer_unparsed(rig):
    r = await rig()
    status, _, body = await r.post(
        "llm", None, data=b'{"model": broken', headers={"Content-Type": "application/json"}
    )
    assert status == 400 and json.loads(body) == {"error": "invalid JSON"}  # the consumer's own answer
    assert r.sims["ollama"].records[-1].body == b'{"model": broken'


async def test_cookies_are_never_kept_even_from_a_named_host(rig):
    async def cookie(request: web.Request) -> web.Response:
        resp = web.json_response({"cookie": request.headers.get("Cookie")})
        resp.set_cookie("session", "private")
        return resp

    async with StandIn([("POST", "/inference", cookie), ("GET", "/health", _ok)]) as whisper:

        def whisper_stt(raw):
            raw["routing"]["stt"] = "whisper"

        # A host name, not an IP: aiohttp's default jar would keep this cookie.
        r = await rig(urls={"whisper": f"http://localhost:{whisper.server.port}"}, tweak=whisper_stt)
        first = json.loads((await r.post("stt", None, data=b"x"))[2])
        second = json.loads((await r.post("stt", None, data=b"y"))[2])
        assert first == second == {"cookie": None}


# =====================================================================================================
# 7. Holds
# A job's GPU kept until its consumer says the work is done, and every way a hold ends.
# =====================================================================================================


async def test_a_hold_abandoned_or_cut_before_it_ever_ran_still_frees_its_slot():
    """The consumer is seen gone (or the broker closes) in the same turn its job answered: the hold's task
    is cancelled before its first step, so no finally of its runs; the slot is freed all the same."""
    s, _, ops, _ = make_scheduler(small_config())
    ops.states["t"].loaded()
    job = await s.acquire("t", "kt")
    job.release("completed", status=200, success=True, hold=asyncio.Event().wait, hold_timeout_s=60)
    s.holding.abandon("t", "hold poll: connection refused")  # at once: the hold never ran
    await until(lambda: s.holder is None)
    assert (s.stats.hold_abandoned, s.slots, s.holds) == (1, 0, 0) and s.jobs_of("t") == 0
    job = await s.acquire("t", "kt")
    job.release("completed", status=200, success=True, hold=asyncio.Event().wait, hold_timeout_s=60)
    await s.close()  # the broker closing, likewise
    assert (s.holder, s.slots, s.holds) == (None, 0, 0) and books_balance(s)


async def test_a_hold_on_the_service_a_reload_replaced_is_not_abandoned_when_the_new_one_is_seen_down():
    """A reload gave t another URL (a new service) while a hold on the old one ran: the new service seen
    down says nothing of the old one's work, so that hold goes on until it returns, and ends released, not
    abandoned. (A mutation audit: ``Holds.abandon`` without its same-service check went unseen.)"""
    cfg = small_config()
    s, _, ops, _ = make_scheduler(cfg)
    ops.states["t"].loaded()
    job = await s.acquire("t", "kt")
    done = asyncio.Event()
    job.release("completed", status=200, success=True, hold=done.wait, hold_timeout_s=60)
    new = dataclasses.replace(cfg.consumers["t"], url="http://127.0.0.1:9/t-new")
    s.shared.config = dataclasses.replace(cfg, consumers={**cfg.consumers, "t": new})
    s.holding.abandon("t", "hold poll: connection refused")  # (the new service's)
    for _ in range(3):
        await asyncio.sleep(0)  # (an abandoned hold ends in these turns)
    assert (s.holds, s.holder, s.stats.hold_abandoned) == (1, "t", 0)
    done.set()
    await until(lambda: s.holder is None)
    assert (s.stats.hold_abandoned, s.holds, s.slots) == (0, 0, 0) and books_balance(s)


async def test_a_hold_abandoned_teaches_no_job_time_and_one_released_does():
    """A render lost with its consumer says nothing of how long t's jobs take: a hold that ran 100 s and
    ended abandoned leaves t's learned job time unknown; one released after 5 s teaches 5 s. (A mutation
    audit: learning from an abandoned hold too went unseen.)"""
    s, _, ops, clock = make_scheduler(small_config())
    ops.states["t"].loaded()
    job = await s.acquire("t", "kt")
    job.release("completed", status=200, success=True, hold=asyncio.Event().wait, hold_timeout_s=600)
    await asyncio.sleep(0)  # (the hold runs)
    clock.now += 100
    s.holding.abandon("t", "hold poll: connection refused")
    await until(lambda: s.holder is None)
    assert s.stats.hold_abandoned == 1 and ops.states["t"].timing("job") is None
    job = await s.acquire("t", "kt")
    done = asyncio.Event()
    job.release("completed", status=200, success=True, hold=done.wait, hold_timeout_s=600)
    await asyncio.sleep(0)
    clock.now += 5
    done.set()
    await until(lambda: s.holder is None)
    assert ops.states["t"].timing("job") == 5 and books_balance(s)


async def test_a_held_job_has_one_log_line_written_when_its_hold_ends(caplog):
    """A job with a hold is logged once, when the hold ends, with its length (hold_ms): not once at its
    answer and again after its hold. (A mutation audit: logging it at its answer as well went unseen.)"""
    s, _, ops, clock = make_scheduler(small_config())
    ops.states["t"].loaded()
    job = await s.acquire("t", "kt")
    done = asyncio.Event()
    job.release("completed", status=200, success=True, hold=done.wait, hold_timeout_s=600)
    for _ in range(5):
        await asyncio.sleep(0)  # (what follows the answer's handover)
    clock.now += 2
    done.set()
    await until(lambda: s.holder is None)
    for _ in range(5):
        await asyncio.sleep(0)
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("msg=job ")]
    assert len(lines) == 1 and f"id={job.id} " in lines[0] and "hold_ms=2000" in lines[0], lines


def _hold_poll(
    session: aiohttp.ClientSession, url: str, path: str, answer: dict[str, Any]
) -> Callable[[], Awaitable[None]] | None:
    """``hold_poller`` for a consumer at ``url`` whose job answered ``answer``, its hold at ``path``."""
    cfg = small_config()
    consumer = dataclasses.replace(cfg.consumers["t"], url=url)
    hold = m.Hold("GET", path, poll_s=0.05, timeout_s=10)
    s, _, _, _ = make_scheduler(cfg)
    return m.hold_poller(session, consumer, hold, json.dumps(answer).encode(), s.recorder)


async def test_a_hold_path_with_two_placeholders_and_an_answer_with_one_starts_no_hold(caplog):
    """Every placeholder of a hold's path must be in the answer, or no hold starts (logged): an answer with
    one of two has no path to poll. (A mutation audit: asking only for one of them went unseen; the fill
    then raised KeyError in the job's end.)"""
    async with aiohttp.ClientSession() as session:
        assert _hold_poll(session, "http://127.0.0.1:9", "/history/{a}/{b}", {"a": 1}) is None
        assert "no hold: answer lacks the placeholder fields" in caplog.text
        assert _hold_poll(session, "http://127.0.0.1:9", "/history/{a}/{b}", {"a": 1, "b": 2}) is not None


async def test_a_hold_paths_placeholder_is_filled_percent_encoded():
    """A placeholder's value goes into the hold's path percent-encoded: an id with '/', '?' or '#' names one
    path segment, and cannot point the poll at another path or add a query. (A mutation audit: filling it
    raw went unseen.)"""
    seen: list[str] = []

    async def history(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"done": True})

    async with (
        StandIn([("GET", "/history/{id:.*}", history)]) as consumer,
        aiohttp.ClientSession() as session,
    ):
        poll = _hold_poll(session, consumer.url, "/history/{prompt_id}", {"prompt_id": "../free?x=1#y"})
        assert poll is not None
        await asyncio.wait_for(poll(), 10)
    assert seen == ["/history/..%2Ffree%3Fx%3D1%23y"]


async def test_a_hold_poll_answered_an_error_over_the_limit_polls_again():
    """Only a 2xx answer over HOLD_ANSWER_LIMIT ends a hold unread: an error page that long (a 500 with a
    traceback) says nothing of the work, and the hold polls again. (A mutation audit: ending the hold on
    any status went unseen.)"""
    polls: list[int] = []

    async def history(request: web.Request) -> web.Response:
        polls.append(len(polls))
        if len(polls) == 1:
            return web.Response(status=500, body=b"x" * (m.HOLD_ANSWER_LIMIT + 10))
        return web.json_response({"done": True})

    standin = StandIn([("GET", "/history/{id}", history)])
    async with standin as consumer, aiohttp.ClientSession() as session:
        poll = _hold_poll(session, consumer.url, "/history/{prompt_id}", {"prompt_id": "p"})
        assert poll is not None
        await asyncio.wait_for(poll(), 10)
    assert polls == [0, 1]


async def test_hold_keeps_the_lock_until_it_returns_and_times_out_counted():
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    job = await s.acquire("t", "kt")
    release = asyncio.Event()
    job.release("completed", status=200, success=True, hold=release.wait, hold_timeout_s=30)
    x = await _queued(s, "x")
    assert not x.done() and snapshot(s)["holder"].items() >= {"consumer": "t", "jobs": 0, "holds": 1}.items()
    release.set()
    (await x).release("completed")
    job = await s.acquire("t", "kt")
    job.release("completed", hold=asyncio.Event().wait, hold_timeout_s=0.05)
    y = await _queued(s, "y")
    (await asyncio.wait_for(y, 5)).release("completed")
    assert s.stats.hold_timeouts == 1 and books_balance(s)


@pytest.mark.parametrize("fault", ["status", "no_field"])
async def test_an_answer_without_the_placeholder_field_starts_no_hold(rig, fault):
    r = await rig(total_mib=40000, sims={"comfyui": {"work_s": 30}})
    if fault == "status":
        r.sims["comfyui"].faults["status"] = 400
    else:
        r.broker.config.consumers["comfyui"].paths["image"] = m.JobPath(
            "POST", "/prompt", m.Hold("GET", "/history/{missing}", 0.02, 30)
        )
    status, _, _ = await r.post("image", {"prompt": {}})
    assert status == (400 if fault == "status" else 200)
    assert r.broker.scheduler.holder is None and r.broker.scheduler.holds == 0


async def test_a_3xx_answer_on_a_hold_path_starts_no_hold_and_is_no_work_taken(rig):
    """Only a 2xx answer means the consumer took the work: a redirect (which the broker passes on, never
    follows) starts no hold, even one whose body names a prompt, and does not mark the consumer resident.
    (A mutation audit: a 3xx answer taken for the work taken went unseen.)"""
    polls: list[str] = []

    async def prompt(request: web.Request) -> web.Response:
        return web.json_response({"prompt_id": "p1"}, status=303, headers={"Location": "/elsewhere"})

    async with StandIn(_comfy_routes(prompt, polls)) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url})
        async with r.session.post(r.url("/v1/image"), json={"prompt": {}}, allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/elsewhere"
            assert await resp.json() == {"prompt_id": "p1"}
        await until(lambda: r.broker.scheduler.holder is None)
    assert polls == [] and r.broker.consumers.states["comfyui"].resident is not True


async def test_a_render_lost_in_a_crash_releases_the_gpu_when_a_poll_finds_the_consumer_gone(rig, caplog):
    """Issue 11, case 3: ComfyUI killed mid-render and restarted forgets the prompt; the hold does not
    wait for its timeout: the first poll that finds ComfyUI refusing ends it (hold_abandoned)."""
    r = await rig(sims={"comfyui": {"work_s": 60}})
    async with r.session.post(r.url("/v1/image"), json={"prompt": {}}) as resp:
        assert resp.status == 200
    await until(lambda: r.broker.scheduler.holds == 1)
    tts = asyncio.ensure_future(r.post("tts", {"text": "waits for the render"}))
    await until(lambda: len(r.broker.scheduler.queue()) == 1)
    await r.kill("comfyui")
    assert (await asyncio.wait_for(tts, 10))[0] == 200  # served within a few polls, not after 30 s
    await r.revive("comfyui")  # back, without the prompt: /history/<id> would stay {} for ever
    stats = r.stats
    assert (stats.hold_abandoned, stats.hold_timeouts, stats.completed) == (1, 0, 2)
    abandoned = [rec for rec in caplog.records if "hold abandoned" in rec.getMessage()]
    assert len(abandoned) == 1 and abandoned[0].levelno == logging.WARNING
    assert "connection refused" in abandoned[0].getMessage()
    assert r.broker.consumers.states["comfyui"].resident is None  # its memory died with it, or not: read
    text = await (await r.session.get(r.url("/metrics"))).text()
    assert 'mgpumanager_hold_abandoned_total{consumer="comfyui"} 1' in text
    # Its event says so (a mutation audit: an abandoned hold's event said "timeout" and no test failed).
    [ended] = [e for e in recent_events(r.broker.events) if e["event"] == "hold_ended"]
    assert ended["outcome"] == "abandoned" and "connection refused" in ended["reason"], ended


async def test_a_probe_that_finds_the_consumer_gone_abandons_its_hold_too(rig):
    """A render held with slow polls: the health probe sees ComfyUI gone first and ends the hold."""

    def slow_polls(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["poll_s"] = 60

    r = await rig(sims={"comfyui": {"work_s": 60}}, tweak=slow_polls)
    async with r.session.post(r.url("/v1/image"), json={"prompt": {}}) as resp:
        assert resp.status == 200
    await until(lambda: r.broker.scheduler.holds == 1)
    await r.kill("comfyui")
    await r.broker.consumers.probe("comfyui")
    await until(lambda: r.broker.scheduler.holder is None)
    assert r.stats.hold_abandoned == 1 and r.broker.consumers.states["comfyui"].healthy is False


async def _comfyui_rendering_under_a_hold_that_polls_slowly(rig: Any) -> Rig:
    """ComfyUI measured by its processes, rendering (60 s) under a hold whose polls come once a minute; a
    reading has seen its process at work."""

    def measured_slow_polls(raw: dict[str, Any]) -> None:
        comfy_measured(raw)
        raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["poll_s"] = 60

    r = await rig(sims={"comfyui": {"context_mib": 610, "work_s": 60}}, tweak=measured_slow_polls)
    async with r.session.post(r.url("/v1/image"), json={"prompt": {}}) as resp:
        assert resp.status == 200
    await until(lambda: r.broker.scheduler.holds == 1 and r.gpu.used_mib("comfyui") == 13610)
    await r.status()  # a reading: ComfyUI's process, rendering
    return r


async def test_a_restart_seen_only_in_the_readings_ends_the_hold_on_the_lost_render(rig):
    """ComfyUI restarts between two polls and two probes: nothing ever refuses a connection. Measured by
    its processes, the next reading finds every process of it replaced: the render died, the hold ends."""
    r = await _comfyui_rendering_under_a_hold_that_polls_slowly(rig)
    await r.restart("comfyui")  # a new process: its context only, the prompt forgotten
    await asyncio.sleep(m.STATUS_MAX_AGE_S)
    await r.status()  # the next reading
    await until(lambda: r.broker.scheduler.holder is None)
    assert r.stats.hold_abandoned == 1 and r.broker.consumers.states["comfyui"].resident is False


async def test_a_restart_whose_old_process_lingers_nameless_still_ends_the_hold(rig):
    """As above, but the old process is still listed a moment, exiting: no name any more, its memory not
    freed yet, while the new process already holds its context. The old pid is still ComfyUI's memory (no
    stranger's), but no live process of ComfyUI's is left from before: it restarted, the hold ends."""
    r = await _comfyui_rendering_under_a_hold_that_polls_slowly(rig)
    old = r.sims["comfyui"].pid
    await r.restart("comfyui")  # a new process: its context only, the prompt forgotten
    r.gpu.allocate("comfyui-exiting", 13610, process="", pid=old)  # the old one, exiting
    await asyncio.sleep(m.STATUS_MAX_AGE_S)
    st = await r.status()  # the next reading
    assert st["consumers"]["comfyui"]["vram_used_mib"] == 14220  # (the exiting one's memory is its own)
    await until(lambda: r.broker.scheduler.holder is None)
    assert r.stats.hold_abandoned == 1


async def test_a_slow_but_alive_consumer_keeps_its_hold(rig, caplog):
    """Poll errors that are not a refusal (a reset, a slow answer) are retried; the first one is a warning."""
    caplog.set_level(logging.DEBUG, "mgpumanager")
    polls: list[int] = []

    async def prompt(request: web.Request) -> web.Response:
        return web.json_response({"prompt_id": "p3"})

    async def history(request: web.Request) -> web.Response:
        polls.append(1)
        if len(polls) <= 6:
            request.transport.abort()  # alive, but dropping the connection
        return web.json_response({"p3": {"done": True}})

    routes = [("POST", "/prompt", prompt), ("GET", "/history/{id}", history), ("GET", "/system_stats", _ok)]
    async with StandIn(routes) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url})
        assert (await r.post("image", {"prompt": {}}))[0] == 200
        await until(lambda: r.broker.scheduler.holder is None)
    assert r.stats.hold_abandoned == 0 and r.stats.hold_poll_errors >= 2
    levels = [rec.levelno for rec in caplog.records if "hold poll failed" in rec.getMessage()]
    assert levels[0] == logging.WARNING and set(levels[1:]) == {logging.DEBUG}


async def _leave_mid_answer(r: Rig, left: asyncio.Event) -> None:
    """An image job whose client leaves after its answer's first bytes, its job ended as cancelled; then
    ``left`` is set (the stand-in sends the rest of its answer)."""
    resp = await r.session.post(r.url("/v1/image"), json={"prompt": {}})
    assert await resp.content.readexactly(14) == b'{"prompt_id": '
    resp.close()
    await until(lambda: r.stats.cancelled == 1)
    left.set()


def _comfy_routes(
    prompt: Callable[[web.Request], Awaitable[web.StreamResponse]], polls: list[str]
) -> list[Any]:
    """A ComfyUI stand-in's routes: ``prompt`` at /prompt, /history/{id} noting each poll's id in ``polls``
    and answering every prompt done, and /system_stats."""

    async def history(request: web.Request) -> web.Response:
        polls.append(request.match_info["id"])
        return web.json_response({"p1": {}})

    return [("POST", "/prompt", prompt), ("GET", "/history/{id}", history), ("GET", "/system_stats", _ok)]


async def test_a_client_leaving_mid_answer_still_starts_the_hold(rig):
    rendered, left = asyncio.Event(), asyncio.Event()

    async def prompt_in_two_halves(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"prompt_id": ')
        await left.wait()  # the second half once the client has left
        await resp.write(b'"p1", "number": 0}')
        return resp

    async def history(request: web.Request) -> web.Response:
        assert request.match_info["id"] == "p1"
        return web.json_response({"p1": {}} if rendered.is_set() else {})

    routes = [("POST", "/prompt", prompt_in_two_halves), ("GET", "/history/{id}", history)]
    routes.append(("GET", "/system_stats", _ok))
    async with StandIn(routes) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url})
        await _leave_mid_answer(r, left)
        await until(lambda: r.broker.scheduler.holds == 1)
        assert (
            snapshot(r.broker.scheduler)["holder"].items()
            >= {"consumer": "comfyui", "jobs": 0, "holds": 1}.items()
        )
        rendered.set()
        await until(lambda: r.broker.scheduler.holder is None)
        assert r.broker.consumers.states["comfyui"].resident is True


def _padded_prompt_answer(size: int) -> list[bytes]:
    """A ComfyUI /prompt answer that names its prompt p1 and is padded to ``size`` bytes, in 64 KiB writes but
    a last short one: a capture that skipped a write it had no room for, then kept a later one, would still
    hold valid JSON naming p1."""
    head, tail = b'{"prompt_id": "p1", "pad": "', b'"}'
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    step = 64 * 1024
    return [body[i : min(i + step, len(body) - len(tail))] for i in range(0, len(body) - len(tail), step)] + [
        tail
    ]


async def test_a_2xx_answer_over_the_hold_answer_limit_starts_no_hold(rig):
    """A hold's placeholders come from the answer only while it is at most HOLD_ANSWER_LIMIT (the capture is
    bounded, so a consumer cannot fill the broker's memory): a longer one starts no hold, even one whose
    every byte is JSON naming its prompt, and no poll is made. (A mutation audit: the relay's capture
    unbounded, which started the hold from the whole answer, went unseen.)"""
    polls: list[str] = []

    async def prompt(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for part in _padded_prompt_answer(m.HOLD_ANSWER_LIMIT + 256 * 1024):
            await resp.write(part)
        return resp

    async with StandIn(_comfy_routes(prompt, polls)) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url})
        status, _, body = await r.post("image", {"prompt": {}})
        assert status == 200 and len(body) == m.HOLD_ANSWER_LIMIT + 256 * 1024
        await until(lambda: r.broker.scheduler.holder is None)
    assert polls == [] and r.stats.completed == 1


@pytest.mark.parametrize("client_leaves", [False, True], ids=["relayed", "read by the hold"])
async def test_a_long_2xx_answer_on_a_hold_path_is_kept_in_memory_no_further_than_its_limit(
    rig, client_leaves
):
    """The capture of a hold's answer (for its placeholders) keeps HOLD_ANSWER_LIMIT of it and a byte more,
    whether the relay reads it or, the client gone, the hold itself: a 64 MiB answer streams through the
    broker without its memory growing by the answer's size (the most allocated at once, as tracemalloc
    counts it, stays far under it). (A mutation audit: the relay's capture unbounded, and hold_after_rest's,
    went unseen.)"""
    left = asyncio.Event()
    size = 64 * m.MiB

    async def prompt(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"prompt_id": "p1", "pad": "')
        if client_leaves:
            await left.wait()  # the rest once the client has left
        for _ in range(size // m.MiB):
            await resp.write(b"x" * m.MiB)
        await resp.write(b'"}')
        return resp

    routes = [("POST", "/prompt", prompt), ("GET", "/history/{id}", _ok), ("GET", "/system_stats", _ok)]
    async with StandIn(routes) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url})
        tracemalloc.start()
        try:
            async with r.session.post(r.url("/v1/image"), json={"prompt": {}}) as resp:
                assert resp.status == 200
                if client_leaves:
                    assert await resp.content.readexactly(14) == b'{"prompt_id": '
                    resp.close()  # the client leaves before the answer ended: its hold reads the rest
                    await until(lambda: r.stats.cancelled == 1)
                    left.set()
                else:
                    got = 0
                    while chunk := await resp.content.readany():  # (read and let go)
                        got += len(chunk)
                    assert got > size
            await until(lambda: r.broker.scheduler.holder is None, timeout=60)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < size // 4, f"{peak / m.MiB:.0f} MiB at once for a {size // m.MiB} MiB answer"


async def test_a_client_leaving_an_answer_over_the_hold_answer_limit_starts_no_hold(rig):
    """The hold of a client that left reads the rest of the answer itself, keeping at most HOLD_ANSWER_LIMIT
    of it: a longer answer starts no hold, even one whose every byte is JSON naming its prompt. (A mutation
    audit: hold_after_rest's capture unbounded, which started the hold from the whole answer, went
    unseen.)"""
    left = asyncio.Event()
    polls: list[str] = []

    async def prompt(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        first, *rest = _padded_prompt_answer(m.HOLD_ANSWER_LIMIT + 256 * 1024)
        await resp.write(first)
        await left.wait()  # the rest once the client has left
        for part in rest:
            await resp.write(part)
        return resp

    async with StandIn(_comfy_routes(prompt, polls)) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url})
        await _leave_mid_answer(r, left)
        await until(lambda: r.broker.scheduler.holder is None)
    assert polls == [] and r.stats.hold_timeouts == 0


async def test_a_hold_that_times_out_reading_the_rest_of_an_answer_closes_the_consumers_connection(rig):
    """The hold of a client that left reads the rest of the answer itself; when the hold ends before the rest
    came (its timeout_s), the connection to the consumer is closed, not left open with the consumer still
    sending into it. (A mutation audit: hold_after_rest never closing the upstream connection went
    unseen.)"""
    requests: list[web.Request] = []
    gate = asyncio.Event()

    async def prompt(request: web.Request) -> web.StreamResponse:
        requests.append(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"prompt_id": ')
        await gate.wait()  # the rest never comes while the test runs
        return resp

    def short(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["timeout_s"] = 0.5

    routes = [("POST", "/prompt", prompt), ("GET", "/history/{id}", _ok), ("GET", "/system_stats", _ok)]
    async with StandIn(routes) as comfy:
        try:
            r = await rig(total_mib=40000, urls={"comfyui": comfy.url}, tweak=short)
            resp = await r.session.post(r.url("/v1/image"), json={"prompt": {}})
            assert await resp.content.readexactly(14) == b'{"prompt_id": '
            resp.close()  # the client leaves before the answer ended: its hold reads the rest
            await until(lambda: r.stats.cancelled == 1 and r.broker.scheduler.holder is None)
            assert r.stats.hold_timeouts == 1
            (request,) = requests
            await until(lambda: request.transport is None)  # the consumer saw its connection closed
        finally:
            gate.set()


async def test_hold_poll_errors_are_retried_and_counted(rig):
    polls = []

    async def prompt(request: web.Request) -> web.Response:
        return web.json_response({"prompt_id": "p2"})

    async def history(request: web.Request) -> web.Response:
        polls.append(1)
        if len(polls) <= 4:
            request.transport.abort()  # the consumer drops the connection
        return web.json_response({"p2": {"done": True}})

    routes = [("POST", "/prompt", prompt), ("GET", "/history/{id}", history), ("GET", "/system_stats", _ok)]
    async with StandIn(routes) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url})
        assert (await r.post("image", {"prompt": {}}))[0] == 200
        await until(lambda: r.broker.scheduler.holder is None)
        # aiohttp itself retries a GET once on a dropped pooled connection, so 4 drops are 2+ errors.
        assert len(polls) == 5 and r.stats.hold_poll_errors >= 2 and r.stats.hold_timeouts == 0
        # Counted in /metrics too, from the same record (a mutation audit: the metric was untested).
        text = await (await r.session.get(r.url("/metrics"))).text()
        assert f'mgpumanager_hold_poll_errors_total{{consumer="comfyui"}} {r.stats.hold_poll_errors}' in text


async def test_a_hold_poll_answered_without_end_is_read_no_further_than_its_limit(rig):
    """A consumer whose hold poll answers a body that never ends: the poll read it whole (into memory, as
    fast as loopback goes, until the poll's timeout), then found no JSON and polled again. It reads
    HOLD_ANSWER_LIMIT and one byte more; so long a 2xx answer is no empty one: the hold is released."""
    sent: list[int] = []

    async def prompt(request: web.Request) -> web.Response:
        return web.json_response({"prompt_id": "p3"})

    async def history(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        sent.append(0)
        with contextlib.suppress(ConnectionResetError):
            while sent[-1] < 256 * m.MiB:
                await resp.write(b"[" * m.MiB)
                sent[-1] += m.MiB
        return resp

    def short(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["timeout_s"] = 30

    routes = [("POST", "/prompt", prompt), ("GET", "/history/{id}", history), ("GET", "/system_stats", _ok)]
    async with StandIn(routes) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url}, tweak=short)
        assert (await r.post("image", {"prompt": {}}))[0] == 200
        await until(lambda: r.broker.scheduler.holder is None, timeout=60)
    (ended,) = [e for e in recent_events(r.broker.events) if e["event"] == "hold_ended"]
    assert ended["outcome"] == "released" and len(sent) == 1 and sent[0] < 64 * m.MiB, sent


async def test_hold_that_never_completes_releases_the_lock_at_its_timeout(rig):
    def short(raw):
        raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["timeout_s"] = 0.3

    r = await rig(total_mib=40000, sims={"comfyui": {"work_s": 3600}}, tweak=short)
    assert (await r.post("image", {"prompt": {}}))[0] == 200
    assert r.broker.scheduler.holds == 1
    await until(lambda: r.broker.scheduler.holder is None)
    assert r.stats.hold_timeouts == 1
    assert (await r.post("tts", {"text": "next"}))[0] == 200


async def test_a_hold_ends_with_an_event_released_timeout_abandoned_or_cut(rig):
    def short(raw):
        raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["timeout_s"] = 0.3

    def ended() -> list[dict[str, Any]]:
        return [e for e in recent_events(r.broker.events) if e["event"] == "hold_ended"]

    r = await rig(total_mib=40000, sims={"comfyui": {"work_s": 0.5}})
    assert (await r.post("image", {"prompt": {}}))[0] == 200
    assert (await r.post("tts", {"text": "waits for the render"}))[0] == 200
    await until(lambda: r.broker.scheduler.holder is None and len(ended()) == 1)
    names = [(e["event"], e.get("consumer")) for e in recent_events(r.broker.events) if "job" in e]
    # The hold's end comes after its job's answer and before the job waiting for the GPU gets it.
    assert names.index(("finished", "comfyui")) < names.index(("hold_ended", "comfyui"))
    assert names.index(("hold_ended", "comfyui")) < names.index(("granted", "mvoice"))
    event = ended()[0]
    assert event.items() >= {"job": 1, "consumer": "comfyui", "kind": "image", "gpu": 0}.items()
    assert event["outcome"] == "released" and event["hold_s"] >= 0.4

    r = await rig(total_mib=40000, sims={"comfyui": {"work_s": 3600}}, tweak=short)
    assert (await r.post("image", {"prompt": {}}))[0] == 200
    await until(lambda: len(ended()) == 1)
    assert ended()[0]["outcome"] == "timeout"
    assert (await r.post("image", {"prompt": {}}))[0] == 200
    await r.broker.scheduler.close()  # as at shutdown: the hold is cut short
    assert [e["outcome"] for e in ended()] == ["timeout", "cut"]
    assert r.stats.hold_abandoned == 0  # not the consumer's doing: it is not seen down


async def test_an_absurdly_nested_answer_starts_no_hold_and_frees_the_lock(rig):
    async def prompt(request: web.Request) -> web.Response:
        return web.Response(body=b"[" * 100_000 + b"]" * 100_000, content_type="application/json")

    async with StandIn([("POST", "/prompt", prompt), ("GET", "/system_stats", _ok)]) as comfy:
        r = await rig(total_mib=40000, urls={"comfyui": comfy.url})
        assert (await r.post("image", {"prompt": {}}))[0] == 200
        assert r.broker.scheduler.holder is None and r.stats.completed == 1


async def test_a_hold_abandoned_in_the_turn_it_was_made_still_frees_the_gpu():
    """The consumer seen gone (a probe, a reading) in the very turn of the loop in which its job's answer
    ended: the hold's task was cancelled before it ever ran, so its ``finally`` never gave the slot back,
    and the GPU stayed held for good."""
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    job = await s.acquire("t", "kt")
    job.release("completed", status=200, success=True, hold=asyncio.Event().wait, hold_timeout_s=30)
    s.holding.abandon("t", "health probe: connection refused")  # before the hold's first step
    await until(lambda: s.holder is None, 5)
    assert (s.slots, s.holds, s.stats.hold_abandoned) == (0, 0, 1) and s.jobs_of("t") == 0
    assert books_balance(s)


# =====================================================================================================
# 8. Mounts, consumer ports and WebSockets
# Unmodified clients through /c/{name}/ and a consumer's own port.
# =====================================================================================================


async def _ws_open(r: Rig, path: str, **kw: Any) -> aiohttp.ClientWebSocketResponse:
    url = URL(r.url("/").rstrip("/") + path, encoded=True)  # the query as written
    return await r.session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=5), **kw)


async def _ws_json(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


def with_ports(raw: dict[str, Any]) -> None:
    """The presets, and a port of its own (any free one) for ollama and for comfyui."""
    use_presets(raw)
    for name in ("ollama", "comfyui"):
        raw["consumers"][name]["listen"] = "127.0.0.1:0"


def port_url(r: Rig, name: str, path: str = "") -> str:
    return f"http://{r.broker.ports.address(name)}{path}"


async def test_mount_ollama_client_generate_and_streaming_chat(rig, caplog):
    import ollama  # noqa: PLC0415 (a dev dependency, needed here only)

    r = await rig(sims={"ollama": {"lines": 4}})
    client = ollama.AsyncClient(host=r.url("/c/ollama"))
    try:
        answer = await client.generate(model="sim", prompt="hi", stream=False)
        assert answer.response == "tok0 tok1 tok2 tok3 " and answer.done
        parts = [
            part
            async for part in await client.chat(
                model="sim", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        ]
        assert "".join(p.message.content for p in parts) == "tok0 tok1 tok2 tok3 " and parts[-1].done
        assert len(parts) == 5 and all(p.message.role == "assistant" for p in parts)
        listed = await client.list()
        assert [model.model for model in listed.models] == ["sim:latest"]
    finally:
        await client._client.aclose()
    sim = r.sims["ollama"]
    assert [(rec.method, rec.path) for rec in sim.records] == [
        ("POST", "/api/generate"),
        ("POST", "/api/chat"),
        ("GET", "/api/tags"),
    ]
    assert [rec.path for rec in sim.work] == ["/api/generate", "/api/chat"]
    assert sim.records[1].headers["User-Agent"].startswith("ollama-python/")
    # Two GPU jobs: /api/generate is ollama's path for kind llm, /api/chat is a plain mount job.
    assert r.stats.jobs == 2 and r.stats.completed == 2
    await until(lambda: len(job_lines(caplog)) == 2)
    kinds = [re.search(r" kind=(\w+)", line).group(1) for line in job_lines(caplog)]
    assert kinds == ["llm", "mount"]


async def test_mount_openai_client_streams_chat_completions_with_the_brokers_token(rig):
    import openai  # noqa: PLC0415 (a dev dependency, needed here only)

    def setup(raw: dict[str, Any]) -> None:
        with_token(raw)
        # Measured, as mrock's consumers are. Without a way to tell its residency (no processes, no
        # listing, no "loaded"), Ollama would be in doubt after the first completion (a mount job outside
        # its paths) and planned at its full size, which does not fit beside what it holds (issue 18).
        raw["consumers"]["ollama"]["processes"] = {"name": mgpusim.OllamaSim.process_name}

    r = await rig(tweak=setup, sims={"ollama": {"lines": 3, "line_interval_s": 0.05}})
    client = openai.AsyncOpenAI(base_url=r.url("/c/ollama/v1"), api_key=TOKEN, max_retries=0)
    stranger = openai.AsyncOpenAI(base_url=r.url("/c/ollama/v1"), api_key="not-the-token", max_retries=0)
    try:
        # A /v1 job of the same consumer, sent first: the client's completion waits for it.
        v1 = asyncio.create_task(
            r.post("llm", {"model": "m", "prompt": "p"}, headers={"Authorization": f"Bearer {TOKEN}"})
        )
        await until(lambda: r.broker.scheduler.holder == "ollama")
        stream = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert (await v1)[0] == 200
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 "
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        whole = await client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])
        assert whole.choices[0].message.content == "tok0 tok1 tok2 "
        assert [model.id async for model in client.models.list()] == ["sim:latest"]
        with pytest.raises(openai.AuthenticationError):
            await stranger.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])
    finally:
        await client.close()
        await stranger.close()
    sim = r.sims["ollama"]
    assert [(rec.method, rec.path) for rec in sim.records] == [
        ("POST", "/api/generate"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ]
    assert not overlaps(sim.work)  # serialised with the /v1 job, through the same lock
    assert all("Authorization" not in rec.headers for rec in sim.records)  # the token stays at the broker
    assert sim.records[1].headers["X-Forwarded-For"] == "127.0.0.1"
    assert r.stats.jobs == 3  # the /v1 job and the two completions; the model list is a read


async def test_a_mount_read_whose_client_leaves_mid_answer_closes_the_consumers_connection(rig):
    """An unscheduled mount read (forward) streams the consumer's answer; a client that leaves in the middle
    of it gets its connection to the consumer closed too, not left open with the consumer still sending
    into it. (A mutation audit: forward not closing the upstream connection went unseen: it stayed open.)"""
    requests: list[web.Request] = []
    gate = asyncio.Event()

    async def tags(request: web.Request) -> web.StreamResponse:
        requests.append(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        await gate.wait()  # the rest never comes while the test runs
        return resp

    async with StandIn([("GET", "/api/tags", tags), ("GET", "/", _ok)]) as ollama:
        try:
            r = await rig(urls={"ollama": ollama.url})
            resp = await r.session.get(r.url("/c/ollama/api/tags"))
            assert resp.status == 200 and await resp.content.readexactly(1000) == b"x" * 1000
            resp.close()  # the client leaves
            (request,) = requests
            await until(lambda: request.transport is None)  # the consumer saw its connection closed
        finally:
            gate.set()


async def test_mount_jobs_wait_for_the_lock_but_reads_and_unscheduled_calls_do_not(rig):
    import ollama  # noqa: PLC0415

    gate, synthesizing = asyncio.Event(), asyncio.Event()

    async def slow_synthesize(request: web.Request) -> web.Response:
        synthesizing.set()
        await gate.wait()
        return web.Response(body=b"RIFF", content_type="audio/wav")

    stand_in = StandIn([("GET", "/health", _ok), ("POST", "/api/synthesize", slow_synthesize)])
    async with stand_in as mvoice:
        r = await rig(urls={"mvoice": mvoice.url}, tweak=_unscheduled_show)
        client = ollama.AsyncClient(host=r.url("/c/ollama"))
        try:
            tts = asyncio.create_task(r.post("tts", {"text": "slow"}))
            await asyncio.wait_for(synthesizing.wait(), 10)
            generate = asyncio.create_task(client.generate(model="sim", prompt="hi", stream=False))
            await until(lambda: len(r.broker.scheduler.queue()) == 1)  # so that the order is known
            chat = asyncio.create_task(
                client.chat(model="sim", messages=[{"role": "user", "content": "x"}], stream=False)
            )
            await until(lambda: len(r.broker.scheduler.queue()) == 2)
            # While mvoice holds the lock, a read and a listed unscheduled call are answered at once.
            assert [m.model for m in (await client.list()).models] == ["sim:latest"]
            assert (await client.show("sim")).details.family == "sim"
            async with r.session.head(r.url("/c/ollama/api/tags")) as resp:
                assert resp.status == 200
            assert r.broker.scheduler.holder == "mvoice" and not tts.done()
            assert [rec.path for rec in r.sims["ollama"].records] == ["/api/tags", "/api/show", "/api/tags"]
            assert [j.kind for j in r.broker.scheduler.queue()] == ["llm", "mount"]
            gate.set()
            assert (await tts)[0] == 200
            assert (await generate).response and (await chat).message.content
        finally:
            await client._client.aclose()
    sim = r.sims["ollama"]
    assert [rec.path for rec in sim.work] == ["/api/generate", "/api/chat"]
    assert not overlaps(sim.work) and r.stats.jobs == 3 and r.stats.completed == 3


async def test_mount_query_head_options_root_and_refusals(rig):
    r = await rig()
    root = r.url("/").rstrip("/")  # r.url() would re-encode the query: these go as written
    tags = URL(root + "/c/ollama/api/tags?x=%20y&b&c=%2F", encoded=True)
    async with r.session.get(tags) as resp:
        assert resp.status == 200 and "models" in await resp.json()
    chat = URL(root + "/c/ollama/api/chat?keep=%41&z", encoded=True)
    async with r.session.post(chat, json={"stream": False}) as resp:
        assert resp.status == 200
    probes = r.sims["ollama"].probes
    async with r.session.get(r.url("/c/ollama")) as resp:  # "/", ollama's health path: counted, not recorded
        assert resp.status == 200 and await resp.text() == "Ollama is running"
    assert r.sims["ollama"].probes == probes + 1
    async with r.session.options(r.url("/c/ollama/api/tags")) as resp:
        assert resp.status == 405  # the consumer's own answer, passed through
    async with r.session.head(r.url("/c/ollama/api/tags")) as resp:
        assert resp.status == 200
    sim = r.sims["ollama"]
    assert [(rec.method, rec.path, rec.query) for rec in sim.records] == [
        ("GET", "/api/tags", "x=%20y&b&c=%2F"),
        ("POST", "/api/chat", "keep=%41&z"),
        ("OPTIONS", "/api/tags", ""),
        ("HEAD", "/api/tags", ""),
    ]
    assert r.stats.jobs == 1  # only the POST
    async with r.session.post(r.url("/c/nobody/api/generate"), json={}) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "no_consumer")
        assert "nobody" in data["message"]
    for target in ("/c/ollama/a/%2e%2e/%2e%2e/v1/status", "/c/ollama/x/..%2F..%2Fapi/chat"):
        status, body = await raw_get(r, target)
        error_of(status, {}, body, "bad_request")
    assert len(sim.records) == 4 and r.stats.jobs == 1


async def test_mount_unscheduled_exact_and_prefix_entries_skip_the_lock(rig):
    def listed(raw):
        raw["consumers"]["comfyui"]["unscheduled"] = [{"path": "/upload/*"}, {"path": "/interrupt"}]

    r = await rig(tweak=listed)
    statuses = []
    for path in ("/upload/image", "/upload/mask?overwrite=1", "/interrupt", "/interrupt/x", "/uploads"):
        async with r.session.post(r.url("/c/comfyui" + path), data=b"x") as resp:
            statuses.append(resp.status)
    assert statuses == [404, 404, 200, 404, 404]  # ComfySim has /interrupt only; what matters is who waited
    assert [rec.path for rec in r.sims["comfyui"].records] == [
        "/upload/image",
        "/upload/mask",
        "/interrupt",
        "/interrupt/x",
        "/uploads",
    ]
    assert r.stats.jobs == 2  # /interrupt/x and /uploads match no entry: GPU jobs


async def test_mount_websocket_relays_both_ways_and_close_codes(rig):
    r = await rig(total_mib=40000, sims={"comfyui": {"work_s": 0.05}})
    sim = r.sims["comfyui"]
    ws = await _ws_open(r, "/c/comfyui/ws?clientId=abc%20d")
    first = await _ws_json(ws)
    assert first["type"] == "status" and first["data"]["sid"] == "abc d"  # the query string was kept
    await ws.send_str("hello")
    assert (await ws.receive(timeout=10)).data == "hello"
    await ws.send_bytes(b"\x00\xff" * 1000)
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == b"\x00\xff" * 1000
    # Progress of a render started through the mount reaches the socket its prompt names (as ComfyUI
    # sends it: to the client_id's socket only); queue status messages come between.
    async with r.session.post(r.url("/c/comfyui/prompt"), json={"prompt": {}, "client_id": "abc d"}) as resp:
        prompt_id = (await resp.json())["prompt_id"]
    seen: list[dict[str, Any]] = []
    while not seen or seen[-1]["type"] != "executing" or seen[-1]["data"]["node"] is not None:
        if (message := await _ws_json(ws))["type"] != "status":
            seen.append(message)
    assert [(s["type"], s["data"].get("node", "-")) for s in seen] == [
        ("execution_start", "-"),
        ("execution_cached", "-"),
        ("executing", "1"),
        ("execution_success", "-"),
        ("executing", None),
    ]
    assert {s["data"]["prompt_id"] for s in seen} == {prompt_id}
    # The consumer closes with a code: the client gets it.
    await ws.send_str("close 4001")
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001
    # The client closes with a code: the consumer gets it.
    ws2 = await _ws_open(r, "/c/comfyui/ws")
    await _ws_json(ws2)
    await ws2.close(code=4002)
    await until(lambda: 4002 in sim.ws_closes)
    # The Upgrade token is case-insensitive (RFC 9110, 7.8): "WebSocket" is a WebSocket too, not a read.
    ws3 = await _ws_open(r, "/c/comfyui/ws", headers={"Upgrade": "WebSocket"})
    await _ws_json(ws3)
    await ws3.send_str("again")
    assert (await ws3.receive(timeout=10)).data == "again"
    await ws3.close()
    await until(lambda: not list(r.app[m.WEBSOCKETS]) and not sim.sockets)
    assert r.stats.jobs == 1  # the prompt; WebSockets are not jobs
    assert [rec.path for rec in sim.records].count("/ws") == 3


async def test_mount_websocket_passes_subprotocol_and_headers_but_not_the_token(rig):
    seen: list[dict[str, str]] = []

    async def socket(request: web.Request) -> web.WebSocketResponse:
        seen.append(dict(request.headers))
        ws = web.WebSocketResponse(protocols=("comfy.v2",))
        await ws.prepare(request)
        await ws.send_str(request.raw_path.partition("?")[2])
        async for msg in ws:
            await ws.send_str(msg.data.upper())
        return ws

    async with StandIn([("GET", "/system_stats", _ok), ("GET", "/ws", socket)]) as comfy:
        host = comfy.url.removeprefix("http://")
        r = await rig(urls={"comfyui": comfy.url}, tweak=with_token)
        auth = {"Authorization": f"Bearer {TOKEN}", "X-Custom": "1"}
        ws = await _ws_open(r, "/c/comfyui/ws?a=%2F", protocols=("comfy.v1", "comfy.v2"), headers=auth)
        assert ws.protocol == "comfy.v2"
        assert (await ws.receive(timeout=10)).data == "a=%2F"
        await ws.send_str("up")
        assert (await ws.receive(timeout=10)).data == "UP"
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await _ws_open(r, "/c/comfyui/ws")
        assert refused.value.status == 401
        # A client that sends no User-Agent, Accept or Accept-Encoding: the consumer gets none either (the
        # broker's aiohttp added its own, found by an attack).
        bare = ("User-Agent", "Accept", "Accept-Encoding")
        async with aiohttp.ClientSession(skip_auto_headers=bare) as client:
            url = URL(r.url("/").rstrip("/") + "/c/comfyui/ws", encoded=True)
            async with client.ws_connect(
                url, headers=auth, timeout=aiohttp.ClientWSTimeout(ws_close=5)
            ) as ws:
                await ws.receive(timeout=10)
    headers, plain = seen
    assert "Authorization" not in headers and headers["X-Custom"] == "1"
    assert headers["Sec-WebSocket-Protocol"] == "comfy.v1,comfy.v2"
    assert headers["X-Forwarded-For"] == "127.0.0.1" and headers["Host"] == host
    assert not set(bare) & set(plain), plain


async def test_mount_websocket_to_a_consumer_that_is_down_is_a_json_error(rig):
    r = await rig()
    await r.sim_servers["comfyui"].close()  # the broker still believes it healthy
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
    }
    async with r.session.get(r.url("/c/comfyui/ws"), headers=upgrade) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "consumer_unreachable")
        assert data["consumer"] == "comfyui" and "refused" in data["message"]
    assert r.broker.consumers.states["comfyui"].healthy is False
    # A consumer that answers but has no WebSocket there refuses the upgrade: a JSON error too.
    async with r.session.get(r.url("/c/ollama/api/tags"), headers=upgrade) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "consumer_unreachable")
        assert "refused the WebSocket upgrade" in data["message"]
    assert r.broker.consumers.states["ollama"].healthy is not False
    assert r.stats.jobs == 0


async def test_mount_websocket_that_breaks_is_logged_counted_and_closed_1011(rig, caplog):
    async def breaking(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("one")
        assert request.transport is not None
        request.transport.abort()  # gone without a close frame
        return ws

    async with StandIn([("GET", "/system_stats", _ok), ("GET", "/ws", breaking)]) as comfy:
        r = await rig(urls={"comfyui": comfy.url})
        ws = await _ws_open(r, "/c/comfyui/ws")
        assert (await ws.receive(timeout=10)).data == "one"
        closing = await ws.receive(timeout=10)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1011
        await ws.close()
        await until(lambda: 'msg="websocket broke" consumer=comfyui' in caplog.text)
        async with r.session.get(r.url("/metrics")) as resp:
            families = _families(await resp.text())
        assert _value(families, "mgpumanager_websocket_failures_total", consumer="comfyui") == 1
        assert _value(families, "mgpumanager_websockets_total", consumer="comfyui") == 1
        assert r.app[m.WEBSOCKETS] == set()


async def test_mount_websocket_upgrade_without_a_key_never_reaches_the_consumer(rig):
    r = await rig()
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    async with r.session.get(r.url("/c/comfyui/ws"), headers=upgrade) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "bad_request")
    assert r.sims["comfyui"].records == []


async def test_mount_schedules_every_paths_entry_and_refuses_the_brokers_own_routes(rig):
    def get_path(raw: dict[str, Any]) -> None:  # a service that synthesises on GET is still GPU work
        raw["consumers"]["mvoice"]["paths"]["speak"] = {"method": "GET", "path": "/api/synthesize"}

    r = await rig(tweak=get_path)
    async with r.session.get(r.url("/c/mvoice/api/synthesize?text=x")) as resp:
        assert resp.status == 405  # mvoice's own answer (it wants POST): what matters is the job
    assert r.stats.jobs == 1 and r.stats.completed == 1
    async with r.session.post(r.url("/c/comfyui/free"), json={"unload_models": True}) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")
    assert "POST /v1/consumers/comfyui/unload" in data["message"]
    async with r.session.post(r.url("/c/mvoice/api/admin/%75nload")) as resp:  # encoded, still refused
        error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")
    assert r.sims["comfyui"].records == [] and r.sims["mvoice"].unloads == 0 and r.stats.jobs == 1


async def test_mount_unscheduled_calls_match_decoded_paths_and_respect_known_failures(rig):
    r = await rig(tweak=_unscheduled_show)
    async with r.session.post(r.url("/c/ollama/api/%73how"), json={"model": "sim"}) as resp:
        assert resp.status == 200  # /api/show, as ollama will read it: unscheduled
    assert r.stats.jobs == 0 and r.sims["ollama"].records[-1].path == "/api/show"
    r.sims["ollama"].faults["health_status"] = 503  # down for good: the probe on demand finds it so
    r.broker.consumers.gone("ollama", "connection refused")
    async with r.session.get(r.url("/c/ollama/api/tags")) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "consumer_unreachable")
    assert "last probe failed: health answered 503" in data["message"]
    assert len(r.sims["ollama"].records) == 1 and r.stats.jobs == 0


async def test_broker_shutting_down_closes_open_websockets_going_away(rig):
    r = await rig()
    ws = await _ws_open(r, "/c/comfyui/ws")
    await _ws_json(ws)
    await until(lambda: len(r.app[m.WEBSOCKETS]) == 1)
    closing = asyncio.create_task(r.server.close())
    msg = await ws.receive(timeout=20)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY
    await asyncio.wait_for(closing, 20)
    await until(lambda: 1001 in r.sims["comfyui"].ws_closes)


async def test_shutting_down_closes_the_websockets_of_consumer_ports_at_once_too(rig, caplog):
    """On shutdown every open WebSocket is closed at once with 1001, those through a consumer's port as well
    as the mount's: not only once running jobs have drained (here one holds the GPU until after both
    closed), and the log counts them all."""
    gate = asyncio.Event()

    def comfyui_port(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["listen"] = "127.0.0.1:0"

    async with held_llm(gate) as ollama:
        r = await rig(urls={"ollama": ollama.url}, tweak=comfyui_port)
        port = r.broker.ports.address("comfyui")
        sockets = [await _ws_open(r, "/c/comfyui/ws"), await r.session.ws_connect(f"http://{port}/ws")]
        for ws in sockets:
            await _ws_json(ws)
        running = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
        await until(lambda: r.broker.scheduler.holder == "ollama")
        closing = asyncio.create_task(r.server.close())
        try:
            for ws in sockets:
                msg = await ws.receive(timeout=20)
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY
            assert not running.done()  # the job still runs: closed at once, not after the drain
        finally:
            gate.set()
        assert (await running)[0] == 200
        await asyncio.wait_for(closing, 20)
    assert 'msg="shutting down: closing websockets" websockets=2' in caplog.text


async def test_daemon_with_an_open_websocket_exits_on_sigterm(rig):
    r = await rig()
    daemon = Daemon(r.raw, r.tmp_path, sim_smi(r.state))
    async with daemon:
        ws = await r.session.ws_connect(daemon.url("/c/comfyui/ws"))
        await _ws_json(ws)
        daemon.terminate()
        msg = await ws.receive(timeout=20)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY
        await asyncio.wait_for(daemon.proc.wait(), 30)
    assert daemon.proc.returncode == 0, daemon.log
    assert 'msg="shutting down: closing websockets" websockets=1' in daemon.log


def test_two_consumers_cannot_share_a_port_but_port_0_is_any_free_one():
    raw = base_raw()
    for name in ("mvoice", "comfyui"):
        raw["consumers"][name]["listen"] = "127.0.0.1:8189"
    assert problems_of(raw) == ["consumers.comfyui.listen: port 8189 is consumers.mvoice.listen's already"]
    for name in ("mvoice", "comfyui"):
        raw["consumers"][name]["listen"] = "127.0.0.1:0"
    assert m.parse_config(raw).consumers["comfyui"].listen == ("127.0.0.1", 0)


def test_a_consumer_url_on_one_of_the_brokers_own_listeners_is_refused():
    """``listen: 127.0.0.1:11434`` for Ollama, whose url is http://127.0.0.1:11434 (its usual port, taken by
    the broker while Ollama was down): every probe went round through the broker until its timeout, each
    hop taking an unscheduled slot, and Ollama was "timed out" for ever, nothing saying why. The broker's
    own listen likewise. Another address on the same port is fine (the broker on the LAN's, the service
    on loopback's)."""
    raw = base_raw(ollama="http://127.0.0.1:11434", mvoice="http://localhost:8770")
    raw["listen"] = "0.0.0.0:8770"
    raw["consumers"]["ollama"]["listen"] = "127.0.0.1:11434"
    assert problems_of(raw) == [
        "consumers.mvoice.url: is listen's own address (0.0.0.0:8770): its requests would come back to the"
        " broker",
        "consumers.ollama.url: is consumers.ollama.listen's own address (127.0.0.1:11434): its requests would"
        " come back to the broker",
    ]
    raw["listen"] = "127.0.0.1:8771"
    for listen in ("0.0.0.0:11434", "localhost:11434"):
        raw["consumers"]["ollama"]["listen"] = listen
        assert len(problems_of(raw)) == 1, listen
    raw["consumers"]["ollama"]["listen"] = "[::1]:11434"  # IPv6 loopback: not where 127.0.0.1 leads
    assert m.parse_config(raw).consumers["ollama"].listen == ("::1", 11434)
    raw["consumers"]["ollama"]["listen"] = "192.168.1.5:11434"  # beside Ollama's own 127.0.0.1:11434
    raw["consumers"]["mvoice"]["url"] = "http://192.168.1.7:8771"  # another machine's broker
    assert m.parse_config(raw).consumers["ollama"].listen == ("192.168.1.5", 11434)


def test_a_consumers_port_on_a_host_name_is_where_that_name_leads_for_the_loop_check():
    """A consumer's ``listen`` may name its host: ``localhost`` is loopback in either family whatever the
    resolver says (RFC 6761; here it gives 127.0.0.1 alone), and another name (the machine's own) is
    resolved, so a URL of the address it resolves to, or of the name itself, comes back to the broker and
    is refused. (Found by a mutation audit: the broker's loop check against a consumer's port was tested
    with addresses alone; resolving localhost instead, or leaving a listen's name unresolved, failed no
    test.)"""
    raw = base_raw()
    raw["listen"] = "127.0.0.1:8771"
    raw["consumers"]["ollama"]["listen"] = "localhost:11434"
    loop = "is consumers.ollama.listen's own address ({}:11434): its requests would come back to the broker"
    for url in ("http://127.0.0.1:11434", "http://[::1]:11434"):
        raw["consumers"]["ollama"]["url"] = url
        assert problems_of(raw) == ["consumers.ollama.url: " + loop.format("localhost")], url
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError:
        pytest.skip(f"{name} does not resolve here")
    address = ipaddress.ip_address(infos[0][4][0].partition("%")[0])
    raw["consumers"]["ollama"]["listen"] = f"{name}:11434"
    shown = f"[{address}]" if address.version == 6 else str(address)
    for url in (f"http://{shown}:11434", f"http://{name}:11434"):
        raw["consumers"]["ollama"]["url"] = url
        assert problems_of(raw) == ["consumers.ollama.url: " + loop.format(name)], url
    raw["consumers"]["ollama"]["url"] = "http://127.0.0.1:11435"  # another port: no loop
    assert m.parse_config(raw).consumers["ollama"].listen == (name, 11434)


#: Issue 19, items 3 and 6: spellings of the broker's own listener (0.0.0.0:8770) the loader let through,
#: and URLs aiohttp then refused for ever (bad_consumer_url); each refused in one line naming the key.
LISTENER_SPELLINGS = [
    "http://[::ffff:127.0.0.1]:8770",
    "http://[::FFFF:7f00:1]:8770/x",
    "http://[0:0:0:0:0:ffff:127.0.0.1]:08770",
    "http://0.0.0.0:8770",
    "http://[::]:8770",
    "http://[::1]:8770",
    "http://127.0.0.2:8770",
    "http://localhost.:8770",
    "http://LocalHost:8770",
    "http://gpu.localhost:8770",
    "https://127.0.0.1:8770",
]
UNUSABLE_URLS = [
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://[::1]x:8188", "Invalid IPv6 URL"),
    ("http://[v1.x]:8188", "IPv6 address between '[' and ']'"),
    ("http://[fe80::1%25eth0]:8188", "IPv6 zone"),
    ("http://a..b:8188", "is no host name"),
    ("http://exa mple:8188", "is no host name"),
    ("http://127.1:8770", "four decimal numbers"),
    ("http://0:8770", "four decimal numbers"),
    ("http://2130706433:8770", "four decimal numbers"),
    ("http://0x7f.1:8770", "four decimal numbers"),
    ("http://0177.0.0.1:8188", "four decimal numbers"),
    ("http://127.0.0.1.:8188", "four decimal numbers"),
    ("http://127.0.0.1:0", "port 0"),
]


@pytest.mark.parametrize("url", LISTENER_SPELLINGS)
def test_every_spelling_of_the_brokers_own_listener_is_refused(url):
    raw = base_raw(mvoice=url)
    raw["listen"] = "0.0.0.0:8770"
    assert problems_of(raw) == [
        "consumers.mvoice.url: is listen's own address (0.0.0.0:8770): its requests would come back to the"
        " broker"
    ]
    raw["listen"] = "0.0.0.0:8771"  # the same spellings on another port are another service
    assert m.parse_config(raw).consumers["mvoice"].url == url.rstrip("/")


@pytest.mark.parametrize(("url", "expected"), UNUSABLE_URLS)
def test_every_url_the_http_client_cannot_use_is_refused_in_one_line(url, expected):
    problems = problems_of(base_raw(mvoice=url))
    assert len(problems) == 1 and problems[0].startswith("consumers.mvoice.url: "), problems
    assert expected in problems[0], problems


def _lan_address() -> str | None:
    """This machine's address on its default route (a UDP socket's source address: nothing is sent), or
    None where it has none but loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    ip = ipaddress.ip_address(address)
    return None if ip.is_loopback or ip.is_unspecified else address


def test_the_machines_own_addresses_and_names_are_the_broker_on_a_listeners_port():
    """Issue 19, item 3: a listener on every address is reached through each of the machine's addresses,
    and through any name that resolves to one of them (the machine's own name, here)."""
    lan = _lan_address()
    if lan is None:
        pytest.skip("no address but loopback")
    raw = base_raw(mvoice=f"http://{lan}:8770")
    raw["listen"] = "0.0.0.0:8770"
    assert problems_of(raw) == [
        "consumers.mvoice.url: is listen's own address (0.0.0.0:8770): its requests would come back to the"
        " broker"
    ]
    raw["listen"] = "127.0.0.1:8770"  # only loopback listens there: the LAN address is another service
    assert m.parse_config(raw).consumers["mvoice"].url == f"http://{lan}:8770"
    name = socket.gethostname()
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        pytest.skip(f"{name} does not resolve here")
    raw["listen"] = "0.0.0.0:8770"
    raw["consumers"]["mvoice"]["url"] = f"http://{name}:8770"
    [problem] = problems_of(raw)
    assert problem.startswith(f"consumers.mvoice.url: is listen's own address (0.0.0.0:8770; {name} is ")
    assert problem.split(f"{name} is ")[1].split(")")[0] in resolved, problem


def test_names_are_resolved_only_on_a_listeners_port_and_a_hung_resolver_delays_nothing(monkeypatch):
    """A dead resolver must not hang --check, start-up or a reload (which has 20 s in all): names are looked
    up in daemon threads for RESOLVE_TIMEOUT_S in all, and a name not resolved in time is not checked."""
    asked: list[str] = []
    stuck = threading.Event()

    def hanging(host: Any, *args: Any, **kw: Any) -> Any:
        asked.append(host)
        stuck.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "timed out")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    monkeypatch.setattr(m, "RESOLVE_TIMEOUT_S", 0.2)
    raw = base_raw(mvoice="http://mvoice.lan:8770", comfyui="http://comfy.lan:8188")
    raw["listen"] = "0.0.0.0:8770"
    done = threading.Event()
    result: list[Any] = []
    worker = threading.Thread(target=lambda: (result.append(m.parse_config(raw)), done.set()), daemon=True)
    worker.start()
    try:
        assert done.wait(10), "the loader waited for the resolver"
        assert result[0].consumers["mvoice"].url == "http://mvoice.lan:8770"
        assert asked == ["mvoice.lan"]  # comfy.lan is on no listener's port: never looked up
        assert all(t.daemon for t in threading.enumerate() if t.name == "resolve")
    finally:
        stuck.set()


def _machine_spelling() -> Any:
    """Spellings of this machine's loopback and wildcard addresses that the HTTP client connects to."""
    octet = st.integers(0, 255)
    loopback4 = st.builds(lambda b, c, d: f"127.{b}.{c}.{d}", octet, octet, octet)

    def mapped(v4: str, style: int, upper: bool) -> str:
        a = ipaddress.IPv4Address(v4)
        hex_tail = f"{int(a) >> 16:x}:{int(a) & 0xFFFF:x}"
        text = [f"::ffff:{v4}", f"::ffff:{hex_tail}", f"0:0:0:0:0:ffff:{hex_tail}", f"0::ffff:{v4}"][style]
        return f"[{text.upper() if upper else text}]"

    def local(sub: str, upper: bool, dot: bool) -> str:
        name = (f"{sub}." if sub else "") + "localhost"
        return (name.upper() if upper else name) + ("." if dot else "")

    return st.one_of(
        loopback4,
        st.builds(mapped, loopback4, st.integers(0, 3), st.booleans()),
        st.sampled_from(["0.0.0.0", "[::]", "[::1]", "[0::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:0.0.0.0]"]),
        st.builds(local, st.sampled_from(["", "gpu", "a.b"]), st.booleans(), st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(
    host=_machine_spelling(),
    zeros=st.integers(0, 3),
    scheme=st.sampled_from(["http", "https", "HTTP"]),
    path=st.sampled_from(["", "/", "/c/f2", "/api/"]),
    on=st.sampled_from(["listen", "consumer"]),
)
def test_any_spelling_of_this_machine_on_a_wildcard_listeners_port_is_refused(host, zeros, scheme, path, on):
    raw = base_raw(mvoice=f"{scheme}://{host}:{'0' * zeros}8770{path}")
    raw["listen"] = "0.0.0.0:8770" if on == "listen" else "127.0.0.1:8771"
    if on == "consumer":
        raw["consumers"]["ollama"]["listen"] = "[::]:8770"
    key = "listen" if on == "listen" else "consumers.ollama.listen"
    assert problems_of(raw) == [
        f"consumers.mvoice.url: is {key}'s own address ({'0.0.0.0' if on == 'listen' else '::'}:8770): its"
        " requests would come back to the broker"
    ]


@settings(max_examples=500, deadline=None)
@given(
    host=st.one_of(
        st.text(alphabet="0123456789abcdefx.:[]%-_ Aé", max_size=12),
        st.from_regex(r"\A[0-9.x]{1,16}\Z"),
        st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
    ),
    port=st.one_of(st.none(), st.integers(0, 70000).map(str), st.text(alphabet="0123456789+- x", max_size=6)),
)
def test_any_url_the_loader_accepts_is_one_the_http_client_can_use(host, port):
    """Whatever a URL's host and port, the loader answers with ConfigError or a config, never a crash; and
    a URL it accepts is one aiohttp can connect to: a canonical address or a name IDNA can encode, a port."""
    url = f"http://{host}" + (f":{port}" if port is not None else "") + "/x"
    raw = base_raw(mvoice=url)
    try:
        config = m.parse_config(raw)
    except m.ConfigError as e:
        assert all(p.startswith("consumers.mvoice.url: ") for p in e.problems), e.problems
        return
    parsed = URL(config.consumers["mvoice"].url)
    host_seen = parsed.raw_host
    assert host_seen and parsed.port not in (None, 0)
    if aiohttp.helpers.is_ip_address(host_seen):
        assert ":" in host_seen or str(ipaddress.ip_address(host_seen)) == host_seen, url  # (canonical)
    else:
        host_seen.encode("idna")  # what the resolver is handed


async def test_the_ollama_client_given_only_a_host_goes_through_ollamas_port(rig, caplog):
    import ollama  # noqa: PLC0415 (a dev dependency, needed here only)

    r = await rig(tweak=with_ports, sims={"ollama": {"lines": 3}})
    address = r.broker.ports.address("ollama")
    consumers = (await r.status())["consumers"]
    assert consumers["ollama"]["listen"] == address and consumers["ollama"]["preset"] == "ollama"
    assert consumers["mvoice"]["listen"] is None and address.startswith("127.0.0.1:")
    client = ollama.AsyncClient(host=address)  # a host, as OLLAMA_HOST=mrock:11435 gives one
    try:
        answer = await client.generate(model="sim", prompt="hi", stream=False)
        assert answer.response == "tok0 tok1 tok2 " and answer.done
        parts = [
            p
            async for p in await client.chat(
                model="sim", messages=[{"role": "user", "content": "x"}], stream=True
            )
        ]
        assert "".join(p.message.content for p in parts) == "tok0 tok1 tok2 " and parts[-1].done
        assert [p.model for p in (await client.ps()).models] == ["sim"]
        assert (await client.show("sim")).details.family == "sim"  # unscheduled
    finally:
        await client._client.aclose()
    sim = r.sims["ollama"]
    assert [(rec.method, rec.path) for rec in sim.records] == [
        ("GET", "/api/ps"),  # the broker's first health round: its residency
        ("POST", "/api/generate"),
        # /api/generate is also Ollama's for_each unload route (keep_alive 0): its record is in doubt after
        # it, so the next job asks its residency (the listing) before it trusts the record (issues 18, 19).
        ("GET", "/api/ps"),
        ("POST", "/api/chat"),
        ("GET", "/api/ps"),
        ("POST", "/api/show"),
    ]
    assert sim.records[1].headers["X-Forwarded-For"] == "127.0.0.1"
    assert r.stats.jobs == 2 and r.stats.completed == 2  # GPU jobs, as through /c/ollama/
    await until(lambda: len(job_lines(caplog)) == 2)
    assert [re.search(r" kind=(\w+)", line).group(1) for line in job_lines(caplog)] == ["llm", "chat"]


async def test_a_consumer_port_serves_its_api_at_the_root_by_the_rules_of_its_mount(rig):
    r = await rig(tweak=with_ports, sims={"comfyui": {"work_s": 0.3}})
    sim = r.sims["comfyui"]
    # A client that builds absolute paths (comfy-api-simplified: urljoin(base, "/prompt")).
    async with r.session.post(urljoin(port_url(r, "comfyui", "/"), "/prompt"), json={"prompt": {}}) as resp:
        assert resp.status == 200
        prompt_id = (await resp.json())["prompt_id"]
    assert r.broker.scheduler.holds == 1  # the image path's hold, as through /v1/image
    async with r.session.get(port_url(r, "comfyui", "/queue")) as resp:  # reads are not held up
        assert resp.status == 200 and (await resp.json())["queue_running"][0][1] == prompt_id
    ws = await r.session.ws_connect(port_url(r, "comfyui", "/ws?clientId=c%201"))
    assert (await ws.receive_json(timeout=10))["data"]["sid"] == "c 1"
    await until(lambda: r.broker.scheduler.holder is None)
    assert f"/history/{prompt_id}" in [rec.path for rec in sim.records]
    await ws.close()
    # Through the mount the same client leaves it: its absolute path is the broker's own.
    async with r.session.post(urljoin(r.url("/c/comfyui/"), "/prompt"), json={"prompt": {}}) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "not_found")
    async with r.session.post(port_url(r, "comfyui", "/free"), json={"unload_models": True}) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")
        assert "POST /free is comfyui's unload route" in data["message"]
    port = int(r.broker.ports.address("comfyui").rsplit(":", 1)[1])
    status, body = await raw_get(r, "/a/%2e%2e/system_stats", port)
    error_of(status, {}, body, "bad_request")
    async with r.session.get(port_url(r, "comfyui", "/v1/status")) as resp:
        assert resp.status == 404  # ComfyUI's answer: the broker's own routes are not on the port
    assert r.stats.jobs == 1


async def test_redirects_and_cookies_of_a_consumers_own_web_app_work_through_its_port(rig):
    """A web app that redirects to absolute paths and sets cookies for Path=/ stays whole on its port: the
    browser follows the redirect to the same port and sends the cookie back."""

    async def login(request: web.Request) -> web.Response:
        resp = web.Response(status=302, headers={"Location": "/home"})
        resp.set_cookie("session", "s3cret", path="/")
        return resp

    async def home(request: web.Request) -> web.Response:
        return web.json_response({"session": request.cookies.get("session")})

    routes = [("GET", "/login", login), ("GET", "/home", home), ("GET", "/health", _ok)]
    async with StandIn(routes) as app:

        def whisper_port(raw: dict[str, Any]) -> None:
            raw["consumers"]["whisper"]["listen"] = "127.0.0.1:0"

        r = await rig(urls={"whisper": app.url}, tweak=whisper_port)
        async with (
            aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser,
            browser.get(port_url(r, "whisper", "/login")) as resp,
        ):
            assert resp.status == 200 and await resp.json() == {"session": "s3cret"}
            assert [str(h.url) for h in resp.history] == [port_url(r, "whisper", "/login")]
            assert str(resp.url) == port_url(r, "whisper", "/home")


async def test_with_a_token_a_consumers_port_needs_it_everywhere_and_strips_it(rig):
    def ports_and_token(raw: dict[str, Any]) -> None:
        with_ports(raw)
        with_token(raw)

    r = await rig(tweak=ports_and_token)
    for path in ("/", "/system_stats", "/healthz"):  # the broker's public paths are the consumer's here
        async with r.session.get(port_url(r, "comfyui", path)) as resp:
            error_of(resp.status, dict(resp.headers), await resp.read(), "unauthorized")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with r.session.get(port_url(r, "comfyui", "/queue"), headers=auth) as resp:
        assert resp.status == 200 and "X-Request-ID" in resp.headers
    (record,) = r.sims["comfyui"].records
    assert record.path == "/queue" and "Authorization" not in record.headers


async def test_a_reload_opens_moves_and_closes_consumer_ports(rig, caplog):
    r = await rig(tweak=use_presets)
    assert r.broker.ports.address("ollama") is None

    async def reload(listen: str | None) -> list[str]:
        raw = copy.deepcopy(r.raw)
        if listen is not None:
            raw["consumers"]["ollama"]["listen"] = listen
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert resp.status == 200
            return (await resp.json())["changes"]

    async def answers(address: str) -> bool:
        try:
            async with r.session.get(f"http://{address}/api/tags") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    first = f"127.0.0.1:{free_port()}"
    assert await reload(first) == ["changed ollama", f"ollama listens on {first}"]
    assert await answers(first)
    second = f"127.0.0.1:{free_port()}"
    assert await reload(second) == [
        "changed ollama",
        f"ollama no longer listens on {first}",
        f"ollama listens on {second}",
    ]
    assert await answers(second) and not await answers(first)
    assert await reload(None) == ["changed ollama", f"ollama no longer listens on {second}"]
    assert not await answers(second) and r.broker.ports.open == {}
    # A port that cannot be had is reported and logged; the rest of the reload stands.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        changes = await reload(busy)
    assert changes[0] == "changed ollama" and changes[1].startswith(f"cannot listen on {busy} for ollama: ")
    assert r.broker.config.consumers["ollama"].listen is not None and 'msg="cannot listen"' in caplog.text


async def test_a_reload_that_closes_a_port_closes_its_websockets_going_away_on_both_sides(rig):
    """A WebSocket never finishes: a port closed by a reload waited out its grace, then cut the relay off in
    the middle of its closing, so the client saw 1006 (no close frame) and the consumer's side was never
    closed (one connection leaked per reload). It is closed at once with 1001, both sides."""
    r = await rig(tweak=with_ports)
    ws = await r.session.ws_connect(port_url(r, "comfyui", "/ws?clientId=a"))
    assert (await ws.receive_json(timeout=10))["data"]["sid"] == "a"
    (upstream,) = r.sims["comfyui"].sockets
    assert r.broker.websockets == {"comfyui": 1}
    raw = copy.deepcopy(r.raw)
    del raw["consumers"]["comfyui"]["listen"]
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    async with r.session.post(r.url("/v1/reload")) as resp:
        assert resp.status == 200 and "comfyui no longer listens on " in (await resp.json())["changes"][1]
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY
    await ws.close()
    await until(lambda: upstream.closed)
    assert upstream.close_code == aiohttp.WSCloseCode.GOING_AWAY and r.broker.websockets == {"comfyui": 0}


async def test_a_port_that_cannot_be_had_at_start_up_stops_the_broker(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        raw = base_raw()
        raw["consumers"]["comfyui"]["listen"] = f"127.0.0.1:{busy}"
        server = TestServer(m.create_app(m.parse_config(raw)), host="127.0.0.1", port=0)
        with pytest.raises(m.ListenError, match=f"cannot listen on 127.0.0.1:{busy} for comfyui"):
            await server.start_server()
        await server.close()
        # The daemon says so and exits 1, as when its own port is taken.
        config = tmp_path / "taken.yaml"
        config.write_text(yaml.safe_dump(raw | {"listen": f"127.0.0.1:{free_port()}"}))
        done = await asyncio.create_subprocess_exec(
            PY, str(HERE / "mgpumanager.py"), "--config", str(config), stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 1
    assert f'msg="cannot listen" error="cannot listen on 127.0.0.1:{busy} for comfyui:' in err.decode()


async def test_a_page_of_the_brokers_origin_passes_comfyuis_origin_check_and_others_do_not(rig):
    r = await rig(tweak=with_ports, sims={"comfyui": {"work_s": 0.05}})
    sim = r.sims["comfyui"]
    comfy_origin = r.config.consumers["comfyui"].url
    for base in (r.url("/c/comfyui/"), port_url(r, "comfyui", "/")):
        own = f"http://{URL(base).host}:{URL(base).port}"  # what a browser that loaded `base` sends
        for origin, allowed in ((own, True), ("http://evil.example", False), ("http://127.0.0.1:1", False)):
            sim.records.clear()
            headers = {"Origin": origin}
            async with r.session.get(base, headers=headers) as resp:
                assert resp.status == (200 if allowed else 403)
            async with r.session.get(base + "assets/app.js", headers=headers) as resp:
                assert resp.status == (200 if allowed else 403)
            async with r.session.post(base + "api/prompt", json={"prompt": {}}, headers=headers) as resp:
                assert resp.status == (200 if allowed else 403)
            if allowed:
                ws = await r.session.ws_connect(base + "ws?clientId=x", headers=headers)
                assert (await ws.receive_json(timeout=10))["type"] == "status"
                await ws.close()
            else:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await r.session.ws_connect(base + "ws?clientId=x", headers=headers)
                assert refused.value.status == 502  # consumer_unreachable: "refused the upgrade: HTTP 403"
            seen = {
                rec.headers.get("Origin") for rec in sim.records if "history" not in rec.path
            }  # no holds'
            assert seen == ({comfy_origin} if allowed else {origin})  # others' Origin passes unchanged
            await until(lambda: r.broker.scheduler.holder is None)
    assert len(sim.refused_origins) == 2 * 2 * 4 and r.broker.consumers.states["comfyui"].healthy


async def test_a_rebound_name_keeps_its_origin_and_meets_comfyuis_check_through_mount_and_port(rig):
    """Issue 19, item 4: a DNS-rebinding page (evil.example made to point at the broker) sends an Origin
    equal to its Host, and the broker presented it to ComfyUI with ComfyUI's own origin: the prompt ran.
    Now the Origin is rewritten only for a Host of the broker's own (loopback, the address the client
    connected to, a listen address, the machine's names, http.hosts); any other passes unchanged."""

    def tweak(raw: dict[str, Any]) -> None:
        with_ports(raw)
        raw["consumers"]["comfyui"]["listen"] = "0.0.0.0:0"  # reachable on the LAN address too
        raw["http"] = {"hosts": ["mybox.lan"]}

    r = await rig(tweak=tweak, sims={"comfyui": {"work_s": 0.05}})
    sim = r.sims["comfyui"]
    comfy_origin = r.config.consumers["comfyui"].url
    port = int(r.broker.ports.address("comfyui").rpartition(":")[2])
    hosts = [
        ("evil.example", False),
        ("mybox.lan.evil.example", False),
        ("198.51.100.7", False),  # an address, but none of the broker's
        ("mybox.lan", True),
        ("MyBox.LAN.", True),
        ("localhost", True),
        ("[::1]", True),
        (socket.gethostname(), True),
    ]
    for base in (r.url("/c/comfyui/"), f"http://127.0.0.1:{port}/"):
        for name, own in hosts:
            host = f"{name}:{URL(base).port}"
            headers = {"Host": host, "Origin": f"http://{host}"}
            sim.records.clear()
            renders = len(sim.work)
            async with r.session.post(base + "api/prompt", json={"prompt": {}}, headers=headers) as resp:
                assert resp.status == (200 if own else 403), (base, name, await resp.read())
            seen = {rec.headers.get("Origin") for rec in sim.records if "history" not in rec.path}
            assert seen == {comfy_origin if own else f"http://{host}"}, (base, name, seen)
            assert len(sim.work) == renders + own  # a rebound page's prompt never runs
            if not own:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await r.session.ws_connect(base + "ws?clientId=x", headers=headers)
                assert refused.value.status == 502  # ComfyUI refused the upgrade: 403
            await until(lambda: r.broker.scheduler.holder is None)
    # The address the client connected to is the broker's own: a page loaded from the LAN address works.
    lan = _lan_address()
    if lan is not None:
        base = f"http://{lan}:{port}/"
        async with r.session.post(
            base + "api/prompt", json={"prompt": {}}, headers={"Origin": base[:-1]}
        ) as resp:
            assert resp.status == 200
        assert sim.records[-1].headers["Origin"] == comfy_origin
        await until(lambda: r.broker.scheduler.holder is None)
    # An Origin that is no URL at all is a foreign one, not a crash (it was a 500 and an internal error).
    async with r.session.get(r.url("/c/mvoice/api/admin/secret"), headers={"Origin": "http://["}) as resp:
        assert resp.status == 200
    assert r.sims["mvoice"].records[-1].headers["Origin"] == "http://["
    assert r.broker.internal_errors() == 0


def test_http_hosts_are_names_or_addresses_without_scheme_or_port():
    raw = base_raw()
    raw["http"] = {"hosts": ["MyBox.Lan.", "[::1]", "192.168.1.5", "::ffff:10.0.0.1"]}
    assert m.parse_config(raw).http.hosts == ("mybox.lan", "::1", "192.168.1.5", "10.0.0.1")
    raw["http"] = {"hosts": ["mybox.lan:8770", "http://mybox.lan", "my box", "ok.lan"]}
    assert problems_of(raw) == [
        f"http.hosts[{i}]: must be a host name or address, without scheme or port, not {h!r}"
        for i, h in enumerate(raw["http"]["hosts"][:3])
    ]


async def test_comfyuis_web_ui_through_its_mount_and_its_port_in_a_real_browser(rig, tmp_path):
    r = await rig(tweak=with_ports, sims={"comfyui": {"work_s": 0.2}})
    sim = r.sims["comfyui"]
    async with Browser(tmp_path) as browser:
        for page in (r.url("/c/comfyui/"), port_url(r, "comfyui", "/")):
            await browser.call("Page.navigate", url=page)
            state = await browser.wait_for(
                "window.comfysim && window.comfysim.prompt && window.comfysim.messages.includes('status')"
                " && JSON.stringify(window.comfysim)"
            )
            got = json.loads(state)
            assert got["prompt"] == 200 and got["ws"] == "open" and got["prompt_id"], got
            assert await browser.evaluate("document.getElementById('state').textContent") == "running"
            await until(lambda: r.broker.scheduler.holder is None)
    assert sim.refused_origins == []
    # Chromium sent an Origin with the module script, the prompt and the WebSocket; ComfyUI got its own.
    # Not the icon the browser asks the port for, nor the history the holds poll.
    asked = [
        (rec.path, rec.headers.get("Origin"))
        for rec in sim.records
        if rec.path != "/favicon.ico" and "history" not in rec.path
    ]
    comfy_origin = r.config.consumers["comfyui"].url
    expected = [
        ("/", None),
        ("/assets/app.js", comfy_origin),
        ("/ws", comfy_origin),
        ("/api/prompt", comfy_origin),
    ]
    assert sorted(asked, key=str) == sorted(expected * 2, key=str)
    assert r.stats.jobs == 2 and len(sim.work) == 2  # each prompt a GPU job (kind image_ui), held


async def test_the_daemon_opens_consumer_ports_at_start_and_on_sighup_and_closes_them_on_sigterm(rig):
    r = await rig(tweak=use_presets)
    raw, ollama, comfy = copy.deepcopy(r.raw), free_port(), free_port()
    raw["consumers"]["ollama"]["listen"] = f"127.0.0.1:{ollama}"
    generate = {"model": "a", "prompt": "p", "stream": False}
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
        async with r.session.post(f"http://127.0.0.1:{ollama}/api/generate", json=generate) as resp:
            assert resp.status == 200 and (await resp.json())["done"]
        assert (await daemon.status(r.session))["consumers"]["ollama"]["listen"] == f"127.0.0.1:{ollama}"
        raw["consumers"]["comfyui"]["listen"] = f"127.0.0.1:{comfy}"
        daemon.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        daemon.proc.send_signal(signal.SIGHUP)
        st = await daemon.until(r.session, lambda st: st["consumers"]["comfyui"]["listen"] is not None)
        assert st["consumers"]["comfyui"]["listen"] == f"127.0.0.1:{comfy}"
        async with r.session.get(f"http://127.0.0.1:{comfy}/queue") as resp:
            assert resp.status == 200
        daemon.terminate()
        assert await asyncio.wait_for(daemon.proc.wait(), 30) == 0
    for port in (ollama, comfy):
        with pytest.raises(aiohttp.ClientConnectionError):
            async with r.session.get(f"http://127.0.0.1:{port}/", timeout=aiohttp.ClientTimeout(total=5)):
                pass
    assert f"msg=listening consumer=ollama listen=127.0.0.1:{ollama}" in daemon.log
    assert f"msg=listening consumer=comfyui listen=127.0.0.1:{comfy}" in daemon.log
    assert r.sims["ollama"].work[0].path == "/api/generate"


# =====================================================================================================
# 9. Presets and the simulated services
# Each preset against mgpusim playing what the real servers do.
# =====================================================================================================


#: The kinds the presets use, as docs/configuration.md's "Presets" section documents them.
PRESET_KINDS = {"llm", "chat", "embed", "image", "img2img", "image_ui", "stt", "tts"}


def preset_consumer(preset: str, **more: Any) -> dict[str, Any]:
    return {"preset": preset, "url": "http://127.0.0.1:9", "vram_resident_mib": 1000, **more}


def _preset_problems(consumer: dict[str, Any], **more: Any) -> list[str]:
    base = {"url": "http://127.0.0.1:1", "health": {"path": "/"}, "paths": {"llm": {"path": "/g"}}}
    return problems_of(
        {"listen": "0.0.0.0:8770", "consumers": {"x": base | {"vram_resident_mib": 1, **consumer}}, **more}
    )


def sim_url(r: Rig, name: str, path: str) -> str:
    """A path on the simulated consumer itself, not through the broker."""
    return str(r.sim_servers[name].make_url(path))


async def _comfy_messages_until_echo(ws: aiohttp.ClientWebSocketResponse, mark: str) -> list[dict[str, Any]]:
    """Every JSON message a ComfySim socket got before the echo of ``mark`` (sent now)."""
    await ws.send_str(mark)
    got = []
    while (msg := await ws.receive(timeout=10)).data != mark:
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        got.append(json.loads(msg.data))
    return got


def test_every_preset_fills_in_its_service_and_check_says_what():
    consumers = {name: preset_consumer(name) for name in m.PRESETS}
    consumers["whisper-cpp"] |= {"unload": {"command": ["true"]}, "load": {"command": ["true"]}}
    config = m.parse_config({"consumers": consumers})
    named = {"ollama", "comfyui", "whisper-cpp", "llama-cpp", "vllm", "sglang", "a1111", "speaches"}
    assert named | {"tabbyapi", "localai", "llama-cpp-router"} == set(m.PRESETS)
    for name, c in config.consumers.items():
        assert c.preset == name and c.paths and set(c.paths) <= PRESET_KINDS, name
        assert "health" in c.from_preset and all(f"paths.{kind}" in c.from_preset for kind in c.paths)
    ollama = config.consumers["ollama"]
    listing = m.JsonQuery("GET", "/api/ps", "models")
    assert ollama.unload == m.Route(
        "POST", "/api/generate", {"model": "{name}", "keep_alive": 0}, 60, listing
    )
    assert ollama.vram_managed and ollama.residency_query == listing
    assert list(ollama.paths) == ["llm", "chat", "embed"]
    vllm = config.consumers["vllm"]
    assert vllm.residency == m.JsonQuery("GET", "/is_sleeping", None, (("is_sleeping", (False,)),))
    assert (vllm.unload.path, vllm.load.path) == ("/sleep?level=1", "/wake_up")
    assert config.consumers["whisper-cpp"].from_preset == ("health", "paths.stt")
    comfy = config.consumers["comfyui"]
    assert comfy.paths["image_ui"].hold_until == m.Hold("GET", "/api/history/{prompt_id}", 0.5, 900)
    text = m.summary(config)
    expected = (
        "comfyui    preset comfyui: health GET /system_stats, paths image, image_ui, unload POST /free, "
    )
    assert expected + "17 unscheduled" in text
    assert (
        "preset ollama: health GET /, paths llm, chat, embed, unload POST /api/generate for each of " in text
    )
    assert (
        "preset vllm: health GET /health, paths chat, llm, embed, unload POST /sleep?level=1, load " in text
    )
    assert "residency GET /is_sleeping where is_sleeping=false" in text


def test_a_path_refused_on_a_consumers_port_is_named_as_the_ports_not_the_mounts():
    """A consumer's port serves its API at the root: its refusal spoke of a mount path below /c/<name>/,
    which the client never used (an attack noticed)."""
    with pytest.raises(m.BrokerError) as refused:
        m.mount_upstream_path("/c/raw/a/../b", "raw", port=True)
    assert refused.value.message.startswith("a path on raw's port must have no '.', '..'")
    with pytest.raises(m.BrokerError) as refused:
        m.mount_upstream_path("/c/raw/a/../b", "raw")
    assert refused.value.message.startswith("a mount path must stay below /c/raw/, and must have no")


def test_the_shipped_config_uses_the_presets_and_gives_two_consumers_a_port(tmp_path):
    done = subprocess.run(
        [PY, str(HERE / "mgpumanager.py"), "--check", "--config", str(HERE / "consumers.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert any(
        line.split()
        == [
            "comfyui",
            "preset",
            "comfyui:",
            "health",
            "GET",
            "/system_stats,",
            "paths",
            "image,",
            "image_ui,",
            "unload",
            "POST",
            "/free,",
            "17",
            "unscheduled",
        ]
        for line in lines
    ), done.stdout
    assert "  0.0.0.0:8189 -> comfyui (as /c/comfyui/)" in lines
    assert "  0.0.0.0:11435 -> ollama (as /c/ollama/)" in lines
    config = m.load_config(HERE / "consumers.yaml")
    assert [c.preset for c in config.consumers.values()] == [None, "comfyui", "ollama", "whisper-cpp"]


def test_keys_beside_a_preset_win_paths_kind_by_kind_and_null_removes():
    raw = preset_consumer(
        "comfyui",
        paths={"image": {"path": "/prompt"}, "image_ui": None, "video": {"path": "/video"}},
        unload={"path": "/free", "body": {"free_memory": True}},
        unscheduled=None,
        priority=3,
    )
    c = m.parse_config({"consumers": {"c": raw}}).consumers["c"]
    assert list(c.paths) == ["image", "video"] and c.paths["image"].hold_until is None  # replaced whole
    assert c.unload.body == {"free_memory": True} and c.unscheduled == () and c.priority == 3
    assert c.health == m.Route("GET", "/system_stats") and c.from_preset == ("health",)
    expected = (
        "preset comfyui: health GET /system_stats (yours: unload, unscheduled, paths.image, paths.image_ui)"
    )
    assert m.describe_preset(c) == expected
    assert "image_ui" in m.PRESETS["comfyui"]["paths"]  # the preset itself is untouched
    more = m.parse_config({"consumers": {"c": preset_consumer("ollama", paths={"code": {"path": "/x"}})}})
    assert list(more.consumers["c"].paths) == ["llm", "chat", "embed", "code"]


@pytest.mark.parametrize(
    ("consumer", "expected"),
    [
        ({"preset": "olama"}, "consumers.x.preset: unknown preset 'olama' (known: ollama, comfyui, "),
        ({"preset": ["ollama"]}, "consumers.x.preset: unknown preset"),
        (
            {"unload": {"path": "/u", "for_each": {"path": "/list"}}},
            "consumers.x.unload.for_each.items: missing",
        ),
        ({"unload": {"path": "/u", "for_each": "/list"}}, "consumers.x.unload.for_each: must be a mapping"),
        (
            {
                "unload": {"command": ["true"], "for_each": {"path": "/l", "items": "m"}},
                "load": {"command": ["t"]},
            },
            "consumers.x.unload.for_each: unknown key",
        ),
        (
            {"load": {"path": "/l", "for_each": {"path": "/l", "items": "m"}}},
            "consumers.x.load.for_each: unknown",
        ),
        (
            {"residency": {"path": "/state"}},
            "consumers.x.residency: needs items (the answer's list to read) or where",
        ),
        (
            {"residency": {"path": "/s", "where": {"on": {"a": 1}}}},
            "consumers.x.residency.where.on: must be a value",
        ),
        (
            {"residency": {"path": "/s", "where": {"on": []}}},
            "consumers.x.residency.where.on: must be a value",
        ),
        (
            {"residency": {"path": "/s", "where": {"a..b": 1}}},
            "consumers.x.residency.where.a..b: fields are names",
        ),
        ({"residency": {"path": "state", "items": "m"}}, "consumers.x.residency.path: must start with '/'"),
        (
            {"residency": {"path": "/s", "items": ""}},
            "consumers.x.residency.items: must be a non-empty string",
        ),
        ({"listen": "11435"}, "consumers.x.listen: must be HOST:PORT, not '11435'"),
        ({"listen": "127.0.0.1:8770"}, "consumers.x.listen: port 8770 is listen's already"),
    ],
)
def test_preset_for_each_residency_and_listen_rules_name_the_key(consumer, expected):
    problems = _preset_problems(consumer)
    assert any(expected in p for p in problems), problems


def test_placeholders_fill_paths_encoded_and_body_strings_keeping_a_whole_ones_type():
    route = m.Route(
        "POST", "/api/ps/{id}/{n}", {"model": "{id}", "count": "{n}", "say": "n={n}", "l": ["{id}", 2]}
    )
    path, body = m.fill_placeholders(route, {"id": "Systran/faster whisper", "n": 3, "other": True})
    assert path == "/api/ps/Systran%2Ffaster%20whisper/3"
    assert body == {
        "model": "Systran/faster whisper",
        "count": 3,
        "say": "n=3",
        "l": ["Systran/faster whisper", 2],
    }
    assert m.fill_placeholders(m.Route("DELETE", "/api/ps/{item}"), "a/b") == ("/api/ps/a%2Fb", None)
    with pytest.raises(KeyError) as missing:
        m.fill_placeholders(route, {"id": "x"})
    assert missing.value.args == ("n",)


def test_where_matches_dotted_fields_missing_ones_as_null_and_true_is_not_one():
    where = (("status.value", ("loaded", "loading")), ("sleeping", (False, None)))
    assert m.matches({"status": {"value": "loaded"}}, where)
    assert m.matches({"status": {"value": "loading"}, "sleeping": False}, where)
    assert not m.matches({"status": {"value": "loaded"}, "sleeping": 0}, where)
    assert not m.matches({"status": {"value": "unloaded"}}, where)
    assert not m.matches({"status": "loaded"}, where) and m.matches("anything", ())
    listing = m.JsonQuery("GET", "/models", "data", (("status.value", ("loaded",)),))
    answer = {
        "data": [{"id": "a", "status": {"value": "unloaded"}}, {"id": "b", "status": {"value": "loaded"}}]
    }
    assert m.query_elements(listing, answer) == [answer["data"][1]] and m.query_resident(listing, answer)
    assert not m.query_resident(listing, {"data": answer["data"][:1]})
    with pytest.raises(m.CallError, match="answered no list at 'data'"):
        m.query_resident(listing, {"data": {"a": 1}})
    asleep = m.JsonQuery("GET", "/is_sleeping", None, (("is_sleeping", (False,)),))
    assert m.query_resident(asleep, {"is_sleeping": False}) and not m.query_resident(
        asleep, {"is_sleeping": True}
    )
    with pytest.raises(m.CallError, match="answered no JSON object"):
        m.query_resident(asleep, [])


async def test_ollama_sim_lists_what_it_holds_like_ollama_and_keeps_it_for_keep_alive(rig):
    import ollama  # noqa: PLC0415 (a dev dependency, needed here only)

    r = await rig(sims={"ollama": {"vram_mib": 3000, "keep_alive_s": 2}})
    sim = r.sims["ollama"]
    client = ollama.AsyncClient(host=str(r.sim_servers["ollama"].make_url("")))
    try:
        await client.generate(model="a", prompt="hi", stream=False)  # kept for keep_alive_s (the default)
        await client.generate(model="b", prompt="hi", stream=False, keep_alive="1h")
        await client.generate(model="c", prompt="", keep_alive="1m")  # an empty prompt only loads it
        listed = (await client.ps()).models
        assert [p.model for p in listed] == ["b", "c", "a"]  # the longest left to live first, as ollama
        assert all(p.size_vram == 3000 * 2**20 and p.expires_at.tzinfo is not None for p in listed)
        assert r.gpu.used_mib("ollama") == 9000
        await until(lambda: "a" not in sim.models)  # its keep_alive ran out
        assert list(sim.models) == ["b", "c"] and r.gpu.used_mib("ollama") == 6000
        for model in ("b", "c"):
            gone = await client.generate(model=model, prompt="", keep_alive=0)  # what `ollama stop` sends
            assert gone.done_reason == "unload"
        assert sim.models == {} and r.gpu.used_mib("ollama") == 0
        assert (await client.ps()).models == []
    finally:
        await client._client.aclose()
    assert (sim.loads, sim.unloads) == (3, 3)


async def test_ollama_preset_unloads_every_listed_model_and_reads_residency_from_its_list(rig):
    r = await rig(tweak=use_presets, sims={"ollama": {"vram_mib": 3000, "keep_alive_s": 300}})
    sim, state = r.sims["ollama"], r.broker.consumers.states["ollama"]
    await r.broker.consumers.probe("ollama")
    assert state.healthy is True and state.resident is False  # /api/ps lists nothing
    for model in ("a", "b"):
        assert (await r.post("llm", {"model": model, "prompt": "p", "stream": False}))[0] == 200
    assert list(sim.models) == ["a", "b"] and r.gpu.used_mib("ollama") == 6000  # kept after the answer
    state.unload_failed()  # unknown: only the probe can tell
    await r.broker.consumers.probe("ollama")
    assert state.resident is True
    async with r.session.post(r.url("/v1/consumers/ollama/unload")) as resp:
        assert resp.status == 200 and (await resp.json())["loaded"] is False
    unloads = [json.loads(rec.body) for rec in sim.records if rec.path == "/api/generate"][2:]
    assert sorted(unloads, key=str) == [{"model": "a", "keep_alive": 0}, {"model": "b", "keep_alive": 0}]
    assert sim.models == {} and r.gpu.used_mib("ollama") == 0
    # Its own /api/generate is no unload route to refuse through the mount: only the body makes it one.
    async with r.session.post(
        r.url("/c/ollama/api/generate"), json={"model": "a", "prompt": "p", "stream": False}
    ) as resp:
        assert resp.status == 200
    await r.broker.consumers.probe("ollama")
    assert state.resident is True and list(sim.models) == ["a"]


async def test_a_for_each_unload_tries_every_element_and_names_each_failure(rig, caplog):
    calls = []

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"loaded": [{"id": "ok"}, {"id": "bad"}, {"name": "no id"}, {"id": 7}]})

    async def unload(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append((request.path, body))
        return (
            web.json_response({"error": "nope"}, status=500)
            if body["model"] == "bad"
            else web.json_response({})
        )

    async with StandIn(
        [("GET", "/state", listing), ("POST", "/unload/{id}", unload), ("GET", "/", _ok)]
    ) as svc:

        def add(raw: dict[str, Any]) -> None:
            unload = {"path": "/unload/{id}", "body": {"model": "{id}", "n": ["{id}", 1]}, "timeout_s": 5}
            raw["consumers"]["svc"] = {
                "url": svc.url,
                "health": {"path": "/"},
                "paths": {"llm": {"path": "/x"}},
                "vram_resident_mib": 100,
                "unload": unload | {"for_each": {"path": "/state", "items": "loaded"}},
            }

        r = await rig(tweak=add)
        async with r.session.post(r.url("/v1/consumers/svc/unload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "unload_failed")
    message = data["message"]
    assert message.startswith("svc unload of 2 of 4: ") and '{"id": "bad"}: unload answered 500' in message
    assert """{"name": "no id"} has no field 'id'""" in message
    assert calls == [
        ("/unload/ok", {"model": "ok", "n": ["ok", 1]}),
        ("/unload/bad", {"model": "bad", "n": ["bad", 1]}),
        ("/unload/7", {"model": 7, "n": [7, 1]}),
    ]
    assert r.broker.consumers.states["svc"].resident is None and r.stats.unload_failures == 1
    assert 'msg="unload each" consumer=svc listed=4 failed=2' in caplog.text


@pytest.mark.parametrize("service", sorted(mgpusim.SERVICES))
async def test_each_preset_speaks_its_simulated_service(rig, service):
    """Every route a preset names is one its service (as mgpusim plays it) answers: each path as a job
    through the mount, its residency query, its unload, and its load before the next job."""
    multi = service in mgpusim.MULTI_MODEL
    factory = functools.partial(
        mgpusim.ServiceSim, service=service, vram_mib=1000, loaded=not multi, models=("m0",) if multi else ()
    )
    r = await rig(extra={"svc": (factory, {"preset": service, "vram_resident_mib": 1000})})
    sim, consumers, c = r.sims["svc"], r.broker.consumers, r.config.consumers["svc"]
    state = consumers.states["svc"]

    async def residency() -> bool | None:
        state.unload_failed()  # unknown: only the probe can tell
        await consumers.probe("svc")
        assert state.healthy is True
        return state.resident

    query = c.residency_query
    assert await residency() is (None if query is None else not multi)
    for path in c.paths.values():
        async with r.session.post(r.url("/c/svc" + path.path), json={"model": "org/m1"}) as resp:
            assert resp.status == 200, await resp.text()
    assert [rec.path for rec in sim.work] == [p.path for p in c.paths.values()]
    assert r.gpu.used_mib("svc") == 1000 and (not multi or list(sim.models) == ["org/m1"])
    if query is not None:
        assert await residency() is True
    if c.unload is None:  # llama-cpp: one model, asleep after --sleep-idle-seconds, awake on a request
        await sim.do_unload()
        assert await residency() is False
        async with r.session.post(r.url("/c/svc/v1/chat/completions"), json={}) as resp:
            assert resp.status == 200
        assert await residency() is True
        return
    async with r.session.post(r.url("/v1/consumers/svc/unload")) as resp:
        assert resp.status == 200, await resp.text()
    assert not sim.loaded and sim.models == {} and r.gpu.used_mib("svc") == 0
    if query is not None:
        assert await residency() is False
        state.unloaded()  # as the unload left it
    first = next(iter(c.paths.values())).path
    async with r.session.post(r.url("/c/svc" + first), json={"model": "org/m1"}) as resp:
        if service in mgpusim.NO_WAKE and c.load is None:  # tabbyAPI's load needs a model name you write
            assert resp.status == 503
            return
        assert resp.status == 200, await resp.text()
    if c.load is not None:  # known unloaded: loaded through the preset's load route before the job
        assert [rec.path for rec in sim.records][-2:] == [c.load.path, first]
    assert sim.loaded and r.gpu.used_mib("svc") == 1000


async def test_comfyui_preset_holds_either_spelling_and_its_ui_can_free_through_api_free(rig):
    r = await rig(tweak=use_presets, sims={"comfyui": {"work_s": 0.3}})
    sim = r.sims["comfyui"]
    ids = []
    for path in ("/v1/image", "/c/comfyui/api/prompt"):
        async with r.session.post(r.url(path), json={"prompt": {}}) as resp:
            assert resp.status == 200
            ids.append((await resp.json())["prompt_id"])
        assert r.broker.scheduler.holds == 1  # the render goes on, and holds the GPU
        # The UI's cheap calls are not held up by it (unscheduled), under both spellings.
        async with r.session.post(r.url("/c/comfyui/api/interrupt"), json={}) as resp:
            assert resp.status == 200 and r.broker.scheduler.holds == 1
        await until(lambda: r.broker.scheduler.holder is None)
    polled = [rec.path for rec in sim.records if "history" in rec.path]
    assert {f"/history/{ids[0]}", f"/api/history/{ids[1]}"} == set(polled)
    assert sim.unloads == 0
    async with r.session.post(r.url("/c/comfyui/free"), json={"unload_models": True}) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")  # the broker's own route
    async with r.session.post(r.url("/c/comfyui/api/free"), json={"unload_models": True}) as resp:
        assert resp.status == 200  # the UI's "Unload Models" button: ComfyUI's alias of /free
    assert sim.unloads == 1 and r.gpu.used_mib("comfyui") == 0
    async with r.session.get(r.url("/c/comfyui/api/history")) as resp:
        assert set(await resp.json()) == set(ids)


async def test_a_for_each_unload_is_bounded_by_its_timeout_as_a_whole(rig):
    gate = asyncio.Event()

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"models": ["slow", "next"]})

    async def unload(request: web.Request) -> web.Response:
        await gate.wait()  # never set: the first call hangs
        return web.json_response({})

    async with StandIn([("GET", "/ps", listing), ("DELETE", "/ps/{id}", unload), ("GET", "/", _ok)]) as svc:

        def add(raw: dict[str, Any]) -> None:
            each = {"path": "/ps", "items": "models"}
            raw["consumers"]["svc"] = {
                "url": svc.url,
                "health": {"path": "/"},
                "paths": {"llm": {"path": "/x"}},
                "vram_resident_mib": 100,
                "unload": {"method": "DELETE", "path": "/ps/{item}", "timeout_s": 1, "for_each": each},
            }

        r = await rig(tweak=add)
        async with r.session.post(r.url("/v1/consumers/svc/unload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "unload_failed")
    assert '"slow": unload did not answer within ' in data["message"]
    assert '"next": not tried, the unload took its 1 s' in data["message"]


def _listing_svc(raw: dict[str, Any], url: str, unload: dict[str, Any]) -> None:
    """Consumer svc at ``url``, whose unload walks ``GET /ps``'s ``models``."""
    raw["consumers"]["svc"] = {
        "url": url,
        "health": {"path": "/health"},
        "paths": {"llm": {"path": "/x"}},
        "vram_resident_mib": 100,
        "unload": unload | {"for_each": {"path": "/ps", "items": "models"}},
    }


async def test_a_for_each_unload_of_a_huge_listing_names_its_first_failures_and_counts_the_rest(rig):
    """A consumer that lists 200,000 elements none of which can fill the route: the failure named every one,
    4.6 MB that went into the admin's answer, the log line and an event kept 15 minutes in the ring (and a
    reservation's not_unloaded, shown by every /v1/status)."""

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"models": [1] * 200_000})  # bare numbers: no field "name"

    async with StandIn([("GET", "/ps", listing), ("GET", "/health", _ok)]) as svc:
        unload = {"path": "/api/generate", "body": {"model": "{name}", "keep_alive": 0}}
        r = await rig(tweak=lambda raw: _listing_svc(raw, svc.url, unload))
        async with r.session.post(r.url("/v1/consumers/svc/unload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "unload_failed")
    message = data["message"]
    assert message.startswith("svc unload of 200000 of 200000: 1 has no field 'name'; ")
    assert message.count("has no field") == m.FOR_EACH_NAMED and message.endswith("; and 199995 more")
    (failed,) = [e for e in recent_events(r.broker.events) if e["event"] == "unload_failed"]
    assert failed["error"] == message.removeprefix("svc ") and len(message) < 500
    assert max(len(sent) for sent in r.broker.events.recent(900)) < 1000


async def test_a_for_each_unload_calls_no_route_but_its_own_whatever_the_listing_says(rig):
    """Placeholders are percent-encoded in the path, but '..', '.' and '' are no escape: the consumer listing
    '..' had the broker call DELETE /api/ instead of /api/ps/{item} (the client resolves dot segments). Such
    an element fails, named; '/', '?', '#' and CRLF stay inside the one segment."""
    seen: list[str] = []

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"models": ["a", "..", ".", "", "x/y", "q?x#y", "c\r\nd"]})

    async def anything(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.raw_path}")
        return web.json_response({})

    routes = [("GET", "/ps", listing), ("GET", "/health", _ok), ("*", r"/{tail:[\s\S]*}", anything)]
    async with StandIn(routes) as svc:
        unload = {"method": "DELETE", "path": "/api/ps/{item}"}
        r = await rig(tweak=lambda raw: _listing_svc(raw, svc.url, unload))
        async with r.session.post(r.url("/v1/consumers/svc/unload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "unload_failed")
    assert seen == [
        "DELETE /api/ps/a",
        "DELETE /api/ps/x%2Fy",
        "DELETE /api/ps/q%3Fx%23y",
        "DELETE /api/ps/c%0D%0Ad",
    ]
    message = data["message"]
    assert message.startswith("svc unload of 3 of 7: ")
    for value in ("..", ".", ""):
        assert f"{json.dumps(value)}: its 'item' {value!r} cannot fill a path" in message


async def test_the_whisper_cpp_preset_speaks_whispersim(rig, caplog):
    r = await rig(tweak=use_presets)
    assert r.broker.consumers.states["whisper"].healthy is True  # GET /health
    async with r.session.post(r.url("/c/whisper/inference"), data=b"RIFF....") as resp:
        assert resp.status == 200 and (await resp.json())["text"] == "simulated transcript"
    assert [rec.path for rec in r.sims["whisper"].work] == ["/inference"]
    await until(lambda: len(job_lines(caplog)) == 1)
    assert " consumer=whisper kind=stt " in job_lines(caplog)[0]


async def test_comfysim_free_wants_a_json_object_and_answers_an_empty_200_like_comfyui(rig):
    r = await rig(sims={"comfyui": {"loaded": True, "context_mib": 610}})
    sim = r.sims["comfyui"]
    for body in (b"", b"[]", b"null", b"unload_models"):
        async with r.session.post(sim_url(r, "comfyui", "/free"), data=body) as resp:
            assert resp.status == 500 and resp.content_type == "text/plain"
            assert await resp.text() == "500 Internal Server Error\n\nServer got itself in trouble"
    async with r.session.post(sim_url(r, "comfyui", "/api/free"), json={}) as resp:
        assert resp.status == 200 and await resp.read() == b"" and "Content-Type" not in resp.headers
    assert sim.unloads == 0 and r.gpu.used_mib("comfyui") == 13610  # {} asks for nothing
    # The broker's unload (the preset's body) empties it; ComfyUI's CUDA context stays.
    async with r.session.post(r.url("/v1/consumers/comfyui/unload")) as resp:
        assert resp.status == 200 and (await resp.json())["loaded"] is False
    assert sim.unloads == 1 and r.gpu.used_mib("comfyui") == 610


async def test_comfysim_plays_the_free_flag_race_of_comfyuis_worker(rig):
    """ComfyUI's /free sets each flag it names one after the other, and its idle prompt worker may read the
    first before the second is set (4 of 10 tries in front of the real one): free_memory then waits for
    the next prompt, and drops that prompt's model as soon as it is done. The sim always loses that race;
    one flag alone, or flags set during a render, never race."""
    r = await rig(sims={"comfyui": {"loaded": True, "work_s": 0.05}})
    sim = r.sims["comfyui"]
    url = sim_url(r, "comfyui", "/free")
    async with r.session.post(url, json={"unload_models": True, "free_memory": True}) as resp:
        assert resp.status == 200
    assert (sim.loaded, sim.unloads, sim.flags) == (False, 1, {"free_memory": True})  # one left pending
    await _render(r)
    assert (sim.loads, sim.loaded, sim.unloads, sim.flags) == (1, False, 2, {})  # its model dropped at once
    await _render(r)
    assert (sim.loads, sim.loaded, sim.unloads) == (2, True, 2)  # nothing pending any more: it stays
    async with r.session.post(url, json={"free_memory": True}) as resp:  # the preset's body
        assert resp.status == 200
    assert (sim.loaded, sim.unloads, sim.flags) == (False, 3, {})
    await _render(r)
    assert (sim.loads, sim.loaded, sim.unloads) == (3, True, 3)


@pytest.mark.parametrize(
    ("body", "kept"),
    [(None, True), ({"unload_models": True, "free_memory": True}, False)],
    ids=["the-preset", "both-flags"],
)
async def test_the_comfyui_preset_frees_with_one_flag_so_the_next_model_stays(rig, body, kept):
    """The comfyui preset's unload sent both of /free's flags (issue 18): whenever ComfyUI's worker woke
    between them, the model loaded by the next render was dropped as soon as that render ended, a wasted
    load of 13 GiB. It sends ``free_memory`` alone (which implies ``unload_models``, main.py's
    prompt_worker) and the model stays; both flags still race in the sim."""

    def setup(raw: dict[str, Any]) -> None:
        use_presets(raw)
        if body is not None:
            raw["consumers"]["comfyui"]["unload"] = {"path": "/free", "body": body}

    r = await rig(tweak=setup, sims={"comfyui": REAL_COMFY, "mvoice": {"loaded": False}})
    comfy = r.sims["comfyui"]
    await _render(r)
    assert (await r.post("tts", {"text": "hi"}))[0] == 200  # mvoice does not fit beside it: /free
    assert comfy.unloads == 1 and r.sims["mvoice"].loaded
    await _render(r)  # mvoice evicted, ComfyUI loads again
    assert comfy.loads == 2 and r.sims["mvoice"].unloads == 1
    assert (comfy.loaded, comfy.unloads) == ((True, 1) if kept else (False, 2))
    assert r.gpu.used_mib("comfyui") == (13610 if kept else 610)


async def test_comfysim_tells_a_render_only_to_the_socket_its_prompt_names_and_the_queue_to_all(rig):
    r = await rig(sims={"comfyui": {"work_s": 0.05}})
    sim = r.sims["comfyui"]
    ws = {c: await r.session.ws_connect(sim_url(r, "comfyui", f"/ws?clientId={c}")) for c in "ab"}
    for c in "ab":
        assert (await ws[c].receive_json(timeout=10))["data"]["sid"] == c
    for client_id in ("a", None):
        body = {"prompt": {}} | ({"client_id": client_id} if client_id else {})
        async with r.session.post(sim_url(r, "comfyui", "/prompt"), json=body) as resp:
            prompt_id = (await resp.json())["prompt_id"]
        # Its render has told everything (its record ends last).
        await until(lambda: sim.work[-1:] and sim.work[-1].end is not None)
        assert prompt_id in sim.finished
        got = {c: await _comfy_messages_until_echo(ws[c], f"mark {prompt_id}") for c in "ab"}
        for c in "ab":
            status = [m for m in got[c] if m["type"] == "status"]
            assert [m["data"]["status"]["exec_info"]["queue_remaining"] for m in status] == [1, 0]
        told = [(m["type"], m["data"].get("node", "-")) for m in got["a"] if m["type"] != "status"]
        if client_id is None:  # no client named: its render's messages go nowhere
            assert told == []
            continue
        assert told == [
            ("execution_start", "-"),
            ("execution_cached", "-"),
            ("executing", "1"),
            ("execution_success", "-"),
            ("executing", None),
        ]
        assert all(m["data"]["prompt_id"] == prompt_id for m in got["a"] if m["type"] != "status")
        assert [m["type"] for m in got["b"]] == ["status", "status"]  # the other client hears the queue
    for c in "ab":
        await ws[c].close()


async def test_comfysim_renders_one_prompt_at_a_time_with_comfyuis_queue_and_history_entries(rig):
    r = await rig(sims={"comfyui": {"work_s": 0.3}})
    sim = r.sims["comfyui"]
    workflow = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    ids = []
    for client_id in ("c1", "c2"):
        body = {"prompt": workflow, "client_id": client_id}
        async with r.session.post(sim_url(r, "comfyui", "/api/prompt"), json=body) as resp:
            ids.append((await resp.json())["prompt_id"])
    async with r.session.get(sim_url(r, "comfyui", "/queue")) as resp:
        queue = await resp.json()
    # [number, prompt_id, prompt, extra_data, outputs_to_execute]; the second waits for the first.
    (running,), (pending,) = queue["queue_running"], queue["queue_pending"]
    assert running[:3] == [0, ids[0], workflow] and running[4] == ["2"]
    assert running[3]["client_id"] == "c1" and isinstance(running[3]["create_time"], int)
    assert pending[:2] == [1, ids[1]] and pending[3]["client_id"] == "c2"
    await until(lambda: set(ids) <= sim.finished)
    assert sim.max_active == 1  # ComfyUI's one prompt worker
    async with r.session.get(sim_url(r, "comfyui", f"/history/{ids[0]}")) as resp:
        entry = (await resp.json())[ids[0]]
    assert set(entry) == {"prompt", "outputs", "status", "meta"} and entry["prompt"] == running
    assert entry["outputs"] == {
        "2": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}
    }
    assert entry["meta"]["2"]["node_id"] == "2"
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"] is True
    kinds = [kind for kind, _ in status["messages"]]
    assert kinds == ["execution_start", "execution_cached", "execution_success"]
    assert all(
        data["prompt_id"] == ids[0] and isinstance(data["timestamp"], int) for _, data in status["messages"]
    )
    async with r.session.get(sim_url(r, "comfyui", "/history")) as resp:
        assert list(await resp.json()) == ids


async def test_whispersim_answers_errors_through_whisper_servers_error_handler(rig):
    r = await rig(tweak=use_presets)
    sim = r.sims["whisper"]
    for method, path, status, text in (
        ("GET", "/nope", 404, "File Not Found (/nope)"),
        ("POST", "/health", 404, "File Not Found (/health)"),  # a method it does not take
        ("GET", "/inference", 404, "File Not Found (/inference)"),
    ):
        async with r.session.request(method, sim_url(r, "whisper", path)) as resp:
            assert (resp.status, resp.content_type, await resp.text()) == (status, "text/plain", text)
    sim.faults["status"] = 400
    async with r.session.post(sim_url(r, "whisper", "/inference"), data=b"x") as resp:
        assert (resp.status, await resp.text()) == (400, "Invalid request")
    # Its health route's 503 (during a model swap) reaches the broker as a 404.
    sim.faults["health_status"] = 503
    await r.broker.consumers.probe("whisper")
    state = r.broker.consumers.states["whisper"]
    assert state.healthy is False and state.last_error == "health answered 404"


async def test_llama_server_sim_answers_503_loading_model_on_every_route_until_it_is_loaded(rig):
    llama = functools.partial(mgpusim.ServiceSim, service="llama-cpp", vram_mib=1000)
    r = await rig(extra={"llama": (llama, {"preset": "llama-cpp", "vram_resident_mib": 1000})})
    sim, state = r.sims["llama"], r.broker.consumers.states["llama"]
    async with r.session.get(sim_url(r, "llama", "/nope")) as resp:  # its own 404, in JSON
        assert resp.status == 404 and (await resp.json())["error"]["message"] == "File Not Found"
    await sim._load_lock.acquire()  # the model loads until the test lets it
    sim.restart()  # a new process: it listens at once and loads its model
    sim.start_loading()
    try:
        for method, path in (("GET", "/health"), ("GET", "/props"), ("POST", "/v1/chat/completions")):
            async with r.session.request(method, sim_url(r, "llama", path), json={}) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 503 and error == {
                    "message": "Loading model",
                    "type": "unavailable_error",
                    "code": 503,
                }
        await r.broker.consumers.probe("llama")
        assert state.healthy is False and state.last_error == "health answered 503"
        assert r.gpu.used_mib("llama") == 0
    finally:
        sim._load_lock.release()
    await until(lambda: not sim.starting)
    await r.broker.consumers.probe("llama")
    assert state.healthy is True and state.resident is True and r.gpu.used_mib("llama") == 1000


async def test_llama_router_sim_loads_in_the_background_and_refuses_like_llama_server(rig):
    router = functools.partial(mgpusim.ServiceSim, service="llama-cpp-router", vram_mib=1000, models=("m0",))
    r = await rig(extra={"router": (router, {"preset": "llama-cpp-router", "vram_resident_mib": 1000})})
    sim = r.sims["router"]

    async def call(path: str, body: Any = None, data: bytes | None = None) -> tuple[int, Any]:
        async with r.session.post(sim_url(r, "router", path), json=body, data=data) as resp:
            return resp.status, await resp.json()

    async def listed() -> dict[str, str]:
        async with r.session.get(sim_url(r, "router", "/models")) as resp:
            return {m["id"]: m["status"]["value"] for m in (await resp.json())["data"]}

    def error(code: int, message: str, kind: str) -> tuple[int, Any]:
        return code, {"error": {"code": code, "message": message, "type": kind}}

    assert await call("/models/unload", {"model": "m0"}) == error(
        400, "model is not running", "invalid_request_error"
    )
    assert await call("/models/unload", {"model": "x"}) == error(
        400, "model is not found", "invalid_request_error"
    )
    assert await call("/models/load", {"model": "x"}) == error(404, "File Not Found", "not_found_error")
    status, body = await call("/models/unload", data=b"")
    assert status == 500 and body["error"]["type"] == "server_error"
    await sim._load_lock.acquire()  # m0 loads until the test lets it
    try:
        assert await call("/models/load", {"model": "m0"}) == (200, {"success": True})  # at once
        assert await listed() == {"m0": "loading"} and r.gpu.used_mib("router") == 0
        assert await call("/models/load", {"model": "m0"}) == error(
            400, "model is already running", "invalid_request_error"
        )
    finally:
        sim._load_lock.release()
    await until(lambda: "m0" in sim.models)
    assert await listed() == {"m0": "loaded"} and r.gpu.used_mib("router") == 1000
    assert await call("/models/unload", {"model": "m0"}) == (200, {"success": True})
    assert await listed() == {"m0": "unloaded"} and r.gpu.used_mib("router") == 0
    # An unload while it loads stops the load: nothing is left loaded.
    await sim._load_lock.acquire()
    try:
        assert (await call("/models/load", {"model": "m0"}))[0] == 200
        assert await call("/models/unload", {"model": "m0"}) == (200, {"success": True})
    finally:
        sim._load_lock.release()
    assert await listed() == {"m0": "unloaded"} and sim.models == {} and r.gpu.used_mib("router") == 0
    # As the real one, its model's instance may exit after the unload's answer: listed loaded until then.
    sim.release_s = 0.2
    assert (await call("/v1/chat/completions", {"model": "m0"}))[0] == 200
    assert await call("/models/unload", {"model": "m0"}) == (200, {"success": True})
    assert await listed() == {"m0": "loaded"} and r.gpu.used_mib("router") == 1000
    await until(lambda: not sim.models)
    assert await listed() == {"m0": "unloaded"} and r.gpu.used_mib("router") == 0
    # A restart forgets what it had loaded.
    assert (await call("/v1/chat/completions", {"model": "m0"}))[0] == 200
    assert r.gpu.used_mib("router") == 1000
    sim.restart()
    assert sim.models == {} and r.gpu.used_mib("router") == 0


async def test_started_whisper_and_llama_servers_come_up_like_the_real_ones_and_loads_wait_for_them(
    rig, tmp_path, caplog
):
    """Run as services (``mgpusim.py start``), WhisperSim listens only once its model is loaded and the
    llama-cpp ServiceSim answers 503 until its model is: the broker's load command waits for either."""
    home = tmp_path / "rig0"  # where the rig fixture puts its first rig
    ports = {"whisper": free_port(), "llama": free_port()}
    kinds = {"whisper": ("whisper-cpp", "whisper"), "llama": ("llama-cpp", "llama-cpp")}  # preset, sim
    sim = [PY, str(HERE / "mgpusim.py")]

    def services(raw: dict[str, Any]) -> None:
        for name, (preset, kind) in kinds.items():
            pidfile = home / f"{name}.pid"
            start = [*sim, "start", "--pidfile", str(pidfile), "--state", str(home / "gpu.json")]
            start += [
                "--log",
                str(home / f"{name}.log"),
                f"{name}={kind}:{ports[name]},vram_mib=1500,load_s=1.5",
            ]
            raw["consumers"][name] = {
                "preset": preset,
                "url": f"http://127.0.0.1:{ports[name]}",
                "vram_resident_mib": 1500,
                "can_coexist_with": [n for n in kinds if n != name],
                "unload": {"command": [*sim, "stop", "--pidfile", str(pidfile)], "timeout_s": 30},
                "load": {"command": start, "timeout_s": 30},
            }
        raw["routing"] |= {"stt": "whisper", "chat": "llama"}

    r = await rig(tweak=services)
    seen: dict[str, list[tuple[Any, int]]] = {name: [] for name in kinds}

    async def watch(name: str) -> None:
        """What its /health answers from before it starts until it is healthy, and the MiB it held."""
        while True:
            try:
                async with r.session.get(f"http://127.0.0.1:{ports[name]}/health") as resp:
                    answer = (resp.status, await resp.text())
            except aiohttp.ClientConnectionError:
                answer = "refused"
            if not seen[name] or seen[name][-1][0] != answer:
                seen[name].append((answer, r.gpu.used_mib(name)))
            if answer != "refused" and answer[0] == 200:
                return
            await asyncio.sleep(0.02)

    try:
        for name, kind, payload in (
            ("whisper", "stt", None),
            ("llama", "chat", {"messages": [{"role": "user", "content": "hi"}]}),
        ):
            watcher = asyncio.ensure_future(watch(name))
            data = b"RIFF...." if payload is None else None
            status, _, body = await r.post(kind, payload, data=data)
            assert status == 200, body
            await asyncio.wait_for(watcher, 10)
    finally:
        for name in kinds:
            stop = await asyncio.create_subprocess_exec(*sim, "stop", "--pidfile", str(home / f"{name}.pid"))
            assert await asyncio.wait_for(stop.wait(), 30) == 0
    # whisper-server: refused while it loads, then healthy with its model already held.
    assert seen["whisper"] == [("refused", 0), ((200, '{"status": "ok"}'), 1500)]
    # llama-server: listening at once, 503 "Loading model" on /health until its model is held.
    (refused, loading, healthy) = seen["llama"][0], seen["llama"][-2], seen["llama"][-1]
    assert refused[0] == "refused" and loading[0][0] == 503 and "Loading model" in loading[0][1]
    assert loading[1] == 0 and healthy[0][0] == 200 and healthy[1] == 1500
    log = caplog.text
    for name in kinds:  # each job came after its load command and a good health answer
        assert log.index(f"msg=command consumer={name} action=load") < log.index(
            f"msg=health consumer={name} healthy=True"
        )


# =====================================================================================================
# 10.1 Operations: status, metrics, events and logs
# One record shown everywhere.
# =====================================================================================================


async def _read_replay(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """The events a ``since`` stream replays, up to its ``: replayed N`` line (N checked)."""
    events = []
    while True:
        line = await asyncio.wait_for(resp.content.readline(), 10)
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]))
        elif line.startswith(b": replayed "):
            assert int(line.split()[-1]) == len(events)
            return events


async def test_status_shape_and_gpu_read_at_most_once_per_second(rig):
    r = await rig(sims={"comfyui": {"loaded": True}})
    t0 = time.monotonic()
    first = await r.status()
    await asyncio.gather(*(r.status() for _ in range(20)))
    for _ in range(10):
        await r.status()
    elapsed = time.monotonic() - t0
    # One reading (three nvidia-smi processes) per started second at most, however many requests.
    assert r.broker.gpu.queries <= 3 * (1 + int(elapsed))
    top = {"version", "uptime_s", "gpu", "consumers", "scheduler", "gpus", "internal_errors", "state_file"}
    top.add("clients")  # issue 23: {} without auth.clients
    assert set(first) == top and first["state_file"] is None  # (no state_file configured)
    assert first["clients"] == {}
    # The broker's one figure, shown again in each GPU's stats (as before it was a top-level field).
    assert first["internal_errors"] == first["scheduler"]["stats"]["internal_errors"] == 0
    gpu = first["gpu"]
    assert gpu["total_mib"] == 16384 and gpu["used_mib"] == 13000 and gpu["free_mib"] == 16384 - 480 - 13000
    # Comfyui says it is loaded: its 13000 MiB are its, none unclaimed; no gpu.yield, no strangers.
    assert gpu["unclaimed_mib"] == 0 and gpu["strangers"] is None
    assert (
        gpu["processes"]
        == [
            {
                "pid": r.sims["comfyui"].pid,
                "name": "/opt/ComfyUI/.venv/bin/python3",
                "used_mib": 13000,
                "consumer": None,  # nobody claims it: comfyui has no `processes` here
            }
        ]
        or gpu["processes"][0]["used_mib"] == 13000
    )
    assert gpu["error"] is None and gpu["read_at"].endswith("Z")
    mv = first["consumers"]["mvoice"]
    assert set(mv) == {
        "url",
        "kinds",
        "healthy",
        "stopped",
        "loaded",
        "last_probe",
        "last_error",
        "last_used",
        "vram_resident_mib",
        "vram_used_mib",
        "vram_peak_mib",
        "vram_managed",
        "priority",
        "can_coexist_with",
        "gpu",
        "preset",
        "listen",
        "timings",
    }
    assert mv["vram_used_mib"] is None and mv["vram_peak_mib"] is None  # no `processes`: not measured
    assert mv["timings"] == {"load_s": None, "unload_s": None, "job_s": None}  # nothing seen yet
    assert (
        mv["kinds"] == ["tts", "stt"]
        and mv["healthy"] is True
        and mv["stopped"] is False
        and mv["can_coexist_with"] == ["ollama", "whisper"]
    )
    assert first["consumers"]["whisper"]["kinds"] == ["stt"]  # listed though not routed
    assert first["consumers"]["comfyui"]["loaded"] is None  # no `loaded` in its health: unknown
    sched = first["scheduler"]
    assert sched["holder"] is None and sched["queue"] == []
    assert set(sched["stats"]) >= {
        "jobs",
        "completed",
        "failed",
        "cancelled",
        "rejected",
        "evictions",
        "loads",
    }
    # One GPU: `gpus` holds the same GPU and scheduler as the single-GPU fields, with its consumers.
    (only,) = first["gpus"]
    assert {k: v for k, v in only.items() if k not in ("consumers", "scheduler")} == gpu
    assert only["scheduler"] == sched and only["consumers"] == list(first["consumers"])


async def test_request_id_is_taken_or_made_forwarded_returned_and_logged(rig, caplog):
    r = await rig(sims={"mvoice": {"loaded": True}})
    status, headers, _ = await r.post("tts", {"text": "x"}, headers={"X-Request-ID": "wa-sh-42"})
    assert status == 200 and headers["X-Request-ID"] == "wa-sh-42"
    assert r.sims["mvoice"].records[-1].headers["X-Request-ID"] == "wa-sh-42"
    assert "request_id=wa-sh-42" in caplog.text
    status, headers, _ = await r.post("tts", {"text": "x"}, headers={"X-Request-ID": "bad id; injected=1"})
    made = headers["X-Request-ID"]
    assert (
        made != "bad id; injected=1"
        and len(made) == 32
        and r.sims["mvoice"].records[-1].headers["X-Request-ID"] == made
    )
    status, headers, _ = await r.post("video", {})
    assert status == 404 and len(headers["X-Request-ID"]) == 32  # errors carry one too


async def test_an_answer_given_before_the_body_carries_the_request_id_too(rig):
    """Found by the attack on issue 19's surfaces: X-Request-ID is "returned on every answer" (api.md), but
    the answers given to an Expect header before the body (413 to a body announced over max_body_mib, 417
    to an unknown expectation, 401 without the token) came from before the front door and carried none,
    not even the one the client sent."""
    r = await rig(tweak=with_token)
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    for length, extra, code in (
        (65 * m.MiB, auth + "Expect: 100-continue\r\n", "payload_too_large"),
        (5, auth + "Expect: something\r\n", "expectation_failed"),
        (5, "Expect: 100-continue\r\n", "unauthorized"),
    ):
        reader, writer = await _partial_post(
            r.server.host,
            r.server.port,
            "/v1/stt",
            length,
            b"",
            extra=f"X-Request-ID: early-{code}\r\n{extra}",
        )
        try:
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
        finally:
            writer.close()
        assert head.startswith(f"HTTP/1.1 {SPEC_ERRORS[code]} "), head
        assert f"\r\nX-Request-ID: early-{code}\r\n" in head, head
    assert r.sims["mvoice"].records == []


async def test_metrics_after_a_scripted_sequence_of_jobs(rig):
    r = await rig(sims={"comfyui": {"loaded": True, "work_s": 0.05}, "mvoice": {"loaded": False}})
    assert (await r.post("tts", {"text": "a"}))[0] == 200  # evicts comfyui, loads mvoice
    assert (await r.post("tts", {"text": "b"}))[0] == 200
    assert (await r.post("llm", {"model": "m", "prompt": "p"}))[0] == 200
    r.sims["mvoice"].faults["status"] = 500
    assert (await r.post("stt", None, data=b"x"))[0] == 500  # completed: the consumer answered
    async with r.session.get(r.url("/metrics")) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        families = _families(await resp.text())
    assert families["mgpumanager_jobs"].type == "counter"
    assert _value(families, "mgpumanager_jobs_total", consumer="mvoice", outcome="completed") == 3
    assert _value(families, "mgpumanager_jobs_total", consumer="ollama", outcome="completed") == 1
    assert _value(families, "mgpumanager_evictions_total", consumer="comfyui") == 1
    assert _value(families, "mgpumanager_loads_total", consumer="mvoice") == 1
    assert _value(families, "mgpumanager_run_seconds_count", consumer="mvoice") == 3
    assert _value(families, "mgpumanager_run_seconds_bucket", consumer="mvoice", le="+Inf") == 3
    assert _value(families, "mgpumanager_queue_wait_seconds_count", consumer="ollama") == 1
    assert _value(families, "mgpumanager_queue_length") == 0
    assert _value(families, "mgpumanager_consumer_resident", consumer="mvoice") == 1
    assert _value(families, "mgpumanager_consumer_resident", consumer="comfyui") == 0
    assert _value(families, "mgpumanager_consumer_healthy", consumer="whisper") == 1
    assert _value(families, "mgpumanager_gpu_memory_total_bytes") == 16384 * m.MiB
    assert _value(families, "mgpumanager_gpu_up") == 1
    assert _value(families, "mgpumanager_info", version=m.VERSION) == 1
    for name, family in families.items():
        assert name.startswith("mgpumanager_"), name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name


async def test_metrics_for_holds_unload_failures_and_the_gpu(rig):
    def short_hold(raw):
        raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["timeout_s"] = 0.3

    r = await rig(
        sims={"mvoice": {"loaded": True}, "comfyui": {"work_s": 3600}}, total_mib=40000, tweak=short_hold
    )
    assert (await r.post("image", {"prompt": {}}))[0] == 200
    await until(lambda: r.broker.scheduler.holder is None)  # the hold timed out
    r.sims["mvoice"].faults["unload_status"] = 500
    async with r.session.post(r.url("/v1/consumers/mvoice/unload")) as resp:
        assert resp.status == 502
    async with r.session.get(r.url("/metrics")) as resp:
        families = _families(await resp.text())
    assert _value(families, "mgpumanager_hold_seconds_count", consumer="comfyui") == 1
    assert _value(families, "mgpumanager_hold_seconds_sum", consumer="comfyui") >= 0.3
    assert _value(families, "mgpumanager_hold_timeouts_total", consumer="comfyui") == 1
    assert _value(families, "mgpumanager_unload_failures_total", consumer="mvoice") == 1
    used = _value(families, "mgpumanager_gpu_memory_used_bytes")
    free = _value(families, "mgpumanager_gpu_memory_free_bytes")
    # A reading up to a second old (before or after comfyui took its memory): consistent either way.
    assert used in (2800 * m.MiB, 15800 * m.MiB) and used + free == (40000 - 480) * m.MiB
    assert _value(families, "mgpumanager_gpu_utilization_ratio") == 0


async def test_a_clients_use_sums_every_gpu_and_its_gpu_time_counts_its_holds_in_status_and_metrics(rig):
    """Issue 23's visibility: a client's line in /v1/status is its use on every GPU together, and its GPU
    time runs until its slot is given back, a hold's end included (ComfyUI's render, which the hold waits
    for), in the fair window and in mgpumanager_client_gpu_seconds_total alike: wa's TTS job on GPU 0 and
    its image on GPU 1 make jobs_total 2, and gpu_s_window the seconds the counter has, the hold's in it."""

    def two_gpus_and_clients(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["gpu"] = 1
        with_clients(raw)

    r = await rig(gpus=2, sims={"comfyui": {"gpu": 1, "work_s": 0.2}}, tweak=two_gpus_and_clients)
    wa = bearer(WA_TOKEN)
    assert (await r.post("tts", {"text": "x"}, headers=wa))[0] == 200
    assert (await r.post("image", {"prompt": {}}, headers=wa))[0] == 200
    await until(lambda: all(s.holder is None for s in r.broker.schedulers.values()))  # the hold ended
    async with r.session.get(r.url("/v1/status"), headers=wa) as resp:
        clients = (await resp.json())["clients"]
    async with r.session.get(r.url("/metrics"), headers=wa) as resp:
        families = _families(await resp.text())
    held = _value(families, "mgpumanager_client_gpu_seconds_total", client="wa")
    assert held >= _value(families, "mgpumanager_hold_seconds_sum", consumer="comfyui") > 0
    assert clients["wa"] | {"gpu_s_window": 0} == {
        "queued": 0,
        "running": 0,
        "jobs_total": 2,
        "gpu_s_window": 0,
        "priority": 4,
        "max_queued": None,
    }
    assert clients["wa"]["gpu_s_window"] == pytest.approx(held, abs=1e-3)


async def test_event_stream_tells_a_job_with_eviction_and_load_in_order(rig):
    r = await rig(sims={"comfyui": {"loaded": True}, "mvoice": {"loaded": False}})
    async with r.session.get(r.url("/v1/events")) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert (await r.post("tts", {"text": "x"}))[0] == 200
        events = await _read_events(stream, "finished")
        names = [e["event"] for e in events]
        assert names == [
            "queued",
            "granted",
            "evicting",
            "evicted",
            "learned",  # how long comfyui's unload took
            "loading",
            "loaded",
            "learned",  # and mvoice's load
            "started",
            "finished",
        ]
        assert [(e["consumer"], e["what"]) for e in events if e["event"] == "learned"] == [
            ("comfyui", "unload"),
            ("mvoice", "load"),
        ]
        assert all("ts" in e for e in events) and events[2]["consumer"] == "comfyui"
        r.sims["whisper"].faults["health_status"] = 503
        await r.broker.consumers.probe("whisper")
        health = await _read_events(stream, "health")
        assert health[-1]["consumer"] == "whisper" and health[-1]["healthy"] is False
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert resp.status == 200
        assert (await _read_events(stream, "reload"))[-1]["ok"] is True


async def test_event_stream_heartbeats_and_drops_a_reader_that_falls_behind(rig, monkeypatch):
    monkeypatch.setattr(m, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(m, "EVENT_BEHIND_S", 0)  # (behind at once: no time to catch up)
    r = await rig()
    async with r.session.get(r.url("/v1/events")) as stream:
        assert await stream.content.readline() == b": mgpumanager events\n"
        await stream.content.readline()
        assert await asyncio.wait_for(stream.content.readline(), 5) == b": heartbeat\n"
        events = r.broker.scheduler.events
        for i in range(events.buffer + 1):  # faster than any reader: nothing yields in between
            events.publish("test", n=i)
        assert events.dropped == 1 and not events.subscribers
        body = await asyncio.wait_for(stream.read(), 5)  # its stream ends instead of slowing anyone
        assert b"event: test" not in body  # what it missed is gone: it reconnects and reads /v1/status
    # Counted where people look (it was kept and shown nowhere).
    async with r.session.get(r.url("/metrics")) as resp:
        assert "\nmgpumanager_event_subscribers_dropped_total 1\n" in await resp.text()


async def test_a_burst_of_events_in_one_turn_drops_no_reader_that_reads_on(rig, monkeypatch):
    """Found by an attack: 300 refusals at once (a client at its max_queued) published more than 256 events
    before any stream could run, and every reader was dropped, however fast it read. A reader is dropped
    only once it has not caught up for EVENT_BEHIND_S, or at EVENT_BUFFER_MAX whatever it does; each wake
    takes all that waits, in one write."""
    monkeypatch.setattr(m, "EVENT_BEHIND_S", 0.2)
    r = await rig()
    events = r.broker.events
    async with r.session.get(r.url("/v1/events")) as stream:
        assert await stream.content.readline() == b": mgpumanager events\n"
        await stream.content.readline()
        await until(lambda: len(events.subscribers) == 1)
        # Idle longer than EVENT_BEHIND_S first: caught up all along, not behind since it last took one
        # (a review found the fix dropping a reader that had been idle for a second).
        await asyncio.sleep(0.3)
        # In one turn of the loop: no reader runs in between. (The events' clock stands still meanwhile: on a
        # loaded machine the turn itself may last longer than EVENT_BEHIND_S, which is not what this tests.)
        clock, now = events.clock, events.clock()
        events.clock = lambda: now
        for i in range(1000):
            events.publish("burst", n=i)
        events.clock = clock
        got = []
        while len(got) < 1000:
            line = await asyncio.wait_for(stream.content.readline(), 5)
            assert line, f"the stream ended after {len(got)} events (dropped: {events.dropped})"
            if line.startswith(b"data: "):
                got.append(json.loads(line[6:])["n"])
        assert got == list(range(1000)) and events.dropped == 0
        # A burst beyond what a reader may hold drops it all the same.
        monkeypatch.setattr(m, "EVENT_BUFFER_MAX", 300)
        queue = next(iter(events.subscribers))
        queue._maxsize = 300  # (as a subscription made now would be)
        for i in range(301):
            events.publish("burst", n=i)
        assert events.dropped == 1 and not events.subscribers


async def test_a_message_systemd_did_not_get_is_counted_in_the_metrics(rig):
    r = await rig()
    r.broker.notifier = m.Notifier({"NOTIFY_SOCKET": "/nonexistent/socket"})
    assert r.broker.notifier.send("STATUS=x") is False
    async with r.session.get(r.url("/metrics")) as resp:
        assert "\nmgpumanager_sd_notify_failures_total 1\n" in await resp.text()


async def test_head_of_the_event_stream_is_its_head_alone_and_its_connection_goes_on(rig):
    """HEAD /v1/events (a monitor asking whether the stream is there) gets the stream's head and nothing
    more. Found by the attack on issue 19's surfaces: the broker wrote the stream's opening comment (and its
    heartbeats) after a HEAD answer, which has no body: a keep-alive client read ": mgpumanager events" as
    the status line of its next answer, and the handler, subscribed, held the connection for as long as the
    client kept it, so the next request on it was never answered."""
    r = await rig()
    reader, writer = await asyncio.open_connection(r.server.host, r.server.port)
    writer.write(
        b"HEAD /v1/events HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    try:
        data = await asyncio.wait_for(reader.read(), 10)  # to its end: closed after /healthz's answer
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/event-stream" in head, data
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\r\n\r\nok\n"), data
    assert not r.broker.events.subscribers


async def test_readers_of_a_full_ring_that_never_read_hold_little_and_are_cut_off(rig, monkeypatch):
    """Each ``?since=900`` reader got the whole ring (4 MB here) in one write, which sat in the broker's
    memory for as long as the reader kept its connection without reading: 10 such readers held 40 MB, for
    ever. The replay goes in pieces, each after the reader took the last, and a reader that takes nothing
    for EVENT_STALL_S is cut off."""
    monkeypatch.setattr(m, "EVENT_STALL_S", 1.0, raising=False)
    r = await rig()
    events = r.broker.events
    for n in range(10_000):
        events.publish("test", n=n, pad="x" * 400)
    assert sum(len(sent) for sent in events.recent(900)) > 4_000_000
    readers = []
    for _ in range(10):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (r.server.host, r.server.port))
        sock.send(b"GET /v1/events?since=900 HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        readers.append(sock)
    try:
        await until(lambda: len(events.subscribers) == 10)
        await asyncio.sleep(0.3)  # every replay written as far as it goes
        handlers = r.server.runner.server.connections
        held = [h.transport.get_write_buffer_size() for h in handlers if h.transport]
        assert len(held) == 10 and sum(held) < 10 * 256 * 1024, held
        await until(lambda: not events.subscribers)  # each cut off once it took nothing for a second
    finally:
        for sock in readers:
            sock.close()
    # A reader that reads gets the whole replay, as before.
    async with r.session.get(r.url("/v1/events?since=900")) as stream:
        past = await _read_replay(stream)
    assert [e["n"] for e in past] == list(range(10_000))


async def test_a_live_event_reader_that_stops_reading_has_its_connection_aborted(rig, monkeypatch):
    """A reader of the live stream that never reads, flooded with events, is cut off EVENT_STALL_S after its
    socket took nothing more: its connection is aborted, so the socket and what waited in the broker's
    buffer for it go (not only its subscription, with the connection left open and full)."""
    monkeypatch.setattr(m, "EVENT_STALL_S", 1.0, raising=False)
    r = await rig()
    events = r.broker.events
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (r.server.host, r.server.port))
        sock.send(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        await until(lambda: len(events.subscribers) == 1)
        mine = sock.getsockname()
        (theirs,) = [
            c for c in r.broker.connections.open.values() if c.transport.get_extra_info("peername") == mine
        ]
        n, deadline = 0, time.monotonic() + 20
        while events.subscribers:  # a flood, a little at a time: the stream writes until its socket is full
            assert time.monotonic() < deadline, "the reader was never cut off"
            for _ in range(50):
                events.publish("test", n=n, pad="x" * 400)
                n += 1
            await asyncio.sleep(0.01)
        assert n > 50  # (it was subscribed, and written to, while the flood went on)
        await until(lambda: theirs.protocol not in r.broker.connections.open)  # closed: aborted
        assert theirs.transport.is_closing()
        # The reader, reading at last, finds its connection gone: what was not sent never comes.
        got = 0
        with contextlib.suppress(ConnectionResetError):
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
                got += len(chunk)
        assert got < n * 400
    finally:
        sock.close()


def test_the_event_ring_keeps_the_last_events_by_count_and_by_age():
    clock = FakeClock()
    events = m.Events(ring=5, ring_s=900, clock=clock)
    for i in range(8):
        events.publish("test", n=i)
        clock.now += 1
    assert [e["n"] for e in recent_events(events)] == [3, 4, 5, 6, 7]  # the count bound
    assert [e["n"] for e in recent_events(events, 2.5)] == [6, 7]  # published 2 s and 1 s ago
    assert events.recent(0.5) == []
    clock.now += 890
    events.publish("test", n=8)  # 1898: n=4 was published 894 s ago
    assert [e["n"] for e in recent_events(events)] == [4, 5, 6, 7, 8]
    clock.now += 6.5
    assert [e["n"] for e in recent_events(events)] == [5, 6, 7, 8]  # older than 15 minutes: forgotten
    clock.now += 900
    events.publish("test", n=9)
    assert len(events.ring) == 1 and recent_events(events)[0]["n"] == 9  # a publish forgets too
    # Every event is kept, with or without subscribers, as the stream sends it.
    (frame,) = events.recent(1)
    assert frame.startswith(b"event: test\ndata: {") and frame.endswith(b"}\n\n")
    assert set(recent_events(events, 1)[0]) == {"event", "ts", "n"}


async def test_events_since_replays_the_recent_past_then_goes_live(rig, monkeypatch):
    monkeypatch.setattr(m, "EVENT_RING", 8)
    r = await rig(sims={"mvoice": {"loaded": True}})
    r.broker.events.ring.clear()  # the first health round's events
    assert (await r.post("tts", {"text": "before anyone listened"}))[0] == 200
    await until(lambda: r.broker.events.ring and r.broker.events.ring[-1][1].name == "learned")
    job = ["queued", "granted", "started", "finished", "learned"]  # learned: what the job took
    assert [e["event"] for e in recent_events(r.broker.events)] == job
    async with r.session.get(r.url("/v1/events?since=900")) as stream:
        past = await _read_replay(stream)
        assert [e["event"] for e in past] == job
        assert (await r.post("tts", {"text": "live"}))[0] == 200
        live = await _read_events(stream, "learned")
        assert [e["event"] for e in live] == job
        assert live[0]["job"] == past[0]["job"] + 1
    # The ring holds EVENT_RING events: the first job's first two are gone.
    async with r.session.get(r.url("/v1/events?since=900")) as stream:
        past = await _read_replay(stream)
        assert [(e["job"], e["event"]) for e in past] == [
            (1, "started"),
            (1, "finished"),
            (1, "learned"),
            (2, "queued"),
            (2, "granted"),
            (2, "started"),
            (2, "finished"),
            (2, "learned"),
        ]
    # since=0 replays nothing; without since nothing is replayed either (as before).
    for query in ("?since=0", ""):
        async with r.session.get(r.url("/v1/events" + query)) as stream:
            assert await stream.content.readline() == b": mgpumanager events\n"
            await stream.content.readline()
            r.broker.events.publish("test", n=1)
            assert (await _read_events(stream, "test"))[0]["n"] == 1
    # Events older than since, or than EVENT_RING_S, are not replayed.
    later = r.broker.events.clock() + 60
    monkeypatch.setattr(r.broker.events, "clock", lambda: later)
    async with r.session.get(r.url("/v1/events?since=30")) as stream:
        assert await _read_replay(stream) == []
    for bad in ("abc", "-1", "inf", "nan", ""):
        async with r.session.get(r.url("/v1/events"), params={"since": bad}) as resp:
            error = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_request")
            assert "since" in error["message"]


async def test_the_switch_from_replay_to_live_loses_and_repeats_no_event(rig):
    r = await rig()
    events = r.broker.events
    events.ring.clear()  # the first health round's events
    for n in range(5000):  # a replay of 10 MiB: more than the sockets buffer, so writing it waits
        events.publish("test", n=n, pad="x" * 2048)
    marker_seen = asyncio.Event()
    during: list[int] = []  # published after the client asked and before it read the end of the replay

    async def publisher() -> None:
        n = 5000
        # While the replay is written (at most 200: a reader 256 events behind is dropped), then after.
        while not marker_seen.is_set() and n < 5200:
            events.publish("test", n=n)
            if events.subscribers:
                during.append(n)
            n += 1
            await asyncio.sleep(0.001)
        await marker_seen.wait()
        for later in range(n, n + 100):
            events.publish("test", n=later)
        events.publish("test", n=-1)

    task = asyncio.ensure_future(publisher())
    try:
        seen: list[int] = []
        replayed = None
        async with r.session.get(r.url("/v1/events?since=900")) as stream:
            while not seen or seen[-1] != -1:
                line = await asyncio.wait_for(stream.content.readline(), 10)
                assert line, "the stream ended"
                if line.startswith(b": replayed "):
                    replayed = int(line.split()[-1])
                    marker_seen.set()
                elif line.startswith(b"data: "):
                    seen.append(json.loads(line[6:])["n"])
        seen.pop()
        assert replayed is not None and replayed >= 5000
        assert seen == list(range(len(seen))) and not events.dropped  # no gap, no repeat
        assert [n for n in during if n >= replayed], "no event came while the replay was written"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_job_log_line_has_every_field(rig, caplog):
    r = await rig(total_mib=40000, sims={"comfyui": {"work_s": 0.2}})
    assert (await r.post("image", {"prompt": {}}, headers={"X-Request-ID": "img-1"}))[0] == 200
    await until(lambda: r.broker.scheduler.holder is None)
    line = next(rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("msg=job"))
    fields = dict(part.split("=", 1) for part in line.split(" "))
    assert list(fields)[:11] == [
        "msg",
        "id",
        "consumer",
        "kind",
        "status",
        "code",
        "http",
        "wait_ms",
        "run_ms",
        "hold_ms",
        "evictions",
    ]
    assert fields["request_id"] == "img-1" and int(fields["hold_ms"]) >= 150 and fields["code"] == ""
    assert list(fields)[11:] == ["request_id", "client"] and fields["client"] == ""  # (no auth.clients)


def test_log_lines_carry_a_timestamp_or_journald_priority():
    record = logging.LogRecord(
        "mgpumanager", logging.WARNING, __file__, 1, m.logfmt(msg="x", a=None), (), None
    )
    plain = m.LogfmtFormatter(journal=False).format(record)
    assert plain.startswith("ts=") and plain.endswith(" level=warning msg=x a=")
    journal = m.LogfmtFormatter(journal=True).format(record)
    assert journal == "<4>level=warning msg=x a="  # journald adds the time itself
    assert m.logfmt(reason="connection refused", n=3, q='a"b') == 'reason="connection refused" n=3 q="a\\"b"'
    # (A mutation audit: none of these was tested.) A value that holds a line break stays on its line, one
    # that holds "=" stays one value, and an empty text is told apart from an absent value.
    assert m.logfmt(reason="refused\nlevel=error") == 'reason="refused\\nlevel=error"'
    assert m.logfmt(name="mvoice\nforged") == 'name="mvoice\\nforged"'
    assert m.logfmt(path="/x?a=b") == 'path="/x?a=b"'
    assert m.logfmt(reason="", code=None) == 'reason="" code='


async def test_under_journald_the_daemon_logs_without_timestamps(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    daemon = Daemon(r.raw, r.tmp_path, sim_smi(r.state), env={"JOURNAL_STREAM": "8:12345"})
    async with daemon, r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
        assert resp.status == 200
    lines = [line for line in daemon.log.splitlines() if line]
    assert lines and all(re.match(r"^<[0-7]>level=", line) for line in lines), lines[:3]
    assert any(line.startswith("<6>level=info msg=job ") for line in lines)


async def test_what_the_operator_must_look_at_is_logged_as_a_warning_and_the_routine_as_info(caplog):
    """``journalctl -p warning`` shows what went wrong: an unload that failed, an unload whose memory was
    not freed in time, a load that failed, a preload that did not fit, a hold that timed out; the
    scheduler's routine (evicting, evicted, loading, loaded, a hold released) is info. (Found by
    a mutation audit: the level of each of these facts but the abandoned hold's could change and no test
    failed.)"""
    caplog.set_level(logging.DEBUG, logger="mgpumanager")
    s, gpu, ops, _ = make_scheduler(small_config())
    crowd(gpu, ops, {"x": 1.0, "y": 2.0, "z": 3.0})
    ops.unload_behaviour |= {"x": "fail", "y": "keep"}  # x's unload fails, y's answers but frees nothing
    job = await s.acquire("t", "kt")  # ... and z's frees it: t loads
    job.release("completed", status=200, success=True, hold=asyncio.Event().wait, hold_timeout_s=0.05)
    await until(lambda: s.holder is None)
    job = await s.acquire("t", "kt")
    done = asyncio.Event()
    job.release("completed", status=200, success=True, hold=done.wait, hold_timeout_s=30)
    done.set()
    await until(lambda: s.holder is None)
    await internal_jobs(s).preload("z")  # 3904 MiB free beside x, y and t: z's 4256 do not fit
    ops.load_fails.add("z")
    ops.states["z"].unloaded()
    gpu.held.pop("t")
    with pytest.raises(m.BrokerError, match="load answered 503"):
        await s.acquire("z", "kz")
    levels: dict[str, set[str]] = {}
    for record in caplog.records:
        fields = re.match(r'msg=("[^"]*"|\S+)', record.getMessage())
        if record.name == "mgpumanager" and fields is not None:
            levels.setdefault(fields[1].strip('"'), set()).add(record.levelname)
    assert {msg: levels.get(msg) for msg in WARNINGS + INFOS} == {
        **{msg: {"WARNING"} for msg in WARNINGS},
        **{msg: {"INFO"} for msg in INFOS},
    }


#: What the scheduler logs as a warning (the operator must look) and as info (its routine), by ``msg``.
WARNINGS = [
    "unload failed",
    "memory not freed in time",
    "hold timed out",
    "preload skipped: it does not fit",
    "load failed",
]
INFOS = ["evicting", "evicted", "loading", "loaded", "hold released"]


def test_every_metric_is_in_the_manuals_table_with_its_type():
    """Found by a mutation audit: a counter exported as a gauge (``rate()`` and ``increase()`` then read
    it wrong) failed no test. /metrics' ``# TYPE`` lines are operations.md's table, name for name."""
    section = (HERE / "docs" / "operations.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) < 4 or not cells[1].startswith("`mgpumanager_"):
            continue
        for name in re.findall(r"`(mgpumanager_[^`]+)`", cells[1]):
            braces = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)  # mgpumanager_gpu_memory_{total,used,free}_bytes
            for each in [braces[1] + part + braces[3] for part in braces[2].split(",")] if braces else [name]:
                documented[each] = cells[2]
    text = m.Metrics().render([])
    exported = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert exported == documented
    assert {family.name: family.type for family in _families(text).values()} == {
        re.sub(r"_total$", "", name) if kind == "counter" else name: kind for name, kind in documented.items()
    }


def test_histogram_buckets_are_cumulative_and_a_sample_on_a_bound_counts_in_its_bucket():
    """Found by a mutation audit: buckets written per bucket rather than cumulative, or a sample equal to a
    bound counted in the next one (Prometheus' ``le`` is "less than or equal"), failed no test."""
    metrics = m.Metrics()
    for seconds in (0.003, 0.5, 0.5, 0.7, 700.0):
        metrics.observe("mgpumanager_job_seconds", seconds, consumer="mvoice")
    families = _families(metrics.render([]))
    buckets = {
        s.labels["le"]: s.value
        for s in families["mgpumanager_job_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert [buckets[le] for le in ("0.005", "0.25", "0.5", "1", "600", "+Inf")] == [1, 1, 3, 4, 4, 5]
    assert _value(families, "mgpumanager_job_seconds_count", consumer="mvoice") == 5


@pytest.mark.catches_bug
async def test_the_metrics_gauges_say_what_the_broker_sees_now(rig, monkeypatch):
    """Found by a mutation audit of /metrics (each of these was changed and no test failed): a bug caught
    is mgpumanager_internal_errors_total; running_jobs counts the jobs answering now, not a hold; a consumer
    not probed yet is NaN, neither healthy nor unhealthy; an unhealthy consumer is not a stopped one (the
    alert rule of operations.md tells them apart); utilisation is a ratio; a reading that fails is gpu_up 0,
    and the memory it could not read is absent."""

    async def metrics() -> dict[str, Any]:
        async with r.session.get(r.url("/metrics")) as resp:
            assert resp.status == 200
            return _families(await resp.text())

    async def metrics_until(predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 10  # (a reading is kept up to a second)
        while not predicate(families := await metrics()):
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.05)
        return families

    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(total_mib=40000, sims={"comfyui": {"work_s": 3600}}, urls={"ollama": ollama.url})

        async def broken_relay(*args: Any, **kw: Any) -> web.StreamResponse:
            raise RuntimeError("a bug")

        monkeypatch.setattr(m, "relay", broken_relay)
        error_of(*await r.post("tts", {"text": "a"}), "scheduler_error")
        monkeypatch.undo()
        r.expected_internal_errors = 1
        assert _value(await metrics(), "mgpumanager_internal_errors_total") == 1

        running = asyncio.ensure_future(r.post("llm", {"model": "m"}))
        await until(lambda: r.broker.scheduler.running == 1)
        assert _value(await metrics(), "mgpumanager_running_jobs", gpu="0") == 1
        gate.set()
        assert (await running)[0] == 200

        r.sims["whisper"].faults["health_status"] = 503
        await r.broker.consumers.probe("whisper")
        raw = copy.deepcopy(r.raw)
        raw["consumers"]["mvoice"]["url"] = raw["consumers"]["mvoice"]["url"].replace(
            "127.0.0.1", "localhost"
        )
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert await r.broker.reload() == ["new url for mvoice"]  # a new service: not probed yet
        families = await metrics()
        assert math.isnan(_value(families, "mgpumanager_consumer_healthy", consumer="mvoice"))
        assert math.isnan(_value(families, "mgpumanager_consumer_resident", consumer="mvoice"))
        assert _value(families, "mgpumanager_consumer_healthy", consumer="whisper") == 0
        assert _value(families, "mgpumanager_consumer_stopped", consumer="whisper") == 0
        assert _value(families, "mgpumanager_consumer_healthy", consumer="ollama") == 1

        with r.gpu.edit() as state:
            state["gpus"][0].update(utilization_pct=37)
        families = await metrics_until(lambda f: _value(f, "mgpumanager_gpu_utilization_ratio", gpu="0") != 0)
        assert _value(families, "mgpumanager_gpu_utilization_ratio", gpu="0") == 0.37
        r.gpu.set_fault("fail")
        families = await metrics_until(lambda f: _value(f, "mgpumanager_gpu_up", gpu="0") != 1)
        assert _value(families, "mgpumanager_gpu_up", gpu="0") == 0
        with pytest.raises(KeyError):
            _value(families, "mgpumanager_gpu_memory_free_bytes", gpu="0")
        r.gpu.set_fault(None)

        # A render after its answer: comfyui holds the GPU, and no job is answering.
        assert (await r.post("image", {"prompt": {}}))[0] == 200
        assert (r.broker.scheduler.holder, r.broker.scheduler.holds) == ("comfyui", 1)
        assert _value(await metrics(), "mgpumanager_running_jobs", gpu="0") == 0
        await r.broker.scheduler.close()  # (the hold cut short, as at shutdown)


async def test_the_queue_eta_gauge_is_the_longest_expected_wait_in_the_queue(rig):
    """mgpumanager_queue_eta_seconds is how far behind the GPU is: the eta_s of the job expected last, the
    longest of the queue's, not the first's (or the least). Three TTS jobs wait behind an LLM job, mvoice's
    job time learned (0.3 s or more): each waits longer than the one before it. (Found by a mutation audit:
    the gauge showing the first waiting job's eta, or the least, failed no test; every test's etas were
    equal or only said to be above 0.)"""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(urls={"ollama": ollama.url}, sims={"mvoice": {"work_s": 0.3}})
        assert (await r.post("tts", {"text": "its job time learned"}))[0] == 200
        llm = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "holds the GPU"}))
        await until(lambda: r.broker.scheduler.holder == "ollama")
        queued = [asyncio.ensure_future(r.post("tts", {"text": str(i)})) for i in range(3)]
        try:
            await until(lambda: len(r.broker.scheduler.lock.waiting) == 3)
            # (The holder's time left is RUNNING_FLOOR_S, ollama's job time unknown: the etas stay put.)
            etas = [q["eta_s"] for q in (await r.status())["scheduler"]["queue"]]
            async with r.session.get(r.url("/metrics")) as resp:
                families = _families(await resp.text())
        finally:
            gate.set()
            assert [status for status, _, _ in await asyncio.gather(llm, *queued)] == [200] * 4
    assert etas[0] < etas[1] < etas[2]
    assert _value(families, "mgpumanager_queue_eta_seconds", gpu="0") == etas[2]


async def test_events_are_serialised_once_and_only_for_someone_and_a_reader_that_left_is_forgotten(
    rig, monkeypatch
):
    """Found by a mutation audit (each change failed no test): events serialised at once with nobody
    listening (issue 21 asks for JSON only when someone listens or the ring is read); a reader that left
    still subscribed (each event then queued for nobody, until the reader was counted as dropped)."""
    made: list[str] = []
    real_sse = m.sse

    def counted(event: dict[str, Any]) -> bytes:
        made.append(event["event"])
        return real_sse(event)

    monkeypatch.setattr(m, "sse", counted)
    r = await rig()
    events = r.broker.events
    for i in range(100):
        events.publish("quiet", n=i)
    assert made == []  # nobody listens: no JSON
    assert len([f for f in events.recent(900) if b"event: quiet" in f]) == 100
    assert made.count("quiet") == 100
    events.recent(900)
    assert made.count("quiet") == 100  # made once, kept
    async with r.session.get(r.url("/v1/events")) as one, r.session.get(r.url("/v1/events")) as two:
        for stream in (one, two):
            assert await stream.content.readline() == b": mgpumanager events\n"
        await until(lambda: len(events.subscribers) == 2)
        events.publish("heard", n=1)
        for stream in (one, two):
            assert (await _read_events(stream, "heard"))[-1]["n"] == 1
        assert made.count("heard") == 1  # one JSON for every reader
    await until(lambda: not events.subscribers)  # both readers left: nobody is written to any more
    for i in range(events.buffer + 1):
        events.publish("after", n=i)
    assert events.dropped == 0 and "after" not in made


async def test_shutdown_ends_every_event_stream_cleanly(rig):
    """Found by a mutation audit: with the end of each stream at shutdown taken out, no test failed; the
    reader (``mgpumanager.py events``, the dashboard) was then cut off at the end of the grace period, its
    answer broken off mid-stream, instead of ending as a stream ends."""
    r = await rig()
    async with r.session.get(r.url("/v1/events")) as stream:
        assert await stream.content.readline() == b": mgpumanager events\n"
        await until(lambda: len(r.broker.events.subscribers) == 1)
        await r.server.close()
        await asyncio.wait_for(stream.read(), 30)  # the whole chunked answer: no ClientPayloadError
        assert stream.content.at_eof()


# =====================================================================================================
# 10.2 Operations: reload
# POST /v1/reload and SIGHUP, with jobs, probes and reservations in flight.
# =====================================================================================================


class _BlockingSource:
    """A config source whose load blocks its thread until released (a file on a hung network mount)."""

    def __init__(self, source: m.ConfigSource) -> None:
        self.source, self.path = source, source.path
        self.entered, self.release = threading.Event(), threading.Event()
        self.released: list[bool] = []

    def load(self) -> m.Config:
        self.entered.set()
        self.released.append(self.release.wait(10))
        return self.source.load()


async def test_reload_applies_in_place_keeping_jobs_and_what_the_broker_knows(rig):
    gate = asyncio.Event()  # the llm job holds the GPU lock until it is set
    async with held_llm(gate) as ollama:
        r = await rig(sims={"mvoice": {"loaded": True}}, urls={"ollama": ollama.url})
        assert (await r.post("tts", {"text": "first"}))[0] == 200
        mvoice = r.broker.consumers.states["mvoice"]
        last_used = mvoice.last_used
        running = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
        await until(lambda: r.broker.scheduler.holder == "ollama")
        queued_tts = asyncio.ensure_future(r.post("tts", {"text": "queued"}))
        queued_image = asyncio.ensure_future(r.post("image", {"prompt": {}}))
        await until(lambda: len(r.broker.scheduler.queue()) == 2)

        r.broker.consumers.gone("whisper", "connection refused")
        raw = copy.deepcopy(r.raw)
        del raw["consumers"]["comfyui"], raw["routing"]["image"]
        raw["scheduler"]["max_queue"] = 1
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert resp.status == 200
            changes = ["removed comfyui", "changed scheduler", "changed routing"]
            assert await resp.json() == {"reloaded": True, "changes": changes}

        status, headers, body = await queued_image
        assert error_of(status, headers, body, "no_consumer")["consumer"] == "comfyui"
        assert not queued_tts.done() and not running.done()  # kept, in place
        assert mvoice.last_used == last_used and mvoice.resident is True  # unchanged: state kept
        assert r.broker.consumers.states["whisper"].healthy is False  # health kept too
        error_of(*await r.post("image", {"prompt": {}}), "no_consumer")  # no route for it any more
        status, headers, body = await r.post("stt", None, data=b"x")  # the new max_queue applies at once
        error_of(status, headers, body, "queue_full")
        gate.set()
        assert (await running)[0] == 200 and (await queued_tts)[0] == 200
    assert r.sims["comfyui"].records == []
    assert books_balance(r.broker.scheduler) and r.stats.failed == 1 and r.stats.rejected == 1


async def test_a_reload_that_moves_a_consumer_to_a_new_gpu_gives_that_gpu_a_queue(rig):
    gate = asyncio.Event()  # the llm job holds the GPU lock until it is set
    async with held_llm(gate) as ollama:
        r = await rig(gpus=2, sims={"comfyui": {"gpu": 1, "work_s": 0.02}}, urls={"ollama": ollama.url})
        assert list(r.broker.schedulers) == [0]
        running = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
        await until(lambda: r.broker.scheduler.holder == "ollama")
        queued_image = asyncio.ensure_future(r.post("image", {"prompt": {}}))
        await until(lambda: len(r.broker.scheduler.queue()) == 1)
        raw = copy.deepcopy(r.raw)
        raw["consumers"]["comfyui"]["gpu"] = 1
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert (await resp.json())["changes"] == ["new GPU for comfyui", "added GPU 1"]
        # The job queued on GPU 0 is answered (its consumer is elsewhere now) ...
        status, headers, body = await queued_image
        assert "was moved to GPU 1" in error_of(status, headers, body, "no_consumer")["message"]
        # ... and a new one runs on GPU 1 while GPU 0 is still held.
        assert (await r.post("image", {"prompt": {}}))[0] == 200
        assert not running.done() and r.broker.schedulers[1].stats.completed == 1
        gate.set()
        assert (await running)[0] == 200
    assert r.gpu.used_mib("comfyui") == 13000 and r.sims["comfyui"].gpu == 1


async def test_a_consumer_moves_to_another_gpu_only_while_none_of_its_jobs_runs(rig):
    gate = asyncio.Event()  # the llm job holds the GPU lock until it is set
    async with held_llm(gate) as ollama:
        r = await rig(gpus=2, urls={"ollama": ollama.url})
        running = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
        await until(lambda: r.broker.scheduler.holder == "ollama")
        raw = copy.deepcopy(r.raw)
        raw["consumers"]["ollama"]["gpu"] = 1
        raw["consumers"]["mvoice"]["can_coexist_with"] = ["whisper"]
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
        assert "consumers.ollama.gpu: ollama has a job running on GPU 0" in data["message"]
        assert r.broker.config is r.config and list(r.broker.schedulers) == [0]
        gate.set()
        assert (await running)[0] == 200
        async with r.session.post(r.url("/v1/reload")) as resp:  # idle now: the move is taken
            assert "new GPU for ollama" in (await resp.json())["changes"]
        assert r.broker.scheduler_for("ollama").index == 1


async def test_a_job_that_starts_while_a_reload_checks_its_urls_keeps_its_consumer_on_its_gpu(
    rig, monkeypatch
):
    """Found by the attack on issue 19's surfaces: a reload checked that no job of a consumer it moves to
    another GPU runs, then awaited the loop check of the URLs against the ports listened on (issue 19: names
    resolved in a thread, up to 2 s), then applied the move. A job that started in between ran on GPU 0
    while the consumer moved to GPU 1, whose lock let the next job work beside it. The move is checked
    after the URLs now, with nothing awaited before it is applied."""
    gate = asyncio.Event()  # the llm job holds the GPU lock until it is set
    checking, go_on = threading.Event(), threading.Event()
    real = m.loop_problems

    def slow(urls: Any, listeners: Any) -> Any:
        if any(port for (_, port), _ in listeners):  # the reload's check, against the ports bound
            checking.set()
            go_on.wait(20)
        return real(urls, listeners)

    async with held_llm(gate) as ollama:
        r = await rig(gpus=2, urls={"ollama": ollama.url})
        monkeypatch.setattr(m, "loop_problems", slow)
        raw = copy.deepcopy(r.raw)
        raw["consumers"]["ollama"]["gpu"] = 1
        raw["consumers"]["mvoice"]["can_coexist_with"] = ["whisper"]
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        reload = asyncio.ensure_future(r.session.post(r.url("/v1/reload")))
        try:
            await until(checking.is_set)
            running = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
            await until(lambda: r.broker.scheduler.holder == "ollama")
        finally:
            go_on.set()
        async with await reload as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
        assert "consumers.ollama.gpu: ollama has a job running on GPU 0" in data["message"]
        assert r.broker.scheduler_for("ollama").index == 0
        gate.set()
        assert (await running)[0] == 200


async def test_a_bad_config_is_refused_whole_and_the_old_one_stays(rig, caplog):
    r = await rig(sims={"mvoice": {"loaded": True}})
    raw = copy.deepcopy(r.raw)
    raw["scheduler"]["max_queu"] = 3
    raw["routing"]["image"] = "ghost"
    r.config_path.write_text(yaml.safe_dump(raw))
    async with r.session.post(r.url("/v1/reload")) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
    assert "scheduler.max_queu: unknown key" in data["message"] and "routing.image" in data["message"]
    assert 'msg="reload refused"' in caplog.text and "scheduler.max_queu: unknown key" in caplog.text
    # And on /v1/events (a mutation audit: the refusal's event was untested).
    [event] = [e for e in recent_events(r.broker.events) if e["event"] == "reload"]
    assert event["ok"] is False and any("scheduler.max_queu: unknown key" in p for p in event["problems"])
    assert r.broker.config is r.config
    assert (await r.post("tts", {"text": "still served"}))[0] == 200


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("nesting", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("bomb", _bomb(9), "aliases expand it beyond"),
        ("duplicate", "DUP", "found a duplicate key 'routing'"),
    ],
)
async def test_a_reload_that_meets_any_parser_failure_is_bad_config(rig, name, text, expected):
    """Item 6 of issue 10: 3 MB of brackets made POST /v1/reload answer 500, not bad_config."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    if text == "DUP":
        text = yaml.safe_dump(r.raw, sort_keys=False) + "routing: {}\n"
    r.config_path.write_text(text)
    async with r.session.post(r.url("/v1/reload")) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
    assert expected in data["message"] and r.broker.config is r.config
    assert (await r.post("tts", {"text": "still served"}))[0] == 200


async def test_a_reload_reads_the_config_without_blocking_the_loop_and_within_a_bound(rig, monkeypatch):
    """Item 6 of issue 10: the reload parsed in the event loop, while the watchdog allows 30 s."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    slow = _BlockingSource(r.broker.source)
    r.broker.source = slow
    reload = asyncio.ensure_future(r.session.post(r.url("/v1/reload")))
    await until(slow.entered.is_set)
    async with r.session.get(r.url("/healthz")) as resp:  # served while the config is being read
        assert resp.status == 200
    slow.release.set()
    async with await reload as resp:
        assert resp.status == 200 and (await resp.json())["reloaded"] is True
    assert slow.released == [True]  # released by the test, after /healthz: the loop was never blocked
    # A read that does not end is refused at CONFIG_READ_TIMEOUT_S, and the old config stays.
    monkeypatch.setattr(m, "CONFIG_READ_TIMEOUT_S", 0.2)
    stuck = _BlockingSource(r.broker.source.source)
    r.broker.source = stuck
    config = r.broker.config
    async with r.session.post(r.url("/v1/reload")) as resp:
        data = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
    assert "not read within 0.2 s" in data["message"] and r.broker.config is config
    stuck.release.set()


async def test_sighup_reloads_the_daemon(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon:
        raw = copy.deepcopy(r.raw)
        raw["consumers"]["mvoice"]["priority"] = 4
        daemon.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.until(r.session, lambda st: st["consumers"]["mvoice"]["priority"] == 4)
        daemon.config.write_text("consumers: {")
        daemon.proc.send_signal(signal.SIGHUP)
        await until(lambda: 'msg="reload refused"' in daemon.log_path.read_text())
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
            assert resp.status == 200  # the old config serves on
    assert daemon.proc.returncode == 0
    assert 'msg=reload changes="changed mvoice"' in daemon.log
    assert 'msg="reload refused"' in daemon.log and "not valid YAML" in daemon.log


def test_check_refuses_the_brokers_own_listener_in_any_spelling_and_urls_the_client_cannot_use(tmp_path):
    """Issue 19, items 3 and 6, as the issue found them: with the broker on 0.0.0.0 and no token, a consumer
    at http://[::ffff:127.0.0.1]:8770 (the broker itself) passed --check, and its mount then gave any LAN
    client the admin routes as loopback's; http://[::1 was a traceback (exit 1). Now every such URL is one
    line naming its key, exit 2, and the broker never starts with it."""
    port = free_port()
    raw = base_raw()
    raw["listen"] = f"0.0.0.0:{port}"
    bad = [u.replace("8770", str(port)) for u in LISTENER_SPELLINGS] + [u for u, _ in UNUSABLE_URLS]
    for i, url in enumerate(bad):
        raw["consumers"][f"f{i}"] = {
            "url": url,
            "health": {"path": "/"},
            "paths": {"x": {"path": "/x"}},
            "vram_resident_mib": 0,
        }
    config = tmp_path / "loops.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    for argv in (["--check"], []):
        res = subprocess.run(
            [PY, str(HERE / "mgpumanager.py"), *argv, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = res.stderr.splitlines()
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        keys = sorted(line.split(": ")[1] for line in lines)
        assert keys == sorted(f"consumers.f{i}.url" for i in range(len(bad))), res.stderr


async def test_a_reload_or_sighup_meeting_such_a_url_is_bad_config_never_a_crash(rig):
    """Issue 19, item 6: POST /v1/reload answered 500 scheduler_error (an internal error counted) and
    SIGHUP left "Task exception was never retrieved" in the log. Now bad_config, one problem each."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon:
        raw = copy.deepcopy(r.raw)
        raw["consumers"]["whisper"]["url"] = "http://[::1"
        raw["consumers"]["comfyui"]["url"] = "http://127.1:8188"
        raw["consumers"]["ollama"]["url"] = f"http://[::ffff:127.0.0.1]:{daemon.port}"  # the daemon itself
        daemon.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(daemon.url("/v1/reload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
        problems = data["message"].partition(": ")[2].split("; ")
        assert [p.partition(":")[0] for p in problems] == [
            "consumers.comfyui.url",
            "consumers.whisper.url",
            "consumers.ollama.url",
        ], problems
        assert f"listen's own address (127.0.0.1:{daemon.port})" in problems[2]
        daemon.proc.send_signal(signal.SIGHUP)
        await until(lambda: daemon.log_path.read_text().count('msg="reload refused"') == 2 * 3)
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
            assert resp.status == 200  # the old config serves on
        st = await daemon.status(r.session)
        assert st["scheduler"]["stats"]["internal_errors"] == 0
        assert st["consumers"]["ollama"]["url"] == r.raw["consumers"]["ollama"]["url"]
    assert "Traceback" not in daemon.log and "never retrieved" not in daemon.log, daemon.log


@pytest.mark.catches_bug
async def test_a_bug_in_a_sighup_reload_is_logged_and_counted_never_left_in_its_task(rig, caplog):
    """A reload that crashes (a bug, not a refused config) is what POST /v1/reload answers scheduler_error
    for; on SIGHUP nobody awaits the task, so it is logged and counted there, not left for asyncio to
    report as "Task exception was never retrieved"."""

    class Crashing:
        path = Path("crashing.yaml")

        def load(self) -> m.Config:
            raise RuntimeError("a bug in the loader")

    r = await rig()
    r.broker.source = Crashing()  # type: ignore[assignment]
    task = r.broker.spawn(r.broker.reload_logged(), "reload")
    await asyncio.wait_for(task, 10)
    assert task.exception() is None
    assert 'msg="internal error" during=reload' in caplog.text and "a bug in the loader" in caplog.text
    assert r.broker.internal_errors() == 1 and r.broker.config is r.config
    r.expected_internal_errors = 1


async def test_reload_gives_a_consumer_with_a_new_url_a_fresh_state(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    assert (await r.post("tts", {"text": "x"}))[0] == 200
    assert r.broker.consumers.states["mvoice"].last_used is not None
    raw = copy.deepcopy(r.raw)
    raw["consumers"]["mvoice"]["url"] = raw["consumers"]["mvoice"]["url"].replace("127.0.0.1", "localhost")
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert await r.broker.reload() == ["new url for mvoice"]
    state = r.broker.consumers.states["mvoice"]
    assert (state.resident, state.healthy, state.last_used) == (None, None, None)


async def test_a_reload_during_an_upload_is_no_consumer_and_the_books_balance(rig):
    r = await rig()
    reader, writer = await asyncio.open_connection(r.server.host, r.server.port)
    body = b'{"prompt": {}}'
    writer.write(
        f"POST /v1/image HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:3]
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    raw = copy.deepcopy(r.raw)
    del raw["consumers"]["comfyui"], raw["routing"]["image"]
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    await r.broker.reload()
    writer.write(body[3:])
    await writer.drain()
    head = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 404")
    assert books_balance(r.broker.scheduler) and r.stats.jobs == 0


async def test_a_reload_while_a_reservation_waits_for_the_gpu_keeps_it_waiting():
    """A reload answers the jobs of consumers it removed with no_consumer (``forget``); the reservation's
    job, whose "consumer" is no consumer of the config, was answered so too: `reserve` failed with
    "reservation was removed from the config" whenever a reload came while it waited."""
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    holding = await s.acquire("t", "kt")
    reserving = asyncio.ensure_future(s.reservations.reserve(60, "gaming"))
    await until(lambda: len(s.queue()) == 1)
    s.shared.config = small_config()  # a reload: the same consumers
    s.forget()
    holding.release("completed")
    res = await asyncio.wait_for(reserving, 5)
    assert s.reservation is res and s.holder == m.RESERVATION
    assert s.reservations.release() and s.holder is None and books_balance(s)


async def test_a_reload_during_the_probe_of_an_unhealthy_consumer_is_no_consumer_not_a_crash(rig):
    """A job for a consumer marked unhealthy probes it once more before it is queued; a reload that
    removed the consumer meanwhile made the handler look it up in the new config: KeyError, answered
    500 scheduler_error and counted as a bug (for /v1/<kind> and for /audio/ alike)."""
    r = await rig()
    for name in ("comfyui", "mvoice"):
        r.broker.consumers.states[name].seen_down("connection refused")
    gate, probing = asyncio.Event(), []
    real_probe_now = r.broker.consumers.probe_now

    async def slow_probe_now(name: str) -> None:
        await real_probe_now(name)  # it is back: healthy
        probing.append(name)
        await gate.wait()  # the reload comes before the job goes on

    r.broker.consumers.probe_now = slow_probe_now  # type: ignore[method-assign]
    image = asyncio.ensure_future(r.post("image", {"prompt": {}}))
    audio = asyncio.ensure_future(r.session.get(r.url("/audio/a.wav")))
    await until(lambda: sorted(probing) == ["comfyui", "mvoice"])
    raw = copy.deepcopy(r.raw)
    del (
        raw["consumers"]["comfyui"],
        raw["routing"]["image"],
        raw["consumers"]["mvoice"],
        raw["routing"]["tts"],
    )
    raw["routing"]["stt"], raw["audio_proxy"] = "whisper", None
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    await r.broker.reload()
    gate.set()
    error_of(*await image, "no_consumer")
    async with await audio as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "no_consumer")
    assert r.sims["comfyui"].records == [] and r.sims["mvoice"].records == []


async def test_a_reload_during_the_probe_that_takes_the_kind_from_the_consumer_does_not_wedge_the_gpu(rig):
    """As above, but the reload keeps the consumer and takes the job's kind from its paths: the job was
    admitted, granted the GPU, and then its path looked up (KeyError) before anything could end it, so the
    GPU stayed held for good."""
    r = await rig()
    r.broker.consumers.states["mvoice"].seen_down("connection refused")
    gate, probing = asyncio.Event(), []
    real_probe_now = r.broker.consumers.probe_now

    async def slow_probe_now(name: str) -> None:
        await real_probe_now(name)
        probing.append(name)
        await gate.wait()

    r.broker.consumers.probe_now = slow_probe_now  # type: ignore[method-assign]
    tts = asyncio.ensure_future(r.post("tts", {"text": "hi"}))
    await until(lambda: probing == ["mvoice"])
    raw = copy.deepcopy(r.raw)
    del raw["consumers"]["mvoice"]["paths"]["tts"], raw["routing"]["tts"]
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    await r.broker.reload()
    gate.set()
    error_of(*await tts, "no_consumer")
    assert r.broker.scheduler.holder is None and books_balance(r.broker.scheduler)
    assert (await r.post("stt", None, data=b"x"))[0] == 200  # the GPU is not wedged


async def test_a_mount_job_queued_before_a_reload_that_moves_its_consumer_is_taken_by_the_new_urls_rules(rig):
    """A mount job waiting for the GPU when a reload gives its consumer a new URL (a new service) goes to
    the new URL (``forget``), but only as the new config takes it: a path that is the new service's unload
    route is refused (403, nothing reaches it: it would free its model behind the broker's back), one that
    is a paths entry there (another kind, with its own hold) is no_consumer, to be sent again, and one the
    same to both goes on."""
    async with _ollama_at_work_and_a_new_mvoice(rig) as (r, new, service, gate, running):
        paths = ["/api/admin/shutdown", "/api/clone", "/api/synthesize"]
        queued = [asyncio.ensure_future(r.session.post(r.url("/c/mvoice" + p), json={})) for p in paths]
        await until(lambda: len(r.broker.scheduler.queue()) == 3)
        raw = copy.deepcopy(r.raw)
        mvoice = raw["consumers"]["mvoice"]
        mvoice["url"] = service.url
        mvoice["unload"] = {"method": "POST", "path": "/api/admin/shutdown"}
        mvoice["paths"]["clone"] = {"method": "POST", "path": "/api/clone"}
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert "new url for mvoice" in (await resp.json())["changes"]
        gate.set()
        assert (await running)[0] == 200
        answers = []
        for answer in queued:
            async with await answer as resp:
                answers.append((resp.status, dict(resp.headers), await resp.read()))
    refused = error_of(*answers[0], "forbidden")
    assert "/api/admin/shutdown is mvoice's unload route" in refused["message"]
    again = error_of(*answers[1], "no_consumer")
    assert "takes POST /api/clone otherwise at its new url" in again["message"]
    assert answers[2][0] == 200
    assert [rec.path for rec in new.records if rec.path in paths] == ["/api/synthesize"]
    assert not [rec.path for rec in r.sims["mvoice"].records if rec.path in paths]


# =====================================================================================================
# 10.3 Operations: the daemon, systemd and shutdown
# The daemon as a subprocess, notify, SIGTERM, the unit, make demo.
# =====================================================================================================


class NotifySocket:
    """A datagram socket standing in for systemd's: collects what the daemon sends to NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.address = str(path)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def without_watchdog(self) -> list[str]:
        return [msg for msg in self.drain() if msg != "WATCHDOG=1"]

    def close(self) -> None:
        self.sock.close()


async def test_daemon_subprocess_evicts_through_real_nvidia_smi_subprocess_and_stops_on_sigterm(rig):
    r = await rig(
        sims={
            "comfyui": {"loaded": True, "release_s": 0.1},
            "mvoice": {"loaded": False},
            "ollama": {"lines": 30, "line_interval_s": 0.05},
        }
    )
    daemon = Daemon(r.raw, r.tmp_path, sim_smi(r.state))
    async with daemon:
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "hi"}) as resp:
            assert resp.status == 200 and (await resp.read()).startswith(b"RIFF")
        assert (r.sims["comfyui"].unloads, r.sims["mvoice"].loads) == (1, 1)
        st = await daemon.status(r.session)
        assert st["scheduler"]["stats"]["evictions"] == 1 and st["gpu"]["total_mib"] == 16384
        assert r.gpu.used_mib("mvoice") == 2800 and r.gpu.used_mib("comfyui") == 0
        # In production too, a client that leaves while queued is dropped (handler_cancellation).
        async with r.session.post(daemon.url("/v1/llm"), json={"model": "m", "prompt": "p"}) as stream:
            await stream.content.readline()
            with pytest.raises(asyncio.TimeoutError):
                await r.session.post(
                    daemon.url("/v1/tts"), json={"text": "x"}, timeout=aiohttp.ClientTimeout(total=0.2)
                )
            stats = (await daemon.until(r.session, lambda st: st["scheduler"]["stats"]["cancelled"] == 1))[
                "scheduler"
            ]["stats"]
            assert stats["cancelled"] == 1 and stats["queued"] == 0 and not stream.content.at_eof()
            await stream.read()
        assert [rec.path for rec in r.sims["mvoice"].records].count("/api/synthesize") == 1
    assert daemon.proc.returncode == 0, daemon.log
    assert "msg=evicting consumer=comfyui for_consumer=mvoice" in daemon.log
    assert (
        "msg=job id=1 consumer=mvoice kind=tts status=completed" in daemon.log and "evictions=1" in daemon.log
    )


async def test_daemon_with_gpu_reader_nvml_evicts_through_nvml_readings_of_the_stub(rig, nvml_stub):
    """Issue 21, end to end: the daemon as a process, nvidia-ml-py finding the stub libnvidia-ml.so.1 by
    LD_LIBRARY_PATH, as it would the driver's; the stub answers from the simulated GPU the consumers
    allocate on. A swap is decided from NVML readings alone (nvidia-smi is not there to run); NVML is
    initialised once and shut down on exit."""
    r = await rig(sims={"comfyui": {"loaded": True, "release_s": 0.1}, "mvoice": {"loaded": False}})
    raw = copy.deepcopy(r.raw)
    raw["gpu"]["reader"] = "nvml"
    calls = r.tmp_path / "nvml.log"
    env = {
        "LD_LIBRARY_PATH": str(nvml_stub.parent),
        "MGPUSIM_STATE": str(r.state),
        "MGPUSIM_NVML_LOG": str(calls),
    }
    daemon = Daemon(raw, r.tmp_path, (str(r.tmp_path / "no-nvidia-smi"),), env)
    async with daemon:
        st = await daemon.status(r.session)
        assert st["gpu"]["reader"] == "nvml" and st["gpu"]["error"] is None
        assert (st["gpu"]["used_mib"], st["gpu"]["free_mib"]) == (13000, 16384 - 480 - 13000)
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "hi"}) as resp:
            assert resp.status == 200 and (await resp.read()).startswith(b"RIFF")
        assert (r.sims["comfyui"].unloads, r.sims["mvoice"].loads) == (1, 1)
        assert r.gpu.used_mib("mvoice") == 2800 and r.gpu.used_mib("comfyui") == 0
        st = await daemon.until(r.session, lambda st: st["gpu"]["used_mib"] == 2800)
        assert st["scheduler"]["stats"]["evictions"] == 1 and st["gpu"]["reader"] == "nvml"
    assert daemon.proc.returncode == 0, daemon.log
    assert 'msg="gpu reader" gpu=0 reader=nvml driver=mgpusim-stub' in daemon.log
    assert "msg=evicting consumer=comfyui for_consumer=mvoice" in daemon.log
    assert "no-nvidia-smi" not in daemon.log
    names = calls.read_text().split()
    assert names.count("nvmlInitWithFlags") == 1 and names[-1] == "nvmlShutdown"
    assert names.count("nvmlDeviceGetMemoryInfo_v2") >= 3  # the readings before and after the unload


async def test_daemon_with_a_hung_nvml_call_answers_gpu_unavailable_at_once_and_still_stops(rig, nvml_stub):
    """A driver fault hangs NVML: the daemon answers gpu_unavailable after query_timeout_s, then at once,
    goes on serving what needs no reading, and stops on SIGTERM as usual: the hung thread is left behind,
    never awaited (nor nvmlShutdown called into a hung NVML)."""
    r = await rig(sims={"mvoice": {"loaded": False}})
    raw = copy.deepcopy(r.raw)
    raw["gpu"].update(reader="nvml", query_timeout_s=1.0)
    env = {"LD_LIBRARY_PATH": str(nvml_stub.parent), "MGPUSIM_STATE": str(r.state)}
    daemon = Daemon(raw, r.tmp_path, (str(r.tmp_path / "no-nvidia-smi"),), env)
    async with daemon:
        assert (await daemon.status(r.session))["gpu"]["reader"] == "nvml"
        r.gpu.set_nvml_fault(hang=True)  # every NVML call blocks
        messages = []
        for _ in range(3):
            async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
                body = await resp.read()
                messages.append(error_of(resp.status, dict(resp.headers), body, "gpu_unavailable")["message"])
        assert "NVML did not answer within 1 s" in messages[0]
        assert all("NVML has not answered for" in msg for msg in messages[1:]), messages
        async with r.session.get(daemon.url("/healthz")) as resp:
            assert resp.status == 200
    assert daemon.proc.returncode == 0, daemon.log
    assert "NVML call hung: left to its thread" in daemon.log
    assert "NVML left without nvmlShutdown: a call hangs" in daemon.log


async def test_daemon_with_gpu_reader_auto_reads_through_nvidia_smi_where_nvml_does_not_load(
    rig, nvml_stub, tmp_path
):
    """Issue 21: auto falls back to nvidia-smi, and says why, when nvidia-ml-py is not installed (here: its
    import fails) or libnvidia-ml.so.1 is not found (where this machine has no driver's library)."""
    r = await rig(sims={"comfyui": {"loaded": True, "release_s": 0.1}, "mvoice": {"loaded": False}})
    raw = copy.deepcopy(r.raw)
    raw["gpu"]["reader"] = "auto"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "pynvml.py").write_text("raise ImportError('hidden by the test')\n")
    bare = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "MGPUSIM_STATE")}
    stub = {**bare, "LD_LIBRARY_PATH": str(nvml_stub.parent), "MGPUSIM_STATE": str(r.state)}
    cases = [({**stub, "PYTHONPATH": str(hidden)}, 'nvml="nvidia-ml-py is not installed')]
    try:
        ctypes.CDLL("libnvidia-ml.so.1")  # (the stub is not on this process's search path)
    except OSError:  # no driver's library on this machine: the daemon finds none either
        cases.append((bare, 'nvml="NVML nvmlInit: NVML Shared Library Not Found'))
    for env, why in cases:
        daemon = Daemon(raw, r.tmp_path, sim_smi(r.state))
        daemon.env = env  # (not added to this process's: LD_LIBRARY_PATH there would not be removed)
        async with daemon:
            assert (await daemon.status(r.session))["gpu"]["reader"] == "nvidia-smi"
            async with r.session.post(daemon.url("/v1/image"), json={"prompt": {}}) as resp:
                assert resp.status == 200
            async with r.session.post(daemon.url("/v1/tts"), json={"text": "hi"}) as resp:
                assert resp.status == 200
        assert 'msg="gpu reader" gpu=0 reader=nvidia-smi ' + why in daemon.log, daemon.log


def test_make_demo_shows_the_eviction_cycle(tmp_path):
    """`make demo` without a GPU: consumers, broker and nvidia-smi simulated, each its own process."""
    res = subprocess.run(
        [PY, str(HERE / "mgpusim.py"), "demo", "--once"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "msg=evicting consumer=mvoice for_consumer=comfyui" in out
    assert "msg=evicting consumer=comfyui for_consumer=mvoice" in out
    assert "/v1/status" in out and "/v1/tts" in out and "/v1/image" in out
    # Issue 22: a game arrives, the services make room for it, a TTS job meanwhile gets gpu_in_use, the game
    # ends, and mvoice comes back (each claim the demo prints is checked by the demo itself, too).
    game = out[out.index("A game starts") :]
    assert re.search(r'msg="stranger appeared" unclaimed_mib=\d+ ', game)
    assert game.index("msg=yielded consumer=mvoice") < game.index("msg=yielded consumer=ollama")
    assert "HTTP 503, Retry-After: 10: gpu_in_use: GPU 0 is in use by something else: 8192 MiB" in game
    assert game.index('msg="stranger gone"') < game.index("msg=restored consumer=mvoice")
    state = json.loads((tmp_path / "demo-run" / "state.json").read_text())
    assert state["version"] == 1 and set(state["consumers"]) == {"mvoice", "comfyui", "ollama"}  # (used ones)


def test_make_test_real_in_a_clone_without_the_sources_says_what_is_missing(tmp_path):
    """Issue 18: in a clone without ../shared/real, ``make test-real`` failed with a raw FileNotFoundError.
    It says which sources are missing (all of them at once) and names the variables that point at them,
    before building anything."""
    env = {
        **os.environ,
        "MGPU_REAL_CACHE": str(tmp_path / "cache"),
        "COMFYUI_SRC": str(tmp_path / "ComfyUI-v0.8.0.tar.gz"),
        "WHISPER_CPP_SRC": str(tmp_path / "whisper.cpp"),
    }
    res = subprocess.run(
        [PY, str(HERE / "test_real.py"), "install"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("install: ComfyUI v0.8.0's source is missing: ")
    assert f"{tmp_path / 'ComfyUI-v0.8.0.tar.gz'} does not exist. Set COMFYUI_SRC to" in lines[0]
    assert f"{tmp_path / 'whisper.cpp'} does not exist. Set WHISPER_CPP_SRC to" in lines[1]
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_the_unit_file_verifies_where_systemd_is_present():
    # Issue 19: systemd's soft default of 1024 descriptors; the broker raises its soft limit to this.
    assert "LimitNOFILE=65536" in (HERE / "mgpumanager.service").read_text().splitlines()
    # Issue 22: the state file's directory (consumers.yaml's state_file), the service user's own.
    assert "StateDirectory=mgpumanager" in (HERE / "mgpumanager.service").read_text().splitlines()
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    res = subprocess.run(
        [analyze, "verify", str(HERE / "mgpumanager.service")], capture_output=True, text=True
    )
    deployed = ("/opt/", "/usr/local/bin/mgpumanager ")  # (what make deploy installs is not here)
    problems = [
        line
        for line in res.stderr.splitlines()
        if "mgpumanager.service" in line and not any(path in line for path in deployed)
    ]
    assert res.returncode == 0 or not problems, res.stderr
    directives = [line.split("=")[0] for line in (HERE / "mgpumanager.service").read_text().splitlines()]
    assert "PrivateDevices" not in directives and "DevicePolicy" not in directives  # /dev/nvidia* stays


def test_the_unit_runs_the_byte_compiled_file_through_the_launcher(tmp_path):
    # By its path, Python compiles the file anew at every start, and the broker stays some 24 MiB larger
    # for its life: the unit runs the launcher make deploy installs, as the command line does.
    unit = (HERE / "mgpumanager.service").read_text().splitlines()
    assert "ExecStart=/usr/local/bin/mgpumanager --config /etc/mgpumanager/consumers.yaml" in unit
    makefile = (HERE / "Makefile").read_text()
    assert "install -m 0755 mgpumanager-cli /usr/local/bin/mgpumanager" in makefile
    launcher = makefile.split("define CLI_LAUNCHER\n", 1)[1].split("endef\n", 1)[0].replace("$$", "$")
    # make deploy's install, here: the file, then its byte code (as py_compile writes it under sudo).
    opt = tmp_path / "opt"
    opt.mkdir()
    source = opt / "mgpumanager.py"
    shutil.copy(HERE / "mgpumanager.py", source)
    py_compile.compile(str(source), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    # The source, made unrunnable without changing what the byte code's check compares (size, mtime): only
    # the byte code can start the broker now.
    st = source.stat()
    source.write_bytes(b"(" * st.st_size)
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    script = tmp_path / "mgpumanager"
    script.write_text(
        launcher.replace("/opt/mgpumanager", str(opt)).replace("/usr/bin/python3", sys.executable)
    )
    script.chmod(0o755)
    res = subprocess.run(
        [str(script), "--check", "--config", str(HERE / "consumers.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("listen 0.0.0.0:8770\n")
    by_path = subprocess.run(
        [sys.executable, str(source), "--check", "--config", str(HERE / "consumers.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert by_path.returncode == 1 and "SyntaxError" in by_path.stderr  # (the source really is unrunnable)


async def test_systemd_notify_ready_status_reload_watchdog_stopping_in_order(rig, tmp_path):
    r = await rig(sims={"mvoice": {"loaded": True, "work_s": 0.2}})
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "200000"}  # pings every 0.1 s
    try:
        async with Daemon(r.raw, r.tmp_path, sim_smi(r.state), env=env) as daemon:
            ready = notify.without_watchdog()
            assert len(ready) == 1 and ready[0].startswith("READY=1\nSTATUS=GPU idle, 0 queued")
            async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
                assert resp.status == 200
            await until(lambda: notify.without_watchdog()[-1].startswith("STATUS=GPU idle"))
            statuses = notify.without_watchdog()[1:]
            # mvoice is resident, so nothing read the GPU: free VRAM is not known yet.
            assert statuses[0] == "STATUS=mvoice holds the GPU, 0 queued, VRAM unknown", statuses
            daemon.proc.send_signal(signal.SIGHUP)
            await until(lambda: "READY=1" in notify.without_watchdog())
            reload = notify.without_watchdog()[1 + len(statuses) :]
            reload = reload[
                [msg.startswith("RELOADING=1") for msg in reload].index(True) :
            ]  # (a late STATUS)
            assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and reload[1] == "READY=1"
            await until(lambda: notify.drain().count("WATCHDOG=1") >= 5)  # a ping every 0.1 s
        final = notify.without_watchdog()
        assert final[-1] == "STOPPING=1"
        assert notify.messages.count("WATCHDOG=1") >= 5
    finally:
        notify.close()


def test_notify_speaks_the_abstract_socket_form_and_is_silent_without_a_socket():
    name = f"mgpumanager-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = m.Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
        assert notifier.send("READY=1") and sock.recv(100) == b"READY=1"
        assert notifier.watchdog_s is None  # WATCHDOG_PID names another process
        # (A mutation audit: neither was tested.) STATUS= goes only when it changed, and the watchdog is
        # pinged at half its interval, as sd_watchdog_enabled(3) asks.
        notifier.set_status("GPU idle")
        notifier.set_status("GPU idle")
        sock.setblocking(False)
        assert sock.recv(100) == b"STATUS=GPU idle"
        with pytest.raises(BlockingIOError):
            sock.recv(100)
    assert m.Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}).watchdog_s == 15
    silent = m.Notifier({})
    assert not silent.send("READY=1") and silent.errors == 0 and silent.watchdog_s is None
    assert m.Notifier({"NOTIFY_SOCKET": "/nonexistent/socket"}).send("READY=1") is False


async def test_sigterm_drains_the_queue_lets_the_running_job_finish_and_exits_0(rig):
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(sims={"mvoice": {"loaded": True}}, urls={"ollama": ollama.url})
        daemon = Daemon(r.raw, r.tmp_path, sim_smi(r.state))
        async with daemon:
            running = asyncio.ensure_future(r.session.post(daemon.url("/v1/llm"), json={"model": "m"}))
            await daemon.until(r.session, lambda st: st["scheduler"]["holder"])
            queued = asyncio.ensure_future(r.session.post(daemon.url("/v1/tts"), json={"text": "x"}))
            await daemon.until(r.session, lambda st: len(st["scheduler"]["queue"]) == 1)
            daemon.terminate()
            resp = await asyncio.wait_for(queued, 10)
            error_of(resp.status, dict(resp.headers), await resp.read(), "shutting_down")
            # A SIGHUP while it drains reloads nothing (it reloaded what shutdown was closing).
            daemon.proc.send_signal(signal.SIGHUP)
            await until(lambda: "reload ignored" in daemon.log_path.read_text())
            with pytest.raises(aiohttp.ClientConnectionError):  # it no longer accepts connections
                async with aiohttp.ClientSession() as fresh:
                    await fresh.get(daemon.url("/healthz"))
            assert daemon.proc.returncode is None  # still finishing the running job
            gate.set()
            resp = await asyncio.wait_for(running, 10)
            assert resp.status == 200 and await resp.json() == {"response": "done"}
        assert daemon.proc.returncode == 0
        assert "msg=stopping" in daemon.log and "msg=stopped" in daemon.log
        assert "code=shutting_down" in daemon.log
        assert (
            "msg=reload " not in daemon.log and 'msg="reload ignored: the broker is stopping"' in daemon.log
        )


async def test_shutdown_waits_for_a_hold_but_not_longer_than_shutdown_timeout_s(rig):
    def quick(raw):
        raw["scheduler"]["shutdown_timeout_s"] = 1.0

    r = await rig(total_mib=40000)  # shutdown_timeout_s 30: the hold ends long before
    r.sims["comfyui"].may_finish.clear()  # the render, and so the hold, ends when the test says
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon:
        async with r.session.post(daemon.url("/v1/image"), json={"prompt": {}}) as resp:
            assert resp.status == 200
        daemon.terminate()
        await until(lambda: "shutting down: waiting for running jobs" in daemon.log_path.read_text())
        assert daemon.proc.returncode is None  # waiting for the hold
        r.sims["comfyui"].may_finish.set()
    assert daemon.proc.returncode == 0
    assert daemon.log.index('msg="hold released"') < daemon.log.index("msg=stopped")
    assert "cutting what still runs" not in daemon.log  # (the hold ended in time)

    gate = asyncio.Event()  # never set: this job outlives shutdown_timeout_s
    async with held_llm(gate) as ollama:
        r2 = await rig(urls={"ollama": ollama.url}, tweak=quick)
        daemon = Daemon(r2.raw, r2.tmp_path, sim_smi(r2.state))
        async with daemon:
            stuck = asyncio.ensure_future(r2.session.post(daemon.url("/v1/llm"), json={"model": "m"}))
            await daemon.until(r2.session, lambda st: st["scheduler"]["holder"])
            daemon.terminate()
        assert daemon.proc.returncode == 0
        assert "shutting down: cutting what still runs" in daemon.log
        with contextlib.suppress(aiohttp.ClientError):
            await stuck


# =====================================================================================================
# 10.4 Operations: admin unload and load, reserving the GPU
# /v1/consumers/*, POST/DELETE /v1/reserve.
# =====================================================================================================


async def _reserve(r: Rig, **body: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with r.session.post(r.url("/v1/reserve"), json=body) as resp:
        return resp.status, dict(resp.headers), await resp.json()


def _record_raising_once(s: m.Scheduler, fact: str) -> Any:
    """The scheduler's recorder, except that its first record of ``fact`` raises RuntimeError."""
    return _raising_once(s.recorder.record, lambda name, *_: name == fact)


#: Each step of a reservation's life after its grant, and how to make it raise once (a bug there).
RESERVATION_STEPS = {
    "refusing the queue": lambda s, mp: mp.setattr(s.lock, "refuse", _raising_once(s.lock.refuse)),
    "starting its unloads": lambda s, mp: mp.setattr(s, "own", _raising_once(s.own)),
    "its end, released": lambda s, mp: mp.setattr(
        s.recorder, "record", _record_raising_once(s, "reservation_ended")
    ),
    "its end, expired": lambda s, mp: mp.setattr(
        s.recorder, "record", _record_raising_once(s, "reservation_ended")
    ),
}


async def test_admin_routes_answer_only_loopback_without_a_token(rig):
    r = await rig(sims={"mvoice": {"loaded": True}}, remote="192.0.2.7")
    async with r.session.post(r.url("/v1/consumers/mvoice/unload")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")
    async with r.session.post(r.url("/v1/reload")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")
    assert r.sims["mvoice"].unloads == 0
    # With a token, the token is what counts, wherever the client is.
    r2 = await rig(sims={"mvoice": {"loaded": True}}, remote="192.0.2.7", tweak=with_token)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with r2.session.post(r2.url("/v1/consumers/mvoice/unload"), headers=headers) as resp:
        assert resp.status == 200 and (await resp.json())["loaded"] is False


async def test_admin_routes_without_a_token_refuse_pages_of_other_origins_and_names_not_the_brokers(rig):
    """Loopback is not enough where a browser runs on the broker's machine: any page it shows could POST to
    127.0.0.1 (a form's text/plain POST needs no preflight), and a page of a name made to point at
    127.0.0.1 (DNS rebinding) sends its own Host and Origin. Both reserved the GPU for a week, unloading
    every consumer, and reloaded the config."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    own = r.url("/").split("/")[2]  # 127.0.0.1:port
    port = own.rpartition(":")[2]
    cases = [
        ({"Origin": "https://attacker.example", "Content-Type": "text/plain"}, "web pages of other origins"),
        ({"Origin": "null"}, "web pages of other origins"),  # a sandboxed frame, a file
        ({"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}, "own names"),
        ({"Host": "evil.example"}, "own names"),
    ]
    routes = [
        ("POST", "/v1/consumers/mvoice/unload"),
        ("POST", "/v1/reload"),
        ("POST", "/v1/reserve"),
        ("DELETE", "/v1/reserve"),
    ]
    for headers, why in cases:
        for method, path in routes:
            body = b'{"for_s": 604800, "reason": "csrf"}'
            async with r.session.request(method, r.url(path), headers=headers, data=body) as resp:
                error = error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")
                assert why in error["message"], (method, path, error)
    assert r.sims["mvoice"].unloads == 0 and r.broker.scheduler.reservation is None
    # The broker's own page, a script (no Origin) and a name of the broker's own are let in (0.0.0.0 and
    # [::] among them: they connect to loopback).
    for host in (f"0.0.0.0:{port}", f"[::]:{port}", f"127.0.0.1.:{port}", f"[::1]:{port}"):
        async with r.session.post(r.url("/v1/reload"), headers={"Host": host}) as resp:
            assert resp.status == 200, (host, await resp.text())
    async with r.session.post(
        r.url("/v1/consumers/mvoice/unload"), headers={"Origin": f"http://{own}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
    async with r.session.post(
        r.url("/v1/consumers/mvoice/load"), headers={"Host": f"localhost:{port}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
    async with r.session.post(r.url("/v1/reload")) as resp:
        assert resp.status == 200, await resp.text()
    assert r.sims["mvoice"].unloads == 1 and r.sims["mvoice"].loads == 1


async def test_admin_unload_and_load_go_through_the_lock(rig):
    r = await rig(sims={"mvoice": {"loaded": True}, "ollama": {"lines": 20, "line_interval_s": 0.03}})
    async with r.session.post(r.url("/v1/llm"), json={"model": "m", "prompt": "p"}) as stream:
        await stream.content.readline()
        unload = asyncio.ensure_future(r.session.post(r.url("/v1/consumers/mvoice/unload")))
        await until(lambda: len(r.broker.scheduler.queue()) == 1)
        assert r.sims["mvoice"].unloads == 0  # waits for the running job: never races it
        await stream.read()
    resp = await unload
    assert resp.status == 200
    assert await resp.json() == {"consumer": "mvoice", "action": "unload", "loaded": False, "evictions": 0}
    assert r.sims["mvoice"].unloads == 1 and r.stats.admin_unloads == 1 and r.stats.evictions == 0
    # Warm-up: comfyui fills the GPU (once ollama let its model go), so loading mvoice evicts it first.
    for model in list(r.sims["ollama"].models):
        await r.sims["ollama"].unload_model(model)
    await r.sims["comfyui"].do_load()
    r.broker.consumers.states["comfyui"].loaded()
    async with r.session.post(r.url("/v1/consumers/mvoice/load")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"consumer": "mvoice", "action": "load", "loaded": True, "evictions": 1}
    assert r.sims["mvoice"].loads == 1 and r.sims["comfyui"].unloads == 1
    async with r.session.post(r.url("/v1/consumers/ghost/unload")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "no_consumer")
    async with r.session.post(r.url("/v1/consumers/whisper/unload")) as resp:
        assert (
            "no unload route"
            in error_of(resp.status, dict(resp.headers), await resp.read(), "bad_request")["message"]
        )
    r.sims["mvoice"].faults["unload_status"] = 500
    async with r.session.post(r.url("/v1/consumers/mvoice/unload")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "unload_failed")
    assert r.broker.scheduler.holder is None


async def test_an_admin_operation_holds_the_lock_alone():
    s, _, ops, _ = make_scheduler(small_config(consumers__t__max_concurrency=3))
    for name in ops.states:
        ops.states[name].loaded()
    ops.unload_behaviour["t"] = "gated"
    unload = asyncio.ensure_future(s.unload_now("t"))
    await asyncio.sleep(0)
    t = await _queued(s, "t")
    assert s.holder == "t" and s.exclusive and s.slots == 1 and not t.done()  # no job of t joins
    unload.cancel()  # the admin's client leaves: the unload it asked for still runs to its end
    await asyncio.gather(unload, return_exceptions=True)
    await asyncio.sleep(0)
    assert s.holder == "t" and s.exclusive and not t.done()
    ops.gate.set()
    job = await asyncio.wait_for(t, 5)
    assert ops.calls == [("unload", "t"), ("load", "t")]  # the unload ran whole; t's job then loads it
    assert s.stats.admin_unloads == 1 and s.stats.cancelled == 1
    job.release("completed")
    assert books_balance(s)


async def test_an_admin_unload_never_joins_its_consumers_running_job():
    s, _, ops, _ = make_scheduler(small_config(consumers__t__max_concurrency=3))
    for name in ops.states:
        ops.states[name].loaded()
    job = await s.acquire("t", "kt")
    unload = asyncio.ensure_future(s.unload_now("t"))
    for _ in range(10):
        await asyncio.sleep(0)
    assert ops.calls == [] and not unload.done()  # t's job still runs: the unload waits for the lock alone
    job.release("completed")
    await asyncio.wait_for(unload, 5)
    assert ops.calls == [("unload", "t")]


async def test_a_reservation_unloads_everything_refuses_gpu_jobs_and_ends_when_released(rig):
    r = await rig(sims={"mvoice": {"loaded": True}, "comfyui": {"loaded": True}})
    events = await r.session.get(r.url("/v1/events"))
    status, _, answer = await _reserve(r, for_s=3600, reason="gaming")
    assert status == 200 and answer["gpu"] == 0 and answer["reason"] == "gaming"
    assert 3590 < answer["left_s"] <= 3600 and answer["until"].endswith("Z")
    assert answer["unloaded"] == ["mvoice", "comfyui"]  # every consumer with an unload, resident or not
    assert answer["not_unloaded"] == {"ollama": "no unload route", "whisper": "no unload route"}
    assert r.sims["mvoice"].unloads == 1 and r.sims["comfyui"].unloads == 1
    # GPU jobs are refused at once, saying why and for how long; unscheduled calls still pass.
    status, headers, body = await r.post("tts", {"text": "x"})
    data = error_of(status, headers, body, "gpu_reserved")
    assert "reserved (gaming)" in data["message"] and 3590 <= int(headers["Retry-After"]) <= 3600
    async with r.session.post(r.url("/c/comfyui/prompt"), json={"prompt": {}}) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "gpu_reserved")
    async with r.session.get(r.url("/c/comfyui/queue")) as resp:
        assert resp.status == 200
    st = await r.status()
    assert st["gpus"][0]["reservation"]["reason"] == "gaming" and st["gpu"]["reservation"] is not None
    assert st["scheduler"]["holder"]["consumer"] == "reservation"
    text = await (await r.session.get(r.url("/metrics"))).text()
    assert 'mgpumanager_gpu_reserved{gpu="0"} 1' in text
    # A reservation's unloads are admin unloads, not idle ones (a mutation audit: counting them as idle
    # failed no test).
    assert 'mgpumanager_admin_unloads_total{consumer="mvoice"} 1' in text
    assert "mgpumanager_idle_unloads_total{" not in text
    reserved = (await _read_events(events, "reserved"))[-1]
    assert reserved["reason"] == "gaming" and reserved["for_s"] == 3600 and reserved["gpu"] == 0
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert await resp.json() == {"gpu": 0, "released": True, "gpus": [0], "cancelled": []}
    ended = (await _read_events(events, "reservation_ended"))[-1]
    assert ended["why"] == "released" and ended["gpu"] == 0
    events.close()
    assert (await r.post("tts", {"text": "x"}))[0] == 200  # served again at once
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert (await resp.json())["released"] is False  # nothing to release


async def test_a_reservation_unloads_vram_managed_ollama_too(rig):
    """Ollama runs its own model LRU and is never unloaded for a job while something else can go; a
    reservation asks it to let go all the same, through its /api/ps list, like `ollama stop`."""
    r = await rig(tweak=use_presets)
    sim = r.sims["ollama"]
    assert (await r.post("llm", {"model": "llama3", "prompt": "why", "stream": False}))[0] == 200
    assert list(sim.models) == ["llama3"] and r.gpu.used_mib("ollama") == 8000
    status, _, answer = await _reserve(r, for_s=60, reason="gaming")
    assert status == 200 and "ollama" in answer["unloaded"]
    assert answer["not_unloaded"] == {"whisper": "no unload route"}
    unloads = [json.loads(rec.body) for rec in sim.records if rec.path == "/api/generate"][1:]
    assert unloads == [{"model": "llama3", "keep_alive": 0}] and sim.models == {}
    assert r.gpu.used_mib("ollama") == 0
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert (await resp.json())["released"] is True


async def test_a_reservation_waits_for_the_gpu_refuses_the_queue_expires_and_survives_a_reload(rig):
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(urls={"ollama": ollama.url}, sims={"mvoice": {"loaded": True}})
        llm = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "holds the GPU"}))
        await until(lambda: r.broker.scheduler.holder == "ollama")
        queued = asyncio.ensure_future(r.post("tts", {"text": "waits"}))
        await until(lambda: len(r.broker.scheduler.queue()) == 1)
        reserving = asyncio.ensure_future(_reserve(r, for_s=0.5, reason="backup"))
        await until(lambda: len(r.broker.scheduler.queue()) == 2)
        assert not reserving.done()  # like an admin operation: after the running job
        gate.set()
        assert (await llm)[0] == 200
        status, _, answer = await reserving
        assert status == 200 and answer["unloaded"] == ["mvoice", "comfyui"]
        error_of(*await queued, "gpu_reserved")  # the job that waited is answered, not kept
        # A reload keeps the reservation.
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert resp.status == 200
        assert r.broker.scheduler.reservation is not None
        await until(lambda: r.broker.scheduler.reservation is None)  # it expires on its own
        assert (await r.post("tts", {"text": "x"}))[0] == 200
    ended = [e for e in recent_events(r.broker.events) if e["event"] == "reservation_ended"]
    assert [e["why"] for e in ended] == ["expired"]


async def test_a_reservation_that_cannot_unload_something_says_so_and_still_holds_the_gpu(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    r.sims["mvoice"].faults["unload_status"] = 500
    status, _, answer = await _reserve(r, for_s=60, reason="training")
    assert status == 200 and answer["unloaded"] == ["comfyui"]
    assert answer["not_unloaded"]["mvoice"].startswith("unload failed: unload answered 500")
    assert r.broker.scheduler.reservation.to_restore == []  # mvoice never went: its end loads nothing
    error_of(*await r.post("tts", {"text": "x"}), "gpu_reserved")
    # Asking again extends it (from now, with the new reason); no second wait, no second unload.
    status, _, again = await _reserve(r, for_s=7200, reason="a longer run")
    assert status == 200 and again["reason"] == "a longer run" and again["left_s"] > 7000
    assert [rec.path for rec in r.sims["comfyui"].records].count("/free") == 1  # asked once, not again
    for bad in ({}, {"for_s": 0}, {"for_s": "1h"}, {"for_s": 10, "gpu": 7}, {"for_s": 10, "reason": 3}):
        status, _, data = await _reserve(r, **bad)
        assert status == 400 and data["error"] == "bad_request", bad


async def test_a_gpu_that_is_no_integer_of_the_brokers_is_refused_not_taken_for_another(rig):
    """A hostile body or query: ``gpu`` 0.9 and -0.5 were GPU 0, Infinity a scheduler_error (500), and
    ``?gpu= 0`` or ``0_0`` GPU 0 again. Each is bad_request now, and nothing is reserved or released."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    for gpu in (0.9, -0.5, math.inf, -math.inf, math.nan, "0", True, [0], {"index": 0}):
        status, _, data = await _reserve(r, for_s=60, gpu=gpu)
        assert status == 400 and data["error"] == "bad_request" and "no GPU" in data["message"], gpu
    assert r.broker.scheduler.reservation is None and r.sims["mvoice"].records == []
    assert (await _reserve(r, for_s=60, gpu=0))[0] == 200
    for query in (" 0", "0_0", "+0", "0.0", "\u0660", "inf", "", "abc", "99999999999999999999"):
        async with r.session.delete(r.url("/v1/reserve"), params={"gpu": query}) as resp:
            error_of(resp.status, dict(resp.headers), await resp.read(), "bad_request")
    assert r.broker.scheduler.reservation is not None
    async with r.session.delete(r.url("/v1/reserve"), params={"gpu": "0"}) as resp:
        assert await resp.json() == {"gpu": 0, "released": True, "gpus": [0], "cancelled": []}


async def test_a_reserve_body_with_a_key_it_does_not_take_is_refused_not_half_taken(rig):
    """Found by the attack on issue 19's surfaces: api.md says ``POST /v1/reserve`` takes for_s, reason, gpu
    and restore, "anything else is bad_request", but a key of another name was ignored: ``{"for_s": 60,
    "gpus": 1}`` reserved the default GPU 0 and left GPU 1 to the game, ``"restor": false`` restored all
    the same. Such a body is refused, naming the key, and nothing is reserved."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    for body in ({"for_s": 60, "gpus": 1}, {"for_s": 60, "restor": False}, {"for_s": 60, "Reason": "x"}):
        status, _, data = await _reserve(r, **body)
        assert status == 400 and data["error"] == "bad_request", (body, data)
        (unknown,) = set(body) - {"for_s"}
        assert repr(unknown) in data["message"], data
    assert r.broker.scheduler.reservation is None and r.sims["mvoice"].records == []
    assert (await _reserve(r, for_s=60, reason="x", gpu=0, restore=False))[0] == 200


async def test_reservations_are_per_gpu_and_end_with_the_broker(rig):
    def two_gpus(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["gpu"] = 1

    r = await rig(gpus=2, tweak=two_gpus, sims={"comfyui": {"gpu": 1}})
    status, _, answer = await _reserve(r, for_s=60, gpu=1)
    assert status == 200 and answer["gpu"] == 1 and answer["unloaded"] == ["comfyui"]
    error_of(*await r.post("image", {"prompt": {}}), "gpu_reserved")  # GPU 1's consumer
    assert (await r.post("tts", {"text": "x"}))[0] == 200  # GPU 0 serves on
    st = await r.status()
    assert [g["reservation"] is not None for g in st["gpus"]] == [False, True]
    async with r.session.delete(r.url("/v1/reserve?gpu=0")) as resp:
        assert await resp.json() == {"gpu": 0, "released": False, "gpus": [], "cancelled": []}
    # The broker stopping ends it (a restart does not restore it): the drain does not wait for it.
    await r.server.close()
    assert r.broker.schedulers[1].reservation is None
    ended = [e for e in recent_events(r.broker.events) if e["event"] == "reservation_ended"]
    assert [e["why"] for e in ended] == ["shutdown"]


async def test_the_default_gpu_is_gpu_index_where_that_is_not_the_lowest(rig):
    """gpu.index 1 with comfyui on GPU 0: the default GPU is GPU 1, not the lowest index. Status's
    single-GPU fields ``gpu`` and ``scheduler`` are GPU 1's (its reading, its jobs), and a reservation
    that names no GPU reserves GPU 1: mvoice's, not comfyui's. (Every other test's default GPU was GPU 0,
    the lowest: status showing the lowest GPU's, or reserve defaulting to it, failed no test.)"""

    def default_gpu_1(raw: dict[str, Any]) -> None:
        raw["gpu"]["index"] = 1
        raw["consumers"]["comfyui"]["gpu"] = 0

    sims = {name: {"gpu": 1} for name in ("ollama", "whisper")} | {"mvoice": {"gpu": 1, "loaded": True}}
    r = await rig(gpus=2, tweak=default_gpu_1, sims=sims | {"comfyui": {"gpu": 0}})
    assert (await r.post("tts", {"text": "x"}))[0] == 200  # mvoice, on GPU 1
    await until(lambda: r.broker.schedulers[1].holder is None)
    st = await r.status()
    by_index = {g["index"]: g for g in st["gpus"]}
    assert (st["gpu"]["index"], st["gpu"]["uuid"]) == (1, mgpusim.gpu_uuid(1))
    assert (st["gpu"]["used_mib"], by_index[0]["used_mib"]) == (2800, 0)  # GPU 1's reading: mvoice's
    assert [p["name"] for p in st["gpu"]["processes"]] == [mgpusim.MvoiceSim.process_name]
    assert by_index[0]["consumers"] == ["comfyui"]
    assert st["scheduler"] == by_index[1]["scheduler"]
    assert (st["scheduler"]["stats"]["completed"], by_index[0]["scheduler"]["stats"]["completed"]) == (1, 0)
    status, _, answer = await _reserve(r, for_s=60)
    assert status == 200 and answer["gpu"] == 1 and answer["unloaded"] == ["mvoice"]
    assert r.broker.schedulers[0].reservation is None and r.broker.schedulers[1].reservation is not None
    assert r.sims["comfyui"].unloads == 0
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert (await resp.json())["gpus"] == [1]


async def test_a_release_while_the_reservation_unloads_unloads_nothing_more():
    """DELETE /v1/reserve while the reservation still unloads gives the GPU back at once: a job of a
    consumer known resident goes, and the reservation must not unload that consumer under it."""
    s, gpu, ops, _ = make_scheduler(small_config())
    for name in ("t", "x", "y", "z"):
        ops.states[name].loaded()
        gpu.held[name] = 3000
    gate, started = _gated_unloads(ops, "t")
    reserving = asyncio.ensure_future(s.reservations.reserve(60, "gaming"))
    await until(lambda: started == ["t"])  # t's unload is under way
    assert s.reservations.release()
    job = await asyncio.wait_for(s.acquire("x", "kx"), 5)  # x is known resident: it runs at once
    gate.set()
    await reserving
    assert ops.calls == [("unload", "t")] and gpu.held.get("x") == 3000
    assert ops.states["x"].resident is True and s.holder == "x"
    job.release("completed", status=200, success=True)
    assert s.holder is None and books_balance(s)


async def test_a_reservation_extended_while_it_unloads_leaves_no_timer_behind_to_end_the_next_one():
    """Asked again while its unloads run, a reservation got a second expiry timer, and the first one was
    lost: released, then reserved anew, the GPU was given back by the stale timer long before the new
    reservation's end."""
    s, _, ops, _ = make_scheduler(small_config())
    gate, _ = _gated_unloads(ops)
    first = asyncio.ensure_future(s.reservations.reserve(60, "backup"))
    await until(lambda: s.reservation is not None)
    await s.reservations.reserve(0.05, "a short one")  # extended while it unloads
    gate.set()
    await first
    assert s.reservations.release()
    second = await s.reservations.reserve(3600, "gaming")
    await asyncio.sleep(0.2)  # the extension's timer would have fired by now
    assert s.reservation is second and s.holder == m.RESERVATION
    ended = [e for e in recent_events(s.events) if e["event"] == "reservation_ended"]
    assert [e["why"] for e in ended] == ["released"]
    assert s.reservations.release() and s.holder is None and books_balance(s)


async def test_no_timer_of_a_reservation_extended_or_released_ends_the_one_in_force_later():
    """A reservation's expiry timer is the one for the end it has now, and none outlives it: extended, its
    old timer is cancelled; released (after its unloads, or while they ran), no timer is left to fire later
    and end the next reservation (a mutation audit: an extension or a release that left the old timer, and
    a reservation released while it unloaded that still set one, failed no test)."""
    s, _, ops, _ = make_scheduler(small_config())
    short = 0.05  # each timer left behind would fire within it

    async def still_in_force(res: m.Reservation) -> None:
        await asyncio.sleep(4 * short)  # (past every short timer: what is asserted is that none fired)
        assert s.reservation is res and s.holder == m.RESERVATION

    first = await s.reservations.reserve(short, "a short one")
    assert await s.reservations.reserve(3600, "extended") is first
    await still_in_force(first)
    assert s.reservations.release()
    await s.reservations.reserve(short, "released at once")
    assert s.reservations.release()
    second = await s.reservations.reserve(3600, "the next one")
    await still_in_force(second)
    assert s.reservations.release()
    gate, started = _gated_unloads(ops)
    unloading = asyncio.ensure_future(s.reservations.reserve(short, "released while it unloads"))
    await until(lambda: started)
    assert s.reservations.release()
    gate.set()
    await unloading
    third = await s.reservations.reserve(3600, "the one after")
    await still_in_force(third)
    ended = [e["why"] for e in recent_events(s.events) if e["event"] == "reservation_ended"]
    assert ended == ["released"] * 4
    assert s.reservations.release() and s.holder is None and books_balance(s)


async def test_a_reservation_shortened_while_it_unloads_ends_when_its_new_end_says():
    """Asked again while its unloads run, for less time than first asked: the timer set once the unloads
    are done is for the end the reservation has now, not the one it was first asked for (a mutation audit:
    a timer for the first ``for_s`` failed no test)."""
    s, _, ops, _ = make_scheduler(small_config())
    gate, started = _gated_unloads(ops)
    reserving = asyncio.ensure_future(s.reservations.reserve(3600, "a long backup"))
    await until(lambda: started)
    assert await s.reservations.reserve(0.05, "only a short one") is s.reservation
    gate.set()
    res = await reserving
    assert res.reason == "only a short one"
    await until(lambda: s.reservation is None)  # it expires on its own, 0.05 s after it was asked again
    ended = [e["why"] for e in recent_events(s.events) if e["event"] == "reservation_ended"]
    assert ended == ["expired"] and s.holder is None and books_balance(s)


@pytest.mark.catches_bug
@pytest.mark.parametrize("step", list(RESERVATION_STEPS))
async def test_whatever_raises_while_a_reservation_holds_the_gpu_it_ends_and_frees_its_slot(
    step, monkeypatch
):
    """The scheduler's invariant for the reservation's job: a failure injected after its grant (answering
    the queue, starting its unloads, recording its end by DELETE or by its timer) ends it once and frees
    the GPU; before, the GPU stayed held by a reservation nobody could release."""
    s, _, ops, _ = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    holding = await s.acquire("t", "kt")
    reserving = asyncio.ensure_future(
        s.reservations.reserve(0.05 if step == "its end, expired" else 60, "gaming")
    )
    waiting = await _queued(s, "x")  # answered gpu_reserved by the reservation, or served after it
    RESERVATION_STEPS[step](s, monkeypatch)
    holding.release("completed")
    try:
        await reserving
    except m.BrokerError as e:
        assert e.code == "scheduler_error" and step in ("refusing the queue", "starting its unloads")
    else:
        if step == "its end, released":
            s.reservations.release()
    await until(lambda: s.holder != m.RESERVATION)
    assert s.reservation is None and s.shared.internal_errors == 1
    with contextlib.suppress(m.BrokerError):
        (await asyncio.wait_for(waiting, 5)).release("completed")
    for _ in range(3):
        await asyncio.sleep(0)  # the accounting runs after the hand-over
    assert (s.holder, s.slots, s.holds) == (None, 0, 0)
    assert all(s.jobs_of(name) == 0 for name in ops.states) and books_balance(s)
    again = await s.acquire("y", "ky")  # the GPU is not wedged
    again.release("completed")
    assert s.holder is None and books_balance(s)


@pytest.mark.catches_bug
async def test_a_reservation_answered_by_one_that_then_failed_to_begin_reserves_the_gpu_itself(monkeypatch):
    """Two reservations wait for the GPU; the first, granted, lets the second in (it would extend it), then
    fails to begin (a bug): the second, waking to find no reservation in force, reserves the GPU itself
    rather than extending none (a mutation audit: that path removed failed no test)."""
    s, _, ops, _ = make_scheduler(small_config())
    holding = await s.acquire("t", "kt")
    first = asyncio.ensure_future(s.reservations.reserve(60, "gaming"))
    second = asyncio.ensure_future(s.reservations.reserve(7200, "training"))
    await until(lambda: len(s.queue()) == 2)
    monkeypatch.setattr(s, "own", _raising_once(s.own))  # the first one's unloads cannot start
    holding.release("completed")
    with pytest.raises(m.BrokerError) as info:
        await asyncio.wait_for(first, 5)
    assert info.value.code == "scheduler_error" and s.shared.internal_errors == 1
    res = await asyncio.wait_for(second, 5)
    assert s.reservation is res and res.reason == "training" and s.holder == m.RESERVATION
    assert res.unloaded == ["t", "x", "y", "z"] and ops.calls == [("unload", n) for n in res.unloaded]
    assert s.reservations.release() and s.holder is None and books_balance(s)


@pytest.mark.catches_bug
async def test_a_bug_in_a_reservations_unloads_is_counted_said_and_the_reservation_stands():
    """A bug while a reservation unloads (an unload that raises what no unload should): counted once, the
    reservation stands with what it did unload, and its answer and event say that the rest was not, and why
    (a mutation audit: nothing said of the rest failed no test)."""
    s, _, ops, _ = make_scheduler(small_config())
    real = s.rooms.unload

    async def buggy(job: m.Job, name: str, **kwargs: Any) -> None:
        if name == "y":
            raise RuntimeError("a bug")
        await real(job, name, **kwargs)

    s.rooms.unload = buggy  # type: ignore[method-assign]
    res = await s.reservations.reserve(60, "gaming")
    assert s.reservation is res and s.holder == m.RESERVATION and s.shared.internal_errors == 1
    assert res.unloaded == ["t", "x"] and ops.calls == [("unload", "t"), ("unload", "x")]
    assert res.not_unloaded == {"(the rest)": "internal error: RuntimeError: a bug"}
    reserved = next(e for e in recent_events(s.events) if e["event"] == "reserved")
    assert reserved["not_unloaded"] == res.not_unloaded == res.describe(0)["not_unloaded"]
    assert s.reservations.release() and s.holder is None and books_balance(s)


async def test_two_reservations_asked_for_while_the_gpu_is_busy_make_one_that_the_second_extends():
    """A second reserve while the first waits for the GPU (a Steam launch and a timer at once) was
    answered gpu_reserved by the first once it held the GPU, though the docs say asking again extends
    it: `reserve` failed, and the GPU was given back at the first one's end."""
    s, _, ops, clock = make_scheduler(small_config())
    for name in ops.states:
        ops.states[name].loaded()
    holding = await s.acquire("t", "kt")
    first = asyncio.ensure_future(s.reservations.reserve(60, "gaming"))
    second = asyncio.ensure_future(s.reservations.reserve(7200, "training"))
    await until(lambda: len(s.queue()) == 2)
    holding.release("completed")
    one, two = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert one is two is s.reservation and s.holder == m.RESERVATION
    assert one.reason == "training" and one.describe(clock())["left_s"] == 7200
    assert ops.calls.count(("unload", "x")) == 1  # unloaded once
    assert s.reservations.release() and s.holder is None and books_balance(s)
    assert s.stats.failed == 0


async def test_a_reservation_asked_for_again_takes_the_new_restore_and_records_its_new_end():
    """Asking again while reserved extends the reservation from now, with the new reason and the new
    ``restore`` (``reserve --no-restore`` on a reservation in force), and records ``reserved`` again (a
    mutation audit: an extension that kept the old restore, or recorded nothing, failed no test)."""
    s, _, ops, clock = make_scheduler(small_config())
    ops.states["x"].loaded()
    first = await s.reservations.reserve(60, "gaming")
    assert first.restore and first.to_restore == ["x"]
    clock.now += 30
    again = await s.reservations.reserve(600, "a longer game", restore=False)
    assert again is first and s.reservation is first
    assert (first.reason, first.restore, first.describe(clock())["left_s"]) == ("a longer game", False, 600)
    reserved = [e for e in recent_events(s.events) if e["event"] == "reserved"]
    assert [(e["reason"], e["for_s"], e["job"]) for e in reserved] == [
        ("gaming", 60, first.job.id),
        ("a longer game", 600, first.job.id),
    ]
    assert ops.calls.count(("unload", "x")) == 1  # unloaded once
    assert s.reservations.release() and s.holder is None and books_balance(s)


def _unloads(r: Rig) -> list[tuple[str, str]]:
    """Every unload call the simulated consumers got (mvoice's route, ComfyUI's /free)."""
    own = {"mvoice": "/api/admin/unload", "comfyui": "/free"}
    return [
        (name, rec.path) for name, path in own.items() for rec in r.sims[name].records if rec.path == path
    ]


async def test_a_release_while_a_reservation_waits_cancels_it_and_nothing_is_unloaded(rig):
    """Issue 19, item 8: reserve waited behind a job, release said "GPU 0 was not reserved", and the
    reservation was granted later, unloaded everything and held the GPU for its whole 600 s. Now the
    release cancels it: the waiting POST gets reservation_released (409), the DELETE answer and the
    release verb say so, nothing is unloaded, and the GPU is the services' once the job ends."""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(urls={"ollama": ollama.url}, sims={"mvoice": {"loaded": True}})
        s = r.broker.scheduler

        async def reserve() -> tuple[int, dict[str, str], bytes]:
            async with r.session.post(r.url("/v1/reserve"), json={"for_s": 600, "reason": "gaming"}) as resp:
                return resp.status, dict(resp.headers), await resp.read()

        llm = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "holds the GPU"}))
        try:
            await until(lambda: s.holder == "ollama")
            waiting = asyncio.ensure_future(reserve())
            await until(lambda: len(s.queue()) == 1)
            rc, out, err = await cli("release", "--url", r.url(""))
            assert (rc, err) == (0, "") and out == (
                "GPU 0: cancelled a pending reservation (it had not begun: nothing was unloaded)\n"
            )
            data = error_of(*await asyncio.wait_for(waiting, 10), "reservation_released")
            assert data["message"] == "GPU 0 was released before this reservation began: nothing was unloaded"
            assert s.queue() == [] and s.holder == "ollama"  # the job it waited behind runs on
            # Two waiting at once are both cancelled; the DELETE answer says so.
            both = [asyncio.ensure_future(reserve()) for _ in range(2)]
            await until(lambda: len(s.queue()) == 2)
            async with r.session.delete(r.url("/v1/reserve")) as resp:
                assert await resp.json() == {"gpu": 0, "released": True, "gpus": [0], "cancelled": [0]}
            for answer in await asyncio.wait_for(asyncio.gather(*both), 10):
                error_of(*answer, "reservation_released")
            async with r.session.delete(r.url("/v1/reserve")) as resp:  # nothing left to release
                assert await resp.json() == {"gpu": 0, "released": False, "gpus": [], "cancelled": []}
        finally:
            gate.set()  # (a failure above must not leave the stand-in's handler waiting)
        assert (await llm)[0] == 200
        await until(lambda: s.holder is None)
        assert s.reservation is None and s.queue() == [] and _unloads(r) == []
        assert r.stats.cancelled == 3 and r.stats.failed == 0 and books_balance(s)
        assert (await r.post("tts", {"text": "the GPU is the services' again"}))[0] == 200
        # The same observation sees the unloads of a reservation that does begin.
        status, _, answer = await _reserve(r, for_s=600)
        assert status == 200 and _unloads(r) == [("mvoice", "/api/admin/unload"), ("comfyui", "/free")]
        assert await cli("release", "--url", r.url("")) == (0, "GPU 0 released\n", "")


async def test_a_reservation_granted_but_not_yet_begun_when_released_gives_the_gpu_back():
    """The release may come between the grant and the reservation's first step (its waiter granted the
    lock by the job it waited behind, not yet woken): it is cancelled all the same, its slot freed, and
    nothing is unloaded."""
    s, _, ops, _ = make_scheduler(small_config())
    ops.states["x"].loaded()
    job = await asyncio.wait_for(s.acquire("x", "kx"), 5)
    reserving = asyncio.ensure_future(s.reservations.reserve(600, "gaming"))
    await until(lambda: len(s.queue()) == 1)
    job.release("completed", status=200, success=True)  # the lock goes to the reservation at once...
    assert s.holder == m.RESERVATION and not reserving.done()  # ...whose waiter has not run yet
    assert s.reservations.cancel_waiting() and not s.reservations.release()
    with pytest.raises(m.BrokerError) as info:
        await asyncio.wait_for(reserving, 5)
    assert info.value.code == "reservation_released"
    assert s.holder is None and s.reservation is None and ops.calls == [] and books_balance(s)


# =====================================================================================================
# 10.5 Operations: the command line
# Verbs against a running broker, in this process; as a process of their own where the process is the point
# (exit statuses, Ctrl-C, what a verb imports).
# =====================================================================================================


async def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """``mgpumanager.py VERB ...`` as its own process (asynchronously: the sims answer in this loop); its
    exit status, stdout and stderr. MGPUMANAGER_* from the test's environment are not passed on."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MGPUMANAGER_")} | (env or {})
    proc = await asyncio.create_subprocess_exec(
        PY,
        str(HERE / "mgpumanager.py"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def verb(capsys: Any, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``mgpumanager.py VERB ...`` in this process: its command line parsed as the process parses it, the verb
    run in a thread (the broker and the sims answer in this loop meanwhile); its exit status, stdout and
    stderr, as ``cli`` gives them. ``env`` is all the environment it sees (MGPUMANAGER_URL, _TOKEN)."""
    capsys.readouterr()  # what came before is not the verb's

    def run() -> int:
        try:
            return m.run_verb(m.command_line().parse_args(args), env or {})
        except SystemExit as e:  # the command line refused (argparse), as the process exits
            return int(e.code or 0)

    code = await asyncio.to_thread(run)
    out, err = capsys.readouterr()
    return code, out, err


def ps_rows(out: str) -> dict[str, list[str]]:
    """``ps``'s consumer rows by name, cells split where two spaces part them."""
    lines = out.splitlines()
    rows = {}
    for line in lines[1 : lines.index("")]:
        if not line.startswith(" "):  # indented lines are notes on a row
            cells = re.split(r"\s{2,}", line.strip())
            rows[cells[0]] = cells[1:]
    return rows


async def post_json(
    session: aiohttp.ClientSession, url: str, payload: Any, request_id: str | None = None
) -> tuple[int, bytes]:
    headers = {"X-Request-ID": request_id} if request_id else {}
    async with session.post(url, json=payload, headers=headers) as resp:
        return resp.status, await resp.read()


async def test_the_cli_reserves_and_releases_a_running_broker(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    daemon = Daemon(r.raw, r.tmp_path, sim_smi(r.state))
    async with daemon:
        url = daemon.url("")
        rc, out, err = await cli("reserve", "1h", "--reason", "gaming", "--url", url)
        assert rc == 0 and out.startswith("GPU 0 reserved\n") and "reserved: gaming" in out, (out, err)
        assert "unloaded: mvoice, comfyui" in out and "whisper (no unload route)" in out
        rc, out, _ = await cli("ps", "--url", url)
        assert rc == 0 and "reserved: gaming" in out
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
            assert resp.status == 503 and (await resp.json())["error"] == "gpu_reserved"
        assert await cli("release", "--url", url) == (0, "GPU 0 released\n", "")
        assert await cli("release", "--url", url) == (0, "GPU 0 was not reserved\n", "")
        async with r.session.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
            assert resp.status == 200


async def test_cli_ps_and_status_against_a_running_broker(rig, capsys):
    r = await rig(sims={"mvoice": {"loaded": True}})
    r.sims["whisper"].faults["health_status"] = 503
    await r.broker.consumers.probe("whisper")
    comfyui = r.sims["comfyui"]
    comfyui.may_finish.clear()  # its render, and so its hold, lasts until the verbs have looked
    url = r.url("")
    assert (await r.post("tts", {"text": "warm"}))[0] == 200
    image = asyncio.ensure_future(r.post("image", {"prompt": {}}))  # evicts mvoice
    await status_until(r, lambda st: (st["scheduler"]["holder"] or {}).get("holds") == 1)
    tts = asyncio.ensure_future(r.post("tts", {"text": "waits"}))
    await status_until(r, lambda st: len(st["scheduler"]["queue"]) == 1)
    rc, out, err = await verb(capsys, "ps", "--url", url)
    assert (rc, err) == (0, ""), err
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100
    assert re.split(r"\s{2,}", lines[0]) == [
        "CONSUMER",
        "HEALTH",
        "RESIDENT",
        "USED",
        "PEAK",
        "DECLARED",
        "LAST USE",
        "RUNNING",
        "QUEUED",
    ]
    rows = ps_rows(out)
    assert list(rows) == ["mvoice", "comfyui", "ollama", "whisper"]
    # mvoice: evicted for the render, its next job queued; comfyui: rendering after its answer.
    assert rows["mvoice"][:5] == ["healthy", "no", "-", "-", "2800 MiB"]
    assert re.fullmatch(r"\d+ s ago", rows["mvoice"][5]) and rows["mvoice"][6:] == ["0", "1"]
    assert rows["comfyui"][:2] == ["healthy", "yes"] and rows["comfyui"][6:] == ["1", "0"]
    assert rows["ollama"][1] == "unknown" and rows["ollama"][4:] == ["8000 MiB", "never", "0", "0"]
    assert rows["whisper"][:2] == ["down", "unknown"]
    # why it is down, under the table (whisper-server's error handler makes its 503 a 404)
    assert "  whisper: health answered 404" in lines
    gpu = lines[lines.index("") + 1 :]
    assert re.fullmatch(r"GPU 0 .*: \d+ of 16384 MiB used, \d+ free, \d+ % busy, \d+ C", gpu[0])
    assert re.fullmatch(r"  held by comfyui: 0 jobs, 1 hold, for \d+ s; 1 queued", gpu[1])

    rc, out, err = await verb(capsys, "status", "--json", "--url", url)
    assert (rc, err) == (0, "")
    st = json.loads(out)
    assert st["scheduler"]["holder"]["consumer"] == "comfyui" and set(st["consumers"]) == set(rows)
    direct = await r.status()  # the broker's own answer, every key in its order: --json prints it whole
    assert list(st) == list(direct) and list(st["consumers"]) == list(direct["consumers"])
    for name, c in direct["consumers"].items():  # (probes and readings may move the rest meanwhile)
        assert list(st["consumers"][name]) == list(c) and st["consumers"][name]["url"] == c["url"]
    rc, out, err = await verb(capsys, "status", "--url", url)
    assert (rc, err) == (0, "")
    assert re.match(rf"mgpumanager {m.VERSION} at {re.escape(url.rstrip('/'))}, up \d+ s\n", out)
    assert "held by comfyui" in out and re.search(r"counters: jobs 3, completed 2, .*evictions 1", out)
    comfyui.may_finish.set()
    assert (await image)[0] == 200 and (await tts)[0] == 200


async def test_cli_unload_load_reload_and_the_brokers_refusals(rig, capsys):
    r = await rig(sims={"mvoice": {"loaded": True}})
    url = r.url("")
    assert await verb(capsys, "unload", "mvoice", "--url", url) == (0, "unloaded mvoice\n", "")
    assert r.sims["mvoice"].unloads == 1
    assert (await r.post("image", {"prompt": {}}))[0] == 200
    # mvoice does not fit beside comfyui: loading it unloads comfyui first.
    expected = "loaded mvoice, after unloading 1 other consumer\n"
    assert await verb(capsys, "load", "mvoice", "--url", url) == (0, expected, "")
    assert (r.sims["comfyui"].unloads, r.sims["mvoice"].loads) == (1, 1)
    # comfyui has no load route: room is made, and it loads with its first job.
    expected = (
        "made room for comfyui, which is not resident (without a load route it loads with its first"
        " job), after unloading 1 other consumer\n"
    )
    assert await verb(capsys, "load", "comfyui", "--url", url) == (0, expected, "")
    assert r.sims["mvoice"].unloads == 2
    rc, out, err = await verb(capsys, "unload", "nosuch", "--url", url)
    assert (rc, out, err) == (2, "", "mgpumanager unload: no consumer named 'nosuch' (no_consumer)\n")
    rc, out, err = await verb(capsys, "unload", "whisper", "--url", url)
    assert (rc, out) == (2, "") and "whisper has no unload route (bad_request)" in err
    assert await verb(capsys, "reload", "--url", url) == (0, "reloaded: nothing changed\n", "")
    raw = yaml.safe_load(r.config_path.read_text())
    raw["consumers"]["whisper"]["priority"] = 1
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert await verb(capsys, "reload", "--url", url) == (0, "reloaded: changed whisper\n", "")
    raw["consumers"]["whisper"]["priority"] = 9
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, out, err = await verb(capsys, "reload", "--url", url)
    assert (rc, out) == (2, "") and "config refused, the old one stays" in err and "(bad_config)" in err


def closed_port() -> socket.socket:
    """A socket bound to a port of 127.0.0.1 and never listening: a connection to it is refused, and no other
    test (in parallel) can take its port while it is open."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


async def test_cli_exit_1_when_the_broker_cannot_be_reached_or_is_not_a_broker(capsys):
    with closed_port() as closed:
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
        rc, out, err = await verb(capsys, "ps", "--url", nobody)
        assert (rc, out, err) == (
            1,
            "",
            f"mgpumanager ps: cannot reach the broker at {nobody}: connection refused\n",
        )
        # The process exits with it (``events`` also sets its own SIGINT handler: a process's own).
        rc, out, err = await cli("events", "--url", nobody)
        assert (rc, out) == (
            1,
            "",
        ) and err == f"mgpumanager events: cannot reach the broker at {nobody}: connection refused\n"
    rc, _, err = await verb(capsys, "ps", "--url", "http://no-such-host.invalid:8770")
    assert rc == 1 and "cannot resolve the host" in err

    silent_gate = asyncio.Event()

    async def silent(request: web.Request) -> web.Response:
        await silent_gate.wait()
        return web.Response()

    async def html(request: web.Request) -> web.Response:
        return web.Response(status=404, text="<h1>Not Found</h1>", content_type="text/html")

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    async with StandIn([("GET", "/v1/status", silent)]) as stand_in:
        rc, _, err = await verb(capsys, "ps", "--url", stand_in.url, "--timeout", "0.5")
        silent_gate.set()
        assert rc == 1 and err.endswith(": no answer within 0.5 s\n"), err
    async with StandIn([("GET", "/v1/status", html)]) as stand_in:
        rc, _, err = await verb(capsys, "ps", "--url", stand_in.url)
        assert rc == 1 and "answered 404 Not Found, not a mgpumanager broker?" in err
    async with StandIn([("GET", "/v1/status", text)]) as stand_in:
        rc, _, err = await verb(capsys, "status", "--url", stand_in.url)
        assert rc == 1 and "did not answer JSON" in err


async def test_cli_against_a_hostile_broker_exits_1_or_2_with_a_reason_never_a_traceback_or_a_hang(capsys):
    """Something at the broker's URL that answers JSON of another shape, NaN, a body that never ends or is
    huge, a redirect, no event stream, an endless line, or escape sequences in its error: each was a
    traceback, a hang, unbounded memory, the token sent where the redirect pointed, or the terminal driven
    by the answer. Now exit 1 (not a broker) or 2 (a refusal), one line on stderr, within the timeout. (In
    this process, but ``events``, which sets a process's own SIGINT handler.)"""
    redirected: list[str | None] = []

    def answer(text: str, status: int = 200, kind: str = "application/json") -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(status=status, text=text, content_type=kind)

        return handler

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(b'{"x": "')
        for _ in range(600):  # a byte every 0.05 s: each read gets something, the answer never ends
            await resp.write(b"a")
            await asyncio.sleep(0.05)
        return resp

    async def huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            for _ in range(20):
                await resp.write(b"[" + b" " * m.MiB)
        return resp

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        redirected.append(request.headers.get("Authorization"))
        return web.json_response({"consumers": {}})

    async def long_line(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            for _ in range(20):
                await resp.write(b"x" * m.MiB)  # no newline, ever
        return resp

    escape = {"error": "unload_failed", "message": "unload answered 500: \x1b]0;owned\x07\x1b[2Jboom"}
    infinite = answer('{"gpus": [{"scheduler": {"holder": {"consumer": "x", "held_s": Infinity}}}]}')
    cases: list[tuple[tuple[str, ...], Any, int, str]] = [
        # JSON of another shape than the broker's answer is something else at the URL, and so is any JSON
        # object that lacks what the broker's has (an attack: '{"ok": true}' was "reloaded", exit 0).
        (("ps",), answer("[]"), 1, "answered JSON of another shape: is it a mgpumanager broker?"),
        (("status",), answer('{"uptime_s": "soon"}'), 1, "answered JSON of another shape"),
        (("reload",), answer('{"changes": 5}'), 1, "answered JSON of another shape"),
        (("reload",), answer('{"ok": true}'), 1, "answered JSON of another shape"),
        (("release",), answer('{"ok": true}'), 1, "answered JSON of another shape"),
        (("reserve", "1h"), answer('{"ok": true}'), 1, "answered JSON of another shape"),
        (("unload", "x"), answer('"unloaded"'), 1, "answered JSON of another shape"),
        (("unload", "x"), answer('{"ok": true}'), 1, "answered JSON of another shape"),
        # NaN and Infinity are no JSON the broker writes.
        (("ps",), infinite, 1, "did not answer JSON"),
        (("ps",), answer('{"consumers": {}, "uptime_s": NaN}'), 1, "did not answer JSON"),
        # Of the right shape, and still not the broker's: what no broker does, never a traceback.
        (
            ("ps",),
            answer('{"consumers": {}, "gpus": [5]}'),
            1,
            "answered what no broker does (AttributeError: ",
        ),
        (("status",), answer('{"consumers": {}, "uptime_s": "soon"}'), 1, "answered what no broker does"),
        (("ps",), answer("[" * 100_000), 1, "did not answer JSON"),
        (("ps", "--timeout", "1"), endless, 1, "did not finish its answer within 1 s"),
        (("ps",), huge, 1, "answered more than 16 MiB: not a broker?"),
        (("ps",), redirect, 1, "answered 302, a redirect to '/elsewhere' (not followed): not a broker?"),
        (("unload", "x"), redirect, 1, "answered 302, a redirect to '/elsewhere' (not followed)"),
        (("events",), answer("{}"), 1, "/v1/events answered application/json, no event stream"),
        (("events",), long_line, 1, "/v1/events sent an event over 1 MiB: not a broker?"),
        (("unload", "x"), answer(json.dumps(escape), 502), 2, r"\x1b]0;owned\x07\x1b[2Jboom (unload_failed)"),
    ]
    for args, handler, code, says in cases:
        routes = [("*", "/elsewhere", elsewhere), ("*", "/{tail:.*}", handler)]
        async with StandIn(routes) as stand_in:
            env = {"MGPUMANAGER_TOKEN": TOKEN}
            run = cli if args[0] == "events" else functools.partial(verb, capsys)
            rc, out, err = await run(*args, "--url", stand_in.url, env=env)
        assert (rc, out) == (code, "") and says in err and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err and "\x1b" not in err, (args, err)
    assert redirected == []  # never followed: the token went nowhere else
    # The command line's own mistakes are 2, with a reason.
    for url in ("http://[::1", "http://mrock:port", "http://mrock:99999", "http://mr ock:8770"):
        rc, _, err = await verb(capsys, "ps", "--url", url)
        assert rc == 2 and "is not a broker's URL" in err and "Traceback" not in err, (url, err)
    for token in ("line\nbreak-0123456789", "with space-0123456789", "bell\x07-0123456789"):
        rc, _, err = await verb(capsys, "ps", "--url", "http://127.0.0.1:9", env={"MGPUMANAGER_TOKEN": token})
        assert rc == 2 and "a token is printable characters without spaces" in err, (token, err)
    # --timeout 0 waited the default (found by an attack): no wait at all is no timeout to give.
    rc, _, err = await verb(capsys, "ps", "--url", "http://127.0.0.1:9", "--timeout", "0")
    assert rc == 2 and "'0': give a number of seconds, more than 0" in err, err


async def test_cli_timeout_bounds_an_answer_whose_head_comes_a_line_at_a_time(capsys):
    """Something at the broker's URL that sends its status line and then one header line every 0.2 s: each
    read gets something within the socket's timeout, so the verb waited for as long as the head went on
    (operations.md promises a limit for the whole answer). Now exit 1 within --timeout."""
    stop, ended = asyncio.Event(), asyncio.Event()
    lines: list[int] = []

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(100):  # 20 s of head
                if stop.is_set():
                    break
                writer.write(f"X-Line-{i}: x\r\n".encode())
                lines.append(i)
                await writer.drain()
                await asyncio.sleep(0.2)
        writer.close()
        ended.set()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        rc, out, err = await verb(capsys, "ps", "--url", url, "--timeout", "1")
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
        await asyncio.wait_for(ended.wait(), 5)  # (its handler ends, not cancelled with the test's loop)
    assert (rc, out) == (1, "") and err.endswith(": no answer within 1 s\n"), err
    assert len(lines) < 50  # (the head was still coming when the verb gave up)


async def test_cli_url_comes_from_the_flag_else_the_environment_else_the_default(rig, capsys):
    assert m.cli_url(None, {}) == "http://127.0.0.1:8770"
    assert m.cli_url(None, {"MGPUMANAGER_URL": "http://mrock:8770/"}) == "http://mrock:8770"
    assert m.cli_url("mrock:9000", {"MGPUMANAGER_URL": "http://x:1"}) == "http://mrock:9000"
    with pytest.raises(m.CliError) as refused:
        m.cli_url("ftp://mrock", {})
    assert refused.value.code == 2
    r = await rig()
    url = r.url("")
    with closed_port() as closed:
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
        assert (await verb(capsys, "ps", env={"MGPUMANAGER_URL": url}))[0] == 0
        rc, _, err = await verb(capsys, "ps", "--url", nobody, env={"MGPUMANAGER_URL": url})
        assert rc == 1 and nobody in err  # the flag wins
        assert (await verb(capsys, "ps", "--url", url, env={"MGPUMANAGER_URL": nobody}))[0] == 0
        assert (await verb(capsys, "ps", "--url", f"127.0.0.1:{r.server.port}"))[0] == 0  # host:port is http
        # The verb's flags may come before it too; written after it, they win.
        assert (await verb(capsys, "--url", url, "ps"))[0] == 0
        rc, _, err = await verb(capsys, "--url", url, "ps", "--url", nobody)
        assert rc == 1 and nobody in err
    # Without a verb they make no sense: the broker itself listens where --listen says.
    with pytest.raises(SystemExit) as exited:
        m.main(["--url", nobody])
    assert exited.value.code == 2 and "go with a VERB" in capsys.readouterr().err


async def test_cli_sends_the_token_from_the_environment_or_the_token_file(rig, tmp_path, capsys, caplog):
    r = await rig(tweak=with_token)
    token_file, wrong_file = tmp_path / "token", tmp_path / "wrong"
    token_file.write_text(TOKEN + "\n")
    wrong_file.write_text("wrong-token-0123456789\n")
    url = r.url("")
    rc, out, err = await verb(capsys, "ps", "--url", url)
    assert (rc, out) == (2, "") and "(unauthorized): set MGPUMANAGER_TOKEN or give --token-file" in err
    rc, out, err = await verb(capsys, "ps", "--url", url, env={"MGPUMANAGER_TOKEN": TOKEN})
    assert rc == 0, err
    assert (await verb(capsys, "ps", "--url", url, "--token-file", str(token_file)))[0] == 0
    wrong = {"MGPUMANAGER_TOKEN": "wrong-token-0123456789"}
    assert (await verb(capsys, "ps", "--url", url, "--token-file", str(token_file), env=wrong))[0] == 0
    assert (
        await verb(
            capsys, "ps", "--url", url, "--token-file", str(wrong_file), env={"MGPUMANAGER_TOKEN": TOKEN}
        )
    )[0] == 2  # the file wins
    assert (await verb(capsys, "unload", "mvoice", "--url", url, env={"MGPUMANAGER_TOKEN": TOKEN}))[0] == 0
    rc, _, err = await verb(capsys, "ps", "--url", url, "--token-file", str(tmp_path / "missing"))
    assert rc == 2 and "cannot read --token-file" in err
    # A device or a FIFO is refused at once, not read forever.
    rc, _, err = await verb(capsys, "ps", "--url", url, "--token-file", "/dev/zero")
    assert rc == 2 and "--token-file /dev/zero is not a regular file" in err
    assert caplog.text and TOKEN not in caplog.text
    # A token beyond Latin-1 (the broker takes any printable one) went out as Latin-1, or raised; it is
    # sent as UTF-8, as aiohttp reads it.
    wide = "p\u00e4ssw\u00f6rd-\u20ac-0123456789"

    async def status(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {wide}":
            return web.json_response({"error": "unauthorized", "message": "wrong token"}, status=401)
        return web.json_response({"consumers": {}})

    async with StandIn([("GET", "/v1/status", status)]) as stand_in:
        rc, out, err = await verb(capsys, "ps", "--url", stand_in.url, env={"MGPUMANAGER_TOKEN": wide})
    assert (rc, err) == (0, "") and out.startswith("CONSUMER")


#: Every variable urllib takes a proxy from, both spellings.
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


async def test_cli_ignores_proxy_variables_and_sends_the_token_to_the_broker_alone():
    """Issue 19, item 7: urllib followed http_proxy (and HTTPS_PROXY, all_proxy), even for 127.0.0.1, and
    handed the bearer token to the proxy. With a recording proxy in every proxy variable (and no no_proxy),
    the verbs reach the broker directly and the proxy never hears a byte."""
    heard: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(65536))
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    got: list[str] = []

    async def status(request: web.Request) -> web.Response:
        got.append(request.headers.get("Authorization", ""))
        return web.json_response({"consumers": {}})

    async def reload(request: web.Request) -> web.Response:
        got.append(request.headers.get("Authorization", ""))
        return web.json_response({"reloaded": True, "changes": []})

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    env = dict.fromkeys(PROXY_VARIABLES, proxy_url) | {
        "no_proxy": "",
        "NO_PROXY": "",
        "MGPUMANAGER_TOKEN": TOKEN,
    }
    try:
        async with StandIn([("GET", "/v1/status", status), ("POST", "/v1/reload", reload)]) as broker:
            for verb in ("ps", "reload"):
                rc, out, err = await cli(verb, "--url", broker.url, env=env)
                assert (rc, err) == (0, ""), (verb, out, err)
    finally:
        server.close()
        await server.wait_closed()
    assert heard == []
    assert got == [f"Bearer {TOKEN}"] * 2


async def test_cli_events_prints_one_line_per_event_and_stops_on_sigint(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon:
        assert (await post_json(r.session, daemon.url("/v1/tts"), {"text": "x"}, request_id="t-1"))[0] == 200

        async def events(*args: str) -> asyncio.subprocess.Process:
            return await asyncio.create_subprocess_exec(
                PY,
                str(HERE / "mgpumanager.py"),
                "events",
                *args,
                "--url",
                daemon.url(""),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )

        async def lines_until(proc: asyncio.subprocess.Process, last: str) -> list[str]:
            """Its lines up to the one starting with ``last``, without their time (checked)."""
            lines: list[str] = []
            while not lines or not lines[-1].startswith(last):
                line = await asyncio.wait_for(proc.stdout.readline(), 20)
                assert line, "events ended"
                clock, _, rest = line.decode().rstrip("\n").partition(" ")
                assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", clock), line
                lines.append(rest)
            return lines

        proc = await events("--since", "900")
        try:
            past = [
                line
                for line in await lines_until(proc, "learned consumer=mvoice gpu=0 job=1 ")
                if not line.startswith("health")
            ]
            patterns = [
                r"queued job=1 consumer=mvoice kind=tts gpu=0 priority=3 request_id=t-1 eta_s=[\d.]+",
                r"granted job=1 consumer=mvoice kind=tts gpu=0 waited_s=[\d.]+",
                r"started job=1 consumer=mvoice kind=tts gpu=0",
                r"finished job=1 consumer=mvoice kind=tts gpu=0 http=200",  # code=null is left out
                r'learned consumer=mvoice gpu=0 job=1 what=job seconds=[\d.]+ timings=\{"load_s":null,'
                r'"unload_s":null,"job_s":[\d.]+\}',  # (objects as compact JSON)
            ]
            assert len(past) == 5 and all(map(re.fullmatch, patterns, past)), past
            assert (await post_json(r.session, daemon.url("/v1/tts"), {"text": "live"}))[0] == 200
            live = await lines_until(proc, "learned consumer=mvoice gpu=0 job=2 ")
            assert [line.split()[0] for line in live] == [
                "queued",
                "granted",
                "started",
                "finished",
                "learned",
            ]
        finally:
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await proc.stderr.read() == b""  # no traceback
        # The broker going away ends the stream: exit 1, saying so. (--since 1000000: all the ring has; it
        # went out as 1e+06, whose + the broker read as a space: bad_request, found by an attack.)
        proc = await events("--since", "1000000")
        await lines_until(proc, "finished job=2 ")  # it follows the stream now
        daemon.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 1
        assert b"the broker ended the event stream" in await proc.stderr.read()


async def test_cli_ctrl_c_while_a_verb_waits_exits_130_without_a_traceback():
    """Ctrl-C while a verb waits for its broker (a load waiting for the GPU lock): the process exits 130, as
    a shell expects of an interrupted command, and prints no traceback."""
    asked, gate = asyncio.Event(), asyncio.Event()

    async def waits(request: web.Request) -> web.Response:
        asked.set()
        await gate.wait()
        return web.json_response({"loaded": True})

    # SIGINT as a terminal leaves it (a parent that ignores it would pass that on to the verb).
    as_a_terminal = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL);"
        " os.execv(sys.argv[1], sys.argv[1:])"
    )
    async with StandIn([("POST", "/v1/consumers/{name}/load", waits)]) as broker:
        proc = await asyncio.create_subprocess_exec(
            PY,
            "-c",
            as_a_terminal,
            PY,
            str(HERE / "mgpumanager.py"),
            "load",
            "mvoice",
            "--url",
            broker.url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await asyncio.wait_for(asked.wait(), 30)  # the verb is waiting for its answer
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            gate.set()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert (proc.returncode, out, err) == (130, b"", b"")


def test_cli_durations_are_seconds_minutes_hours_or_plain_seconds():
    cases = {"90s": 90, "30m": 1800, "2h": 7200, "1h30m": 5400, "1.5h": 5400, "45": 45, " 2H ": 7200}
    assert {text: m.parse_duration(text) for text in cases} == cases
    for bad in ("", "0", "0s", "90x", "h", "1h 30m", "-5", "1e3", "2d"):
        with pytest.raises(ValueError):
            m.parse_duration(bad)


async def test_cli_reserve_and_release_against_a_stand_in_of_the_reservation_routes(capsys):
    seen: list[tuple[str, dict[str, str], Any, str | None]] = []

    async def reserve(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(("POST", dict(request.query), body, request.headers.get("Authorization")))
        if body.get("gpu") == 7:
            error = {"error": "bad_request", "message": "no GPU 7", "consumer": None, "retryable": False}
            return web.json_response(error, status=400)
        return web.json_response(
            {
                "gpu": body.get("gpu", 0),
                "reason": body.get("reason"),
                "for_s": body["for_s"],
                "until": m._iso(time.time() + body["for_s"]),
                "left_s": body["for_s"],
                "unloaded": ["mvoice", "comfyui"],
                "not_unloaded": {"ollama": "vram_managed"},
            }
        )

    async def release(request: web.Request) -> web.Response:
        seen.append(("DELETE", dict(request.query), None, request.headers.get("Authorization")))
        gpu = int(request.query.get("gpu", 0))
        return web.json_response({"gpu": gpu, "released": gpu != 3})

    token = {"MGPUMANAGER_TOKEN": TOKEN}
    async with StandIn([("POST", "/v1/reserve", reserve), ("DELETE", "/v1/reserve", release)]) as broker:
        rc, out, err = await verb(
            capsys, "reserve", "90m", "--reason", "gaming", "--gpu", "1", "--url", broker.url, env=token
        )
        assert (rc, err) == (0, "")
        assert seen.pop() == ("POST", {}, {"for_s": 5400, "reason": "gaming", "gpu": 1}, f"Bearer {TOKEN}")
        lines = out.splitlines()
        assert lines[0] == "GPU 1 reserved"
        # (Its end is a time of day, or a date and time when that is tomorrow: near midnight.)
        until = r"\d\d:\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d"
        assert re.fullmatch(rf"  reserved: gaming, 1 h 30 min left \(until ({until})\)", lines[1])
        assert lines[2:] == ["    unloaded: mvoice, comfyui", "    not unloaded: ollama (vram_managed)"]
        for given, seconds in (("2h", 7200), ("45", 45), ("1h30m", 5400), ("0.5", 0.5)):
            assert (await verb(capsys, "reserve", given, "--url", broker.url))[0] == 0
            assert seen.pop() == ("POST", {}, {"for_s": seconds}, None)  # no reason, no GPU: the broker's
        rc, out, err = await verb(capsys, "reserve", "90x", "--url", broker.url)
        assert (rc, out) == (2, "") and "give 90s, 30m, 2h, 1h30m or seconds" in err and not seen
        rc, out, err = await verb(capsys, "reserve", "1h", "--gpu", "7", "--url", broker.url)
        assert (rc, out, err) == (2, "", "mgpumanager reserve: no GPU 7 (bad_request)\n")
        seen.clear()
        assert await verb(capsys, "release", "--url", broker.url, env=token) == (0, "GPU 0 released\n", "")
        assert seen.pop() == ("DELETE", {}, None, f"Bearer {TOKEN}")
        assert await verb(capsys, "release", "--gpu", "1", "--url", broker.url) == (0, "GPU 1 released\n", "")
        assert seen.pop() == ("DELETE", {"gpu": "1"}, None, None)
        rc, out, err = await verb(capsys, "release", "--gpu", "3", "--url", broker.url)
        assert (rc, out, err) == (0, "GPU 3 was not reserved\n", "")


async def test_cli_ps_shows_measured_memory_reservations_and_several_gpus(rig, capsys):
    """The broker's coming status fields (per-consumer measured memory, a GPU's reservation), from a stand-in
    that serves a real broker's /v1/status with them added."""

    def two_gpus(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["gpu"] = 1

    r = await rig(gpus=2, sims={"comfyui": {"gpu": 1}, "mvoice": {"loaded": True}}, tweak=two_gpus)
    st = await r.status()
    st["consumers"]["mvoice"] |= {"vram_used_mib": 2790, "vram_peak_mib": 2950}
    st["consumers"]["comfyui"] |= {"vram_used_mib": None, "vram_peak_mib": 13100}
    st["consumers"]["a-consumer-with-a-name-that-is-long"] = st["consumers"].pop("whisper")
    until_iso = m._iso(time.time() + 2 * 3600 + 60)
    st["gpus"][1]["reservation"] = {
        "reason": "gaming",
        "until": until_iso,
        "left_s": 2 * 3600 + 60,
        "unloaded": ["comfyui"],
        "not_unloaded": {"ollama": "vram_managed"},
    }
    st["gpus"][0]["reservation"] = None

    async def status(request: web.Request) -> web.Response:
        return web.json_response(st)

    async with StandIn([("GET", "/v1/status", status)]) as broker:
        rc, out, err = await verb(capsys, "ps", "--url", broker.url)
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].split()[:2] == ["CONSUMER", "GPU"]
    rows = ps_rows(out)
    assert rows["mvoice"][:7] == ["0", "healthy", "yes", "2790 MiB", "2950 MiB", "2800 MiB", "never"]
    assert rows["comfyui"][:6] == ["1", "healthy", "unknown", "-", "13100 MiB", "13000 MiB"]
    assert any(
        name.endswith("~") and "a-consumer-with-a-name-that-is-long".startswith(name[:-1]) for name in rows
    )
    gpu0, gpu1 = (
        lines.index(next(x for x in lines if x.startswith("GPU 0"))),
        lines.index(next(x for x in lines if x.startswith("GPU 1"))),
    )
    assert lines[gpu0 + 1] == "  idle; 0 queued" and lines[gpu0 + 2] == ""  # no reservation on GPU 0
    assert lines[gpu1 + 1 :] == [
        "  idle; 0 queued",
        f"  reserved: gaming, 2 h 1 min left (until {m._local(until_iso, time.time())})",
        "    unloaded: comfyui",
        "    not unloaded: ollama (vram_managed)",
    ]


def test_a_verb_and_help_start_on_the_standard_library_alone():
    """Every verb imported aiohttp, yaml, multidict and yarl first (most of its start). A verb and --help are
    now answered before the daemon's imports: under ``-S`` (no site-packages, so no third-party module can be
    imported at all) ``ps`` reaches for its broker, and ``-X importtime`` shows none of the daemon's
    modules imported, nor even tried."""
    daemons = {"aiohttp", "yaml", "multidict", "yarl", "uvloop", "asyncio"}
    with closed_port() as closed:
        nobody = f"http://127.0.0.1:{closed.getsockname()[1]}"
        argv = [PY, "-S", "-X", "importtime", str(HERE / "mgpumanager.py"), "ps", "--url", nobody]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.splitlines()
    assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr[-2000:]
    assert lines[-1] == f"mgpumanager ps: cannot reach the broker at {nobody}: connection refused"
    imported = {
        line.split("|")[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")
    }
    assert {"argparse", "urllib", "json"} <= imported and not imported & daemons, imported & daemons
    # --help lists the broker's own flags and the verbs, as before.
    argv = [PY, "-S", "-X", "importtime", str(HERE / "mgpumanager.py"), "--help"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for flag in ("--config", "--listen", "--nvidia-smi", "--check", "--log-level", "--url", "--token-file"):
        assert flag in proc.stdout
    assert all(f"    {name} " in proc.stdout for name in m.VERBS)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
    assert not imported & daemons


# =====================================================================================================
# 10.6 Operations: the dashboard
# A real browser; the timeline of the last 15 minutes.
# =====================================================================================================


#: Every span the timeline draws: [lane, what, job, kind (or queue depth), outcome (or whether it went well)].
TIMELINE_SPANS = """[...document.querySelectorAll('#timeline .tl-span')].map((s) => {
  const row = s.closest('.tl-row');
  return [row.dataset.consumer || row.dataset.lane, s.dataset.state, s.dataset.job || '',
          s.dataset.kind || s.dataset.depth || '', s.dataset.outcome ?? s.dataset.ok ?? ''];
})"""


TIMELINE_RESERVATIONS = """[...document.querySelectorAll('#timeline .tl-resv')]
  .map((r) => [r.closest('.tl-gpu').dataset.gpu, r.dataset.reason, r.dataset.why, r.dataset.open])"""


async def point_at(browser: Browser, selector: str, *, tap: bool = False) -> str:
    """Move the mouse onto (or tap, as a finger would) the middle of the element; the tooltip's text."""
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):  # a click elsewhere hides the last one
        await browser.call("Input.dispatchMouseEvent", type=kind, x=0, y=0, button="left", clickCount=1)
    await browser.wait_for("document.getElementById('tip').hidden")
    box = await browser.evaluate(
        f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
        " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
    )
    assert box, selector
    x, y = box
    if tap:
        await browser.call("Emulation.setTouchEmulationEnabled", enabled=True, maxTouchPoints=1)
        await browser.call("Input.dispatchTouchEvent", type="touchStart", touchPoints=[{"x": x, "y": y}])
        await browser.call("Input.dispatchTouchEvent", type="touchEnd", touchPoints=[])
        await browser.call("Emulation.setTouchEmulationEnabled", enabled=False)
    else:
        await browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    return await browser.wait_for(
        "!document.getElementById('tip').hidden && document.getElementById('tip').textContent"
    )


async def test_dashboard_in_a_real_browser_shows_consumers_holder_and_evictions(rig, tmp_path):
    r = await rig(sims={"mvoice": {"loaded": True}, "comfyui": {"work_s": 4.0}})
    assert (await r.post("tts", {"text": "warm"}))[0] == 200
    async with Browser(tmp_path) as browser:
        await browser.call("Page.navigate", url=r.url("/"))
        names = await browser.wait_for(
            "document.querySelectorAll('#consumers tr').length === 4 &&"
            " [...document.querySelectorAll('#consumers tr')].map(r => r.dataset.consumer)"
        )
        assert names == ["mvoice", "comfyui", "ollama", "whisper"]
        assert await browser.evaluate("document.querySelector('#stat-evictions b').textContent") == "0"
        assert "idle" in await browser.evaluate("document.getElementById('holder').textContent")
        image = asyncio.ensure_future(r.post("image", {"prompt": {}}))  # evicts mvoice, then renders 4 s
        holder = await browser.wait_for(
            "document.getElementById('holder').textContent.includes('comfyui')"
            " && document.getElementById('holder').textContent"
        )
        assert holder.startswith("comfyui")
        await browser.wait_for("document.querySelector('#stat-evictions b').textContent === '1'")
        # Once comfyui answered it is resident: its share of the memory bar is coloured, not "unknown".
        legend = await browser.wait_for(
            "document.querySelector('.legend').textContent.includes('comfyui 13000 MiB')"
            " && document.querySelector('.legend').textContent"
        )
        assert "free" in legend and "mvoice" not in legend
        assert "evicting" in await browser.evaluate("document.getElementById('log').textContent")
        # A second later a new GPU reading shows comfyui's memory as used.
        await browser.wait_for("document.querySelector('.legend').textContent.includes('free 2904 MiB')")
        await browser.screenshot(tmp_path / "dashboard.png")
        assert (await image)[0] == 200
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


async def test_dashboard_shows_a_strangers_memory_as_its_own_segment_and_its_stay_in_a_lane(rig, tmp_path):
    """Issue 22: the memory bar shows unclaimed memory as a segment of its own (a stranger's while one is
    present, its processes in the segment's title); the timeline has a lane for strangers, a span from
    the stranger's coming to its going (open while it stays), beside the yield's unload in mvoice's lane."""
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=_yielding(restore_after_s=0.5))
    await status_until(r, lambda st: st["consumers"]["mvoice"]["vram_used_mib"] == 2800)
    async with Browser(tmp_path) as browser:
        await browser.call("Page.navigate", url=r.url("/"))
        await browser.wait_for("document.querySelectorAll('#timeline [data-lane=strangers]').length === 1")
        r.gpu.allocate("game", 12000, graphics=True)
        title = await browser.wait_for(
            "(document.querySelector('.bar [data-part=stranger]') || {}).title", timeout=30
        )
        assert title == "stranger 12000 MiB: no process listed"
        legend = await browser.wait_for(  # mvoice yielded: its memory is free
            "!document.querySelector('.legend').textContent.includes('mvoice')"
            " && document.querySelector('.legend').textContent",
            timeout=30,
        )
        assert "stranger 12000 MiB" in legend and "free 3904 MiB" in legend
        stay = await browser.wait_for(
            "[...document.querySelectorAll('#timeline [data-lane=strangers] .tl-span')]"
            ".map(s => ({...s.dataset}))"
        )
        assert [(s["state"], s["mib"], s["open"]) for s in stay] == [("stranger", "12000", "true")]
        unload = await browser.wait_for(
            "[...document.querySelectorAll('#timeline [data-consumer=mvoice] .tl-unload')]"
            ".map(s => ({...s.dataset}))"
        )
        assert [u["ok"] for u in unload] == ["true"]
        await browser.screenshot(tmp_path / "strangers.png")
        r.gpu.release("game")
        await browser.wait_for(
            "[...document.querySelectorAll('#timeline [data-lane=strangers] .tl-span')]"
            ".map(s => s.dataset.open).join() === 'false'",
            timeout=30,
        )
        await browser.wait_for("!document.querySelector('.bar [data-part=stranger]')")
    assert (tmp_path / "strangers.png").stat().st_size > 10_000


async def test_dashboard_shows_markup_in_a_reason_and_a_gpu_name_as_text(rig, tmp_path):
    """What the page draws from others' text (a reservation's reason, nvidia-smi's GPU name) is escaped
    everywhere it appears (the holder, the timeline's band and tooltip, the memory bar's title): markup in
    it stays text and runs nothing."""
    markup = '<img src=x onerror="window.xss=1">"\x1b[31m'
    r = await rig()
    with r.gpu.edit() as state:
        state["gpus"][0]["name"] = markup
    assert (await _reserve(r, for_s=600, reason=markup))[0] == 200
    async with Browser(tmp_path) as browser:
        await browser.call("Page.navigate", url=r.url("/"))
        await browser.wait_for("document.querySelector('.tl-resv') !== null")
        await browser.wait_for("document.getElementById('gpu-name').textContent.includes('<img')")
        assert markup in await browser.evaluate("document.getElementById('holder').textContent")
        assert await browser.evaluate("document.querySelector('.tl-resv').dataset.reason") == markup
        assert await browser.evaluate("document.querySelectorAll('main img, #tip img').length") == 0
        assert await browser.evaluate("window.xss === undefined")


async def test_dashboard_with_clients_names_each_queued_jobs_client(rig, tmp_path):
    """Issue 23: with auth.clients, the page (opened with a client's token: status and events are a
    client's to read) shows whom each queued job is for, and whom the holder runs for."""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(tweak=with_clients, urls={"ollama": ollama.url}, sims={"mvoice": {"loaded": True}})
        llm = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}, headers=bearer(BATCH_TOKEN)))
        waiting = []
        try:
            await until(lambda: r.broker.scheduler.holder == "ollama")
            for kind, token in (("tts", WA_TOKEN), ("tts", BATCH_TOKEN), ("image", TOKEN)):
                body = {"prompt": {}, "text": "x"}
                waiting.append(asyncio.ensure_future(r.post(kind, body, headers=bearer(token))))
                count = len(waiting)
                await until(lambda count=count: len(r.broker.scheduler.queue()) == count)
            async with Browser(tmp_path) as browser:
                # The token the page would ask for, kept in the tab as the page keeps it (for its origin).
                await browser.call("Page.navigate", url=r.url("/healthz"))
                await browser.wait_for("document.readyState === 'complete'")
                await browser.evaluate(f"sessionStorage.setItem('mgpumanager-token', {json.dumps(WA_TOKEN)})")
                await browser.call("Page.navigate", url=r.url("/"))
                rows = await browser.wait_for(
                    "document.querySelectorAll('#queue tr').length === 3 && [...document.querySelectorAll("
                    "'#queue tr')].map(r => [...r.cells].map(c => c.textContent))"
                )
                head = await browser.evaluate(
                    "[...document.querySelectorAll('#queue-head th')].map(c => c.textContent)"
                )
                assert head == ["consumer", "client", "kind", "prio", "waiting"]
                assert [row[:4] for row in rows] == [
                    ["mvoice", "wa", "tts", "4"],
                    ["comfyui", "-", "image", "2"],  # the admin's: no client
                    ["mvoice", "batch", "tts", "0"],
                ]
                assert "for batch" in await browser.evaluate("document.getElementById('holder').textContent")
                await browser.screenshot(tmp_path / "clients.png")
        finally:
            gate.set()
        assert [s for s, _, _ in await asyncio.gather(llm, *waiting)] == [200] * 4
    if os.environ.get("MGPU_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "clients.png", Path(os.environ["MGPU_SCREENSHOT_DIR"]) / "clients.png")


async def test_dashboard_with_two_gpus_draws_each_with_its_own_holder(rig, tmp_path):
    def two_gpus(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["gpu"] = 1

    r = await rig(gpus=2, sims={"comfyui": {"gpu": 1, "work_s": 4.0}}, tweak=two_gpus)
    async with Browser(tmp_path) as browser:
        await browser.call("Page.navigate", url=r.url("/"))
        titles = await browser.wait_for(
            "document.querySelectorAll('.gpu h3').length === 2 &&"
            " [...document.querySelectorAll('.gpu h3')].map(h => h.textContent)"
        )
        assert [t.split()[:2] for t in titles] == [["GPU", "0"], ["GPU", "1"]]
        image = asyncio.ensure_future(r.post("image", {"prompt": {}}))  # renders 4 s on GPU 1
        holder = await browser.wait_for(
            "document.getElementById('holder').textContent.includes('comfyui')"
            " && document.getElementById('holder').textContent"
        )
        assert "GPU 0 idle" in holder and "GPU 1 comfyui" in holder
        # comfyui's memory is drawn on GPU 1's bar only.
        legends = await browser.wait_for(
            "[...document.querySelectorAll('.legend')].map(l => l.textContent).join('|').includes('comfyui')"
            " && [...document.querySelectorAll('.legend')].map(l => l.textContent)"
        )
        assert "comfyui" not in legends[0] and "comfyui 13000 MiB" in legends[1]
        # The timeline: a lane per consumer on each GPU, comfyui's job on GPU 1's.
        lanes = await browser.wait_for(
            '!!document.querySelector(\'.tl-gpu[data-gpu="1"] .tl-row[data-consumer="comfyui"] .tl-run\')'
            " && [...document.querySelectorAll('.tl-gpu')].map((g) => [g.dataset.gpu,"
            " [...g.querySelectorAll('.tl-row')].map((r) => r.dataset.consumer || r.dataset.lane)])"
        )
        assert lanes == [["0", ["queue", "mvoice", "ollama", "whisper"]], ["1", ["queue", "comfyui"]]]
        assert (await image)[0] == 200


async def test_with_a_token_the_page_loads_but_its_data_needs_the_token(rig):
    r = await rig(tweak=with_token)
    async with r.session.get(r.url("/")) as resp:
        page = await resp.text()
        assert resp.status == 200 and "<title>mgpumanager</title>" in page and TOKEN not in page
    async with r.session.get(r.url("/v1/events")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "unauthorized")
    async with r.session.get(r.url("/metrics")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "unauthorized")


async def test_timeline_draws_jobs_holds_unloads_loads_the_queue_and_reservations(rig, tmp_path):
    # Redrawing docs/dashboard.png, the same sequence goes slower so that it fills the last minute.
    slow = bool(os.environ.get("MGPU_SCREENSHOT"))
    pause = 3.0 if slow else 0.0
    mvoice = {"work_s": 1.5, "load_s": 2, "release_s": 1} if slow else {}
    comfyui = {"work_s": 10, "release_s": 1.5} if slow else {"work_s": 1.5}
    r = await rig(sims={"mvoice": {"loaded": True, **mvoice}, "comfyui": comfyui})
    assert (await r.post("tts", {"text": "one"}, headers={"X-Request-ID": "tts-1"}))[0] == 200  # job 1
    await asyncio.sleep(pause)
    # Job 2 evicts mvoice and renders 1.5 s after answering; job 3 waits for it, evicts comfyui, loads mvoice.
    image = asyncio.ensure_future(r.post("image", {"prompt": {}}, headers={"X-Request-ID": "img-1"}))
    await until(lambda: r.broker.scheduler.holds == 1)
    tts = asyncio.ensure_future(r.post("tts", {"text": "two"}))
    assert (await image)[0] == 200 and (await tts)[0] == 200
    await until(lambda: r.broker.scheduler.holder is None)
    async with r.session.post(r.url("/v1/consumers/mvoice/unload")) as resp:  # job 4, an admin unload
        assert resp.status == 200
    # Job 5, a reservation: it unloads every consumer that has an unload, holds the GPU, is released. (Some
    # time after job 4, so that the two unloads of mvoice are apart in the last minute's view.)
    await asyncio.sleep(pause or 1.5)
    async with r.session.post(r.url("/v1/reserve"), json={"for_s": 3600, "reason": "gaming"}) as resp:
        assert resp.status == 200
    await asyncio.sleep(pause or 0.3)
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert resp.status == 200
    async with Browser(tmp_path) as browser:
        # The page is opened after all this: what it draws is what the broker replays.
        await browser.call("Page.navigate", url=r.url("/"))
        lanes = await browser.wait_for(
            "document.querySelectorAll('#timeline .tl-row').length === 6 && [...document.querySelectorAll("
            "'#timeline .tl-row')].map((r) => r.dataset.consumer || r.dataset.lane)"
        )
        # The reservation has a lane of its own: when it waited for the GPU and how long it held it.
        assert lanes == ["queue", "mvoice", "comfyui", "ollama", "whisper", "reservation"]
        await browser.wait_for("document.querySelectorAll('#timeline .tl-span').length >= 14")
        spans = await browser.evaluate(TIMELINE_SPANS)
        assert sorted(spans) == sorted(
            [
                ["mvoice", "run", "1", "tts", "completed"],
                ["mvoice", "unload", "2", "", "true"],  # evicted for job 2
                ["comfyui", "run", "2", "image", "completed"],
                ["comfyui", "hold", "2", "image", "released"],
                ["queue", "queue", "", "1", ""],  # job 3, while the render went on
                ["mvoice", "wait", "3", "tts", ""],
                ["comfyui", "unload", "3", "", "true"],  # evicted for job 3
                ["mvoice", "load", "3", "", "true"],
                ["mvoice", "run", "3", "tts", "completed"],
                ["mvoice", "run", "4", "unload", "completed"],  # the admin unload holds the lock alone
                ["mvoice", "unload", "4", "", "true"],
                ["mvoice", "unload", "5", "", "true"],  # the reservation unloads all that have an unload
                ["comfyui", "unload", "5", "", "true"],
                ["reservation", "run", "5", "reservation", "completed"],
            ]
        )
        assert await browser.evaluate(TIMELINE_RESERVATIONS) == [["0", "gaming", "released", "false"]]
        # Live: a reservation (job 6) is drawn open until it ends, here when its time is up.
        training = {"for_s": 4 + pause, "reason": "training"}
        async with r.session.post(r.url("/v1/reserve"), json=training) as resp:
            assert resp.status == 200
        await browser.wait_for(f"{TIMELINE_RESERVATIONS}.length === 2")
        assert (await browser.evaluate(TIMELINE_RESERVATIONS))[1] == ["0", "training", "", "true"]
        await browser.wait_for(f"{TIMELINE_RESERVATIONS}[1][2] === 'expired'", timeout=30)

        # Closer: the last minute, the page's clock stopped so that the spans stay under the pointer.
        # A hover shows the job, a tap (as on a phone) an unload.
        await browser.evaluate(
            "window.realNow = Date.now; const stopped = Date.now(); Date.now = () => stopped"
        )
        await browser.evaluate("document.querySelector('#tl-zoom button[data-s=\\'60\\']').click()")
        await browser.wait_for("document.querySelector('#tl-zoom button.on').dataset.s === '60'")
        tip = await point_at(browser, '.tl-row[data-consumer="comfyui"] .tl-hold[data-job="2"]')
        lines = tip.split("\n")
        assert lines[:2] == ["comfyui image, job 2", "request id img-1"]
        assert re.fullmatch(r"waited [\d.]+ s, ran [\d.]+ s, held [\d.]+ s", lines[2])
        assert lines[3] == "completed (HTTP 200)" and re.fullmatch(r"[\d:]{8} to [\d:]{8}", lines[4])
        tip = await point_at(browser, '.tl-row[data-consumer="mvoice"] .tl-unload[data-job="2"]', tap=True)
        assert tip.startswith("mvoice unloaded for comfyui (job 2) in ")
        tip = await point_at(browser, '.tl-row[data-consumer="mvoice"] .tl-wait[data-job="3"]')
        assert re.match(r"mvoice tts, job 3\nrequest id \w+\nwaited [\d.]+ s, ran", tip)
        tip = await point_at(browser, '.tl-row[data-consumer="mvoice"] .tl-unload[data-job="4"]')
        assert tip.startswith("mvoice unloaded (admin) in ")
        tip = await point_at(browser, '.tl-row[data-consumer="comfyui"] .tl-unload[data-job="5"]')
        assert tip.startswith("comfyui unloaded (reservation) in ")

        # The memory bar: measured memory where the broker has it, else the declared size of resident ones.
        parts = await browser.evaluate(
            "memoryParts({consumers: {"
            " a: {gpu: 0, loaded: true, vram_resident_mib: 1000, vram_used_mib: 900},"
            " b: {gpu: 0, loaded: true, vram_resident_mib: 500, vram_used_mib: null},"
            " c: {gpu: 0, loaded: false, vram_resident_mib: 700},"
            " d: {gpu: 0, loaded: false, vram_resident_mib: 300, vram_used_mib: 250},"
            " e: {gpu: 1, loaded: true, vram_resident_mib: 300, vram_used_mib: 250}},"
            " }, {index: 0, total_mib: 4000, free_mib: 2000})"
            ".map((p) => [p.label, p.mib, p.measured ?? null])"
        )
        assert parts == [
            ["a", 900, True],
            ["b", 500, False],
            ["d", 250, True],
            ["other / unknown", 350, None],
            ["free", 2000, None],
        ]

        # docs/dashboard.png: comfyui rendering again, the last minute drawn above.
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await browser.call("Input.dispatchMouseEvent", type=kind, x=0, y=0, button="left", clickCount=1)
        await browser.evaluate("Date.now = window.realNow")
        image = asyncio.ensure_future(r.post("image", {"prompt": {}}))
        await browser.wait_for(
            '!!document.querySelector(\'.tl-row[data-consumer="comfyui"] .tl-hold[data-job="7"]\')'
        )
        await asyncio.sleep(pause)
        await browser.screenshot(tmp_path / "dashboard.png")
        assert (await image)[0] == 200
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    if os.environ.get("MGPU_SCREENSHOT"):  # how docs/dashboard.png is made
        shutil.copy(tmp_path / "dashboard.png", os.environ["MGPU_SCREENSHOT"])


# =====================================================================================================
# 11. Hostile input
# Tokens, path guards, bodies, floods, malformed requests; every error in one shape.
# =====================================================================================================


async def raw_request(
    r: Rig, method: str, target: str, port: int | None = None
) -> tuple[int, dict[str, Any]]:
    """A request line exactly as written, without a body, to the broker's port or another of its ports;
    the status and the JSON answer (or {})."""
    host, port = r.server.host, port or r.server.port
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1"))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), parse if isinstance(parse := m.parse_json(body), dict) else {}


def lenient(path: str) -> str:
    """How the most lenient consumer might read a path: decoded, in lower case, ';' parameters, empty and
    '.' segments and a trailing '/' dropped, backslashes as slashes, NULs gone."""
    path = unquote(path.partition("?")[0].partition("#")[0]).replace("\\", "/").replace("\x00", "").lower()
    segments = [seg.partition(";")[0] for seg in path.split("/")]
    return "/" + "/".join(seg for seg in segments if seg not in ("", "."))


#: Targets that try to walk around the mount's guards: (method, target, what the broker does). An int is
#: the status it answers (nothing reaches the consumer); a pair is (the path the consumer gets exactly, the
#: job's kind, or None when it is forwarded unscheduled).
TARGET_TRICKS: list[tuple[str, str, Any]] = [
    # The consumer's own unload and load routes (mvoice: POST /api/admin/unload, /api/admin/load).
    ("POST", "/c/mvoice/api/admin/unload", 403),
    ("POST", "/c/mvoice/api/admin/unload#x", 400),
    ("POST", "/c/mvoice/api/admin/unload#", 400),
    ("POST", "/c/mvoice/api/admin/unload?x=1#y", 400),
    ("POST", "/c/mvoice//api/admin/unload", 400),
    ("POST", "/c/mvoice/api//admin/unload", 400),
    ("POST", "/c/mvoice/api/admin/unload/", 403),
    ("POST", "/c/mvoice/api/admin/unload;x", 400),
    ("POST", "/c/mvoice/api/admin/unload;", 400),
    ("POST", "/c/mvoice/api/admin/unload%3Bx", 400),
    ("POST", "/c/mvoice/api/admin/unload%00", 400),
    ("POST", "/c/mvoice/api/admin/unload%0A", 404),  # aiohttp routes on the decoded path: no route
    ("POST", "/c/mvoice/API/Admin/UNLOAD", 403),
    ("POST", "/c/mvoice/api/admin/%75nload", 403),
    ("POST", "/c/mvoice/api/admin/%55NLOAD", 403),
    ("POST", "/c/mvoice/%61pi/admin/load", 403),
    ("POST", "/c/mvoice/api%2Fadmin%2Funload", 403),
    ("POST", "/c/mvoice/api%2fadmin%2fload%2f", 403),
    ("POST", "/c/mvoice/api/admin/unload?now=1", 403),
    ("POST", "/c/m%76oice/api/admin/unload", 403),
    ("POST", "/c/mvoice/api/admin/./unload", 400),
    ("POST", "/c/mvoice/api/admin/x/../unload", 400),
    ("POST", "/c/mvoice/api/admin/x%2F..%2Funload", 400),
    ("POST", "/c/mvoice/api/admin/unload%5C", 400),
    ("POST", "/c/mvoice/api/admin\\unload", 400),
    ("POST", "/c/mvoice/api/admin/unload%", 400),
    ("POST", "/c/mvoice/api/admin/unload%zz", 400),
    ("POST", "/c/mvoice/api/admin/unl%C0%AFoad", 400),
    ("POST", "http://evil.example/c/mvoice/api/admin/unload", 400),
    ("POST", "//c/mvoice/api/admin/unload", 404),
    ("POST", "/c/mvoice%2Fapi/admin/unload", 404),
    # Not the route: forwarded (as a job), exactly as matched.
    ("POST", "/c/mvoice/api/admin/unloaded", ("/api/admin/unloaded", "mount")),
    # A paths entry on GET (speak: GET /api/synthesize) stays GPU work whatever the spelling.
    ("GET", "/c/mvoice/api/synthesize", ("/api/synthesize", "speak")),
    ("GET", "/c/mvoice/API/Synthesize", ("/API/Synthesize", "speak")),
    ("GET", "/c/mvoice/api/synthesize/", ("/api/synthesize/", "speak")),
    ("GET", "/c/mvoice/api/%73ynthesize?text=x", ("/api/synthesize?text=x", "speak")),
    ("GET", "/c/mvoice/api%2fsynthesize", ("/api%2Fsynthesize", "speak")),
    ("GET", "/c/mvoice/api/synthesize#x", 400),
    ("GET", "/c/mvoice//api/synthesize", 400),
    ("GET", "/c/mvoice/api/synthesize;x", 400),
    ("GET", "/c/mvoice/api/synthesize%00", 400),
    ("GET", "/c/mvoice/api/synthesizer", ("/api/synthesizer", None)),  # another route: a read
    # A hold's path entry (comfyui: POST /prompt) keeps its kind and hold; a fragment is refused.
    ("POST", "/c/comfyui/prompt#", 400),
    # An unscheduled entry (ollama: POST /api/show) lets only its exact path skip the lock.
    ("POST", "/c/ollama/api/show", ("/api/show", None)),
    ("POST", "/c/ollama/api/%73how", ("/api/show", None)),
    ("POST", "/c/ollama/api/Show", ("/api/Show", "mount")),
    ("POST", "/c/ollama/api/show/", ("/api/show/", "mount")),
    ("POST", "/c/ollama/api/show#x", 400),
    # /audio/: only files below it, forwarded in normal form.
    ("GET", "/audio/x.wav", ("/audio/x.wav", None)),
    ("GET", "/audio/%78.wav", ("/audio/x.wav", None)),
    ("GET", "/audio/x.wav#/../../api/admin/unload", 400),
    ("GET", "/audio/x.wav#", 400),
    ("GET", "/audio/x.wav/", 400),
    ("GET", "/audio/x.wav;x", 400),
    ("GET", "/audio/x.wav%00", 400),
    ("GET", "/audio//x.wav", 400),
    ("GET", "/audio/%2e%2e/api/admin/unload", 400),
    ("GET", "/AUDIO/x.wav", 404),
    # Every route refuses a fragment.
    ("GET", "/healthz#x", 400),
    ("GET", "/v1/status#", 400),
    ("POST", "/v1/tts#x", 400),
]


async def _partial_post(
    r_host: str, port: int, target: str, length: int, sent: bytes, *, extra: str = ""
) -> Any:
    """A connection that announces ``length`` bytes of body and sends ``sent``; its (reader, writer)."""
    reader, writer = await asyncio.open_connection(r_host, port)
    head = f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n{extra}\r\n"
    writer.write(head.encode() + sent)
    await writer.drain()
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, Any]]:
    """One HTTP answer from a raw connection: its status line and its JSON body (by its Content-Length)."""
    status = await asyncio.wait_for(reader.readline(), 10)
    length = 0
    while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, json.loads(await asyncio.wait_for(reader.readexactly(length), 10))


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


@pytest.mark.parametrize(
    "target",
    [
        "/audio/../api/admin/secret",
        "/audio/%2e%2e/api/admin/secret",
        "/audio/%2E%2E/api/admin/secret",
        "/audio/..%2fapi%2fadmin%2fsecret",
        "/audio/x%2F..%2F..%2Fapi/admin/secret",
        "/audio/..%5c..%5capi/admin/secret",
        "/audio/..\\..\\api/admin/secret",
        "/audio//api/admin/secret",
        "/audio/%252e%252e/api/admin/secret",
        "/audio/./x.wav",
        "/audio/x.wav;/../../api/admin/secret",
        "/audio/%c0%ae%c0%ae/api/admin/secret",
        "/audio/%2e%2e%2f%2e%2e%2fapi/admin/secret",
        "/audio/..;/api/admin/secret",
        "/audio/x.wav%00",
        "http://127.0.0.1/audio/../api/admin/secret",
        "http://evil.example/audio/%2e%2e/api/admin/secret",
        "//audio/../api/admin/secret",
        "/audio/%u002e%u002e/api/admin/secret",
        "/audio/sub%2fx.wav",  # an encoded slash, even one that stays below /audio/
        "/audio/x.wav%3bv=1",  # an encoded ';'
    ],
)
async def test_audio_traversal_is_refused_and_never_reaches_the_consumer(rig, target):
    r = await rig()
    status, body = await raw_get(r, target)
    data = json.loads(body)
    # "//audio/..." is no /audio/ path at all: no route, not even the audio proxy's.
    expected = (404, "not_found") if target.startswith("//") else (400, "bad_request")
    assert (status, data["error"]) == expected, (target, data)
    assert r.sims["mvoice"].records == []


async def test_unknown_routes_and_methods_have_the_error_shape(rig):
    r = await rig()
    async with r.session.get(r.url("/nope")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "not_found")
    async with r.session.get(r.url("/v1/tts")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "method_not_allowed")
        assert "POST" in resp.headers["Allow"]
    async with r.session.post(r.url("/v1/status")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "method_not_allowed")
    async with r.session.post(r.url("/v1/events")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "method_not_allowed")
        assert "GET" in resp.headers["Allow"]
    async with r.session.post(r.url("/v1/consumers")) as resp:  # a reserved kind that is no route
        error_of(resp.status, dict(resp.headers), await resp.read(), "not_found")
    status, headers, body = await r.post("video", {})
    assert error_of(status, headers, body, "no_consumer")["consumer"] is None
    assert r.stats.jobs == 0  # refused before the queue: not jobs


async def test_payload_too_large_by_length_and_by_chunked_body(rig):
    def small(raw):
        raw["scheduler"]["max_body_mib"] = 1

    r = await rig(tweak=small)
    async with r.session.post(r.url("/v1/stt"), data=b"x" * (m.MiB + 1)) as resp:
        error = error_of(resp.status, dict(resp.headers), await resp.read(), "payload_too_large")
        assert error["consumer"] == "mvoice"  # (it was null: the consumer is known by then)

    async def chunks():
        for _ in range(20):
            yield b"y" * 100_000

    async with r.session.post(r.url("/v1/stt"), data=chunks()) as resp:
        error = error_of(resp.status, dict(resp.headers), await resp.read(), "payload_too_large")
        assert error["consumer"] == "mvoice"

    async def one_byte_over():  # (a mutation audit: a chunked body one byte over went through)
        yield b"w" * m.MiB
        yield b"w"

    async with r.session.post(r.url("/v1/stt"), data=one_byte_over()) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "payload_too_large")
    async with r.session.post(r.url("/v1/stt"), data=b"z" * m.MiB) as resp:
        assert resp.status == 200 and (await resp.json())["bytes"] == m.MiB
    transcribed = [rec.body for rec in r.sims["mvoice"].records if rec.path == "/api/transcribe"]
    assert transcribed == [b"z" * m.MiB]  # the refused bodies never reached the consumer
    assert r.stats.jobs == 1


def test_every_code_has_the_specified_status_and_one_shape():
    assert set(m.ERROR_CODES) == set(SPEC_ERRORS)
    for code, status in SPEC_ERRORS.items():
        resp = m.error_response(m.BrokerError(code, "why", "c"))
        data = json.loads(resp.body)
        assert data == {"error": code, "message": "why", "consumer": "c", "retryable": code in SPEC_RETRYABLE}
        assert resp.status == status
        assert ("Retry-After" in resp.headers) == (status in (429, 503))


@pytest.mark.catches_bug
async def test_a_crash_in_a_handler_is_scheduler_error_in_the_shape_and_counted(rig):
    r = await rig()

    async def crash(**_: Any) -> m.GpuReading:
        raise RuntimeError("bug")

    r.broker.gpu.read = crash  # type: ignore[method-assign]
    async with r.session.get(r.url("/v1/status")) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "scheduler_error")
    assert r.broker.internal_errors() == 1
    r.expected_internal_errors = 1


@pytest.mark.catches_bug
async def test_a_lease_ends_its_job_exactly_once_on_every_path():
    """``async with scheduler.job(...)``: its exit ends the job once, as the block ended: completed;
    failed with a BrokerError's code; cancelled by a cancellation or by a client that left; a bug failed
    as scheduler_error, counted once and raised as that. A job the block ended itself (its answer read
    whole) is left as it ended, whatever comes after."""
    s, _, ops, _ = make_scheduler(small_config())
    ops.states["t"].loaded()
    async with s.job("t", "kt") as job:
        assert s.holder == "t" and job.state == "running" and job.working
    assert (job.outcome, s.holder) == ("completed", None)
    ends = []
    for raised in (
        m.BrokerError("consumer_timeout", "slow", "t"),
        asyncio.CancelledError(),
        ConnectionResetError("client left"),
        RuntimeError("a bug"),
    ):
        with pytest.raises(BaseException) as info:
            async with s.job("t", "kt") as job:
                raise raised
        assert (s.holder, s.slots) == (None, 0)
        ends.append((job.outcome, job.code))
        if isinstance(raised, RuntimeError):  # a bug: answered as scheduler_error, its cause kept
            assert info.value.code == "scheduler_error" and info.value.__cause__ is raised
        else:
            assert info.value is raised
    assert ends == [
        ("failed", "consumer_timeout"),
        ("cancelled", None),
        ("cancelled", None),
        ("failed", "scheduler_error"),
    ]
    assert s.shared.internal_errors == 1  # the bug, once
    with pytest.raises(ConnectionResetError):
        async with s.job("t", "kt") as job:
            job.release("completed", status=200, success=True)  # its answer was read whole
            raise ConnectionResetError("the client left while its last bytes were written")
    assert (job.outcome, job.http, s.holder) == ("completed", 200, None)
    for _ in range(3):
        await asyncio.sleep(0)  # (the books follow the hand-over)
    assert s.stats.jobs == 6 and s.stats.completed == 2 and books_balance(s)


@pytest.mark.catches_bug
async def test_a_bug_while_a_job_is_forwarded_is_scheduler_error_counted_once_and_frees_the_gpu(
    rig, monkeypatch
):
    """A bug in the handler after the grant (here, while the answer is relayed): the lease ends the job
    failed (scheduler_error) and counts it once; the front door answers it without counting it again."""
    r = await rig(sims={"mvoice": {"loaded": True}})

    async def broken_relay(*args: Any, **kw: Any) -> web.StreamResponse:
        raise RuntimeError("a bug")

    monkeypatch.setattr(m, "relay", broken_relay)
    error_of(*await r.post("tts", {"text": "a"}), "scheduler_error")
    assert r.broker.internal_errors() == 1
    r.expected_internal_errors = 1
    assert (r.stats.failed, r.broker.scheduler.holder) == (1, None)
    monkeypatch.undo()
    assert (await r.post("tts", {"text": "b"}))[0] == 200  # the GPU is free


@pytest.mark.catches_bug
async def test_crash_inside_the_scheduler_is_scheduler_error_and_counted():
    s, gpu, _, _ = make_scheduler(small_config())

    async def broken_read(**_: Any) -> m.GpuReading:
        raise RuntimeError("bug")

    gpu.read_memory = broken_read  # type: ignore[method-assign]
    with pytest.raises(m.BrokerError) as info:
        await s.acquire("t", "kt")
    assert info.value.code == "scheduler_error" and s.shared.internal_errors == 1 and s.holder is None


async def test_a_thousand_clients_at_once_get_exactly_one_answer_each_with_bounded_memory(rig):
    gate = asyncio.Event()  # the llm job holds the GPU lock until it is set
    async with held_llm(gate) as ollama:
        r = await rig(sims={"mvoice": {"loaded": True}}, urls={"ollama": ollama.url})
        async with (
            Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
            ) as clients,
        ):
            first = asyncio.ensure_future(
                clients.post(daemon.url("/v1/llm"), json={"model": "m", "prompt": "p"})
            )
            await daemon.until(clients, lambda st: st["scheduler"]["holder"] is not None)
            rss_before = daemon.rss_mib()

            async def one(i: int) -> tuple[int, str | None]:
                async with clients.post(daemon.url("/v1/tts"), json={"text": f"client {i}"}) as resp:
                    body = await resp.read()
                    return resp.status, (json.loads(body)["error"] if resp.status != 200 else None)

            calls = [asyncio.ensure_future(one(i)) for i in range(1000)]
            done = await daemon.until(
                clients,
                lambda st: st["scheduler"]["stats"]["queued"] + st["scheduler"]["stats"]["rejected"] == 1000,
                60,
            )
            stats = done["scheduler"]["stats"]
            rss_peak = daemon.rss_mib()
            assert (stats["queued"], stats["rejected"]) == (64, 936)
            gate.set()
            answers = await asyncio.gather(*calls)
            assert (await first).status == 200
        assert sorted(set(answers)) == [(200, None), (503, "queue_full")]
        assert answers.count((200, None)) == 64 and answers.count((503, "queue_full")) == 936
        synthesized = [rec for rec in r.sims["mvoice"].records if rec.path == "/api/synthesize"]
        assert len(synthesized) == 64  # none lost, none run twice
        print(f"broker RSS {rss_before:.1f} MiB idle, {rss_peak:.1f} MiB with 1,000 clients in")
        assert rss_peak - rss_before < 60, (rss_before, rss_peak)


async def test_no_target_trick_walks_around_a_guard(rig, caplog):
    """Item 1 of issue 10: what a guard matches is byte for byte what the consumer gets; a fragment, empty,
    dot or ';' segments, NULs and malformed escapes are refused; case, encoding and a trailing '/' are
    matched as the route they spell. Nothing reaches mvoice's own unload or load route however lenient."""
    seen: list[tuple[str, str]] = []

    async def anything(request: web.Request) -> web.Response:
        if request.raw_path != "/health":  # (probes: the first round's, and those a job in doubt asks)
            seen.append((request.method, request.raw_path))
        return web.json_response({"loaded": True})

    def tweak(raw: dict[str, Any]) -> None:
        raw["consumers"]["mvoice"]["paths"]["speak"] = {"method": "GET", "path": "/api/synthesize"}
        _unscheduled_show(raw)

    stand_in = StandIn([("*", "/{tail:.*}", anything)])
    async with stand_in as mvoice:
        r = await rig(urls={"mvoice": mvoice.url}, tweak=tweak, total_mib=40000)
        for method, target, expect in TARGET_TRICKS:
            consumer = "ollama" if "/c/ollama/" in target else "mvoice"
            records = seen if consumer == "mvoice" else r.sims["ollama"].records
            before, jobs = len(records), r.stats.jobs
            status, data = await raw_request(r, method, target)
            if isinstance(expect, int):
                code = {400: "bad_request", 403: "forbidden", 404: ("not_found", "no_consumer")}[expect]
                assert status == expect and data.get("error") in code, (target, status, data)
                assert len(records) == before and r.stats.jobs == jobs, target
                continue
            path, kind = expect
            got = (
                records[before][1]
                if records is seen
                else records[before].path + ("?" + records[before].query if records[before].query else "")
            )
            assert len(records) == before + 1 and got == path, (target, records[before:])
            assert r.stats.jobs == jobs + (kind is not None), target
            if kind is not None:
                await until(lambda: len(job_lines(caplog)) == r.stats.jobs)
                assert f"kind={kind} " in job_lines(caplog)[-1], (target, job_lines(caplog)[-1])
    assert r.sims["comfyui"].records == []
    own = {"/api/admin/unload", "/api/admin/load"}
    assert not [(method, path) for method, path in seen if lenient(path) in own], seen


#: Issue 19, item 5: presets' own routes that reached the service through its mount and its port and freed
#: its model behind the broker's back: a for_each unload (its path a pattern: speaches' {item} takes a
#: '/'), and vLLM's sleep, configured with a query. Every spelling is refused; the last target of each is
#: another route, forwarded.
OWN_ROUTE_TRICKS: dict[str, tuple[str, list[str], str]] = {
    "llama-cpp-router": (
        "POST",
        ["/models/unload", "/Models/UNLOAD", "/models/unload/", "/models%2Funload", "/models/%75nload?x=1"],
        "/models/unloaded",
    ),
    "speaches": (
        "DELETE",
        ["/api/ps/m0", "/api/ps/org/m1", "/api/ps/org%2Fm1", "/API/PS/M0/", "/api/ps/%6d0?x=1"],
        "/api/ps",
    ),
    "localai": (
        "POST",
        ["/backend/shutdown", "/Backend/Shutdown/", "/backend%2fshutdown", "/backend/%73hutdown?model=m0"],
        "/backend/shutdowns",
    ),
    "vllm": (
        "POST",
        ["/sleep?level=1", "/sleep?level=2", "/sleep", "/SLEEP?level=1", "/sleep/?level=1", "/%73leep?"],
        "/sleeping",
    ),
}


async def test_every_own_route_of_a_preset_is_refused_through_mount_and_port_whatever_its_spelling(rig):
    extra = {
        service: (
            functools.partial(mgpusim.ServiceSim, service=service, vram_mib=1000, loaded=True),
            {"preset": service, "vram_resident_mib": 1000, "listen": "127.0.0.1:0"},
        )
        for service in OWN_ROUTE_TRICKS
    }
    r = await rig(extra=extra, total_mib=40000)
    for service, (method, targets, other) in OWN_ROUTE_TRICKS.items():
        sim = r.sims[service]
        port = int(r.broker.ports.address(service).rpartition(":")[2])
        for target in targets:
            for prefix, to in ((f"/c/{service}", None), ("", port)):
                before, jobs = len(sim.records), r.stats.jobs
                status, data = await raw_request(r, method, prefix + target, port=to)
                assert (status, data.get("error")) == (403, "forbidden"), (service, prefix, target, data)
                assert "unload route: use POST /v1/consumers/" in data["message"]
                assert len(sim.records) == before and r.stats.jobs == jobs, (service, target)
        for prefix, to in ((f"/c/{service}", None), ("", port)):  # another route: forwarded, a job
            before = len(sim.records)
            status, data = await raw_request(r, method, prefix + other, port=to)
            # (A mount job outside its paths put its record in doubt: the next one may first ask its
            # residency, issue 18's probe on demand; the near miss itself reaches it once.)
            forwarded = [(rec.method, rec.path) for rec in sim.records[before:]]
            assert data.get("error") != "forbidden", (service, other, data)
            assert forwarded.count((method, other)) == 1, (service, other, forwarded)
            assert sim.records[-1].path == other
        assert sim.loaded and sim.unloads == 0, service
        assert service not in mgpusim.MULTI_MODEL or list(sim.models) == ["sim-model"]


async def test_a_head_to_an_own_get_route_is_that_route_and_refused(rig):
    """Found by the attack on issue 19's surfaces: the own-route guard compared the method exactly, but HEAD
    is GET to most servers (aiohttp's add_get, Starlette, Flask all run the GET handler for it): with
    ``unload: {method: GET, path: /api/admin/unload}``, ``HEAD /c/mvoice/api/admin/unload`` went through
    at once, as a read, and unloaded mvoice behind the broker's back. A HEAD to a configured GET route is
    now refused as the GET is, through the mount and the port; a HEAD elsewhere is still a read."""
    called: list[str] = []

    async def unload(request: web.Request) -> web.Response:
        called.append(request.method)
        return web.json_response({"unloaded": True})

    service = web.Application()
    service.router.add_get("/health", _ok)  # (add_get: HEAD too, as aiohttp serves GET routes)
    service.router.add_get("/api/admin/unload", unload)

    def get_unload(raw: dict[str, Any]) -> None:
        raw["consumers"]["mvoice"]["unload"] = {"method": "GET", "path": "/api/admin/unload"}
        raw["consumers"]["mvoice"]["listen"] = "127.0.0.1:0"

    async with StandIn.serving(service) as stand_in:
        r = await rig(urls={"mvoice": stand_in.url}, tweak=get_unload)
        port = int(r.broker.ports.address("mvoice").rpartition(":")[2])
        for method in ("GET", "HEAD"):
            for prefix, to in (("/c/mvoice", None), ("", port)):
                reader, writer = await asyncio.open_connection(r.server.host, to or r.server.port)
                target = prefix + "/api/admin/unload"
                writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                try:
                    head = (await asyncio.wait_for(reader.read(), 10)).decode()
                finally:
                    writer.close()
                assert head.startswith("HTTP/1.1 403 "), (method, prefix, head)
        assert called == []
        async with r.session.head(r.url("/c/mvoice/health")) as resp:  # another route: a read, at once
            assert resp.status == 200


def _a_service_of_get_generate(called: Callable[[web.Request], object]) -> web.Application:
    """A service with GET /health and GET /generate (which tells ``called`` of each request it runs)."""

    async def generate(request: web.Request) -> web.Response:
        called(request)
        return web.json_response({"done": True})

    service = web.Application()
    service.router.add_get("/health", _ok)
    service.router.add_get("/generate", generate)
    return service


async def test_a_head_to_a_get_job_path_is_scheduled_as_gpu_work(rig):
    """Beside the own routes: a ``paths`` entry with method GET is a GPU job even as a GET (api.md), but a
    HEAD to it went through at once, as a read, and the service (which runs the GET handler for a HEAD) did
    the GPU work beside whatever held the GPU. It is now a job (kind ``mount``: the broker reads the GPU
    before it trusts its record again), forwarded as the HEAD it is."""
    ran: list[tuple[str, str | None]] = []
    service = _a_service_of_get_generate(
        lambda request: ran.append((request.method, r.broker.scheduler.holder))
    )

    def get_path(raw: dict[str, Any]) -> None:
        raw["consumers"]["mvoice"]["paths"]["gen"] = {"method": "GET", "path": "/generate"}

    async with StandIn.serving(service) as stand_in:
        r = await rig(urls={"mvoice": stand_in.url}, tweak=get_path)
        for method in ("GET", "HEAD"):
            async with r.session.request(method, r.url("/c/mvoice/generate")) as resp:
                assert resp.status == 200
        assert ran == [("GET", "mvoice"), ("HEAD", "mvoice")]
        assert r.stats.jobs == 2 and r.stats.completed == 2


async def test_a_head_to_a_get_route_that_is_a_path_and_an_unload_is_scheduled_as_the_get_is(rig):
    """Issue 19, item 5: an own route that is also one of the consumer's ``paths`` is scheduled, not
    refused, and the consumer's residency is in doubt after it (Ollama's POST /api/generate). A HEAD to such
    a GET route is the GET to the service: scheduled too (kind mount), not refused as a bare unload route
    is, and in doubt after it as well."""
    ran: list[str] = []
    service = _a_service_of_get_generate(lambda request: ran.append(request.method))

    def both(raw: dict[str, Any]) -> None:
        raw["consumers"]["mvoice"]["paths"]["gen"] = {"method": "GET", "path": "/generate"}
        raw["consumers"]["mvoice"]["unload"] = {"method": "GET", "path": "/generate"}

    async with StandIn.serving(service) as stand_in:
        r = await rig(urls={"mvoice": stand_in.url}, tweak=both)
        state = r.broker.consumers.states["mvoice"]
        for method in ("GET", "HEAD"):
            async with r.session.request(method, r.url("/c/mvoice/generate")) as resp:
                assert resp.status == 200, (method, await resp.read())
            assert state.trusted is False, method  # it may have unloaded itself: in doubt
        assert ran == ["GET", "HEAD"] and r.stats.jobs == 2


async def test_ollamas_generate_is_its_job_and_its_unload_route_so_its_residency_is_in_doubt_after_it(
    rig, caplog
):
    """Ollama's for_each unload is POST /api/generate with keep_alive 0, which is also its llm path: such
    a request through its mount or port is scheduled as kind llm (not refused), and afterwards the broker
    reads the GPU before it trusts its record (the request may have unloaded it). /api/chat leaves it
    trusted."""
    r = await rig(tweak=with_ports, sims={"ollama": {"loaded": True}})
    state = r.broker.consumers.states["ollama"]
    unload = {"model": "sim-model", "keep_alive": 0, "stream": False}
    for base in (r.url("/c/ollama"), port_url(r, "ollama")):
        async with r.session.post(base + "/api/chat", json={"model": "sim-model", "stream": False}) as resp:
            assert resp.status == 200
        assert state.resident is True and state.trusted is True  # a job of its paths: resident, trusted
        jobs, unloads = r.stats.jobs, r.sims["ollama"].unloads
        async with r.session.post(base + "/api/generate", json=unload) as resp:
            assert resp.status == 200 and (await resp.json())["done_reason"] == "unload"
        assert r.stats.jobs == jobs + 1 and r.sims["ollama"].unloads == unloads + 1
        await until(lambda: len(job_lines(caplog)) == r.stats.jobs)
        assert " kind=llm " in job_lines(caplog)[-1]
        assert state.trusted is False  # in doubt: the next job reads the GPU first
    # The same through the facade: one record, whatever the door.
    assert (await r.post("llm", {"model": "sim-model", "prompt": "p", "stream": False}))[0] == 200
    assert state.trusted is False


async def test_idle_websockets_and_hanging_reads_never_starve_probes_or_jobs():
    """Item 4 of issue 10: with one pool of 100 connections, 100 idle WebSockets (ComfyUI tabs) or hanging
    GETs made the consumer's probe fail and delayed everyone's GPU jobs. Here 60 + 60 to consumer a, for
    several health rounds: a stays healthy, jobs of a and b are served, and one more of each is refused."""
    gate = asyncio.Event()
    probes = [0]

    async def health(request: web.Request) -> web.Response:
        probes[0] += 1
        return web.Response(text="ok")

    async def hang(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="late")

    async def idle_socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    async def work(request: web.Request) -> web.Response:
        return web.json_response({"done": True})

    routes = [("GET", "/hang", hang), ("GET", "/ws", idle_socket), ("POST", "/work", work)]
    async with (
        StandIn([("GET", "/health", health), *routes]) as a,
        StandIn([("GET", "/health", _ok), ("POST", "/work", work)]) as b,
    ):
        raw = {
            "listen": "127.0.0.1:0",
            "gpu": {"nvidia_smi": "false"},  # consumers of 0 MiB: no GPU reading
            "health": {"interval_s": 0.05, "timeout_s": 1},
            "routing": {"ja": "a", "jb": "b"},
            "consumers": {
                name: {
                    "url": stand_in.url,
                    "health": {"path": "/health"},
                    "paths": {f"j{name}": {"path": "/work"}},
                    "vram_resident_mib": 0,
                    "max_unscheduled": 60,
                    "max_websockets": 60,
                }
                for name, stand_in in (("a", a), ("b", b))
            },
        }
        app = m.create_app(m.parse_config(raw))
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        broker = app[m.BROKER]
        client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        hanging: list[asyncio.Future[Any]] = []
        try:
            for _ in range(60):
                sockets.append(await client.ws_connect(server.make_url("/c/a/ws")))
            hanging = [asyncio.ensure_future(client.get(server.make_url("/c/a/hang"))) for _ in range(60)]
            await until(lambda: broker.unscheduled.get("a") == 60 and broker.websockets.get("a") == 60)
            seen = probes[0]
            await until(lambda: probes[0] >= seen + 5)  # several health rounds, all while a is this busy
            assert broker.consumers.states["a"].healthy is True
            for kind in ("ja", "jb", "ja"):
                async with client.post(server.make_url(f"/v1/{kind}"), json={}) as resp:
                    assert resp.status == 200 and await resp.json() == {"done": True}
            async with client.get(server.make_url("/c/a/hang")) as resp:
                data = error_of(resp.status, dict(resp.headers), await resp.read(), "too_many_requests")
            assert "consumers.a.max_unscheduled" in data["message"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(server.make_url("/c/a/ws"))
            assert refused.value.status == 429
            async with client.get(server.make_url("/c/b/health")) as resp:
                assert resp.status == 200  # b's own traffic is b's: not limited by a's
            assert broker.consumers.states["a"].healthy is True and broker.scheduler.stats.completed == 3
        finally:
            gate.set()
            for answer in await asyncio.gather(*hanging, return_exceptions=True):
                if isinstance(answer, aiohttp.ClientResponse):
                    answer.release()
            for ws in sockets:
                await ws.close()
            await client.close()
            await server.close()
        text = broker.metrics.render([])
        assert 'mgpumanager_refused_total{consumer="a",limit="max_unscheduled"} 1' in text
        assert 'mgpumanager_refused_total{consumer="a",limit="max_websockets"} 1' in text
        assert broker.unscheduled == {"a": 0, "b": 0} and broker.websockets == {"a": 0}


async def test_audio_files_count_toward_their_consumers_max_unscheduled(rig):
    """docs/api.md, Unscheduled: at most max_unscheduled of a consumer's unscheduled calls are in flight at
    once, its /audio/ files too: an /audio/ file that never ends takes mvoice's one slot, and its mount's
    reads and another file are refused at once (429, naming the key) while it is out; then the slot is
    free again."""
    gate = asyncio.Event()
    files: list[str] = []

    async def audio(request: web.Request) -> web.Response:
        files.append(request.path)
        await gate.wait()
        return web.Response(body=b"RIFF")

    async def voices(request: web.Request) -> web.Response:
        return web.json_response(["anna"])

    def one(raw: dict[str, Any]) -> None:
        raw["consumers"]["mvoice"]["max_unscheduled"] = 1

    routes = [("GET", "/audio/{name}", audio), ("GET", "/api/voices", voices), ("GET", "/health", _ok)]
    async with StandIn(routes) as mvoice:
        r = await rig(urls={"mvoice": mvoice.url}, tweak=one)
        first = asyncio.ensure_future(r.session.get(r.url("/audio/a.wav")))
        try:
            await until(lambda: files == ["/audio/a.wav"])
            for path in ("/c/mvoice/api/voices", "/audio/b.wav"):
                async with r.session.get(r.url(path)) as resp:
                    data = error_of(resp.status, dict(resp.headers), await resp.read(), "too_many_requests")
                assert "consumers.mvoice.max_unscheduled" in data["message"], path
        finally:
            gate.set()
            async with await first as resp:
                assert resp.status == 200 and await resp.read() == b"RIFF"
        async with r.session.get(r.url("/c/mvoice/api/voices")) as resp:
            assert resp.status == 200 and await resp.json() == ["anna"]
    assert files == ["/audio/a.wav"] and r.broker.unscheduled == {"mvoice": 0}


async def test_with_a_token_every_route_but_healthz_needs_it(rig):
    r = await rig(tweak=with_token)
    for method, path in [
        ("GET", "/v1/status"),
        ("POST", "/v1/tts"),
        ("GET", "/audio/x.wav"),
        ("GET", "/nope"),
    ]:
        for auth in (None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", TOKEN):
            headers = {"Authorization": auth} if auth else {}
            async with r.session.request(method, r.url(path), headers=headers) as resp:
                error_of(resp.status, dict(resp.headers), await resp.read(), "unauthorized")
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    async with r.session.get(r.url("/healthz")) as resp:
        assert resp.status == 200
    assert r.sims["mvoice"].records == [] and r.stats.jobs == 0


async def test_the_broker_has_an_icon_for_its_page_and_the_pages_of_its_mounts(rig):
    """Issue 18: a page served through a mount (ComfyUI's UI at /c/comfyui/) asks the broker's root for
    /favicon.ico, which answered 404 at every page view. The broker answers its own small icon, without a
    token (a browser sends none for it), cached for a day; a consumer's own port keeps the consumer's."""

    def setup(raw: dict[str, Any]) -> None:
        with_token(raw)
        raw["consumers"]["comfyui"]["listen"] = "127.0.0.1:0"

    r = await rig(tweak=setup)
    async with r.session.get(r.url("/favicon.ico")) as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        assert (await resp.read()).startswith(b"\x89PNG\r\n\x1a\n")
        assert resp.headers["Cache-Control"] == "public, max-age=86400"
    async with r.session.head(r.url("/favicon.ico")) as resp:
        assert resp.status == 200
    token = {"Authorization": f"Bearer {TOKEN}"}
    async with r.session.get(port_url(r, "comfyui", "/favicon.ico"), headers=token) as resp:
        assert resp.status == 404  # ComfySim's own answer: it has none
    assert [rec.path for rec in r.sims["comfyui"].records] == ["/favicon.ico"]


async def test_the_token_is_stripped_before_forwarding_and_never_logged(rig, caplog):
    # At every level (--log-level debug too): the suite's caplog takes INFO and up, where a debug line that
    # carried the token went unseen.
    caplog.set_level(logging.DEBUG, logger="mgpumanager")
    r = await rig(tweak=with_token, sims={"mvoice": {"loaded": True}})
    headers = {"Authorization": f"bearer {TOKEN}"}
    status, _, _ = await r.post("tts", {"text": "x"}, headers=headers)
    assert status == 200
    assert "Authorization" not in r.sims["mvoice"].records[-1].headers
    async with r.session.get(r.url("/v1/status"), headers=headers) as resp:
        assert resp.status == 200
    assert TOKEN not in caplog.text and TOKEN not in repr(r.broker.config)


async def test_without_a_token_the_authorization_header_is_the_consumers_business(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    assert (await r.post("tts", {"text": "x"}, headers={"Authorization": "Bearer for-mvoice"}))[0] == 200
    assert r.sims["mvoice"].records[-1].headers["Authorization"] == "Bearer for-mvoice"


async def test_a_body_cut_short_or_malformed_is_the_clients_fault_not_a_broker_bug(rig, caplog):
    """A client that closes its connection in the middle of its body (on /v1, a mount or a consumer's port),
    or whose chunked encoding breaks after its headers, made the body's reader raise out of the handler: a
    scheduler_error logged with its traceback and counted in internal_errors, the counter for the broker's
    own bugs. It is a bad_request now, nothing counted, nothing reaches a consumer."""
    r = await rig(tweak=with_ports)
    host, port = r.broker.ports.address("ollama").rsplit(":", 1)
    for where, target in (
        ((r.server.host, r.server.port), "/v1/stt"),
        ((r.server.host, r.server.port), "/c/ollama/api/chat"),
        ((host, int(port)), "/api/chat"),
    ):
        reader, writer = await _partial_post(*where, target, 100, b"0123456789")
        await until(lambda: r.broker.reading == 10)  # the handler reads the body
        writer.close()
        await until(lambda: r.broker.reading == 0)
    assert r.broker.internal_errors() == 0 and 'msg="internal error"' not in caplog.text
    assert r.stats.jobs == 0 and [rec.path for rec in r.sims["ollama"].records] == ["/api/ps"]  # its probe
    # aiohttp's own parser (without its C extension, AIOHTTP_NO_EXTENSIONS) hands a chunk that breaks after
    # the headers to the body's reader: the client gets the broker's 400 (aiohttp's own plain-text one if
    # both came in one read, before any handler).
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state), env={"AIOHTTP_NO_EXTENSIONS": "1"}) as daemon:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"POST /v1/stt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)  # (a later read: the handler reads the body by then)
        writer.write(b"zz\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        async with aiohttp.ClientSession() as session:
            st = await daemon.status(session)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400" and st["scheduler"]["stats"]["internal_errors"] == 0, answer
    if b"application/json" in head:
        assert json.loads(body)["message"] == "the request body did not arrive whole: TransferEncodingError"
        # aiohttp reads what is left of the body after the answer, and logged its error as an "Unhandled
        # exception" with a traceback: one line now (Daemon fails its test on a traceback in the log).
        assert 'msg="bad http request" error=TransferEncodingError' in daemon.log


async def test_a_slow_uploader_holds_no_lock_and_blocks_nobody(rig):
    r = await rig(sims={"mvoice": {"loaded": True}})
    reader, writer = await asyncio.open_connection(r.server.host, r.server.port)
    body = b'{"model": "m", "prompt": "slowly"}'
    writer.write(f"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    for byte in body[:10]:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)
        assert r.broker.scheduler.holder is None and r.stats.jobs == 0  # not even queued yet
    assert (await r.post("tts", {"text": "meanwhile"}))[0] == 200  # others are served meanwhile
    writer.write(body[10:])
    await writer.drain()
    head = await asyncio.wait_for(reader.readline(), 10)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_oversized_headers_are_refused_by_the_parser_and_the_broker_goes_on(rig):
    r = await rig()
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        # aiohttp's parser answers before any handler runs: its own plain-text 400 (docs/how-it-works.md,
        # "Known limits").
        assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain")
        writer.close()
        assert (await daemon.status(r.session))["scheduler"]["stats"]["jobs"] == 0
    assert 'msg="bad http request" error="Got more than 8190 bytes' in daemon.log
    assert "Traceback" not in daemon.log  # one line in the journal, however many such requests


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/tts"),
        ("DELETE", "/v1/llm"),
        ("POST", "/healthz"),
        ("POST", "/audio/x.wav"),
        ("GET", "/v1/reload"),
    ],
)
async def test_unknown_methods_on_known_paths_are_405_in_the_error_shape(rig, method, path):
    r = await rig()
    async with r.session.request(method, r.url(path)) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "method_not_allowed")
        assert resp.headers["Allow"]


@pytest.mark.parametrize("given", ["", TOKEN[:-1], TOKEN + "x", TOKEN[1:], " "])
async def test_near_miss_tokens_are_refused(rig, given):
    r = await rig(tweak=with_token)
    async with r.session.get(r.url("/v1/status"), headers={"Authorization": f"Bearer {given}"}) as resp:
        error_of(resp.status, dict(resp.headers), await resp.read(), "unauthorized")


async def test_a_non_utf8_authorization_header_is_401_not_a_crash(rig):
    r = await rig(tweak=with_token)
    reader, writer = await asyncio.open_connection(r.server.host, r.server.port)
    writer.write(
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize("parser", ["C", "Python"])
async def test_no_byte_of_a_malformed_request_reaches_the_log(rig, parser):
    """Found by a review: a malformed request's log line kept aiohttp's message up to its first colon, which
    with aiohttp's pure-Python parser (AIOHTTP_NO_EXTENSIONS, or no C extension built) can be the client's
    own bytes: a path, a chunk's size line, a status line quoted whole. They reached the journal, a token
    with them. The line says aiohttp's words or the error's kind, never the request's bytes."""
    r = await rig()
    env = {"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "Python" else {}
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state), env=env) as daemon:
        for request, later in (
            (b"GET SECRET1 HTTP/1.1\r\nHost: x\r\n\r\n", b""),  # a path that is no path
            (b"GET /a?token=SECRET2 HTTP/1.1 x\r\nHost: x\r\n\r\n", b""),  # a status line
            (b"POST /v1/stt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz SECRET3\r\n", b""),
            (b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz SECRET4\r\n"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
            writer.write(request)
            await writer.drain()
            if later:  # (after the answer's head: aiohttp reads the rest of the body after answering)
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                writer.write(later)
                await writer.drain()
            # (aiohttp's C parser takes no notice of a chunk that breaks after the answer: it reads on for
            # its lingering time, 10 s, before it closes; the Python one closes at once, the line logged.)
            with contextlib.suppress(ConnectionResetError, asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(), 2 if later else 10)
            writer.close()
    assert daemon.log.count('msg="bad http request"') >= 3 and "SECRET" not in daemon.log, daemon.log


async def test_a_body_whose_chunks_break_while_it_is_read_is_a_bad_request(rig):
    """Found by running the suite on Debian 13's aiohttp (3.11): with aiohttp's pure-Python parser
    (AIOHTTP_NO_EXTENSIONS, or no C extension built; the pinned aiohttp's too), a chunk that breaks while a
    job's body is read comes as a RequestPayloadError, which the body's reading did not take for the
    client's fault: the job was the broker's own bug, answered 500 internal_error with the client's bytes in
    its message and a traceback quoting them in the journal. It is 400 bad_request, the bytes never said."""
    r = await rig()
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state), env={"AIOHTTP_NO_EXTENSIONS": "1"}) as daemon:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        head = (
            b"POST /v1/stt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        writer.write(head)
        await writer.drain()
        # The head is read (its 100 Continue came): the break comes apart from it, in a read of the body.
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"5\r\nhello\r\nzz SECRET5\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        status = await daemon.status(r.session)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    error = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert error["error"] == "bad_request" and "did not arrive whole" in error["message"], error
    assert status["internal_errors"] == 0 and r.sims["mvoice"].records == []
    assert "SECRET" not in daemon.log, daemon.log


async def test_the_token_stays_out_of_the_log_even_in_a_malformed_request(rig):
    r = await rig()
    raw = copy.deepcopy(r.raw)
    with_token(raw)
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(
            f"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\x01\r\n\r\n".encode()
        )
        await writer.drain()
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"HTTP/1.0 400")
        writer.close()
    assert 'msg="bad http request"' in daemon.log and TOKEN not in daemon.log


async def test_announcing_a_body_allocates_nothing_bodies_grow_as_they_arrive(rig):
    """Item 5 of issue 10: 40 connections announcing 16 MiB and sending 70 bytes took the broker from 48 to
    689 MiB (a buffer of the announced size each, at once)."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon:
        assert (await daemon.status(r.session))["scheduler"]["stats"]["jobs"] == 0
        before = peak_rss_mib(daemon.proc.pid)
        conns = [
            await _partial_post("127.0.0.1", daemon.port, "/v1/stt", 16 * m.MiB, b"x" * 70) for _ in range(40)
        ]
        try:
            await asyncio.sleep(0.3)
            async with r.session.post(daemon.url("/v1/stt"), data=b"ok") as resp:  # served meanwhile
                assert resp.status == 200
            grown = peak_rss_mib(daemon.proc.pid) - before
        finally:
            for _, writer in conns:
                writer.close()
    print(f"peak RSS grew {grown:.1f} MiB with 40 bodies of 16 MiB announced")
    assert grown < 64, grown  # 640 MiB if the announced sizes were allocated


async def test_a_body_must_arrive_within_body_timeout_s(rig):
    def quick(raw: dict[str, Any]) -> None:
        raw["scheduler"]["body_timeout_s"] = 0.3

    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=quick)
    reader, writer = await _partial_post(r.server.host, r.server.port, "/v1/stt", 100, b"slow")
    try:
        status, body = await read_answer(reader)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 408")
    assert body["error"] == "request_timeout" and "body_timeout_s 0.3" in body["message"]
    assert r.stats.jobs == 0 and r.broker.reading == 0 and r.sims["mvoice"].records == []


async def test_bodies_being_read_at_once_hold_at_most_max_bodies_mib(rig):
    def small(raw: dict[str, Any]) -> None:
        raw["scheduler"] |= {"max_body_mib": 1, "max_bodies_mib": 1}

    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=small)
    big = b"a" * m.MiB
    reader, writer = await _partial_post(r.server.host, r.server.port, "/v1/stt", len(big), big[:-1000])
    try:
        await until(lambda: r.broker.reading == len(big) - 1000)
        async with r.session.post(r.url("/v1/stt"), data=b"b" * 2000) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "too_many_requests")
        assert "max_bodies_mib" in data["message"] and data["consumer"] == "mvoice"
        writer.write(big[-1000:])
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert [len(rec.body) for rec in r.sims["mvoice"].records] == [len(big)]
    assert r.broker.reading == 0 and r.stats.jobs == 1


async def test_an_empty_body_is_never_refused_for_the_bodies_being_read(rig):
    """An empty body holds nothing: even while the bodies being read hold more than max_bodies_mib (a
    reload lowered it), it is no too_many_requests. (A body that came whole with its head is taken at once;
    an empty one must not meet the budget's check, which 0 more bytes than a budget already passed fail.)"""

    def two(raw: dict[str, Any]) -> None:
        raw["scheduler"] |= {"max_body_mib": 1, "max_bodies_mib": 2}

    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=two)
    big = b"a" * m.MiB
    conns = [
        await _partial_post(r.server.host, r.server.port, "/v1/stt", len(big), big[:-1000]) for _ in range(2)
    ]
    try:
        await until(lambda: r.broker.reading == 2 * (len(big) - 1000))
        r.raw["scheduler"]["max_bodies_mib"] = 1
        r.config_path.write_text(yaml.safe_dump(r.raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert resp.status == 200
        async with r.session.post(r.url("/v1/tts"), data=b"") as resp:
            assert resp.status == 200, await resp.read()
    finally:
        for _, writer in conns:
            writer.close()


@pytest.mark.parametrize(
    ("target", "length", "first"),
    [
        ("/v1/stt", 65 * m.MiB, b"HTTP/1.1 413"),
        ("/c/ollama/api/chat", 65 * m.MiB, b"HTTP/1.1 413"),
        ("/v1/stt#x", 5, b"HTTP/1.1 400"),
        ("/v1/stt", 5, b"HTTP/1.1 100 Continue"),
    ],
)
async def test_expect_100_continue_is_refused_before_any_continue(rig, target, length, first):
    """Item 5 of issue 10: a body over max_body_mib got `100 Continue` first, so the client sent it."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    reader, writer = await _partial_post(
        r.server.host, r.server.port, target, length, b"", extra="Expect: 100-continue\r\n"
    )
    try:
        if first.endswith(b"Continue"):
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(first)
            await asyncio.wait_for(reader.readline(), 10)  # the blank line after 100 Continue
            writer.write(b"hello")
            await writer.drain()
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        else:
            status, body = await read_answer(reader)
            assert status.startswith(first)
            assert body["error"] == {b"413": "payload_too_large", b"400": "bad_request"}[first[9:12]]
    finally:
        writer.close()
    assert r.stats.jobs == (1 if first.endswith(b"Continue") else 0)


async def test_expect_100_continue_takes_a_body_of_exactly_max_body_mib(rig):
    """The limit is on a body *over* max_body_mib: one of exactly 1 MiB under max_body_mib 1 gets its
    100 Continue and runs, as it does without Expect; one byte more is refused before any Continue."""

    def small(raw: dict[str, Any]) -> None:
        raw["scheduler"]["max_body_mib"] = 1

    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=small)
    expect = "Expect: 100-continue\r\n"
    reader, writer = await _partial_post(
        r.server.host, r.server.port, "/v1/stt", m.MiB + 1, b"", extra=expect
    )
    try:
        status, body = await read_answer(reader)
        assert status.startswith(b"HTTP/1.1 413") and body["error"] == "payload_too_large"
    finally:
        writer.close()
    reader, writer = await _partial_post(r.server.host, r.server.port, "/v1/stt", m.MiB, b"", extra=expect)
    try:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 100 Continue")
        await asyncio.wait_for(reader.readline(), 10)  # the blank line after 100 Continue
        writer.write(b"a" * m.MiB)
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert [len(rec.body) for rec in r.sims["mvoice"].records if rec.path == "/api/transcribe"] == [m.MiB]


async def test_a_refused_expectation_closes_its_connection_as_its_answer_says(rig):
    """Found by the attack on issue 19's surfaces: the answer to an Expect refused before the body (413 to
    a body over max_body_mib, 417 to an unknown expectation) says ``Connection: close``, but the connection
    stayed open: aiohttp lingered for the body that the client, told not to send it, never sent, until the
    broker's header timeout cut it, counted and logged as a ``header_timeout`` (a warning: a client too slow
    to send its head), which this client was not. It is closed once the answer is sent."""

    def short_heads(raw: dict[str, Any]) -> None:
        raw["http"] = {"header_timeout_s": 3}

    r = await rig(tweak=short_heads)
    for length, extra, status in (
        (65 * m.MiB, "Expect: 100-continue\r\n", b"413"),
        (5, "Expect: something\r\n", b"417"),
    ):
        reader, writer = await _partial_post(
            r.server.host, r.server.port, "/v1/stt", length, b"", extra=extra
        )
        try:
            answer = await asyncio.wait_for(reader.read(), 30)  # to its end: the connection closes
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 " + status) and b"\r\nConnection: close\r\n" in answer, answer
    assert "header_timeout" not in r.broker.connections.closed, r.broker.connections.closed


async def test_expect_100_continue_on_a_consumers_port_is_refused_before_any_continue(rig):
    """A consumer's port serves by its mount's rules, but its route had aiohttp's own Expect handler: a body
    over max_body_mib, or a request without the token, got `100 Continue` first, so the client sent it."""

    def ports_and_token(raw: dict[str, Any]) -> None:
        with_ports(raw)
        with_token(raw)

    r = await rig(tweak=ports_and_token)
    host, port = r.broker.ports.address("ollama").rsplit(":", 1)
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    for length, extra, expected in ((65 * m.MiB, auth, b"413"), (5, "", b"401"), (5, auth, b"100")):
        reader, writer = await _partial_post(
            host, int(port), "/api/chat", length, b"", extra="Expect: 100-continue\r\n" + extra
        )
        try:
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.startswith(b"HTTP/1.1 " + expected), (length, extra, status)
        finally:
            writer.close()
    assert [rec.path for rec in r.sims["ollama"].records] == ["/api/ps"]  # its probe, no chat


async def test_a_large_body_is_held_once_not_copied(rig):
    """Memory, not speed: a 48 MiB body raises the broker's peak RSS by well under twice its size."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    body = os.urandom(48 * m.MiB)
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state)) as daemon:
        assert (await daemon.status(r.session))["scheduler"]["stats"]["jobs"] == 0
        before = peak_rss_mib(daemon.proc.pid)
        async with r.session.post(daemon.url("/v1/stt"), data=body) as resp:
            assert resp.status == 200 and (await resp.json())["bytes"] == len(body)
        grown = peak_rss_mib(daemon.proc.pid) - before
    transcribed = [rec.body for rec in r.sims["mvoice"].records if rec.path == "/api/transcribe"]
    assert transcribed == [body]  # byte for byte, sent with its Content-Length (not chunked)
    assert "Transfer-Encoding" not in r.sims["mvoice"].records[-1].headers
    print(f"peak RSS grew {grown:.1f} MiB for a 48 MiB body")
    assert grown < 72, grown


def ws_frame(payload: bytes, *, opcode: int = 2, rsv1: bool = False) -> bytes:
    """One masked client frame, FIN set; ``rsv1`` marks it compressed (permessage-deflate)."""
    key = os.urandom(4)
    head = bytes([0x80 | (0x40 if rsv1 else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    mask = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return head + key + masked


def deflate_bomb(inflated: int) -> bytes:
    """A permessage-deflate payload that inflates to ``inflated`` zero bytes (some 1,000 times smaller)."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(m.MiB)
    body = b"".join(squeeze.compress(chunk) for _ in range(inflated // m.MiB))
    return (body + squeeze.flush(zlib.Z_SYNC_FLUSH)).removesuffix(b"\x00\x00\xff\xff")


async def raw_websocket(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A WebSocket opened by hand, offering permessage-deflate; its reader, writer and the 101's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer, head


async def close_code_of(reader: asyncio.StreamReader) -> int:
    """The code of the close frame the server sends (server frames are not masked)."""
    while True:
        first, second = await asyncio.wait_for(reader.readexactly(2), 10)
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(n)
        if first & 0x0F == 8:
            return int.from_bytes(payload[:2], "big")


async def test_websocket_messages_are_bounded_either_way_and_compression_refused(rig):
    """Issue 19, item 2: the broker accepted permessage-deflate from clients, and a message of about 60 KB
    inflated to 60 MiB (under max_body_mib, the limit then): 16 sockets took it to 1.3 GiB. Now, through a
    mount and through a port alike, deflate is refused; a compressed frame sent anyway closes the socket
    (1002) without being inflated; a message larger than max_ws_message_mib closes it with 1009, whichever
    side sent it, and one of exactly that size passes."""
    limit = m.MiB  # max_ws_message_mib: 1
    got: list[int] = []
    closes: list[int | None] = []

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT and msg.data.startswith("send "):
                    await ws.send_bytes(b"c" * int(msg.data[5:]))
                else:
                    got.append(len(msg.data))
        finally:
            closes.append(ws.close_code)
        return ws

    async with StandIn([("GET", "/system_stats", _ok), ("GET", "/ws", socket)]) as comfy:
        r = await rig(urls={"comfyui": comfy.url})
        raw = copy.deepcopy(r.raw)
        comfy_port = free_port()
        raw["consumers"]["comfyui"]["listen"] = f"127.0.0.1:{comfy_port}"
        raw["scheduler"]["max_ws_message_mib"] = 1
        async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
            for port, path in ((daemon.port, "/c/comfyui/ws"), (comfy_port, "/ws")):
                url = f"http://127.0.0.1:{port}{path}"
                got.clear()
                closes.clear()
                ws = await r.session.ws_connect(url, compress=15, max_msg_size=0)
                assert ws.compress == 0  # the broker took no permessage-deflate
                await ws.send_bytes(b"a" * limit)  # exactly the limit: relayed
                await until(lambda: got == [limit])
                await ws.send_str(f"send {limit}")
                answer = await ws.receive(timeout=10)
                assert answer.type == aiohttp.WSMsgType.BINARY and len(answer.data) == limit
                await ws.send_bytes(b"a" * (limit + 1))  # one byte more: refused, closed 1009 both ways
                closing = await ws.receive(timeout=10)
                assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1009)
                await ws.close()
                await until(lambda: closes == [1009])
                assert got == [limit]
                ws = await r.session.ws_connect(url, max_msg_size=0)
                await ws.send_str(f"send {limit + 1}")  # the consumer's message is refused as well
                closing = await ws.receive(timeout=10)
                assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1009)
                await ws.close()
                # Its side is closed too (1009; unless the broker's close frame waits behind the rest of
                # the message it is still sending, which the broker does not read: then it is cut off).
                await until(lambda: len(closes) == 2)
                # A compressed frame nobody agreed to: a protocol error, never inflated or relayed.
                reader, writer, head = await raw_websocket(port, path)
                assert b"sec-websocket-extensions" not in head.lower()
                bomb = deflate_bomb(60 * m.MiB)
                before = peak_rss_mib(daemon.proc.pid)
                writer.write(ws_frame(bomb, rsv1=True))
                await writer.drain()
                assert await close_code_of(reader) == 1002
                writer.close()
                await until(lambda: len(closes) == 3)
                grown = peak_rss_mib(daemon.proc.pid) - before
                print(f"{path}: a {len(bomb)} byte frame of 60 MiB inflated: peak RSS grew {grown:.1f} MiB")
                assert grown < 30, grown  # 60 MiB and more if it was inflated
                assert got == [limit]
            async with r.session.get(daemon.url("/metrics")) as resp:
                families = _families(await resp.text())
            refused = "mgpumanager_websocket_refused_total"
            assert _value(families, refused, consumer="comfyui", sender="client") == 4
            assert _value(families, refused, consumer="comfyui", sender="consumer") == 2
    assert 'msg="websocket message refused" consumer=comfyui sender=client code=1009' in daemon.log
    assert 'msg="websocket message refused" consumer=comfyui sender=consumer code=1009' in daemon.log
    assert 'msg="websocket message refused" consumer=comfyui sender=client code=1002' in daemon.log


async def whole_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP answer from a raw connection: its status and its body (by its Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    body = await asyncio.wait_for(reader.readexactly(int(length.group(1)) if length else 0), 10)
    return int(head.split()[1]), body


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Wait for the other end to close the connection (a reset counts too); what it sent until then."""
    with contextlib.suppress(ConnectionResetError):
        return await asyncio.wait_for(reader.read(), 10)
    return b""


async def test_connections_without_a_request_head_or_idle_after_an_answer_are_closed_on_every_listener(rig):
    """Issue 19, item 1: aiohttp kept a connection that sent nothing for an hour. Now one without a whole
    request head within http.header_timeout_s of its opening is closed, also one that trickles its head in,
    and one that begins another head after an answer; one idle for http.keepalive_s after its answer too.
    A connection whose request is being handled (an event stream) is left alone. The broker's port and a
    consumer's alike; each close counted by reason."""

    def quick(raw: dict[str, Any]) -> None:
        with_ports(raw)
        raw["http"] = {"header_timeout_s": 0.3, "keepalive_s": 0.6}

    r = await rig(tweak=quick)
    ports = [r.server.port, int(r.broker.ports.address("ollama").rpartition(":")[2])]
    async with r.session.get(r.url("/v1/events")) as stream:
        await stream.content.readline()  # ": mgpumanager events"
        for port in ports:
            silent = await asyncio.open_connection("127.0.0.1", port)
            trickling = await asyncio.open_connection("127.0.0.1", port)
            trickling[1].write(b"GET / HTTP/1.1\r\n")

            async def trickle(writer: asyncio.StreamWriter = trickling[1]) -> None:
                with contextlib.suppress(ConnectionError):
                    while True:
                        await asyncio.sleep(0.05)
                        writer.write(b"X")
                        await writer.drain()

            trickler = asyncio.create_task(trickle())
            kept = await asyncio.open_connection("127.0.0.1", port)
            resumed = await asyncio.open_connection("127.0.0.1", port)
            for _, writer in (kept, resumed):
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await whole_answer(kept[0]))[0] == 200
            assert (await whole_answer(resumed[0]))[0] == 200
            resumed[1].write(b"GET / HTTP/1.1\r\nHo")  # another head, never finished
            for reader, _ in (silent, trickling, kept, resumed):
                await closed_by_peer(reader)
            trickler.cancel()
            for _, writer in (silent, trickling, kept, resumed):
                writer.close()
        assert r.broker.connections.closed == {"header_timeout": 6, "keepalive": 2}
        # The event stream, busy all along, is still open and live.
        r.broker.events.publish("test", n=1)
        while not (line := await asyncio.wait_for(stream.content.readline(), 10)).startswith(b"data:"):
            pass
        assert json.loads(line[5:])["n"] == 1
    async with r.session.get(r.url("/metrics")) as resp:
        families = _families(await resp.text())
    closed = "mgpumanager_connections_closed_total"
    assert _value(families, closed, reason="header_timeout") == 6
    assert _value(families, closed, reason="keepalive") == 2


async def test_a_reload_gives_the_connections_deadlines_set_from_then_on_its_new_http_times(rig):
    """docs/operations.md, on reload: http.header_timeout_s and http.keepalive_s apply to the deadlines set
    from then on. A broker started with an hour for each, reloaded to 0.3 s: a connection opened after the
    reload that sends nothing, and one idle after its answer, are closed (under the hour they would wait)."""

    def patient(raw: dict[str, Any]) -> None:
        raw["http"] = {"header_timeout_s": 3600, "keepalive_s": 3600}

    r = await rig(tweak=patient)
    r.raw["http"] = {"header_timeout_s": 0.3, "keepalive_s": 0.3}
    r.config_path.write_text(yaml.safe_dump(r.raw, sort_keys=False))
    assert "changed http" in await r.broker.reload()
    silent = await asyncio.open_connection("127.0.0.1", r.server.port)
    kept = await asyncio.open_connection("127.0.0.1", r.server.port)
    kept[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await whole_answer(kept[0]))[0] == 200
    for reader, writer in (silent, kept):
        assert await closed_by_peer(reader) == b""
        writer.close()
    assert r.broker.connections.closed == {"header_timeout": 1, "keepalive": 1}


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
async def test_the_daemon_times_connections_out_under_either_event_loop(rig, uvloop):
    """Issue 19, item 1: the connections' timeouts hold under uvloop and asyncio alike (the broker wraps the
    protocol of each, a plain protocol to either loop): a silent connection, and an idle one after its
    answer, on the broker's port and a consumer's."""
    if uvloop:
        pytest.importorskip("uvloop")
    r = await rig()
    raw = copy.deepcopy(r.raw)
    comfy_port = free_port()
    raw["consumers"]["comfyui"]["listen"] = f"127.0.0.1:{comfy_port}"
    raw["http"] = {"header_timeout_s": 0.3, "keepalive_s": 0.3}
    async with Daemon(raw, r.tmp_path, sim_smi(r.state), uvloop=uvloop) as daemon:
        for port, path in ((daemon.port, "/healthz"), (comfy_port, "/system_stats")):
            silent = await asyncio.open_connection("127.0.0.1", port)
            kept = await asyncio.open_connection("127.0.0.1", port)
            kept[1].write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert (await whole_answer(kept[0]))[0] == 200
            for reader, writer in (silent, kept):
                assert await closed_by_peer(reader) == b""
                writer.close()
        async with r.session.get(daemon.url("/metrics")) as resp:
            families = _families(await resp.text())
    closed = "mgpumanager_connections_closed_total"
    assert _value(families, closed, reason="header_timeout") == 2
    assert _value(families, closed, reason="keepalive") >= 2  # (and the test's own between its requests)
    assert f"loop={'uvloop' if uvloop else 'asyncio'}" in daemon.log


async def test_a_slow_reader_of_a_large_answer_keeps_its_connection_while_it_reads(rig):
    """Issue 19, item 1: the keep-alive time counts from the end of a request's handling, and a large answer
    (/v1/status with 20,000 processes, 5.7 MB) may still be on its way then. A client that reads it slowly
    gets it whole before its connection is closed; one that stopped reading is cut keepalive_s later.

    (The slow reader takes a first part, then nothing until the broker has closed its connection for
    keep-alive with the rest still in the broker, then the rest: it comes whole. It read 0.1 s after each
    512 KiB, with a keepalive_s of 0.3 s: on a busy machine it had not taken enough when the cut came.)"""

    def patient(raw: dict[str, Any]) -> None:
        raw["http"] = {"keepalive_s": 2.0}  # the time the slow reader has for the rest, once closed

    r = await rig(tweak=patient)
    strangers(r.gpu, 20000)
    conns = []
    for _ in range(2):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer waits in the broker
        sock.connect(("127.0.0.1", r.server.port))
        conns.append(await asyncio.open_connection(sock=sock))
    for _, writer in conns:
        writer.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
    (slow, _), (stopped, stopped_writer) = conns
    mine = stopped_writer.get_extra_info("sockname")
    await until(lambda: len(r.broker.connections.open) == 2)
    (theirs,) = [
        c for c in r.broker.connections.open.values() if c.transport.get_extra_info("peername") == mine
    ]
    head = await asyncio.wait_for(slow.readuntil(b"\r\n\r\n"), 10)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    assert length > 5_000_000
    got = 0
    while got < 512 * 1024:
        got += len(await asyncio.wait_for(slow.read(65536), 10))
    await until(lambda: r.broker.connections.closed == {"keepalive": 2})  # both, the slow one's rest unsent
    assert theirs.transport.get_write_buffer_size() > 0  # (what the stopped one was not sent, in the broker)
    while got < length:
        chunk = await asyncio.wait_for(slow.read(65536), 10)
        if not chunk:
            break
        got += len(chunk)
    assert got == length and await closed_by_peer(slow) == b""
    await until(lambda: r.broker.connections.closed == {"keepalive": 2})
    await until(lambda: theirs.transport.get_write_buffer_size() == 0)  # keepalive_s later: cut
    head = await asyncio.wait_for(stopped.readuntil(b"\r\n\r\n"), 10)
    assert len(head) + len(await closed_by_peer(stopped)) < length  # the rest was never sent
    for _, writer in conns:
        writer.close()


async def test_metrics_show_the_client_connections_open_and_how_many_may_be(rig, caplog):
    """docs/operations.md: ``mgpumanager_client_connections`` is the client connections open now and
    ``mgpumanager_client_connections_limit`` how many may be (RLIMIT_NOFILE less the reserve): the figure
    the start's ``msg="client connections" allowed=...`` line gives, which connections opening leave alone."""
    caplog.set_level(logging.INFO)
    r = await rig()

    async def gauges() -> tuple[float, float]:
        async with r.session.get(r.url("/metrics")) as resp:
            families = _families(await resp.text())
        return (
            _value(families, "mgpumanager_client_connections"),
            _value(families, "mgpumanager_client_connections_limit"),
        )

    limit = m.descriptor_limit()
    reserve = m.descriptor_reserve(r.broker.config, limit)
    allowed = max(limit - reserve, limit // 4)
    assert f'msg="client connections" allowed={allowed} descriptors={limit} reserve={reserve}' in caplog.text
    before, shown = await gauges()
    assert shown == allowed
    idle = [await asyncio.open_connection("127.0.0.1", r.server.port) for _ in range(5)]
    try:
        await until(lambda: len(r.broker.connections.open) >= before + 5)
        assert await gauges() == (before + 5, allowed)
    finally:
        for _, writer in idle:
            writer.close()


async def test_when_descriptors_run_short_event_streams_and_slow_uploads_go_by_age_before_a_new_client(rig):
    """Issue 19, item 1, attacked: connections that sent a whole head and then wait on their client (an event
    stream, a body trickling in) hold descriptors as idle ones do. When descriptors run short they go too,
    the longest idle first (since their request began), rather than the new client being turned away."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    connections = r.broker.connections
    stream = await asyncio.open_connection("127.0.0.1", r.server.port)
    stream[1].write(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(stream[0].readuntil(b"mgpumanager events\n\n"), 10)
    upload = await _partial_post("127.0.0.1", r.server.port, "/v1/tts", 100, b"x" * 10)
    await until(lambda: len(connections.open) == len(connections.idle) == 2)
    connections.allowed = 2  # as if the descriptors ran short here
    first = await asyncio.open_connection("127.0.0.1", r.server.port)
    first[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await whole_answer(first[0]) == (200, b"ok\n")
    await closed_by_peer(stream[0])  # the oldest went
    second = await asyncio.open_connection("127.0.0.1", r.server.port)
    second[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await whole_answer(second[0]) == (200, b"ok\n")
    await closed_by_peer(upload[0])  # then the upload, idle longer than the first client
    assert connections.closed == {"descriptors": 2}
    for _, writer in (stream, upload, first, second):
        writer.close()
    assert r.stats.jobs == 0 and r.broker.reading == 0


def listening_backlog(port: int) -> tuple[int, int]:
    """The backlog the kernel keeps for the socket listening on ``port`` (``ss``'s Send-Q for a listening
    socket), and the most it allows (net.core.somaxconn)."""
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("no ss (iproute2) to read a listening socket's backlog")
    argv = [ss, "-ltnH", f"sport = :{port}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10)
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    return int(out.stdout.split()[2]), somaxconn


@pytest.mark.parametrize(("nofile", "backlog"), [(1024, 128), (4096, 128), (16384, 512), (65536, 1024)])
async def test_the_listen_backlog_is_a_32nd_of_the_descriptor_limit_between_128_and_1024(
    rig, nofile, backlog
):
    """A burst of 2,000 connects at once overflowed aiohttp's backlog of 128 now and then: the kernel dropped
    those SYNs, and their clients sent them again a second or more later. Under the unit's 65,536
    descriptors the broker listens with 1024; where descriptors are few, with 128 as before (the reserve
    keeps that many for the connections one turn of the loop may accept)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < nofile:
        pytest.skip(f"the hard RLIMIT_NOFILE is {hard}")
    r = await rig()
    async with Daemon(r.raw, r.tmp_path, sim_smi(r.state), nofile=nofile) as daemon:
        kept, somaxconn = listening_backlog(daemon.port)
        assert kept == min(backlog, somaxconn)
    reserve = m.descriptor_reserve(m.parse_config(r.raw), nofile)
    assert f"descriptors={nofile} reserve={reserve}" in daemon.log


@pytest.mark.parametrize("uvloop", [True, False], ids=["uvloop", "asyncio"])
async def test_idle_connections_never_take_the_descriptors_that_healthz_and_jobs_need(rig, uvloop):
    """Issue 19, item 1, end to end: under systemd's default soft limit of 1024 descriptors, 1,050 connections
    that sent nothing (no token needed) made /healthz, jobs and /v1/status fail with connection reset, and
    nothing was logged. Now, with soft and hard RLIMIT_NOFILE both at 1024 and 1,100 idle connections (to a
    consumer's port and to the broker's), /healthz and a job on the main port answer 200 within 15 s: the
    longest-idle connections were closed, keeping descriptors for the broker's own work (its connection to
    the consumer, nvidia-smi). http.header_timeout_s is 60 here, so that only this can have freed them."""
    if uvloop:
        pytest.importorskip("uvloop")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1500:
        pytest.skip(f"this test opens 1,100 connections: its hard RLIMIT_NOFILE is {hard}")
    if soft != resource.RLIM_INFINITY and soft < 1500:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY else min(hard, 4096), hard)
        )

    def patient(raw: dict[str, Any]) -> None:
        raw["http"] = {"header_timeout_s": 60}

    r = await rig(tweak=patient, sims={"mvoice": {"loaded": False}})
    raw = copy.deepcopy(r.raw)
    comfy_port = free_port()
    raw["consumers"]["comfyui"]["listen"] = f"127.0.0.1:{comfy_port}"
    idle: list[asyncio.StreamWriter] = []
    try:
        async with Daemon(raw, r.tmp_path, sim_smi(r.state), nofile=1024, uvloop=uvloop) as daemon:
            for _ in range(11):
                opened = await asyncio.gather(
                    *(
                        asyncio.wait_for(
                            asyncio.open_connection("127.0.0.1", (comfy_port, daemon.port)[i % 2]), 5
                        )
                        for i in range(100)
                    ),
                    return_exceptions=True,
                )
                idle += [
                    writer
                    for result in opened
                    if not isinstance(result, BaseException)
                    for writer in result[1:]
                ]
            started = time.monotonic()

            async def served() -> None:
                async with aiohttp.ClientSession() as fresh:
                    async with fresh.get(daemon.url("/healthz")) as resp:
                        assert resp.status == 200
                    async with fresh.post(daemon.url("/v1/tts"), json={"text": "x"}) as resp:
                        assert resp.status == 200, await resp.read()
                    async with fresh.get(daemon.url("/v1/status")) as resp:
                        assert resp.status == 200
                    async with fresh.get(daemon.url("/metrics")) as resp:
                        families = _families(await resp.text())

                closed = _value(families, "mgpumanager_connections_closed_total", reason="descriptors")
                allowed = _value(families, "mgpumanager_client_connections_limit")
                assert closed >= 1100 - allowed and allowed < 1024
                assert _value(families, "mgpumanager_client_connections") <= allowed

            await asyncio.wait_for(served(), 15)
            took = time.monotonic() - started
            print(f"{len(idle)} idle connections: /healthz, a job and /v1/status in {took:.2f} s")
    finally:
        for writer in idle:
            writer.close()
    assert len(idle) == 1100
    assert "msg=descriptors soft=1024 hard=1024" in daemon.log
    assert 'msg="descriptors short: closing the longest-idle client connections"' in daemon.log
    assert f"loop={'uvloop' if uvloop else 'asyncio'}" in daemon.log


async def test_a_consumer_connect_failing_for_want_of_descriptors_is_the_brokers_shortage_not_consumer_gone(
    rig, caplog
):
    """Issue 19, item 1: a connect to a consumer that failed because the broker had no descriptor left
    (EMFILE) counted as "consumer gone": a running ComfyUI hold was abandoned, its render left running while
    the GPU went to the next job. Now it is the broker's own shortage: the hold polls on, the consumer is not
    marked down, and the shortage is logged and counted (and idle client connections closed to make room)."""
    done = asyncio.Event()

    def closing(data: Any) -> web.Response:
        resp = web.json_response(data)
        resp.force_close()  # every poll needs a new connection (a new descriptor)
        return resp

    async def prompt(request: web.Request) -> web.Response:
        return closing({"prompt_id": "p1"})

    polls: list[float] = []

    async def history(request: web.Request) -> web.Response:
        polls.append(time.monotonic())
        return closing({"p1": {"status": {"completed": True}}} if done.is_set() else {})

    def slow_polls(raw: dict[str, Any]) -> None:
        raw["consumers"]["comfyui"]["paths"]["image"]["hold_until"]["poll_s"] = 0.3

    routes = [("GET", "/system_stats", _ok), ("POST", "/prompt", prompt), ("GET", "/history/p1", history)]
    async with StandIn(routes) as comfy:
        r = await rig(urls={"comfyui": comfy.url}, tweak=slow_polls)
        async with r.session.post(r.url("/v1/image"), json={"prompt": {}}) as resp:
            assert resp.status == 200
        await until(lambda: r.broker.scheduler.holder == "comfyui" and polls)
        exhausted = ("mgpumanager_descriptors_exhausted_total", ())
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Between two polls (poll_s apart): no new descriptor for anyone in this process.
        resource.setrlimit(resource.RLIMIT_NOFILE, (0, hard))
        try:
            await until(lambda: r.broker.metrics.counters.get(exhausted, 0) >= 3, 5)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert r.broker.scheduler.holder == "comfyui"  # the hold goes on
        assert r.broker.consumers.states["comfyui"].healthy is not False
        done.set()
        await until(lambda: r.broker.scheduler.holder is None)
    assert r.stats.hold_abandoned == 0 and r.stats.hold_poll_errors >= 3
    assert 'msg="out of file descriptors" what="GET http://127.0.0.1:' in caplog.text
    assert "hold abandoned" not in caplog.text


async def test_a_reload_that_replaces_the_token_closes_every_connection_authenticated_with_the_old_one(rig):
    """Issue 19, item 9, end to end: after a reload that replaced auth.token, event streams and WebSockets
    opened with the old token kept delivering. Now the reload closes every connection authenticated with
    it before it answers: an event stream, WebSockets through a mount and a consumer's port (1008), idle
    keep-alive connections on both ports; the connection that asked for the reload gets its answer (which
    says so) and is closed after it. A connection that never showed the token serves on."""
    new_token = "n3w-token-0123456789abcdef"
    r = await rig(tweak=with_token)
    raw = copy.deepcopy(r.raw)
    comfy_port = free_port()
    raw["consumers"]["comfyui"]["listen"] = f"127.0.0.1:{comfy_port}"
    old = {"Authorization": f"Bearer {TOKEN}"}
    request = "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
        stream = await r.session.get(daemon.url("/v1/events"), headers=old)
        await stream.content.readline()
        sockets = [
            await r.session.ws_connect(f"http://127.0.0.1:{port}{path}", headers=old)
            for port, path in ((daemon.port, "/c/comfyui/ws"), (comfy_port, "/ws"))
        ]
        for ws in sockets:
            assert (await _ws_json(ws))["type"] == "status"
        kept = []
        for port, path in ((daemon.port, "/v1/status"), (comfy_port, "/system_stats")):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request.format(path=path, token=TOKEN).encode())
            assert (await whole_answer(reader))[0] == 200
            kept.append((reader, writer))
        public = await asyncio.open_connection("127.0.0.1", daemon.port)
        public[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await whole_answer(public[0]))[0] == 200
        async with r.session.post(daemon.url("/v1/reload"), headers=old) as resp:  # the same token: nothing
            assert not any("revoked" in change for change in (await resp.json())["changes"])
        raw["auth"]["token"] = new_token
        daemon.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        asker = await asyncio.open_connection("127.0.0.1", daemon.port)
        asker[1].write(
            f"POST /v1/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        status, body = await whole_answer(asker[0])
        assert status == 200
        changes = json.loads(body)["changes"]
        # (seven: the test's own session kept the connection of the first reload alive)
        assert "closed 7 connections authenticated with a revoked token" in changes, changes
        await closed_by_peer(asker[0])
        # Closed before the answer went out: each finds it so now.
        for reader, _ in kept:
            await closed_by_peer(reader)
        for ws in sockets:
            closing = await ws.receive(timeout=10)
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1008)
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            await asyncio.wait_for(stream.content.read(), 10)
        stream.release()
        await until(lambda: len(r.sims["comfyui"].ws_closes) == 2)
        # The token-less connection serves on; the old token is refused, the new one let in.
        public[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await whole_answer(public[0]))[0] == 200
        async with r.session.get(daemon.url("/v1/status"), headers=old) as resp:
            assert resp.status == 401
        new = {"Authorization": f"Bearer {new_token}"}
        async with r.session.get(daemon.url("/metrics"), headers=new) as resp:
            families = _families(await resp.text())
        assert _value(families, "mgpumanager_connections_closed_total", reason="token_revoked") == 7
        for _, writer in (*kept, public, asker):
            writer.close()
        for ws in sockets:
            await ws.close()
    assert 'msg="token revoked: closing its connections" connections=7' in daemon.log
    assert TOKEN not in daemon.log and new_token not in daemon.log


#: Every admin route, as (method, path, JSON body).
ADMIN_ROUTES = (
    ("POST", "/v1/consumers/mvoice/unload", None),
    ("POST", "/v1/consumers/mvoice/load", None),
    ("POST", "/v1/reload", None),
    ("POST", "/v1/reserve", {"for_s": 60, "reason": "a client's"}),
    ("DELETE", "/v1/reserve", None),
)


async def test_a_clients_token_runs_jobs_and_reads_status_but_opens_no_admin_route_end_to_end(
    rig, capsys, tmp_path
):
    """Issue 23, end to end: once clients are configured, no route but /healthz, the page and its icon
    answers without a token, on the broker's port and a consumer's; a client's token runs jobs (/v1/{kind}, a
    mount, a consumer's port, a WebSocket through a mount, /audio/) and reads status, events and metrics,
    and is refused on every admin route (403 forbidden, nothing done), which the admin's token opens. The
    command line with a client's token file: ps shows the clients, unload says why it is refused."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    raw = copy.deepcopy(r.raw)
    with_clients(raw)
    mvoice_port = free_port()
    raw["consumers"]["mvoice"]["listen"] = f"127.0.0.1:{mvoice_port}"
    port = f"http://127.0.0.1:{mvoice_port}"
    wa, admin = bearer(WA_TOKEN), bearer(TOKEN)
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
        daemon.token = WA_TOKEN
        for method, url in (
            ("GET", daemon.url("/v1/status")),
            ("GET", daemon.url("/v1/events")),
            ("GET", daemon.url("/metrics")),
            ("POST", daemon.url("/v1/tts")),
            ("POST", daemon.url("/c/mvoice/api/synthesize")),
            ("GET", daemon.url("/audio/x.wav")),
            ("GET", daemon.url("/c/comfyui/ws")),
            ("POST", daemon.url("/v1/reload")),
            ("POST", f"{port}/api/synthesize"),
            ("GET", f"{port}/health"),
        ):
            async with r.session.request(method, url, json={"text": "x"}) as resp:
                error_of(resp.status, dict(resp.headers), await resp.read(), "unauthorized")
        for path in ("/healthz", "/", "/favicon.ico"):
            async with r.session.get(daemon.url(path)) as resp:
                assert resp.status == 200, path
        # A client's token: jobs, through every door.
        status, headers, _ = await post_as(r.session, daemon, "tts", WA_TOKEN, {"text": "one"})
        assert status == 200
        async with r.session.get(daemon.url(headers["X-Audio-Path"]), headers=wa) as resp:
            assert resp.status == 200 and (await resp.read()).startswith(b"RIFF")
        for url in (daemon.url("/c/mvoice/api/synthesize"), f"{port}/api/synthesize"):
            async with r.session.post(url, json={"text": "two"}, headers=wa) as resp:
                assert resp.status == 200
        ws = await r.session.ws_connect(daemon.url("/c/comfyui/ws"), headers=wa)
        assert (await _ws_json(ws))["type"] == "status"
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await r.session.ws_connect(daemon.url("/c/comfyui/ws"))
        assert refused.value.status == 401
        # ... and reads.
        st = await daemon.status(r.session)
        assert st["clients"]["wa"]["jobs_total"] == 3 and st["clients"]["batch"]["jobs_total"] == 0
        async with r.session.get(daemon.url("/metrics"), headers=wa) as resp:
            families = _families(await resp.text())
        assert _value(families, "mgpumanager_client_jobs_total", client="wa", status="completed") == 3
        assert _value(families, "mgpumanager_client_gpu_seconds_total", client="wa") > 0
        events = await ring_events(r.session, daemon)
        jobs = [e for e in events if e["event"] in ("queued", "granted", "started", "finished")]
        assert len(jobs) == 12 and {e["client"] for e in jobs} == {"wa"}
        # Every admin route: forbidden for a client, and nothing done.
        for method, path, body in ADMIN_ROUTES:
            async with r.session.request(method, daemon.url(path), json=body, headers=wa) as resp:
                error = error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")
            assert (
                f"{method} {path} is an admin route" in error["message"] and "client wa's" in error["message"]
            )
        st = await daemon.status(r.session)
        assert st["gpu"] and st["gpus"][0]["reservation"] is None and st["consumers"]["mvoice"]["loaded"]
        assert r.sims["mvoice"].unloads == 0 and "msg=reload " not in daemon.log
        async with r.session.post(daemon.url("/v1/consumers/mvoice/unload"), headers=admin) as resp:
            assert resp.status == 200 and r.sims["mvoice"].unloads == 1  # the admin's token opens them
        # The command line with a client's token: ps shows the clients; unload is refused, saying why.
        token_file = tmp_path / "wa-token"
        token_file.write_text(WA_TOKEN + "\n")
        rc, out, err = await verb(capsys, "ps", "--url", daemon.url(""), "--token-file", str(token_file))
        assert rc == 0, err
        clients = out[out.index("CLIENT") :].splitlines()
        assert re.split(r"  +", clients[0].strip()) == [
            *("CLIENT", "PRIORITY", "MAX QUEUED", "RUNNING", "QUEUED", "JOBS", "GPU TIME")
        ]
        assert clients[1].split()[:6] == ["wa", "4", "-", "0", "0", "3"]
        assert clients[2].split()[:6] == ["batch", "0", "-", "0", "0", "0"]
        rc, out, err = await verb(
            capsys, "unload", "mvoice", "--url", daemon.url(""), "--token-file", str(token_file)
        )
        assert (rc, out) == (2, "")
        assert "is an admin route: it needs the admin's token (auth.token), and this is client wa's" in err
        assert err.rstrip().endswith(
            "(forbidden): give --token-file the admin's token (auth.token_file), not a client's"
        )
    for sim in r.sims.values():
        assert all("Authorization" not in rec.headers for rec in sim.records)  # never forwarded
    assert WA_TOKEN not in daemon.log and TOKEN not in daemon.log


async def test_a_reload_adds_removes_and_rotates_clients_and_closes_what_a_gone_token_let_in(rig):
    """Issue 23: a reload that removes client wa and gives batch a new token closes the connections those
    tokens let in (an event stream each, and a keep-alive connection that showed kept's token and then
    batch's: it showed a token that is gone), before it answers; the admin's and kept's (whose token stays,
    its max_queued changed) go on, and a new client's token is let in at once. The changes name the clients,
    never a token."""
    r = await rig()
    raw = copy.deepcopy(r.raw)
    kept = "kept-token-0123456789abcd"
    with_clients(raw, kept={"token": kept})
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
        streams = {}
        for name, token in (("wa", WA_TOKEN), ("batch", BATCH_TOKEN), ("admin", TOKEN), ("kept", kept)):
            streams[name] = await r.session.get(daemon.url("/v1/events"), headers=bearer(token))
            await streams[name].content.readline()
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        for token in (kept, BATCH_TOKEN):
            writer.write(
                f"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            )
            assert (await whole_answer(reader))[0] == 200
        rotated, added = "batch-token-rotated-0123456789", "new-client-token-0123456789"
        raw["auth"]["clients"] = {
            "batch": {"token": rotated, "priority": 0},
            "new": {"token": added},
            "kept": {"token": kept, "max_queued": 5},
        }
        daemon.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(daemon.url("/v1/reload"), headers=bearer(TOKEN)) as resp:
            assert resp.status == 200
            changes = (await resp.json())["changes"]
        assert {
            "added client new",
            "removed client wa",
            "new token for client batch",
            "changed client kept",
        } <= set(changes)
        assert "closed 3 connections authenticated with a revoked token" in changes, changes
        await closed_by_peer(reader)
        writer.close()
        for name in ("wa", "batch"):
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
                await asyncio.wait_for(streams[name].content.read(), 10)
            streams[name].release()
        for token, expected in ((WA_TOKEN, 401), (BATCH_TOKEN, 401), (rotated, 200), (added, 200)):
            async with r.session.get(daemon.url("/v1/status"), headers=bearer(token)) as resp:
                assert resp.status == expected
                if expected == 200:
                    assert set((await resp.json())["clients"]) == {"batch", "new", "kept"}
        for name in ("admin", "kept"):  # open still: their tokens stayed (they hear of the reload)
            seen = b""
            while not seen.startswith(b"event: reload"):
                seen = await asyncio.wait_for(streams[name].content.readline(), 10)
                assert seen, f"{name}'s stream was closed"
            streams[name].close()
    for token in (WA_TOKEN, BATCH_TOKEN, rotated, added):
        assert token not in daemon.log and all(token not in change for change in changes)


async def test_a_token_that_a_reload_gives_to_someone_else_closes_what_it_let_in_as_whom_it_was(rig):
    """Issue 19's rotated token and issue 23's removed client, where the token itself stays valid: a reload
    that rotates the admin's token and gives the old one to a client (the admin's power is gone from it),
    and one that renames client wa (wa is removed: "removed client wa") keeping its token. What each token
    let in was let in as the admin, or as wa: it is closed, as for any rotated token or removed client. The
    registry knew tokens alone, so both event streams stayed open (the admin's, let in with the admin's old
    token, reading on after the rotation)."""
    r = await rig()
    raw = copy.deepcopy(r.raw)
    with_clients(raw)
    async with Daemon(raw, r.tmp_path, sim_smi(r.state)) as daemon:
        streams = {}
        for name, token in (("admin", TOKEN), ("wa", WA_TOKEN), ("batch", BATCH_TOKEN)):
            streams[name] = await r.session.get(daemon.url("/v1/events"), headers=bearer(token))
            await streams[name].content.readline()
        new_admin = "new-admin-token-0123456789"
        raw["auth"]["token"] = new_admin
        raw["auth"]["clients"] = {
            "owner": {"token": TOKEN},  # the admin's old token, a client's now
            "wb": {"token": WA_TOKEN, "priority": 4},  # wa, renamed
            "batch": {"token": BATCH_TOKEN, "priority": 0},
        }
        daemon.config.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(daemon.url("/v1/reload"), headers=bearer(TOKEN)) as resp:
            assert resp.status == 200
            changes = (await resp.json())["changes"]
        assert {"removed client wa", "added client wb", "added client owner"} <= set(changes), changes
        # The two streams, and the connection that asked, after its answer (with the admin's old token).
        assert "closed 3 connections authenticated with a revoked token" in changes, changes
        for name in ("admin", "wa"):
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
                await asyncio.wait_for(streams[name].content.read(), 10)
            streams[name].release()
        seen = b""
        while not seen.startswith(b"event: reload"):  # batch's stays: its token and name did
            seen = await asyncio.wait_for(streams["batch"].content.readline(), 10)
            assert seen, "batch's stream was closed"
        streams["batch"].close()
        async with r.session.post(daemon.url("/v1/reload"), headers=bearer(TOKEN)) as resp:
            assert error_of(resp.status, dict(resp.headers), await resp.read(), "forbidden")


# =====================================================================================================
# 12. The benchmark's arithmetic
# Bench.py's lower bound and overtaking on made-up traces.
# =====================================================================================================


def made_up_job(
    index: int,
    kind: str,
    priority: int,
    queued: tuple[int, float],
    granted: tuple[int, float],
    ended: float,
    hold_ended: float | None = None,
) -> bench.MixJob:
    job = bench.MixJob(index, kind, 0.0, f"r{index}", status=200, priority=priority, job=index)
    job.queued, job.granted, job.ended = queued, granted, (granted[0] + 1, ended)
    job.hold_ended = None if hold_ended is None else (granted[0] + 2, hold_ended)
    return job


def test_bench_lower_bound_is_the_work_plus_the_swaps_no_order_avoids():
    burst = bench.trace_burst()
    kinds = [kind for _, kind in burst.jobs]
    assert (kinds.count("tts"), kinds.count("image")) == (8, 4) and burst.jobs[-1][0] == 1.0
    # All the work (8 x 0.2 + 4 x 2 s) and one swap (mvoice's memory 0.5 s, ComfyUI's load 4 s): TTS first.
    assert bench.lower_bound(burst) == pytest.approx(8 * 0.2 + 4 * 2 + 0.5 + 4)

    def bound(*jobs: tuple[float, str]) -> float:
        return bench.lower_bound(bench.Trace("t", "", jobs, {"mvoice": 2, "comfyui": 2}))

    # TTS first then the one swap (6.7 s) beats the image first and a swap back (8.2 s).
    assert bound((0.0, "image"), (0.0, "tts")) == pytest.approx(0.2 + 4.5 + 2)
    # Nothing runs before it arrives, and no swap starts before a job needs it.
    assert bound((0.0, "tts"), (10.0, "tts")) == pytest.approx(10.2)
    assert bound((0.0, "tts"), (5.0, "image")) == pytest.approx(5 + 4.5 + 2)


def test_bench_overtaking_counts_later_jobs_of_no_higher_effective_priority():
    image = made_up_job(0, "image", 2, (0, 0.0), (20, 5.0), 5.5, 7.0)
    jobs = [
        image,
        made_up_job(1, "tts", 2, (1, 0.1), (2, 1.0), 1.2),  # overtakes the image for 0.2 s
        made_up_job(2, "tts", 3, (3, 0.2), (5, 1.2), 1.4),  # higher priority: passes it, no overtaking
        made_up_job(3, "image", 2, (6, 0.3), (8, 2.0), 2.1, 2.6),  # an image too: until its hold ended
    ]
    bench.overtaking(jobs, aging_s=60)
    assert image.overtaken_s == pytest.approx(0.2 + 0.6) and image.overtakers == [1, 3]
    assert [j.overtaken_s for j in jobs[1:]] == [0, 0, 0]

    # Aging: a job waiting long enough reaches the later job's level, and then it counts.
    old = made_up_job(0, "image", 2, (0, 0.0), (9, 140.0), 142.0)
    late = made_up_job(1, "tts", 3, (1, 100.0), (2, 130.0), 130.5)
    bench.overtaking([old, late], aging_s=60)  # at 130 s the image is at 2 + 2 levels, the TTS at 3
    assert old.overtaken_s == pytest.approx(0.5) and old.overtakers == [1]
    old.overtakers.clear()
    bench.overtaking([old, late], aging_s=1000)
    assert old.overtaken_s == 0 and old.overtakers == []

    # Strict arrival order: nobody is overtaken.
    strict = [made_up_job(i, "tts", 2, (i, 0.1 * i), (10 + 2 * i, 1.0 + i), 1.5 + i) for i in range(4)]
    bench.overtaking(strict, aging_s=60)
    assert all(j.overtaken_s == 0 and not j.overtakers for j in strict)


def admission_round(
    n: int, to_queue: float, healthz: list[float], served: int | None = None, overflowed: int | None = 0
) -> dict[str, Any]:
    return {
        "n": n,
        "to_queue": to_queue,
        "first": 0.01,
        "events": n,
        "healthz": healthz,
        "healthz_ok": True,
        "quiet": [0.001],
        "served": n if served is None else served,
        "lost": 0 if served is None else n - served,
        "overflowed": overflowed,
        "errors": ["200"],
    }


@pytest.mark.parametrize(
    ("large_s", "healthz", "served", "met"),
    [
        (3.9, [0.001] * 99 + [0.5], None, (True, True, True)),  # 1.95x; one slow answer of 100 is the p99 ...
        (4.1, [0.001] * 99 + [0.5], None, (True, True, False)),  # 2.05x per job
        (3.9, [0.001] * 98 + [0.5, 0.5], None, (True, False, True)),  # ... two are not
        (3.9, [0.001] * 100, 1999, (True, False, True)),  # a job not served
    ],
)
def test_bench_admission_compares_the_cost_per_job_and_healthz_p99_with_their_targets(
    tmp_path, large_s, healthz, served, met
):
    """Measurement 9's targets (issue 21): queueing 2,000 jobs costs at most 2x per job what 200 cost, and
    /healthz's p99 stays under 20 ms while they are queued (every job served in the end)."""
    b = bench.Bench(quick=False, workdir=tmp_path, children=bench.Children(tmp_path))
    b.report_admission(
        [admission_round(200, 0.2, [0.001] * 100), admission_round(2000, large_s, healthz, served)]
    )
    assert [row.met for row in b.rows] == list(met)
    assert b.rows[2].broker == f"{large_s / 2000 / (0.2 / 200):.1f}x" and b.rows[2].target == "<= 2x"
    assert [ok for _, ok, _ in b.targets] == [met[2], met[0], met[1]]
    analysis = "\n".join(b.analysis())  # a target not met is explained there
    assert ("- Admission: queueing 200 jobs at once costs 1.00 ms per job" in analysis) == (not met[2])
    assert ("- /healthz while jobs are queued: p99" in analysis) == (healthz.count(0.5) > 1)


def test_bench_admission_says_when_connects_overflowed_the_listen_backlog(tmp_path):
    """A burst whose connects overflowed the broker's listen backlog (the kernel's ListenOverflows rose)
    waits for their SYNs to be sent again, 1 s or more later: measurement 9 says how many, and puts a
    ratio missed that way down to that, not to a cost growing with the queue."""
    b = bench.Bench(quick=False, workdir=tmp_path, children=bench.Children(tmp_path))
    b.report_admission(
        [admission_round(200, 0.2, [0.001]), admission_round(2000, 8.0, [0.001], overflowed=94)]
    )
    assert "; 94 connects overflowed the listen backlog" in b.rows[1].broker and not b.rows[2].met
    analysis = "\n".join(b.analysis())
    assert "94 of the 2,000 connects overflowed the broker's listen backlog" in analysis
    assert "the cost grows with the queue" not in analysis


def test_bench_reading_cost_reads_through_the_reader_it_names_and_both_agree(nvml_stub, tmp_path):
    """Measurement 10's tool: `bench.py reading-cost` times mgpumanager's own reader, the one it names (or
    exits 3): over one simulated GPU, NVML through the stub and nvidia-smi through mgpusim's stand-in give
    the same figures."""
    gpu = mgpusim.SimGPU(tmp_path / "gpu.json")
    gpu.allocate("comfyui", 13000, pid=os.getpid(), process=cmdline0(os.getpid()))
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(nvml_stub.parent),
        "MGPUSIM_STATE": str(tmp_path / "gpu.json"),
    }
    outs = {}
    for reader in ("nvml", "nvidia-smi"):
        argv = [PY, str(HERE / "bench.py"), "reading-cost", "--reader", reader, "--n", "3", "--calls", "10"]
        res = subprocess.run(
            [*argv, "--smi", shlex.join(sim_smi(tmp_path / "gpu.json"))],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        outs[reader] = json.loads(res.stdout)
        assert outs[reader]["reader"] == reader and len(outs[reader]["whole"]) == 3
    assert outs["nvml"]["reading"] == outs["nvidia-smi"]["reading"]
    assert outs["nvml"]["reading"]["processes"] == [[os.getpid(), 13000]]
    assert len(outs["nvml"]["call"]) == 10 and outs["nvidia-smi"]["call"] == []
    res = subprocess.run(  # NVML does not load (no state: the stub's "Driver Not Loaded"): not measured
        [PY, str(HERE / "bench.py"), "reading-cost", "--reader", "nvml", "--n", "1"],
        env={k: v for k, v in env.items() if k != "MGPUSIM_STATE"},
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 3 and "NVML nvmlInit: Driver Not Loaded" in json.loads(res.stdout)["error"]


# =====================================================================================================
# 13. The documentation
# The README as a front door, its manual in docs/ whole and linked, every error code and config key in it.
# =====================================================================================================

DOCS = HERE / "docs"
#: The manual, one file per topic (README.md, "Where the rest is").
MANUAL = (
    "how-it-works.md",
    "configuration.md",
    "operations.md",
    "api.md",
    "security.md",
    "development.md",
    "decisions.md",
)


def markdown_prose(text: str) -> str:
    """A Markdown text without its fenced blocks and inline code: what links and headings are read from."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`]*`", "", text)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped (``_`` and
    ``-`` kept), spaces as ``-``, a repeated one numbered."""
    anchors: set[str] = set()
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n, unique = 0, slug
        while unique in anchors:
            n += 1
            unique = f"{slug}-{n}"
        anchors.add(unique)
    return anchors


def relative_links(path: Path) -> list[str]:
    """Every link target in a Markdown file that is not a URL of its own (http, mailto)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", markdown_prose(path.read_text()))
    return [t for t in targets if not re.match(r"^[a-z]+:", t)]


def test_the_readme_is_a_front_door_that_links_every_file_of_the_manual():
    readme = (HERE / "README.md").read_text()
    words = len(readme.split())  # as wc -w counts them
    assert words < 2000, f"README.md has {words} words: keep it a front door"
    linked = {t.partition("#")[0] for t in relative_links(HERE / "README.md")}
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert pages == sorted(MANUAL), pages
    assert {f"docs/{name}" for name in MANUAL} <= linked, linked
    # What a newcomer runs, and what CI runs as the README's own commands.
    assert all(f"make {target}" in readme for target in ("demo", "test", "lint", "deploy"))
    # Its minimal config is one the loader takes.
    example = re.search(r"^## A minimal config$.*?^```yaml\n(.*?)^```", readme, re.M | re.S)
    assert example is not None
    config = m.parse_config(yaml.safe_load(example.group(1)))
    assert set(config.routing) == {"tts", "stt", "llm", "image"} and len(config.consumers) == 4


DEPLOY_SHIMS = {
    # ssh HOST CMD: runs CMD here; scp: copies, HOST: dropped; sudo: -u USER runs the rest (the config check),
    # anything else is only written down; curl: writes down its URL and answers as /healthz does.
    "ssh": 'shift; echo "ssh $*" >> "$LOG"; exec bash -c "$*"',
    "scp": 'args=(); for a; do args+=("${a#*:}"); done; exec cp "${args[@]}"',
    "sudo": 'echo "sudo $*" >> "$LOG"; if [ "$1" = -u ]; then shift 2; exec "$@"; fi',
    "id": "exit 0",
    "curl": 'echo "curl $*" >> "$LOG"; echo ok',
}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(
    ("listen", "healthz"),
    [("127.0.0.1:18999", "http://127.0.0.1:18999/healthz"), ("[::]:8771", "http://[::1]:8771/healthz")],
)
def test_make_deploy_checks_on_the_host_before_installing_and_waits_for_the_configs_own_port(
    tmp_path, listen, healthz
):
    """Found walking the README: ``make deploy CONFIG=other.yaml`` waited for /healthz on 127.0.0.1:8770
    whatever the config's ``listen``, so a broker deployed on another port was reported as not coming up
    (exit 1, the journal shown). It asks the address --check printed on the host now. ssh, scp, sudo and
    curl are stand-ins that run or write down what the target asks the host."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in {**DEPLOY_SHIMS, "python3": f'exec {shlex.quote(PY)} "$@"'}.items():
        (shims / name).write_text(f"#!/bin/bash\n{body}\n")
        (shims / name).chmod(0o755)
    config = tmp_path / "other.yaml"
    text = (HERE / "consumers.yaml").read_text()
    config.write_text(re.sub(r"^listen: .*$", f'listen: "{listen}"', text, count=1, flags=re.M))
    log, stage = tmp_path / "host.log", tmp_path / "stage"
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "LOG": str(log)}
    res = subprocess.run(
        ["make", "-s", "deploy", "HOST=mrock", f"STAGE={stage}", f"CONFIG={config}"],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    asked = log.read_text().splitlines()
    check = asked.index("sudo -u mgpumanager python3 mgpumanager.py --check --config consumers.yaml")
    installs = [i for i, line in enumerate(asked) if line.startswith("sudo install ")]
    assert installs and check < min(installs), asked  # checked on the host, as its user, before installing
    assert "sudo install -D -m 0640 -g mgpumanager consumers.yaml /etc/mgpumanager/consumers.yaml" in asked
    assert asked[-1] == f"curl -fsS {healthz}", asked
    assert (stage / "consumers.yaml").read_text() == config.read_text()
    assert '"$@"' in (stage / "mgpumanager-cli").read_text()  # the launcher passes the verb's arguments on


def test_every_relative_link_in_the_readme_and_the_manual_resolves():
    checked = 0
    for page in [HERE / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in relative_links(page):
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            assert resolved.exists(), f"{page.name}: {target} (no such file)"
            if anchor:
                assert resolved.suffix == ".md", f"{page.name}: {target} (an anchor into no Markdown file)"
                anchors = heading_anchors(resolved.read_text())
                assert anchor in anchors, f"{page.name}: {target} (no such heading)"
            checked += 1
    assert checked > 50, checked


def documented_table(page: str, first_column: str) -> dict[str, list[str]]:
    """The rows of the tables in docs/<page> whose header starts with ``first_column``: each code span of a
    row's first cell (`` `unload`, `load` `` is two) -> the row's other cells."""
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in (DOCS / page).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if not cells:
            in_table = False
        elif cells[0] == first_column:
            in_table = True
        elif in_table:
            rows |= dict.fromkeys(re.findall(r"`([^`]+)`", cells[0]), cells[1:])
    return rows


def test_every_error_code_is_documented_with_its_status_and_retryable():
    table = documented_table("api.md", "code")
    documented = {code: (int(cells[0]), cells[1] == "yes") for code, cells in table.items()}
    assert documented == m.ERROR_CODES


def test_every_config_key_is_documented_with_the_default_the_loader_gives():
    raw = {"url": "http://127.0.0.1:1", "health": {"path": "/"}, "paths": {"x": {"path": "/x"}}}
    loaded = m.parse_config({"consumers": {"a": {**raw, "vram_resident_mib": 1}}})
    # Every key the loader reads, with the value it gives when the key is left out (None: no plain default).
    keys: dict[str, Any] = {"listen": f"{loaded.listen_host}:{loaded.listen_port}", "routing.{kind}": None}
    keys |= dict.fromkeys(("audio_proxy", "auth.token_file", "unload.for_each", "paths.{kind}.hold_until"))
    for part in ("gpu", "scheduler", "health", "http", "auth"):
        section = getattr(loaded, part)
        keys |= {f"{part}.{f.name}": getattr(section, f.name) for f in dataclasses.fields(section)}
    # gpu.yield (``yield_`` in Python, a keyword) is off by default; its keys' defaults are the block's.
    keys["gpu.yield"] = keys.pop("gpu.yield_")
    keys |= {f"gpu.yield.{f.name}": f.default for f in dataclasses.fields(m.YieldConfig)}
    keys["state_file"] = loaded.state_file
    consumer = loaded.consumers["a"]
    named = {"paths": "paths.{kind}"}  # the field's key as the table names it
    for f in dataclasses.fields(consumer):
        if f.name not in ("name", "from_preset"):  # not keys: the consumer's name, the preset's bookkeeping
            keys[named.get(f.name, f.name)] = getattr(consumer, f.name)

    table = documented_table("configuration.md", "key")
    missing = sorted(set(keys) - set(table))
    assert not missing, f"not in docs/configuration.md: {missing}"
    for key, value in keys.items():
        default = re.fullmatch(r"`([^`]*)`", table[key][0])
        shown = default.group(1) if default else None
        if isinstance(value, bool):
            assert shown == str(value).lower(), (key, table[key][0], value)
        elif isinstance(value, (int, float)) and shown is not None and re.fullmatch(r"[\d.]+", shown):
            assert float(shown) == value, (key, table[key][0], value)
        elif key == "listen":
            assert shown == value, (key, table[key][0], value)


# =====================================================================================================
# 14. Attack findings (branch attack)
# Each test fails on main for the defect its docstring names; none is fixed here.
# =====================================================================================================


@contextlib.asynccontextmanager
async def _ollama_at_work_and_a_new_mvoice(rig: Any) -> AsyncIterator[tuple[Any, ...]]:
    """A rig whose GPU an llm job holds (until ``gate`` is set; ``running`` is its answer), with a second
    mvoice service, model loaded, at a URL of its own: ``(r, new, service, gate, running)``."""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(sims={"mvoice": {"loaded": True}}, urls={"ollama": ollama.url})
        new = mgpusim.MvoiceSim("mvoice-new", r.gpu, loaded=True)
        async with StandIn.serving(new.app) as service:
            running = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
            await until(lambda: r.broker.scheduler.holder == "ollama")
            yield r, new, service, gate, running


async def _reload_mvoice_to(r: Rig, url: str, without_stt: bool = False) -> None:
    """Reload r's config with mvoice at ``url`` (a new service, as the docs call it); ``without_stt``: its
    stt path (and the stt route) gone too."""
    raw = copy.deepcopy(r.raw)
    raw["consumers"]["mvoice"]["url"] = url
    if without_stt:
        del raw["consumers"]["mvoice"]["paths"]["stt"]
        del raw["routing"]["stt"]
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    async with r.session.post(r.url("/v1/reload")) as resp:
        assert "new url for mvoice" in (await resp.json())["changes"]


async def test_attack_a_job_queued_before_a_reload_that_gives_its_consumer_a_new_url_goes_to_the_new_url(rig):
    """A reload that gives a consumer a new URL makes it "a new service" (docs/operations.md, Reloading), but
    a job queued before the reload is still sent to the old URL (Job.target is the config at admission):
    the operator who moved mvoice to a new port and stopped the old one sees the queued job answered 502
    consumer_unreachable, and the new, healthy service is marked unhealthy by the old URL's refusal."""
    async with _ollama_at_work_and_a_new_mvoice(rig) as (r, new, service, gate, running):
        queued = asyncio.ensure_future(r.post("tts", {"text": "queued"}))
        await until(lambda: len(r.broker.scheduler.queue()) == 1)
        await _reload_mvoice_to(r, service.url)
        await r.kill("mvoice")  # the old service is stopped once the new one runs
        gate.set()
        assert (await running)[0] == 200
        status, _, body = await queued
        assert r.broker.consumers.states["mvoice"].healthy is not False  # the new one is up
        assert status == 200, body
        assert [x.path for x in new.records] == ["/api/synthesize"]


@no_overfill
async def test_attack_an_old_url_job_that_ends_after_a_reload_does_not_vouch_for_the_new_service(rig):
    """A job running on mvoice's old URL when a reload gives mvoice a new one ends with a 2xx answer, and
    Scheduler.finish records it as ``served`` on the *new* service's state: resident and trusted, although
    the new service holds nothing. The next job then skips the GPU reading (known resident), the new
    service loads itself on it, and the GPU, which a stranger has mostly filled meanwhile, overfills. With
    its state unknown, as a new URL's must be, the job reads the GPU first and is refused."""
    r = await rig(sims={"mvoice": {"loaded": True, "work_s": 0.5}})
    new = mgpusim.MvoiceSim("mvoice-new", r.gpu)  # the new service: nothing loaded
    async with StandIn.serving(new.app) as service:
        running = asyncio.ensure_future(r.post("tts", {"text": "old"}))
        await until(lambda: r.sims["mvoice"].active == 1)
        await _reload_mvoice_to(r, service.url)
        assert r.broker.consumers.states["mvoice"].resident is None  # a new service: unknown
        assert (await running)[0] == 200
        r.sims["mvoice"].restart()  # the old service is stopped: its model is gone
        r.gpu.allocate("game", 14000)  # a stranger takes most of the GPU
        await r.post("tts", {"text": "new"})
        nothing_overfilled(r.gpu)
        assert not r.broker.consumers.states["mvoice"].known_resident()


async def test_attack_a_reload_that_adds_a_token_closes_what_was_opened_without_one(rig):
    """Issue 19, item 9's purpose: a reload that changes the token closes what the old credential let in.
    A reload that sets a token where there was none (the operator locking the LAN out) closes nothing: an
    event stream opened without a token keeps delivering every job's events (consumer, kind, request id),
    and a WebSocket through a mount keeps relaying, although every new request now needs the token."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    stream = await r.session.get(r.url("/v1/events"))
    assert stream.status == 200
    ws = await r.session.ws_connect(r.url("/c/comfyui/ws"))
    # A connection that asked only the public paths (the dashboard page, /healthz) stays open: still public.
    public = await asyncio.open_connection("127.0.0.1", r.server.port)
    for path in ("/", "/healthz"):
        public[1].write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert (await whole_answer(public[0]))[0] == 200
    try:
        assert (await _ws_json(ws))["type"] == "status"
        raw = copy.deepcopy(r.raw)
        with_token(raw)
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert resp.status == 200
            changes = (await resp.json())["changes"]
        # the stream, the WebSocket and the reload's own connection (closed after its answer)
        assert "closed 3 connections let in without a token (one is required now)" in changes, changes
        public[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await whole_answer(public[0]))[0] == 200
        async with r.session.get(r.url("/v1/status")) as resp:
            assert resp.status == 401  # the token is in force for new requests
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await r.post("tts", {"text": "private"}, headers=auth))[0] == 200
        await until(lambda: r.stats.completed == 1)
        seen = b""
        with contextlib.suppress(
            asyncio.TimeoutError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError
        ):
            while line := await asyncio.wait_for(stream.content.readline(), 2):
                seen += line
        assert b'"kind": "tts"' not in seen, "an event stream opened without a token still delivers"
        assert (await ws.receive(timeout=3)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        stream.release()
        await ws.close()
        public[1].close()


@pytest.mark.catches_bug
async def test_attack_a_bug_after_the_answer_began_cuts_the_connection(rig, monkeypatch):
    """docs/how-it-works.md: a failure after the answer began cannot become an error response; the client's
    connection is cut without the final chunk. A bug there (anything but UpstreamBroke or the client
    leaving) goes to the front door, which returns a JSON 500: aiohttp writes that response's head and body
    inside the chunked answer already under way and ends it with a final chunk, so the client gets a 200
    whose body carries 'HTTP/1.1 500 ...' and ends as if complete."""

    async def streamed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "application/x-ndjson"
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b'{"part": %d}\n' % i)
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    async with StandIn([("POST", "/api/generate", streamed), ("GET", "/", _ok)]) as ollama:
        r = await rig(urls={"ollama": ollama.url})
        r.expected_internal_errors = 1
        real, calls = m._fits_unpaused, []

        def buggy(transport: Any, size: int) -> bool:
            calls.append(size)
            if len(calls) == 3:
                raise RuntimeError("injected bug mid-answer")
            return real(transport, size)

        monkeypatch.setattr(m, "_fits_unpaused", buggy)
        reader, writer = await asyncio.open_connection("127.0.0.1", r.server.port)
        body = b'{"model": "m", "prompt": "p"}'
        writer.write(
            b"POST /v1/llm HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        data = b""
        with contextlib.suppress(ConnectionResetError, asyncio.TimeoutError):
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                data += chunk
        writer.close()
        await until(lambda: r.broker.scheduler.holder is None)
        assert data.count(b"HTTP/1.1 ") == 1, data
        assert not data.endswith(b"0\r\n\r\n"), data


async def test_attack_an_unknown_expect_is_refused_in_the_error_shape(rig):
    """Every failure of the broker's own is a JSON error {error, message, consumer, retryable}. An unknown
    Expect on a route that reads a body is refused by expect_body with web.HTTPExpectationFailed, which
    aiohttp answers before the front door (a middleware) sees it: a plain-text 417. The broker's other routes
    (aiohttp's own expect handler) did the same. Now expectation_failed, on every route."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    for method, path in (
        ("POST", "/v1/tts"),
        ("POST", "/c/mvoice/api/synthesize"),
        ("POST", "/v1/reload"),
        ("GET", "/v1/status"),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", r.server.port)
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nExpect: something\r\nContent-Length: 2\r\n\r\n".encode()
        )
        status, body = await whole_answer(reader)
        writer.close()
        error_of(status, {}, body, "expectation_failed")  # plain text on main: 'unknown Expect: something'
    assert r.sims["mvoice"].records == []


def _daemon_after(tmp_path: Path, prelude: str, args: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """The daemon run as its own process on a base config after ``prelude`` (Python, run first), expected to
    exit at once: its exit status and output."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base_raw()))
    run = (
        f"import sys, runpy; {prelude}; "
        f"sys.argv = ['mgpumanager.py', '--config', {str(config)!r}, *{list(args)!r}]; "
        f"runpy.run_path({str(HERE / 'mgpumanager.py')!r}, run_name='__main__')"
    )
    return subprocess.run([PY, "-c", run], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("module", ["aiohttp", "yaml"])
@pytest.mark.parametrize("args", [["--check"], []])
def test_attack_the_daemon_without_aiohttp_says_so_in_one_line(tmp_path, args, module):
    """Issue 20 moved the daemon's imports after the command line's fast path, and a too old aiohttp is one
    line (sys.exit with what to install). Without aiohttp at all (a server without python3-aiohttp: `make
    deploy` runs --check there first) the daemon and --check print a ModuleNotFoundError traceback. Now one
    line names the module and how to install it, exit 2 (PyYAML the same). The verbs without either:
    test_a_verb_and_help_start_on_the_standard_library_alone."""
    done = _daemon_after(tmp_path, f"sys.modules[{module!r}] = None", args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"module {module}," in done.stderr and "pip install -r requirements.txt" in done.stderr


@pytest.mark.parametrize("version", ["3.9.1", "3.10.11"])
def test_the_daemon_on_an_aiohttp_older_than_debian_13s_says_so_in_one_line(tmp_path, version):
    """Found by running the suite on Ubuntu 24.04's aiohttp (3.9.1), which the docs said would do: every
    WebSocket through a mount failed there (aiohttp.ClientWSTimeout came later), an internal error each. The
    oldest aiohttp is now the one tested, Debian 13's 3.11 (make test-debian): an older one is one line,
    naming it and what to install, exit 2, before anything starts."""
    done = _daemon_after(tmp_path, f"import aiohttp; aiohttp.__version__ = {version!r}")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"needs aiohttp >= 3.11 (Debian 13's python3-aiohttp); this is {version}" in done.stderr


async def test_a_reload_that_changes_listen_says_so_in_its_answer(rig):
    """Found by an attack: a reload that changed only `listen` answered "nothing changed" (the log alone
    said it waits for a restart)."""
    r = await rig()
    raw = copy.deepcopy(r.raw)
    raw["listen"] = "127.0.0.1:1"
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    async with r.session.post(r.url("/v1/reload")) as resp:
        changes = (await resp.json())["changes"]
    assert len(changes) == 1 and changes[0].startswith("listen 127.0.0.1:1 only after a restart (now "), (
        changes
    )


async def test_attack_a_reload_that_changes_listen_checks_loops_against_the_listener_in_force(rig, tmp_path):
    """Issue 19, item 3 (a consumer URL that leads back to the broker opens the admin routes to the LAN),
    through a reload: `listen` changes only with a restart, but the loader checks consumer URLs against the
    config's new `listen`, not the listener in force. A reload that moves `listen` (for the next restart)
    and gives the old port to a consumer is accepted, and a LAN client then unloads mvoice through that
    consumer's mount, as a loopback client, on a broker with no token."""
    lan = _lan_address()
    if lan is None:
        pytest.skip("no non-loopback address to come from")
    r = await rig(sims={"mvoice": {"loaded": True}})
    raw = copy.deepcopy(r.raw)
    port, other = free_port(), free_port()
    raw["listen"] = f"0.0.0.0:{port}"
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    with (tmp_path / "loop.log").open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            PY,
            str(HERE / "mgpumanager.py"),
            "--config",
            str(config),
            "--nvidia-smi",
            " ".join(sim_smi(r.state)),
            stderr=log_file,
        )
        try:
            base, from_lan = f"http://127.0.0.1:{port}", f"http://{lan}:{port}"
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with r.session.get(base + "/healthz") as resp:
                        if resp.status == 200:
                            break
                assert time.monotonic() < deadline and proc.returncode is None
                await asyncio.sleep(0.05)
            async with r.session.post(from_lan + "/v1/consumers/mvoice/unload") as resp:
                assert resp.status == 403  # no admin route for the LAN
            raw["listen"] = f"0.0.0.0:{other}"
            raw["consumers"]["f2"] = {
                "url": f"http://127.0.0.1:{port}",
                "health": {"path": "/healthz"},
                "paths": {"f2": {"path": "/v1/nothing"}},
                "vram_resident_mib": 0,
                "gpu": 1,
            }
            config.write_text(yaml.safe_dump(raw, sort_keys=False))
            async with r.session.post(base + "/v1/reload") as resp:
                reloaded = await resp.json()
            async with r.session.post(from_lan + "/c/f2/v1/consumers/mvoice/unload") as resp:
                through_f2 = resp.status
            assert through_f2 != 200, "a LAN client unloaded mvoice through the broker's own port"
            assert reloaded.get("error") == "bad_config", reloaded
        finally:
            proc.terminate()
            await proc.wait()


async def test_attack_a_reload_checks_loops_against_the_ports_bound_not_a_configured_port_0(rig):
    """Port 0 (any free port) is no port the loader can compare a URL with: a reload that pointed a consumer
    at the port the broker (or a consumer's port) really got was accepted, and its requests came back to
    the broker. Now such a reload is refused, bad_config naming the URL, the old config staying; a consumer
    port the same reload moves away no longer counts."""
    r = await rig(sims={"mvoice": {"loaded": True}}, tweak=with_ports)
    own, ollama_port = r.server.port, r.broker.ports.address("ollama")
    for url, key in (
        (f"http://localhost:{own}", "listen"),
        (f"http://{ollama_port}", "consumers.ollama.listen"),
    ):
        raw = copy.deepcopy(r.raw)
        raw["consumers"]["whisper"]["url"] = url
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
        assert f"consumers.whisper.url: is {key}'s own address" in data["message"], data
        assert "listened on now" in data["message"]
        assert r.broker.config.consumers["whisper"].url == r.raw["consumers"]["whisper"]["url"]
    # The same URL, in a reload that gives ollama another port: that port closes, the URL is no loop.
    raw = copy.deepcopy(r.raw)
    raw["consumers"]["whisper"]["url"] = f"http://{ollama_port}"
    raw["consumers"]["ollama"]["listen"] = f"127.0.0.1:{free_port()}"
    r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    async with r.session.post(r.url("/v1/reload")) as resp:
        assert resp.status == 200, await resp.text()
    assert r.broker.ports.address("ollama") != ollama_port


async def test_attack_an_old_url_job_that_fails_after_a_reload_does_not_mark_the_new_service_down(rig):
    """The other half of a job running on a consumer's old URL when a reload gives it a new one: the old
    service resets the connection (it is being stopped), and Consumers.job_failed marked the consumer, by
    name, unhealthy: the new, healthy service then refused every job until a probe came. Now a failure of
    a call made to the old URL is the old service's: logged, not recorded on the new one."""
    gate = asyncio.Event()

    async def reset(request: web.Request) -> web.Response:
        await gate.wait()
        assert request.transport is not None
        request.transport.abort()  # the old service goes away with the job's connection
        return web.Response()

    old = StandIn([("POST", "/api/generate", reset), ("GET", "/", _ok)])
    new = StandIn([("POST", "/api/generate", _ok), ("GET", "/", _ok)])
    async with old, new:
        r = await rig(urls={"ollama": old.url})
        running = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
        await until(lambda: r.broker.scheduler.holder == "ollama")
        raw = copy.deepcopy(r.raw)
        raw["consumers"]["ollama"]["url"] = new.url
        r.config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert "new url for ollama" in (await resp.json())["changes"]
        await r.broker.consumers.probe_now("ollama")
        assert r.broker.consumers.states["ollama"].healthy is True
        gate.set()
        status, _, body = await running
        assert status == 502, body  # the job itself failed on the old service: its client is told
        assert r.broker.consumers.states["ollama"].healthy is True
        assert (await r.post("llm", {"model": "m", "prompt": "p"}))[0] == 200


async def test_a_probe_of_the_old_url_refused_after_a_reload_does_not_mark_the_new_service_down(rig):
    """Found by a review: a health probe keeps the config it started with, but a refusal (the service gone)
    was recorded by name, on whatever service the consumer is by then: one whose connect straddled a
    reload that gave the consumer a new URL marked the new, healthy service down and ended its holds. The
    old service's connect is made to wait for real: its listener's queue is full, so the kernel drops the
    probe's SYN; once the listener closes, the SYN sent again is refused."""
    r = await rig(sims={"mvoice": {"loaded": True}})
    new_url = r.raw["consumers"]["mvoice"]["url"]
    old = socket.socket()
    old.bind(("127.0.0.1", 0))
    old.listen(0)
    filler = socket.create_connection(old.getsockname())  # (a queue of 0 holds one: full)
    try:
        await _reload_mvoice_to(r, f"http://127.0.0.1:{old.getsockname()[1]}")
        probing = asyncio.ensure_future(r.broker.consumers.probe("mvoice"))
        await asyncio.sleep(0.2)
        assert not probing.done()  # (its connect waits)
        await _reload_mvoice_to(r, new_url)
        await r.broker.consumers.probe("mvoice")
        assert r.broker.consumers.states["mvoice"].healthy is True
        old.close()
        await asyncio.wait_for(probing, 10)  # refused, about a second after its first SYN
    finally:
        old.close()
        filler.close()
    assert r.broker.consumers.states["mvoice"].healthy is True
    assert (await r.post("tts", {"text": "hi"}))[0] == 200


@pytest.mark.catches_bug
async def test_a_probe_on_demand_whose_callers_left_ends_with_the_broker_and_a_crash_is_counted(rig):
    """Found by a review: a probe on demand goes on when the jobs waiting for it leave, and nothing owned it:
    the broker's shutdown left it running (and its exception, a bug, was nobody's)."""
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()
        return web.json_response({})

    async with StandIn([("GET", "/health", slow)]) as hung:
        r = await rig(tweak=lambda raw: raw["health"].update(timeout_s=60))
        consumers = r.broker.consumers
        real = consumers.probe

        async def crashing(name: str) -> None:
            raise RuntimeError("a bug")

        consumers.probe = crashing  # type: ignore[method-assign]
        await consumers.probe_now("mvoice")  # (counted; the job asking goes on as if it had failed)
        assert r.broker.shared.internal_errors == 1
        r.expected_internal_errors = 1
        consumers.probe = real  # type: ignore[method-assign]
        await _reload_mvoice_to(r, hung.url)
        asking = asyncio.ensure_future(consumers.probe_now("mvoice"))
        await until(lambda: "mvoice" in consumers._probing)
        probe = consumers._probing["mvoice"]
        asking.cancel()
        await asyncio.sleep(0.05)
        assert not probe.done()  # the caller left: the probe goes on
        await r.server.close()  # the broker's shutdown
        assert probe.cancelled()
        gate.set()


@pytest.mark.catches_bug
async def test_a_bug_in_one_probe_of_a_round_leaves_the_others_to_end_and_is_counted(rig):
    """Found by a review: a health round gathered its probes and stopped at the first that raised, leaving
    the others running unowned (and a second bug uncounted). Each probe ends now, each bug counted."""
    r = await rig()
    consumers = r.broker.consumers
    real, ended = consumers.probe, []

    async def probe(name: str) -> None:
        if name in ("mvoice", "whisper"):
            raise RuntimeError(f"a bug probing {name}")
        await real(name)
        ended.append(name)

    consumers.probe = probe  # type: ignore[method-assign]
    await consumers.probe_all()
    assert sorted(ended) == sorted(set(r.raw["consumers"]) - {"mvoice", "whisper"})
    assert r.broker.shared.internal_errors == 2
    r.expected_internal_errors = 2


@pytest.mark.catches_bug
async def test_a_bug_in_one_gpus_yield_round_leaves_the_other_gpus_round_to_end_and_is_counted(rig):
    """As for the health probes: the yield's rounds of several GPUs, gathered, stopped at the first that
    raised and left the others running unowned."""

    def two_gpus(raw: dict[str, Any]) -> None:
        _yielding(poll_s=3600)(raw)
        raw["consumers"]["comfyui"]["gpu"] = 1

    r = await rig(gpus=2, sims={"comfyui": {"gpu": 1}}, tweak=two_gpus)
    yielding = r.broker.yielding
    real, ended = yielding.round, []

    async def round_(index: int) -> None:
        if index == 0:
            raise RuntimeError("a bug in GPU 0's round")
        await asyncio.sleep(0.05)  # (still going when GPU 0's raised)
        await real(index)
        ended.append(index)
        raise RuntimeError("a bug at the end of GPU 1's round")

    yielding.round = round_  # type: ignore[method-assign]
    yielding.wake.set()
    await until(lambda: ended == [1])
    await until(lambda: r.broker.shared.internal_errors == 2)  # (the second was nobody's)
    r.expected_internal_errors = 2


async def test_a_queued_job_whose_kind_the_new_url_no_longer_serves_is_answered_no_consumer(rig):
    """Beside test_attack_a_job_queued_before_a_reload_that_gives_its_consumer_a_new_url_goes_to_the_new_url:
    a reload that gives mvoice a new URL and takes its stt path away answers a queued stt job no_consumer
    (it is neither sent to the old service nor to a path the new one does not have); the queued tts beside
    it goes to the new service."""
    async with _ollama_at_work_and_a_new_mvoice(rig) as (r, new, service, gate, running):
        stt = asyncio.ensure_future(r.post("stt", {"audio": "x"}))
        tts = asyncio.ensure_future(r.post("tts", {"text": "queued"}))
        await until(lambda: len(r.broker.scheduler.queue()) == 2)
        await _reload_mvoice_to(r, service.url, without_stt=True)
        status, headers, body = await asyncio.wait_for(stt, 10)  # at once: not after the llm job
        assert "no longer serves kind 'stt'" in error_of(status, headers, body, "no_consumer")["message"]
        gate.set()
        assert (await running)[0] == 200
        assert (await tts)[0] == 200
        assert [x.path for x in new.records] == ["/api/synthesize"]
        assert r.sims["mvoice"].records == []


async def test_a_config_read_that_hangs_leaves_no_thread_the_broker_waits_for_at_exit(rig, monkeypatch):
    """Found by an attack: a reload whose config never came (a FIFO, a hung network mount) was refused in
    time, but its read went on in the event loop's executor, which the broker joins when it exits: stopped,
    it stayed alive for good (systemd would kill it after TimeoutStopSec). Such reads (the config, the
    state file) run in daemon threads of their own, left behind at exit."""
    monkeypatch.setattr(m, "CONFIG_READ_TIMEOUT_S", 0.3)
    r = await rig()
    r.config_path.unlink()
    os.mkfifo(r.config_path)  # (opening it for reading waits for a writer: for ever)
    async with r.session.post(r.url("/v1/reload")) as resp:
        error = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
    assert "not read within 0.3 s" in json.dumps(error)
    hung = [t for t in threading.enumerate() if t.name == "mgpumanager config read"]
    assert len(hung) == 1 and hung[0].is_alive() and hung[0].daemon
    # While it hangs, a reload is refused at once, starting no thread more (a review: each did).
    async with r.session.post(r.url("/v1/reload")) as resp:
        error = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
    assert "the last read of it has not ended yet" in json.dumps(error)
    assert [t for t in threading.enumerate() if t.name == "mgpumanager config read"] == hung
    os.close(os.open(r.config_path, os.O_WRONLY | os.O_NONBLOCK))  # (the reader gets its end: it ends)
    await asyncio.to_thread(hung[0].join, 5)
    assert not hung[0].is_alive()


async def test_shutdown_cancels_again_a_background_task_that_swallowed_its_cancellation(rig, caplog):
    """Found by the full suite under load: a daemon logged "stopping" and never stopped (the test's SIGTERM
    waited 60 s, the process stayed). Its state file writer had swallowed the shutdown's cancellation
    (Python 3.11's asyncio.wait_for returns the result when what it waits for ends at the moment it is
    cancelled) and slept on, and the drain waited for it for ever. Now the drain cancels what goes on
    again: a task that swallows one cancellation (as that writer did) ends at the next."""
    r = await rig()
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()  # (as wait_for did)
        await asyncio.sleep(3600)

    task = r.broker.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)  # it runs up to its first sleep
    await asyncio.wait_for(r.server.close(), 20)  # the drain, as on SIGTERM
    assert swallowed.is_set() and task.cancelled()
    assert "did not end when cancelled" not in caplog.text


async def test_a_schedulers_close_cancels_again_a_task_that_swallowed_its_cancellation():
    """The same, past the drain: the scheduler's own tasks (holds, steps whose caller left) and the GPU
    reader's are cancelled as the broker's are; Scheduler.close cancelled once and waited without a bound."""
    s, _, _, _ = make_scheduler(small_config())
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(stubborn())
    s.tasks.add(task)
    await asyncio.sleep(0)
    await asyncio.wait_for(s.close(), 20)
    assert swallowed.is_set() and task.cancelled()


async def test_a_reservations_end_is_no_service_a_reload_replaced(rig, caplog):
    """Found by the attack on the observable surface: every reservation, at its end, logged
    ``msg="not recorded: a reload replaced or removed the service" consumer=reservation url=""``, though
    no reload had happened: its job runs for no consumer, and the check for a service a reload replaced
    took "reservation", which no config names, for a service removed. A person reading the journal after a
    game was told of a reload that never was."""
    caplog.set_level(logging.INFO, logger="mgpumanager")
    r = await rig(sims={"mvoice": {"loaded": True}})
    async with r.session.post(r.url("/v1/reserve"), json={"for_s": 60, "reason": "gaming"}) as resp:
        assert resp.status == 200
    async with r.session.delete(r.url("/v1/reserve")) as resp:
        assert (await resp.json())["released"] is True
    await until(lambda: any("kind=reservation status=completed" in line for line in job_lines(caplog)))
    assert "not recorded" not in caplog.text


def test_a_name_or_kind_with_a_trailing_newline_is_refused():
    """Found by the attack on the observable surface: consumer and client names are "letters, digits, `_`,
    `.` and `-`" and kinds "lowercase words" (configuration.md), but the rules ended in ``$``, which Python
    matches before a trailing newline: ``"mvoice\\n"``, a client ``"wa\\n"`` and a kind ``"tts\\n"`` were
    taken, and went on into ps's table (a line break in its name), the metrics' labels, the log lines and
    the events; a mount or route could never reach them."""
    raw = base_raw()
    raw["consumers"]["mvoice\n"] = raw["consumers"].pop("mvoice")
    raw["routing"] = {"tts": "mvoice\n", "stt": "mvoice\n", "llm": "ollama", "image": "comfyui"}
    raw["audio_proxy"] = "mvoice\n"
    raw["consumers"]["ollama"]["can_coexist_with"] = ["mvoice\n", "whisper"]
    raw["consumers"]["whisper"]["can_coexist_with"] = ["mvoice\n", "ollama"]
    raw["consumers"]["ollama"]["paths"]["llm\n"] = raw["consumers"]["ollama"]["paths"].pop("llm")
    raw["auth"] = {"token": TOKEN, "clients": {"wa\n": {"token": WA_TOKEN}}}
    with pytest.raises(m.ConfigError) as refused:
        m.parse_config(raw)
    problems = refused.value.problems
    # Each refused, in one line (a refusal is one line naming the key: the name's newline escaped).
    assert "consumers.mvoice\\n: names are letters, digits, '_', '.', '-'" in problems, problems
    assert "auth.clients.wa\\n: client names are letters, digits, '_', '.', '-'" in problems, problems
    assert any(p.startswith("consumers.ollama.paths.llm\\n: kinds are lowercase words") for p in problems)
    assert all("\n" not in p for p in problems), problems


def test_a_librarys_log_line_is_logfmt_in_one_line_too():
    """Found by the attack on the observable surface: the log is "logfmt on stderr" (operations.md), but a
    record of another logger (asyncio's ``Task exception was never retrieved\\nfuture: <Task ...>``, its
    ``socket.send() raised exception.``, aiohttp's ``Error handling request``) went out as its bare text:
    no ``msg=``, and over several lines, so that under journald every line but the first was an entry of
    its own without the record's priority (an error's details at info, hidden from ``-p warning``). Now
    such a record is one logfmt line: its text as ``msg``, and the logger that wrote it."""
    record = logging.LogRecord(
        "asyncio",
        logging.ERROR,
        __file__,
        1,
        "Task exception was never retrieved\nfuture: <Task %s>",
        ("x",),
        None,
    )
    for journal, start in ((False, "ts="), (True, "<3>")):
        line = m.LogfmtFormatter(journal=journal).format(record)
        assert line.startswith(start) and "\n" not in line, line
        assert line.endswith(
            'level=error msg="Task exception was never retrieved\\nfuture: <Task x>" logger=asyncio'
        ), line
    # The broker's own lines (and aiohttp's bad requests, made logfmt by OneLineBadRequests) are as they were.
    own = logging.LogRecord(
        "aiohttp.server", logging.WARNING, __file__, 1, m.logfmt(msg="bad http request"), (), None
    )
    assert m.LogfmtFormatter(journal=True).format(own) == '<4>level=warning msg="bad http request"'


async def test_release_without_gpu_says_what_became_of_each_gpus_reservation(rig, capsys):
    """Found by the attack on the observable surface: ``release`` without ``--gpu`` ends or cancels the
    reservation of every GPU (``DELETE /v1/reserve`` answers ``gpus`` and ``cancelled``), but the verb read
    the answer's single ``gpu`` (null for several): with GPU 1's reservation in force and GPU 0's still
    waiting behind a job, it printed "the GPU: cancelled a pending reservation (it had not begun: nothing
    was unloaded)", though GPU 1's had begun and unloaded mvoice and comfyui; with two ended, "the GPU
    released". Now it says what became of each GPU's."""
    gate = asyncio.Event()

    def two_gpus(raw: dict[str, Any]) -> None:
        for name in ("mvoice", "comfyui"):
            raw["consumers"][name]["gpu"] = 1
        raw["consumers"]["mvoice"]["can_coexist_with"] = []

    async with held_llm(gate) as ollama:
        r = await rig(
            gpus=2, urls={"ollama": ollama.url}, sims={"mvoice": {"loaded": True, "gpu": 1}}, tweak=two_gpus
        )
        gpu0 = r.broker.schedulers[0]

        async def reserve(gpu: int) -> tuple[int, bytes]:
            async with r.session.post(r.url("/v1/reserve"), json={"for_s": 600, "gpu": gpu}) as resp:
                return resp.status, await resp.read()

        llm = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "holds GPU 0"}))
        try:
            await until(lambda: gpu0.holder == "ollama")
            waiting = asyncio.ensure_future(reserve(0))
            await until(lambda: len(gpu0.queue()) == 1)
            assert (await reserve(1))[0] == 200  # GPU 1's begins at once: it unloads mvoice
            rc, out, err = await verb(capsys, "release", "--url", r.url(""))
            assert (rc, err) == (0, "")
            assert out.splitlines() == [
                "GPU 0: cancelled a pending reservation (it had not begun: nothing was unloaded)",
                "GPU 1 released",
            ], out
            assert (await asyncio.wait_for(waiting, 10))[0] == 409
            # Two in force, both ended: each GPU named.
            gate.set()
            assert (await llm)[0] == 200
            assert [(await reserve(0))[0], (await reserve(1))[0]] == [200, 200]
            rc, out, _ = await verb(capsys, "release", "--url", r.url(""))
            assert out.splitlines() == ["GPU 0 released", "GPU 1 released"], out
            rc, out, _ = await verb(capsys, "release", "--url", r.url(""))
            assert out.splitlines() == ["no GPU was reserved"], out
        finally:
            gate.set()
            await llm


@contextlib.asynccontextmanager
async def _three_llm_jobs_queued(rig: Any) -> AsyncIterator[Rig]:
    """A rig whose ollama job holds the GPU (until the block ends) while three more llm jobs wait."""
    gate = asyncio.Event()
    async with held_llm(gate) as ollama:
        r = await rig(urls={"ollama": ollama.url})
        llm = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "holds the GPU"}))
        queued = [asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": str(i)})) for i in range(3)]
        try:
            await until(lambda: len(r.broker.scheduler.lock.waiting) == 3)
            yield r
        finally:
            gate.set()
            await asyncio.gather(llm, *queued)


async def test_metrics_play_the_queue_forward_off_the_event_loop(rig, monkeypatch):
    """Found by the attack on the observable surface: /v1/status plays the queue forward for its etas in a
    thread (10,000 jobs at most), but /metrics played it on the event loop for mgpumanager_queue_eta_seconds:
    measured here, 144 ms with 2,000 jobs queued and 499 ms with 10,000, a stall of everything the broker
    serves at every scrape (issue 21: /healthz p99 under 20 ms while jobs are queued). Now /metrics plays it
    from a snapshot in a thread, as status does; the figure is the same."""
    async with _three_llm_jobs_queued(rig) as r:
        s = r.broker.scheduler
        await asyncio.sleep(0.05)  # (their queued events announced, from a forecast of their own)
        on_loop = []
        real = m.expected_waits

        def where(*args: Any, **kwargs: Any) -> Any:
            on_loop.append(threading.current_thread() is threading.main_thread())
            return real(*args, **kwargs)

        monkeypatch.setattr(m, "expected_waits", where)
        async with r.session.get(r.url("/metrics")) as resp:
            families = _families(await resp.text())
        assert on_loop == [False]  # played once, in a thread
        assert _value(families, "mgpumanager_queue_eta_seconds", gpu="0") == s.forecast()[-1][1]
        assert _value(families, "mgpumanager_queue_length", gpu="0") == 3


async def test_systemds_status_line_counts_the_queue_without_sorting_it(rig, monkeypatch):
    """Found by the attack on the observable surface: systemd's STATUS= line ("ollama holds the GPU, 3
    queued, ...") is made again after every burst of events (each job's end), and counted the queue by
    sorting all of it by effective priority (``Scheduler.queue``): 11.8 ms measured here with 10,000 jobs
    queued, on the event loop, at every job's end. Now it counts the lock's queue as it is."""
    async with _three_llm_jobs_queued(rig) as r:
        sorted_ = []
        real = m.Scheduler.queue
        monkeypatch.setattr(m.Scheduler, "queue", lambda self: sorted_.append(1) or real(self))
        assert r.broker.status_line().startswith("ollama holds the GPU, 3 queued, ")
        assert sorted_ == []


async def test_a_consumer_removed_and_added_again_on_another_gpu_waits_until_its_job_ends(rig):
    """Found by the stress of the scheduler's invariant (issue 20 attack): a consumer moves to another GPU
    only while none of its jobs runs, but the check compared the new config with the one in force, so
    removing ollama while its job ran and adding it again with ``gpu: 1`` moved it all the same: a second
    llm job ran on GPU 1 beside the first one still at work on GPU 0 (two locks let one service work, past
    its max_concurrency of 1). Now the reload that adds it is refused while a job of it holds another
    GPU's lock, as a move is."""
    gate = asyncio.Event()  # the llm job holds GPU 0's lock until it is set
    async with held_llm(gate) as ollama:
        r = await rig(gpus=2, urls={"ollama": ollama.url})
        running = asyncio.ensure_future(r.post("llm", {"model": "m", "prompt": "p"}))
        await until(lambda: r.broker.scheduler.holder == "ollama")
        removed = copy.deepcopy(r.raw)
        del removed["consumers"]["ollama"], removed["routing"]["llm"]
        removed["consumers"]["mvoice"]["can_coexist_with"] = ["whisper"]
        r.config_path.write_text(yaml.safe_dump(removed, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            assert (await resp.json())["changes"] == ["changed mvoice", "removed ollama", "changed routing"]
        back = copy.deepcopy(removed)
        back["consumers"]["ollama"] = r.raw["consumers"]["ollama"] | {"gpu": 1}
        back["routing"]["llm"] = "ollama"
        r.config_path.write_text(yaml.safe_dump(back, sort_keys=False))
        async with r.session.post(r.url("/v1/reload")) as resp:
            data = error_of(resp.status, dict(resp.headers), await resp.read(), "bad_config")
        assert "consumers.ollama.gpu: ollama has a job running on GPU 0" in data["message"]
        assert "ollama" not in r.broker.config.consumers and list(r.broker.schedulers) == [0]
        error_of(*await r.post("llm", {"model": "m", "prompt": "q"}), "no_consumer")
        gate.set()
        assert (await running)[0] == 200
        async with r.session.post(r.url("/v1/reload")) as resp:  # its job ended: it is added on GPU 1
            assert "added ollama" in (await resp.json())["changes"]
        assert r.broker.scheduler_for("ollama").index == 1
        assert (await r.post("llm", {"model": "m", "prompt": "q"}))[0] == 200
