#!/usr/bin/env python3
"""mgpumanager: one door in front of the inference services that share a GPU.

Several services (TTS/STT, whisper.cpp, Ollama, ComfyUI) each load their model into the same GPU and know
nothing of each other. The broker is the only way in: clients call ``POST /v1/<kind>``, the broker routes the
request to the consumer that ``routing`` names, and runs it as a *job* through one queue and one GPU lock.

The model, in one paragraph: a GPU's lock is held by one consumer at a time, which may run up to its
``max_concurrency`` jobs. Waiting jobs are ordered by effective priority (the consumer's priority plus one
level per ``aging_s`` waited) and then by arrival. Before a job runs, the broker makes room: unless the target
is known to be resident, it reads free VRAM from nvidia-smi and, while the target does not fit, unloads the
least recently used consumer that may not coexist with it, through that consumer's own unload route, then
polls until the memory really shows up as free. Then it loads the target if it is known to be unloaded, and
forwards the request, streaming the answer back unchanged. Every failure of the broker's own is a JSON error
``{error, message, consumer, retryable}``; whatever a consumer answers passes through untouched.

Known limits: one broker per machine (its state is in memory; a restart forgets residency and last use);
memory held by processes outside the broker is seen only as "not free"; a consumer that allocates more than
its ``vram_resident_mib`` can still run the GPU out of memory; consumers without an unload route or command
are never evicted; request bodies are held in memory (bounded by ``max_body_mib``) before a job is queued.

Load and unload are HTTP calls or commands (``systemctl stop whisper-server``: a consumer loaded by a command
whose health fails is stopped, not unreachable, and a job starts it). Consumers may be unloaded after
``idle_unload_s`` unused and preloaded when they fit; both are internal jobs of the lowest priority.

Clients that speak a consumer's own API use its mount, ``/c/<name>/<path>``: reads (GET, HEAD, OPTIONS),
the consumer's ``unscheduled`` calls and WebSockets are forwarded at once, every other request is a job.

Several GPUs: a consumer names its GPU (``gpu: N``, else ``gpu.index``); each GPU has its own reader, queue,
lock and eviction, so consumers on different GPUs never wait for each other.

Around it: /v1/status, an event stream (/v1/events), Prometheus metrics (/metrics), a live page (/),
systemd's notify protocol and watchdog, reload in place (SIGHUP) and a graceful drain on SIGTERM.

Sections, in dependency order: constants and config; errors; events and metrics; GPU reading; consumers and
health; the scheduler; the proxy; the HTTP app (with the dashboard page); the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import yaml
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

VERSION = "0.1.0"
log = logging.getLogger("mgpumanager")

if not hasattr(web, "AppKey"):  # handler_cancellation and AppKey came with aiohttp 3.9
    sys.exit(f"mgpumanager needs aiohttp >= 3.9 (Debian 13's python3-aiohttp); this is {aiohttp.__version__}")

# =====================================================================================================
# Constants and config
# =====================================================================================================

MiB = 1024 * 1024
PRIORITY_MAX = 4
#: A bearer token shorter than this is refused: it would be guessable.
MIN_TOKEN_LENGTH = 16
#: Kinds that are (or will be) routes of their own under /v1/.
RESERVED_KINDS = frozenset({"status", "consumers", "events", "reload"})
KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
#: How often free VRAM is polled after an unload (one nvidia-smi each, the GPU line alone), and which
#: share of the victim's memory counts as "freed".
VRAM_POLL_S = 0.05
FREED_SHARE = 0.75
#: After a command exited, how long its output is still read (a service it started may hold the pipes).
PIPE_GRACE_S = 0.5
#: After killing a hung nvidia-smi or command, how long to wait for it to be reaped before going on.
REAP_TIMEOUT_S = 1.0
#: What the broker keeps of a subprocess's stdout and of its stderr (the tail, for commands' error messages).
OUTPUT_LIMIT = 1 * MiB
#: How much of a failed command's stderr goes into its error message and log line.
STDERR_TAIL = 500
#: After a command-started load, how often the consumer's health route is asked until it answers 2xx.
HEALTH_WAIT_POLL_S = 0.2
#: The idle-unload task looks at the deadlines at least this often (reloads are picked up this way).
IDLE_CHECK_S = 5.0
#: /v1/status reads the GPU at most this often, however often it is asked.
STATUS_MAX_AGE_S = 1.0
#: Largest consumer answer kept in memory to fill a hold_until path (ComfyUI's /prompt answer is tiny).
HOLD_ANSWER_LIMIT = 1 * MiB
#: After the drain (scheduler.shutdown_timeout_s), how long aiohttp lets other answers (audio, event
#: streams) finish; it applies it twice. The unit's TimeoutStopSec covers the drain plus twice this.
SHUTDOWN_GRACE_S = 5.0
#: Connecting to a consumer must not take longer than this (or its timeout_s, if shorter).
CONNECT_TIMEOUT_S = 10.0
#: A proxied WebSocket pings both sides this often: a peer gone without a close (a laptop put to sleep) is
#: noticed within about twice this, not at TCP keepalive's two hours.
WEBSOCKET_HEARTBEAT_S = 30.0

GPU_FIELDS = (
    "index",
    "uuid",
    "name",
    "memory.total",
    "memory.used",
    "memory.free",
    "utilization.gpu",
    "temperature.gpu",
)
APP_FIELDS = ("pid", "process_name", "used_memory", "gpu_uuid")


@dataclass(frozen=True)
class Route:
    """An HTTP call the broker makes to a consumer of its own accord: health, load, unload."""

    method: str
    path: str
    #: Sent as JSON when not None.
    body: Any = None
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Command:
    """A load or unload done by running a program (``systemctl stop whisper-server``): no shell, exit 0 is
    success, killed with everything it started past ``timeout_s``."""

    argv: tuple[str, ...]
    timeout_s: float = 60.0


@dataclass(frozen=True)
class Hold:
    """Keep the GPU lock after the answer until GET ``path`` returns a non-empty JSON object or list."""

    method: str
    path: str
    poll_s: float
    timeout_s: float


@dataclass(frozen=True)
class JobPath:
    """Where a kind of job goes on its consumer."""

    method: str
    path: str
    hold_until: Hold | None = None


@dataclass(frozen=True)
class Unscheduled:
    """A cheap, non-GPU call of a consumer's own API, forwarded through its mount without the lock."""

    method: str
    #: An exact path, or a prefix when it ends with ``*`` (``/upload/*``).
    path: str

    def matches(self, method: str, path: str) -> bool:
        if method != self.method:
            return False
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path == self.path


@dataclass(frozen=True)
class ConsumerConfig:
    name: str
    #: Base URL without a trailing slash; route paths are appended to it.
    url: str
    health: Route
    paths: dict[str, JobPath]
    vram_resident_mib: int
    unload: Route | Command | None = None
    load: Route | Command | None = None
    #: Symmetric: the loader adds the consumers that name this one.
    can_coexist_with: frozenset[str] = frozenset()
    priority: int = 2
    max_concurrency: int = 1
    #: Longest silence tolerated from the consumer while it answers.
    timeout_s: float = 300.0
    #: Runs its own model LRU: never evicted by the broker.
    vram_managed: bool = False
    #: The GPU (nvidia-smi index) it runs on: its queue, lock and eviction are that GPU's.
    gpu: int = 0
    #: Unloaded by the broker after this many seconds resident and unused; 0: never.
    idle_unload_s: float = 0.0
    #: Loaded at start-up and after a reload when it fits without evicting anything.
    preload: bool = False
    #: Calls through its mount (/c/{name}/...) that are forwarded at once, besides GET, HEAD and OPTIONS.
    unscheduled: tuple[Unscheduled, ...] = ()

    @property
    def started_by_command(self) -> bool:
        """Loaded by starting a process: a failing health route means "stopped", not "unreachable"."""
        return isinstance(self.load, Command)


@dataclass(frozen=True)
class GpuConfig:
    nvidia_smi: tuple[str, ...] = ("nvidia-smi",)
    #: The GPU of consumers that do not name one (``gpu: N``).
    index: int = 0
    cushion_mib: int = 256
    query_timeout_s: float = 5.0


@dataclass(frozen=True)
class SchedulerConfig:
    max_queue: int = 64
    queue_timeout_s: float = 300.0
    max_evictions: int = 5
    vram_wait_s: float = 10.0
    aging_s: float = 60.0
    max_body_mib: int = 64
    #: On SIGTERM, how long running jobs and holds may go on before the broker exits anyway.
    shutdown_timeout_s: float = 30.0


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 2.0


@dataclass(frozen=True)
class AuthConfig:
    #: The bearer token every route but /healthz requires; None: no auth, admin routes loopback-only.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Config:
    listen_host: str
    listen_port: int
    gpu: GpuConfig
    scheduler: SchedulerConfig
    health: HealthConfig
    routing: dict[str, str]
    audio_proxy: str | None
    #: In the order the file lists them: ties in last use go to the one listed first.
    consumers: dict[str, ConsumerConfig]
    auth: AuthConfig = AuthConfig()


class ConfigError(Exception):
    """The config is unusable; ``problems`` lists every reason, each naming its key."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


_REQUIRED = object()


class _Checker:
    """Collects every problem of a raw config instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def mapping(
        self, value: Any, where: str, allowed: Sequence[str] | None, *, required: bool = False
    ) -> dict:
        """A mapping with only ``allowed`` keys (any, for None); anything else is reported, {} returned."""
        if value is None:
            if required:
                self.problem(where, "missing")
            return {}
        if not isinstance(value, dict):
            self.problem(where, f"must be a mapping, not {type(value).__name__}")
            return {}
        for key in value:
            if allowed is not None and key not in allowed:
                self.problem(f"{where}.{key}", f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def number(
        self, d: dict, key: str, where: str, default: Any, *, integer: bool, zero_ok: bool = False
    ) -> Any:
        """A positive number (or >= 0 with ``zero_ok``); ``integer`` refuses fractions."""
        value = d.get(key, default)
        if value is _REQUIRED:
            self.problem(f"{where}.{key}", "missing")
            return 0
        ok_type = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            self.problem(
                f"{where}.{key}", f"must be {'an integer' if integer else 'a number'}, not {value!r}"
            )
            return default if default is not _REQUIRED else 0
        if value < 0 or (value == 0 and not zero_ok):
            self.problem(f"{where}.{key}", f"must be {'>= 0' if zero_ok else 'positive'}, not {value!r}")
        return value

    def string(self, d: dict, key: str, where: str, default: Any = _REQUIRED) -> str:
        value = d.get(key, default)
        if value is _REQUIRED:
            self.problem(f"{where}.{key}", "missing")
            return ""
        if not isinstance(value, str) or not value:
            self.problem(f"{where}.{key}", f"must be a non-empty string, not {value!r}")
            return ""
        return value

    def method(self, d: dict, where: str, default: str) -> str:
        value = d.get("method", default)
        if not isinstance(value, str) or value.upper() not in HTTP_METHODS:
            self.problem(f"{where}.method", f"must be one of {', '.join(HTTP_METHODS)}, not {value!r}")
            return default
        return value.upper()

    def path(self, d: dict, where: str) -> str:
        value = self.string(d, "path", where)
        if value and not value.startswith("/"):
            self.problem(f"{where}.path", f"must start with '/', not {value!r}")
        return value

    def kind(self, name: Any, where: str) -> None:
        if not isinstance(name, str) or not KIND_RE.match(name):
            self.problem(where, "kinds are lowercase words (a-z, 0-9, _), starting with a letter")
        elif name in RESERVED_KINDS:
            self.problem(where, f"'{name}' is reserved (/v1/{name} is a route of its own)")


def _parse_route(ck: _Checker, raw: Any, where: str, default_method: str, *, extra: bool) -> Route | None:
    allowed = ("method", "path", "body", "timeout_s") if extra else ("method", "path")
    d = ck.mapping(raw, where, allowed, required=True)
    if not d:
        return None
    method = ck.method(d, where, default_method)
    path = ck.path(d, where)
    timeout_s = ck.number(d, "timeout_s", where, 60.0, integer=False) if extra else 60.0
    return Route(method=method, path=path, body=d.get("body"), timeout_s=timeout_s)


def _parse_action(ck: _Checker, raw: Any, where: str) -> Route | Command | None:
    """``load``/``unload``: an HTTP call ``{method, path, body, timeout_s}`` or ``{command, timeout_s}``."""
    if not isinstance(raw, dict) or "command" not in raw:
        return _parse_route(ck, raw, where, "POST", extra=True)
    d = ck.mapping(raw, where, ("command", "timeout_s", "method", "path", "body"))
    both = [key for key in ("method", "path", "body") if key in d]
    if both:
        ck.problem(where, f"set command or an HTTP call ({', '.join(both)}), not both")
    argv = d["command"]
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        ck.problem(f"{where}.command", f"must be a list of non-empty strings (argv, no shell), not {argv!r}")
        argv = []
    timeout_s = ck.number(d, "timeout_s", where, 60.0, integer=False)
    return Command(argv=tuple(argv), timeout_s=timeout_s)


def _parse_consumer(ck: _Checker, name: str, raw: Any, default_gpu: int) -> ConsumerConfig | None:
    where = f"consumers.{name}"
    allowed = (
        "url",
        "health",
        "paths",
        "vram_resident_mib",
        "unload",
        "load",
        "can_coexist_with",
        "priority",
        "max_concurrency",
        "timeout_s",
        "vram_managed",
        "gpu",
        "idle_unload_s",
        "preload",
        "unscheduled",
    )
    d = ck.mapping(raw, where, allowed, required=True)
    if not d:
        return None
    url = ck.string(d, "url", where)
    if url:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 (raises on a bad port)
            bad_port = False
        except ValueError:
            bad_port = True
        if parts.scheme not in ("http", "https") or not parts.hostname or bad_port:
            ck.problem(f"{where}.url", f"must be an http(s) URL with a host, not {url!r}")
        elif parts.query or parts.fragment:
            ck.problem(f"{where}.url", "must not carry a query string or fragment")
    health = _parse_route(ck, d.get("health"), f"{where}.health", "GET", extra=False)
    paths: dict[str, JobPath] = {}
    raw_paths = ck.mapping(d.get("paths"), f"{where}.paths", None, required=True)
    if "paths" in d and isinstance(raw_paths, dict) and not raw_paths:
        ck.problem(f"{where}.paths", "needs at least one path")
    for kind, spec in raw_paths.items():
        pwhere = f"{where}.paths.{kind}"
        ck.kind(kind, pwhere)
        pd = ck.mapping(spec, pwhere, ("method", "path", "hold_until"), required=True)
        if not pd:
            continue
        hold = None
        if "hold_until" in pd:
            hwhere = f"{pwhere}.hold_until"
            hd = ck.mapping(
                pd["hold_until"], hwhere, ("method", "path", "poll_s", "timeout_s"), required=True
            )
            if hd:
                hold = Hold(
                    method=ck.method(hd, hwhere, "GET"),
                    path=ck.path(hd, hwhere),
                    poll_s=ck.number(hd, "poll_s", hwhere, 0.5, integer=False),
                    timeout_s=ck.number(hd, "timeout_s", hwhere, 600.0, integer=False),
                )
        paths[str(kind)] = JobPath(
            method=ck.method(pd, pwhere, "POST"), path=ck.path(pd, pwhere), hold_until=hold
        )
    coexist = d.get("can_coexist_with", [])
    if not isinstance(coexist, list) or not all(isinstance(n, str) for n in coexist):
        ck.problem(f"{where}.can_coexist_with", "must be a list of consumer names")
        coexist = []
    vram_managed = d.get("vram_managed", False)
    if not isinstance(vram_managed, bool):
        ck.problem(f"{where}.vram_managed", f"must be true or false, not {vram_managed!r}")
    priority = d.get("priority", 2)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= PRIORITY_MAX:
        ck.problem(f"{where}.priority", f"must be an integer from 0 to {PRIORITY_MAX}, not {priority!r}")
        priority = 2
    unload = _parse_action(ck, d["unload"], f"{where}.unload") if "unload" in d else None
    load = _parse_action(ck, d["load"], f"{where}.load") if "load" in d else None
    if isinstance(unload, Command) and not isinstance(load, Command):
        # Stopped by a command, nothing would ever start it again: every job would find it down.
        ck.problem(f"{where}.load", "a consumer unloaded by a command needs a load command to start it again")
    idle_unload_s = ck.number(d, "idle_unload_s", where, 0.0, integer=False, zero_ok=True)
    if idle_unload_s and "unload" not in d:
        ck.problem(f"{where}.idle_unload_s", "needs an unload route or command")
    if idle_unload_s and vram_managed is True:
        ck.problem(f"{where}.idle_unload_s", "a vram_managed consumer unloads itself (Ollama's keep_alive)")
    preload = d.get("preload", False)
    if not isinstance(preload, bool):
        ck.problem(f"{where}.preload", f"must be true or false, not {preload!r}")
    elif preload and "load" not in d:
        ck.problem(f"{where}.preload", "needs a load route or command")
    return ConsumerConfig(
        name=name,
        url=url.rstrip("/"),
        health=health or Route("GET", "/"),
        paths=paths,
        vram_resident_mib=ck.number(d, "vram_resident_mib", where, _REQUIRED, integer=True, zero_ok=True),
        unload=unload,
        load=load,
        can_coexist_with=frozenset(coexist),
        priority=priority,
        max_concurrency=ck.number(d, "max_concurrency", where, 1, integer=True),
        timeout_s=ck.number(d, "timeout_s", where, 300.0, integer=False),
        vram_managed=bool(vram_managed),
        gpu=ck.number(d, "gpu", where, default_gpu, integer=True, zero_ok=True),
        idle_unload_s=idle_unload_s,
        preload=preload is True,
        unscheduled=_parse_unscheduled(ck, d.get("unscheduled", []), where, paths),
    )


def _parse_unscheduled(
    ck: _Checker, raw: Any, where: str, paths: Mapping[str, JobPath]
) -> tuple[Unscheduled, ...]:
    """``unscheduled: [{method: POST, path: /api/show}, ...]``; a path may end in ``*`` (a prefix)."""
    where = f"{where}.unscheduled"
    if not isinstance(raw, list):
        ck.problem(where, f"must be a list of {{method, path}} mappings, not {raw!r}")
        return ()
    out = []
    for i, spec in enumerate(raw):
        iwhere = f"{where}[{i}]"
        d = ck.mapping(spec, iwhere, ("method", "path"), required=True)
        if not d:
            continue
        entry = Unscheduled(method=ck.method(d, iwhere, "POST"), path=ck.path(d, iwhere))
        if "*" in entry.path[:-1]:
            ck.problem(f"{iwhere}.path", f"'*' may only end a path (a prefix), not {entry.path!r}")
        for kind, p in paths.items():
            if entry.path and entry.matches(p.method, p.path):
                ck.problem(iwhere, f"{p.method} {p.path} is the path of kind {kind!r}: GPU work is scheduled")
        out.append(entry)
    return tuple(out)


def _parse_auth(ck: _Checker, raw: Any) -> AuthConfig:
    """auth.token, or auth.token_file (read now, so a secret can live outside the config)."""
    d = ck.mapping(raw, "auth", ("token", "token_file"))
    if "token" in d and "token_file" in d:
        ck.problem("auth", "set token or token_file, not both")
        return AuthConfig()
    token = None
    if "token" in d:
        token = d["token"] if isinstance(d["token"], str) else ""  # never echoed in a message
        if not token:
            ck.problem("auth.token", "must be a non-empty string")
    elif "token_file" in d:
        path = ck.string(d, "token_file", "auth")
        try:
            token = Path(path).read_text().strip() if path else ""
        except OSError as e:
            ck.problem("auth.token_file", f"cannot read {path}: {e.strerror or e}")
            return AuthConfig()
    if token is not None and (len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token):
        key = "auth.token" if "token" in d else "auth.token_file"
        ck.problem(key, f"the token must be at least {MIN_TOKEN_LENGTH} printable characters, without spaces")
    return AuthConfig(token=token or None)


def _parse_listen(ck: _Checker, value: Any) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        ck.problem("listen", f"must be HOST:PORT, not {value!r}")
        return "127.0.0.1", 8770
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_config(raw: Any) -> Config:
    """Validate a config as loaded from YAML; raise ConfigError naming every problem."""
    ck = _Checker()
    top = ck.mapping(
        raw,
        "config",
        ("listen", "gpu", "scheduler", "health", "routing", "audio_proxy", "consumers", "auth"),
        required=True,
    )
    host, port = _parse_listen(ck, top.get("listen", "0.0.0.0:8770"))

    g = ck.mapping(top.get("gpu"), "gpu", ("nvidia_smi", "index", "cushion_mib", "query_timeout_s"))
    smi = g.get("nvidia_smi", "nvidia-smi")
    argv: tuple[str, ...] = ()
    if isinstance(smi, str) and smi.strip():
        try:
            argv = tuple(shlex.split(smi))
        except ValueError as e:
            ck.problem("gpu.nvidia_smi", f"cannot split {smi!r} like a shell would: {e}")
    elif isinstance(smi, list) and smi and all(isinstance(a, str) and a for a in smi):
        argv = tuple(smi)
    else:
        ck.problem("gpu.nvidia_smi", f"must be a command (a string or a list of strings), not {smi!r}")
    gpu = GpuConfig(
        nvidia_smi=argv,
        index=ck.number(g, "index", "gpu", 0, integer=True, zero_ok=True),
        cushion_mib=ck.number(g, "cushion_mib", "gpu", 256, integer=True, zero_ok=True),
        query_timeout_s=ck.number(g, "query_timeout_s", "gpu", 5.0, integer=False),
    )

    fields = SchedulerConfig.__dataclass_fields__
    s = ck.mapping(top.get("scheduler"), "scheduler", list(fields))
    scheduler = SchedulerConfig(
        **{
            name: ck.number(s, name, "scheduler", f.default, integer=isinstance(f.default, int))
            for name, f in fields.items()
        }
    )
    h = ck.mapping(top.get("health"), "health", ("interval_s", "timeout_s"))
    health = HealthConfig(
        interval_s=ck.number(h, "interval_s", "health", 5.0, integer=False),
        timeout_s=ck.number(h, "timeout_s", "health", 2.0, integer=False),
    )

    raw_consumers = top.get("consumers")
    consumers: dict[str, ConsumerConfig] = {}
    if not isinstance(raw_consumers, dict) or not raw_consumers:
        ck.problem("consumers", "must be a mapping with at least one consumer")
        raw_consumers = {}
    for name, spec in raw_consumers.items():
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            ck.problem(f"consumers.{name}", "names are letters, digits, '_', '.', '-'")
            continue
        parsed = _parse_consumer(ck, name, spec, gpu.index)
        if parsed is not None:
            consumers[name] = parsed

    # Coexistence is symmetric: declaring it on either side is enough.
    pairs: dict[str, set[str]] = {name: set() for name in consumers}
    for name, c in consumers.items():
        for other in sorted(c.can_coexist_with):
            if other not in consumers:
                ck.problem(f"consumers.{name}.can_coexist_with", f"names unknown consumer {other!r}")
            elif other == name:
                ck.problem(f"consumers.{name}.can_coexist_with", "names the consumer itself")
            elif consumers[other].gpu != c.gpu:
                ck.problem(
                    f"consumers.{name}.can_coexist_with",
                    f"names {other}, which runs on GPU {consumers[other].gpu}, not {c.gpu}: coexistence is"
                    " a question for one GPU (consumers on different GPUs never wait for each other)",
                )
            else:
                pairs[name].add(other)
                pairs[other].add(name)
    consumers = {name: replace(c, can_coexist_with=frozenset(pairs[name])) for name, c in consumers.items()}

    routing_raw = ck.mapping(top.get("routing"), "routing", None)
    routing: dict[str, str] = {}
    for kind, target in routing_raw.items():
        ck.kind(kind, f"routing.{kind}")
        if not isinstance(target, str) or target not in consumers:
            if raw_consumers and isinstance(target, str) and target in raw_consumers:
                continue  # that consumer has problems of its own, already reported
            ck.problem(f"routing.{kind}", f"names unknown consumer {target!r}")
        elif kind not in consumers[target].paths:
            ck.problem(f"routing.{kind}", f"consumer {target!r} has no path for kind {kind!r}")
        else:
            routing[str(kind)] = target

    audio = top.get("audio_proxy")
    if audio is not None and (not isinstance(audio, str) or audio not in consumers):
        ck.problem("audio_proxy", f"names unknown consumer {audio!r}")

    auth = _parse_auth(ck, top.get("auth"))

    if ck.problems:
        raise ConfigError(ck.problems)
    return Config(
        listen_host=host,
        listen_port=port,
        gpu=gpu,
        scheduler=scheduler,
        health=health,
        routing=routing,
        audio_proxy=audio,
        consumers=consumers,
        auth=auth,
    )


def load_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a YAML config; ``overrides`` maps dotted keys (``gpu.nvidia_smi``) to values."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError([f"{path}: {e.strerror or e}"]) from e
    except yaml.YAMLError as e:
        # Where, but not the line itself: it may hold a secret.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise ConfigError([f"{path}: not valid YAML{where}: {problem}"]) from e
    for dotted, value in (overrides or {}).items():
        if not isinstance(raw, dict):
            break
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node[leaf] = value
    return parse_config(raw)


def gpu_indexes(config: Config) -> list[int]:
    """The GPUs the broker schedules: the default one and every one a consumer names."""
    return sorted({config.gpu.index, *(c.gpu for c in config.consumers.values())})


def describe_action(action: Route | Command) -> str:
    """``POST /api/admin/unload`` or ``command: systemctl stop whisper-server``, for people."""
    if isinstance(action, Command):
        return f"command: {shlex.join(action.argv)}"
    return f"{action.method} {action.path}"


def summary(config: Config) -> str:
    """The one-screen overview that ``--check`` prints."""
    lines = [f"listen {config.listen_host}:{config.listen_port}", ""]
    several = len(gpu_indexes(config)) > 1
    lines.append(f"{'consumer':<12} {'vram MiB':>9} {'prio':>4} {'conc':>4}  eviction")
    for c in config.consumers.values():
        if c.vram_managed:
            how = "never (vram_managed)"
        elif c.unload is None:
            how = "never (no unload route)"
        else:
            how = describe_action(c.unload) + (f", load {describe_action(c.load)}" if c.load else "")
        if c.idle_unload_s:
            how += f"; idle unload after {c.idle_unload_s:g} s"
        if c.preload:
            how += "; preload"
        where = f"  (GPU {c.gpu})" if several else ""
        lines.append(
            f"{c.name:<12} {c.vram_resident_mib:>9} {c.priority:>4} {c.max_concurrency:>4}  {how}{where}"
        )
    lines += ["", "routing:"]
    for kind, name in config.routing.items():
        p = config.consumers[name].paths[kind]
        hold = f"  (holds until {p.hold_until.method} {p.hold_until.path})" if p.hold_until else ""
        lines.append(f"  POST /v1/{kind:<8} -> {name} {p.method} {p.path}{hold}")
    if config.audio_proxy:
        lines.append(f"  GET  /audio/*    -> {config.audio_proxy} GET /audio/*")
    pairs = sorted(
        {tuple(sorted((c.name, o))) for c in config.consumers.values() for o in c.can_coexist_with}
    )
    lines += ["", "may coexist: " + (", ".join(f"{a}+{b}" for a, b in pairs) if pairs else "(none)")]
    return "\n".join(lines)


# =====================================================================================================
# Errors
# =====================================================================================================

#: code -> (HTTP status, retryable). The public list of what the broker itself can answer.
ERROR_CODES: dict[str, tuple[int, bool]] = {
    "bad_request": (400, False),
    "not_found": (404, False),
    "no_consumer": (404, False),
    "unauthorized": (401, False),
    "forbidden": (403, False),
    "method_not_allowed": (405, False),
    "payload_too_large": (413, False),
    "bad_config": (422, False),
    "consumer_unreachable": (502, True),
    "load_failed": (502, True),
    "unload_failed": (502, True),
    "bad_consumer_url": (502, False),
    "scheduler_error": (500, False),
    "queue_full": (503, True),
    "queue_timeout": (503, True),
    "shutting_down": (503, True),
    "insufficient_vram": (503, True),
    "gpu_unavailable": (503, True),
    "consumer_timeout": (504, True),
}


class BrokerError(Exception):
    """Every error the broker itself answers; one path turns it into a response."""

    def __init__(
        self,
        code: str,
        message: str,
        consumer: str | None = None,
        *,
        retry_after: int = 1,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.consumer = consumer
        self.status, self.retryable = ERROR_CODES[code]
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body = {
            "error": self.code,
            "message": self.message,
            "consumer": self.consumer,
            "retryable": self.retryable,
        }
        headers = {"Retry-After": str(self.retry_after)} if self.status == 503 else {}
        return web.json_response(body, status=self.status, headers=headers | self.headers)


#: aiohttp >= 3.10 tells a failed name lookup and a connect timeout apart; older ones do not.
_DNSError: Any = getattr(aiohttp, "ClientConnectorDNSError", ())
_ConnectTimeout: Any = getattr(aiohttp, "ConnectionTimeoutError", ())


class GpuError(Exception):
    """nvidia-smi could not be run, failed, hung or printed something unreadable."""


class CallError(Exception):
    """A call the broker made to a consumer of its own accord (load, unload) failed."""


def describe(exc: BaseException) -> str:
    """A short human reason for a failed connection: 'connection refused', 'timed out', ..."""
    if isinstance(exc, _ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, _DNSError):
        return f"cannot resolve host {exc.host}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed by the consumer"
    if isinstance(exc, (aiohttp.ClientOSError, ConnectionResetError)):
        return "connection reset"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "answer cut short"
    return f"{type(exc).__name__}: {exc}"


def failure_code(exc: BaseException) -> str:
    """The error code for a failed call to a consumer: its URL is unusable, or it is unreachable."""
    if isinstance(exc, (_DNSError, aiohttp.InvalidURL, ValueError)):
        return "bad_consumer_url"
    return "consumer_unreachable"


def parse_json(body: bytes | bytearray) -> Any:
    """A consumer's JSON answer, or None when it is not JSON (or nested too deep to parse)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


#: A logfmt value with any of these is quoted (as JSON).
_LOGFMT_QUOTE = re.compile(r'[ "=\\]')


def logfmt(**fields: Any) -> str:
    """key=value pairs, values quoted when they need it."""
    out = []
    for key, value in fields.items():
        if value is None:
            out.append(f"{key}=")  # absent: an empty value, as logfmt readers expect
            continue
        text = str(value)
        if not text or _LOGFMT_QUOTE.search(text) or not text.isprintable():
            text = json.dumps(text)
        out.append(f"{key}={text}")
    return " ".join(out)


# =====================================================================================================
# Events and metrics
# =====================================================================================================

#: What /v1/events sends, and what a subscriber that falls this far behind is dropped for.
EVENT_BUFFER = 256
#: A stream with nothing to say sends a comment this often, so proxies and browsers keep it open.
HEARTBEAT_S = 15.0
_DROPPED = {"event": "dropped"}


class Events:
    """Fan-out of the broker's events to /v1/events subscribers and other listeners.

    Publishing never waits: a subscriber whose buffer is full is dropped (its stream ends) rather than
    slowing the scheduler.
    """

    def __init__(self, buffer: int = EVENT_BUFFER):
        self.buffer = buffer
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        #: Called with every event (the systemd status line listens here).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.dropped = 0

    def publish(self, name: str, /, **fields: Any) -> None:
        if not self.subscribers and not self.listeners:
            return  # nobody listens: build nothing (this is on every job's path)
        event = {"event": name, "ts": _iso(time.time()), **fields}
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.subscribers.discard(queue)
                self.dropped += 1
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(_DROPPED)
                log.warning(logfmt(msg="event subscriber dropped", buffer=self.buffer))
        for listener in self.listeners:
            listener(event)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.buffer)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.subscribers.discard(queue)

    def close(self) -> None:
        """End every stream (on shutdown)."""
        for queue in list(self.subscribers):
            self.subscribers.discard(queue)
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(_DROPPED)


class Notifier:
    """systemd's notify protocol: datagrams to NOTIFY_SOCKET (also its abstract ``@`` form), else silent."""

    def __init__(self, environ: Mapping[str, str] = os.environ):
        address = environ.get("NOTIFY_SOCKET") or None
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
        mine = usec is not None and usec.isdigit() and pid in (None, str(os.getpid()))
        #: Ping the watchdog this often (half of WATCHDOG_USEC), or None.
        self.watchdog_s = int(usec) / 2e6 if mine and usec else None
        self.status: str | None = None
        #: Datagrams that could not be sent (logged, never fatal).
        self.errors = 0

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            self.errors += 1
            log.warning(logfmt(msg="sd_notify failed", error=describe(e)))
            return False
        return True

    def set_status(self, text: str) -> None:
        """STATUS=, only when it changed."""
        if text != self.status:
            self.status = text
            self.send(f"STATUS={text}")

    async def watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself: a blocked loop misses it and systemd restarts us."""
        assert self.watchdog_s is not None
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s)


#: Histogram buckets in seconds: from a short TTS job to a long FLUX render.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: Every metric the broker exports: name -> (type, help).
METRIC_HELP = {
    "mgpumanager_info": ("gauge", "The running broker; its version is a label."),
    "mgpumanager_jobs_total": ("counter", "GPU jobs that ended, by consumer and outcome."),
    "mgpumanager_queue_wait_seconds": ("histogram", "Time jobs waited for the GPU lock."),
    "mgpumanager_run_seconds": ("histogram", "Time jobs held the GPU lock, from grant to the last byte."),
    "mgpumanager_hold_seconds": ("histogram", "Time holds kept the GPU lock after the answer."),
    "mgpumanager_hold_timeouts_total": ("counter", "Holds released at their timeout."),
    "mgpumanager_websockets_total": ("counter", "WebSockets proxied through a mount, by consumer."),
    "mgpumanager_websocket_failures_total": (
        "counter",
        "WebSockets through a mount that failed to connect or broke, by consumer.",
    ),
    "mgpumanager_evictions_total": ("counter", "Consumers unloaded to make room, by the consumer unloaded."),
    "mgpumanager_loads_total": ("counter", "Load calls that succeeded, by consumer."),
    "mgpumanager_unload_failures_total": ("counter", "Unload calls that failed, by consumer."),
    "mgpumanager_idle_unloads_total": (
        "counter",
        "Consumers unloaded for being idle idle_unload_s, by consumer.",
    ),
    "mgpumanager_internal_errors_total": (
        "counter",
        "Bugs in the broker (each also logged with a traceback).",
    ),
    "mgpumanager_consumer_healthy": ("gauge", "1 if the last health probe succeeded, 0 if not, NaN unknown."),
    "mgpumanager_consumer_resident": ("gauge", "1 if the consumer is resident, 0 if not, NaN unknown."),
    "mgpumanager_queue_length": ("gauge", "Jobs waiting for the GPU lock, by GPU."),
    "mgpumanager_running_jobs": ("gauge", "Jobs holding the GPU lock now, by GPU."),
    "mgpumanager_gpu_memory_total_bytes": (
        "gauge",
        "GPU memory in all, by GPU (nvidia-smi, read at most once a second).",
    ),
    "mgpumanager_gpu_memory_used_bytes": ("gauge", "GPU memory in use."),
    "mgpumanager_gpu_memory_free_bytes": ("gauge", "GPU memory free."),
    "mgpumanager_gpu_utilization_ratio": ("gauge", "GPU utilisation, 0 to 1."),
    "mgpumanager_gpu_up": ("gauge", "1 if the last GPU reading succeeded, else 0."),
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """Counters and histograms, labelled by consumer, written in Prometheus' text format 0.0.4."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, Labels], float] = {}
        #: (name, labels) -> [count per bucket (cumulative when written), sum, count]
        self.histograms: dict[tuple[str, Labels], list[Any]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        h = self.histograms.setdefault(key, [[0] * len(BUCKETS), 0.0, 0])
        slot = bisect.bisect_left(BUCKETS, seconds)
        if slot < len(BUCKETS):  # beyond the last bucket: counted in +Inf (the count) only
            h[0][slot] += 1
        h[1] += seconds
        h[2] += 1

    def render(self, gauges: Sequence[tuple[str, Labels, float]]) -> str:
        """The exposition: these counters and histograms, and the gauges the caller read just now."""
        samples: dict[str, list[str]] = {name: [] for name in METRIC_HELP}
        for name, labels, value in gauges:
            samples[name].append(_sample(name, labels, value))
        for (name, labels), value in sorted(self.counters.items()):
            samples[name].append(_sample(name, labels, value))
        for (name, labels), (buckets, total, count) in sorted(self.histograms.items()):
            cumulative = 0
            for bound, n in zip(BUCKETS, buckets, strict=True):
                cumulative += n
                samples[name].append(_sample(f"{name}_bucket", (*labels, ("le", f"{bound:g}")), cumulative))
            samples[name].append(_sample(f"{name}_bucket", (*labels, ("le", "+Inf")), count))
            samples[name].append(_sample(f"{name}_sum", labels, total))
            samples[name].append(_sample(f"{name}_count", labels, count))
        out = []
        for name, (kind, text) in METRIC_HELP.items():
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *samples[name]]
        return "\n".join(out) + "\n"


def _sample(name: str, labels: Labels, value: float) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    text = "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}" if labels else ""
    number = (
        "NaN"
        if math.isnan(value)
        else repr(float(value))
        if not float(value).is_integer()
        else str(int(value))
    )
    return f"{name}{text} {number}"


# =====================================================================================================
# GPU reading
# =====================================================================================================


@dataclass(frozen=True)
class GpuProcess:
    pid: int | None
    name: str | None
    used_mib: int | None


@dataclass(frozen=True)
class GpuReading:
    index: int | None
    uuid: str | None
    name: str | None
    total_mib: int | None
    used_mib: int | None
    free_mib: int | None
    utilization_pct: int | None
    temperature_c: int | None
    processes: tuple[GpuProcess, ...]
    #: Wall-clock time the query started (for people) and its monotonic twin (for freshness).
    read_at: float
    started: float


_UNITS = (" MiB", " %", " W")


def parse_smi_csv(text: str, fields: Sequence[str]) -> list[dict[str, str | None]]:
    """Rows of nvidia-smi's ``--format=csv[,noheader][,nounits]`` output, keyed by the fields asked for.

    ``[N/A]``-style values become None; a header line and unit suffixes are tolerated; anything else that
    does not fit the fields is a GpuError quoting the output.
    """
    rows = []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(", ")]
        if number == 0 and cells and cells[0].split(" [")[0] == fields[0]:
            continue  # header line of --format=csv
        if len(cells) > len(fields) and ("name" in fields or "process_name" in fields):
            # A name may itself contain ", ": give the surplus back to it.
            i = fields.index("name" if "name" in fields else "process_name")
            extra = len(cells) - len(fields)
            cells[i : i + extra + 1] = [", ".join(cells[i : i + extra + 1])]
        if len(cells) != len(fields):
            raise GpuError(
                f"unexpected nvidia-smi output (wanted {len(fields)} fields): {text.strip()[:300]!r}"
            )
        row: dict[str, str | None] = {}
        for key, raw in zip(fields, cells, strict=True):
            value = raw
            for unit in _UNITS:
                value = value.removesuffix(unit)
            na = value in ("N/A", "") or (value.startswith("[") and value.endswith("]"))
            row[key] = None if na else value
        rows.append(row)
    return rows


def _int(row: Mapping[str, str | None], key: str) -> int | None:
    value = row.get(key)
    if value is None:
        return None
    try:
        return round(float(value))
    except ValueError:
        raise GpuError(f"unexpected nvidia-smi value for {key}: {value!r}") from None


def parse_gpu_reading(
    gpu_text: str, apps_text: str, *, index: int, started: float, read_at: float
) -> GpuReading:
    """One GpuReading from the outputs of the --query-gpu and --query-compute-apps queries."""
    rows = parse_smi_csv(gpu_text, GPU_FIELDS)
    row = next((r for r in rows if _int(r, "index") == index), rows[0] if len(rows) == 1 else None)
    if row is None:
        raise GpuError(f"nvidia-smi printed no line for GPU {index}: {gpu_text.strip()[:300]!r}")
    apps = parse_smi_csv(apps_text, APP_FIELDS)
    processes = tuple(
        GpuProcess(pid=_int(a, "pid"), name=a["process_name"], used_mib=_int(a, "used_memory"))
        for a in apps
        if a["gpu_uuid"] in (None, row["uuid"])
    )
    return GpuReading(
        index=_int(row, "index"),
        uuid=row["uuid"],
        name=row["name"],
        total_mib=_int(row, "memory.total"),
        used_mib=_int(row, "memory.used"),
        free_mib=_int(row, "memory.free"),
        utilization_pct=_int(row, "utilization.gpu"),
        temperature_c=_int(row, "temperature.gpu"),
        processes=processes,
        read_at=read_at,
        started=started,
    )


@dataclass(frozen=True)
class Finished:
    """A subprocess that exited: its status and (the tails of) what it wrote."""

    returncode: int
    stdout: bytes
    stderr: bytes

    def stderr_tail(self) -> str:
        text = self.stderr.decode(errors="replace").strip()
        return text[-STDERR_TAIL:] or "(no output on stderr)"


class ProcessTimeout(Exception):
    """A subprocess ran past its time and was killed, with its process group."""


class _Captured(asyncio.SubprocessProtocol):
    """What a subprocess writes, its last ``limit`` bytes per stream (a chatty one cannot fill memory),
    and when it exited and when its output ended."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.output: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: dict[int, asyncio.Future[None]] = {1: loop.create_future(), 2: loop.create_future()}

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        kept = self.output[fd]
        kept += data
        if len(kept) > self.limit:
            del kept[: len(kept) - self.limit]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd in self.closed and not self.closed[fd].done():
            self.closed[fd].set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


async def run_process(argv: Sequence[str], timeout_s: float, *, limit: int = OUTPUT_LIMIT) -> Finished:
    """Run a program without a shell, stdin from /dev/null, its output captured (bounded).

    It gets a process group of its own: if it has not exited after ``timeout_s`` (or when the caller is
    cancelled) the whole group is SIGKILLed and reaped, so nothing it started outlives it. Once it has
    exited, whatever it left running (a service it started, holding the pipes) is left alone; its output
    is read for PIPE_GRACE_S more at most. OSError when it cannot be started, ProcessTimeout when killed.
    """
    loop = asyncio.get_running_loop()
    transport, captured = await loop.subprocess_exec(
        lambda: _Captured(limit),
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, so a kill reaches its children too
    )
    try:
        try:
            await asyncio.wait_for(asyncio.shield(captured.exited), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            await _kill_group(transport.get_pid(), captured.exited, argv)
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ProcessTimeout(f"{argv[0]} did not finish within {timeout_s:g} s (killed)") from None
        try:
            await asyncio.wait_for(asyncio.gather(*captured.closed.values()), PIPE_GRACE_S)
        except asyncio.TimeoutError:
            log.info(
                logfmt(msg="process left its output open", argv=shlex.join(argv), pid=transport.get_pid())
            )
        returncode = transport.get_returncode()
        assert returncode is not None
        return Finished(returncode, bytes(captured.output[1]), bytes(captured.output[2]))
    finally:
        transport.close()  # our ends of the pipes; never the process group of a command that exited


async def _kill_group(pid: int, exited: asyncio.Future[None], argv: Sequence[str]) -> None:
    """SIGKILL a process's group and wait for it to be reaped (bounded)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    try:
        # Reaped at once normally; a process stuck in the kernel is left to the child watcher.
        await asyncio.wait_for(asyncio.shield(exited), REAP_TIMEOUT_S)
    except asyncio.TimeoutError:
        log.error(logfmt(msg="process survived SIGKILL", argv=shlex.join(argv), pid=pid))


async def run_nvidia_smi(argv: Sequence[str], timeout_s: float) -> str:
    """Run one nvidia-smi query as a subprocess; kill it (and anything it started) past ``timeout_s``."""
    try:
        done = await run_process(argv, timeout_s)
    except OSError as e:
        raise GpuError(f"cannot run {argv[0]}: {e.strerror or e}") from e
    except ProcessTimeout:
        raise GpuError(f"nvidia-smi did not answer within {timeout_s:g} s (killed)") from None
    if done.returncode != 0:
        # nvidia-smi writes its errors to stdout.
        text = done.stdout.decode(errors="replace").strip() or done.stderr.decode(errors="replace").strip()
        raise GpuError(f"nvidia-smi exited with status {done.returncode}: {text[:300] or '(no output)'}")
    return done.stdout.decode(errors="replace")


class GpuReader:
    """Reads one GPU through nvidia-smi; concurrent readers share one running query.

    ``read(max_age=...)`` may answer from a reading (or error) started less than ``max_age`` seconds ago;
    ``read_memory()`` always starts its own, smaller reading, for making room.
    """

    def __init__(
        self, config: GpuConfig, clock: Callable[[], float] = time.monotonic, *, index: int | None = None
    ):
        self.config = config
        #: The nvidia-smi index read (``-i``): gpu.index unless given.
        self.index = config.index if index is None else index
        self.clock = clock
        #: How many nvidia-smi processes were started (for tests and the bench), and reads that crashed.
        self.queries = 0
        self.crashes = 0
        self._inflight: asyncio.Task[GpuReading] | None = None
        self._last: tuple[float, GpuReading | GpuError] | None = None
        self._tasks: set[asyncio.Task[GpuReading]] = set()

    def __repr__(self) -> str:
        busy = "querying" if self._inflight is not None else "idle"
        return f"<GpuReader index={self.index} {busy} queries:{self.queries}>"

    async def read(self, *, max_age: float = 0.0) -> GpuReading:
        task = self._inflight
        if task is None and self._last is not None and self.clock() - self._last[0] < max_age:
            result = self._last[1]
            if isinstance(result, GpuError):
                raise result
            return result
        if task is None:
            task = self._start()
        return await asyncio.shield(task)

    def _start(self) -> asyncio.Task[GpuReading]:
        started = self.clock()
        task = asyncio.get_running_loop().create_task(self._query(started))
        self._inflight = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, started))
        return task

    def _done(self, started: float, task: asyncio.Task[GpuReading]) -> None:
        """Keep the newest finished reading (or its error) for ``max_age`` readers."""
        self._tasks.discard(task)
        if self._inflight is task:
            self._inflight = None
        if task.cancelled():
            return
        result: GpuReading | GpuError
        exc = task.exception()
        if exc is None:
            result = task.result()
        elif isinstance(exc, GpuError):
            result = exc
        else:
            self.crashes += 1
            log.error(logfmt(msg="gpu read crashed", error=describe(exc)))
            result = GpuError(describe(exc))
        if self._last is None or started >= self._last[0]:
            self._last = (started, result)

    async def read_memory(self) -> GpuReading:
        """A reading of its own of the GPU's line alone (one nvidia-smi, no process list), not shared or
        kept: what making room needs, at half the cost of a whole reading."""
        cfg = self.config
        started, read_at = self.clock(), time.time()
        self.queries += 1
        argv = [*cfg.nvidia_smi, "-i", str(self.index), f"--query-gpu={','.join(GPU_FIELDS)}"]
        text = await run_nvidia_smi([*argv, "--format=csv,noheader,nounits"], cfg.query_timeout_s)
        return parse_gpu_reading(text, "", index=self.index, started=started, read_at=read_at)

    def last_free_mib(self) -> int | None:
        """Free MiB from the newest finished reading, without reading again."""
        result = self._last[1] if self._last else None
        return result.free_mib if isinstance(result, GpuReading) else None

    async def _query(self, started: float) -> GpuReading:
        cfg = self.config
        base = [*cfg.nvidia_smi, "-i", str(self.index)]
        fmt = "--format=csv,noheader,nounits"
        self.queries += 2
        read_at = time.time()
        results = await asyncio.gather(
            run_nvidia_smi([*base, f"--query-gpu={','.join(GPU_FIELDS)}", fmt], cfg.query_timeout_s),
            run_nvidia_smi([*base, f"--query-compute-apps={','.join(APP_FIELDS)}", fmt], cfg.query_timeout_s),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return parse_gpu_reading(results[0], results[1], index=self.index, started=started, read_at=read_at)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# =====================================================================================================
# Consumers and health
# =====================================================================================================


@dataclass
class ConsumerState:
    """What the broker knows of one consumer. ``loaded`` is residency: True, False or None (unknown)."""

    healthy: bool | None = None
    loaded: bool | None = None
    last_probe: float | None = None
    last_error: str | None = None
    #: The error code a request gets while the last probe failed: consumer_unreachable or bad_consumer_url.
    last_error_code: str = "consumer_unreachable"
    #: Monotonic time of the last successfully finished job (for LRU) and its wall-clock twin (for people).
    last_used: float | None = None
    last_used_at: float | None = None
    #: Monotonic time of the broker's own last residency record; probes started before it do not override.
    record_at: float = float("-inf")
    #: Monotonic time a job last found the consumer failing; probes started before it do not heal it.
    unhealthy_at: float = float("-inf")
    #: Monotonic time a health wait (after a load command) found it up; failing probes started before
    #: it do not mark it down.
    healthy_at: float = float("-inf")
    #: Jobs (and holds) of this consumer holding the GPU lock now; the scheduler keeps it.
    jobs: int = 0
    #: Monotonic time the broker last saw it become resident (its own load, or a probe saying so).
    resident_at: float | None = None

    def set_loaded(self, loaded: bool | None, now: float, *, record: bool = True) -> None:
        """Residency changes here: stamps when it became resident, and (``record``) the broker's record."""
        if loaded is True and self.loaded is not True:
            self.resident_at = now
        self.loaded = loaded
        if record:
            self.record_at = now

    def idle_since(self) -> float | None:
        """Since when a resident consumer has not been used: its last job's end or its becoming resident."""
        times = [t for t in (self.last_used, self.resident_at) if t is not None]
        return max(times) if times else None


class Consumers:
    """The broker's HTTP calls to consumers of its own accord (health, load, unload) and their state."""

    def __init__(
        self,
        config: Config,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
        events: Events | None = None,
    ):
        self.config = config
        self.session = session
        self.clock = clock
        self.events = events or Events()
        self.states: dict[str, ConsumerState] = {name: ConsumerState() for name in config.consumers}
        #: Health rounds that crashed (a bug, not a consumer failure): logged and counted.
        self.health_errors = 0

    async def unload(self, name: str) -> None:
        c = self.config.consumers.get(name)
        if c is None or c.unload is None:
            raise CallError("unload: no unload route (any more)")
        if isinstance(c.unload, Command):
            await self._run(c, c.unload, "unload")
        else:
            await self._call(c, c.unload, "unload")

    async def load(self, name: str) -> None:
        """Load through the route, or run the command and then wait for the health route to answer 2xx,
        all within the load's ``timeout_s``."""
        c = self.config.consumers.get(name)
        if c is None or c.load is None:
            raise CallError("load: no load route (any more)")
        if not isinstance(c.load, Command):
            await self._call(c, c.load, "load")
            return
        deadline = self.clock() + c.load.timeout_s
        await self._run(c, c.load, "load")
        await self._wait_healthy(c, deadline, c.load.timeout_s)

    async def _run(self, c: ConsumerConfig, command: Command, what: str) -> None:
        """Run a load or unload command; anything but exit 0 in time is a CallError with its stderr."""
        started = self.clock()
        try:
            done = await run_process(command.argv, command.timeout_s)
        except OSError as e:
            raise CallError(f"{what} command cannot run {command.argv[0]}: {e.strerror or e}") from e
        except ProcessTimeout:
            raise CallError(
                f"{what} command did not finish within {command.timeout_s:g} s (killed)"
            ) from None
        log.info(
            logfmt(
                msg="command",
                consumer=c.name,
                action=what,
                argv=shlex.join(command.argv),
                exit=done.returncode,
                ms=round((self.clock() - started) * 1000),
            )
        )
        if done.returncode != 0:
            raise CallError(f"{what} command exited with status {done.returncode}: {done.stderr_tail()}")

    async def _wait_healthy(self, c: ConsumerConfig, deadline: float, timeout_s: float) -> None:
        """Poll the health route every HEALTH_WAIT_POLL_S until it answers 2xx, at most until ``deadline``."""
        reason = "not asked"
        while True:
            left = deadline - self.clock()
            if left <= 0:
                raise CallError(f"load: not healthy within {timeout_s:g} s of the command's start ({reason})")
            started = self.clock()
            try:
                timeout = aiohttp.ClientTimeout(total=min(left, self.config.health.timeout_s))
                async with self.session.request(
                    c.health.method, c.url + c.health.path, timeout=timeout, allow_redirects=False
                ) as resp:
                    await resp.content.read(64 * 1024)
                    if 200 <= resp.status < 300:
                        self._record_health(c.name, True, None, "consumer_unreachable")
                        self.states[c.name].healthy_at = self.clock()
                        return
                    reason = f"health answered {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                reason = describe(e)
            await asyncio.sleep(max(0.0, min(HEALTH_WAIT_POLL_S - (self.clock() - started), left)))

    async def _call(self, c: ConsumerConfig, route: Route, what: str) -> None:
        url = c.url + route.path
        timeout = aiohttp.ClientTimeout(total=route.timeout_s)
        try:
            async with self.session.request(
                route.method, url, json=route.body, timeout=timeout, allow_redirects=False
            ) as resp:
                body = await resp.content.read(2000)
                if not 200 <= resp.status < 300:
                    text = body.decode(errors="replace").strip()[:200]
                    raise CallError(f"{what} answered {resp.status}: {text}")
        except asyncio.TimeoutError:
            raise CallError(f"{what} did not answer within {route.timeout_s:g} s") from None
        except (aiohttp.ClientError, ValueError) as e:
            raise CallError(f"{what} failed: {describe(e)}") from e

    def mark_unhealthy(self, name: str, reason: str) -> None:
        """A job found the consumer failing: unhealthy until a probe started after now succeeds."""
        state = self.states[name]
        if state.healthy is not False:
            log.warning(logfmt(msg="health", consumer=name, healthy=False, reason=reason))
            self.events.publish("health", consumer=name, healthy=False, reason=reason)
        state.healthy, state.last_error, state.last_error_code = False, reason, "consumer_unreachable"
        state.unhealthy_at = self.clock()
        c = self.config.consumers.get(name)
        if c is not None and c.started_by_command and state.loaded is not False:
            # Its process is gone (or going): the next job starts it again with the load command.
            log.info(logfmt(msg="residency", consumer=name, loaded=False, source="job failure"))
            state.set_loaded(False, self.clock())

    async def probe(self, name: str) -> None:
        """One health probe; updates healthy, last_error and (from a ``loaded`` field) residency.

        A probe that started before a job found the consumer failing does not make it healthy again.
        """
        c = self.config.consumers.get(name)
        state = self.states.get(name)
        if c is None or state is None:
            return
        started = self.clock()
        loaded: Any = None
        code = "consumer_unreachable"
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.health.timeout_s)
            async with self.session.request(
                c.health.method, c.url + c.health.path, timeout=timeout, allow_redirects=False
            ) as resp:
                body = await resp.content.read(64 * 1024)
                ok = 200 <= resp.status < 300
                reason = None if ok else f"health answered {resp.status}"
                if ok and resp.content_type == "application/json":
                    data = parse_json(body)
                    loaded = data.get("loaded") if isinstance(data, dict) else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            ok, reason, code = False, describe(e), failure_code(e)
            if isinstance(e, asyncio.TimeoutError) and state.jobs > 0:
                # A consumer busy with a GPU job may answer its health route slowly: not a failure.
                log.debug(logfmt(msg="health probe timed out while busy", consumer=name))
                return
        state.last_probe = time.time()
        if (ok and started < state.unhealthy_at) or (not ok and started < state.healthy_at):
            return  # overtaken by what a job or a health wait found since it started
        self._record_health(name, ok, reason, code)
        if c.started_by_command and not isinstance(loaded, bool):
            # A service started by command holds its model while it runs: up is resident, down is not.
            loaded = ok
        if isinstance(loaded, bool) and started >= state.record_at and loaded != state.loaded:
            log.info(logfmt(msg="residency", consumer=name, loaded=loaded, source="health"))
            state.set_loaded(loaded, self.clock(), record=False)

    def _record_health(self, name: str, ok: bool, reason: str | None, code: str) -> None:
        """A probe's (or a health wait's) verdict; a change is logged and published."""
        state = self.states[name]
        if ok != state.healthy:
            log.log(
                logging.INFO if ok else logging.WARNING,
                logfmt(msg="health", consumer=name, healthy=ok, reason=reason),
            )
            self.events.publish("health", consumer=name, healthy=ok, reason=reason)
        state.healthy, state.last_error, state.last_error_code = ok, reason, code

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(name) for name in self.config.consumers))

    async def run_health(self) -> None:
        """After the first round, probe every consumer every ``health.interval_s``; owned by the app."""
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            try:
                await self.probe_all()
            except Exception as e:
                self.health_errors += 1
                log.error(logfmt(msg="health round crashed", error=describe(e)))


# =====================================================================================================
# The scheduler
# =====================================================================================================


@dataclass(eq=False)
class Job:
    """One GPU request, from admission to its end."""

    id: int
    #: The consumer's config as it was at admission (a reload may change or remove it meanwhile).
    target: ConsumerConfig
    kind: str
    priority: int
    arrived: float
    granted: asyncio.Future[None]
    #: An admin operation: holds the lock alone, no job of its consumer joins it.
    exclusive: bool = False
    #: The client's X-Request-ID (or one made up), for the logs.
    request_id: str | None = None
    #: queued -> running -> ended
    state: str = "queued"
    started: float | None = None
    ended: float | None = None
    evictions: int = 0
    #: How it ended, kept for its log line (written when a hold after it ends).
    outcome: str | None = None
    code: str | None = None
    http: int | None = None

    @property
    def consumer(self) -> str:
        return self.target.name

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.consumer}/{self.kind} {self.state}>"


@dataclass
class Stats:
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0
    evictions: int = 0
    unload_failures: int = 0
    loads: int = 0
    load_failures: int = 0
    admin_unloads: int = 0
    idle_unloads: int = 0
    preload_skips: int = 0
    hold_timeouts: int = 0
    hold_poll_errors: int = 0
    internal_errors: int = 0


def _after_handover(step: Callable[[], None]) -> None:
    """Run bookkeeping (a job's metrics, event and log line) two turns of the loop from now.

    The job granted next wakes in the next turn and its request goes out in the one after (aiohttp writes
    it from a task of its own): the GPU changes hands first, the books follow.
    """
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, step)


class WaitQueue:
    """Waiting jobs, one first-in-first-out list per base priority.

    Within a level, the job that came first has waited longest, so it has the highest effective priority
    (aging adds the same to all of a level): whoever the documented order picks is the first of some
    level. A grant looks at five jobs, not at every waiting one.
    """

    def __init__(self) -> None:
        self._levels: list[list[Job]] = [[] for _ in range(PRIORITY_MAX + 1)]
        self._count = 0

    def append(self, job: Job) -> None:
        self._levels[job.priority].append(job)
        self._count += 1

    def remove(self, job: Job) -> None:
        self._levels[job.priority].remove(job)
        self._count -= 1

    def __len__(self) -> int:
        return self._count

    def __contains__(self, job: Job) -> bool:
        return job in self._levels[job.priority]

    def __iter__(self) -> Iterator[Job]:
        return itertools.chain.from_iterable(self._levels)

    def firsts(self, wanted: Callable[[Job], bool]) -> list[Job]:
        """The first job of each level that is still waiting (not cancelled) and ``wanted``."""
        found = []
        for level in self._levels:
            for job in level:
                if not job.granted.done() and wanted(job):
                    found.append(job)
                    break
        return found


class UnloadOps(Protocol):
    """What the scheduler needs from consumers: ``Consumers`` in production, a recording fake in tests."""

    states: dict[str, ConsumerState]

    async def unload(self, name: str) -> None: ...

    async def load(self, name: str) -> None: ...


class Scheduler:
    """The queue and the GPU lock, with eviction and load before a job runs.

    The clock, the GPU reader and the consumer calls are injected, so the whole decision logic runs in tests
    without sockets. Waiters are futures; a waiter cancelled while being woken passes its grant on.
    """

    def __init__(
        self,
        config: Config,
        gpu: Any,
        ops: UnloadOps,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        events: Events | None = None,
        metrics: Metrics | None = None,
        index: int | None = None,
    ):
        self.config = config
        #: The GPU this scheduler owns (gpu.index unless given): only consumers on it are its business.
        self.index = config.gpu.index if index is None else index
        self.gpu = gpu
        self.ops = ops
        self.states = ops.states
        self.clock = clock
        self.sleep = sleep
        self.events = events or Events()
        self.metrics = metrics or Metrics()
        self.stats = Stats()
        #: The consumer holding the GPU lock, and how many of its slots (jobs and holds) are taken.
        self.holder: str | None = None
        self.slots = 0
        self.holds = 0
        #: The holder is an admin operation that holds the lock alone.
        self.exclusive = False
        #: Shutting down: no job is admitted any more.
        self.closing = False
        self._held_since = 0.0
        self._idle = asyncio.Event()
        self._idle.set()
        self._waiting = WaitQueue()
        self._ids = itertools.count(1)
        self._prepare_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Consumers with an idle unload or a preload queued or running: never two for one consumer.
        self._internal: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return (
            f"<Scheduler gpu={self.index} holder={self.holder} slots={self.slots}"
            f" waiters:{len(self._waiting)}>"
        )

    # ---- ordering ----------------------------------------------------------------------------------

    def effective_priority(self, job: Job, now: float) -> int:
        aged = int((now - job.arrived) // self.config.scheduler.aging_s)
        return min(PRIORITY_MAX, job.priority + aged)

    def _order(self, job: Job, now: float) -> tuple[int, float, int]:
        return (-self.effective_priority(job, now), job.arrived, job.id)

    def queue(self) -> list[Job]:
        """Waiting jobs in the order they would be granted (ignoring max_concurrency joins)."""
        now = self.clock()
        return sorted(self._waiting, key=lambda j: self._order(j, now))

    @property
    def running(self) -> int:
        return self.slots - self.holds

    # ---- admission and the lock ----------------------------------------------------------------------

    async def acquire(self, consumer: str, kind: str, request_id: str | None = None) -> Job:
        """Queue a job, wait for the lock, make room and load; the caller must then call ``finish``."""
        job = self._admit(consumer, kind, request_id=request_id)
        await self._wait_for_grant(job)
        if not self._needs_no_room(job):  # checked again under the lock; the common case skips it
            await self._guarded(job, self._prepare(job))
        self._publish("started", job)
        return job

    async def unload_now(self, name: str) -> Job:
        """Admin: unload a consumer through its route, holding the lock alone so no job races it."""
        job = self._admit(name, "unload", exclusive=True)
        await self._wait_for_grant(job)

        async def unload() -> None:
            async with self._prepare_lock:
                error = await self._unload(job, name, evicting=False)
            if error is not None:
                raise BrokerError("unload_failed", f"{name} {error}", name)

        await self._guarded(job, unload())
        self.finish(job, "completed")
        return job

    async def load_now(self, name: str) -> Job:
        """Admin: make room for a consumer and load it (warm-up), holding the lock alone."""
        job = self._admit(name, "load", exclusive=True)
        await self._wait_for_grant(job)
        await self._guarded(job, self._prepare(job, warm=True))
        self.finish(job, "completed")
        return job

    def idle_deadline(self, name: str) -> float | None:
        """When a resident consumer with ``idle_unload_s`` becomes due for its idle unload (None: never)."""
        c = self.config.consumers.get(name)
        state = self.states.get(name)
        if c is None or state is None or not c.idle_unload_s or c.unload is None or state.loaded is not True:
            return None
        since = state.idle_since()
        return None if since is None else since + c.idle_unload_s

    def _busy_with(self, name: str) -> str | None:
        """Why ``name`` is not idle: a job or hold of it holds the lock, or one waits for it."""
        own = 1 if self.holder == name and self.exclusive else 0  # the idle unload asking
        if self.states[name].jobs > own:  # on this GPU, or on another one a reload moved it from
            return "has jobs running"
        if any(j.consumer == name for j in self._waiting):
            return "a job waits for it"
        return None

    def idle_due(self, name: str) -> bool:
        due = self.idle_deadline(name)
        return due is not None and self.clock() >= due and self._busy_with(name) is None

    async def idle_unload(self, name: str) -> Job | None:
        """Unload a consumer unused for its ``idle_unload_s``: jobs waiting go first (unless it aged past
        them); checked again once granted. None when it is not due (or one is pending)."""
        if not self.idle_due(name):
            return None
        return await self._run_internal("idle_unload", name, self._unload_if_idle)

    async def preload(self, name: str) -> Job | None:
        """Load a consumer if it fits as things are, never evicting. None when one is pending already."""
        return await self._run_internal("preload", name, self._load_if_fits)

    async def _run_internal(self, kind: str, name: str, step: Callable[[Job], Awaitable[None]]) -> Job | None:
        """An idle unload or a preload: an exclusive job of the lowest priority, one pending per consumer."""
        if (kind, name) in self._internal:
            return None
        self._internal.add((kind, name))
        try:
            job = self._admit(name, kind, exclusive=True, priority=0)
            await self._wait_for_grant(job)
            await self._guarded(job, step(job))
            self.finish(job, "completed")
            return job
        finally:
            self._internal.discard((kind, name))

    async def _unload_if_idle(self, job: Job) -> None:
        name = job.consumer
        async with self._prepare_lock:
            # While it waited, a job may have come, used the consumer or be waiting for it.
            if not self.idle_due(name):
                why = self._busy_with(name) or "no longer idle or resident"
                log.info(logfmt(msg="idle unload skipped", consumer=name, reason=why, job=job.id))
                return
            error = await self._unload(job, name, evicting=False, by="idle")
        if error is not None:
            raise BrokerError("unload_failed", f"{name} {error}", name)

    async def _load_if_fits(self, job: Job) -> None:
        name = job.consumer
        async with self._prepare_lock:
            if self.states[name].loaded is True:
                log.info(logfmt(msg="preload: already resident", consumer=name, job=job.id))
                return
            need = job.target.vram_resident_mib + self.config.gpu.cushion_mib
            # (A consumer whose memory is elsewhere fits whatever this GPU holds.)
            reading = await self._read_gpu(job) if job.target.vram_resident_mib else None
            if reading is not None and (reading.free_mib is None or reading.free_mib < need):
                self.stats.preload_skips += 1
                why = {"free_mib": reading.free_mib, "need_mib": need}
                log.warning(logfmt(msg="preload skipped: it does not fit", consumer=name, **why))
                self.events.publish("preload_skipped", consumer=name, job=job.id, **why)
                return
            await self._load(name)

    def _admit(
        self,
        consumer: str,
        kind: str,
        *,
        exclusive: bool = False,
        request_id: str | None = None,
        priority: int | None = None,
    ) -> Job:
        """A new job for a configured consumer; counted from here on."""
        target = self.config.consumers.get(consumer)
        if target is None:  # removed by a reload since the request was routed
            raise BrokerError("no_consumer", f"{consumer} is no longer configured", consumer)
        if target.gpu != self.index:  # moved to another GPU by a reload meanwhile
            raise BrokerError("no_consumer", f"{consumer} runs on GPU {target.gpu} now", consumer)
        self.stats.jobs += 1
        return Job(
            id=next(self._ids),
            target=target,
            kind=kind,
            priority=priority if priority is not None else PRIORITY_MAX if exclusive else target.priority,
            arrived=self.clock(),
            granted=asyncio.get_running_loop().create_future(),
            exclusive=exclusive,
            request_id=request_id,
        )

    def _publish(self, name: str, job: Job, **fields: Any) -> None:
        self.events.publish(name, job=job.id, consumer=job.consumer, kind=job.kind, gpu=self.index, **fields)

    async def _wait_for_grant(self, job: Job) -> None:
        """Queue the job and wait for the lock; queue_full, queue_timeout or cancellation end it."""
        cfg = self.config
        if self.closing:
            self._end(job, "failed", "shutting_down")
            raise BrokerError("shutting_down", "the broker is shutting down", job.consumer)
        if len(self._waiting) >= cfg.scheduler.max_queue:
            self._end(job, "rejected", "queue_full")
            raise BrokerError("queue_full", f"{len(self._waiting)} jobs are waiting already", job.consumer)
        self._waiting.append(job)
        self._publish("queued", job, priority=job.priority, request_id=job.request_id)
        timer = asyncio.get_running_loop().call_later(cfg.scheduler.queue_timeout_s, self._expire, job)
        self._dispatch()
        try:
            await job.granted
        except asyncio.CancelledError:
            self._leave_queue(job)
            self._end(job, "cancelled")
            raise
        except BrokerError as e:  # queue_timeout from _expire, no_consumer from forget
            self._end(job, "failed", e.code)
            raise
        finally:
            timer.cancel()

    async def _guarded(self, job: Job, step: Awaitable[None]) -> None:
        """Run a step of a granted job; any failure gives the slot back and ends the job, then re-raises."""
        try:
            await step
        except BaseException as e:
            self._release_slot(job)
            if isinstance(e, asyncio.CancelledError):
                self._end(job, "cancelled")
            elif isinstance(e, BrokerError):
                self._end(job, "failed", e.code)
            else:
                self.stats.internal_errors += 1
                log.exception(logfmt(msg="scheduler crashed", consumer=job.consumer, job=job.id))
                self._end(job, "failed", "scheduler_error")
                raise BrokerError("scheduler_error", f"internal error: {describe(e)}", job.consumer) from e
            raise

    def shut_down(self) -> None:
        """Admit nothing more, and answer every queued job with shutting_down."""
        self.closing = True
        for job in [j for j in self._waiting if not j.granted.done()]:
            self._waiting.remove(job)
            job.granted.set_exception(
                BrokerError("shutting_down", "the broker is shutting down", job.consumer)
            )

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no job or hold holds the lock, at most ``timeout_s``; whether it got idle."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def forget(self) -> None:
        """After a reload: jobs waiting for a consumer gone (or on another GPU now) get no_consumer."""
        for job in [j for j in self._waiting if not j.granted.done()]:
            now = self.config.consumers.get(job.consumer)
            if now is not None and now.gpu == self.index:
                continue
            why = "was removed from the config" if now is None else f"was moved to GPU {now.gpu}"
            self._waiting.remove(job)
            job.granted.set_exception(BrokerError("no_consumer", f"{job.consumer} {why}", job.consumer))
        self._dispatch()

    def _leave_queue(self, job: Job) -> None:
        """A cancelled waiter leaves: dequeued, or its grant passed on if it was granted meanwhile."""
        if job.state == "running":
            self._release_slot(job)
        elif job in self._waiting:
            self._waiting.remove(job)
            # A job that left may have been what kept a join of the holder out.
            self._dispatch()

    def _expire(self, job: Job) -> None:
        """The queue timer of a job ran out: answer it with queue_timeout unless it was granted."""
        if job.state != "queued" or job.granted.done():
            return
        self._waiting.remove(job)
        waited = self.config.scheduler.queue_timeout_s
        job.granted.set_exception(
            BrokerError("queue_timeout", f"waited {waited:g} s for the GPU", job.consumer)
        )
        self._dispatch()

    def _dispatch(self) -> bool:
        """Grant the lock (or a further slot of the holder) to whoever the documented order says; whether
        anyone was granted."""
        now = self.clock()
        granted = False
        while True:
            # A waiter whose task was cancelled has a cancelled future; it stays queued (and counted)
            # until its task runs again and takes itself out.
            if self.holder is None:
                firsts = self._waiting.firsts(lambda j: True)
                if not firsts:
                    return granted
                job = min(firsts, key=lambda j: self._order(j, now))
            else:
                holder = self.config.consumers.get(self.holder)
                if self.exclusive or holder is None or self.slots >= holder.max_concurrency:
                    return granted
                mine = self._waiting.firsts(lambda j: j.consumer == self.holder)
                if not mine:
                    return granted
                job = min(mine, key=lambda j: self._order(j, now))
                if job.exclusive:
                    return granted
                level = self.effective_priority(job, now)
                others = self._waiting.firsts(lambda j: j.consumer != self.holder)
                if any(self.effective_priority(j, now) >= level for j in others):
                    return granted
            self._waiting.remove(job)
            if self.holder is None:
                self._held_since = now
            self.holder, self.exclusive = job.consumer, job.exclusive
            self.slots += 1
            self._idle.clear()
            self.states[job.consumer].jobs += 1
            job.state, job.started = "running", now
            job.granted.set_result(None)
            granted = True
            self._publish("granted", job, waited_s=round(now - job.arrived, 3))

    def _release_slot(self, job: Job) -> bool:
        """A job or hold gives its slot back; the last one frees the lock. Whether another job got it."""
        assert job.consumer == self.holder, (job, self.holder)
        self.slots -= 1
        self.states[job.consumer].jobs -= 1
        if self.slots == 0:
            self.holder, self.exclusive = None, False
            self._idle.set()
        return self._dispatch()

    # ---- making room---------------------------------------------------------------------------------

    async def _prepare(self, job: Job, *, warm: bool = False) -> None:
        """Make room for the target and load it; serialised, so two jobs never evict at once.

        ``warm`` (an admin load) also loads a target of unknown residency.
        """
        async with self._prepare_lock:
            state = self.states[job.consumer]
            if self._needs_no_room(job):
                return
            await self._make_room(job)
            # A service started by command whose health fails is stopped, even when an unload command
            # failed half-way and left its residency unknown.
            stopped = job.target.started_by_command and state.loaded is None and state.healthy is False
            if job.target.load is not None and (state.loaded is False or warm or stopped):
                await self._load(job.consumer)

    def _needs_no_room(self, job: Job) -> bool:
        """Known resident, or its memory is elsewhere (a remote broker): no GPU reading, no eviction."""
        return self.states[job.consumer].loaded is True or job.target.vram_resident_mib == 0

    def victims(self, target: ConsumerConfig, exclude: set[str]) -> tuple[list[str], dict[str, str]]:
        """Eviction candidates for ``target``, least recently used first, and why the others are not."""
        candidates, why_not = [], {}
        for order, (name, c) in enumerate(self.config.consumers.items()):
            if name == target.name or c.gpu != self.index:
                continue  # a consumer on another GPU takes none of this one's memory
            state = self.states[name]
            if c.vram_managed:
                why_not[name] = "vram_managed"
            elif c.unload is None:
                why_not[name] = "no unload route"
            elif name in target.can_coexist_with or target.name in c.can_coexist_with:
                why_not[name] = f"may coexist with {target.name}"
            elif state.jobs > 0:
                why_not[name] = "has jobs running"
            elif name in exclude:
                why_not[name] = "unload failed" if state.loaded is None else "already unloaded"
            elif state.loaded is False:
                why_not[name] = "not resident"
            else:
                last = state.last_used if state.last_used is not None else -math.inf
                candidates.append((last, order, name))
        return [name for _, _, name in sorted(candidates)], why_not

    def _may_hold_itself(self, target: ConsumerConfig, tried: set[str]) -> bool:
        state = self.states[target.name]
        return state.loaded is None and target.unload is not None and target.name not in tried

    async def _read_gpu(self, job: Job, *, memory_only: bool = True) -> GpuReading:
        """A fresh reading: the GPU line alone to decide, a whole one (with processes) to explain."""
        try:
            return await (self.gpu.read_memory() if memory_only else self.gpu.read())
        except GpuError as e:
            raise BrokerError("gpu_unavailable", f"cannot read the GPU: {e}", job.consumer) from e

    async def _make_room(self, job: Job) -> None:
        """While the target does not fit, unload the least recently used victim and wait for its memory."""
        cfg = self.config
        target = job.target
        need = target.vram_resident_mib + cfg.gpu.cushion_mib
        reading = await self._read_gpu(job)
        tried: set[str] = set()
        while reading.free_mib is None or reading.free_mib < need:
            if reading.free_mib is None:
                raise BrokerError("gpu_unavailable", "nvidia-smi reports no free memory figure", job.consumer)
            victims, why_not = self.victims(target, tried)
            if not victims and self._may_hold_itself(target, tried):
                # Last resort: the target, of unknown residency (after a restart, say), may itself be
                # what fills the GPU. Unloading it makes its state known; it is loaded again below.
                victims = [target.name]
            if not victims or len(tried) >= cfg.scheduler.max_evictions:
                whole = await self._read_gpu(job, memory_only=False)  # the processes, for the message
                raise self._insufficient(job, whole, need, why_not, victims)
            victim = victims[0]
            tried.add(victim)
            size = cfg.consumers[victim].vram_resident_mib  # before any await: a reload may remove it
            if await self._unload(job, victim) is None:
                reading = await self._wait_for_memory(job, victim, size, reading.free_mib, need)

    def _insufficient(
        self, job: Job, reading: GpuReading, need: int, why_not: dict[str, str], left: list[str]
    ) -> BrokerError:
        target = job.target
        parts = [
            f"{reading.free_mib} MiB free, {need} MiB needed"
            f" ({target.name} {target.vram_resident_mib} + cushion {self.config.gpu.cushion_mib})"
        ]
        if left:
            parts.append(f"gave up after {self.config.scheduler.max_evictions} unload attempts")
        if why_not:
            parts.append("not evictable: " + ", ".join(f"{n} ({why})" for n, why in why_not.items()))
        procs = ", ".join(f"pid {p.pid} {p.name} {p.used_mib} MiB" for p in reading.processes)
        parts.append(f"GPU processes: {procs or 'none listed'}")
        return BrokerError("insufficient_vram", "; ".join(parts), job.consumer)

    async def _unload(self, job: Job, victim: str, *, evicting: bool = True, by: str = "admin") -> str | None:
        """Unload one consumer through its route or command (for ``job``'s room, or ``by`` an admin or
        idleness); None on success, else why not (counted and logged).

        While the call is under way the victim's residency is unknown, and it stays so unless the call
        succeeds (a failed or interrupted unload may or may not have freed anything).
        """
        state = self.states[victim]
        why = {"for_consumer": job.consumer} if evicting else {"by": by}
        log.info(logfmt(msg="evicting" if evicting else "unloading", consumer=victim, **why, job=job.id))
        self.events.publish("evicting" if evicting else "unloading", consumer=victim, job=job.id, **why)
        state.set_loaded(None, self.clock())
        try:
            await self.ops.unload(victim)
        except Exception as e:
            self.stats.unload_failures += 1
            self.metrics.inc("mgpumanager_unload_failures_total", consumer=victim)
            log.warning(logfmt(msg="unload failed", consumer=victim, **why, error=str(e)))
            return str(e)
        if evicting:
            self.stats.evictions += 1
            self.metrics.inc("mgpumanager_evictions_total", consumer=victim)
            job.evictions += 1
        elif by == "idle":
            self.stats.idle_unloads += 1
            self.metrics.inc("mgpumanager_idle_unloads_total", consumer=victim)
        else:
            self.stats.admin_unloads += 1
        state.set_loaded(False, self.clock())
        return None

    async def _wait_for_memory(self, job: Job, victim: str, size: int, before: int, need: int) -> GpuReading:
        """Poll until the target fits, the victim's memory (``size`` MiB) shows up as free, or
        ``vram_wait_s`` passed."""
        cfg = self.config
        deadline = self.clock() + cfg.scheduler.vram_wait_s
        enough_freed = FREED_SHARE * size
        while True:
            started = self.clock()
            reading = await self._read_gpu(job)
            free = reading.free_mib if reading.free_mib is not None else before
            if free >= need or free - before >= enough_freed:
                break
            if self.clock() >= deadline:
                log.warning(
                    logfmt(
                        msg="memory not freed in time",
                        consumer=victim,
                        free_mib=free,
                        waited_s=cfg.scheduler.vram_wait_s,
                    )
                )
                break
            # A reading starts every VRAM_POLL_S (not VRAM_POLL_S after the last one ended).
            await self.sleep(max(0.0, VRAM_POLL_S - (self.clock() - started)))
        log.info(logfmt(msg="evicted", consumer=victim, for_consumer=job.consumer, free_mib=reading.free_mib))
        self.events.publish("evicted", consumer=victim, for_consumer=job.consumer, free_mib=reading.free_mib)
        return reading

    async def _load(self, name: str) -> None:
        """Load the target through its route; residency is unknown until the call succeeds."""
        state = self.states[name]
        log.info(logfmt(msg="loading", consumer=name))
        self.events.publish("loading", consumer=name)
        state.set_loaded(None, self.clock())
        try:
            await self.ops.load(name)
        except Exception as e:
            self.stats.load_failures += 1
            log.warning(logfmt(msg="load failed", consumer=name, error=str(e)))
            raise BrokerError("load_failed", f"{name} {e}", name) from e
        self.stats.loads += 1
        self.metrics.inc("mgpumanager_loads_total", consumer=name)
        state.set_loaded(True, self.clock())
        log.info(logfmt(msg="loaded", consumer=name))
        self.events.publish("loaded", consumer=name)

    # ---- the end of a job --------------------------------------------------------------------------

    def finish(
        self,
        job: Job,
        outcome: str,
        *,
        code: str | None = None,
        status: int | None = None,
        success: bool = False,
        hold: Callable[[], Awaitable[None]] | None = None,
        hold_timeout_s: float = 0.0,
    ) -> bool:
        """End a running job. Synchronous, so it runs even in a cancelled handler's ``finally``.

        ``hold`` keeps the job's slot in a task the scheduler owns until it returns or ``hold_timeout_s``.
        Whether another job was granted the slot.
        """
        if success:
            state = self.states[job.consumer]
            state.set_loaded(True, self.clock())
            state.last_used, state.last_used_at = self.clock(), time.time()
        if hold is None:
            # The slot first: the job granted next is woken before this one's event and log line.
            granted = self._release_slot(job)
            self._end(job, outcome, code, status)
            return granted
        self._end(job, outcome, code, status, log_now=False)
        self.holds += 1
        task = asyncio.get_running_loop().create_task(self._hold(job, hold, hold_timeout_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return False

    async def _hold(self, job: Job, hold: Callable[[], Awaitable[None]], timeout_s: float) -> None:
        """Keep the job's slot while ``hold`` runs (at most ``timeout_s``); then write the job's log line."""
        started = self.clock()
        try:
            await asyncio.wait_for(hold(), timeout_s)
            log.info(
                logfmt(msg="hold released", consumer=job.consumer, job=job.id, hold_ms=self._ms(started))
            )
        except asyncio.TimeoutError:
            self.stats.hold_timeouts += 1
            self.metrics.inc("mgpumanager_hold_timeouts_total", consumer=job.consumer)
            log.warning(logfmt(msg="hold timed out", consumer=job.consumer, job=job.id, timeout_s=timeout_s))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.stats.internal_errors += 1
            log.exception(logfmt(msg="hold crashed", consumer=job.consumer, job=job.id, error=describe(e)))
        finally:
            self.holds -= 1
            # The consumer worked until now: for idle unloads and the LRU order, this is its last use.
            state = self.states[job.consumer]
            state.last_used, state.last_used_at = self.clock(), time.time()
            held = self.clock() - started
            self.metrics.observe("mgpumanager_hold_seconds", held, consumer=job.consumer)
            self._log_job(job, hold_ms=round(held * 1000))
            self._release_slot(job)

    def _ms(self, since: float | None) -> int | None:
        return None if since is None else round((self.clock() - since) * 1000)

    def _end(
        self,
        job: Job,
        outcome: str,
        code: str | None = None,
        status: int | None = None,
        *,
        log_now: bool = True,
    ) -> None:
        """Count the job's outcome once: its stats now, its metrics, event and log line (unless a hold
        follows: then the line waits for the hold's end, to carry its length) once the GPU changed hands."""
        assert job.state != "ended", job
        job.state, job.ended = "ended", self.clock()
        job.outcome, job.code, job.http = outcome, code, status
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        _after_handover(functools.partial(self._account, job, log_now))

    def _account(self, job: Job, log_now: bool) -> None:
        """A job's metrics, its end event and (``log_now``) its log line."""
        assert job.ended is not None and job.outcome is not None
        self.metrics.inc("mgpumanager_jobs_total", consumer=job.consumer, outcome=job.outcome)
        wait_end = job.started if job.started is not None else job.ended
        self.metrics.observe("mgpumanager_queue_wait_seconds", wait_end - job.arrived, consumer=job.consumer)
        if job.started is not None:
            self.metrics.observe("mgpumanager_run_seconds", job.ended - job.started, consumer=job.consumer)
        event = {"completed": "finished"}.get(job.outcome, job.outcome)
        self._publish(event, job, code=job.code, http=job.http)
        if log_now:
            self._log_job(job, None)

    def _log_job(self, job: Job, hold_ms: int | None) -> None:
        """The one line per job that the README's logs section describes."""
        assert job.ended is not None
        wait_end = job.started if job.started is not None else job.ended
        log.info(
            logfmt(
                msg="job",
                id=job.id,
                consumer=job.consumer,
                kind=job.kind,
                status=job.outcome,
                code=job.code,
                http=job.http,
                wait_ms=round((wait_end - job.arrived) * 1000),
                run_ms=None if job.started is None else round((job.ended - job.started) * 1000),
                hold_ms=hold_ms,
                evictions=job.evictions,
                request_id=job.request_id,
            )
        )

    async def close(self) -> None:
        """Cancel the holds the scheduler owns."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "holder": None
            if self.holder is None
            else {
                "consumer": self.holder,
                "jobs": self.running,
                "holds": self.holds,
                "held_s": round(now - self._held_since, 3),
            },
            "queue": [
                {
                    "consumer": j.consumer,
                    "kind": j.kind,
                    "priority": self.effective_priority(j, now),
                    "waited_s": round(now - j.arrived, 3),
                }
                for j in self.queue()
            ],
            "stats": {**self.stats.__dict__, "running": self.running, "queued": len(self._waiting)},
        }


# =====================================================================================================
# The proxy
# =====================================================================================================

#: RFC 7230 6.1: never forwarded, either way; nor is any header that ``Connection`` names.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer"}
    | {"transfer-encoding", "upgrade"}
)
#: Headers aiohttp would add on its own; the consumer gets only what the client sent.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _pass_headers(headers: Mapping[str, str], drop: frozenset[str]) -> CIMultiDict[str]:
    named = {
        token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")
    }  # type: ignore[attr-defined]
    return CIMultiDict(
        (key, value)
        for key, value in headers.items()
        if (k := key.lower()) not in HOP_BY_HOP and k not in named and k not in drop
    )


def request_headers(request: web.Request, *, strip_auth: bool) -> CIMultiDict[str]:
    """The client's headers as the consumer gets them.

    Without hop-by-hop ones, Host, Content-Length and Expect (the broker holds the whole body already),
    nor the broker's own bearer token; with X-Forwarded-For (appended to) and X-Forwarded-Proto.
    """
    drop = {"host", "content-length", "expect", "forwarded", "x-real-ip", "x-forwarded-host"}
    headers = _pass_headers(request.headers, frozenset(drop | ({"authorization"} if strip_auth else set())))
    headers.popall("X-Forwarded-For", None)
    before = ", ".join(request.headers.getall("X-Forwarded-For", []))
    remote = request.remote or "unknown"
    headers["X-Forwarded-For"] = f"{before}, {remote}" if before else remote
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Request-ID"] = request[REQUEST_ID]
    return headers


def response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    """The consumer's headers as the client gets them: without hop-by-hop ones."""
    return _pass_headers(upstream.headers, frozenset())


@functools.lru_cache(maxsize=64)
def _forward_timeout(timeout_s: float) -> aiohttp.ClientTimeout:
    """No total (answers stream for minutes); bounded connect, and silence bounded by ``timeout_s``."""
    return aiohttp.ClientTimeout(
        total=None, sock_connect=min(CONNECT_TIMEOUT_S, timeout_s), sock_read=timeout_s
    )


async def open_upstream(
    session: aiohttp.ClientSession,
    consumer: ConsumerConfig,
    method: str,
    path_qs: str,
    headers: Mapping[str, str],
    body: bytes | bytearray | None,
) -> aiohttp.ClientResponse:
    """Send a request to a consumer and wait for its answer's headers; failures become BrokerErrors."""
    timeout = _forward_timeout(consumer.timeout_s)
    data: Any = body
    if body is not None and len(body) > BODY_SLICE:
        # Sent in slices, each written when the last has drained: the socket layer never holds a copy of
        # the whole body beside ours.
        headers = CIMultiDict(headers)
        headers["Content-Length"] = str(len(body))
        data = _slices(memoryview(body))
    try:
        url = URL(consumer.url + path_qs, encoded=True)
        return await session.request(
            method,
            url,
            headers=headers,
            data=data,
            timeout=timeout,
            allow_redirects=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )
    except _ConnectTimeout as e:  # before the answer began: unreachable, not slow
        raise BrokerError(
            "consumer_unreachable", f"upstream {consumer.name} {describe(e)}", consumer.name
        ) from e
    except asyncio.TimeoutError:
        raise BrokerError(
            "consumer_timeout",
            f"upstream {consumer.name} sent nothing for {consumer.timeout_s:g} s",
            consumer.name,
        ) from None
    except (aiohttp.ClientError, ValueError) as e:
        raise BrokerError(failure_code(e), f"upstream {consumer.name} {describe(e)}", consumer.name) from e


#: Bodies larger than this go to the consumer in slices of this size.
BODY_SLICE = 1 * MiB


async def _slices(view: memoryview) -> AsyncIterator[memoryview]:
    for start in range(0, len(view), BODY_SLICE):
        yield view[start : start + BODY_SLICE]


class UpstreamBroke(Exception):
    """The consumer failed after its answer began; the client's connection has been cut."""

    def __init__(self, error: BrokerError):
        super().__init__(error.message)
        self.error = error


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    consumer: ConsumerConfig,
    capture: bytearray | None = None,
    answered: Callable[[], bool] | None = None,
) -> web.StreamResponse:
    """Stream the consumer's answer to the client chunk by chunk, as it comes.

    ``answered`` is called once the consumer's answer is read whole, before its last chunk is written to
    the client: the GPU is free from the consumer's last byte on, not the client's. It says whether a job
    waiting for the GPU was granted it; if so that job goes first.

    A failure after the answer began cannot become an error response: the client's connection is cut
    without the final chunk, so it sees a truncated answer, and UpstreamBroke is raised. A client that
    accepts nothing for the consumer's ``timeout_s`` is cut off too (ConnectionResetError), so it cannot
    hold the GPU by not reading.
    """
    headers = response_headers(upstream)
    if upstream.content.is_eof() and request.method != "HEAD":
        # The whole answer came with its headers (a small one): headers and body go out in one write.
        body = await upstream.content.read()
        if capture is not None and len(body) <= HOLD_ANSWER_LIMIT:
            capture += body
        if answered is not None:
            await _hand_over(answered)
        whole = web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)
        await whole.prepare(request)
        await _to_client(request, whole.write_eof(), consumer)
        return whole
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await resp.prepare(request)
    transport = request.transport
    while True:
        try:
            chunk = await upstream.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            if transport is not None:
                transport.abort()
            code = "consumer_timeout" if isinstance(e, asyncio.TimeoutError) else "consumer_unreachable"
            error = BrokerError(
                code, f"upstream {consumer.name} failed mid-answer: {describe(e)}", consumer.name
            )
            raise UpstreamBroke(error) from e
        if capture is not None and len(capture) + len(chunk) <= HOLD_ANSWER_LIMIT:
            capture += chunk
        whole = not chunk or upstream.content.at_eof()
        if whole and answered is not None:
            await _hand_over(answered)
        if not chunk:
            break
        if transport is not None and _fits_unpaused(transport, len(chunk)):
            await resp.write(chunk)  # stays under the transport's high-water mark: this write cannot stall
        else:
            await _to_client(request, resp.write(chunk), consumer)
        if whole:
            break
    await resp.write_eof()
    return resp


def _fits_unpaused(transport: asyncio.BaseTransport, size: int) -> bool:
    """Whether ``size`` more bytes keep the transport's buffer under its high-water mark: then aiohttp's
    write cannot wait for the client (it waits only while the transport is paused). A large chunk on an
    empty buffer can still fill the client's socket and pause it. (uvloop's transports have these methods
    but are no asyncio.WriteTransport.)"""
    writer = cast(asyncio.WriteTransport, transport)
    return writer.get_write_buffer_size() + size <= writer.get_write_buffer_limits()[1]


async def _to_client(request: web.Request, write: Awaitable[None], consumer: ConsumerConfig) -> None:
    """A write to a client that may stall: a client that accepts nothing for the consumer's ``timeout_s`` is
    cut off (ConnectionResetError)."""
    try:
        await asyncio.wait_for(write, consumer.timeout_s)
    except asyncio.TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        log.warning(
            logfmt(msg="client stopped reading", consumer=consumer.name, timeout_s=consumer.timeout_s)
        )
        raise ConnectionResetError("client stopped reading") from None


async def _hand_over(answered: Callable[[], bool]) -> None:
    """The consumer's answer is whole: end the job; if that granted a waiting job, let it go first.

    Two turns of the loop: it wakes in the first and its request goes out in the second (aiohttp sends it
    from a task of its own), before this client gets its last bytes. Nobody waiting: no detour.
    """
    if answered():
        await asyncio.sleep(0)
        await asyncio.sleep(0)


def hold_poller(
    session: aiohttp.ClientSession, consumer: ConsumerConfig, hold: Hold, answer: bytes, stats: Stats
) -> Callable[[], Awaitable[None]] | None:
    """A coroutine function that returns once ``hold.path`` answers a non-empty JSON object or list.

    None (logged) when the consumer's answer cannot fill the path's placeholders.
    """
    names = re.findall(r"{(\w+)}", hold.path)
    data = parse_json(answer)
    if names and (not isinstance(data, dict) or any(n not in data for n in names)):
        log.warning(
            logfmt(
                msg="no hold: answer lacks the placeholder fields",
                consumer=consumer.name,
                fields=",".join(names),
            )
        )
        return None
    fill = {name: quote(str(data[name]), safe="") for name in names}  # type: ignore[index]
    path = re.sub(r"{(\w+)}", lambda m: fill[m.group(1)], hold.path)
    url = URL(consumer.url + path, encoded=True)
    timeout = aiohttp.ClientTimeout(total=min(consumer.timeout_s, hold.timeout_s))

    async def poll() -> None:
        while True:
            try:
                async with session.request(hold.method, url, timeout=timeout, allow_redirects=False) as resp:
                    body = await resp.read()
                    result = parse_json(body) if 200 <= resp.status < 300 else None
                    if isinstance(result, (dict, list)) and result:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                stats.hold_poll_errors += 1
                log.debug(logfmt(msg="hold poll failed", consumer=consumer.name, error=describe(e)))
            await asyncio.sleep(hold.poll_s)

    return poll


def audio_upstream_path(raw_path: str) -> str:
    """The consumer path for ``GET /audio/<file>``; bad_request for anything that could leave /audio/."""
    path, sep, query = raw_path.partition("?")
    rest = path.removeprefix("/audio/")
    lowered = rest.lower()
    refuse = (
        not path.startswith("/audio/")
        or not rest
        or any(bad in lowered for bad in ("%2f", "%5c", "%25", "\\", ";", "%3b"))
        or rest.startswith("/")
        or re.search(r"%(?![0-9A-Fa-f]{2})", rest) is not None  # malformed, such as IIS's %u002e
    )
    if not refuse:
        try:
            decoded = unquote(rest, errors="strict")
        except UnicodeDecodeError:
            refuse = True
        else:
            segments = decoded.split("/")
            refuse = any(s in ("", ".", "..") for s in segments) or not decoded.isprintable()
    if refuse:
        raise BrokerError("bad_request", "audio path must name a file below /audio/")
    return "/audio/" + rest + sep + query


#: Methods a mount forwards at once: they read, they never start GPU work.
UNSCHEDULED_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The kind a mount job has when its method and path are none of its consumer's ``paths``.
MOUNT_KIND = "mount"


def mount_upstream_path(raw_path: str, name: str) -> tuple[str, str]:
    """For ``/c/{name}/{path}``: the consumer's path as the client encoded it (query kept), and its decoded
    form (what ``paths`` and ``unscheduled`` are matched with); bad_request for '.' or '..' segments."""
    path, sep, query = raw_path.partition("?")
    raw_name, _, tail = path.removeprefix("/c/").partition("/")
    upstream = "/" + tail
    try:
        decoded = unquote(upstream, errors="strict")
        same_name = unquote(raw_name, errors="strict") == name
    except UnicodeDecodeError:
        decoded, same_name = "", False
    if not path.startswith("/c/") or not same_name or any(s in (".", "..") for s in decoded.split("/")):
        raise BrokerError("bad_request", f"a mount path must not leave /c/{name}/", name)
    return upstream + sep + query, decoded


def mount_job_path(consumer: ConsumerConfig, method: str, path: str) -> tuple[str, JobPath]:
    """The kind and JobPath of a scheduled mount request.

    A ``paths`` entry's (with its hold) when method and decoded path equal it; else kind ``mount``, no hold.
    """
    for kind, p in consumer.paths.items():
        if p.method == method and p.path == path:
            return kind, p
    return MOUNT_KIND, JobPath(method, path)


#: Negotiated by each of the two WebSocket connections on its own, never copied from one to the other.
WS_OWN_HEADERS = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions")
WS_OWN_HEADERS += ("Sec-WebSocket-Protocol", "Sec-WebSocket-Accept")
#: Close codes that may not be sent in a close frame (RFC 6455 7.4.1), and what the other side gets instead.
WS_UNSENDABLE = frozenset({1005, 1006, 1015})


def websocket_protocols(request: web.Request) -> list[str]:
    """The subprotocols the client offers (Sec-WebSocket-Protocol), in its order."""
    values = request.headers.getall("Sec-WebSocket-Protocol", [])
    return [p.strip() for value in values for p in value.split(",") if p.strip()]


async def open_websocket(
    session: aiohttp.ClientSession,
    consumer: ConsumerConfig,
    path_qs: str,
    headers: CIMultiDict[str],
    protocols: Sequence[str],
    max_msg_size: int,
) -> aiohttp.ClientWebSocketResponse:
    """Open the consumer's side of a proxied WebSocket; failures become BrokerErrors.

    The handshake (connect and the consumer's 101) is bounded like a connect: it must answer at once.
    """
    for header in WS_OWN_HEADERS:
        headers.popall(header, None)
    url = URL("ws" + consumer.url.removeprefix("http") + path_qs, encoded=True)
    limit = min(CONNECT_TIMEOUT_S, consumer.timeout_s)
    try:
        return await asyncio.wait_for(
            session.ws_connect(
                url,
                protocols=protocols,
                headers=headers,
                max_msg_size=max_msg_size,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CONNECT_TIMEOUT_S),
                heartbeat=WEBSOCKET_HEARTBEAT_S,
            ),
            limit,
        )
    except aiohttp.WSServerHandshakeError as e:
        message = f"upstream {consumer.name} refused the WebSocket upgrade: HTTP {e.status} {e.message}"
        raise BrokerError("consumer_unreachable", message, consumer.name) from e
    except asyncio.TimeoutError as e:
        message = f"upstream {consumer.name} did not complete the WebSocket handshake within {limit:g} s"
        raise BrokerError("consumer_unreachable", message, consumer.name) from e
    except (aiohttp.ClientError, ValueError) as e:
        raise BrokerError(failure_code(e), f"upstream {consumer.name} {describe(e)}", consumer.name) from e


WebSocketSide = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: WebSocketSide, sink: WebSocketSide) -> int:
    """Copy text and binary messages from ``source`` to ``sink`` until ``source`` closes; return the code
    to close the other side with. ConnectionResetError when either side broke instead."""
    async for msg in source:  # ends at CLOSE, CLOSING and CLOSED
        if msg.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type == aiohttp.WSMsgType.ERROR:
            raise ConnectionResetError(describe(msg.data))
    code = source.close_code
    if code is None or code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE:
        raise ConnectionResetError("connection lost")
    return 1000 if code in WS_UNSENDABLE else code


@dataclass(eq=False)
class ProxiedWebSocket:
    """A WebSocket relayed through a mount: the client's side and the consumer's."""

    client: web.WebSocketResponse
    upstream: aiohttp.ClientWebSocketResponse
    consumer: str
    metrics: Metrics
    #: Set to a close code to end the relay from outside (the broker shutting down).
    stop: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    async def relay(self) -> None:
        """Relay both ways until either side closes or ``stop`` is set, then close both with that code.

        Both pumps are owned: cancelled and awaited before the sides are closed, so no close races a read.
        A side that broke is logged and counted first (the closing may cancel this handler), and both are
        closed with 1011.
        """
        ended: list[asyncio.Task[int]] = []
        pumps = [
            asyncio.create_task(_pump(self.client, self.upstream), name="ws client->consumer"),
            asyncio.create_task(_pump(self.upstream, self.client), name="ws consumer->client"),
        ]
        for pump in pumps:
            pump.add_done_callback(ended.append)
        try:
            await asyncio.wait([*pumps, self.stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when the handler is cancelled (the client's connection closed right after its close
            # frame): what a pump already got still decides the code.
            code, error = self._outcome(ended)
            if error is not None:
                self.metrics.inc("mgpumanager_websocket_failures_total", consumer=self.consumer)
                log.warning(logfmt(msg="websocket broke", consumer=self.consumer, error=describe(error)))
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            closed = await asyncio.gather(
                self.upstream.close(code=code), self.client.close(code=code), return_exceptions=True
            )
            for result in closed:
                if isinstance(result, Exception):
                    log.warning(logfmt(msg="websocket close failed", error=describe(result)))

    def _outcome(self, ended: list[asyncio.Task[int]]) -> tuple[int, BaseException | None]:
        """The close code for both sides, and the error when a side broke: ``stop``'s code, else that of
        the first pump that ended; 1001 (going away) when none did (the relay was cancelled)."""
        if self.stop.done():
            return self.stop.result(), None
        for pump in ended:
            if not pump.cancelled():
                error = pump.exception()
                return (aiohttp.WSCloseCode.INTERNAL_ERROR, error) if error else (pump.result(), None)
        return aiohttp.WSCloseCode.GOING_AWAY, None


# =====================================================================================================
# The HTTP app
# =====================================================================================================


@dataclass
class Exchange:
    """One request forwarded to a consumer, and what became of it."""

    #: Keep a copy of a 2xx answer (for a hold's placeholders).
    capture: bool = False
    upstream: aiohttp.ClientResponse | None = None
    captured: bytearray | None = None
    #: The consumer's whole answer was read.
    done: bool = False
    #: The client left while its answer was being written.
    client_gone: bool = False
    #: The broker's error, when forwarding failed (before or after the answer began).
    error: BrokerError | None = None

    def close(self) -> None:
        """Give the upstream connection back to the pool when its answer was read whole, else drop it."""
        if self.upstream is not None:
            if self.done:
                self.upstream.release()
            else:
                self.upstream.close()


@dataclass
class Broker:
    """Everything the handlers share; made and closed by the app's cleanup context."""

    config: Config
    session: aiohttp.ClientSession
    consumers: Consumers
    events: Events
    metrics: Metrics
    #: Where a reload reads the config again; None for an app made from a Config alone.
    source: ConfigSource | None = None
    notifier: Notifier = field(default_factory=Notifier)
    started: float = field(default_factory=time.monotonic)
    #: One reader and one scheduler (queue, lock, eviction) per GPU, by nvidia-smi index.
    gpus: dict[int, GpuReader] = field(default_factory=dict)
    schedulers: dict[int, Scheduler] = field(default_factory=dict)
    #: Background work the broker owns (idle unloads, preloads); cancelled and awaited on cleanup.
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.add_gpus()

    def add_gpus(self) -> list[int]:
        """A reader and a scheduler for each GPU the config uses that has none yet; their indexes."""
        added = []
        for index in gpu_indexes(self.config):
            if index not in self.schedulers:
                reader = GpuReader(self.config.gpu, index=index)
                self.gpus[index] = reader
                self.schedulers[index] = Scheduler(
                    self.config, reader, self.consumers, events=self.events, metrics=self.metrics, index=index
                )
                added.append(index)
        return added

    @property
    def gpu(self) -> GpuReader:
        """The default GPU's reader (gpu.index): what the single-GPU fields of /v1/status show."""
        return self.gpus[self.config.gpu.index]

    @property
    def scheduler(self) -> Scheduler:
        """The default GPU's scheduler."""
        return self.schedulers[self.config.gpu.index]

    def reload(self) -> list[str]:
        """Read the config again and apply it in place; ConfigError (logged) leaves the old one."""
        if self.source is None:
            raise ConfigError(["this broker was not started from a config file"])
        self.notifier.send(
            "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        )
        try:
            new = self.source.load()
            self._check_moves(new)
        except ConfigError as e:
            for problem in e.problems:
                log.error(logfmt(msg="reload refused", problem=f"{self.source.path}: {problem}"))
            self.events.publish("reload", ok=False, problems=e.problems)
            raise
        finally:
            self.notifier.send("READY=1")
        changes = self.apply(new)
        log.info(logfmt(msg="reload", changes="; ".join(changes) or "none"))
        self.events.publish("reload", ok=True, changes=changes)
        self.start_preloads()
        return changes

    def _check_moves(self, new: Config) -> None:
        """A consumer moves to another GPU only while none of its jobs runs: two GPUs' locks must never
        both let it work (ConfigError otherwise; the reload is refused whole)."""
        problems = [
            f"consumers.{name}.gpu: {name} has a job running on GPU {old.gpu}; reload again once it is idle"
            for name, c in new.consumers.items()
            if (old := self.config.consumers.get(name)) is not None
            and old.gpu != c.gpu
            and self.consumers.states[name].jobs > 0
        ]
        if problems:
            raise ConfigError(problems)

    def internal_errors(self) -> int:
        """Bugs caught anywhere (each logged with its traceback): schedulers, health rounds, GPU reads."""
        return (
            sum(s.stats.internal_errors for s in self.schedulers.values())
            + self.consumers.health_errors
            + sum(r.crashes for r in self.gpus.values())
        )

    def status_line(self) -> str:
        """One line for systemd's STATUS=: who holds each GPU, the queue, free VRAM."""
        parts = []
        for index, s in sorted(self.schedulers.items()):
            holder = f"{s.holder} holds the GPU" if s.holder else "GPU idle"
            free = self.gpus[index].last_free_mib()
            text = f"{holder}, {len(s.queue())} queued, " + (
                f"{free} MiB free" if free is not None else "VRAM unknown"
            )
            parts.append(text if len(self.schedulers) == 1 else f"GPU {index}: {text}")
        return "; ".join(parts)

    def apply(self, new: Config) -> list[str]:
        """Use ``new`` from the next decision on, keeping queued and running jobs.

        Consumers whose URL and GPU did not change keep what the broker knows of them (health, residency,
        last use); jobs waiting for a consumer that is gone (or moved to another GPU) get no_consumer.
        """
        old, states, changes = self.config, self.consumers.states, []
        for name, c in new.consumers.items():
            before = old.consumers.get(name)
            if before is None or before.url != c.url or before.gpu != c.gpu:
                states[name] = ConsumerState(jobs=states[name].jobs if name in states else 0)
                what = "added" if before is None else "new url for" if before.url != c.url else "new GPU for"
                changes.append(f"{what} {name}")
            elif before != c:
                changes.append(f"changed {name}")
        removed = set(old.consumers) - set(new.consumers)
        changes += [f"removed {name}" for name in sorted(removed)]
        if (new.listen_host, new.listen_port) != (old.listen_host, old.listen_port):
            listen = f"{old.listen_host}:{old.listen_port}"
            log.warning(logfmt(msg="reload: listen changes only with a restart", listen=listen))
        for part in ("gpu", "scheduler", "health", "routing", "audio_proxy", "auth"):
            if getattr(new, part) != getattr(old, part):
                changes.append(f"changed {part}")
        self.config = self.consumers.config = new
        for reader in self.gpus.values():
            reader.config = new.gpu
        for scheduler in self.schedulers.values():
            scheduler.config = new
        changes += [f"added GPU {index}" for index in self.add_gpus()]
        for scheduler in self.schedulers.values():
            scheduler.forget()
        return changes

    def scheduler_for(self, name: str) -> Scheduler:
        """The scheduler (queue, lock, eviction) of the GPU that consumer ``name`` runs on."""
        c = self.config.consumers.get(name)
        return self.schedulers[c.gpu if c is not None else self.config.gpu.index]

    def check_reachable(self, name: str) -> None:
        """consumer_unreachable (or bad_consumer_url) at once when the consumer's last health probe failed.

        Not for a consumer started by a load command: failing health means it is stopped (by the broker,
        or before the broker started), and the job starts it.
        """
        state = self.consumers.states[name]
        if state.healthy is False and not self.config.consumers[name].started_by_command:
            message = f"upstream {name} last probe failed: {state.last_error}"
            raise BrokerError(state.last_error_code, message, name)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Start background work the broker owns until it ends or the broker closes."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def start_preloads(self) -> None:
        """Preload (in the background) every ``preload`` consumer that is not known to be resident."""
        for name, c in self.config.consumers.items():
            if c.preload and self.consumers.states[name].loaded is not True:
                self.spawn(self._internal_job("preload", name), f"preload {name}")

    async def _internal_job(self, kind: str, name: str) -> None:
        """An idle unload or a preload; its failure was logged and counted by the scheduler, and is
        logged here once more with what it was."""
        scheduler = self.scheduler_for(name)
        try:
            await (scheduler.preload(name) if kind == "preload" else scheduler.idle_unload(name))
        except BrokerError as e:
            log.warning(logfmt(msg=f"{kind} failed", consumer=name, code=e.code, error=e.message))
        except Exception as e:  # a bug outside the scheduler's guarded steps
            scheduler.stats.internal_errors += 1
            log.exception(logfmt(msg=f"{kind} crashed", consumer=name, error=describe(e)))

    async def run_idle_unloads(self) -> None:
        """Unload consumers resident and unused for their ``idle_unload_s``; owned by the app.

        Sleeps until the earliest deadline, but at most IDLE_CHECK_S (or the shortest ``idle_unload_s``), so
        that new residency and reloads are picked up. The scheduler decides, through its lock, whether an
        unload is still due; this loop only asks.
        """
        while True:
            now = time.monotonic()
            periods = [c.idle_unload_s for c in self.config.consumers.values() if c.idle_unload_s]
            wake = now + min([IDLE_CHECK_S, *periods])
            try:
                wake = min(wake, self._ask_for_idle_unloads(now))
            except Exception as e:
                self.scheduler.stats.internal_errors += 1
                log.exception(logfmt(msg="idle unload round crashed", error=describe(e)))
            await asyncio.sleep(max(0.01, wake - time.monotonic()))

    def _ask_for_idle_unloads(self, now: float) -> float:
        """Queue an idle unload for every consumer that is due; the earliest deadline still to come."""
        wake = math.inf
        for name in self.config.consumers:
            scheduler = self.scheduler_for(name)
            due = scheduler.idle_deadline(name)
            if due is None:
                continue
            if due <= now and scheduler.idle_due(name):
                # The scheduler keeps one idle unload per consumer pending; a second ask returns at once.
                self.spawn(self._internal_job("idle_unload", name), f"idle unload {name}")
            elif due > now:
                wake = min(wake, due)
        return wake

    async def forward(
        self,
        request: web.Request,
        ex: Exchange,
        consumer: ConsumerConfig,
        method: str,
        path_qs: str,
        body: bytes | bytearray | None,
        answered: Callable[[], bool] | None = None,
        headers: CIMultiDict[str] | None = None,
    ) -> web.StreamResponse:
        """Send a request to a consumer and stream its answer back; a failing consumer is marked unhealthy.

        ``answered`` is called (once) as soon as the consumer's answer has been read whole. ``headers``:
        the request's as ``request_headers`` makes them, when they were made already (before queueing).
        """

        def whole() -> bool:
            ex.done = True
            return answered() if answered is not None else False

        try:
            if headers is None:
                headers = request_headers(request, strip_auth=self.config.auth.token is not None)
            ex.upstream = await open_upstream(self.session, consumer, method, path_qs, headers, body)
            if ex.capture and 200 <= ex.upstream.status < 300:
                ex.captured = bytearray()
            return await relay(request, ex.upstream, consumer, ex.captured, whole)
        except BrokerError as e:
            ex.error = e
            if e.code in ("consumer_unreachable", "consumer_timeout"):
                reason = (
                    describe(e.__cause__) if e.__cause__ else f"no answer within {consumer.timeout_s:g} s"
                )
                self.consumers.mark_unhealthy(consumer.name, reason)
            raise
        except UpstreamBroke as e:
            ex.error = e.error
            self.consumers.mark_unhealthy(consumer.name, f"{describe(e.__cause__)} mid-answer")
            log.warning(logfmt(msg="answer cut short", consumer=consumer.name, error=e.error.message))
        except ConnectionResetError:
            ex.client_gone = True
        return web.Response(status=499)  # never sent: the client's connection is closed


@dataclass(frozen=True)
class ConfigSource:
    """Where the config comes from, so that a reload reads it the same way: the file and the CLI overrides."""

    path: Path
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        return load_config(self.path, overrides=self.overrides)


CONFIG = web.AppKey("config", Config)
SOURCE: web.AppKey[ConfigSource | None] = web.AppKey("source")
BROKER = web.AppKey("broker", Broker)
#: HTTP statuses aiohttp raises on its own (unknown route, wrong method, ...) -> our error codes.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: The request's X-Request-ID (the client's, or one made up): logged, forwarded and returned.
REQUEST_ID: Any = (
    web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "mgpumanager.request_id"
)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


@web.middleware
async def front_door(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request, once: its request id, the bearer token, and the one path from an error to a
    response (every error the broker makes has the same JSON shape). One middleware, not three: each
    costs every job a little."""
    given = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = given if _REQUEST_ID_RE.match(given) else os.urandom(16).hex()
    try:
        check_token(request)
        return await handler(request)
    except BrokerError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = HTTP_ERROR_CODES.get(e.status, "bad_request")
        if code == "not_found":
            message = f"no route for {request.method} {request.path}"
        elif code == "method_not_allowed":
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = e.reason
        allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return BrokerError(code, message, headers=allow).response()
    except Exception as e:
        request.app[BROKER].scheduler.stats.internal_errors += 1
        log.exception(logfmt(msg="internal error", path=request.path))
        return BrokerError("scheduler_error", f"internal error: {describe(e)}").response()


def check_token(request: web.Request) -> None:
    """With auth.token set, every route but /healthz (and the static page at /) needs the bearer token."""
    token = request.app[BROKER].config.auth.token
    if token is not None and request.path not in ("/healthz", "/"):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, token.encode()):
            challenge = {"WWW-Authenticate": 'Bearer realm="mgpumanager"'}
            raise BrokerError(
                "unauthorized", "a valid Authorization: Bearer token is required", headers=challenge
            )


def require_admin(request: web.Request) -> None:
    """Admin routes: with a token, the token is enough; without one, only clients on loopback."""
    if request.app[BROKER].config.auth.token is not None:
        return
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        local = False
    else:
        mapped = getattr(address, "ipv4_mapped", None)  # a [::] listener sees 127.0.0.1 as ::ffff:127.0.0.1
        local = address.is_loopback or (mapped is not None and mapped.is_loopback)
    if not local:
        raise BrokerError("forbidden", "admin routes answer only loopback clients unless auth.token is set")


async def handle_admin_consumer(request: web.Request) -> web.Response:
    """POST /v1/consumers/{name}/unload|load: manual eviction and warm-up, through the scheduler's lock."""
    require_admin(request)
    broker = request.app[BROKER]
    name, action = request.match_info["name"], request.match_info["action"]
    consumer = broker.config.consumers.get(name)
    if consumer is None:
        raise BrokerError("no_consumer", f"no consumer named {name!r}")
    if action == "unload" and consumer.unload is None:
        raise BrokerError("bad_request", f"{name} has no unload route", name)
    scheduler = broker.scheduler_for(name)
    if action == "unload":
        job = await scheduler.unload_now(name)
    else:
        job = await scheduler.load_now(name)
    body = {
        "consumer": name,
        "action": action,
        "loaded": broker.consumers.states[name].loaded,
        "evictions": job.evictions,
    }
    return web.json_response(body)


async def handle_reload(request: web.Request) -> web.Response:
    """POST /v1/reload: re-read the config; a bad one is refused whole and the old one stays."""
    require_admin(request)
    try:
        changes = request.app[BROKER].reload()
    except ConfigError as e:
        raise BrokerError("bad_config", "config refused, the old one stays: " + "; ".join(e.problems)) from e
    return web.json_response({"reloaded": True, "changes": changes})


async def read_body(request: web.Request, max_mib: int) -> bytes | bytearray:
    """The whole request body, read before the job is queued, so a slow upload never holds the GPU."""
    limit = max_mib * MiB
    length = request.content_length
    if length is not None and length > limit:
        raise BrokerError(
            "payload_too_large", f"request body of {length} bytes exceeds max_body_mib {max_mib}"
        )
    if length is not None:
        # Straight into one buffer of the announced size: the body is copied once, never joined.
        buffer, filled = bytearray(length), 0
        async for chunk in request.content.iter_any():
            buffer[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        if filled != length:
            raise BrokerError("bad_request", "request body ended before its Content-Length")
        return buffer
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise BrokerError("payload_too_large", f"request body exceeds max_body_mib {max_mib}")
    return body


async def handle_job(request: web.Request) -> web.StreamResponse:
    """POST /v1/{kind}: a GPU job for the consumer that routing.{kind} names."""
    broker = request.app[BROKER]
    kind = request.match_info["kind"]
    if kind in RESERVED_KINDS or request.method != "POST":
        # A reserved kind is a route of its own (or will be); other methods are not jobs.
        allowed = _methods_of(request.app, request.path) if kind in RESERVED_KINDS else ["POST"]
        if not allowed:
            raise BrokerError("not_found", f"no route for {request.method} {request.path}")
        message = f"{request.method} is not allowed on {request.path}"
        raise BrokerError("method_not_allowed", message, headers={"Allow": ", ".join(allowed)})
    route(broker.config, kind)  # refuse early what cannot be served ...
    body = await read_body(request, broker.config.scheduler.max_body_mib)
    name = route(broker.config, kind)  # ... and route for real after the body: a reload may have come
    broker.check_reachable(name)
    scheduler = broker.scheduler_for(name)
    headers = request_headers(request, strip_auth=broker.config.auth.token is not None)  # before waiting
    job = await scheduler.acquire(name, kind, request_id=request[REQUEST_ID])
    return await _run_job(request, broker, scheduler, job, job.target.paths[kind], body, headers)


def route(config: Config, kind: str) -> str:
    """The consumer routed for ``kind``, or no_consumer."""
    name = config.routing.get(kind)
    if name is None or name not in config.consumers:
        raise BrokerError("no_consumer", f"no consumer is routed for kind {kind!r}")
    return name


def _methods_of(app: web.Application, path: str) -> list[str]:
    """The methods a fixed route (not the /v1/{kind} catch-all) answers at ``path``."""
    return sorted(
        {
            route.method
            for r in app.router.resources()
            if r.canonical == path
            for route in r
            if route.method != "*"
        }
    )


async def _run_job(
    request: web.Request,
    broker: Broker,
    scheduler: Scheduler,
    job: Job,
    path: JobPath,
    body: bytes | bytearray,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    """Forward a granted job and stream its answer; ends the job exactly once: as soon as the consumer's
    answer is read whole (the next job may start while its last bytes go to the client), else when
    forwarding ends."""
    consumer = job.target
    ex = Exchange(capture=path.hold_until is not None)
    outcome = "failed"

    def end() -> bool:
        return job.state != "ended" and _end_job(broker, scheduler, job, path, ex, outcome)

    def answered() -> bool:
        nonlocal outcome
        outcome = "completed"
        return end()

    try:
        _, sep, query = request.raw_path.partition("?")  # kept as the client encoded it
        resp = await broker.forward(
            request, ex, consumer, path.method, path.path + sep + query, body, answered, headers
        )
        outcome = "cancelled" if ex.client_gone else "completed"
        return resp
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        end()


def _end_job(
    broker: Broker, scheduler: Scheduler, job: Job, path: JobPath, ex: Exchange, outcome: str
) -> bool:
    """End a forwarded job: its outcome, and the hold that keeps the GPU after a 2xx answer if any.
    Whether a waiting job was granted the GPU."""
    consumer = job.target
    status = ex.upstream.status if ex.upstream is not None else None
    answered = ex.error is None and status is not None and 200 <= status < 300
    hold = None
    try:
        if path.hold_until is not None and answered:
            hold = _hold_after(broker, scheduler, consumer, path.hold_until, ex)
        elif path.hold_until is not None and status is not None:
            log.info(logfmt(msg="no hold: the answer was not 2xx", consumer=consumer.name, http=status))
    finally:
        if hold is None:
            ex.close()
        granted = scheduler.finish(
            job,
            "failed" if ex.error is not None else outcome,
            code=ex.error.code if ex.error is not None else None,
            status=status,
            # A hold means the consumer took the work even if the client left mid-answer.
            success=answered and (ex.done or hold is not None),
            hold=hold,
            hold_timeout_s=path.hold_until.timeout_s if path.hold_until else 0.0,
        )
    return granted


def _hold_after(
    broker: Broker, scheduler: Scheduler, consumer: ConsumerConfig, hold: Hold, ex: Exchange
) -> Callable[[], Awaitable[None]] | None:
    """The hold after a 2xx answer, or None when the answer cannot fill the hold's path.

    If the client left before the answer ended, the hold first reads the rest of it itself.
    """
    assert ex.upstream is not None and ex.captured is not None
    upstream, captured = ex.upstream, ex.captured
    if ex.done:
        ex.close()
        return hold_poller(broker.session, consumer, hold, bytes(captured), scheduler.stats)

    async def read_rest_then_poll() -> None:
        try:
            while chunk := await upstream.content.readany():
                if len(captured) + len(chunk) <= HOLD_ANSWER_LIMIT:
                    captured.extend(chunk)
            ex.done = True
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            scheduler.stats.hold_poll_errors += 1
            log.warning(logfmt(msg="no hold: answer cut short", consumer=consumer.name, error=describe(e)))
            return
        finally:
            ex.close()
        poll = hold_poller(broker.session, consumer, hold, bytes(captured), scheduler.stats)
        if poll is not None:
            await poll()

    return read_rest_then_poll


async def handle_audio(request: web.Request) -> web.StreamResponse:
    """GET /audio/{file}: proxied to the audio_proxy consumer, unscheduled."""
    broker = request.app[BROKER]
    name = broker.config.audio_proxy
    if name is None:
        raise BrokerError("no_consumer", "no audio_proxy consumer is configured")
    path = audio_upstream_path(request.raw_path)
    broker.check_reachable(name)
    ex = Exchange()
    try:
        return await broker.forward(request, ex, broker.config.consumers[name], request.method, path, None)
    finally:
        ex.close()


async def handle_mount(request: web.Request) -> web.StreamResponse:
    """Any method on /c/{name}/{path}: the consumer's own API, its GPU work scheduled like /v1 jobs.

    GET, HEAD, OPTIONS and the consumer's ``unscheduled`` calls are forwarded at once; WebSocket upgrades
    are proxied both ways, unscheduled; every other request is a job of that consumer.
    """
    broker = request.app[BROKER]
    name = request.match_info["name"]
    consumer = broker.config.consumers.get(name)
    if consumer is None:
        raise BrokerError("no_consumer", f"no consumer named {name!r}")
    path_qs, decoded = mount_upstream_path(request.raw_path, name)
    method = request.method
    _refuse_own_routes(consumer, method, decoded)
    if method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
        return await proxy_websocket(request, broker, consumer, path_qs)
    body = await read_body(request, broker.config.scheduler.max_body_mib) if request.body_exists else b""
    consumer = broker.config.consumers.get(name)  # a reload may have come while the body was read
    if consumer is None:
        raise BrokerError("no_consumer", f"{name} is no longer configured", name)
    broker.check_reachable(name)
    kind, _ = mount_job_path(consumer, method, decoded)
    if kind == MOUNT_KIND and (
        method in UNSCHEDULED_METHODS or any(u.matches(method, decoded) for u in consumer.unscheduled)
    ):
        ex = Exchange()
        try:
            return await broker.forward(request, ex, consumer, method, path_qs, body or None)
        finally:
            ex.close()
    scheduler = broker.scheduler_for(name)
    headers = request_headers(request, strip_auth=broker.config.auth.token is not None)  # before waiting
    job = await scheduler.acquire(name, kind, request_id=request[REQUEST_ID])
    _, path = mount_job_path(job.target, method, decoded)  # the config the job was admitted with
    # The client's encoding of the path goes to the consumer; _run_job adds the query.
    upstream = replace(path, path=path_qs.partition("?")[0])
    return await _run_job(request, broker, scheduler, job, upstream, body, headers)


def _refuse_own_routes(consumer: ConsumerConfig, method: str, path: str) -> None:
    """The consumer's unload and load routes are the broker's to call: through the mount they would
    change residency behind its back. forbidden, pointing at the admin routes."""
    for action, route in (("unload", consumer.unload), ("load", consumer.load)):
        if isinstance(route, Route) and route.method == method and route.path == path:
            raise BrokerError(
                "forbidden",
                f"{method} {path} is {consumer.name}'s {action} route: use POST /v1/consumers/"
                f"{consumer.name}/{action}, which goes through the GPU lock",
                consumer.name,
            )


#: The open WebSockets of mounts, closed (going away) when the broker shuts down.
WEBSOCKETS: web.AppKey[set[ProxiedWebSocket]] = web.AppKey("websockets")


async def proxy_websocket(
    request: web.Request, broker: Broker, consumer: ConsumerConfig, path_qs: str
) -> web.StreamResponse:
    """A WebSocket through a mount, unscheduled. The consumer's side is opened first, so that a consumer
    that is down or refuses is answered with the broker's JSON error, not an upgrade that closes at once."""
    client = web.WebSocketResponse(max_msg_size=0, heartbeat=WEBSOCKET_HEARTBEAT_S)
    if not client.can_prepare(request).ok:  # not a valid upgrade: the consumer is never bothered
        raise BrokerError("bad_request", "not a valid WebSocket upgrade request", consumer.name)
    broker.check_reachable(consumer.name)
    metrics = broker.scheduler_for(consumer.name).metrics
    headers = request_headers(request, strip_auth=broker.config.auth.token is not None)
    max_size = broker.config.scheduler.max_body_mib * MiB
    try:
        upstream = await open_websocket(
            broker.session, consumer, path_qs, headers, websocket_protocols(request), max_size
        )
    except BrokerError as e:
        metrics.inc("mgpumanager_websocket_failures_total", consumer=consumer.name)
        log.warning(logfmt(msg="websocket refused", consumer=consumer.name, error=e.message))
        if e.code == "consumer_unreachable" and not isinstance(e.__cause__, aiohttp.WSServerHandshakeError):
            broker.consumers.mark_unhealthy(consumer.name, describe(e.__cause__ or e))
        raise
    try:
        client = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            max_msg_size=max_size,
            heartbeat=WEBSOCKET_HEARTBEAT_S,
        )
        await client.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    metrics.inc("mgpumanager_websockets_total", consumer=consumer.name)
    proxied = ProxiedWebSocket(client, upstream, consumer.name, metrics)
    sockets = request.app[WEBSOCKETS]
    sockets.add(proxied)
    try:
        await proxied.relay()
    finally:
        sockets.discard(proxied)
    return client


async def _close_websockets(app: web.Application) -> None:
    """On shutdown: close the mounts' open WebSockets (going away), so that none keeps the broker up."""
    sockets = [p for p in app[WEBSOCKETS] if not p.stop.done()]
    for proxied in sockets:
        proxied.stop.set_result(aiohttp.WSCloseCode.GOING_AWAY)
    if sockets:
        log.info(logfmt(msg="shutting down: closing websockets", websockets=len(sockets)))


async def _gpu_status(reader: GpuReader) -> dict[str, Any]:
    """One GPU for /v1/status, read at most once per STATUS_MAX_AGE_S however often it is asked."""
    try:
        r = await reader.read(max_age=STATUS_MAX_AGE_S)
        return {
            "index": r.index,
            "name": r.name,
            "uuid": r.uuid,
            "total_mib": r.total_mib,
            "used_mib": r.used_mib,
            "free_mib": r.free_mib,
            "utilization_pct": r.utilization_pct,
            "temperature_c": r.temperature_c,
            "processes": [{"pid": p.pid, "name": p.name, "used_mib": p.used_mib} for p in r.processes],
            "read_at": _iso(r.read_at),
            "error": None,
        }
    except GpuError as e:
        gpu = dict.fromkeys(
            ("name", "uuid", "total_mib", "used_mib", "free_mib", "utilization_pct", "temperature_c")
        )
        gpu.update(index=reader.index, processes=[], read_at=None, error=str(e))
        return gpu


async def handle_status(request: web.Request) -> web.Response:
    """GET /v1/status: a live snapshot. ``gpu`` and ``scheduler`` are the default GPU's (gpu.index);
    ``gpus`` lists every GPU with its own reading, consumers and scheduler."""
    broker = request.app[BROKER]
    cfg = broker.config
    indexes = sorted(broker.schedulers)
    readings = await asyncio.gather(*(_gpu_status(broker.gpus[i]) for i in indexes))
    gpus = []
    internal_errors = broker.internal_errors()
    for index, reading in zip(indexes, readings, strict=True):
        scheduler = broker.schedulers[index].snapshot()
        scheduler["stats"]["internal_errors"] = internal_errors
        names = [name for name, c in cfg.consumers.items() if c.gpu == index]
        gpus.append({**reading, "consumers": names, "scheduler": scheduler})
    default = gpus[indexes.index(cfg.gpu.index)]
    consumers = {}
    for name, c in cfg.consumers.items():
        state = broker.consumers.states[name]
        consumers[name] = {
            "url": c.url,
            "kinds": list(c.paths),
            "healthy": state.healthy,
            "loaded": state.loaded,
            "last_probe": _iso(state.last_probe),
            "last_error": state.last_error,
            "last_used": _iso(state.last_used_at),
            "vram_resident_mib": c.vram_resident_mib,
            "vram_managed": c.vram_managed,
            "priority": c.priority,
            "can_coexist_with": sorted(c.can_coexist_with),
            "gpu": c.gpu,
        }
    body = {
        "version": VERSION,
        "uptime_s": round(time.monotonic() - broker.started, 1),
        "gpu": {k: v for k, v in default.items() if k not in ("consumers", "scheduler")},
        "consumers": consumers,
        "scheduler": default["scheduler"],
        "gpus": gpus,
    }
    return web.Response(text=json.dumps(body, indent=2) + "\n", content_type="application/json")


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus' text format 0.0.4."""
    broker = request.app[BROKER]
    gauges: list[tuple[str, Labels, float]] = [
        ("mgpumanager_info", (("version", VERSION),), 1),
        ("mgpumanager_internal_errors_total", (), broker.internal_errors()),
    ]
    for index, s in sorted(broker.schedulers.items()):
        gauges.append(("mgpumanager_queue_length", (("gpu", str(index)),), len(s.queue())))
        gauges.append(("mgpumanager_running_jobs", (("gpu", str(index)),), s.running))
    for name in broker.config.consumers:
        state = broker.consumers.states[name]
        for metric, value in (("healthy", state.healthy), ("resident", state.loaded)):
            gauges.append(
                (
                    f"mgpumanager_consumer_{metric}",
                    (("consumer", name),),
                    math.nan if value is None else value,
                )
            )
    indexes = sorted(broker.gpus)
    readings = await asyncio.gather(
        *(broker.gpus[i].read(max_age=STATUS_MAX_AGE_S) for i in indexes), return_exceptions=True
    )
    for index, r in zip(indexes, readings, strict=True):
        gpu: Labels = (("gpu", str(index)),)
        if isinstance(r, GpuError):
            gauges.append(("mgpumanager_gpu_up", gpu, 0))
            continue
        if isinstance(r, BaseException):
            raise r
        gauges.append(("mgpumanager_gpu_up", gpu, 1))
        for metric, mib in (("total", r.total_mib), ("used", r.used_mib), ("free", r.free_mib)):
            if mib is not None:
                gauges.append((f"mgpumanager_gpu_memory_{metric}_bytes", gpu, mib * MiB))
        if r.utilization_pct is not None:
            gauges.append(("mgpumanager_gpu_utilization_ratio", gpu, r.utilization_pct / 100))
    body = broker.metrics.render(gauges).encode()
    headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Cache-Control": "no-store"}
    return web.Response(body=body, headers=headers)


async def handle_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/events: server-sent events, one JSON object each, a heartbeat comment every 15 s."""
    events = request.app[BROKER].events
    queue = events.subscribe()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await resp.prepare(request)
        await resp.write(b": mgpumanager events\n\n")
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                await resp.write(b": heartbeat\n\n")
                continue
            if event is _DROPPED:
                break  # it fell behind: the client reconnects and reads /v1/status again
            await resp.write(f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode())
    except ConnectionResetError:
        pass  # the client left
    finally:
        events.unsubscribe(queue)
    return resp


async def handle_dashboard(request: web.Request) -> web.Response:
    """GET /: the live page. Static: what it shows comes from /v1/status and /v1/events."""
    return web.Response(text=DASHBOARD_HTML, content_type="text/html", headers={"Cache-Control": "no-cache"})


async def _drain(app: web.Application) -> None:
    """On shutdown: refuse new jobs, answer queued ones, let running jobs and holds finish (bounded)."""
    broker = app[BROKER]
    # Idle unloads and preloads first: nothing new starts (one running is cut short).
    for task in list(broker.tasks):
        task.cancel()
    await asyncio.gather(*broker.tasks, return_exceptions=True)
    schedulers = list(broker.schedulers.values())
    for s in schedulers:
        s.shut_down()
    broker.events.close()
    timeout = broker.config.scheduler.shutdown_timeout_s
    for s in schedulers:
        if s.holder is not None:
            log.info(
                logfmt(
                    msg="shutting down: waiting for running jobs",
                    gpu=s.index,
                    holder=s.holder,
                    jobs=s.running,
                    holds=s.holds,
                )
            )
    idle = await asyncio.gather(*(s.wait_idle(timeout) for s in schedulers))
    for s, done in zip(schedulers, idle, strict=True):
        if not done:
            log.warning(
                logfmt(
                    msg="shutting down: cutting what still runs",
                    gpu=s.index,
                    timeout_s=timeout,
                    jobs=s.running,
                    holds=s.holds,
                )
            )


async def handle_healthz(request: web.Request) -> web.Response:
    """GET /healthz: the broker itself is up; touches no consumer and no GPU."""
    return web.Response(text="ok\n")


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Own every resource: the client session, the GPU reader, the health task, the scheduler's holds."""
    config = app[CONFIG]
    session = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
    events = Events()
    consumers = Consumers(config, session, events=events)
    broker = Broker(
        config=config,
        session=session,
        consumers=consumers,
        events=events,
        metrics=Metrics(),
        source=app[SOURCE],
    )
    app[BROKER] = broker
    health: asyncio.Task[None] | None = None
    try:
        # The first health round completes before serving (bounded by health.timeout_s), so the first
        # jobs already know who is up and who reports itself loaded.
        await consumers.probe_all()
        health = asyncio.create_task(consumers.run_health(), name="health")
        broker.spawn(broker.run_idle_unloads(), "idle unloads")
        broker.start_preloads()  # in the background: serving is not delayed
        yield
    finally:
        if health is not None:
            health.cancel()
            await asyncio.gather(health, return_exceptions=True)
        for task in list(broker.tasks):
            task.cancel()
        await asyncio.gather(*broker.tasks, return_exceptions=True)
        for scheduler in broker.schedulers.values():
            await scheduler.close()
        for reader in broker.gpus.values():
            await reader.close()
        await session.close()


def create_app(config: Config, source: ConfigSource | None = None) -> web.Application:
    """The production app; tests build theirs with this same factory. ``source`` enables reloads."""
    app = web.Application(middlewares=[front_door])
    app[CONFIG] = config
    app[SOURCE] = source
    app[WEBSOCKETS] = set()
    app.cleanup_ctx.append(_broker_ctx)
    app.on_shutdown.append(_close_websockets)
    app.on_shutdown.append(_drain)
    app.on_response_prepare.append(_add_request_id)
    app.router.add_get("/", handle_dashboard)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/v1/status", handle_status)
    app.router.add_get("/v1/events", handle_events)
    app.router.add_post("/v1/reload", handle_reload)
    app.router.add_post("/v1/consumers/{name}/{action:unload|load}", handle_admin_consumer)
    app.router.add_route("*", "/v1/{kind}", handle_job)
    app.router.add_get("/audio/{path:.+}", handle_audio)
    app.router.add_route("*", "/c/{name}", handle_mount)
    app.router.add_route("*", "/c/{name}/{path:.*}", handle_mount)
    return app


#: The dashboard: one self-contained page (no file, no network beyond this broker). It reads /v1/status
#: and follows /v1/events; with auth.token set it asks for the token once and keeps it in the tab.
DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mgpumanager</title>
<style>
:root { --bg:#111418; --card:#1b2027; --fg:#e6e9ee; --dim:#8b95a3; --ok:#3fb950; --bad:#f85149;
        --free:#2b323c; --unknown:#5a6370; }
* { box-sizing:border-box; }
body { margin:0; font:15px/1.4 system-ui, sans-serif; background:var(--bg); color:var(--fg); }
header { display:flex; flex-wrap:wrap; gap:.5rem 1rem; align-items:baseline; padding:.8rem 1rem; }
header h1 { font-size:1.2rem; margin:0; } header span { color:var(--dim); font-size:.85rem; }
main { display:grid; gap:.8rem; padding:0 1rem 1rem;
       grid-template-columns:repeat(auto-fit, minmax(300px, 1fr)); }
section { background:var(--card); border-radius:8px; padding:.8rem; }
section.wide { grid-column:1 / -1; }
h2 { font-size:.8rem; text-transform:uppercase; letter-spacing:.05em; color:var(--dim); margin:0 0 .5rem; }
.bar { display:flex; height:28px; border-radius:5px; overflow:hidden; background:var(--free); }
.bar div { height:100%; min-width:2px; }
.legend { display:flex; flex-wrap:wrap; gap:.3rem .9rem; margin-top:.5rem; font-size:.85rem; }
.legend i { display:inline-block; width:.8em; height:.8em; border-radius:2px; margin-right:.3em; }
.gpu + .gpu { margin-top:.8rem; } h3 { font-size:.9rem; margin:0 0 .3rem; font-weight:normal; }
table { width:100%; border-collapse:collapse; font-size:.9rem; }
td, th { text-align:left; padding:.3rem .4rem; border-top:1px solid #2a313b; vertical-align:top; }
th { color:var(--dim); font-weight:normal; border-top:none; }
.ok { color:var(--ok); } .bad { color:var(--bad); } .dim { color:var(--dim); }
#holder { font-size:1.1rem; }
#stats { display:grid; grid-template-columns:repeat(auto-fill, minmax(110px,1fr)); gap:.4rem; }
#stats div { background:#232a33; border-radius:5px; padding:.35rem .5rem; }
#stats b { display:block; font-size:1.2rem; }
#log { font:12px/1.5 ui-monospace, monospace; max-height:14rem; overflow:auto; color:var(--dim);
       white-space:pre-wrap; }
#error { color:var(--bad); padding:0 1rem; }
</style></head>
<body>
<header><h1>mgpumanager</h1><span id="gpu-name"></span><span id="updated"></span></header>
<div id="error"></div>
<main>
<section class="wide"><h2>GPU memory</h2><div id="gpus"></div></section>
<section><h2>Holder</h2><div id="holder">-</div><h2 style="margin-top:.8rem">Queue</h2>
<table><thead><tr><th>consumer</th><th>kind</th><th>prio</th><th>waiting</th></tr></thead>
<tbody id="queue"></tbody></table></section>
<section><h2>Counters</h2><div id="stats"></div></section>
<section class="wide"><h2>Consumers</h2><table><thead><tr><th>name</th><th>health</th><th>resident</th>
<th>kinds</th><th>VRAM</th><th>last use</th></tr></thead><tbody id="consumers"></tbody></table></section>
<section class="wide"><h2>Events</h2><div id="log"></div></section>
</main>
<script>
"use strict";
const COLORS = ["#58a6ff", "#bc8cff", "#3fb950", "#d29922", "#f778ba", "#39c5cf", "#ff7b72", "#a5d6ff"];
const $ = (id) => document.getElementById(id);
const ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
const esc = (v) => String(v ?? "").replace(/[&<>"]/g, (c) => ENTITIES[c]);
let token = sessionStorage.getItem("mgpumanager-token") || "";
const auth = () => (token ? {Authorization: "Bearer " + token} : {});

function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s ago";
  return s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
}
function yesno(v, yes, no) {
  if (v === null || v === undefined) return '<span class="dim">unknown</span>';
  return v ? '<span class="ok">' + yes + "</span>" : '<span class="bad">' + no + "</span>";
}
async function get(path) {
  const resp = await fetch(path, {headers: auth(), cache: "no-store"});
  if (resp.status === 401) { askToken(); throw new Error("unauthorized"); }
  return resp;
}
function askToken() {
  const given = prompt("This broker needs its bearer token (auth.token):");
  if (given) { token = given.trim(); sessionStorage.setItem("mgpumanager-token", token); }
}

function memoryParts(st, gpu) {
  const parts = [];
  let resident = 0;
  Object.keys(st.consumers).forEach((name, i) => {
    const c = st.consumers[name];
    if (!c.loaded || (c.gpu ?? gpu.index) !== gpu.index) return;
    parts.push({label: name, mib: c.vram_resident_mib, color: COLORS[i % COLORS.length]});
    resident += c.vram_resident_mib;
  });
  if (gpu.free_mib !== null) {
    const other = Math.max(0, gpu.total_mib - gpu.free_mib - resident);
    parts.push({label: "other / unknown", mib: other, color: "var(--unknown)"});
    parts.push({label: "free", mib: gpu.free_mib, color: "var(--free)"});
  }
  return parts;
}
function gpuHtml(st, gpu, titled) {
  // A reading can be a second older than the residency it is drawn with: scale so the bar never overflows.
  const parts = memoryParts(st, gpu);
  const total = Math.max(gpu.total_mib || 1, parts.reduce((sum, p) => sum + p.mib, 0));
  return '<div class="gpu">' + (titled ? "<h3>GPU " + gpu.index + " " + esc(gpu.name || "") + "</h3>" : "") +
    '<div class="bar">' + parts.map((p) => '<div title="' + esc(p.label) + " " + p.mib +
    ' MiB" style="width:' + (100 * p.mib / total).toFixed(2) + "%;background:" + p.color + '"></div>')
    .join("") +
    '</div><div class="legend">' + parts.map((p) => '<span><i style="background:' + p.color + '"></i>' +
    esc(p.label) + " " + p.mib + " MiB</span>").join("") +
    (gpu.total_mib ? '<span class="dim">of ' + gpu.total_mib + " MiB</span>" : "") + "</div></div>";
}
function renderGpus(st, gpus) {
  $("gpu-name").textContent = gpus.map((g) => (g.name || "GPU") + " #" + g.index).join(", ");
  $("updated").textContent = "v" + st.version + ", up " + Math.round(st.uptime_s) + " s";
  $("error").textContent = gpus.filter((g) => g.error)
    .map((g) => "GPU " + g.index + ": " + g.error).join("; ");
  $("gpus").innerHTML = gpus.map((g) => gpuHtml(st, g, gpus.length > 1)).join("");
}
function holderHtml(h) {
  return !h ? '<span class="dim">idle</span>' : "<b>" + esc(h.consumer) + "</b> " + h.jobs + " job(s)" +
    (h.holds ? ", " + h.holds + " hold(s)" : "") +
    ' <span class="dim">for ' + h.held_s.toFixed(1) + " s</span>";
}
function renderScheduler(gpus) {
  // One GPU: as it always was. Several: each GPU's holder, one queue tagged by GPU, the counters summed.
  const several = gpus.length > 1, tag = (i) => (several ? '<span class="dim">GPU ' + i + "</span> " : "");
  $("holder").innerHTML = gpus.map((g) => tag(g.index) + holderHtml(g.scheduler.holder)).join("<br>");
  const queue = gpus.flatMap((g) => g.scheduler.queue.map((q) => Object.assign({gpu: g.index}, q)));
  $("queue").innerHTML = queue.map((q) => "<tr><td>" + tag(q.gpu) + esc(q.consumer) + "</td><td>" +
    esc(q.kind) + "</td><td>" + q.priority + "</td><td>" + q.waited_s.toFixed(1) + " s</td></tr>").join("") ||
    '<tr><td colspan="4" class="dim">empty</td></tr>';
  const stats = {};
  gpus.forEach((g) => Object.entries(g.scheduler.stats)
    .forEach(([k, v]) => { stats[k] = (stats[k] || 0) + v; }));
  stats.internal_errors = gpus[0].scheduler.stats.internal_errors;  // the broker's, not per GPU
  $("stats").innerHTML = Object.entries(stats).map(([k, v]) =>
    '<div id="stat-' + k + '"><b>' + v + "</b>" + k.replaceAll("_", " ") + "</div>").join("");
}
function renderConsumers(consumers, several) {
  $("consumers").innerHTML = Object.entries(consumers).map(([name, c]) =>
    '<tr data-consumer="' + esc(name) + '"><td><b>' + esc(name) + "</b>" +
    (several ? ' <span class="dim">GPU ' + c.gpu + "</span>" : "") +
    (c.vram_managed ? ' <span class="dim">(manages its VRAM)</span>' : "") +
    "</td><td>" + yesno(c.healthy, "healthy", "down") +
    (c.last_error ? '<br><span class="dim">' + esc(c.last_error) + "</span>" : "") +
    "</td><td>" + yesno(c.loaded, "resident", "unloaded") + "</td><td>" + esc(c.kinds.join(", ")) +
    "</td><td>" + c.vram_resident_mib + " MiB</td><td>" + ago(c.last_used) + "</td></tr>").join("");
}
async function refresh() {
  try {
    const st = await (await get("/v1/status")).json();
    const gpus = st.gpus || [Object.assign({scheduler: st.scheduler}, st.gpu)];
    renderGpus(st, gpus); renderScheduler(gpus); renderConsumers(st.consumers, gpus.length > 1);
  } catch (e) { $("error").textContent = "status: " + e.message; }
}
let pending = null;
function soon() { if (!pending) pending = setTimeout(() => { pending = null; refresh(); }, 150); }
function logEvent(ev) {
  const fields = Object.entries(ev).filter(([k]) => k !== "event" && k !== "ts")
    .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v));
  const log = $("log");
  log.textContent = (ev.ts.slice(11, 23) + " " + ev.event + " " + fields.join(" ") + "\\n" +
    log.textContent).slice(0, 20000);
}
async function follow() {
  try {
    const resp = await get("/v1/events");
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
        if (data) { logEvent(JSON.parse(data)); soon(); }
      }
    }
  } catch (e) { $("error").textContent = "events: " + e.message; }
  setTimeout(follow, 1000);
}
refresh(); follow(); setInterval(refresh, 2000);
</script>
</body></html>
"""


# =====================================================================================================
# The CLI
# =====================================================================================================


#: Python log levels -> syslog priorities, for journald's ``<N>`` prefix.
SYSLOG_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class LogfmtFormatter(logging.Formatter):
    """logfmt lines; under journald (JOURNAL_STREAM set) the ``<N>`` priority prefix, not a timestamp."""

    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"level={record.levelname.lower()} {record.getMessage()}"
        if record.exc_info:
            text += " traceback=" + json.dumps(self.formatException(record.exc_info))
        if self.journal:
            return f"<{SYSLOG_PRIORITIES.get(record.levelno, 6)}>{text}"
        return f"ts={_iso(record.created)} {text}"


class OneLineBadRequests(logging.Filter):
    """aiohttp logs an unparsable request with a traceback; one logfmt line says it (and cannot flood)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            # Only the reason: aiohttp quotes the offending line, which may carry a token.
            reason = str(exc.message).split(":", 1)[0]
            record.msg, record.args, record.exc_info = logfmt(msg="bad http request", error=reason), (), None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


async def serve(config: Config, source: ConfigSource) -> int:
    """Run the broker until SIGTERM or SIGINT; SIGHUP reloads. Speaks systemd's notify protocol."""
    app = create_app(config, source)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()  # the first health round runs here
    broker = app[BROKER]
    notifier = broker.notifier
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    watchdog: asyncio.Task[None] | None = None

    def reload() -> None:
        with contextlib.suppress(ConfigError):  # logged by reload; the old config stays
            broker.reload()

    try:
        try:
            await web.TCPSite(runner, config.listen_host, config.listen_port).start()
        except OSError as e:
            log.error(
                logfmt(
                    msg="cannot listen",
                    listen=f"{config.listen_host}:{config.listen_port}",
                    error=describe(e),
                )
            )
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        status_due = False

        def update_status() -> None:
            nonlocal status_due
            status_due = False
            notifier.set_status(broker.status_line())

        def status_soon(_: dict[str, Any]) -> None:
            # Once per burst of events, after the burst: the line then shows a settled state.
            nonlocal status_due
            if not status_due:
                status_due = True
                loop.call_soon(update_status)

        if notifier.address is not None:  # without systemd there is no one to tell
            broker.events.listeners.append(status_soon)
        notifier.status = broker.status_line()
        notifier.send("READY=1", f"STATUS={notifier.status}")
        if notifier.watchdog_s:
            watchdog = asyncio.create_task(notifier.watchdog(), name="watchdog")
        log.info(
            logfmt(msg="listening", listen=f"{config.listen_host}:{config.listen_port}", version=VERSION)
        )
        await stop.wait()
        notifier.send("STOPPING=1")
        log.info(logfmt(msg="stopping", timeout_s=config.scheduler.shutdown_timeout_s))
    finally:
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        await runner.cleanup()  # stops listening, drains (see _drain), closes everything
    log.info(logfmt(msg="stopped"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mgpumanager", description="GPU-inference broker: one door to one GPU."
    )
    parser.add_argument("--config", default="consumers.yaml", help="YAML config (default: ./consumers.yaml)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen")
    parser.add_argument(
        "--nvidia-smi", metavar="CMD", help="override gpu.nvidia_smi (split like a shell would)"
    )
    parser.add_argument("--check", action="store_true", help="validate the config, print a summary, exit")
    parser.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journal="JOURNAL_STREAM" in os.environ))
    logging.basicConfig(level=args.log_level, handlers=[handler], force=True)
    logging.getLogger("aiohttp.server").addFilter(OneLineBadRequests())

    overrides: dict[str, Any] = {}
    if args.listen is not None:
        overrides["listen"] = args.listen
    if args.nvidia_smi is not None:
        overrides["gpu.nvidia_smi"] = args.nvidia_smi
    source = ConfigSource(Path(args.config), overrides)
    try:
        config = source.load()
    except ConfigError as e:
        for problem in e.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return 2
    if args.check:
        print(summary(config))
        return 0
    log.info(logfmt(msg="starting", version=VERSION, listen=f"{config.listen_host}:{config.listen_port}"))
    try:
        import uvloop  # noqa: PLC0415 (optional: Debian's python3-uvloop makes the loop faster)
    except ImportError:
        uvloop = None
    log.info(logfmt(msg="event loop", loop="uvloop" if uvloop is not None else "asyncio"))
    code = (uvloop.run if uvloop is not None else asyncio.run)(serve(config, source))
    # The loop is gone and with it the signal handlers: a late SIGTERM must not turn a clean exit into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
