#!/usr/bin/env python3
"""mgpumanager: one door in front of the inference services that share a GPU.

Several services (TTS/STT, whisper.cpp, Ollama, ComfyUI) each load their model into the same GPU and know
nothing of each other. The broker is the only way in: clients call ``POST /v1/<kind>``, the broker routes the
request to the consumer that ``routing`` names, and runs it as a *job* through one queue and one GPU lock.

The model, in one paragraph: a GPU's lock is held by one consumer at a time, which may run up to its
``max_concurrency`` jobs. Waiting jobs are ordered by effective priority (the client's priority, else the
consumer's, plus one level per ``aging_s`` waited) and then in the fair order (with ``auth.clients``: the
client with the least GPU time over ``fair_window_s`` first; else arrival), a job that needs no swap going
first for at most ``max_overtake_s``. Before a job runs, the broker makes room: unless the target
is known to be resident, it reads free VRAM (through NVML, or nvidia-smi) and, while the target does not fit,
unloads the least recently used consumer that may not coexist with it, through that consumer's own unload
route, then polls until the memory really shows up as free. Then it loads the target if it is known to be
unloaded, and forwards the request, streaming the answer back unchanged. Every failure of the broker's own
is a JSON error ``{error, message, consumer, retryable}``; whatever a consumer answers passes through
untouched.

Known limits: one broker per machine (residency is in memory and a restart forgets it; with ``state_file``,
reservations, what waits to be restored, learned timings and last use survive one, and a second broker with
the same file does not start); without ``gpu.yield``,
memory held by processes outside the broker is seen only as "not free" (with it, such a *stranger* gets room:
idle consumers are unloaded for it, and come back once it left); a consumer that allocates more than its
``vram_resident_mib`` can still run the GPU out of memory; consumers without an unload route or command are
never evicted; request bodies are held in memory (bounded by ``max_body_mib``) before a job is queued.

Load and unload are HTTP calls or commands (``systemctl stop whisper-server``: a consumer loaded by a command
whose health fails is stopped, not unreachable, and a job starts it). Consumers may be unloaded after
``idle_unload_s`` unused and preloaded when they fit (at start, after a reload, at a reservation's end); both
are internal jobs of the lowest priority. With ``gpu.yield``, memory that no consumer's processes hold beyond
``ignore_mib`` is a stranger's (a game): idle consumers are unloaded for it (internal jobs of the highest
priority), a job that could not fit beside it leaving ``keep_free_mib`` free is refused at once (gpu_in_use),
and what was unloaded is loaded again once it has been gone ``restore_after_s``.

Callers: with ``auth.token`` every route but /healthz and the page needs a token; with ``auth.clients``
each program has a token of its own (its jobs carry its name, priority and ``max_queued``), and the admin
routes take the admin's alone.

Clients that speak a consumer's own API use its mount, ``/c/<name>/<path>``: reads (GET, HEAD, OPTIONS),
the consumer's ``unscheduled`` calls and WebSockets are forwarded at once, every other request is a job.

Several GPUs: a consumer names its GPU (``gpu: N``, else ``gpu.index``); each GPU has its own reader, queue,
lock and eviction, so consumers on different GPUs never wait for each other.

Around it: /v1/status, an event stream (/v1/events, with the last 15 minutes kept for replay), Prometheus
metrics (/metrics), a live page with a timeline (/), systemd's notify protocol and watchdog, reload in place
(SIGHUP) and a graceful drain on SIGTERM. Given a verb (``mgpumanager.py ps``, ``events``, ...), the same
file is a command line for a running broker.

Sections, in dependency order:

- The command line, on the standard library alone: the few constants and ``read_token_file`` it shares with
  the daemon, ``Client``, the renderers, the verbs; then its fast path: a verb (or ``--help``) runs and exits
  there, before the daemon's imports.
- Constants.
- Errors: ``BrokerError``, the one root of the broker's errors (code, status, retryable), and its kinds.
- Config: the dataclasses (``AuthConfig`` with its ``ClientConfig``s, and ``Caller``: who a token is), the
  presets, where a consumer URL leads (``url_problem``; ``loop_problems``: not back to the broker), the
  loader; ``Shared``, the config in force (a reload swaps it there, once), the bugs caught anywhere, counted
  once, and the ``WallClock`` (the wall-clock time of a monotonic moment, for people).
- Failures and log lines: what a failed call means (``describe``, ``gone_reason``); ``logfmt``; calls that
  may hang, must not stop half way, or swallow a cancellation (``in_own_thread``, ``to_its_end``,
  ``cancel_until_done``).
- Events and metrics: ``Events`` (/v1/events and its ring), ``Notifier`` (systemd), ``Metrics``.
- GPU reading: ``GpuReader`` (caching, sharing, attribution) over a ``GpuSource``: ``SmiSource``
  (nvidia-smi, parsed off the loop) or ``NvmlSource`` (NVML, each call bounded in a thread of its own).
- Consumers and health: ``ConsumerState`` (its named transitions), ``Consumers`` (probes, loads, unloads),
  ``GpuProcesses`` (whose each GPU process is, what each measured consumer holds).
- The scheduler, in parts: ``Job``; the ``Recorder`` (one record of each fact, four views); the pure
  decisions, each a function of a snapshot: ``plan_room`` (eviction, and what fits beside a stranger),
  ``plan_yield`` (whom to unload for a stranger), ``unclaimed_mib`` (what no consumer claims), ``next_grant``
  (the grant order, with ``fair_key``: fair share between clients), ``needs_no_swap`` (the "warm" both use),
  ``expected_waits`` (the forecast, and ``queue_entries``, the queue as status shows it); ``WaitQueue`` (the
  waiting jobs: a ``Lane`` per priority and client, a bucket per consumer in each), ``GpuTime`` (each
  client's held seconds over the fair window), ``QueuedEvents`` (each waiting job's ``queued`` event, one
  forecast per turn of the loop); ``ClientEtas`` (a refused client's Retry-After, played once a second),
  ``admission_refusal`` (whom a queue turns away at its door: a client's own room, or the others') and
  ``GpuLock`` (the lock core: admission to the queue, grants, release, each consumer's job count);
  ``Strangers`` (what a GPU's readings show that no consumer claims, and whether a job fits beside a
  stranger); ``RoomMaker`` (carries a plan out, loads; whether it loads first, ``loads_first``, and asks a
  target in doubt, ``in_doubt``, and where a reload sends a job, ``reload_fate``, and one being made ready,
  ``made_ready_anew``, are functions beside it); ``Holds``; ``Reservations``; ``JobLease`` and ``Scheduler``
  (one per GPU: composes its parts, hands out leases, sends a reload's queued jobs on: ``forget``);
  ``InternalJobs`` (idle unloads, preloads, yields and restores, on every GPU); ``Yielding`` (when to yield
  and restore: the poll of gpu.yield).
- The proxy: ``forward`` and ``forward_job`` (``relay``, streamed), the holds' polls, WebSockets.
- The broker: ``StateFile`` (what a restart keeps: ``parse_state``, an atomic write), ``Broker``, the
  composition root (its ``clients``: each client's use, for status), ``move_problems`` (why a reload may
  not move a consumer to another GPU now), ``client_changes`` (what a reload changes of the clients),
  ``Reloads`` (the config read again, checked, and applied whole, one reload at a time).
- The HTTP app: the client connections (``ClientConnections``: limits, and what a revoked token let in),
  the consumers' ports, the front door (``check_token``, ``client_of``, ``require_admin``), the handlers,
  ``create_app``, the dashboard page.
- Running the broker: logging, ``serve``, and ``main()`` (config, ``--check``, serve).
"""

# The command line comes first and needs only the standard library: a verb runs and exits at the fast
# path below, before the daemon's imports (annotations are not evaluated, so the names they use may be
# imported there):
# ruff: noqa: E402

from __future__ import annotations

import argparse
import email.utils
import http.client
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    Sized,
)
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

VERSION = "0.1.0"
log = logging.getLogger("mgpumanager")

# =====================================================================================================
# The command line
# =====================================================================================================

# ---- what it shares with the daemon: a few constants, the token file ----------------------------------

MiB = 1024 * 1024
#: A reload reads and checks the config in a thread; one that takes longer than this is refused.
CONFIG_READ_TIMEOUT_S = 20.0
#: A token file larger than this is refused (it is no token).
MAX_TOKEN_FILE_BYTES = 4096
#: The recent past kept for pages opened later (``/v1/events?since=SECONDS``): the events of the last
#: EVENT_RING_S seconds, and of those at most EVENT_RING (a job makes 5 to 10 events: some 1,500 jobs; kept
#: as the bytes the stream sends, some 3.5 MiB when full). The dashboard's timeline draws the same 15 minutes.
EVENT_RING = 10000
EVENT_RING_S = 900.0
#: A stream with nothing to say sends a comment this often, so proxies and browsers keep it open.
HEARTBEAT_S = 15.0
#: A logfmt value with any of these is quoted (as JSON).
_LOGFMT_QUOTE = re.compile(r'[ "=\\]')


def token_path_shown(path: str) -> str:
    """A token file's path as messages show it: only a path in a directory that exists (``./token``,
    ``/etc/mgpumanager/token``). Any other value may be the token itself, written where its file's path
    belongs (a base64 token has '/' in it too), and is not shown."""
    directory = os.path.dirname(path)
    if directory and os.path.isdir(directory):
        return path
    return "(the value, not shown: no directory of it exists, so it may be the token itself)"


def read_token_file(path: str, *, warn_if_shared: bool = True) -> str:
    """The token in a regular file of at most MAX_TOKEN_FILE_BYTES (never a FIFO or a device, which could
    hang or never end); ValueError otherwise. A file others may read is accepted with a warning (the
    daemon's: the command line reads its user's own file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # opening a FIFO does not wait
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError("is not a regular file")
        data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ValueError(f"is larger than {MAX_TOKEN_FILE_BYTES} bytes: no token is that long")
    if mode & stat.S_IROTH and warn_if_shared:
        # (logfmt by hand: logfmt() comes in a later section)
        log.warning(f'msg="token file is readable by others" path={json.dumps(path)} mode={mode & 0o777:o}')
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None


# ---- the verbs: a command line for a running broker --------------------------------------------------

#: Where the verbs find the broker when neither --url nor MGPUMANAGER_URL says.
DEFAULT_URL = "http://127.0.0.1:8770"
#: How long a verb waits for the broker: to connect, for each read of its answer, and for the whole answer.
CLI_TIMEOUT_S = 10.0
#: load, unload and reserve wait for the GPU lock like a job (up to scheduler.queue_timeout_s, 300 s by
#: default) and then for unload and load calls (60 s each by default).
CLI_ADMIN_TIMEOUT_S = 900.0
#: reload waits for the broker to read the file (up to CONFIG_READ_TIMEOUT_S) before it answers.
CLI_RELOAD_TIMEOUT_S = CONFIG_READ_TIMEOUT_S + CLI_TIMEOUT_S
#: ``events`` has no total limit, but gives up after this long without a byte (a heartbeat comes every
#: HEARTBEAT_S).
CLI_EVENTS_TIMEOUT_S = 3 * HEARTBEAT_S
#: ``ps`` and ``status`` fit their lines in this many columns.
CLI_WIDTH = 100
#: The largest answer a verb reads (a /v1/status with 1,000 jobs queued is some 300 KiB), and the longest
#: line of the event stream (one event): more is not a broker.
CLI_ANSWER_LIMIT = 16 * MiB
CLI_EVENT_LINE_LIMIT = 1 * MiB
#: A broker whose clock differs from this machine's by more than this: ``ps`` counts "ago" on the broker's.
CLOCK_SKEW_S = 1.5


class CliError(Exception):
    """A verb failed: ``code`` 1 when the broker could not be reached (or what answered was not the broker),
    2 when the broker refused (its JSON error) or the command line is wrong."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[smh])+|\d+(?:\.\d+)?")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds from '90s', '30m', '2h', '1h30m' or plain seconds ('90'); ValueError for anything else."""
    text = text.strip().lower()
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a duration")
    seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in re.findall(r"([\d.]+)([smh]?)", text))
    if seconds <= 0:
        raise ValueError(f"{text!r} is no time at all")
    return seconds


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 90s, 30m, 2h, 1h30m or seconds") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds, 0 or more")
    return value


def _timeout(text: str) -> float:
    """--timeout: a wait of no time is none (0 was taken for the default)."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds, more than 0")
    return min(value, threading.TIMEOUT_MAX)  # (a thread's join, and a socket, take no longer a wait)


def cli_url(flag: str | None, environ: Mapping[str, str]) -> str:
    """The broker's base URL: --url, else MGPUMANAGER_URL, else DEFAULT_URL (``host:port`` means http)."""
    url = (flag or environ.get("MGPUMANAGER_URL") or DEFAULT_URL).strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is no number, or out of range, raises ValueError here)
    except ValueError as e:
        raise CliError(2, f"{url!r} is not a broker's URL (http://host:port): {e}") from None
    if "@" in parts.netloc:  # (not echoed: what is before the @ may be a password)
        raise CliError(
            2, "a broker's URL has no user@ part: the token goes in --token-file or MGPUMANAGER_TOKEN"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or not url.isprintable() or " " in url:
        raise CliError(2, f"{url!r} is not a broker's URL (http://host:port)")
    try:  # what urllib would fail on later: a label empty or over 63 characters, a path beyond ASCII
        parts.hostname.encode("idna")
        url.removeprefix(f"{parts.scheme}://{parts.netloc}").encode("ascii")
    except UnicodeError as e:
        raise CliError(2, f"{url!r} is not a broker's URL (http://host:port): {e}") from None
    return url


def cli_token(token_file: str | None, environ: Mapping[str, str]) -> str | None:
    """The bearer token: from --token-file, else MGPUMANAGER_TOKEN, else none."""
    if token_file is None:
        token = environ.get("MGPUMANAGER_TOKEN", "").strip() or None
        where = "MGPUMANAGER_TOKEN"
    else:
        where = f"--token-file {token_path_shown(token_file)}"
        try:
            token = read_token_file(token_file, warn_if_shared=False)
        except OSError as e:
            raise CliError(2, f"cannot read {where}: {e.strerror or e}") from e
        except ValueError as e:
            raise CliError(2, f"{where} {e}") from e
        if not token:
            raise CliError(2, f"{where} is empty")
    if token is not None and (not token.isprintable() or " " in token):  # as the broker's own rule
        raise CliError(2, f"{where}: a token is printable characters without spaces")
    return token


def _within(call: Callable[[], http.client.HTTPResponse], timeout_s: float) -> http.client.HTTPResponse:
    """``call()``'s answer, opened (its status line and headers read) within ``timeout_s`` of now, else
    TimeoutError. The socket's timeout bounds each read alone: something at the URL that sends its head a
    line at a time would hold the verb for ever. (A thread of its own, left to the process's exit: the verbs
    run once and exit.)"""
    done: list[http.client.HTTPResponse | BaseException] = []

    def run() -> None:
        try:
            done.append(call())
        except BaseException as e:  # the caller's to raise
            done.append(e)

    opener = threading.Thread(target=run, name="mgpumanager-cli-call", daemon=True)
    opener.start()
    opener.join(timeout_s)
    if not done:
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if isinstance(done[0], BaseException):
        raise done[0]
    return done[0]


def _why(exc: BaseException, timeout_s: float) -> str:
    """Why a call to the broker failed, in a few words."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host ({reason.strerror})"
    if isinstance(reason, (ConnectionResetError, http.client.RemoteDisconnected)):
        return "the connection was closed"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return _printable(str(reason).strip()) or type(reason).__name__


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The broker never redirects: a 3xx comes from something else at its URL, and following it sent the
    bearer token wherever its Location pointed (and turned a POST into a GET)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


#: No proxy, whatever http_proxy, HTTPS_PROXY or all_proxy say (urllib would follow them, even for 127.0.0.1,
#: and hand the bearer token to the proxy): the verbs talk to the broker's URL alone.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects)


@dataclass
class Client:
    """The verbs' calls to a running broker: urllib, no event loop, a timeout on every call."""

    url: str
    token: str | None = None
    #: --timeout: replaces every verb's own.
    timeout_s: float | None = None
    #: The Date of the broker's last answer (its clock, to the second).
    date: str | None = None

    def open(
        self, method: str, path: str, body: Any = None, *, timeout_s: float = CLI_TIMEOUT_S
    ) -> http.client.HTTPResponse:
        """A 2xx answer, open for reading; CliError for anything else."""
        timeout = self.timeout_s or timeout_s
        headers = {"Accept": "application/json", "User-Agent": f"mgpumanager/{VERSION}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        if self.token:  # UTF-8, as the broker reads it (http.client would send a str as Latin-1)
            request.add_header("Authorization", f"Bearer {self.token}".encode())  # type: ignore[arg-type]
        try:
            return _within(lambda: _OPENER.open(request, timeout=timeout), timeout)
        except urllib.error.HTTPError as e:
            with e:
                raise self._refused(e) from None
        except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
            raise self.unreachable(e, timeout) from None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        shape: Mapping[str, type | tuple[type, ...]],
        timeout_s: float = CLI_TIMEOUT_S,
    ) -> dict[str, Any]:
        """The broker's JSON answer, whole within the call's timeout (from its start) and at most
        CLI_ANSWER_LIMIT bytes: something else at the URL may send for ever. ``shape``: the keys the
        broker's answer has, and their types: a JSON object of another shape is something else at that URL
        (exit 1), not an answer to print as if it were the broker's."""
        timeout = self.timeout_s or timeout_s
        deadline = time.monotonic() + timeout
        with self.open(method, path, body, timeout_s=timeout_s) as resp:
            self.date = resp.headers.get("Date")
            raw = self._read(resp, deadline, timeout, CLI_ANSWER_LIMIT)
        try:
            answer = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise CliError(1, f"{self.url}{path} did not answer JSON: is it a mgpumanager broker?") from None
        if not isinstance(answer, dict) or not all(isinstance(answer.get(k), t) for k, t in shape.items()):
            raise CliError(1, f"{self.url}{path} answered JSON of another shape: is it a mgpumanager broker?")
        return answer

    def _read(self, resp: Any, deadline: float, timeout_s: float, limit: int) -> bytes:
        """An answer's body, read as it comes (one read at a time, each within the socket's timeout), until
        its end; CliError once it passes ``limit`` bytes or ``deadline``."""
        body = bytearray()
        try:
            while chunk := resp.read1(64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise CliError(1, f"{self.url} answered more than {limit // MiB} MiB: not a broker?")
                if time.monotonic() > deadline:
                    raise CliError(1, f"{self.url} did not finish its answer within {timeout_s:g} s")
        except (OSError, http.client.HTTPException) as e:
            raise self.unreachable(e, timeout_s) from None
        return bytes(body)

    def unreachable(self, exc: BaseException, timeout_s: float) -> CliError:
        return CliError(1, f"cannot reach the broker at {self.url}: {_why(exc, timeout_s)}")

    def _refused(self, error: urllib.error.HTTPError) -> CliError:
        """The broker's JSON error (exit 2), or something else answering at its URL (exit 1)."""
        if 300 <= error.code < 400:  # the broker never redirects
            where = error.headers.get("Location") if error.headers else None
            return CliError(
                1, f"{self.url} answered {error.code}, a redirect to {where!r} (not followed): not a broker?"
            )
        timeout = self.timeout_s or CLI_TIMEOUT_S
        try:
            raw = self._read(error.fp, time.monotonic() + timeout, timeout, 64 * 1024) if error.fp else b""
            data = json.loads(raw)
        except (CliError, ValueError, RecursionError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("message"), str):
            return CliError(1, f"{self.url} answered {error.code} {error.reason}, not a mgpumanager broker?")
        # (One line: a consumer's answer in it, or a command's output, is escaped, its line breaks too.)
        message = _printable(f"{data['message']} ({data.get('error')})")
        if data.get("error") == "unauthorized":
            message += ": set MGPUMANAGER_TOKEN or give --token-file"
        elif data.get("error") == "forbidden" and "admin's token" in data["message"]:
            message += ": give --token-file the admin's token (auth.token_file), not a client's"
        return CliError(2, message)


def _no_constant(name: str) -> None:
    """NaN and Infinity: JSON to Python's json module, never to the broker (which writes none)."""
    raise ValueError(name)


def _span(seconds: float) -> str:
    """A duration for people: '45 s', '12 min', '2 h 5 min', '3 d 4 h'."""
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    if s < 48 * 3600:
        hours, minutes = divmod(round(s / 60), 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(round(s / 3600), 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _parse_iso(iso: Any) -> datetime | None:
    """The broker's timestamps ('...Z'), as an aware datetime; None for anything unreadable."""
    if not isinstance(iso, str):
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None


def _ago(iso: Any, now: float) -> str:
    when = _parse_iso(iso)
    return "never" if when is None else f"{_span(now - when.timestamp())} ago"


def _local(iso: Any, now: float) -> str:
    """A time of the broker's in this machine's time zone: '21:30:05', with the date if not today."""
    when = _parse_iso(iso)
    if when is None:
        return "?"
    local = when.astimezone()
    same_day = local.date() == datetime.fromtimestamp(now).astimezone().date()
    return local.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M")


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _wrap(text: str, indent: str = "  ") -> list[str]:
    """``text`` in lines of CLI_WIDTH, what is not printable escaped first (textwrap would make a line
    break in a reason or a process name a space: escaped, it is seen)."""
    wrapped = textwrap.wrap(
        _printable(text), CLI_WIDTH, initial_indent=indent, subsequent_indent=indent + "  "
    )
    return wrapped or [indent]


def _gpus_of(st: Mapping[str, Any]) -> list[dict[str, Any]]:
    """/v1/status's GPUs, each with its scheduler (a broker before several GPUs had only ``gpu``)."""
    return st.get("gpus") or [{**st.get("gpu", {}), "scheduler": st.get("scheduler") or {}}]


def _mib(value: Any) -> str:
    return f"{value} MiB" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _state(value: Any, yes: str, no: str) -> str:
    return "unknown" if value is None else yes if value else no


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns as wide as their widest cell, the first one cut short (``~``) if the lines would not fit."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    over = sum(widths) + 2 * (len(widths) - 1) - CLI_WIDTH
    if over > 0:
        widths[0] = max(8, widths[0] - over)

    def cell(text: str, i: int) -> str:
        if len(text) > widths[i]:
            text = text[: widths[i] - 1] + "~"
        return text.rjust(widths[i]) if i in right else text.ljust(widths[i])

    return ["  ".join(cell(text, i) for i, text in enumerate(row)).rstrip() for row in [header, *rows]]


def reservation_lines(res: Mapping[str, Any], now: float) -> list[str]:
    """A reservation ({reason, until, left_s, unloaded, not_unloaded}) for people."""
    text = f"reserved: {res.get('reason') or 'no reason given'}"
    if isinstance(res.get("left_s"), (int, float)):
        text += f", {_span(res['left_s'])} left"
    if res.get("until"):
        text += f" (until {_local(res['until'], now)})"
    if res.get("restore") is False:
        text += "; nothing is loaded again at its end"
    lines = _wrap(text)
    if res.get("unloaded"):
        lines += _wrap("unloaded: " + ", ".join(map(str, res["unloaded"])), "    ")
    not_unloaded = res.get("not_unloaded")
    if not_unloaded:
        items = (
            not_unloaded.items() if isinstance(not_unloaded, Mapping) else [(n, None) for n in not_unloaded]
        )
        text = ", ".join(f"{name} ({why})" if why else str(name) for name, why in items)
        lines += _wrap("not unloaded: " + text, "    ")
    return lines


def gpu_lines(gpu: Mapping[str, Any], now: float) -> list[str]:
    """One GPU: its memory line, who holds it and the queue, its reservation."""
    head = f"GPU {gpu.get('index')}" + (f" {gpu['name']}" if gpu.get("name") else "")
    if gpu.get("error"):
        text = f"{head}: cannot read it: {gpu['error']}"
    else:
        text = f"{head}: {gpu.get('used_mib')} of {gpu.get('total_mib')} MiB used, {gpu.get('free_mib')} free"
        if gpu.get("utilization_pct") is not None:
            text += f", {gpu['utilization_pct']} % busy"
        if gpu.get("temperature_c") is not None:
            text += f", {gpu['temperature_c']} C"
    lines = _wrap(text, "")
    scheduler = gpu.get("scheduler") or {}
    holder = scheduler.get("holder")
    if holder:
        text = f"held by {holder.get('consumer')}: {_plural(holder.get('jobs', 0), 'job')}"
        if holder.get("holds"):
            text += f", {_plural(holder['holds'], 'hold')}"
        clients = sorted({str(s["client"]) for s in holder.get("slots") or [] if s.get("client") is not None})
        if clients:
            text += f" (for {', '.join(clients)})"
        text += f", for {_span(holder.get('held_s', 0))}"
    else:
        text = "idle"
    lines += _wrap(f"{text}; {len(scheduler.get('queue') or [])} queued")
    if gpu.get("reservation"):
        lines += reservation_lines(gpu["reservation"], now)
    strangers = gpu.get("strangers")
    if isinstance(strangers, Mapping) and strangers.get("present"):
        lines += strangers_lines(gpu.get("unclaimed_mib"), strangers, now)
    return lines


def strangers_lines(unclaimed: Any, strangers: Mapping[str, Any], now: float) -> list[str]:
    """A stranger present ({since, processes, more_processes}) for people: its MiB and processes."""
    text = f"strangers: {_mib(unclaimed)} no consumer claims"
    if strangers.get("since"):
        text += f", since {_local(strangers['since'], now)}"
    procs = [
        f"pid {p.get('pid')} {p.get('name')} ({_mib(p.get('used_mib'))})"
        for p in strangers.get("processes") or []
        if isinstance(p, Mapping)
    ]
    more = strangers.get("more_processes")
    if isinstance(more, int) and more > 0:
        procs.append(f"and {more} more")
    text += ": " + (", ".join(procs) if procs else "no process listed (a graphics process, such as a game)")
    return _wrap(text)


def render_ps(st: Mapping[str, Any], now: float) -> list[str]:
    """``ps``: one line per consumer, then each GPU's memory, holder and reservation."""
    gpus = _gpus_of(st)
    several = len(gpus) > 1
    running: dict[str, int] = {}
    queued: dict[str, int] = {}
    for gpu in gpus:
        scheduler = gpu.get("scheduler") or {}
        holder = scheduler.get("holder")
        if holder:
            # A hold (ComfyUI rendering after its answer) is work running too.
            work = holder.get("jobs", 0) + holder.get("holds", 0)
            running[holder["consumer"]] = running.get(holder["consumer"], 0) + work
        for job in scheduler.get("queue") or []:
            queued[job["consumer"]] = queued.get(job["consumer"], 0) + 1
    header = [
        "CONSUMER",
        "GPU",
        "HEALTH",
        "RESIDENT",
        "USED",
        "PEAK",
        "DECLARED",
        "LAST USE",
        "RUNNING",
        "QUEUED",
    ]
    rows, notes = [], []
    for name, c in (st.get("consumers") or {}).items():
        rows.append(
            [
                name,
                str(c.get("gpu", "")),
                "stopped" if c.get("stopped") else _state(c.get("healthy"), "healthy", "down"),
                _state(c.get("loaded"), "yes", "no"),
                _mib(c.get("vram_used_mib")),
                _mib(c.get("vram_peak_mib")),
                _mib(c.get("vram_resident_mib")),
                _ago(c.get("last_used"), now),
                str(running.get(name, 0)),
                str(queued.get(name, 0)),
            ]
        )
        if c.get("healthy") is False and c.get("last_error") and not c.get("stopped"):
            notes += _wrap(f"{name}: {c['last_error']}")
    right = {1, 4, 5, 6, 8, 9}
    if not several:  # one GPU: no GPU column
        header.pop(1)
        rows = [row[:1] + row[2:] for row in rows]
        right = {i - 1 for i in right if i > 1}
    lines = _table(header, rows, right) + notes
    clients = st.get("clients") or {}
    if clients:
        header = ["CLIENT", "PRIORITY", "MAX QUEUED", "RUNNING", "QUEUED", "JOBS", "GPU TIME"]
        rows = [
            [
                name,
                "consumer's" if c.get("priority") is None else str(c["priority"]),
                "-" if c.get("max_queued") is None else str(c["max_queued"]),
                str(c.get("running", 0)),
                str(c.get("queued", 0)),
                str(c.get("jobs_total", 0)),
                f"{float(c.get('gpu_s_window') or 0):.1f} s",
            ]
            for name, c in clients.items()
        ]
        lines += ["", *_table(header, rows, {1, 2, 3, 4, 5, 6})]
        lines += _wrap("GPU TIME: what each client's jobs held the GPU within scheduler.fair_window_s", "")
    for gpu in gpus:
        lines += ["", *gpu_lines(gpu, now)]
    return lines


def render_status(st: Mapping[str, Any], url: str, now: float) -> list[str]:
    """``status``: the broker with its own counter (internal errors: one figure, which each GPU's counters
    repeat), then each GPU with its counters."""
    lines = [f"mgpumanager {st.get('version')} at {url}, up {_span(st.get('uptime_s') or 0)}"]
    if "internal_errors" in st:
        lines.append(f"internal errors {st['internal_errors']}")
    for gpu in _gpus_of(st):
        stats = (gpu.get("scheduler") or {}).get("stats") or {}
        counters = [f"{k.replace('_', ' ')} {v}" for k, v in stats.items() if k != "internal_errors"]
        lines += ["", *gpu_lines(gpu, now)]
        if counters:
            lines += _wrap("counters: " + ", ".join(counters))
    return lines


def _event_value(value: Any) -> str:
    if isinstance(value, str):
        return (
            json.dumps(value)
            if not value or _LOGFMT_QUOTE.search(value) or not value.isprintable()
            else value
        )
    return json.dumps(value, separators=(",", ":"))


def format_event(event: Mapping[str, Any]) -> str:
    """One line per event: its local time, its name, its fields (those that are not null)."""
    when = _parse_iso(event.get("ts"))
    clock = when.astimezone().strftime("%H:%M:%S.%f")[:-3] if when else "?"
    fields = " ".join(
        f"{k}={_event_value(v)}" for k, v in event.items() if k not in ("event", "ts") and v is not None
    )
    return f"{clock} {event.get('event')} {fields}".rstrip()


def _printable(text: str) -> str:
    """``text`` with every character that is not printable escaped as Python writes it (``\\x1b``)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def say(*texts: str, file: Any = None) -> None:
    """Print lines for people, flushed, what is not printable in each escaped: a broker passes on text from
    consumers (an unload's answer) and from people (a reservation's reason), and an escape sequence in it
    must not drive the terminal of whoever runs ``ps``."""
    lines = [_printable(line) for text in texts for line in text.split("\n")]
    print("\n".join(lines), file=file or sys.stdout, flush=True)


#: What every /v1/status has: its consumers.
STATUS_SHAPE: dict[str, type | tuple[type, ...]] = {"consumers": dict}


def _status(client: Client) -> dict[str, Any]:
    return client.call("GET", "/v1/status", shape=STATUS_SHAPE)


def broker_now(date: str | None) -> float:
    """Now on the broker's clock, from its answer's ``Date`` (to the second), where this machine's differs
    from it by more than CLOCK_SKEW_S: ``ps --url`` from a desktop whose clock is off shows each "ago" as the
    broker counts it (the page does the same). Else, or without a Date, this machine's clock."""
    now = time.time()
    try:
        theirs = email.utils.parsedate_to_datetime(date).timestamp() + 0.5 if date else None
    except (TypeError, ValueError):
        theirs = None
    return theirs if theirs is not None and abs(theirs - now) > CLOCK_SKEW_S else now


def cli_ps(client: Client, args: argparse.Namespace) -> int:
    st = _status(client)
    say(*render_ps(st, broker_now(client.date)))
    return 0


def cli_status(client: Client, args: argparse.Namespace) -> int:
    st = _status(client)
    now = broker_now(client.date)
    say(json.dumps(st, indent=2) if args.json else "\n".join(render_status(st, client.url, now)))
    return 0


def cli_consumer(client: Client, args: argparse.Namespace) -> int:
    """``unload NAME`` and ``load NAME``."""
    path = f"/v1/consumers/{quote(args.name, safe='')}/{args.verb}"
    answer = client.call("POST", path, shape={"consumer": str, "action": str}, timeout_s=CLI_ADMIN_TIMEOUT_S)
    loaded = answer.get("loaded")
    if args.verb == "unload" or loaded is True:
        text = f"{args.verb}ed {args.name}"
    else:  # a load that left it not resident (or unknown): it has no load route
        state = "not resident" if loaded is False else "of unknown residency"
        text = (
            f"made room for {args.name}, which is {state} (without a load route it loads with its first job)"
        )
    if answer.get("evictions"):
        text += f", after unloading {_plural(answer['evictions'], 'other consumer')}"
    say(text)
    return 0


def cli_reload(client: Client, args: argparse.Namespace) -> int:
    shape = {"reloaded": bool, "changes": list}
    changes = client.call("POST", "/v1/reload", shape=shape, timeout_s=CLI_RELOAD_TIMEOUT_S)["changes"]
    say("reloaded: " + ("; ".join(map(str, changes)) if changes else "nothing changed"))
    return 0


def cli_reserve(client: Client, args: argparse.Namespace) -> int:
    seconds = args.duration
    body: dict[str, Any] = {"for_s": int(seconds) if float(seconds).is_integer() else seconds}
    if args.reason is not None:
        body["reason"] = args.reason
    if args.gpu is not None:
        body["gpu"] = args.gpu
    if args.no_restore:
        body["restore"] = False
    shape = {"unloaded": list, "not_unloaded": dict}
    answer = client.call("POST", "/v1/reserve", body, shape=shape, timeout_s=CLI_ADMIN_TIMEOUT_S)
    gpu = answer.get("gpu", args.gpu)
    say(f"GPU {gpu} reserved" if gpu is not None else "reserved", *reservation_lines(answer, time.time()))
    return 0


def cli_release(client: Client, args: argparse.Namespace) -> int:
    path = "/v1/reserve" + (f"?gpu={args.gpu}" if args.gpu is not None else "")
    answer = client.call("DELETE", path, shape={"released": bool})
    gpu = answer.get("gpu", args.gpu)
    if gpu is None and isinstance(answer.get("gpus"), list):
        # Without --gpu, several GPUs: what became of each one's reservation (ended, or cancelled waiting).
        cancelled = answer.get("cancelled") or []
        lines = [
            f"GPU {g}: cancelled a pending reservation (it had not begun: nothing was unloaded)"
            if g in cancelled
            else f"GPU {g} released"
            for g in answer["gpus"]
        ]
        say(*(lines or ["no GPU was reserved"]))
        return 0
    what = f"GPU {gpu}" if gpu is not None else "the GPU"
    was_reserved = answer["released"]
    if answer.get("cancelled"):
        say(f"{what}: cancelled a pending reservation (it had not begun: nothing was unloaded)")
    else:
        say(f"{what} released" if was_reserved else f"{what} was not reserved")
    return 0


def cli_events(client: Client, args: argparse.Namespace) -> int:
    """Follow /v1/events, one line per event, until Ctrl-C (exit 0) or the broker ends the stream."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    query = "" if args.since is None else f"?since={quote(f'{args.since:g}')}"  # (1e+06: its + escaped)
    timeout = client.timeout_s or CLI_EVENTS_TIMEOUT_S
    try:
        with client.open("GET", "/v1/events" + query, timeout_s=CLI_EVENTS_TIMEOUT_S) as resp:
            kind = resp.headers.get_content_type()
            if kind != "text/event-stream":
                raise CliError(1, f"{client.url}/v1/events answered {kind}, no event stream: not a broker?")
            data: list[str] = []
            while True:
                try:
                    line = resp.readline(CLI_EVENT_LINE_LIMIT + 1)
                except (OSError, http.client.HTTPException) as e:
                    raise client.unreachable(e, timeout) from None
                if not line:
                    raise CliError(
                        1, "the broker ended the event stream (shutting down, or this reader fell behind)"
                    )
                if len(line) > CLI_EVENT_LINE_LIMIT or sum(map(len, data)) > CLI_EVENT_LINE_LIMIT:
                    raise CliError(1, f"{client.url}/v1/events sent an event over 1 MiB: not a broker?")
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                if text.startswith("data:"):
                    data.append(text[6:] if text.startswith("data: ") else text[5:])
                elif not text and data:
                    try:
                        say(format_event(json.loads("\n".join(data))))
                    except (ValueError, RecursionError):
                        say("\n".join(data))
                    data = []
    except KeyboardInterrupt:
        return 0


VERBS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "ps": cli_ps,
    "status": cli_status,
    "unload": cli_consumer,
    "load": cli_consumer,
    "reload": cli_reload,
    "reserve": cli_reserve,
    "release": cli_release,
    "events": cli_events,
}


#: The broker's own flags, refused with a verb (which asks the broker at --url, not the one they name).
DAEMON_FLAGS = ("--config", "--listen", "--nvidia-smi", "--check", "--log-level")

#: The verbs' own flags, accepted before the verb as after it: (flag, argparse keywords).
VERB_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--url", {"help": f"the broker (default: $MGPUMANAGER_URL, else {DEFAULT_URL})"}),
    (
        "--token-file",
        {
            "metavar": "FILE",
            "help": "read the bearer token from FILE (default: the token in $MGPUMANAGER_TOKEN)",
        },
    ),
    (
        "--timeout",
        {
            "type": _timeout,
            "metavar": "SECONDS",
            "help": f"wait at most this long for each answer (default {CLI_TIMEOUT_S:g} s;"
            f" {CLI_ADMIN_TIMEOUT_S:g} s for load, unload and reserve,"
            f" {CLI_RELOAD_TIMEOUT_S:g} s for reload)",
        },
    ),
)


def add_verbs(parser: argparse.ArgumentParser) -> None:
    """The verbs, each with --url, --token-file and --timeout (also taken before the verb:
    ``mgpumanager.py --url http://mrock:8770 ps``; written after it, they win)."""
    for flag, options in VERB_FLAGS:
        parser.add_argument(flag, **options)
    common = argparse.ArgumentParser(add_help=False)
    for flag, options in VERB_FLAGS:
        common.add_argument(flag, **options, default=argparse.SUPPRESS)
    verbs = parser.add_subparsers(
        dest="verb", metavar="VERB", title="verbs (they talk to a running broker; without one, run it)"
    )
    verbs.add_parser("ps", parents=[common], help="consumers, GPUs and reservations in one table")
    status = verbs.add_parser("status", parents=[common], help="a summary with the counters")
    status.add_argument("--json", action="store_true", help="print /v1/status as it is")
    for verb, text in (("unload", "unload a consumer now"), ("load", "make room for a consumer and load it")):
        verbs.add_parser(verb, parents=[common], help=text).add_argument("name", metavar="NAME")
    verbs.add_parser("reload", parents=[common], help="re-read the broker's config, as SIGHUP does")
    reserve = verbs.add_parser(
        "reserve", parents=[common], help="unload everything on a GPU and keep jobs off it for DURATION"
    )
    reserve.add_argument(
        "duration", type=_duration, metavar="DURATION", help="90s, 30m, 2h, 1h30m or seconds"
    )
    reserve.add_argument("--reason", metavar="TEXT", help="what the GPU is for (shown to refused jobs)")
    reserve.add_argument("--gpu", type=int, metavar="N", help="which GPU, where there are several")
    reserve.add_argument(
        "--no-restore",
        action="store_true",
        help="leave unloaded at its end what it unloaded (by default it is loaded again)",
    )
    release = verbs.add_parser("release", parents=[common], help="end a reservation")
    release.add_argument("--gpu", type=int, metavar="N", help="which GPU, where there are several")
    events = verbs.add_parser("events", parents=[common], help="follow the event stream until Ctrl-C")
    events.add_argument(
        "--since",
        type=_seconds,
        metavar="SECONDS",
        help=f"first the events of the last SECONDS (up to {EVENT_RING_S:g})",
    )


#: What reading a JSON answer that is not shaped as the broker's raises ([] for /v1/status, NaN for a time,
#: a string for a count): whatever answered is not a broker (exit 1), and no traceback.
NOT_A_BROKERS_ANSWER = (
    AttributeError,
    KeyError,
    IndexError,
    TypeError,
    ValueError,
    ArithmeticError,
    RecursionError,
)


def run_verb(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> int:
    """Run a verb: 0 done, 1 the broker could not be reached, 2 it refused; the reason on stderr."""
    # A terminal whose encoding lacks a character the broker passes on (a reason's en dash, on Latin-1)
    # shows it escaped, as stderr does.
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="backslashreplace")
    try:
        given = [flag for flag in DAEMON_FLAGS if getattr(args, flag[2:].replace("-", "_"), None) is not None]
        if given:  # (they were dropped without a word: the verb asked the broker at --url)
            raise CliError(2, f"{', '.join(given)}: the broker's own flags; a verb asks the broker at --url")
        client = Client(cli_url(args.url, environ), cli_token(args.token_file, environ), args.timeout)
        try:
            return VERBS[args.verb](client, args)
        except NOT_A_BROKERS_ANSWER as e:  # (only the answer is read here: the command line was checked)
            what = f"{type(e).__name__}: {e}"
            raise CliError(1, f"{client.url} answered what no broker does ({what})") from e
    except CliError as e:
        say(f"mgpumanager {args.verb}: {e.message}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mgpumanager.py events | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the output could not be written (a full disk): the broker's calls raise CliError
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        say(f"mgpumanager {args.verb}: cannot write its output: {e.strerror or e}", file=sys.stderr)
        return 2


def command_line() -> argparse.ArgumentParser:
    """The broker's own flags and the verbs: ``--help`` lists both, before the daemon's imports."""
    parser = argparse.ArgumentParser(
        prog="mgpumanager",
        description="GPU-inference broker: one door to one GPU. Without a VERB it runs the broker;"
        " a VERB talks to a running one.",
    )
    # (The broker's own flags are None unless given: a verb refuses them, and main() gives the defaults.)
    parser.add_argument("--config", help="YAML config (default: ./consumers.yaml)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="override the config's listen")
    parser.add_argument(
        "--nvidia-smi", metavar="CMD", help="override gpu.nvidia_smi (split like a shell would)"
    )
    parser.add_argument(
        "--check", action="store_true", default=None, help="validate the config, print a summary, exit"
    )
    parser.add_argument(
        "--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: INFO)"
    )
    add_verbs(parser)
    return parser


# ---- Fast path ----
# Everything above needs only the standard library: a verb (or --help) is answered before the daemon's
# imports (aiohttp alone takes most of a second to import).
if __name__ == "__main__":
    _args = command_line().parse_args()
    if _args.verb is not None:
        sys.exit(run_verb(_args))

# The daemon's imports: from here on, everything is the broker's.
import asyncio
import bisect
import concurrent.futures
import contextlib
import copy
import errno
import fcntl
import fnmatch
import functools
import gc
import hashlib
import hmac
import importlib
import inspect
import ipaddress
import itertools
import resource
import shlex
import shutil
import statistics
import struct
import subprocess
import tempfile
import termios
from collections import Counter, deque
from pathlib import Path
from queue import SimpleQueue

try:
    import aiohttp
    import yaml
    from aiohttp import web
    from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError, PayloadEncodingError
    from multidict import CIMultiDict
    from yarl import URL
except ImportError as _missing:  # one line, not a traceback: the verbs above work without these
    print(
        f"mgpumanager: the broker needs the Python module {_missing.name or _missing}, which is not"
        " installed: pip install -r requirements.txt (Debian 13: apt install python3-aiohttp python3-yaml)",
        file=sys.stderr,
    )
    sys.exit(2)

#: The oldest aiohttp the broker runs on: Debian 13's python3-aiohttp (3.11.16), on which ``make test-debian``
#: runs the tests. (Ubuntu 24.04's 3.9 lacks what WebSockets through a mount need.)
OLDEST_AIOHTTP = (3, 11)
if tuple(int(n) for n in re.findall(r"\d+", aiohttp.__version__)[:2]) < OLDEST_AIOHTTP:
    print(
        f"mgpumanager: the broker needs aiohttp >= 3.11 (Debian 13's python3-aiohttp); this is"
        f" {aiohttp.__version__}: pip install -r requirements.txt",
        file=sys.stderr,
    )
    sys.exit(2)

#: The oldest aiohttp with the fixes the broker leaves to it against a hostile client or consumer: header
#: and trailer counts (CVE-2026-22815, 3.13.4; the count of a consumer's answer head, ``max_headers``, with
#: it), a WebSocket frame's length checked before it is read and empty messages counted in its queue
#: (3.14.1), request smuggling through a WebSocket upgrade (CVE-2026-69243, 3.14.3). On an older one the
#: broker bounds what a client sends itself (``ClientConnections``: a head, what follows it, a body's
#: trailers, a WebSocket's messages), not a consumer's answer head before 3.13.4: ``old_aiohttp`` warns at
#: start and ``--check`` notes it.
FIXED_AIOHTTP = (3, 14, 3)
AIOHTTP_VERSION = tuple(int(n) for n in re.findall(r"\d+", aiohttp.__version__)[:3])
#: Whether aiohttp bounds a request body's trailers and a WebSocket's frames itself: where it does, the
#: broker's own bounds on them are left out (they would cut a chunked body of 1-byte chunks, and a
#: WebSocket that pings for hours without sending a message).
AIOHTTP_BOUNDS_STREAMS = AIOHTTP_VERSION >= FIXED_AIOHTTP


def old_aiohttp() -> str | None:
    """Why this aiohttp is older than FIXED_AIOHTTP, or None."""
    if AIOHTTP_BOUNDS_STREAMS:
        return None
    answers = ", not a consumer's answer head" if AIOHTTP_VERSION < (3, 13, 4) else ""
    return (
        f"aiohttp {aiohttp.__version__} is older than 3.14.3, which fixed what a hostile client or"
        " consumer can make it hold (CVE-2026-22815, CVE-2026-69243, WebSocket frame lengths): the broker"
        f" bounds what a client sends itself{answers}; unless the distribution patched them, install"
        " requirements.txt's aiohttp"
    )


# =====================================================================================================
# Constants
# =====================================================================================================

# (MiB, CONFIG_READ_TIMEOUT_S and MAX_TOKEN_FILE_BYTES are defined with the command line, which uses them.)
PRIORITY_MAX = 4
#: A bearer token shorter than this is refused: it would be guessable.
MIN_TOKEN_LENGTH = 16
#: Kinds that are (or will be) routes of their own under /v1/.
RESERVED_KINDS = frozenset({"status", "consumers", "events", "reload", "reserve"})
#: (Each ends in ``\Z``: ``$`` also matches before a trailing newline, and let ``"mvoice\n"`` through.)
KIND_RE = re.compile(r"^[a-z][a-z0-9_]*\Z")
#: What a consumer's (and a client's) name may be, and its length at most (the state file keeps names).
CONSUMER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
MAX_NAME_CHARS = 200
#: The kind a mount job has when its method and path are none of its consumer's ``paths``.
MOUNT_KIND = "mount"
#: The kind of the job that starts a stopped consumer for an unscheduled call (``start_for_unscheduled``).
START_KIND = "start"
#: The pseudo-consumer that holds a GPU's lock while it is reserved (``POST /v1/reserve``), and its kind.
RESERVATION = "reservation"
#: Kinds of job that only unload: granting one changes nothing another consumer's record relies on.
UNLOAD_KINDS = frozenset({"unload", "idle_unload", "yield", RESERVATION})
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
#: How many recent loads, unloads and jobs of a consumer its learned times are the median of.
TIMING_SAMPLES = 15
#: A move of the wall clock against the monotonic one larger than this is a step (NTP, by hand), which the
#: wall-clock times shown and written follow (``WallClock``); a smaller one is a slew, which they do not.
WALL_STEP_S = 1.0
#: What the broker times per consumer: its loads, its unloads and its jobs.
TIMED = ("load", "unload", "job")
#: A forecast counts the job running now as at least this much more, however long past its consumer's
#: learned job time it has run already (it is not done: a render twice as long as usual is still running).
RUNNING_FLOOR_S = 1.0
#: How long a client's expected wait, played forward for the Retry-After of a refusal, is counted down
#: before it is played again (Retry-After is whole seconds).
CLIENT_ETA_S = 1.0
#: How often free VRAM is polled after an unload (one nvidia-smi each, the GPU line alone), and which
#: share of the victim's memory counts as "freed".
VRAM_POLL_S = 0.05
FREED_SHARE = 0.75
#: An evicted consumer whose unload answered but freed less than this share of its memory in vram_wait_s
#: held (almost) nothing: it is recorded not resident rather than unknown.
NOTHING_FREED_SHARE = 0.1
#: After a command exited, how long its output is still read (a service it started may hold the pipes).
PIPE_GRACE_S = 0.5
#: After killing a hung nvidia-smi or command, how long to wait for it to be reaped before going on.
REAP_TIMEOUT_S = 1.0
#: What the broker keeps of a command's stdout and of its stderr (the tail, for its error messages); of
#: nvidia-smi's, the head, up to gpu.max_output_mib, and more is an error.
OUTPUT_LIMIT = 1 * MiB
#: A process's cgroups (``processes.unit``) are read once and kept while it stays in nvidia-smi's list under
#: the same name, but this long at most: a pid another process took between two readings (the same name,
#: another unit) is misread for so long at most. Gone from a reading, it is forgotten.
CGROUP_CACHE_S = 60.0
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
#: The shipped unit's TimeoutStopSec: systemd kills the broker after it, whatever its drain still does.
UNIT_STOP_S = 60.0
#: At shutdown, the broker's background tasks are cancelled again every CANCEL_AGAIN_S while one goes on
#: (a swallowed cancellation), CANCEL_ROUNDS times at most.
CANCEL_AGAIN_S = 0.5
CANCEL_ROUNDS = 10
#: Connecting to a consumer must not take longer than this (or its timeout_s, if shorter).
CONNECT_TIMEOUT_S = 10.0
#: A proxied WebSocket pings both sides this often: a peer gone without a close (a laptop put to sleep) is
#: noticed within about twice this, not at TCP keepalive's two hours.
WEBSOCKET_HEARTBEAT_S = 30.0
#: Closing a proxied WebSocket waits this long for the other end's close frame: an end that is still sending
#: a message the broker refused (too large) cannot answer one, and is cut off then.
WEBSOCKET_CLOSE_S = 2.0
#: A listening socket's backlog (``listen_backlog``): a 32nd of the descriptor limit, from aiohttp's default
#: to this many.
LISTEN_BACKLOG_MIN, LISTEN_BACKLOG_MAX = 128, 1024
#: The descriptors kept for the broker's own work (see descriptor_reserve): a base (stdio, the event loop's,
#: listeners, logs, config and /proc reads), per GPU (a reading's nvidia-smi, a load or unload command),
#: and per consumer beyond its jobs, unscheduled calls and WebSockets (a probe, a load or unload call, a
#: hold poll, a residency query).
FD_RESERVE_BASE = 64
FD_RESERVE_PER_GPU = 16
FD_RESERVE_PER_CONSUMER = 4
#: When the broker's own work finds no descriptor free (EMFILE), this many idle client connections go.
FD_SHED_BATCH = 64
#: A connection whose credential a reload revoked gets this long to take a WebSocket's close frame (1008),
#: then it is cut.
REVOKE_GRACE_S = 0.5
#: What a client connection may send while no request of it is being handled (its next request's head, and
#: what aiohttp reads of its body before the handler starts); one that sends more is cut (head_too_large).
#: aiohttp's own parser refuses a head over 128 lines of 8,190 bytes (some 1 MiB); Debian 13's aiohttp 3.11
#: counts no lines, and held every header a client sent (gigabytes within header_timeout_s).
MAX_HEAD_BYTES = 2 * MiB
#: What a client connection may send behind a request being handled once its body arrived whole (the heads of
#: requests it pipelines); one that sends more is cut (head_too_large). aiohttp queues the requests it
#: parses there until the one handled is answered: the aiohttp of requirements.txt stops reading at 32;
#: Debian 13's aiohttp 3.11 queued every one (some 50 bytes of a client's made 1.6 KiB of the broker's).
MAX_PIPELINED_BYTES = 64 * 1024
#: The client connections the broker closed are summed up in the log at most this often (each is counted
#: in mgpumanager_connections_closed_total at once).
CLOSED_LOG_S = 10.0
#: A config file larger than this is refused unread (mrock's is 5 KiB): parsing is slow and memory-hungry.
MAX_CONFIG_BYTES = 256 * 1024
#: A config whose nodes and scalar characters, with every alias expanded, exceed this is refused (an alias
#: "bomb" of 1 KiB can stand for gigabytes once expanded, say in an unload body sent as JSON).
MAX_CONFIG_EXPANSION = 1024 * 1024
#: The largest value of every number the loader reads, by kind: durations (keys ending in ``_s``; also at
#: least a millisecond when not 0), body sizes (``max_body_mib``, ``max_bodies_mib``,
#: ``max_ws_message_mib``, ``max_output_mib``), memory sizes (other ``_mib`` keys), GPU indexes (``index``,
#: ``gpu``) and counts (every other number).
NUMBER_LIMITS = {"duration": 7 * 86400, "body": 16384, "memory": 1024 * 1024, "gpu": 255, "count": 10000}
NUMBER_UNITS = {"duration": " s", "body": " MiB", "memory": " MiB", "gpu": "", "count": ""}
MIN_DURATION_S = 0.001

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
#: gpu.reader: NVML when it loads, else nvidia-smi (``auto``), or the one named.
GPU_READERS = ("auto", "nvml", "nvidia-smi")

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
    "request_timeout": (408, False),
    "payload_too_large": (413, False),
    "expectation_failed": (417, False),
    "too_many_requests": (429, True),
    "client_queue_full": (429, True),
    "bad_config": (422, False),
    "consumer_unreachable": (502, True),
    "consumer_stopped": (503, True),
    "load_failed": (502, True),
    "unload_failed": (502, True),
    "bad_consumer_url": (502, False),
    "scheduler_error": (500, False),
    "queue_full": (503, True),
    "queue_timeout": (503, True),
    "shutting_down": (503, True),
    "insufficient_vram": (503, True),
    "out_of_descriptors": (503, True),
    "gpu_unavailable": (503, True),
    "consumer_timeout": (504, True),
    "gpu_reserved": (503, True),
    "reservation_released": (409, False),
    "gpu_in_use": (503, True),
}


class BrokerError(Exception):
    """The one root of the broker's own errors: each carries the JSON error's code (and so its HTTP status
    and whether it is retryable), its message and the consumer it concerns. The HTTP app turns any of them
    into the one error shape (``error_response``); nothing signals a failure by returning a value."""

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

    def body(self) -> dict[str, Any]:
        """The JSON error: ``{error, message, consumer, retryable}``."""
        return {
            "error": self.code,
            "message": self.message,
            "consumer": self.consumer,
            "retryable": self.retryable,
        }


class ConfigError(BrokerError):
    """The config is unusable (bad_config); ``problems`` lists every reason, each naming its key."""

    def __init__(self, problems: list[str]):
        super().__init__("bad_config", "\n".join(problems))
        self.problems = problems


class GpuError(BrokerError):
    """nvidia-smi could not be run, failed, hung or printed something unreadable (gpu_unavailable)."""

    def __init__(self, message: str):
        super().__init__("gpu_unavailable", message)


class CallError(BrokerError):
    """A call the broker made to a consumer of its own accord (load, unload, a residency query) failed; the
    scheduler answers it as load_failed or unload_failed, naming the consumer."""

    def __init__(self, message: str, code: str = "consumer_unreachable"):
        super().__init__(code, message)


class ConsumerGone(BrokerError):
    """A consumer the broker was waiting on is gone (its connection refused or reset): its work died."""

    def __init__(self, reason: str):
        super().__init__("consumer_unreachable", reason)
        self.reason = reason


class ProcessTimeout(BrokerError):
    """A subprocess ran past its time and was killed, with its process group; ``stderr``: the tail of what
    it wrote there before (why a start script hung, often)."""

    def __init__(self, message: str, stderr: bytes = b""):
        super().__init__("consumer_timeout", message)
        self.stderr = stderr


# =====================================================================================================
# Config
# =====================================================================================================


@dataclass(frozen=True)
class JsonQuery:
    """A call whose JSON answer the broker reads: a consumer's ``residency``, or the list a ``for_each``
    unload walks. With ``items``, the answer's list at that top-level key, its elements kept when they match
    ``where``; without, the answer itself, which matches ``where`` or not."""

    method: str
    path: str
    items: str | None = None
    #: (dotted field, accepted values): a JSON object matches when each field holds one of its values
    #: (a missing field is null).
    where: tuple[tuple[str, tuple[Any, ...]], ...] = ()


@dataclass(frozen=True)
class Route:
    """An HTTP call the broker makes to a consumer of its own accord: health, load, unload."""

    method: str
    path: str
    #: Sent as JSON when not None.
    body: Any = None
    timeout_s: float = 60.0
    #: An unload made once per element of this list, ``{field}`` placeholders filled from the element.
    for_each: JsonQuery | None = None
    #: ``body`` as it is sent, serialised once (the loader refuses a body that JSON cannot express).
    data: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.body is not None and self.data is None:
            object.__setattr__(self, "data", json_body(self.body))


def json_body(body: Any) -> bytes:
    """A load or unload body as sent: JSON (no NaN or Infinity, which JSON lacks); ValueError, TypeError or
    RecursionError when it cannot be."""
    return json.dumps(body, allow_nan=False).encode()


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
class ProcessMatch:
    """How to recognise a consumer's processes in nvidia-smi's list; each key given must match."""

    #: A shell pattern for a component of the process's cgroup path: its systemd unit or container scope.
    unit: str | None = None
    #: A shell pattern for nvidia-smi's process name (the executable's path).
    name: str | None = None


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
    #: Runs its own model LRU: evicted only as the last resort (and only with an unload).
    vram_managed: bool = False
    #: The GPU (nvidia-smi index) it runs on: its queue, lock and eviction are that GPU's.
    gpu: int = 0
    #: Unloaded by the broker after this many seconds resident and unused; 0: never.
    idle_unload_s: float = 0.0
    #: Loaded at start-up and after a reload when it fits without evicting anything.
    preload: bool = False
    #: Calls through its mount (/c/{name}/...) that are forwarded at once, besides GET, HEAD and OPTIONS.
    unscheduled: tuple[Unscheduled, ...] = ()
    #: How its processes are recognised in the GPU's process list: then its memory is measured.
    processes: ProcessMatch | None = None
    #: Unscheduled calls (through its mount, and /audio/ files) in flight at once; one more gets
    #: too_many_requests. So is a WebSocket beyond ``max_websockets`` open at once through its mount.
    max_unscheduled: int = 32
    max_websockets: int = 32
    #: Where the consumer tells its residency, read with each health probe (None: its for_each listing,
    #: else its health's ``loaded``).
    residency: JsonQuery | None = None
    #: Its own port (host, port): its whole API at the root path, by the rules of its mount.
    listen: tuple[str, int] | None = None
    #: An unscheduled call (through its mount or port, /audio/, a WebSocket) that finds it stopped starts it
    #: first, as a job of kind ``start`` would, instead of being refused with consumer_stopped: every route
    #: of its needs its model (llama-server, whose process is its model).
    start_for_unscheduled: bool = False
    #: The preset it was made from, and the keys (``paths.<kind>`` for paths) that the preset filled in.
    preset: str | None = None
    from_preset: tuple[str, ...] = ()

    @property
    def started_by_command(self) -> bool:
        """Loaded by starting a process: a failing health route means "stopped", not "unreachable"."""
        return isinstance(self.load, Command)

    @property
    def process_is_model(self) -> bool:
        """Started by command and never unloaded but by a command (or not at all): while its process runs
        it holds its model. (One with an HTTP unload beside its load command, SGLang's release, runs on
        without its weights.)"""
        return self.started_by_command and not isinstance(self.unload, Route)

    @property
    def residency_query(self) -> JsonQuery | None:
        """What tells its residency: ``residency``, else the list its for_each unload walks."""
        if self.residency is not None:
            return self.residency
        return self.unload.for_each if isinstance(self.unload, Route) else None


@dataclass(frozen=True)
class YieldConfig:
    """``gpu.yield``: the GPU yields to strangers (a game, a render, a training run: memory no consumer's
    processes hold). While one is present, idle consumers are unloaded until ``keep_free_mib`` is free, and
    no job may leave less free; once none has been present for ``restore_after_s``, what was unloaded for
    them is loaded again."""

    #: What a stranger is left free: idle consumers are unloaded for it, and no job leaves less.
    keep_free_mib: int = 2048
    #: Unclaimed memory up to this is nobody's in particular (a desktop's own): no stranger.
    ignore_mib: int = 512
    #: No stranger for this long: what was unloaded for strangers is loaded again.
    restore_after_s: float = 30.0
    #: The GPU is read this often while the block is set (the reading /v1/status shows too).
    poll_s: float = 2.0


#: gpu.yield.poll_s is at least this: a nvidia-smi reading is three processes (25 ms each on mrock).
MIN_YIELD_POLL_S = 0.1


@dataclass(frozen=True)
class GpuConfig:
    nvidia_smi: tuple[str, ...] = ("nvidia-smi",)
    #: The GPU of consumers that do not name one (``gpu: N``).
    index: int = 0
    cushion_mib: int = 256
    #: Each reading (nvidia-smi's processes, NVML's calls) must answer within this.
    query_timeout_s: float = 5.0
    #: The most of nvidia-smi's output (each query's) that is read and parsed.
    max_output_mib: int = 8
    #: Where readings come from (GPU_READERS): NVML when it loads, else nvidia-smi, by default.
    reader: str = "auto"
    #: ``gpu.yield`` (a keyword in Python): yielding to strangers on every GPU; None: off.
    yield_: YieldConfig | None = None


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
    #: A request body must arrive whole within this (request_timeout otherwise).
    body_timeout_s: float = 300.0
    #: The largest WebSocket message relayed, after any decompression (larger: the socket closes, 1009).
    max_ws_message_mib: int = 16
    #: What all request bodies being read at once may hold in memory (too_many_requests beyond).
    max_bodies_mib: int = 256
    #: How long a job that needs no swap may go before waiting jobs of equal effective priority that would
    #: need one, at most (0: strict arrival order within a priority level).
    max_overtake_s: float = 30.0
    #: Fair share between clients (auth.clients): among waiting jobs of equal effective priority, the grant
    #: favours the client with the least GPU time (held seconds) over the last this many seconds.
    fair_window_s: float = 60.0


#: scheduler.* settings that may be 0 (the others must be positive).
ZERO_OK_SCHEDULER = frozenset({"max_overtake_s"})


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 5.0
    timeout_s: float = 2.0


@dataclass(frozen=True)
class HttpConfig:
    """The broker's HTTP server: how long a connection may stay without a request, and its own names."""

    #: A client connection that has not sent a whole request head within this is closed.
    header_timeout_s: float = 10.0
    #: An idle keep-alive connection is closed after this.
    keepalive_s: float = 75.0
    #: Further names of the broker's (besides its listen addresses, loopback, hostname and FQDN), lower case.
    hosts: tuple[str, ...] = ()


@functools.lru_cache(maxsize=64)
def credential(token: str, who: str = "admin") -> str:
    """What a connection authenticated with ``token`` as ``who`` (the admin, or ``client:<name>``) is
    registered under: a fingerprint, never the token (it may be logged). Who is part of it: a reload that
    gives the token to someone else (the admin's old one to a client, a client renamed) revokes what it let
    in as whom it was."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{who}:token:{digest}"


@dataclass(frozen=True)
class ClientConfig:
    """A program that calls the broker with a token of its own (``auth.clients.<name>``)."""

    name: str
    token: str = field(repr=False)
    #: Replaces the consumer's priority for this client's jobs (None: the consumer's).
    priority: int | None = None
    #: Its jobs waiting at once, per GPU (None: only scheduler.max_queue bounds them).
    max_queued: int | None = None


@dataclass(frozen=True)
class AuthConfig:
    #: The admin's bearer token: every route but /healthz requires a token, admin routes this one; None: no
    #: auth, admin routes loopback-only.
    token: str | None = field(default=None, repr=False)
    #: The clients, each with a token of its own that runs jobs and reads status, events and metrics, never
    #: the admin routes (only with ``token``: the loader refuses clients without it).
    clients: dict[str, ClientConfig] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        """Whether every route but the public ones needs a token."""
        return self.token is not None or bool(self.clients)

    @functools.cached_property
    def callers(self) -> tuple[tuple[bytes, Caller], ...]:
        """Each accepted token (as bytes) and who presents it: the admin's first, then each client's."""
        found = (
            [] if self.token is None else [(self.token.encode(), Caller(None, True, credential(self.token)))]
        )
        found += [
            (c.token.encode(), Caller(c.name, False, credential(c.token, f"client:{c.name}")))
            for c in self.clients.values()
        ]
        return tuple(found)


@dataclass(frozen=True)
class Caller:
    """Who a request came from, as its token says: a client (by name), the admin (``admin``), or nobody in
    particular (no token needed: ``credential`` None)."""

    client: str | None
    admin: bool
    #: What its connection is registered under for revocation (``credential``, or NO_TOKEN where none was
    #: needed); None: a public path (never registered).
    credential: str | None = None

    @property
    def who(self) -> str:
        return f"client {self.client}" if self.client is not None else "the admin" if self.admin else "anyone"


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
    http: HttpConfig = HttpConfig()
    #: What a restart keeps (reservations, what waits to be restored, learned timings, last use); None: off.
    state_file: str | None = None


_REQUIRED = object()


def number_kind(key: str) -> str:
    """Which of NUMBER_LIMITS bounds the number under ``key``."""
    if key.endswith("_s"):
        return "duration"
    if key in ("max_body_mib", "max_bodies_mib", "max_ws_message_mib", "max_output_mib"):
        return "body"
    if key.endswith("_mib"):
        return "memory"
    return "gpu" if key in ("index", "gpu") else "count"


class _Checker:
    """Collects every problem of a raw config instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        """One problem, one line: what is not printable in a key (a name ``"mvoice\\n"``) is escaped."""
        self.problems.append(_printable(f"{where}: {message}"))

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
        """A positive number (or >= 0 with ``zero_ok``), finite and within NUMBER_LIMITS for its kind;
        ``integer`` refuses fractions."""
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
        if isinstance(value, float) and not math.isfinite(value):  # (math.isfinite(10**400) overflows)
            self.problem(f"{where}.{key}", f"must be a finite number, not {value!r}")
            return default if default is not _REQUIRED else 0
        kind = number_kind(key)
        high, unit = NUMBER_LIMITS[kind], NUMBER_UNITS[kind]
        if value < 0 or (value == 0 and not zero_ok):
            self.problem(f"{where}.{key}", f"must be {'>= 0' if zero_ok else 'positive'}, not {value!r}")
        elif value > high:
            self.problem(f"{where}.{key}", f"must be at most {high}{unit}, not {value!r}")
        elif kind == "duration" and 0 < value < MIN_DURATION_S:
            self.problem(f"{where}.{key}", f"must be at least {MIN_DURATION_S:g} s, not {value!r}")
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


def _parse_route(
    ck: _Checker, raw: Any, where: str, default_method: str, *, extra: bool, for_each: bool = False
) -> Route | None:
    allowed = ("method", "path", "body", "timeout_s") if extra else ("method", "path")
    d = ck.mapping(raw, where, (*allowed, "for_each") if for_each else allowed, required=True)
    if not d:
        return None
    method = ck.method(d, where, default_method)
    path = ck.path(d, where)
    timeout_s = ck.number(d, "timeout_s", where, 60.0, integer=False) if extra else 60.0
    body, data = d.get("body"), None
    if body is not None:
        try:
            data = json_body(body)  # once, here: never again at each call
        except (ValueError, TypeError, RecursionError) as e:
            ck.problem(f"{where}.body", f"cannot be sent as JSON ({type(e).__name__}: {str(e)[:100]})")
            body = None
    each = _parse_query(ck, d["for_each"], f"{where}.for_each", list_only=True) if "for_each" in d else None
    return Route(method=method, path=path, body=body, timeout_s=timeout_s, data=data, for_each=each)


def _parse_query(ck: _Checker, raw: Any, where: str, *, list_only: bool) -> JsonQuery | None:
    """``{method: GET, path, items, where}``: a residency query, or (``list_only``) a for_each listing."""
    d = ck.mapping(raw, where, ("method", "path", "items", "where"), required=True)
    if not d:
        return None
    items = ck.string(d, "items", where) if "items" in d or list_only else None
    matches = []
    for name, value in ck.mapping(d.get("where"), f"{where}.where", None).items():
        fwhere = f"{where}.where.{name}"
        if not isinstance(name, str) or not all(name.split(".")):
            ck.problem(fwhere, "fields are names, dotted for nested ones (status.value)")
            continue
        values = value if isinstance(value, list) else [value]
        if not values or not all(v is None or isinstance(v, (str, int, float)) for v in values):
            ck.problem(
                fwhere,
                f"must be a value (string, number, true, false, null) or a list of them, not {values!r}",
            )
            continue
        matches.append((name, tuple(values)))
    if items is None and not matches:
        ck.problem(where, "needs items (the answer's list to read) or where (what the answer must hold)")
    return JsonQuery(ck.method(d, where, "GET"), ck.path(d, where), items or None, tuple(matches))


def _argument(a: Any) -> bool:
    """Whether ``a`` can be one argument of a command: a non-empty string without a NUL (which no argv can
    hold: the command would fail at its first run, not at the config's check)."""
    return isinstance(a, str) and bool(a) and "\0" not in a


def _parse_action(ck: _Checker, raw: Any, where: str, *, for_each: bool = False) -> Route | Command | None:
    """``load``/``unload``: an HTTP call ``{method, path, body, timeout_s}`` or ``{command, timeout_s}``;
    an unload's HTTP call may walk a list (``for_each``)."""
    if not isinstance(raw, dict) or "command" not in raw:
        return _parse_route(ck, raw, where, "POST", extra=True, for_each=for_each)
    d = ck.mapping(raw, where, ("command", "timeout_s", "method", "path", "body"))
    both = [key for key in ("method", "path", "body") if key in d]
    if both:
        ck.problem(where, f"set command or an HTTP call ({', '.join(both)}), not both")
    argv = d["command"]
    if not isinstance(argv, list) or not argv or not all(_argument(a) for a in argv):
        ck.problem(f"{where}.command", f"must be a list of non-empty strings (argv, no shell), not {argv!r}")
        argv = []
    timeout_s = ck.number(d, "timeout_s", where, 60.0, integer=False)
    return Command(argv=tuple(argv), timeout_s=timeout_s)


def _calls(method: str, *paths: str) -> list[dict[str, str]]:
    """``unscheduled`` entries: one method, several paths."""
    return [{"method": method, "path": path} for path in paths]


#: What ``preset: NAME`` fills in: everything the service's own API defines (not url, vram_resident_mib,
#: processes, nor eviction by command). Each was read in the service's source at the version that
#: docs/configuration.md's "Presets" table names. Kinds: llm (a prompt), chat (messages), embed, image,
#: img2img, image_ui, stt, tts.
#: The OpenAI-compatible paths the LLM servers' presets share (each preset gets a copy when applied).
OPENAI_PATHS: dict[str, dict[str, str]] = {
    "chat": {"method": "POST", "path": "/v1/chat/completions"},
    "llm": {"method": "POST", "path": "/v1/completions"},
    "embed": {"method": "POST", "path": "/v1/embeddings"},
}

PRESETS: dict[str, dict[str, Any]] = {
    # ollama/ollama server/routes.go, api/types.go (v0.33.0-rc2): /api/generate with an empty prompt and
    # keep_alive 0 unloads a model (what `ollama stop` does); /api/ps lists the loaded ones.
    "ollama": {
        "health": {"method": "GET", "path": "/"},
        "paths": {
            "llm": {"method": "POST", "path": "/api/generate"},
            "chat": {"method": "POST", "path": "/api/chat"},
            "embed": {"method": "POST", "path": "/api/embed"},
        },
        "unload": {
            "method": "POST",
            "path": "/api/generate",
            "body": {"model": "{name}", "keep_alive": 0},
            "for_each": {"method": "GET", "path": "/api/ps", "items": "models"},
        },
        "vram_managed": True,
        "unscheduled": _calls("POST", "/api/show", "/api/copy", "/api/pull", "/api/push", "/api/create")
        + _calls("POST", "/api/blobs/*")
        + _calls("DELETE", "/api/delete"),
    },
    # ComfyUI v0.8.0 server.py, app/user_manager.py, app/app_settings.py: every route is served under /api
    # too; /prompt answers at once and /history/{id} stays {} until the render is done; /free needs a body.
    # /free sets each flag it names one after the other, and main.py's prompt_worker reads them between
    # prompts: free_memory implies unload_models, and both in one body race (the worker may read the first
    # alone, leaving free_memory to drop the model of the next render as soon as it is done).
    "comfyui": {
        "health": {"method": "GET", "path": "/system_stats"},
        "paths": {
            "image": {
                "method": "POST",
                "path": "/prompt",
                "hold_until": {
                    "method": "GET",
                    "path": "/history/{prompt_id}",
                    "poll_s": 0.5,
                    "timeout_s": 900,
                },
            },
            "image_ui": {
                "method": "POST",
                "path": "/api/prompt",
                "hold_until": {
                    "method": "GET",
                    "path": "/api/history/{prompt_id}",
                    "poll_s": 0.5,
                    "timeout_s": 900,
                },
            },
        },
        "unload": {"method": "POST", "path": "/free", "body": {"free_memory": True}},
        "unscheduled": [
            {"method": "POST", "path": prefix + path}
            for path in (
                "/interrupt",
                "/queue",
                "/history",
                "/upload/*",
                "/userdata/*",
                "/settings*",
                "/users",
            )
            for prefix in ("", "/api")
        ]
        + _calls("DELETE", "/userdata/*", "/api/userdata/*")
        + _calls("PATCH", "/internal/logs/subscribe"),
    },
    # whisper.cpp 233fe1fc examples/server/server.cpp: no unload route (evicted by a command you write).
    "whisper-cpp": {
        "health": {"method": "GET", "path": "/health"},
        "paths": {"stt": {"method": "POST", "path": "/inference"}},
    },
    # llama.cpp (llama-cpp-python 0.3.36's vendor/llama.cpp) tools/server/server.cpp, server-context.cpp:
    # one model per server; /props says whether it sleeps (--sleep-idle-seconds; older servers lack it).
    "llama-cpp": {
        "health": {"method": "GET", "path": "/health"},
        "paths": OPENAI_PATHS,
        "residency": {"method": "GET", "path": "/props", "where": {"is_sleeping": [False, None]}},
        "unscheduled": _calls("POST", "/tokenize", "/detokenize", "/apply-template"),
        # Stopped by its unload command, it answers nothing: a model list (what the OpenAI client and Open
        # WebUI ask first) needs it running, and running it is loading its one model.
        "start_for_unscheduled": True,
    },
    # The same server in router mode (started without a model), tools/server/server-models.cpp: GET /models
    # lists every model with status.value; /models/unload and /models/load take {"model": id}.
    "llama-cpp-router": {
        "health": {"method": "GET", "path": "/health"},
        "paths": OPENAI_PATHS,
        "unload": {
            "method": "POST",
            "path": "/models/unload",
            "body": {"model": "{id}"},
            "for_each": {
                "method": "GET",
                "path": "/models",
                "items": "data",
                "where": {"status.value": ["loaded", "loading"]},
            },
        },
        "unscheduled": _calls("POST", "/tokenize", "/detokenize", "/apply-template"),
    },
    # vLLM (commit 98473e2) vllm/entrypoints/serve/sleep/api_router.py: sleep mode, served with
    # --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1.
    "vllm": {
        "health": {"method": "GET", "path": "/health"},
        "paths": OPENAI_PATHS,
        "unload": {"method": "POST", "path": "/sleep?level=1"},
        "load": {"method": "POST", "path": "/wake_up"},
        "residency": {"method": "GET", "path": "/is_sleeping", "where": {"is_sleeping": False}},
        "unscheduled": _calls("POST", "/tokenize", "/detokenize"),
    },
    # SGLang (commit 9c0549b) python/sglang/srt/entrypoints/http_server.py: with --enable-memory-saver, and
    # where SGLang has it --enable-weights-cpu-backup (without it the weights come back undefined on resume).
    # Health asks /v1/models (the tokenizer manager answers): a newer SGLang's /health runs a one-token
    # generation (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION, default true), GPU work outside the lock.
    "sglang": {
        "health": {"method": "GET", "path": "/v1/models"},
        "paths": OPENAI_PATHS,
        "unload": {"method": "POST", "path": "/release_memory_occupation", "body": {}},
        "load": {"method": "POST", "path": "/resume_memory_occupation", "body": {}},
    },
    # Automatic1111 (commit 2fec947) and Forge (commit dfdcbab) modules/api/api.py, with --api; the web UI
    # polls POST /internal/progress (modules/progress.py).
    "a1111": {
        "health": {"method": "GET", "path": "/sdapi/v1/progress?skip_current_image=true"},
        "paths": {
            "image": {"method": "POST", "path": "/sdapi/v1/txt2img"},
            "img2img": {"method": "POST", "path": "/sdapi/v1/img2img"},
        },
        "unload": {"method": "POST", "path": "/sdapi/v1/unload-checkpoint"},
        "load": {"method": "POST", "path": "/sdapi/v1/reload-checkpoint"},
        "unscheduled": _calls(
            "POST",
            "/sdapi/v1/interrupt",
            "/sdapi/v1/skip",
            "/sdapi/v1/png-info",
            "/sdapi/v1/refresh-checkpoints",
            "/sdapi/v1/refresh-vae",
            "/internal/progress",
        ),
    },
    # speaches v0.9.0-rc.3-23 (870e1e1) src/speaches/routers/misc.py: /api/ps lists the ids of loaded models.
    "speaches": {
        "health": {"method": "GET", "path": "/health"},
        "paths": {
            "stt": {"method": "POST", "path": "/v1/audio/transcriptions"},
            "tts": {"method": "POST", "path": "/v1/audio/speech"},
        },
        "unload": {
            "method": "DELETE",
            "path": "/api/ps/{item}",
            "for_each": {"method": "GET", "path": "/api/ps", "items": "models"},
        },
        "unscheduled": _calls("POST", "/v1/models/*") + _calls("DELETE", "/v1/models/*"),
    },
    # tabbyAPI (e632af4) endpoints/core/router.py, endpoints/OAI/router.py: its unload needs the admin key
    # (the broker sends none: run it with disable_auth), its load the model's name (write it yourself).
    "tabbyapi": {
        "health": {"method": "GET", "path": "/health"},
        "paths": OPENAI_PATHS,
        "unload": {"method": "POST", "path": "/v1/model/unload"},
        "unscheduled": _calls("POST", "/v1/token/encode", "/v1/token/decode"),
    },
    # LocalAI v4.9.0-22 (82c191a) core/http/routes/{openai,localai,health}.go, endpoints/localai/system.go
    # and backend_monitor.go: /system lists the loaded models, /backend/shutdown stops one.
    "localai": {
        "health": {"method": "GET", "path": "/readyz"},
        "paths": {
            **OPENAI_PATHS,
            "stt": {"method": "POST", "path": "/v1/audio/transcriptions"},
            "tts": {"method": "POST", "path": "/v1/audio/speech"},
            "image": {"method": "POST", "path": "/v1/images/generations"},
        },
        "unload": {
            "method": "POST",
            "path": "/backend/shutdown",
            "body": {"model": "{id}"},
            "for_each": {"method": "GET", "path": "/system", "items": "loaded_models"},
        },
    },
}


# ---- where a URL leads: usable by the HTTP client, and not back to the broker --------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Where a connection to an unspecified address (0.0.0.0, ::) goes on Linux.
LOOPBACK = {4: ipaddress.IPv4Address("127.0.0.1"), 6: ipaddress.IPv6Address("::1")}
#: A label of a host name as the HTTP client looks it up (after IDNA); '_' for names such as Docker's.
_HOST_LABEL = re.compile(r"^[a-z0-9_-]{1,63}$")
#: A label that makes a host an IPv4 address to resolvers and browsers ("ends in a number": 1, 0x7f).
_NUMBER_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
#: Consumer URL host names on a listener's port are resolved, to tell whether they lead back to the broker,
#: all at once within this; a name not resolved in time is not checked (DNS down at boot stops nothing).
RESOLVE_TIMEOUT_S = 2.0


def url_problem(url: str) -> str | None:
    """Why a consumer URL is refused (one line, never echoing a password), or None: it must be an http(s)
    URL with a host and port the HTTP client can connect to, without credentials, query or fragment."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # "Invalid IPv6 URL": a '[' without its ']', or text after it
        return f"must be an http(s) URL the HTTP client can use, not {_shown(url)} ({e})"
    if "@" in parts.netloc:
        # Never echoed: it holds a password. /v1/status shows every URL to anyone who may ask.
        return "must not carry a user or password (user:password@host): it is shown"
    if parts.query or parts.fragment:
        return "must not carry a query string or fragment"
    try:
        url_host(url)
    except ValueError as e:
        return str(e)
    return None


def _shown(url: str) -> str:
    return repr(url) if "@" not in url else "this one (not shown: it has an '@')"


#: A bracketed host as the whole of a URL's host and port: ``[::1]``, ``[::1]:8188``.
_BRACKETED = re.compile(r"\[[^\[\]]*\](?::[0-9]*)?")


def url_host(url: str) -> tuple[Address | str, int]:
    """Where a consumer URL leads the HTTP client: an address, or a host name (lower case, IDNA, without a
    trailing '.'), and the port. ValueError (its message a refusal) when the client could not use it: a
    numeric host that is not four decimal numbers (``127.1``, ``2130706433``, ``0x7f.1``: aiohttp refuses
    them, older resolvers read them as 127.0.0.1), brackets without an IPv6 address, an empty or odd label
    (``a..b``), a name IDNA cannot encode, port 0."""
    shown = _shown(url)
    try:
        parts = urlsplit(url)
        port = parts.port
        host = URL(url).raw_host  # yarl's reading is what aiohttp connects to
    except ValueError as e:  # UnicodeError (IDNA) too
        raise ValueError(f"must be an http(s) URL the HTTP client can use, not {shown} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not host:
        raise ValueError(f"must be an http(s) URL with a host, not {shown}")
    hostport = parts.netloc.rpartition("@")[2]
    if hostport.startswith("[") and not _BRACKETED.fullmatch(hostport):
        # Text between ']' and the port: an older yarl (Debian 13's 1.19) drops it, a newer one refuses it.
        raise ValueError(f"must be an http(s) URL the HTTP client can use, not {shown} (Invalid IPv6 URL)")
    if port == 0:
        raise ValueError(f"port 0 is no port to connect to: {shown}")
    port = port or (443 if parts.scheme == "https" else 80)
    if hostport.startswith("["):
        if "%" in host:  # aiohttp hands "fe80::1%25eth0" to the resolver as it is: never found
            raise ValueError(f"an IPv6 zone ('%25...') cannot be used by the HTTP client: {shown}")
        try:
            return ipaddress.IPv6Address(host), port
        except ValueError:
            raise ValueError(f"must hold an IPv6 address between '[' and ']', not {shown}") from None
    name = host.lower()
    labels = name.removesuffix(".").split(".")
    if _NUMBER_LABEL.match(labels[-1]):
        try:
            return ipaddress.IPv4Address(name), port
        except ValueError:
            raise ValueError(
                f"{host!r} is an IPv4 address only as four decimal numbers (127.0.0.1): the HTTP client"
                " refuses other spellings"
            ) from None
    if len(name) > 254 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(
            f"{host!r} is no host name (labels of letters, digits, '-' and '_', joined by single dots)"
        )
    return name.removesuffix("."), port


def is_localhost(name: str) -> bool:
    """``localhost`` and names below it: the machine itself, whatever a resolver says (RFC 6761)."""
    return name == "localhost" or name.endswith(".localhost")


def listen_addresses(host: str) -> list[Address] | str:
    """The addresses a listener on ``host`` binds, without resolving: an address (an old numeric spelling
    too, which the resolver reads as one), loopback for localhost; else the name itself."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    if is_localhost(host.lower().removesuffix(".")):
        return list(LOOPBACK.values())
    with contextlib.suppress(OSError, UnicodeError):
        if host and all(c in "0123456789abcdefxABCDEFX." for c in host):
            return [ipaddress.IPv4Address(socket.inet_aton(host))]  # "0" binds 0.0.0.0
    return host.lower().removesuffix(".")


def resolve(names: Iterable[str], timeout_s: float) -> dict[str, frozenset[Address]]:
    """Each name's addresses as the system resolver gives them, all looked up at once, within ``timeout_s``
    in all; a name that fails or takes longer has none. The threads are daemons: a hung resolver keeps no
    process from exiting (``--check`` on a dead network answers in time), and a reload's thread is bounded."""
    found: dict[str, frozenset[Address]] = {}

    def look_up(name: str) -> None:
        try:
            infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
            found[name] = frozenset(ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos)
        except (OSError, ValueError):  # UnicodeError too
            pass

    names = sorted(set(names))
    threads = [threading.Thread(target=look_up, args=(n,), name="resolve", daemon=True) for n in names]
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {name: found.get(name, frozenset()) for name in names}


@functools.cache
def machine_names() -> frozenset[str]:
    """This machine's host name and fully qualified name, in lower case; looked up once, within
    RESOLVE_TIMEOUT_S (the FQDN is the resolver's to say), in a daemon thread like ``resolve``'s."""
    found = [socket.gethostname()]
    thread = threading.Thread(target=lambda: found.append(socket.getfqdn()), name="resolve", daemon=True)
    thread.start()
    thread.join(RESOLVE_TIMEOUT_S)
    return frozenset(host_key(name) for name in list(found) if name)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def host_key(host: str) -> str:
    """A host as the broker compares names: lower case, without brackets or a trailing '.', an address in
    its canonical form (an IPv4-mapped one as its IPv4 address)."""
    name = host.strip().strip("[]").lower().removesuffix(".")
    try:
        return str(_unmapped(ipaddress.ip_address(name)))
    except ValueError:
        return name


def own_addresses() -> frozenset[Address]:
    """The addresses of this machine's interfaces: the local ones of /proc/net/fib_trie (IPv4) and those of
    /proc/net/if_inet6 (Linux); none where they cannot be read."""
    own: set[Address] = set()
    with contextlib.suppress(OSError), open("/proc/net/fib_trie", encoding="ascii", errors="replace") as file:
        last = ""
        for line in itertools.islice(file, 200_000):  # (a full routing table is no home server's)
            if "|--" in line:
                last = line.split("|--")[1].strip()
            elif "/32 host LOCAL" in line:
                with contextlib.suppress(ValueError):
                    own.add(ipaddress.IPv4Address(last))
    with contextlib.suppress(OSError), open("/proc/net/if_inet6", encoding="ascii", errors="replace") as file:
        for line in itertools.islice(file, 10_000):
            with contextlib.suppress(ValueError, IndexError):
                own.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    return frozenset(own)


def _unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is the IPv4 address it carries."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def reaches(to: Address, listener: Address, own: Callable[[], frozenset[Address]]) -> bool:
    """Whether a connection to ``to`` arrives at a listener bound to ``listener`` on this machine. A
    listener on every address (0.0.0.0, ::) takes any loopback or own address of either family (whether
    it is dual-stack is the system's business); an unspecified destination is loopback (Linux)."""
    to, listener = _unmapped(to), _unmapped(listener)
    if listener.is_unspecified:
        return to.is_loopback or to.is_unspecified or to in own()
    if to.is_unspecified:
        to = LOOPBACK[to.version]
    return to == listener


def loop_problems(
    urls: Mapping[str, str], listeners: Sequence[tuple[tuple[str, int], str]]
) -> dict[str, str]:
    """Consumer -> why its URL leads back to one of the broker's listeners (``((host, port), key)``): the
    same port, and an address (literal, localhost, or what its name resolves to) that connects to the
    listener's. Only names on a listener's port are resolved."""
    ports = {port for (_, port), _ in listeners if port}
    targets: dict[str, tuple[Address | str, int]] = {}
    for name, url in urls.items():
        with contextlib.suppress(ValueError):  # an unusable URL is a problem of its own, already said
            host, port = url_host(url)
            if port in ports:
                targets[name] = (host, port)
    if not targets:
        return {}
    bound = {(h, p): listen_addresses(h) for (h, p), _ in listeners if p in {p for _, p in targets.values()}}
    names = {h for h, _ in targets.values() if isinstance(h, str) and not is_localhost(h)}
    names |= {a for a in bound.values() if isinstance(a, str)}
    resolved = resolve(names, RESOLVE_TIMEOUT_S) if names else {}
    own = functools.cache(own_addresses)
    found: dict[str, str] = {}
    for name, (host, port) in targets.items():
        if isinstance(host, str):
            addresses = list(LOOPBACK.values()) if is_localhost(host) else sorted(resolved[host], key=str)
        else:
            addresses = [host]
        for (listen_host, listen_port), key in listeners:
            if listen_port != port:
                continue
            listening = bound[(listen_host, listen_port)]
            if isinstance(listening, str) and host == listening:  # the same name (resolved or not)
                hit: Address | None = None
            else:
                if isinstance(listening, str):
                    listening = sorted(resolved[listening], key=str)
                hit = next((a for a in addresses for b in listening if reaches(a, b, own)), None)
                if hit is None:
                    continue
            via = (
                f"; {host} is {hit}"
                if isinstance(host, str) and hit is not None and not is_localhost(host)
                else ""
            )
            found[name] = (
                f"is {key}'s own address ({listen_host}:{listen_port}{via}): its requests would come back to"
                " the broker"
            )
            break
    return found


def _parse_consumer(ck: _Checker, name: str, raw: Any, default_gpu: int) -> ConsumerConfig | None:
    where = f"consumers.{name}"
    raw, preset, from_preset = _apply_preset(ck, raw, where)
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
        "processes",
        "max_unscheduled",
        "max_websockets",
        "residency",
        "listen",
        "start_for_unscheduled",
        "preset",
    )
    d = ck.mapping(raw, where, allowed, required=True)
    if not d:
        return None
    url = ck.string(d, "url", where)
    if url and (why := url_problem(url)) is not None:
        ck.problem(f"{where}.url", why)
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
    unload = _parse_action(ck, d["unload"], f"{where}.unload", for_each=True) if "unload" in d else None
    load = _parse_action(ck, d["load"], f"{where}.load") if "load" in d else None
    if isinstance(unload, Command) and not isinstance(load, Command):
        # Stopped by a command, nothing would ever start it again: every job would find it down.
        ck.problem(f"{where}.load", "a consumer unloaded by a command needs a load command to start it again")
    idle_unload_s = ck.number(d, "idle_unload_s", where, 0.0, integer=False, zero_ok=True)
    if idle_unload_s and "unload" not in d:
        ck.problem(f"{where}.idle_unload_s", "needs an unload route or command")
    if idle_unload_s and vram_managed is True:
        ck.problem(f"{where}.idle_unload_s", "a vram_managed consumer unloads itself (Ollama's keep_alive)")
    start_for_unscheduled = d.get("start_for_unscheduled", False)
    if not isinstance(start_for_unscheduled, bool):
        ck.problem(f"{where}.start_for_unscheduled", f"must be true or false, not {start_for_unscheduled!r}")
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
        processes=_parse_processes(ck, d["processes"], where) if "processes" in d else None,
        max_unscheduled=ck.number(d, "max_unscheduled", where, 32, integer=True),
        max_websockets=ck.number(d, "max_websockets", where, 32, integer=True),
        residency=_parse_query(ck, d["residency"], f"{where}.residency", list_only=False)
        if "residency" in d
        else None,
        listen=_parse_listen(ck, d["listen"], f"{where}.listen") if "listen" in d else None,
        start_for_unscheduled=start_for_unscheduled is True,
        preset=preset,
        from_preset=from_preset,
    )


def _parse_processes(ck: _Checker, raw: Any, where: str) -> ProcessMatch | None:
    """``processes: {unit: comfyui.service, name: "*/python3*"}``: at least one key, shell patterns."""
    where = f"{where}.processes"
    d = ck.mapping(raw, where, ("unit", "name"), required=True)
    if not d:
        if isinstance(raw, dict):
            ck.problem(where, "give unit, name or both")
        return None
    unit = ck.string(d, "unit", where, None) if "unit" in d else None
    name = ck.string(d, "name", where, None) if "name" in d else None
    return ProcessMatch(unit=unit or None, name=name or None)


def _apply_preset(ck: _Checker, raw: Any, where: str) -> tuple[Any, str | None, tuple[str, ...]]:
    """A consumer's raw config with its ``preset`` filled in, what it writes itself winning; the preset's
    name and the keys it filled in.

    A key written beside the preset replaces the preset's whole (``null`` removes it), except ``paths``,
    merged kind by kind (a kind set to ``null`` is removed).
    """
    if not isinstance(raw, dict) or "preset" not in raw:
        return raw, None, ()
    name, own = raw["preset"], {k: v for k, v in raw.items() if k != "preset"}
    if not isinstance(name, str) or name not in PRESETS:
        ck.problem(f"{where}.preset", f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return own, None, ()
    preset = copy.deepcopy(PRESETS[name])
    merged = dict(preset)
    for key, value in own.items():
        if key == "paths" and isinstance(value, dict):
            kinds = {**preset.get("paths", {}), **value}
            merged["paths"] = {kind: spec for kind, spec in kinds.items() if spec is not None}
        elif value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    own_paths = own.get("paths", {}) if isinstance(own.get("paths", {}), dict) else None
    filled = []
    for key in preset:
        if key == "paths" and own_paths is not None:
            filled += [f"paths.{kind}" for kind in preset["paths"] if kind not in own_paths]
        elif key not in own:
            filled.append(key)
    return merged, name, tuple(filled)


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


def _parse_token(ck: _Checker, d: dict, where: str) -> str | None:
    """``token``, or ``token_file`` (read now, so a secret can live outside the config), under ``where``;
    None when neither is set or it is unusable (reported). Never echoed in a message."""
    if "token" in d and "token_file" in d:
        ck.problem(where, "set token or token_file, not both")
        return None
    token = None
    if "token" in d:
        token = d["token"] if isinstance(d["token"], str) else ""
        if not token:
            ck.problem(f"{where}.token", "must be a non-empty string")
            return None
    elif "token_file" in d:
        path = ck.string(d, "token_file", where)
        try:
            token = read_token_file(path) if path else ""
        except OSError as e:
            ck.problem(f"{where}.token_file", f"cannot read {token_path_shown(path)}: {e.strerror or e}")
            return None
        except ValueError as e:
            ck.problem(f"{where}.token_file", f"{token_path_shown(path)} {e}")
            return None
    if token is not None and (len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token):
        key = f"{where}.token" if "token" in d else f"{where}.token_file"
        ck.problem(key, f"the token must be at least {MIN_TOKEN_LENGTH} printable characters, without spaces")
        return None
    return token or None


def _token_key(d: dict, where: str) -> str:
    """The key a token was given under: ``where.token`` or ``where.token_file``."""
    return f"{where}.token" if "token" in d else f"{where}.token_file"


def name_problem(name: Any) -> str | None:
    """Why ``name`` may not name a consumer or a client (CONSUMER_NAME_RE, MAX_NAME_CHARS), or None."""
    if not isinstance(name, str) or not CONSUMER_NAME_RE.match(name):
        return "names are letters, digits, '_', '.', '-'"
    if len(name) > MAX_NAME_CHARS:
        return f"names are at most {MAX_NAME_CHARS} characters"
    return None


def _parse_auth(ck: _Checker, raw: Any) -> AuthConfig:
    """The admin's auth.token (or auth.token_file), and the clients' (auth.clients), each of their own."""
    d = ck.mapping(raw, "auth", ("token", "token_file", "clients"))
    token = _parse_token(ck, d, "auth")
    raw_clients = ck.mapping(d.get("clients"), "auth.clients", None)
    clients: dict[str, ClientConfig] = {}
    #: Each token seen, and the key it was given under (to name both keys of a token given twice).
    seen: list[tuple[str, str]] = [] if token is None else [(token, f"{_token_key(d, 'auth')} (the admin's)")]
    for name, spec in raw_clients.items():
        where = f"auth.clients.{name}"
        if (problem := name_problem(name)) is not None:
            ck.problem(where, f"client {problem}")
            continue
        c = ck.mapping(spec, where, ("token", "token_file", "priority", "max_queued"), required=True)
        if not isinstance(spec, dict):
            continue  # (reported)
        if "token" not in c and "token_file" not in c:
            ck.problem(where, "needs its token or token_file")
            continue
        client_token = _parse_token(ck, c, where)
        priority = c.get("priority")
        if priority is not None and (
            isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= PRIORITY_MAX
        ):
            ck.problem(f"{where}.priority", f"must be an integer from 0 to {PRIORITY_MAX}, not {priority!r}")
            priority = None
        max_queued = ck.number(c, "max_queued", where, None, integer=True) if "max_queued" in c else None
        if client_token is None:
            continue
        key = _token_key(c, where)
        # Constant time each, and never the token in the message: only the keys that hold it.
        same = next(
            (other for t, other in seen if hmac.compare_digest(t.encode(), client_token.encode())), None
        )
        if same is not None:
            ck.problem(key, f"the same token as {same}: each client needs a token of its own")
            continue
        seen.append((client_token, key))
        clients[name] = ClientConfig(name, client_token, priority, max_queued)
    if raw_clients and token is None and "token" not in d and "token_file" not in d:
        ck.problem(
            "auth.clients",
            "needs the admin's auth.token or auth.token_file: once clients are configured, the admin routes"
            " (unload, load, reload, reserve) answer the admin's token alone",
        )
    return AuthConfig(token=token, clients=clients)


def _parse_http(ck: _Checker, raw: Any) -> HttpConfig:
    """``http: {header_timeout_s, keepalive_s, hosts: [names]}``."""
    d = ck.mapping(raw, "http", ("header_timeout_s", "keepalive_s", "hosts"))
    hosts = d.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        ck.problem("http.hosts", f"must be a list of host names or addresses, not {hosts!r}")
        hosts = []
    for i, h in enumerate(hosts):
        # A name or an address as a browser's Host gives it, without scheme or port (any port is ours).
        if any(c in h.strip() for c in "/@ ") or (":" in host_key(h) and not _is_ipv6(host_key(h))):
            ck.problem(
                f"http.hosts[{i}]", f"must be a host name or address, without scheme or port, not {h!r}"
            )
    return HttpConfig(
        header_timeout_s=ck.number(d, "header_timeout_s", "http", 10.0, integer=False),
        keepalive_s=ck.number(d, "keepalive_s", "http", 75.0, integer=False),
        hosts=tuple(host_key(h) for h in hosts),
    )


def _parse_listen(ck: _Checker, value: Any, where: str = "listen") -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535 or not _bindable(host):
        ck.problem(where, f"must be HOST:PORT, not {value!r}")
        return "127.0.0.1", 8770
    return host.strip("[]") or "0.0.0.0", int(port)


def _bindable(host: str) -> bool:
    """Whether a listen's HOST can be what a listener binds: none (every address), an address (an IPv6 one
    between brackets, or bare), or a host name; not a URL or a typo (``http://...``, ``[::1``, a space),
    which passed ``--check`` and then stopped the broker at start-up with exit 1 (restarted for ever)."""
    if not host:
        return True
    if host.startswith("[") or host.endswith("]"):
        return host.startswith("[") and host.endswith("]") and _is_ipv6(host[1:-1])
    if _is_ipv6(host):
        return True
    labels = host.lower().removesuffix(".").split(".")
    return len(host) <= 254 and all(_HOST_LABEL.match(label) for label in labels)


def parse_config(raw: Any) -> Config:
    """Validate a config as loaded from YAML; raise ConfigError naming every problem."""
    ck = _Checker()
    top = ck.mapping(
        raw,
        "config",
        (
            "listen",
            "gpu",
            "scheduler",
            "health",
            "routing",
            "audio_proxy",
            "consumers",
            "auth",
            "http",
            "state_file",
        ),
        required=True,
    )
    host, port = _parse_listen(ck, top.get("listen", "0.0.0.0:8770"))

    g = ck.mapping(
        top.get("gpu"),
        "gpu",
        ("nvidia_smi", "index", "cushion_mib", "query_timeout_s", "max_output_mib", "reader", "yield"),
    )
    reader = g.get("reader", "auto")
    if reader not in GPU_READERS:
        ck.problem("gpu.reader", f"must be one of {', '.join(GPU_READERS)}, not {reader!r}")
        reader = "auto"
    smi = g.get("nvidia_smi", "nvidia-smi")
    argv: tuple[str, ...] = ()
    if isinstance(smi, str) and smi.strip() and "\0" not in smi:
        try:
            argv = tuple(shlex.split(smi))
        except ValueError as e:
            ck.problem("gpu.nvidia_smi", f"cannot split {smi!r} like a shell would: {e}")
    elif isinstance(smi, list) and smi and all(_argument(a) for a in smi):
        argv = tuple(smi)
    else:
        ck.problem("gpu.nvidia_smi", f"must be a command (a string or a list of strings), not {smi!r}")
    gpu = GpuConfig(
        nvidia_smi=argv,
        index=ck.number(g, "index", "gpu", 0, integer=True, zero_ok=True),
        cushion_mib=ck.number(g, "cushion_mib", "gpu", 256, integer=True, zero_ok=True),
        query_timeout_s=ck.number(g, "query_timeout_s", "gpu", 5.0, integer=False),
        max_output_mib=ck.number(g, "max_output_mib", "gpu", 8, integer=True),
        reader=reader,
        yield_=_parse_yield(ck, g.get("yield")),
    )

    fields = SchedulerConfig.__dataclass_fields__
    s = ck.mapping(top.get("scheduler"), "scheduler", list(fields))
    scheduler = SchedulerConfig(
        **{
            name: ck.number(
                s,
                name,
                "scheduler",
                f.default,
                integer=isinstance(f.default, int),
                zero_ok=name in ZERO_OK_SCHEDULER,
            )
            for name, f in fields.items()
        }
    )
    if scheduler.max_bodies_mib < scheduler.max_body_mib:
        ck.problem(
            "scheduler.max_bodies_mib",
            f"must be at least max_body_mib ({scheduler.max_body_mib}): so large a body could never be read",
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
        if (problem := name_problem(name)) is not None:
            ck.problem(f"consumers.{name}", problem)
            continue
        if name == RESERVATION:
            ck.problem(f"consumers.{name}", f"{name!r} is reserved (the GPU's reservation)")
            continue
        parsed = _parse_consumer(ck, name, spec, gpu.index)
        if parsed is not None:
            consumers[name] = parsed

    # Every port is one listener's: the broker's own and each consumer's (0: any free port).
    ports = {port: "listen"} if port else {}
    for name, c in consumers.items():
        if c.listen is not None and c.listen[1]:
            if c.listen[1] in ports:
                ck.problem(
                    f"consumers.{name}.listen", f"port {c.listen[1]} is {ports[c.listen[1]]}'s already"
                )
            ports.setdefault(c.listen[1], f"consumers.{name}.listen")
    # A consumer URL on one of those listeners is the broker itself: its requests would come back to it.
    listeners = [((host, port), "listen")]
    listeners += [(c.listen, f"consumers.{name}.listen") for name, c in consumers.items() if c.listen]
    for name, why in loop_problems({name: c.url for name, c in consumers.items()}, listeners).items():
        ck.problem(f"consumers.{name}.url", why)

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

    if gpu.yield_ is not None:
        # Unclaimed memory is what the consumers' processes do not hold: a consumer not measured would be
        # a stranger to itself.
        for name, c in consumers.items():
            if c.processes is None and c.vram_resident_mib:
                ck.problem(
                    f"consumers.{name}.processes",
                    "required with gpu.yield (or vram_resident_mib: 0): without it, the memory"
                    f" {name} holds would look like a stranger's",
                )
    state_file = top.get("state_file")
    if state_file is not None and (
        not isinstance(state_file, str) or not state_file.strip() or "\0" in state_file
    ):
        ck.problem("state_file", f"must be a path (a non-empty string), not {state_file!r}")
        state_file = None

    auth = _parse_auth(ck, top.get("auth"))
    http = _parse_http(ck, top.get("http"))

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
        http=http,
        state_file=state_file,
    )


def _parse_yield(ck: _Checker, raw: Any) -> YieldConfig | None:
    """``gpu.yield``: absent or null, off; a mapping (``{}``: the defaults), on."""
    if raw is None:
        return None
    known = YieldConfig.__dataclass_fields__
    d = ck.mapping(raw, "gpu.yield", list(known))
    if not isinstance(raw, dict):
        return None
    zero_ok = ("ignore_mib", "restore_after_s")
    y = YieldConfig(
        **{
            name: ck.number(
                d, name, "gpu.yield", f.default, integer=isinstance(f.default, int), zero_ok=name in zero_ok
            )
            for name, f in known.items()
        }
    )
    if isinstance(y.poll_s, (int, float)) and 0 < y.poll_s < MIN_YIELD_POLL_S:
        ck.problem("gpu.yield.poll_s", f"must be at least {MIN_YIELD_POLL_S:g} s, not {y.poll_s!r}")
    return y


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (the pure-Python one: LibYAML's crashes on deep nesting), refusing duplicate keys,
    recursive aliases and documents that their aliases expand beyond MAX_CONFIG_EXPANSION."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            check_nodes(node)
        return node


def check_nodes(root: yaml.Node) -> None:
    """Walk the composed document once per node (iteratively, whatever its depth): a mapping that repeats
    a key (YAML would keep the last one silently), an alias inside its own anchor, or a document whose
    nodes and scalar characters, every alias expanded, exceed MAX_CONFIG_EXPANSION, is a ComposerError."""
    expanded: dict[int, int] = {}  # id(node) -> its size with every alias expanded
    open_nodes: set[int] = set()  # the nodes whose children are being walked: an alias to one is a loop
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        if children_done:
            open_nodes.discard(id(node))
            size = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
            size += sum(expanded[id(child)] for child in children)
            if size > MAX_CONFIG_EXPANSION:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"its aliases expand it beyond {MAX_CONFIG_EXPANSION} nodes and characters",
                    node.start_mark,
                )
            expanded[id(node)] = size
            continue
        if id(node) in expanded:
            continue
        if id(node) in open_nodes:
            raise yaml.composer.ComposerError(
                None, None, "found an alias inside its own anchor", node.start_mark
            )
        if isinstance(node, yaml.MappingNode):
            seen: set[tuple[str, str]] = set()
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in seen:
                        raise yaml.composer.ComposerError(
                            None, None, f"found a duplicate key {key.value!r}", key.start_mark
                        )
                    seen.add((key.tag, key.value))
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in expanded)


def read_config(path: str | Path) -> Any:
    """The YAML document in ``path`` (at most MAX_CONFIG_BYTES); every failure is a one-line ConfigError.

    Its problems do not name the file: whoever shows them does, once (``--check``'s ``FILE: problem``, the
    reload's log line), as for a key's problem."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"cannot read it: {e.strerror or e}"]) from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"larger than {MAX_CONFIG_BYTES} bytes: not read (is it the config?)"])
    try:
        return yaml.load(data, Loader=ConfigLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        # Where, but not the line itself: it may hold a secret.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if mark is None and isinstance(getattr(e, "position", None), int):
            where = f" at byte {e.position}"  # type: ignore[attr-defined] (a ReaderError: not UTF-8, say)
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or "syntax error"
        raise ConfigError([f"not valid YAML{where}: {problem}"]) from e
    except RecursionError as e:
        raise ConfigError(["not valid YAML: nested too deeply"]) from e
    except Exception as e:  # a value PyYAML cannot build (a 5,000-digit number, February 30th, ...)
        raise ConfigError([f"not valid YAML: {type(e).__name__}: {str(e)[:200]}"]) from e


def load_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate a YAML config; ``overrides`` maps dotted keys (``gpu.nvidia_smi``) to values."""
    raw = read_config(path)
    for dotted, value in (overrides or {}).items():
        if not isinstance(raw, dict):
            break
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node[leaf] = value
    return parse_config(raw)


def same_service(config: Config, target: ConsumerConfig) -> bool:
    """Whether ``target`` (the config a job or call was made with) is still the service its consumer is in
    ``config``: a reload that gave the consumer another URL (or GPU) made it a new service, whose state
    starts afresh, and what a call to the old one found (an answer, a refusal) is none of the new one's."""
    c = config.consumers.get(target.name)
    return c is not None and c.url == target.url and c.gpu == target.gpu


def gpu_indexes(config: Config) -> list[int]:
    """The GPUs the broker schedules: the default one and every one a consumer names."""
    return sorted({config.gpu.index, *(c.gpu for c in config.consumers.values())})


def describe_action(action: Route | Command) -> str:
    """``POST /api/admin/unload`` or ``command: systemctl stop whisper-server``, for people."""
    if isinstance(action, Command):
        return f"command: {shlex.join(action.argv)}"
    if action.for_each is not None:
        return f"{action.method} {action.path} for each of {describe_query(action.for_each)}"
    return f"{action.method} {action.path}"


def describe_query(query: JsonQuery) -> str:
    """``GET /api/ps models`` or ``GET /is_sleeping where is_sleeping=false``, for people."""
    where = " and ".join(f"{name}={'|'.join(json.dumps(v) for v in values)}" for name, values in query.where)
    return (
        f"{query.method} {query.path}"
        + (f" {query.items}" if query.items else "")
        + (f" where {where}" if where else "")
    )


def describe_preset(c: ConsumerConfig) -> str:
    """``preset comfyui: health GET /system_stats, paths image, image_ui, ...``: what the preset filled in,
    and the keys of the preset's that the consumer writes itself."""
    filled = set(c.from_preset)
    parts = []
    kinds = [key.removeprefix("paths.") for key in c.from_preset if key.startswith("paths.")]
    for key in (*PRESETS[c.preset or ""], "paths"):
        if key == "paths" and kinds:
            parts.append("paths " + ", ".join(kinds))
            kinds = []
        elif key not in filled:
            continue
        elif key == "health":
            parts.append(f"health {c.health.method} {c.health.path}")
        elif key in ("unload", "load") and getattr(c, key) is not None:
            parts.append(f"{key} {describe_action(getattr(c, key))}")
        elif key == "residency" and c.residency is not None:
            parts.append(f"residency {describe_query(c.residency)}")
        elif key == "unscheduled":
            parts.append(f"{len(c.unscheduled)} unscheduled")
        else:
            parts.append(key)
    preset = PRESETS.get(c.preset or "", {})
    own = [key for key in preset if key != "paths" and key not in filled]
    own += [f"paths.{kind}" for kind in preset.get("paths", {}) if f"paths.{kind}" not in filled]
    return f"preset {c.preset}: " + ", ".join(parts) + (f" (yours: {', '.join(own)})" if own else "")


def missing_programs(config: Config) -> list[str]:
    """Load and unload commands whose program this process cannot find on its ``PATH`` or run: each would
    fail every time it runs (``load_failed``: retryable, as the code always is). Not a problem of the config
    (the program may be installed later): ``--check`` notes them, a start or reload warns of them."""
    missing = []
    for c in config.consumers.values():
        for what, action in (("unload", c.unload), ("load", c.load)):
            if isinstance(action, Command) and shutil.which(action.argv[0]) is None:
                missing.append(f"{c.name}'s {what} command: no program {action.argv[0]!r} to run")
    return missing


def warn_missing_programs(config: Config) -> None:
    for problem in missing_programs(config):
        log.warning(logfmt(msg="command cannot run", problem=problem))


def summary(config: Config) -> str:
    """The one-screen overview that ``--check`` prints."""
    lines = [f"listen {config.listen_host}:{config.listen_port}", ""]
    several = len(gpu_indexes(config)) > 1
    lines.append(f"{'consumer':<12} {'vram MiB':>9} {'prio':>4} {'conc':>4}  eviction")
    for c in config.consumers.values():
        if c.unload is None:
            how = "never (vram_managed)" if c.vram_managed else "never (no unload route)"
        else:
            how = describe_action(c.unload) + (f", load {describe_action(c.load)}" if c.load else "")
            if c.vram_managed:
                how = "last resort (vram_managed): " + how
        if c.processes is not None:
            keys = [f"{k} {v}" for k, v in (("unit", c.processes.unit), ("name", c.processes.name)) if v]
            how += f"; measured: {', '.join(keys)}"
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
        lines.append(f"  GET  /audio/*     -> {config.audio_proxy} GET /audio/*")
    pairs = sorted(
        {tuple(sorted((c.name, o))) for c in config.consumers.values() for o in c.can_coexist_with}
    )
    lines += ["", "may coexist: " + (", ".join(f"{a}+{b}" for a, b in pairs) if pairs else "(none)")]
    presets = [f"  {c.name:<10} {describe_preset(c)}" for c in config.consumers.values() if c.preset]
    if presets:
        lines += ["", "presets:", *presets]
    ports = [
        f"  {c.listen[0]}:{c.listen[1]} -> {c.name} (as /c/{c.name}/)"
        for c in config.consumers.values()
        if c.listen is not None
    ]
    if ports:
        lines += ["", "consumer ports:", *ports]
    for problem in missing_programs(config):
        lines += ["", f"note: {problem} (as this user and PATH see it; the unit's may differ)"]
    if (old := old_aiohttp()) is not None:
        lines += ["", f"note: {old}"]
    stop = config.scheduler.shutdown_timeout_s + 2 * SHUTDOWN_GRACE_S + STATE_IO_TIMEOUT_S
    if stop > UNIT_STOP_S:  # (the drain, the other answers' two graces, the state file's last write)
        lines += [
            "",
            f"note: a stop may take {stop:g} s, more than the unit's TimeoutStopSec={UNIT_STOP_S:g},"
            " after which systemd kills the broker: raise it (systemctl edit mgpumanager)",
        ]
    y = config.gpu.yield_
    if y is not None:
        lines += [
            "",
            f"yield: {y.keep_free_mib} MiB kept free for strangers (unclaimed beyond {y.ignore_mib} MiB),"
            f" read every {y.poll_s:g} s, restore after {y.restore_after_s:g} s",
        ]
    if config.state_file is not None:
        lines += ["", f"state file: {config.state_file}"]
    if config.auth.clients:
        lines += ["", "clients (each with a token of its own; the admin's opens the admin routes):"]
        for c in config.auth.clients.values():
            priority = "the consumer's priority" if c.priority is None else f"priority {c.priority}"
            queued = "" if c.max_queued is None else f", at most {c.max_queued} queued per GPU"
            lines.append(f"  {c.name:<12} {priority}{queued}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ConfigSource:
    """Where the config comes from, so that a reload reads it the same way: the file and the CLI overrides."""

    path: Path
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        return load_config(self.path, overrides=self.overrides)


class Shared:
    """What every part of the broker reads, and counts, in one place: the config in force (a reload swaps it
    here, once; each part's next decision uses it), the bugs caught anywhere, counted once, and the jobs'
    ids."""

    def __init__(self, config: Config) -> None:
        self.config = config
        #: Bugs in the broker caught anywhere (schedulers, handlers, health rounds, GPU reads, reloads), each
        #: logged with its traceback: the one figure /v1/status, /metrics and the dashboard show.
        self.internal_errors = 0
        #: Job ids, one sequence for every GPU: a job's id names it alone in the log lines and events.
        self.job_ids = itertools.count(1)
        #: The wall-clock time of a monotonic moment, for people and the state file.
        self.wall = WallClock()

    def internal_error(self, msg: str, exc: BaseException | None = None, **fields: Any) -> None:
        """A bug in the broker, caught: counted, and logged with its traceback (``exc``'s, else the one
        being handled)."""
        self.internal_errors += 1
        log.error(logfmt(msg=msg, **fields), exc_info=exc if exc is not None else True)


def boot_clock() -> float:
    """Seconds since boot, time asleep included (Linux's CLOCK_BOOTTIME), where the monotonic clock stands
    still while the machine is suspended; the monotonic clock where there is none, or it cannot be read
    (the health loop reads it: an error there would end it for good; a round then seen late costs a
    reading)."""
    clock_id = getattr(time, "CLOCK_BOOTTIME", None)
    try:
        return time.clock_gettime(clock_id) if clock_id is not None else time.monotonic()
    except OSError:
        return time.monotonic()


class WallClock:
    """The wall-clock time of a moment on the monotonic clock (a last use, a reservation's end), for people
    and the state file. The broker keeps its times on the monotonic clock, which no one sets; a moment's
    wall-clock time is its distance from now on the wall clock of now, so a wall clock stepped while the
    broker runs (NTP correcting a clock a bad RTC left hours off, a change by hand) moves no reservation's
    end and no last use's age, in the file or on the page. The offset between the clocks is taken anew only
    when the wall clock moved against the monotonic one by more than WALL_STEP_S: a clock NTP slews does not
    change what the file says, and so does not make it written again."""

    def __init__(
        self, monotonic: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> None:
        self.monotonic, self.wall = monotonic, wall
        self.offset: float | None = None

    def at(self, moment: float) -> float:
        offset = self.wall() - self.monotonic()
        if self.offset is None or abs(offset - self.offset) > WALL_STEP_S:
            self.offset = offset
        return moment + self.offset

    def now(self) -> float:
        return self.at(self.monotonic())


# =====================================================================================================
# Failures and log lines
# =====================================================================================================


def out_of_descriptors(exc: BaseException | None) -> bool:
    """Whether a failure is the broker's own lack of file descriptors (EMFILE, ENFILE: RLIMIT_NOFILE or the
    system's table), not the consumer's doing. (aiohttp's ClientConnectorError has its OSError's errno.)"""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


def describe(exc: BaseException) -> str:
    """A short human reason for a failed connection: 'connection refused', 'timed out', ..."""
    if out_of_descriptors(exc):
        return "the broker is out of file descriptors (RLIMIT_NOFILE)"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect timed out"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
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


def gone_reason(exc: BaseException, *, refused_only: bool = False) -> str | None:
    """Why a failed call means the consumer is gone, or None when it may be alive but slow (a timeout) or
    the URL is wrong (a name that does not resolve), or the broker itself had no descriptor to connect with.
    Gone: nothing accepts the connection, or (unless ``refused_only``) the one it had was reset or closed on
    it."""
    if isinstance(
        exc, (aiohttp.ClientConnectorDNSError, aiohttp.InvalidURL, TimeoutError, asyncio.TimeoutError)
    ):
        return None
    if out_of_descriptors(exc):
        return None
    if isinstance(exc, aiohttp.ClientConnectorError):
        return describe(exc)
    if refused_only:
        return None
    if isinstance(exc, (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, ConnectionResetError)):
        return describe(exc)
    return None


def failure_code(exc: BaseException) -> str:
    """The error code for a failed call to a consumer: its URL is unusable, it is unreachable, or the broker
    had no file descriptor to connect with."""
    if out_of_descriptors(exc):
        return "out_of_descriptors"
    if isinstance(exc, (aiohttp.ClientConnectorDNSError, aiohttp.InvalidURL, ValueError)):
        return "bad_consumer_url"
    return "consumer_unreachable"


def parse_json(body: bytes | bytearray) -> Any:
    """A consumer's JSON answer, or None when it is not JSON (or nested too deep to parse)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def logfmt(**fields: Any) -> str:
    """key=value pairs, values quoted when they need it (_LOGFMT_QUOTE: with the command line)."""
    out = []
    for key, value in fields.items():
        if value is None:
            out.append(f"{key}=")  # absent: an empty value, as logfmt readers expect
            continue
        if type(value) is int:  # (most of a job's line: nothing to quote)
            out.append(f"{key}={value}")
            continue
        text = (
            json.dumps(value, separators=(",", ":"), default=str)
            if isinstance(value, (list, tuple, dict))
            else str(value)
        )
        if not text or _LOGFMT_QUOTE.search(text) or not text.isprintable():
            text = json.dumps(text)
        out.append(f"{key}={text}")
    return " ".join(out)


def error_read(future: asyncio.Future[Any]) -> None:
    """A done callback: the future's error counts as read, whoever waits for it or stopped waiting (asyncio
    logs an error never read, with its traceback, when the future goes)."""
    if not future.cancelled():
        future.exception()


def in_own_thread(fn: Callable[..., Any], *args: Any, name: str) -> asyncio.Future[Any]:
    """``fn(*args)`` in a daemon thread of its own, as a future of the running loop: for a call that may
    never return (a file on a hung network mount, a FIFO). The loop's own executor is joined when the
    broker exits, so one such call there kept a stopped broker alive for good; a daemon thread is left
    behind. Its caller bounds the wait (``asyncio.wait_for``); what the call returns after that is unused."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # (its caller stopped waiting)
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            outcome, error = fn(*args), None
        except BaseException as e:
            outcome, error = None, e
        with contextlib.suppress(RuntimeError):  # (the loop is closed: nobody waits any more)
            loop.call_soon_threadsafe(settle, outcome, error)

    threading.Thread(target=run, name=f"mgpumanager {name}", daemon=True).start()
    return future


async def to_its_end(work: Awaitable[Any]) -> Any:
    """Await ``work`` to its end even if the caller is cancelled meanwhile, then pass the cancellation on:
    for short, bounded work that must not stop half way (a reload's apply)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


async def cancel_until_done(tasks: Collection[asyncio.Task[Any]], what: str) -> None:
    """Cancel ``tasks`` and wait for them to end, cancelling again every CANCEL_AGAIN_S those that go on: a
    task may swallow a cancellation (Python 3.11's asyncio.wait_for does, when what it waits for ends at
    the same moment: the state file's writer then slept on, and shutdown waited for it for ever). After
    CANCEL_ROUNDS, what still runs is logged and left."""
    for _ in range(CANCEL_ROUNDS):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
    for task in tasks:  # (what ended with an error was its owner's to report: taken, not left to asyncio)
        if task.done() and not task.cancelled():
            task.exception()
    names = sorted(t.get_name() for t in tasks if not t.done())
    if names:
        log.warning(logfmt(msg=f"{what} did not end when cancelled", tasks=",".join(names)))


# =====================================================================================================
# Events and metrics
# =====================================================================================================

#: /v1/events: a subscriber this many events behind, that has not caught up for EVENT_BEHIND_S, is dropped;
#: one that reads on keeps a burst (a thousand refusals in one turn of the loop) up to EVENT_BUFFER_MAX.
EVENT_BUFFER = 256
EVENT_BEHIND_S = 1.0
EVENT_BUFFER_MAX = 10000
# (EVENT_RING, EVENT_RING_S and HEARTBEAT_S are defined with the command line, which uses them.)
#: A reader of /v1/events that accepts nothing for this long is cut off: what is written to it waits in the
#: broker's memory until it reads.
EVENT_STALL_S = 60.0
#: The replay (``?since=``), and a burst, are written in pieces of at most this many bytes, each after the
#: reader took the last (a full ring is 3.5 MiB: written at once, it sat whole in memory for each reader
#: that did not read).
EVENT_REPLAY_PIECE = 64 * 1024


class Subscription(asyncio.Queue[bytes | None]):
    """A subscriber's stream: the events as the stream sends them, then None once it was dropped or the
    broker closes; and when its reader last had taken everything (``caught_up_at``)."""

    def __init__(self, maxsize: int, now: float) -> None:
        super().__init__(maxsize)
        self.caught_up_at = now

    def take_all(self, now: float) -> list[bytes | None]:
        """Everything queued, at once (a reader takes a burst in one wake); it has caught up."""
        taken = []
        while not self.empty():
            taken.append(self.get_nowait())
        self.caught_up_at = now
        return taken


def sse(event: dict[str, Any]) -> bytes:
    """One event as /v1/events sends it: its name, and the event as one line of JSON."""
    return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()


class Event:
    """One published event: its fields as they were, and the frame /v1/events sends, made the first time
    someone needs it (a subscriber, a replay of the ring) and kept: serialised once, or never."""

    __slots__ = ("_frame", "fields", "name", "wall")

    def __init__(self, name: str, wall: float, fields: dict[str, Any]) -> None:
        self.name = name
        #: When it was published (time.time(); ``ts`` in ISO 8601 once sent).
        self.wall = wall
        self.fields = fields
        self._frame: bytes | None = None

    def frame(self) -> bytes:
        if self._frame is None:
            self._frame = sse({"event": self.name, "ts": _iso(self.wall), **self.fields})
        return self._frame


class Events:
    """Fan-out of the broker's events to /v1/events subscribers and other listeners, and the ring of the
    recent ones (bounded by count and by age) that a subscriber may ask for first.

    Publishing never waits: a subscriber ``buffer`` events behind that has not caught up for
    EVENT_BEHIND_S (or EVENT_BUFFER_MAX behind, whatever it does) is dropped (its stream ends) rather than
    slowing the scheduler or holding its memory; a burst published in one turn of the loop, before any
    reader could run, drops nobody. An event is serialised once, when someone first needs it
    (``Event.frame``): at once while anyone listens, else when the ring is replayed, if ever; nobody
    listening costs no JSON.
    """

    def __init__(
        self,
        buffer: int = EVENT_BUFFER,
        *,
        ring: int | None = None,
        ring_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.buffer = buffer
        self.subscribers: set[Subscription] = set()
        #: Called with every event (the systemd status line listens here).
        self.listeners: list[Callable[[Event], None]] = []
        self.dropped = 0
        #: The recent past, oldest first: (monotonic time, the event); at most ``ring`` events of ``ring_s``.
        self.ring: deque[tuple[float, Event]] = deque(maxlen=EVENT_RING if ring is None else ring)
        self.ring_s = EVENT_RING_S if ring_s is None else ring_s
        self.clock = clock

    def publish(self, name: str, /, **fields: Any) -> None:
        now = self.clock()
        event = Event(name, time.time(), fields)
        self.ring.append((now, event))
        self._forget(now)
        if self.subscribers:
            sent = event.frame()
            for queue in list(self.subscribers):
                if queue.empty():  # (it had taken everything: caught up until this event)
                    queue.caught_up_at = now
                behind = queue.qsize() >= self.buffer and now - queue.caught_up_at > EVENT_BEHIND_S
                if not behind and not queue.full():
                    queue.put_nowait(sent)
                    continue
                self.subscribers.discard(queue)
                self.dropped += 1
                log.warning(logfmt(msg="event subscriber dropped", behind=queue.qsize()))
                queue.take_all(now)
                queue.put_nowait(None)
        for listener in self.listeners:
            listener(event)

    def subscribe(self) -> Subscription:
        queue = Subscription(max(self.buffer, EVENT_BUFFER_MAX), self.clock())
        self.subscribers.add(queue)
        return queue

    def _forget(self, now: float) -> None:
        """Drop what is older than ``ring_s`` (the count bound is the deque's own)."""
        oldest = now - self.ring_s
        while self.ring and self.ring[0][0] < oldest:
            self.ring.popleft()

    def recent(self, since_s: float) -> list[bytes]:
        """The ring's events of the last ``since_s`` seconds, oldest first, as the stream sends them."""
        now = self.clock()
        self._forget(now)
        start = now - since_s
        past = list(itertools.takewhile(lambda entry: entry[0] >= start, reversed(self.ring)))
        return [event.frame() for _, event in reversed(past)]

    def follow(self, since_s: float | None) -> tuple[Subscription, list[bytes]]:
        """Subscribe, and take the events of the last ``since_s`` seconds, in one step (nothing awaits in
        between): every event is either in the past returned or in the queue, never in both, never lost."""
        return self.subscribe(), [] if since_s is None else self.recent(since_s)

    def unsubscribe(self, queue: Subscription) -> None:
        self.subscribers.discard(queue)

    def close(self) -> None:
        """End every stream (on shutdown) after what it has not yet sent; a reader so far behind that its
        end does not fit loses that, as a reader dropped for falling behind does."""
        for queue in list(self.subscribers):
            self.subscribers.discard(queue)
            if queue.full():
                queue.take_all(self.clock())
            queue.put_nowait(None)


#: What systemd is no longer told once the broker is stopping.
NOT_WHILE_STOPPING = ("READY=", "RELOADING=", "MONOTONIC_USEC=")


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
        #: Datagrams that could not be sent (never fatal): all counted; the first of a run of them logged (a
        #: socket that went away would fail every send, the watchdog's ping twice a minute), and the send
        #: that works again says how many failed since.
        self.errors = 0
        self.failing = 0
        #: STOPPING=1 was sent: from then on the broker is never READY=1 again (a reload the drain cut ends
        #: with one), and RELOADING=1 no longer holds.
        self.stopping = False

    def send(self, *lines: str) -> bool:
        if "STOPPING=1" in lines:
            self.stopping = True
        elif self.stopping:
            lines = tuple(line for line in lines if not line.startswith(NOT_WHILE_STOPPING))
        if self.address is None or not lines:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            self.errors += 1
            self.failing += 1
            if self.failing == 1:
                log.warning(logfmt(msg="sd_notify failed", error=describe(e)))
            return False
        if self.failing:
            log.info(logfmt(msg="sd_notify works again", failed=self.failing))
            self.failing = 0
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
    "mgpumanager_client_jobs_total": (
        "counter",
        "GPU jobs of each client (auth.clients) that ended, by client and status (the job's outcome).",
    ),
    "mgpumanager_client_gpu_seconds_total": (
        "counter",
        "GPU time of each client's jobs: seconds from each grant to its slot's release, holds included (jobs"
        " that ran at once count each their own), by client.",
    ),
    "mgpumanager_queue_wait_seconds": ("histogram", "Time jobs waited for the GPU lock."),
    "mgpumanager_run_seconds": ("histogram", "Time jobs held the GPU lock, from grant to the last byte."),
    "mgpumanager_hold_seconds": ("histogram", "Time holds kept the GPU lock after the answer."),
    "mgpumanager_load_seconds": (
        "histogram",
        "Time a consumer took to load: its load route or command (with the health wait), or what a cold "
        "start's first job took beyond a usual one.",
    ),
    "mgpumanager_unload_seconds": (
        "histogram",
        "Time a consumer took to unload: until its memory showed up free (an eviction) or its call ended.",
    ),
    "mgpumanager_job_seconds": (
        "histogram",
        "Time a job that the consumer took kept the GPU, from when it went to work (after making room and"
        " loading) to the end of its answer or its hold.",
    ),
    "mgpumanager_hold_timeouts_total": ("counter", "Holds released at their timeout."),
    "mgpumanager_websockets_total": ("counter", "WebSockets proxied through a mount, by consumer."),
    "mgpumanager_websocket_failures_total": (
        "counter",
        "WebSockets through a mount that failed to connect or broke, by consumer.",
    ),
    "mgpumanager_websocket_refused_total": (
        "counter",
        "WebSockets closed for a message larger than max_ws_message_mib (1009) or a frame that breaks the "
        "protocol (1002), by consumer and the side that sent it (client, consumer).",
    ),
    "mgpumanager_evictions_total": ("counter", "Consumers unloaded to make room, by the consumer unloaded."),
    "mgpumanager_loads_total": ("counter", "Load calls that succeeded, by consumer."),
    "mgpumanager_unload_failures_total": ("counter", "Unload calls that failed, by consumer."),
    "mgpumanager_idle_unloads_total": (
        "counter",
        "Consumers unloaded for being idle idle_unload_s, by consumer.",
    ),
    "mgpumanager_admin_unloads_total": (
        "counter",
        "Consumers unloaded through the admin route or by a reservation, by consumer.",
    ),
    "mgpumanager_load_failures_total": ("counter", "Load calls that failed, by consumer."),
    "mgpumanager_preload_skips_total": ("counter", "Preloads skipped because they did not fit, by consumer."),
    "mgpumanager_yields_total": (
        "counter",
        "Idle consumers unloaded for a stranger (gpu.yield: memory no consumer's processes hold), by"
        " consumer.",
    ),
    "mgpumanager_restores_total": (
        "counter",
        "Consumers loaded again after a stranger left or a reservation ended, by consumer.",
    ),
    "mgpumanager_unclaimed_mib": (
        "gauge",
        "GPU memory in use that no consumer claims, in MiB, by GPU (a stranger's while above"
        " gpu.yield.ignore_mib).",
    ),
    "mgpumanager_gpu_readings_total": (
        "counter",
        "GPU readings made, by GPU: nvidia-smi processes started plus NVML readings (with gpu.yield, one per"
        " poll_s at most, shared with /v1/status).",
    ),
    "mgpumanager_gpu_reading_failures_total": (
        "counter",
        "GPU readings that failed (gpu_unavailable), by GPU: nvidia-smi or NVML did not answer, or answered"
        " what cannot be read.",
    ),
    "mgpumanager_state_write_failures_total": (
        "counter",
        "Writes of the state file (state_file) that failed or did not finish in time (each logged).",
    ),
    "mgpumanager_event_subscribers_dropped_total": (
        "counter",
        "Event streams (/v1/events) ended because their reader fell too far behind (each logged).",
    ),
    "mgpumanager_sd_notify_failures_total": (
        "counter",
        "Messages to systemd (readiness, status, watchdog) that could not be sent (each logged).",
    ),
    "mgpumanager_hold_abandoned_total": (
        "counter",
        "Holds ended because their consumer was seen down (its work died with it), by consumer.",
    ),
    "mgpumanager_hold_poll_errors_total": (
        "counter",
        "Hold polls that failed and were retried, by consumer.",
    ),
    "mgpumanager_refused_total": (
        "counter",
        "Requests refused with too_many_requests, by consumer and the limit (its config key) that was full.",
    ),
    "mgpumanager_internal_errors_total": (
        "counter",
        "Bugs in the broker (each also logged with a traceback).",
    ),
    "mgpumanager_connections_closed_total": (
        "counter",
        "Client connections the broker closed, by reason: header_timeout (no whole request head within "
        "http.header_timeout_s), head_too_large (more than 2 MiB sent before its request was handled, or "
        "64 KiB behind it; with an aiohttp older than 3.14.3, more than 2 MiB beside its body), "
        "websocket_too_large (with such an aiohttp, more than max_ws_message_mib and 2 MiB sent between two "
        "WebSocket messages relayed), "
        "keepalive (idle http.keepalive_s), descriptors (the longest-idle ones, when descriptors ran short), "
        "token_revoked (authenticated with a token a reload replaced).",
    ),
    "mgpumanager_descriptors_exhausted_total": (
        "counter",
        "Connections to consumers the broker could not open for want of a file descriptor (EMFILE, ENFILE).",
    ),
    "mgpumanager_client_connections": ("gauge", "Client connections open now, on every listener."),
    "mgpumanager_client_connections_limit": (
        "gauge",
        "Client connections allowed at once: RLIMIT_NOFILE less the descriptors kept for the broker's own "
        "work.",
    ),
    "mgpumanager_consumer_healthy": ("gauge", "1 if the last health probe succeeded, 0 if not, NaN unknown."),
    "mgpumanager_consumer_stopped": (
        "gauge",
        "1 if the consumer (started by a command) is stopped, by the broker or found not running; else 0.",
    ),
    "mgpumanager_consumer_resident": ("gauge", "1 if the consumer is resident, 0 if not, NaN unknown."),
    "mgpumanager_consumer_vram_used_bytes": (
        "gauge",
        "GPU memory the consumer's processes held at the last reading (consumers with `processes` only).",
    ),
    "mgpumanager_consumer_vram_peak_bytes": (
        "gauge",
        "The most GPU memory the consumer's processes were seen holding (consumers with `processes` only).",
    ),
    "mgpumanager_queue_length": ("gauge", "Jobs waiting for the GPU lock, by GPU."),
    "mgpumanager_queue_eta_seconds": (
        "gauge",
        "The longest expected wait in the queue, by GPU, from the learned timings (0: nothing queued).",
    ),
    "mgpumanager_gpu_reserved": ("gauge", "1 while the GPU is reserved (POST /v1/reserve), else 0, by GPU."),
    "mgpumanager_running_jobs": ("gauge", "Jobs at work under the GPU lock now (holds apart), by GPU."),
    "mgpumanager_gpu_memory_total_bytes": (
        "gauge",
        "GPU memory in all, by GPU (NVML or nvidia-smi, read at most once a second).",
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
    #: pid -> consumer, for the consumers measured by their processes, as the broker attributed them when
    #: the reading was taken (off the event loop, with the parsing).
    owners: Mapping[int, str] = field(default_factory=dict)
    #: MiB the GPU's used memory moved while its process list was read (a whole reading: the two lines
    #: around the list differ by this, ``bracketed``): what the list claims may be off by up to this much.
    moved_mib: int = 0


_UNITS = (" MiB", " %", " W")


def parse_smi_csv(text: str, fields: Sequence[str]) -> list[dict[str, str | None]]:
    """Rows of nvidia-smi's ``--format=csv[,noheader][,nounits]`` output, keyed by the fields asked for.

    ``[N/A]``-style values become None; a header line and unit suffixes are tolerated; anything else that
    does not fit the fields is a GpuError quoting the output. Rows end at "\n" alone, as nvidia-smi ends
    them: a process's name (anyone's) may hold the other breaks ``splitlines`` knows (U+2028), and a row
    cut there would read as a broken reading, or as two rows, one of them forged.
    """
    rows = []
    for number, line in enumerate(text.split("\n")):
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
    except (ValueError, OverflowError):  # (not a number; nan; inf, or beyond a float: 1e999)
        raise GpuError(f"unexpected nvidia-smi value for {key}: {value!r}") from None


def parse_gpu_reading(
    gpu_text: str, apps_text: str, *, index: int, started: float, read_at: float
) -> GpuReading:
    """One GpuReading from the outputs of the --query-gpu and --query-compute-apps queries."""
    rows = parse_smi_csv(gpu_text, GPU_FIELDS)
    # (A lone line without an index is the GPU asked for, as -i asks; one with another index is not.)
    lone = rows[0] if len(rows) == 1 and _int(rows[0], "index") is None else None
    row = next((r for r in rows if _int(r, "index") == index), lone)
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
    #: It wrote more to stdout than was kept.
    stdout_cut: bool = False

    def stderr_tail(self) -> str:
        return stderr_tail(self.stderr)


def stderr_tail(stderr: bytes) -> str:
    """The last STDERR_TAIL characters a program wrote to stderr, for a message."""
    text = stderr.decode(errors="replace").strip()
    return text[-STDERR_TAIL:] or "(no output on stderr)"


class _Tail(asyncio.Protocol):
    """The last ``limit`` bytes one output of a subprocess writes (a chatty one cannot fill memory), or with
    ``head`` its first ``limit`` bytes; whether it wrote more (``cut``), and when that output ended (every
    process holding it closed it)."""

    def __init__(self, limit: int, head: bool = False) -> None:
        self.limit = limit
        self.head = head
        self.data = bytearray()
        self.cut = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.head:
            room = self.limit - len(self.data)
            self.cut = self.cut or len(data) > room
            self.data += data[: max(0, room)]
            return
        self.data += data
        if len(self.data) > self.limit:
            self.cut = True
            del self.data[: len(self.data) - self.limit]

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Exit:
    """Learns when a child process exits, without reaping it (so that its process group is still its own):
    its pidfd becomes readable; where the kernel has no pidfds, ``waitid`` is polled."""

    POLL_S = 0.01

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self.loop.create_future()
        self._pidfd: int | None = None
        self._poller: asyncio.Task[None] | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux 5.3+ (or a sandbox without it)
            self._poller = self.loop.create_task(self._poll())
        else:
            self.loop.add_reader(self._pidfd, self._done)

    def _done(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)

    async def _poll(self) -> None:
        # WNOHANG: never blocks; without a pidfd there is no event to wait for.
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        while os.waitid(os.P_PID, self.pid, flags) is None:  # noqa: ASYNC110, ASYNC222
            await asyncio.sleep(self.POLL_S)
        self._done()

    def close(self) -> None:
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._poller is not None:
            self._poller.cancel()


async def run_process(
    argv: Sequence[str],
    timeout_s: float,
    *,
    limit: int = OUTPUT_LIMIT,
    kill_group: bool = False,
    head: bool = False,
) -> Finished:
    """Run a program without a shell, stdin from /dev/null, its output captured (bounded: the last ``limit``
    bytes of each, or with ``head`` the first ``limit`` bytes of stdout).

    It gets exactly stdin, stdout and stderr and no other file descriptor of the broker's, whichever the
    event loop: it is started by ``subprocess.Popen`` (``close_fds``), not by the loop (uvloop's spawning
    leaves the child copies of its pipes, so a service a command starts in the background, its output
    redirected, would still hold the broker's pipes open). Its output goes through socket pairs the loop
    reads.

    It gets a process group of its own: if it has not exited after ``timeout_s`` (or when the caller is
    cancelled) the whole group is SIGKILLed and reaped, so nothing it started outlives it. Once it has
    exited, whatever it left running (a service it started, holding the output) is left alone, unless
    ``kill_group`` (nvidia-smi: nothing it starts may outlive it); its output is read for PIPE_GRACE_S more
    at most. OSError when it cannot be started, ProcessTimeout when killed.
    """
    loop = asyncio.get_running_loop()
    pairs = [socket.socketpair(), socket.socketpair()]  # (ours, its) for stdout and stderr; CLOEXEC
    ours = [pair[0] for pair in pairs]
    try:
        try:
            # Returns once the program runs (fork and exec, as the loop's own subprocess_exec does).
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=pairs[0][1].fileno(),
                stderr=pairs[1][1].fileno(),
                close_fds=True,
                start_new_session=True,  # its own process group, so a kill reaches its children too
            )
        finally:
            for pair in pairs:
                pair[1].close()
    except BaseException:
        for sock in ours:
            sock.close()
        raise
    watch = _Exit(proc.pid)
    transports: list[asyncio.BaseTransport] = []
    try:
        tails = []
        for sock, keep_head in zip(list(ours), (head, False), strict=True):
            protocol = functools.partial(_Tail, limit, keep_head)
            transport, tail = await loop.connect_read_pipe(protocol, sock)
            ours.remove(sock)  # the transport closes it now
            transports.append(transport)
            tails.append(tail)
        try:
            await asyncio.wait_for(asyncio.shield(watch.exited), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            await _kill_group(proc, watch.exited, argv)
            if isinstance(e, asyncio.CancelledError):
                raise
            # (What it wrote before the kill: its group is dead, so its stderr ends at once, unless
            # something that left the group holds it.)
            await asyncio.wait([tails[1].closed], timeout=PIPE_GRACE_S)
            message = f"{argv[0]} did not finish within {timeout_s:g} s (killed)"
            raise ProcessTimeout(message, bytes(tails[1].data)) from None
        if kill_group:
            # Its leader exited but is not reaped yet: the group is still its own to kill.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        returncode = proc.wait(0)  # it has exited: reaping it does not wait
        try:
            await asyncio.wait_for(asyncio.gather(*(t.closed for t in tails)), PIPE_GRACE_S)
        except asyncio.TimeoutError:
            log.info(logfmt(msg="process left its output open", argv=shlex.join(argv), pid=proc.pid))
        return Finished(returncode, bytes(tails[0].data), bytes(tails[1].data), tails[0].cut)
    finally:
        # Cancelled before its wait (while its output was being connected): killed all the same.
        if not watch.exited.done():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        watch.close()
        for transport in transports:
            transport.close()  # our ends; never the process group of a command that exited
        for sock in ours:
            sock.close()


async def _kill_group(
    proc: subprocess.Popen[bytes], exited: asyncio.Future[None], argv: Sequence[str]
) -> None:
    """SIGKILL a process's group and wait for it to exit (bounded), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        # Gone at once normally; a process stuck in the kernel is left to subprocess's own reaping.
        await asyncio.wait_for(asyncio.shield(exited), REAP_TIMEOUT_S)
    except asyncio.TimeoutError:
        log.error(logfmt(msg="process survived SIGKILL", argv=shlex.join(argv), pid=proc.pid))
    else:
        proc.wait(0)


async def run_nvidia_smi(
    argv: Sequence[str], timeout_s: float, max_output_mib: int = 8, *, reading_s: float | None = None
) -> str:
    """Run one nvidia-smi query as a subprocess; kill it (and anything it started) past ``timeout_s``, and
    whatever it left in its process group once it has exited (a wrapper's child holding its output would
    cost every reading PIPE_GRACE_S, and stay behind). Its output is read whole up to ``max_output_mib``
    (gpu.max_output_mib); more is a GpuError that says so, never a part of it parsed. ``reading_s``: the
    whole reading's limit, which its timeout is what is left of (the message names it)."""
    limit = max_output_mib * MiB
    try:
        done = await run_process(argv, timeout_s, limit=limit, kill_group=True, head=True)
    except OSError as e:
        raise GpuError(f"cannot run {argv[0]}: {e.strerror or e}") from e
    except ProcessTimeout:
        said = timeout_s if reading_s is None else reading_s
        raise GpuError(f"nvidia-smi did not answer within {said:g} s (killed)") from None
    if done.returncode != 0:
        # nvidia-smi writes its errors to stdout.
        text = done.stdout.decode(errors="replace").strip() or done.stderr.decode(errors="replace").strip()
        raise GpuError(f"nvidia-smi exited with status {done.returncode}: {text[:300] or '(no output)'}")
    if done.stdout_cut:
        raise GpuError(
            f"nvidia-smi printed more than {max_output_mib} MiB (gpu.max_output_mib): not read;"
            " raise gpu.max_output_mib if this GPU really lists so many processes"
        )
    return done.stdout.decode(errors="replace")


class GpuSource(Protocol):
    """Where a GPU's readings come from (gpu.reader): SmiSource or NvmlSource. GpuReader shares, keeps and
    tells its readings; a source only makes them."""

    #: ``nvidia-smi`` or ``nvml``; readings made (nvidia-smi: processes started).
    name: str
    queries: int

    async def read(
        self,
        cfg: GpuConfig,
        *,
        whole: bool,
        started: float,
        read_at: float,
        finish: Callable[[GpuReading], GpuReading] | None,
    ) -> GpuReading:
        """A reading started at ``started`` (GpuError when the GPU cannot be read): with the process list when
        ``whole``, then passed through ``finish`` off the event loop."""
        ...

    async def close(self, timeout_s: float) -> None:
        """Give back what it holds, waiting ``timeout_s`` at most."""
        ...


def bracketed(reading: GpuReading, used_mib: int | None, free_mib: int | None) -> GpuReading:
    """A whole reading whose GPU line was read before its process list, and ``used_mib``/``free_mib`` read
    again after it: the line that shows less used. The GPU's line and its process list are two questions,
    never one moment: a consumer freeing 13 GiB between them left 13 GiB used by no process listed (a
    stranger that was not there), one allocating between them the same. Of the two lines around the list,
    the one with less used has no memory the list cannot account for: what was freed is gone from it, what
    was allocated is not in it yet (a stranger's allocation then shows in the next reading). How far the
    two lines differ is kept (``moved_mib``): the other line is what a stranger is not taken to be gone
    against (``Strangers.seen``). Free memory is the later line's whatever the used: the newest fact, and
    what room is made from (the earlier line's, kept with its used, granted a job into memory that a game
    took while the list was read)."""
    if used_mib is None or reading.used_mib is None:
        return reading if used_mib is None else replace(reading, used_mib=used_mib, free_mib=free_mib)
    moved = abs(used_mib - reading.used_mib)
    free = reading.free_mib if free_mib is None else free_mib
    if used_mib < reading.used_mib:
        return replace(reading, used_mib=used_mib, free_mib=free, moved_mib=moved)
    return replace(reading, free_mib=free, moved_mib=moved)


def possible(reading: GpuReading) -> GpuReading:
    """The reading, unless its memory figures cannot be (below 0, or more used or free than the GPU has): a
    reader that says so is broken or lying, and room made from more free memory than there is overfills."""
    total = reading.total_mib
    for what, mib in (("total", total), ("used", reading.used_mib), ("free", reading.free_mib)):
        if mib is not None and (mib < 0 or (total is not None and mib > total)):
            raise GpuError(
                f"GPU {reading.index} reads {what} {mib} MiB of {total} MiB: not a possible reading"
            )
    return reading


class SmiSource:
    """Readings from nvidia-smi: three processes for a whole reading, one after the other (the GPU's line,
    its compute processes, its line again: ``bracketed``), one for the GPU's line alone; their output parsed
    (and the processes attributed) in a worker thread."""

    name = "nvidia-smi"

    def __init__(self, index: int) -> None:
        self.index = index
        #: How many nvidia-smi processes were started.
        self.queries = 0

    async def read(
        self,
        cfg: GpuConfig,
        *,
        whole: bool,
        started: float,
        read_at: float,
        finish: Callable[[GpuReading], GpuReading] | None,
    ) -> GpuReading:
        """A reading started at ``started``: with the process list when ``whole`` (then passed through
        ``finish``, in the worker thread)."""
        fmt = "--format=csv,noheader,nounits"
        base = [*cfg.nvidia_smi, "-i", str(self.index)]
        limit_s, deadline = cfg.query_timeout_s, time.monotonic() + cfg.query_timeout_s

        async def ask(query: str) -> str:
            """One nvidia-smi process, counted as it starts (one that failed starts no next), within what
            is left of the reading's query_timeout_s (a whole reading's three together answer within it)."""
            left = deadline - time.monotonic()
            if left <= 0:
                raise GpuError(f"nvidia-smi did not answer within {limit_s:g} s (a whole reading: 3 runs)")
            self.queries += 1
            return await run_nvidia_smi([*base, query, fmt], left, cfg.max_output_mib, reading_s=limit_s)

        gpu_query = f"--query-gpu={','.join(GPU_FIELDS)}"
        if not whole:
            text = await ask(gpu_query)
            # (In a worker thread too: a broken nvidia-smi may print its 8 MiB here as well.)
            return await asyncio.to_thread(self._parse, text, "", started, read_at, None)
        # The GPU's line before and after the process list, one after the other (``bracketed``).
        before = await ask(gpu_query)
        apps = await ask(f"--query-compute-apps={','.join(APP_FIELDS)}")
        after = await ask(gpu_query)
        # Off the event loop: 20,000 process lines (a hostile or broken nvidia-smi) take it a second.
        return await asyncio.to_thread(self._parse, before, apps, started, read_at, finish, after)

    def _parse(
        self,
        gpu_text: str,
        apps_text: str,
        started: float,
        read_at: float,
        finish: Callable[[GpuReading], GpuReading] | None,
        after_text: str | None = None,
    ) -> GpuReading:
        reading = parse_gpu_reading(gpu_text, apps_text, index=self.index, started=started, read_at=read_at)
        if after_text is not None:
            after = parse_gpu_reading(after_text, "", index=self.index, started=started, read_at=read_at)
            reading = bracketed(reading, after.used_mib, after.free_mib)
        return reading if finish is None else finish(reading)

    async def close(self, timeout_s: float) -> None:
        """Nothing to give back: each reading's processes are gone when it ends."""


class NvmlUnavailable(GpuError):
    """NVML cannot be used: nvidia-ml-py is not installed, libnvidia-ml.so.1 does not load, no driver, no such
    GPU."""


def nvml_failure(exc: BaseException, call: str) -> GpuError | None:
    """The GpuError for an exception nvidia-ml-py raised (its NVMLError, or its own version mismatch); None
    for any other (a bug of ours)."""
    if type(exc).__module__ != "pynvml":
        return None
    return GpuError(f"NVML {call}: {exc}")


class Nvml:
    """NVML for the whole process, through nvidia-ml-py: imported and initialised (``nvmlInit``) by its first
    user, shut down (``nvmlShutdown``) when its last user lets it go. Called from the readers' NVML threads,
    never from the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.users = 0
        #: The pynvml module while NVML is initialised.
        self.module: Any = None

    def acquire(self) -> Any:
        """The pynvml module, NVML initialised; NvmlUnavailable when it cannot be."""
        with self._lock:
            if self.users == 0:
                try:
                    module = importlib.import_module("pynvml")
                except ImportError as e:
                    raise NvmlUnavailable(f"nvidia-ml-py is not installed (import pynvml: {e})") from None
                try:
                    module.nvmlInit()
                except Exception as e:
                    failure = nvml_failure(e, "nvmlInit")
                    if failure is None:
                        raise
                    raise NvmlUnavailable(f"{failure} (libnvidia-ml.so.1, the driver's)") from None
                self.module = module
            self.users += 1
            return self.module

    def release(self) -> None:
        """One user less; NVML shut down after the last."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            module, self.module = self.module, None
            try:
                module.nvmlShutdown()
            except Exception as e:
                failure = nvml_failure(e, "nvmlShutdown")
                if failure is None:
                    raise
                log.warning(logfmt(msg="NVML did not shut down", error=str(failure)))


#: The process's one NVML.
NVML = Nvml()


class NvmlThread:
    """A GPU's NVML calls, made one at a time by a daemon thread of its own; ``call`` waits for one at most
    ``timeout_s``. NVML can hang after a driver fault: a call that has not returned by then is abandoned to
    its thread (logged, never awaited again) and every call after it fails at once, without queueing behind
    it, until it returns (logged too). A GPU has one such thread at most, hung or not."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        #: Guards the hand-over of a call's end against its caller's giving up on it.
        self._lock = threading.Lock()
        #: When the call running now began (monotonic), and when the one that overran its time began.
        self._running_since: float | None = None
        self.hung_since: float | None = None
        self._stopped = False

    async def call(self, fn: Callable[[], Any], timeout_s: float) -> Any:
        """``fn()`` in the thread; GpuError when it does not return within ``timeout_s`` or another call is
        hung."""
        if self._stopped:
            raise GpuError("NVML: the reader closed")
        hung_since = self.hung_since
        if hung_since is not None:
            raise GpuError(
                f"NVML has not answered for {time.monotonic() - hung_since:.0f} s (a call hangs in its"
                " thread, as after a driver fault): not asked again until it answers"
            )
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put((fn, future))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            with self._lock:  # (wait_for cancelled the future: it stays pending only where it is running)
                hung = not future.done()
                if hung:
                    self.hung_since = self._running_since or time.monotonic()
            if hung:
                log.error(
                    logfmt(msg="NVML call hung: left to its thread", thread=self.name, limit_s=timeout_s)
                )
            raise GpuError(f"NVML did not answer within {timeout_s:g} s") from None

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it began
            self._running_since = time.monotonic()
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as e:  # handed to the caller, who raises it
                error = e
            with self._lock:
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
                self._running_since = None
                hung_since, self.hung_since = self.hung_since, None
            if hung_since is not None:
                took = round(time.monotonic() - hung_since, 1)
                log.warning(logfmt(msg="NVML answered again", thread=self.name, after_s=took))

    def stop(self) -> None:
        """End the thread once the calls before this one are done (a hung one never ends: a daemon thread)."""
        self._stopped = True
        if self._thread is not None:
            self._queue.put(None)


#: The most of a process's name that a message, an event or a log line shows: a name is anyone's to choose,
#: and ten of 4 KiB in one line split it into several journal entries (journald's LineMax, 48K).
NAME_SHOWN_MAX = 256


def shown_name(name: str | None) -> str | None:
    """A process's name as messages, events and log lines show it: at most NAME_SHOWN_MAX characters."""
    return name if name is None or len(name) <= NAME_SHOWN_MAX else name[:NAME_SHOWN_MAX] + "…"


def process_name(pid: int) -> str | None:
    """A process's name as nvidia-smi shows it: the first word of its command line (``/proc/<pid>/cmdline``);
    None when that cannot be read (gone, hidden) or is empty (a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    return head.split(b"\0", 1)[0].decode(errors="replace") or None


class NvmlSource:
    """Readings through NVML (nvidia-ml-py over libnvidia-ml.so.1, the library nvidia-smi itself calls), in
    the GPU's own NvmlThread: no process per reading. They are nvidia-smi's: the memory from memory info v2
    (where the reserved memory is neither used nor free, as nvidia-smi shows it since R510), the compute
    processes with each one's memory and its name from ``/proc/<pid>/cmdline``; bytes in MiB, rounded
    down. The process list is v3's (what the binding's unversioned call asks), else v2's: the same list in
    the same struct (a driver before R510 has no v3, nor has 535.98); with neither, NVML is unavailable."""

    name = "nvml"
    #: The process lists that the reader can use, newest first.
    PROCESS_LISTS = ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2")

    def __init__(self, index: int) -> None:
        self.index = index
        self.thread = NvmlThread(f"nvml-gpu{index}")
        #: How many readings it made.
        self.queries = 0
        #: nvidia-ml-py, once NVML is this source's (NVML.acquire), and the GPU: handle, name, uuid.
        self._nvml: Any = None
        self._device: tuple[Any, str, str] | None = None
        #: Memory info v2 (nvidia-smi's figures); False on a driver older than R510 (reserved counts as used).
        self._v2 = True
        #: The binding's function for the process list, of PROCESS_LISTS the newest the driver has; None
        #: until NVML first loads (it is asked once: a driver has the function or not for good).
        self._processes: Callable[[Any], Any] | None = None
        self._closed = False
        #: A reading answered since NVML was (re)loaded: "NVML loaded" is said at the first (not at a load
        #: whose first reading fails, nor missed when a load that hung finished later).
        self._answered = False

    async def open(self, timeout_s: float) -> str:
        """Load NVML and find the GPU (NvmlUnavailable when that fails); the driver's version."""
        return await self.thread.call(self._open, timeout_s)

    def _call(self, call: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One NVML function; its failure a GpuError naming it (in the thread)."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            failure = nvml_failure(e, call)
            if failure is None:
                raise
            raise failure from None

    def _open(self) -> str:
        if self._nvml is None:
            nv = NVML.acquire()
            if self._closed:  # closed while NVML was starting (it hung past the caller's time)
                NVML.release()
                raise NvmlUnavailable("the reader closed meanwhile")
            self._nvml = nv
        nv = self._nvml
        try:
            handle = self._call("nvmlDeviceGetHandleByIndex", nv.nvmlDeviceGetHandleByIndex, self.index)
            name = self._call("nvmlDeviceGetName", nv.nvmlDeviceGetName, handle)
            uuid = self._call("nvmlDeviceGetUUID", nv.nvmlDeviceGetUUID, handle)
            version = self._call("nvmlSystemGetDriverVersion", nv.nvmlSystemGetDriverVersion)
        except GpuError as e:
            raise NvmlUnavailable(str(e)) from None
        try:
            nv.nvmlDeviceGetMemoryInfo(handle, version=nv.nvmlMemory_v2)
        except Exception as e:
            names = ("NVMLError_FunctionNotFound", "NVMLError_ArgumentVersionMismatch")
            if isinstance(e, tuple(getattr(nv, name) for name in names if hasattr(nv, name))):
                self._v2 = False
                log.warning(
                    logfmt(
                        msg="NVML has no memory info v2 (a driver before R510): the reserved memory counts"
                        " as used",
                        gpu=self.index,
                    )
                )
            elif nvml_failure(e, "") is None:
                raise
        if self._processes is None:
            self._processes = self._process_list(handle)
        self._device = (handle, name, uuid)
        return str(version)

    def _process_list(self, handle: Any) -> Callable[[Any], Any]:
        """Of PROCESS_LISTS, the newest the driver has (asked once each: one it lacks is "Function Not
        Found"); NvmlUnavailable with none of them."""
        nv = self._nvml
        names = ("NVMLError_FunctionNotFound", "NVMLLibraryMismatchError")
        missing = tuple(getattr(nv, name) for name in names if hasattr(nv, name))
        for call in self.PROCESS_LISTS:
            fn = getattr(nv, call, None)
            if fn is None:  # (a binding older than it)
                continue
            try:
                fn(handle)
            except Exception as e:
                if isinstance(e, missing):
                    continue
                if nvml_failure(e, call) is None:
                    raise
                # Any other error (the GPU lost meanwhile): the driver has the call; a reading says the rest.
            if call != self.PROCESS_LISTS[0]:
                log.warning(
                    logfmt(
                        msg="NVML has no v3 process list (a driver before R510, or 535.98): it reads v2",
                        gpu=self.index,
                    )
                )
            return fn
        raise NvmlUnavailable(f"NVML has no process list (none of {', '.join(self.PROCESS_LISTS)})")

    async def read(
        self,
        cfg: GpuConfig,
        *,
        whole: bool,
        started: float,
        read_at: float,
        finish: Callable[[GpuReading], GpuReading] | None,
    ) -> GpuReading:
        """A reading started at ``started``, as SmiSource.read's; all of it (``finish`` too) in the thread
        (counted there, once NVML is asked: not one refused at once while a call hangs)."""
        work = functools.partial(self._read, whole, started, read_at, finish)
        return await self.thread.call(work, cfg.query_timeout_s)

    def _optional(self, call: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A figure a GPU may not have (nvidia-smi prints ``[N/A]``): None when NVML says not supported."""
        try:
            return fn(*args)
        except Exception as e:
            if isinstance(e, self._nvml.NVMLError_NotSupported):
                return None
            failure = nvml_failure(e, call)
            if failure is None:
                raise
            raise failure from None

    def _read(
        self,
        whole: bool,
        started: float,
        read_at: float,
        finish: Callable[[GpuReading], GpuReading] | None,
    ) -> GpuReading:
        if self._device is None:
            self._open()
        assert self._device is not None and self._processes is not None
        self.queries += 1  # (NVML is asked for a reading)
        handle, name, uuid = self._device
        nv = self._nvml
        try:
            memory = self._memory(handle)
            rates = self._optional("nvmlDeviceGetUtilizationRates", nv.nvmlDeviceGetUtilizationRates, handle)
            temperature = self._optional(
                "nvmlDeviceGetTemperature", nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU
            )
            procs = (
                self._call("nvmlDeviceGetComputeRunningProcesses", self._processes, handle) if whole else []
            )
            # (The memory again after the process list: ``bracketed``.)
            after = self._memory(handle) if whole else memory
        except GpuError:
            self._device = None  # found again by the next reading (a GPU lost and back has a new handle)
            self._answered = False
            raise
        if not self._answered:
            self._answered = True
            log.info(logfmt(msg="NVML loaded", gpu=self.index))
        processes = tuple(
            GpuProcess(
                p.pid, process_name(p.pid), None if p.usedGpuMemory is None else p.usedGpuMemory // MiB
            )
            for p in procs
        )
        reading = GpuReading(
            index=self.index,
            uuid=uuid,
            name=name,
            total_mib=memory.total // MiB,
            used_mib=memory.used // MiB,
            free_mib=memory.free // MiB,
            utilization_pct=None if rates is None else rates.gpu,
            temperature_c=temperature,
            processes=processes,
            read_at=read_at,
            started=started,
        )
        reading = bracketed(reading, after.used // MiB, after.free // MiB)
        return reading if finish is None else finish(reading)

    def _memory(self, handle: Any) -> Any:
        """nvmlDeviceGetMemoryInfo (v2 where the binding has it: used without the driver's reserve)."""
        nv = self._nvml
        if self._v2:
            return self._call(
                "nvmlDeviceGetMemoryInfo", nv.nvmlDeviceGetMemoryInfo, handle, version=nv.nvmlMemory_v2
            )
        return self._call("nvmlDeviceGetMemoryInfo", nv.nvmlDeviceGetMemoryInfo, handle)

    async def close(self, timeout_s: float) -> None:
        """Let NVML go (shut down after its last user), after the calls under way; never waits on a hung
        call (nor past ``timeout_s``)."""
        self._closed = True
        if self.thread.hung_since is not None:
            log.warning(logfmt(msg="NVML left without nvmlShutdown: a call hangs", gpu=self.index))
        elif self._nvml is not None:
            with contextlib.suppress(GpuError):  # (timed out: logged by the thread)
                await self.thread.call(self._release, timeout_s)
        self.thread.stop()

    def _release(self) -> None:
        if self._nvml is not None:
            self._nvml = self._device = None
            NVML.release()


class GpuReader:
    """Reads one GPU through its source (gpu.reader: NVML, or nvidia-smi); concurrent readers share one
    running reading; the newest is kept for ``max_age`` readers and told to the listeners.

    ``read(max_age=...)`` may answer from a reading (or error) started less than ``max_age`` seconds ago;
    ``read_memory()`` always starts its own, smaller reading (no process list), for making room. The source
    is chosen at the first reading (``auto``: NVML when it loads, else nvidia-smi), and again after a reload
    that changes gpu.reader.
    """

    def __init__(
        self, shared: Shared, clock: Callable[[], float] = time.monotonic, *, index: int | None = None
    ):
        self.shared = shared
        #: The GPU read (nvidia-smi's ``-i``, NVML's index): gpu.index unless given.
        self.index = shared.config.gpu.index if index is None else index
        self.clock = clock
        self._inflight: asyncio.Task[GpuReading] | None = None
        self._last: tuple[float, GpuReading | GpuError] | None = None
        self._tasks: set[asyncio.Task[GpuReading]] = set()
        #: The source, for which gpu.reader; the one being chosen; queries of the sources it replaced.
        self._source: GpuSource | None = None
        self._source_for: str | None = None
        self._choosing: asyncio.Task[GpuSource] | None = None
        self._queries_before = 0
        #: Readings that failed (gpu_unavailable), and how many in a row since the last that answered.
        self.failures = 0
        self._failed_since_ok = 0
        #: Told of every whole reading (the broker measures its consumers' processes from it).
        self.listeners: list[Callable[[GpuReading], None]] = []
        #: pid -> consumer for a whole reading's processes (the broker's GpuProcesses.attribute): run off the
        #: event loop with the parsing, its answer kept in the reading's ``owners``.
        self.attribute: Callable[[GpuReading], Mapping[int, str]] | None = None

    @property
    def config(self) -> GpuConfig:
        return self.shared.config.gpu

    def __repr__(self) -> str:
        busy = "querying" if self._inflight is not None else "idle"
        return f"<GpuReader index={self.index} {self.reader or 'unchosen'} {busy} queries:{self.queries}>"

    @property
    def queries(self) -> int:
        """nvidia-smi processes started plus NVML readings made (for tests and the bench)."""
        return self._queries_before + (self._source.queries if self._source is not None else 0)

    @property
    def reader(self) -> str | None:
        """Which reads this GPU now: ``nvml`` or ``nvidia-smi`` (None before the first reading)."""
        return self._source.name if self._source is not None else None

    async def _current(self) -> GpuSource:
        """The source gpu.reader asks for now, chosen once (concurrent first readings share the choice)."""
        wanted = self.config.reader
        if self._source is not None and self._source_for == wanted:
            return self._source
        if self._choosing is None or self._choosing.done():
            self._choosing = asyncio.get_running_loop().create_task(self._choose(wanted))
        return await asyncio.shield(self._choosing)

    async def _choose(self, wanted: str) -> GpuSource:
        source: GpuSource
        if wanted == "nvidia-smi":
            source = SmiSource(self.index)
            log.info(logfmt(msg="gpu reader", gpu=self.index, reader=source.name))
        else:
            source = NvmlSource(self.index)
            try:
                driver = await source.open(self.config.query_timeout_s)
            except Exception as e:
                why = str(e)
                if not isinstance(e, GpuError):  # a bug (or a binding that raises what it should not)
                    why = describe(e)
                    self.shared.internal_error("loading NVML crashed", e, gpu=self.index, error=why)
                if wanted == "nvml":  # each reading tries again, gpu_unavailable meanwhile
                    log.error(logfmt(msg="gpu reader nvml did not load", gpu=self.index, error=why))
                else:
                    await source.close(self.config.query_timeout_s)
                    source = SmiSource(self.index)
                    log.info(logfmt(msg="gpu reader", gpu=self.index, reader=source.name, nvml=why))
            else:
                log.info(logfmt(msg="gpu reader", gpu=self.index, reader=source.name, driver=driver))
        old, self._source, self._source_for = self._source, source, wanted
        if old is not None:
            self._queries_before += old.queries
            await old.close(self.config.query_timeout_s)
        return source

    async def read(self, *, max_age: float = 0.0, own: bool = False) -> GpuReading:
        """A whole reading (the GPU's line and its processes). It shares one under way, or answers from one
        started less than ``max_age`` seconds ago; ``own``: a reading of its own, started now."""
        task = None if own else self._inflight
        if task is None and self._last is not None and self.clock() - self._last[0] < max_age and not own:
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
        if self._inflight is None or self._inflight.done():
            self._inflight = task
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._done, started))
        return task

    def _done(self, started: float, task: asyncio.Task[GpuReading]) -> None:
        """Keep the newest finished reading (or its error) for ``max_age`` readers, and tell the listeners
        of it. One begun before the newest and ending after it is not told: it is older news (it had the
        replaced process of a restarted consumer, and ended a hold on the new one's work)."""
        self._tasks.discard(task)
        if self._inflight is task:
            self._inflight = None
        if task.cancelled():
            return
        result: GpuReading | GpuError
        exc = task.exception()
        newest = self._last is None or started >= self._last[0]
        if exc is None:
            result = task.result()
            for listener in self.listeners if newest else ():
                try:
                    listener(result)
                except Exception as e:
                    self.shared.internal_error("gpu reading listener crashed", error=describe(e))
        elif isinstance(exc, GpuError):
            result = exc
        else:
            self.shared.internal_error("gpu read crashed", exc, error=describe(exc))
            result = GpuError(describe(exc))
        self._judge(result)
        if newest:
            self._last = (started, result)

    def _judge(self, result: GpuReading | GpuError) -> None:
        """Count a failed reading, and say in the log when readings begin to fail and when they answer
        again (once each: a poll every second would repeat it)."""
        if isinstance(result, GpuError):
            self.failures += 1
            self._failed_since_ok += 1
            if self._failed_since_ok == 1:
                log.warning(logfmt(msg="gpu readings failing", gpu=self.index, error=str(result)))
        elif self._failed_since_ok:
            log.info(logfmt(msg="gpu readings answer again", gpu=self.index, failed=self._failed_since_ok))
            self._failed_since_ok = 0

    async def read_memory(self) -> GpuReading:
        """A reading of its own of the GPU's line alone (no process list), not shared or kept: what making
        room needs (one nvidia-smi instead of two)."""
        started, read_at = self.clock(), time.time()
        try:
            source = await self._current()
            reading = possible(
                await source.read(self.config, whole=False, started=started, read_at=read_at, finish=None)
            )
        except GpuError as e:
            self._judge(e)
            raise
        self._judge(reading)
        return reading

    def last_free_mib(self) -> int | None:
        """Free MiB from the newest finished reading, without reading again."""
        reading = self.last_reading()
        return reading.free_mib if reading is not None else None

    def last_reading(self) -> GpuReading | None:
        """The newest finished whole reading (None: none yet, or the newest failed), without reading again."""
        result = self._last[1] if self._last else None
        return result if isinstance(result, GpuReading) else None

    async def _query(self, started: float) -> GpuReading:
        read_at = time.time()
        source = await self._current()
        return possible(
            await source.read(
                self.config, whole=True, started=started, read_at=read_at, finish=self._attributed
            )
        )

    def _attributed(self, reading: GpuReading) -> GpuReading:
        """A whole reading with its processes attributed (in the source's worker thread)."""
        if self.attribute is None:
            return reading
        try:
            owners = self.attribute(reading)
        except Exception as e:  # a bug: the reading still serves, its processes unattributed
            self.shared.internal_error("attributing gpu processes crashed", error=describe(e))
            owners = {}
        return replace(reading, owners=owners)

    async def close(self) -> None:
        tasks = [*self._tasks, *filter(None, [self._choosing])]
        await cancel_until_done(tasks, f"shutting down: GPU {self.index}'s readings")
        if self._source is not None:
            await self._source.close(self.config.query_timeout_s)


# =====================================================================================================
# Consumers and health
# =====================================================================================================


class ConsumerState:
    """What the broker knows of one consumer. Residency, health and measured memory change only through
    the transitions below (named for what happened); the health probes, the GPU readings and the
    scheduler call them, and nothing else writes these fields.

    ``resident`` and ``healthy`` are True, False or None (unknown). ``trusted`` says whether a resident
    record may be acted on without reading the GPU: only while nothing since the record could have changed
    it (see ``touched``). ``stopped``: a consumer started by a command whose service is not running (the
    broker stopped it, or it is down): unhealthy, but no fault; a job starts it.

    ==============  ========================================  ===============  =======  =========
    transition      when                                      resident         healthy  trusted
    ==============  ========================================  ===============  =======  =========
    probed          a health probe ended                      as reported [1]  verdict  [4]
    came_up         a health wait after a load command: 2xx                    True
    was_stopped     its unload command succeeded                               stopped
    seen_down       a job, hold or WebSocket found it gone    unknown [2]      False    cleared
    timed_out       a job got no answer in its timeout_s      (kept) [2]       False    cleared
    touched         something may have changed its memory                               cleared [3]
    unloading       the broker starts an unload               unknown                   cleared
    unloaded        its unload succeeded (and freed) [5]      False
    unconfirmed     its unload answered, too little came free unknown
    unload_failed   its unload failed or was cut              unknown
    loading         the broker starts a load                  unknown                   cleared
    loaded          its load succeeded                        True                      set
    load_failed     its load failed or was cut                unknown
    served          a job on one of its paths answered 2xx    True, last use            set
    used            a hold of it ended                        last use
    measured        a reading attributed its processes        as measured [1]           [4]
    ==============  ========================================  ===============  =======  =========

    [1] Observations (a probe's report, a reading's measurement) change residency only when they started
    after the broker's own last record (unloaded, loaded, served...), so an answer already on its way when
    the broker acted cannot undo what it did; among observations the latest wins. A consumer with
    ``processes`` is resident exactly when a reading finds its processes holding at least half its
    ``vram_resident_mib``; what it reports of itself is then not asked (memory cannot be wrong about
    memory).
    [2] Not resident for a consumer started by a command: its process is gone (stopped), a job starts it
    again. A probe of one that finds nothing accepting connections finds it stopped too.
    [3] Another consumer's job or load on its GPU, a mount call outside its paths, its processes changing
    between readings (a restart), a health round missed.
    [4] A failed probe clears it. An observation that finds it resident sets it, unless something put it
    in doubt after that observation began.
    [5] An eviction (or a yield) also waits for its memory to come free (free memory rising, or for one
    measured by its processes, those no longer holding it); if some but not most does in vram_wait_s, or
    a measured one's processes still hold it, it is ``unconfirmed``.
    While the broker unloads or loads it, observations change its memory figures but not its residency.
    """

    def __init__(
        self, name: str = "", clock: Callable[[], float] = time.monotonic, events: Events | None = None
    ) -> None:
        self.name = name
        self.clock = clock
        #: Where a change of health is published (None: nowhere, as in the scheduler's unit tests).
        self.events = events
        self.resident: bool | None = None
        self.trusted = False
        self.healthy: bool | None = None
        #: Unhealthy because its service is not running, not by fault: started by a command, and stopped by
        #: the broker or found not accepting connections. Shown as "stopped", logged at info.
        self.stopped = False
        #: Wall-clock time of the last probe (for people), its failure reason and the error code a request
        #: gets while it failed: consumer_unreachable or bad_consumer_url.
        self.last_probe: float | None = None
        self.last_error: str | None = None
        self.last_error_code = "consumer_unreachable"
        #: Monotonic time of the last use (a job's 2xx answer or a hold's end: for LRU and idleness).
        self.last_used: float | None = None
        #: Monotonic time the broker last saw it become resident (for idleness; found resident first after a
        #: restart, its remembered last use).
        self.resident_at: float | None = None
        #: MiB its processes held at the last reading (None: not measured), and the most ever seen.
        self.used_mib: int | None = None
        #: Measured by its processes (``processes``) and its last reading showed what they hold: False while
        #: one of its processes' memory is not shown (``[N/A]``: a GPU under WDDM or WSL2); it is then known
        #: as an unmeasured one is, by what it says and what the broker did.
        self.measurable = True
        self.peak_mib: int | None = None
        #: The pids seen holding its memory at the last reading (a change is a restart).
        self.pids: frozenset[int] = frozenset()
        #: Recent load, unload and job times (seconds), for the running medians the scheduler plans with.
        self._samples: dict[str, deque[float]] = {}
        #: Their medians, each made when first asked after a new sample (a job's end asks for all three).
        self._medians: dict[str, float] = {}
        #: When the residency was last decided (a record or an observation); older observations lose.
        self._decided_at = float("-inf")
        #: The broker's own unload or load of it is under way: observations wait for its end; of those, a
        #: load (its health is that load's to wait for: a job that comes meanwhile is not refused for it).
        self._acting = False
        self.being_loaded = False
        #: When something last put its residency in doubt: older observations do not restore trust.
        self._touched_at = float("-inf")
        #: A job found it failing at this time: only probes started later may make it healthy again.
        self._down_at = float("-inf")
        #: A health wait found it up at this time: failing probes started earlier do not mark it down.
        self._up_at = float("-inf")
        #: When the broker's last load of it failed, and why (None: none since it last loaded).
        self._load_failed: tuple[float, str] | None = None

    def __repr__(self) -> str:
        return (
            f"<ConsumerState {self.name} resident={self.resident} healthy={self.healthy}"
            f" trusted={self.trusted} used_mib={self.used_mib}>"
        )

    # ---- residency ----------------------------------------------------------------------------------

    def _set_resident(
        self, resident: bool | None, source: str, at: float | None = None, *, found: bool = False
    ) -> None:
        """The one place residency is written; a change is logged with what decided it. ``found``: seen
        (a probe, a reading), not made so by the broker's own load or a job."""
        now = self.clock()
        first = self._decided_at == float("-inf")
        self._decided_at = now if at is None else at
        if resident == self.resident:
            return
        if resident is True:
            # Found resident when first seen, with a last use a restart kept (the state file): it has been
            # resident since then as far as anyone knows, so its idle time runs from that use, not from this
            # finding. (One loaded since, by the broker or by hand, gets its whole idle_unload_s, as ever.)
            used = self.last_used if found and first else None
            self.resident_at = now if used is None else min(now, used)
        self.resident = resident
        log.info(logfmt(msg="residency", consumer=self.name, loaded=resident, source=source))

    def _observed(self, resident: bool, source: str, started: float) -> None:
        """What the consumer said or a reading showed, as of when that began: resident or not, and (if
        nothing has put it in doubt since it began) to be trusted."""
        if started >= self._decided_at and not self._acting:
            self._set_resident(resident, source, started, found=True)
            if resident and started >= self._touched_at:
                self.trusted = True

    def _acted(self, resident: bool | None, source: str) -> None:
        """The broker's own unload or load ended: it decides residency (as of now)."""
        self._acting = self.being_loaded = False
        self._set_resident(resident, source)

    def unloading(self) -> None:
        self.trusted = False
        self._set_resident(None, "unloading")
        self._acting = True

    def unloaded(self) -> None:
        self._acted(False, "unloaded")

    def unconfirmed(self) -> None:
        self._acted(None, "unload answered, memory not freed")

    def unload_failed(self) -> None:
        self._acted(None, "unload failed")

    def loading(self) -> None:
        self.trusted = False
        self._set_resident(None, "loading")
        self._acting = self.being_loaded = True

    def loaded(self) -> None:
        self._acted(True, "loaded")
        self.trusted = True
        self._load_failed = None

    def load_failed(self, why: str) -> None:
        self._acted(None, "load failed")
        self._load_failed = (self.clock(), why)

    def start_failed_since(self, arrived: float) -> str | None:
        """Why the broker's start of it failed after ``arrived`` (a job's arrival), while it is still
        stopped: a job let in to wait for that start is answered so, not given one more start."""
        failed = self._load_failed
        return failed[1] if failed is not None and failed[0] >= arrived and self.stopped else None

    def served(self) -> None:
        """A job on one of its paths answered 2xx: it is resident (it just worked) and was used now."""
        self._set_resident(True, "served")
        self.trusted = True
        self.used()

    def used(self) -> None:
        self.last_used = self.clock()

    def touched(self, why: str) -> None:
        """Something may have changed its memory unseen: act on its residency only after a reading."""
        if self.trusted:
            log.debug(logfmt(msg="residency unverified", consumer=self.name, reason=why))
        self.trusted = False
        self._touched_at = self.clock()

    def measured(self, mib: int | None, pids: frozenset[int], resident: bool | None, started: float) -> None:
        """A reading (started at ``started``) found its processes holding ``mib`` MiB (None: the memory of
        one of them is not shown), which is ``resident`` (None: the reading cannot tell)."""
        if self.pids and not self.pids <= pids:
            self.touched("its processes changed (restarted?)")
        self.used_mib, self.pids, self.measurable = mib, pids, mib is not None
        if mib is not None:
            self.peak_mib = max(self.peak_mib or 0, mib)
        if resident is not None:
            self._observed(resident, "measured", started)

    # ---- health -------------------------------------------------------------------------------------

    def probed(
        self,
        ok: bool,
        reason: str | None,
        code: str,
        started: float,
        reported: bool | None = None,
        *,
        stopped: bool = False,
    ) -> bool:
        """A probe that started at ``started`` ended; ``reported``: the residency it told; ``stopped``: it
        failed because the service (started by a command) is not running. Whether it counted (a probe older
        than what a job or a health wait found since is ignored)."""
        self.last_probe = time.time()
        if (ok and started < self._down_at) or (not ok and started < self._up_at):
            return False
        self._set_health(ok, reason, code, stopped=stopped)
        if not ok:
            self.touched(f"probe failed: {reason}")
        if reported is not None:
            self._observed(reported, "health", started)
        return True

    def came_up(self) -> None:
        """A health wait after a load command found it answering."""
        self._up_at = self.clock()
        self._set_health(True, None, "consumer_unreachable")

    def was_stopped(self, reason: str) -> None:
        """The broker stopped it (its unload command succeeded): stopped until a probe started after now,
        or the health wait after its load command, finds it up. Its residency is the unload's to decide."""
        self._down_at = self.clock()
        self._set_health(False, reason, "consumer_unreachable", stopped=True)

    def cannot_be_started(self) -> None:
        """A reload took the load command of a stopped service away: nothing starts it any more, so it is
        down, as a consumer that is not running is (a job asks a probe before its refusal), until a probe
        finds it up."""
        if self.stopped:
            self._set_health(False, f"{self.last_error}; no load command starts it", "consumer_unreachable")

    def seen_down(self, reason: str, *, stopped: bool = False) -> None:
        """A job, a hold or a WebSocket found it gone (refused, reset): unhealthy until a probe started
        after now succeeds; its residency unknown (``stopped``: not resident, a service started by
        command, which is then stopped)."""
        self._down_at = self.clock()
        self._set_health(False, reason, "consumer_unreachable", stopped=stopped)
        self.trusted = False
        if not self._acting:  # (a service the broker is starting refuses until it listens: expected)
            self._set_resident(False if stopped else None, "seen down")

    def timed_out(self, reason: str) -> None:
        """A job got no answer in time, or a start's health wait gave up on one that runs (an error status,
        no answer): unhealthy until a later probe succeeds; alive (it took the connection), so its residency
        stays, in doubt: a service started by command still runs, holding its memory."""
        self._down_at = self.clock()
        self._set_health(False, reason, "consumer_unreachable")
        self.trusted = False

    def _set_health(self, ok: bool, reason: str | None, code: str, *, stopped: bool = False) -> None:
        """The one place health is written; a change is logged and published (a consumer stopped, not
        failing, at info)."""
        stopped = stopped and not ok
        if ok != self.healthy or stopped != self.stopped:
            if stopped:
                log.info(logfmt(msg="stopped", consumer=self.name, reason=reason))
            else:
                log.log(
                    logging.INFO if ok else logging.WARNING,
                    logfmt(msg="health", consumer=self.name, healthy=ok, reason=reason),
                )
            if self.events is not None:
                self.events.publish("health", consumer=self.name, healthy=ok, reason=reason, stopped=stopped)
        self.healthy, self.stopped, self.last_error, self.last_error_code = ok, stopped, reason, code

    # ---- what it takes ------------------------------------------------------------------------------

    def learned(self, what: str, seconds: float) -> None:
        """One more sample of what a ``load``, an ``unload`` or a ``job`` of it took (the scheduler's)."""
        self._samples.setdefault(what, deque(maxlen=TIMING_SAMPLES)).append(seconds)
        self._medians.pop(what, None)

    def timing(self, what: str) -> float | None:
        """The running median of its recent ``load``, ``unload`` or ``job`` times; None until one is seen."""
        median = self._medians.get(what)
        if median is None:
            samples = self._samples.get(what)
            if not samples:
                return None
            median = self._medians[what] = statistics.median(samples)
        return median

    def samples(self) -> dict[str, list[float]]:
        """Its recent load, unload and job times, oldest first (for the state file)."""
        return {what: list(samples) for what, samples in self._samples.items() if samples}

    def remembered(self, used_ago_s: float | None, samples: Mapping[str, Sequence[float]]) -> None:
        """What the state file kept of it, read at start: its last use (``used_ago_s`` seconds ago) and its
        recent times, as if this broker had seen them."""
        if used_ago_s is not None:
            self.last_used = self.clock() - used_ago_s
        for what, values in samples.items():
            self._samples[what] = deque(values, maxlen=TIMING_SAMPLES)
            self._medians.pop(what, None)

    def timings(self) -> dict[str, float | None]:
        """Its learned figures as /v1/status and the ``learned`` event show them (seconds; None: not seen)."""
        return {
            f"{what}_s": None if (median := self.timing(what)) is None else round(median, 3) for what in TIMED
        }

    # ---- derived ------------------------------------------------------------------------------------

    def known_resident(self) -> bool:
        """Resident by a record nothing has put in doubt since: a job may go without a GPU reading."""
        return self.resident is True and self.trusted

    def residency_answer(self) -> str:
        """What its record says of its residency, as the ``residency_asked`` event words it."""
        if self.known_resident():
            return "resident"
        if self.resident is False:
            return "not resident"
        return f"no answer ({self.last_error})" if self.healthy is False else "cannot tell"

    def failing(self) -> BrokerError | None:
        """What a job for it is refused while it is marked failing (by a probe or a failed connection) and is
        not stopped (a job starts a stopped one): consumer_unreachable, or bad_consumer_url; else None."""
        if self.healthy is not False or self.stopped:
            return None
        message = f"upstream {self.name} last probe failed: {self.last_error}"
        return BrokerError(self.last_error_code, message, self.name)

    def idle_since(self) -> float | None:
        """Since when a resident consumer has not been used: its last use or its becoming resident."""
        times = [t for t in (self.last_used, self.resident_at) if t is not None]
        return max(times) if times else None


#: Largest JSON answer read from a residency query or a for_each listing.
QUERY_ANSWER_LIMIT = 1 * MiB
#: How many failed elements a failed for_each unload names (the rest are counted): a listing of 1 MiB may
#: hold 500,000 elements, and the message goes into the answer, the log, an event and the reservation.
FOR_EACH_NAMED = 5
#: A ``{field}`` placeholder, as in hold_until paths.
PLACEHOLDER = re.compile(r"{(\w+)}")


def _field(data: Any, dotted: str) -> Any:
    """The value at a dotted field of a JSON object (``status.value``); None when missing."""
    for name in dotted.split("."):
        if not isinstance(data, dict) or name not in data:
            return None
        data = data[name]
    return data


def matches(data: Any, where: Sequence[tuple[str, tuple[Any, ...]]]) -> bool:
    """Whether a JSON value holds, at each field of ``where``, one of its values (true is not 1)."""
    for name, values in where:
        found = _field(data, name)
        if not any(found == v and isinstance(found, bool) == isinstance(v, bool) for v in values):
            return False
    return True


def query_elements(query: JsonQuery, answer: Any) -> list[Any]:
    """The elements of the answer's list at ``query.items`` that match ``query.where``; CallError when the
    answer has no such list."""
    listed = answer.get(query.items) if isinstance(answer, dict) and query.items else None
    if not isinstance(listed, list):
        raise CallError(f"{query.method} {query.path} answered no list at {query.items!r}")
    return [element for element in listed if matches(element, query.where)]


def query_resident(query: JsonQuery, answer: Any) -> bool:
    """Residency from a query's answer: a listed element matches, or (without items) the answer does."""
    if query.items is not None:
        return bool(query_elements(query, answer))
    if not isinstance(answer, dict):
        raise CallError(f"{query.method} {query.path} answered no JSON object")
    return matches(answer, query.where)


def fill_placeholders(route: Route, element: Any) -> tuple[str, Any]:
    """The path and body of one call of a for_each unload: ``{field}`` filled from the element's top-level
    fields (``{item}``: the element itself, when it is no object), percent-encoded in the path as in
    hold_until; in the body's strings as they are, a string that is one whole placeholder taking the
    field's JSON value. KeyError names a field the element lacks; ValueError one whose value, empty, '.' or
    '..', would make the path another route (``/api/ps/..`` is ``/api/``)."""
    fields = element if isinstance(element, dict) else {"item": element}

    def value(name: str) -> Any:
        if name not in fields:
            raise KeyError(name)
        return fields[name]

    def segment(name: str) -> str:
        encoded = quote(str(value(name)), safe="")
        if encoded in ("", ".", ".."):
            raise ValueError(f"its {name!r} {encoded!r} cannot fill a path")
        return encoded

    def fill(node: Any) -> Any:
        if isinstance(node, str):
            whole = PLACEHOLDER.fullmatch(node)
            if whole:
                return value(whole.group(1))
            return PLACEHOLDER.sub(lambda m: str(value(m.group(1))), node)
        if isinstance(node, dict):
            return {key: fill(v) for key, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node

    path = PLACEHOLDER.sub(lambda m: segment(m.group(1)), route.path)
    return path, fill(route.body)


class Consumers:
    """The broker's HTTP calls to consumers of its own accord (health, load, unload) and their state."""

    def __init__(
        self,
        shared: Shared,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
        events: Events | None = None,
    ):
        self.shared = shared
        self.session = session
        self.clock = clock
        self.events = events or Events()
        self.states: dict[str, ConsumerState] = {name: self.new_state(name) for name in self.config.consumers}
        #: Why each consumer's residency query last failed (logged when it changes), by name.
        self.residency_errors: dict[str, str] = {}
        #: Told when a consumer is seen gone (the broker ends its holds): (name, reason).
        self.gone_listeners: list[Callable[[str, str], None]] = []
        #: Whether a job or hold of the consumer holds a GPU lock now (the broker asks its locks).
        self.busy: Callable[[str], bool] = lambda name: False
        #: On-demand probes under way, shared by the jobs that wait for them.
        self._probing: dict[str, asyncio.Task[None]] = {}
        #: Whose each GPU process is, and what each measured consumer holds.
        self.processes = GpuProcesses(shared, self.states, self.gone_listeners, clock)

    @property
    def config(self) -> Config:
        return self.shared.config

    def new_state(self, name: str) -> ConsumerState:
        return ConsumerState(name, self.clock, self.events)

    def forget(self, name: str) -> None:
        """What is known of ``name``, a consumer a reload removed and of which nothing runs any more (no job,
        no unload): its state, its last residency error, its warning of memory over its declared size."""
        del self.states[name]
        self.residency_errors.pop(name, None)
        self.processes.forget(name)

    async def unload(self, name: str) -> None:
        c = self.config.consumers.get(name)
        if c is None or c.unload is None:
            raise CallError("unload: no unload route (any more)")
        if isinstance(c.unload, Command):
            state = self.states[name]  # (the service it stops: a reload meanwhile may make another)
            await self._run(c, c.unload, "unload")
            if c.started_by_command:  # (its load starts it again: stopped, not failing)
                state.was_stopped("stopped by its unload command")
        elif c.unload.for_each is not None:
            await self._unload_each(c, c.unload, c.unload.for_each)
        else:
            await self._call(c, c.unload, "unload")

    async def _unload_each(self, c: ConsumerConfig, route: Route, listing: JsonQuery) -> None:
        """The unload route once per element the listing lists, all within the unload's ``timeout_s``; every
        element is tried, and any failure makes the unload fail (CallError naming each)."""
        deadline = self.clock() + route.timeout_s
        answer = await self._query(c, listing, route.timeout_s, "unload")
        failures = []
        elements = query_elements(listing, answer)
        for element in elements:
            label = json.dumps(element)[:100]
            try:
                path, body = fill_placeholders(route, element)
            except KeyError as e:
                failures.append(f"{label} has no field {e.args[0]!r}")
                continue
            except ValueError as e:
                failures.append(f"{label}: {e}")
                continue
            left = deadline - self.clock()
            if left <= 0:
                failures.append(f"{label}: not tried, the unload took its {route.timeout_s:g} s")
                continue
            try:
                # (data=None: the filled body is serialised anew, not the template's.)
                filled = replace(route, path=path, body=body, data=None, timeout_s=left)
                await self._call(c, filled, "unload")
            except CallError as e:
                failures.append(f"{label}: {e}")
        log.info(logfmt(msg="unload each", consumer=c.name, listed=len(elements), failed=len(failures)))
        if failures:
            more = len(failures) - FOR_EACH_NAMED
            named = "; ".join(failures[:FOR_EACH_NAMED]) + (f"; and {more} more" if more > 0 else "")
            raise CallError(f"unload of {len(failures)} of {len(elements)}: {named}")

    async def _query(self, c: ConsumerConfig, query: JsonQuery, timeout_s: float, what: str) -> Any:
        """A query's JSON answer (2xx, at most QUERY_ANSWER_LIMIT); CallError otherwise."""
        where = f"{what}: {query.method} {query.path}"
        try:
            async with self.session.request(
                query.method,
                c.url + query.path,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as resp:
                body = bytearray()
                while len(body) <= QUERY_ANSWER_LIMIT and (
                    chunk := await resp.content.read(QUERY_ANSWER_LIMIT + 1 - len(body))
                ):
                    body += chunk
                status = resp.status
        except asyncio.TimeoutError:
            raise CallError(f"{where} did not answer within {timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise CallError(f"{where} failed: {describe(e)}") from e
        if not 200 <= status < 300:
            raise CallError(f"{where} answered {status}: {body[:200].decode(errors='replace').strip()}")
        answer = parse_json(body) if len(body) <= QUERY_ANSWER_LIMIT else None
        if answer is None:
            raise CallError(f"{where} answered no JSON (or more than {QUERY_ANSWER_LIMIT // MiB} MiB)")
        return answer

    async def read_residency(self, c: ConsumerConfig, state: ConsumerState, timeout_s: float) -> bool | None:
        """What its residency query (``residency``, else its for_each listing) says, within ``timeout_s``;
        None when it has none or the answer cannot tell (logged when that changes, unless a reload made
        ``state`` another service's, or nobody's, meanwhile: then it is not its finding)."""
        query = c.residency_query
        if query is None:
            return None
        try:
            if timeout_s <= 0:
                raise CallError(f"residency: no time left of the probe's {self.config.health.timeout_s:g} s")
            answer = await self._query(c, query, timeout_s, "residency")
            resident = query_resident(query, answer)
        except CallError as e:
            if self.states.get(c.name) is not state:
                return None
            if self.residency_errors.get(c.name) != str(e):
                log.warning(logfmt(msg="residency unknown", consumer=c.name, error=str(e)))
            self.residency_errors[c.name] = str(e)
            return None
        if self.states.get(c.name) is state and self.residency_errors.pop(c.name, None) is not None:
            log.info(logfmt(msg="residency readable again", consumer=c.name))
        return resident

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
        state = self.states[name]  # (the service it starts: a reload meanwhile may make another)
        await self._run(c, c.load, "load")
        await self._wait_healthy(c, state, deadline, c.load.timeout_s)

    async def _run(self, c: ConsumerConfig, command: Command, what: str) -> None:
        """Run a load or unload command; anything but exit 0 in time is a CallError with its stderr."""
        started = self.clock()
        try:
            done = await run_process(command.argv, command.timeout_s)
        except OSError as e:
            raise CallError(f"{what} command cannot run {command.argv[0]}: {e.strerror or e}") from e
        except ProcessTimeout as e:
            raise CallError(
                f"{what} command did not finish within {command.timeout_s:g} s (killed):"
                f" {stderr_tail(e.stderr)}"
            ) from None
        except asyncio.CancelledError:  # (only the broker's stop cuts a command: run_process killed it)
            ms = round((self.clock() - started) * 1000)
            log.warning(
                logfmt(msg="command cut", consumer=c.name, action=what, argv=shlex.join(command.argv), ms=ms)
            )
            raise
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

    async def _wait_healthy(
        self, c: ConsumerConfig, state: ConsumerState, deadline: float, timeout_s: float
    ) -> None:
        """Poll the health route every HEALTH_WAIT_POLL_S until it answers 2xx (``state`` came up), at most
        until ``deadline``. One whose last try found it running (an error status, no answer in time: not a
        refused connection) is down, not stopped: the next job is refused as any down consumer's is."""
        reason, running = "not asked", False
        while True:
            left = deadline - self.clock()
            if left <= 0:
                if running and self.states.get(c.name) is state:
                    state.timed_out(reason)
                raise CallError(f"load: not healthy within {timeout_s:g} s of the command's start ({reason})")
            started = self.clock()
            try:
                timeout = aiohttp.ClientTimeout(total=min(left, self.config.health.timeout_s))
                async with self.session.request(
                    c.health.method, c.url + c.health.path, timeout=timeout, allow_redirects=False
                ) as resp:
                    await resp.content.read(64 * 1024)
                    if 200 <= resp.status < 300:
                        state.came_up()
                        return
                    reason, running = f"health answered {resp.status}", True
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                reason, running = describe(e), gone_reason(e, refused_only=True) is None
            await asyncio.sleep(max(0.0, min(HEALTH_WAIT_POLL_S - (self.clock() - started), left)))

    async def _call(self, c: ConsumerConfig, route: Route, what: str) -> None:
        url = c.url + route.path
        timeout = aiohttp.ClientTimeout(total=route.timeout_s)
        headers = {"Content-Type": "application/json"} if route.data is not None else None
        try:
            async with self.session.request(
                route.method, url, data=route.data, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                body = await resp.content.read(2000)
                if not 200 <= resp.status < 300:
                    text = body.decode(errors="replace").strip()[:200]
                    raise CallError(f"{what} answered {resp.status}: {text}")
        except asyncio.TimeoutError:
            raise CallError(f"{what} did not answer within {route.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as e:
            raise CallError(f"{what} failed: {describe(e)}") from e

    def job_failed(
        self, name: str, exc: BaseException | None, reason: str, *, called: ConsumerConfig | None = None
    ) -> None:
        """A job (or a WebSocket) could not reach the consumer or got no answer: unhealthy until a probe
        started after now succeeds; gone (refused, reset) also ends its holds. ``called``: the config the
        call was made with; if a reload made the consumer a new service since, the old one's failure is
        not the new one's (logged, nothing recorded)."""
        c, state = self.config.consumers.get(name), self.states.get(name)
        if c is None or state is None:
            return
        if called is not None and not same_service(self.config, called):
            msg = "not recorded: a reload replaced or removed the service"
            log.info(logfmt(msg=msg, consumer=name, failed=reason))
            return
        if exc is not None and gone_reason(exc) is not None:
            self.gone(name, reason)
        else:
            state.timed_out(reason)

    def gone(self, name: str, reason: str, *, seen_by: str | None = None) -> None:
        """The consumer was seen gone: its state says so, and whoever waits on its work is told (``seen_by``
        what, for them)."""
        c, state = self.config.consumers.get(name), self.states.get(name)
        if c is None or state is None:
            return
        state.seen_down(reason, stopped=c.started_by_command)
        for listener in self.gone_listeners:
            listener(name, f"{seen_by}: {reason}" if seen_by else reason)

    async def probe(self, name: str) -> None:
        """One health probe: its verdict, and the residency the consumer reports (health's ``loaded``;
        a command-started service: up is resident, down is not). A consumer measured by its processes
        reports nothing here: the readings tell. The health call and the residency query after it take
        health.timeout_s together."""
        c = self.config.consumers.get(name)
        state = self.states.get(name)
        if c is None or state is None:
            return
        started = self.clock()
        loaded: Any = None
        code = "consumer_unreachable"
        error: BaseException | None = None
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
            left = started + self.config.health.timeout_s - self.clock()
            if ok and (reported := await self.read_residency(c, state, left)) is not None:
                loaded = reported  # its residency query outranks its health's "loaded"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
            ok, reason, code, error = False, describe(e), failure_code(e), e
            if out_of_descriptors(e):
                # The broker's own shortage (counted and logged where the connection failed): it tells
                # nothing of the consumer.
                log.debug(logfmt(msg="health probe skipped: out of descriptors", consumer=name))
                return
            if isinstance(e, asyncio.TimeoutError) and self.busy(name):
                # A consumer busy with a GPU job may answer its health route slowly: not a failure.
                log.debug(logfmt(msg="health probe timed out while busy", consumer=name))
                return
        if self.states.get(name) is not state:  # a reload made it a new service meanwhile: not its finding
            msg = "not recorded: a reload replaced or removed the service"
            log.info(logfmt(msg=msg, consumer=name, probe=reason or "healthy"))
            return
        if c.started_by_command and not isinstance(loaded, bool):
            # A service started by command holds its model while it runs (unless an HTTP unload let it go:
            # ``process_is_model``): up is resident, not running (refused) is not; one that did not answer
            # in time still runs: that tells nothing.
            refused = error is not None and gone_reason(error, refused_only=True) is not None
            up = True if c.process_is_model else None
            loaded = up if ok else (False if refused else None)
        reported = (
            loaded if isinstance(loaded, bool) and (c.processes is None or not state.measurable) else None
        )
        # A service started by command that accepts no connection is not running: stopped, not failing.
        stopped = (
            c.started_by_command and error is not None and gone_reason(error, refused_only=True) is not None
        )
        counted = state.probed(ok, reason, code, started, reported, stopped=stopped)
        if counted and error is not None and gone_reason(error, refused_only=True) is not None:
            self.gone(name, reason or "gone", seen_by="health probe")  # its work died with it

    async def probe_now(self, name: str) -> None:
        """Probe once more right away (a job for a consumer marked unhealthy asks before refusing it);
        jobs that ask at once share one probe, which goes on if they leave (``close`` ends it). Bounded by
        health.timeout_s, like every probe."""
        task = self._probing.get(name)
        if task is None:
            task = asyncio.ensure_future(self._probe_counted(name))
            self._probing[name] = task
            task.add_done_callback(lambda _: self._probing.pop(name, None))
        await asyncio.shield(task)

    async def _probe_counted(self, name: str) -> None:
        try:
            await self.probe(name)
        except Exception as e:  # a bug: counted once, whoever waits for it (or nobody does); its record stays
            self.shared.internal_error("health probe crashed", e, consumer=name)

    async def close(self) -> None:
        """The broker's shutdown: the probes on demand under way end."""
        await cancel_until_done(list(self._probing.values()), "shutting down: probes")

    async def probe_all(self) -> None:
        """A probe of every consumer, each to its end whatever another's does; a bug in one is counted."""
        names = list(self.config.consumers)
        done = await asyncio.gather(*(self.probe(name) for name in names), return_exceptions=True)
        for name, result in zip(names, done, strict=True):
            if isinstance(result, Exception):
                self.shared.internal_error("health probe crashed", result, consumer=name)

    async def run_health(self) -> None:
        """After the first round, probe every consumer every ``health.interval_s``; owned by the app.

        A round that starts much later than due (the event loop stalled, the machine slept) may have missed
        a restart: every resident record then needs a reading before it is acted on. (Sleep shows on the
        boot clock only: the monotonic one, which the loop's timers follow, stands still meanwhile.)
        """
        while True:
            interval = self.config.health.interval_s
            due, boot_due = self.clock() + interval, boot_clock() + interval
            await asyncio.sleep(interval)
            late = max(self.clock() - due, boot_clock() - boot_due)
            try:
                if late > self.config.health.interval_s + self.config.health.timeout_s:
                    log.warning(logfmt(msg="health round late", late_s=round(late, 1)))
                    for state in self.states.values():
                        state.touched("a health round was missed")
                await self.probe_all()
            except Exception as e:
                self.shared.internal_error("health round crashed", error=describe(e))

    def owners(self) -> dict[int, str]:
        """pid -> consumer, from the latest readings of every GPU (``GpuProcesses``)."""
        return self.processes.owners()


class GpuProcesses:
    """Whose each process in a GPU's list is (the consumers' ``processes``: by name, and by the unit in its
    cgroups), and what each measured consumer holds, from each whole reading."""

    def __init__(
        self,
        shared: Shared,
        states: Mapping[str, ConsumerState],
        gone_listeners: list[Callable[[str, str], None]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.shared = shared
        #: The consumers' states (``Consumers``'): what each holds is recorded there.
        self.states = states
        #: Told when a consumer's processes were all replaced (it restarted): (name, reason).
        self.gone_listeners = gone_listeners
        self.clock = clock
        #: pid -> consumer, from each GPU's latest reading with a process list.
        self._owners: dict[int, dict[int, str]] = {}
        #: Consumers measured above their declared vram_resident_mib (warned once).
        self._over: set[str] = set()
        #: Where a process's cgroups are read (``/proc``; a test may point it elsewhere).
        self.proc_root = Path("/proc")
        #: Per GPU: pid -> (its name in nvidia-smi's list, when its cgroups were read, its cgroup paths), of
        #: the processes of that GPU's latest reading whose unit was looked at. Written by attribute(), in
        #: worker threads, under the lock.
        self._cgroups: dict[int, dict[int, tuple[str | None, float, list[str]]]] = {}
        #: Per GPU: pid -> consumer, as attribute() gave it last (under the lock): a pid that loses its name
        #: stays whose it was.
        self._attributed: dict[int, dict[int, str]] = {}
        self._cgroups_lock = threading.Lock()

    @property
    def config(self) -> Config:
        return self.shared.config

    def attribute(self, reading: GpuReading) -> dict[int, str]:
        """pid -> consumer for a reading's processes: the consumers of that GPU that say how to recognise
        theirs (``processes``). Runs in a worker thread, with the parsing; a process's cgroups are read once
        and kept while it stays in the GPU's list under its name (CGROUP_CACHE_S at most)."""
        measured = [
            c for c in self.config.consumers.values() if c.gpu == reading.index and c.processes is not None
        ]
        if not measured:
            return {}
        index = reading.index if reading.index is not None else -1
        names = {p.pid: p.name for p in reading.processes if p.pid is not None}
        with self._cgroups_lock:
            known, seen = self._cgroups.get(index, {}), {}
            now = self.clock()

            def cgroups_of(pid: int) -> list[str]:
                entry = known.get(pid)
                if entry is None or entry[0] != names.get(pid) or now - entry[1] >= CGROUP_CACHE_S:
                    entry = (names.get(pid), now, self.cgroups_of(pid))
                seen[pid] = entry
                return entry[2]

            owners = process_owners(reading.processes, measured, cgroups_of)
            # A process that exits loses its name (its /proc cmdline is empty) a moment before its memory
            # goes, and a pid is not reused while it is listed: one that was a consumer's and has no name
            # now is still that consumer's memory (not a stranger's).
            before = self._attributed.get(index, {})
            theirs = {c.name for c in measured if lingering(c.processes, None)}
            for pid, name in names.items():
                if name is None and pid not in owners and before.get(pid) in theirs:
                    owners[pid] = before[pid]
            self._attributed[index] = owners
            self._cgroups[index] = seen  # a pid gone from the list is forgotten: reused, it is read anew
        return owners

    def measure(self, reading: GpuReading) -> None:
        """A reading with its process list, attributed (``owners``): record what each measured consumer of
        that GPU holds."""
        measured = [
            c for c in self.config.consumers.values() if c.gpu == reading.index and c.processes is not None
        ]
        owners = reading.owners
        self._owners[reading.index if reading.index is not None else -1] = dict(owners)
        mib_of = {c.name: 0 for c in measured}
        pids_of: dict[str, set[int]] = {c.name: set() for c in measured}
        unknown: set[str] = set()  # (one of its processes' memory not shown: what it holds is not known)
        matches = {c.name: c.processes for c in measured}
        for p in reading.processes:  # one pass, however long the list
            name = owners.get(p.pid) if p.pid is not None else None
            if name is not None and name in mib_of:
                if p.used_mib is None:
                    unknown.add(name)
                mib_of[name] += p.used_mib or 0
                if not lingering(matches[name], p.name):  # (its memory, but no live process of its)
                    pids_of[name].add(p.pid)  # type: ignore[arg-type] (not None: it has an owner)
        for c in measured:
            mib = mib_of[c.name]
            if mib > c.vram_resident_mib and c.name not in self._over:
                self._over.add(c.name)
                log.warning(
                    logfmt(
                        msg=f"{c.name} holds {mib} MiB, declared {c.vram_resident_mib}",
                        consumer=c.name,
                        used_mib=mib,
                        vram_resident_mib=c.vram_resident_mib,
                    )
                )
            pids = frozenset(pids_of[c.name])
            state = self.states[c.name]
            if state.pids and pids and not state.pids & pids:
                # Every process it had is gone and others hold its memory now: it restarted, and what
                # it was doing (a render a hold waits for) died with the old ones.
                for listener in self.gone_listeners:
                    listener(c.name, "its processes were replaced (restarted)")
            if c.name in unknown:  # (what is shown may be enough to tell it resident: never that it is not)
                resident = True if mib * 2 >= c.vram_resident_mib else None
                state.measured(None, pids, resident, reading.started)
            else:
                state.measured(mib, pids, mib * 2 >= c.vram_resident_mib, reading.started)

    def forget(self, name: str) -> None:
        """A consumer a reload removed: warned of again should a consumer of that name come back."""
        self._over.discard(name)

    def owners(self) -> dict[int, str]:
        """pid -> consumer, from the latest readings of every GPU."""
        return {pid: name for owners in self._owners.values() for pid, name in owners.items()}

    def cgroups_of(self, pid: int) -> list[str]:
        """The cgroup paths of a process (``/proc/<pid>/cgroup``); [] when it cannot be read."""
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text(errors="replace")
        except OSError:
            return []
        return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


def lingering(match: ProcessMatch | None, name: str | None) -> bool:
    """Whether a process listed with this name can be the consumer's only as one that is exiting: it has
    no name (its command line is gone a moment before its memory), and the consumer's ``processes.name``
    cannot match that. Such a process stays whose it was (``GpuProcesses.attribute``), but is no live one."""
    return (
        name is None
        and match is not None
        and match.name is not None
        and not fnmatch.fnmatchcase("", match.name)
    )


def process_owners(
    processes: Sequence[GpuProcess],
    consumers: Sequence[ConsumerConfig],
    cgroups_of: Callable[[int], list[str]],
) -> dict[int, str]:
    """pid -> the consumer whose ``processes`` match it (the first in config order). A consumer matches
    a process when every key it gives matches: ``name`` (a shell pattern) against nvidia-smi's process
    name, ``unit`` (a shell pattern too) against a component of one of the process's cgroup paths (the
    systemd unit, or a container's scope, it runs in)."""
    owners: dict[int, str] = {}
    for p in processes:
        if p.pid is None:
            continue
        units: list[str] | None = None
        for c in consumers:
            match = c.processes
            assert match is not None
            if match.name is not None and not fnmatch.fnmatchcase(p.name or "", match.name):
                continue
            if match.unit is not None:
                if units is None:
                    units = [part for path in cgroups_of(p.pid) for part in path.split("/") if part]
                if not any(fnmatch.fnmatchcase(unit, match.unit) for unit in units):
                    continue
            owners[p.pid] = c.name
            break
    return owners


# =====================================================================================================
# The scheduler
# =====================================================================================================


@dataclass(eq=False)
class Job:
    """One GPU request, from admission to its end."""

    id: int
    #: The consumer's config as it was at admission (a reload may change or remove it meanwhile), or, for a
    #: job still queued (``Scheduler.forget``) or being made ready (``RoomMaker.ready``) when a reload gave
    #: its consumer another URL, the new one's.
    target: ConsumerConfig
    kind: str
    priority: int
    arrived: float
    granted: asyncio.Future[None]
    #: An admin operation: holds the lock alone, no job of its consumer joins it.
    exclusive: bool = False
    #: The client's X-Request-ID (or one made up), for the logs.
    request_id: str | None = None
    #: The client it runs for (auth.clients), None for the admin's, the broker's own and, without clients,
    #: everyone's: its priority, its limit and its share of the GPU are that client's.
    client: str | None = None
    #: Its client was removed by a reload since its admission (``GpuLock.forget``): its GPU time and its
    #: end count for nobody from then on (one added again under that name starts at zero).
    client_removed: bool = False
    #: queued -> running -> ended
    state: str = "queued"
    started: float | None = None
    ended: float | None = None
    evictions: int = 0
    #: Its caller (the client's request) went away while a step of it ran on (see JobLease._prepare).
    left: bool = False
    #: The task its lease was entered in (its request's handler): cut once a shutdown's wait is over.
    caller: asyncio.Task[Any] | None = field(default=None, repr=False)
    #: Since when a job that came after it, of the same effective priority, was granted before it.
    overtaken_since: float | None = None
    #: Granted to a consumer that was not resident and has no load of its own: its run includes loading.
    cold: bool = False
    #: It made room and loaded (or needed neither) and went to work on its consumer, until its slot goes;
    #: since when (its job time is learned from then: making room and loading are learned on their own).
    working: bool = False
    working_at: float | None = None
    #: How it ended, kept for its log line (written when a hold after it ends); ``http``: the consumer's
    #: HTTP status, from the moment it answered.
    outcome: str | None = None
    code: str | None = None
    http: int | None = None
    #: The scheduler that admitted it: ``release`` ends it there.
    scheduler: Scheduler | None = field(default=None, repr=False)

    @property
    def consumer(self) -> str:
        return self.target.name

    @property
    def charged(self) -> bool:
        """Whether its GPU time counts for its client's fair share: not an exclusive job (the broker's own,
        nobody's), nor one of a client a reload removed."""
        return not self.exclusive and not self.client_removed

    def release(
        self,
        outcome: str = "completed",
        *,
        code: str | None = None,
        status: int | None = None,
        success: bool = False,
        hold: Callable[[], Awaitable[None]] | None = None,
        hold_timeout_s: float = 0.0,
    ) -> bool:
        """End the granted job, once: its outcome, whether the consumer took the work (``success``: a 2xx
        answer), and the hold that keeps the GPU afterwards (ComfyUI's render) if any. A second call does
        nothing. Synchronous, so it runs even in a cancelled handler's ``finally``. Whether the GPU went to
        a waiting job."""
        if self.state != "running" or self.scheduler is None:
            return False
        return self.scheduler.finish(self, outcome, code, status, success, hold, hold_timeout_s)

    def __repr__(self) -> str:
        client = f" for {self.client}" if self.client is not None else ""
        return f"<Job {self.id} {self.consumer}/{self.kind}{client} {self.state}>"


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
    hold_abandoned: int = 0
    hold_poll_errors: int = 0
    yields: int = 0
    restores: int = 0


# ---- the recorder: one record of each fact, four views of it ----------------------------------------


@dataclass(frozen=True)
class Fact:
    """One kind of thing the scheduler does or sees, and how each view shows it."""

    #: The /v1/events name (facts may share one: their fields tell them apart).
    event: str
    #: The log line's ``msg`` and its level.
    msg: str
    level: int = logging.INFO
    #: The Stats counter it counts in, and the counter metric (by consumer) it adds to.
    stat: str | None = None
    metric: str | None = None
    #: Fields every record of it carries.
    extra: tuple[tuple[str, Any], ...] = ()


#: Everything the scheduler records besides jobs' own lines: each fact is written once, with
#: ``Recorder.record``, and becomes a Stats count, a metric, a log line and an event from that one call.
FACTS: dict[str, Fact] = {
    "residency_asked": Fact("residency_asked", "residency asked"),
    "evicting": Fact("evicting", "evicting"),
    "evicted": Fact("evicted", "evicted", stat="evictions", metric="mgpumanager_evictions_total"),
    "memory_not_freed": Fact("memory_not_freed", "memory not freed in time", logging.WARNING),
    "unloading": Fact("unloading", "unloading"),
    "unloaded_admin": Fact(
        "unloaded", "unloaded", stat="admin_unloads", metric="mgpumanager_admin_unloads_total"
    ),
    "unloaded_idle": Fact(
        "unloaded", "unloaded", stat="idle_unloads", metric="mgpumanager_idle_unloads_total"
    ),
    "unload_failed": Fact(
        "unload_failed",
        "unload failed",
        logging.WARNING,
        "unload_failures",
        "mgpumanager_unload_failures_total",
    ),
    "idle_unload_skipped": Fact("idle_unload_skipped", "idle unload skipped"),
    "unloaded_reservation": Fact(
        "unloaded", "unloaded", stat="admin_unloads", metric="mgpumanager_admin_unloads_total"
    ),
    "reserved": Fact("reserved", "reserved"),
    "reservation_ended": Fact("reservation_ended", "reservation ended"),
    "loading": Fact("loading", "loading"),
    "loaded": Fact("loaded", "loaded", stat="loads", metric="mgpumanager_loads_total"),
    "load_failed": Fact(
        "load_failed", "load failed", logging.WARNING, "load_failures", "mgpumanager_load_failures_total"
    ),
    "preload_skipped": Fact(
        "preload_skipped",
        "preload skipped: it does not fit",
        logging.WARNING,
        "preload_skips",
        "mgpumanager_preload_skips_total",
    ),
    "hold_released": Fact("hold_ended", "hold released", extra=(("outcome", "released"),)),
    "hold_timed_out": Fact(
        "hold_ended",
        "hold timed out",
        logging.WARNING,
        "hold_timeouts",
        "mgpumanager_hold_timeouts_total",
        (("outcome", "timeout"),),
    ),
    "hold_abandoned": Fact(
        "hold_ended",
        "hold abandoned",
        logging.WARNING,
        "hold_abandoned",
        "mgpumanager_hold_abandoned_total",
        (("outcome", "abandoned"),),
    ),
    "hold_cut": Fact("hold_ended", "hold cut short", extra=(("outcome", "cut"),)),
    "hold_none": Fact("hold_ended", "no hold", extra=(("outcome", "none"),)),
    "hold_poll_failed": Fact(
        "hold_poll_failed",
        "hold poll failed",
        logging.DEBUG,
        "hold_poll_errors",
        "mgpumanager_hold_poll_errors_total",
    ),
    "stranger_appeared": Fact("stranger", "stranger appeared", extra=(("present", True),)),
    "stranger_gone": Fact("stranger", "stranger gone", extra=(("present", False),)),
    "unloaded_yield": Fact("yielded", "yielded", stat="yields", metric="mgpumanager_yields_total"),
    "yield_skipped": Fact("yield_skipped", "yield skipped"),
    "restored": Fact("restored", "restored", stat="restores", metric="mgpumanager_restores_total"),
    "restore_skipped": Fact("restore_skipped", "restore skipped"),
}


class Recorder:
    """What one GPU's scheduler did, written once and shown four ways: its Stats, the broker's metrics,
    the log and /v1/events. Jobs have their own record (``job_ended``): their outcome counts at once, and
    their metrics, end event and log line follow once the GPU changed hands."""

    def __init__(self, gpu: int, events: Events, metrics: Metrics, shared: Shared) -> None:
        self.gpu = gpu
        self.shared = shared
        self.events = events
        self.metrics = metrics
        self.stats = Stats()
        #: Jobs of each client (auth.clients) that ended, whatever their outcome.
        self.client_jobs: dict[str, int] = {}

    def record(self, name: str, /, level: int | None = None, **fields: Any) -> None:
        """One fact (a key of FACTS); ``consumer`` is among its fields. ``level`` overrides the fact's."""
        fact = FACTS[name]
        fields.update(fact.extra)
        if fact.stat is not None:
            setattr(self.stats, fact.stat, getattr(self.stats, fact.stat) + 1)
        if fact.metric is not None:
            self.metrics.inc(fact.metric, consumer=fields["consumer"])
        level = fact.level if level is None else level
        if log.isEnabledFor(level):
            log.log(level, logfmt(msg=fact.msg, **fields))
        self.events.publish(fact.event, gpu=self.gpu, **fields)

    def internal_error(self, msg: str, exc: BaseException | None = None, **fields: Any) -> None:
        """A bug in the broker, caught: counted once for the broker, logged with its traceback."""
        self.shared.internal_error(msg, exc, gpu=self.gpu, **fields)

    def learned(self, state: ConsumerState, what: str, seconds: float, job: int) -> None:
        """A consumer's load, unload or job took ``seconds`` (for or by job ``job``): one more sample of its
        running median (status, the forecast), its histogram, and the ``learned`` event with its figures as
        they are now."""
        state.learned(what, seconds)
        self.show_learned(state, what, seconds, job)

    def show_learned(self, state: ConsumerState, what: str, seconds: float, job: int) -> None:
        """A sample ``state`` took in already: its histogram and its ``learned`` event."""
        self.metrics.observe(f"mgpumanager_{what}_seconds", seconds, consumer=state.name)
        fields = {
            "consumer": state.name,
            "gpu": self.gpu,
            "job": job,
            "what": what,
            "seconds": round(seconds, 3),
            "timings": state.timings(),
        }
        self.events.publish("learned", **fields)

    def job_took(self, job: Job, state: ConsumerState, ended: float) -> None:
        """What a job that took the work took from the moment it went to work (the evictions and the load
        before it are learned on their own, so a forecast counts each once): its consumer's job time, or, a
        cold start (the consumer loads itself on its first request), a load time (what it took beyond a
        usual job). Learned at once (the next forecast counts it); its histogram and ``learned`` event come
        after its end event, once the GPU changed hands, as that event does."""
        began = job.working_at if job.working_at is not None else job.started
        if began is None or job.exclusive:
            return
        took = max(0.0, ended - began)
        if job.cold:
            took = max(0.0, took - (state.timing("job") or 0.0))
        what = "load" if job.cold else "job"
        state.learned(what, took)  # (now: the next forecast counts it)
        _after_handover(functools.partial(self._show_learned, state, what, took, job.id))

    def _show_learned(self, state: ConsumerState, what: str, seconds: float, job: int) -> None:
        try:
            self.show_learned(state, what, seconds, job)
        except Exception as e:  # a bug of a callback of the loop's: logged and counted, never lost
            self.internal_error("learned event crashed", consumer=state.name, error=describe(e))

    def not_recorded(self, job: Job) -> None:
        """A job (or its hold) ended on a consumer a reload made a new service meanwhile (another URL): what
        it found is the old service's, and the new one's state, timings and last use are left alone."""
        log.info(
            logfmt(
                msg="not recorded: a reload replaced or removed the service",
                consumer=job.consumer,
                gpu=self.gpu,
                job=job.id,
                url=job.target.url,
            )
        )

    def job_event(self, name: str, job: Job, **fields: Any) -> None:
        """A job's own events (queued, granted, started, and its end): /v1/events only."""
        self.events.publish(
            name, job=job.id, consumer=job.consumer, kind=job.kind, gpu=self.gpu, client=job.client, **fields
        )

    def gpu_time(self, job: Job, seconds: float) -> None:
        """A job (or its hold) of a client gave its slot back after ``seconds`` held: that client's GPU time
        (the lock's window keeps it for fair share; this counter keeps it for ever)."""
        if job.client is not None:
            self.metrics.inc("mgpumanager_client_gpu_seconds_total", seconds, client=job.client)

    def job_admitted(self) -> None:
        self.stats.jobs += 1

    def forget_clients(self, kept: Collection[str]) -> None:
        """Drop the job counts of the clients not ``kept`` (a reload removed them; their jobs that end
        later are not counted): one added again starts at zero, as a new one does (its counters in /metrics
        stay)."""
        for client in self.client_jobs.keys() - set(kept):
            del self.client_jobs[client]

    def job_ended(self, job: Job, log_now: bool) -> None:
        """Count the job's outcome now; its metrics, end event and (``log_now``, else when its hold ends)
        its log line once the GPU changed hands."""
        assert job.outcome is not None
        setattr(self.stats, job.outcome, getattr(self.stats, job.outcome) + 1)
        if job.client is not None and not job.client_removed:
            self.client_jobs[job.client] = self.client_jobs.get(job.client, 0) + 1
        _after_handover(functools.partial(self._account, job, log_now))

    def _account(self, job: Job, log_now: bool) -> None:
        try:
            self._account_now(job, log_now)
        except Exception as e:  # a bug in a callback of the loop's: logged and counted, never lost
            self.internal_error(
                "job accounting crashed", consumer=job.consumer, job=job.id, error=describe(e)
            )

    def _account_now(self, job: Job, log_now: bool) -> None:
        assert job.ended is not None and job.outcome is not None
        self.metrics.inc("mgpumanager_jobs_total", consumer=job.consumer, outcome=job.outcome)
        if job.client is not None:
            self.metrics.inc("mgpumanager_client_jobs_total", client=job.client, status=job.outcome)
        wait_end = job.started if job.started is not None else job.ended
        self.metrics.observe("mgpumanager_queue_wait_seconds", wait_end - job.arrived, consumer=job.consumer)
        if job.started is not None:
            self.metrics.observe("mgpumanager_run_seconds", job.ended - job.started, consumer=job.consumer)
        event = {"completed": "finished"}.get(job.outcome, job.outcome)
        self.job_event(event, job, code=job.code, http=job.http)
        if log_now:
            self.job_line(job, None)

    def job_line(self, job: Job, hold_ms: int | None) -> None:
        """The one line per job that docs/operations.md, "Logs", describes."""
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
                client=job.client,
            )
        )


def _after_handover(step: Callable[[], None]) -> None:
    """Run bookkeeping (a job's metrics, event and log line) two turns of the loop from now.

    The job granted next wakes in the next turn and its request goes out in the one after (aiohttp writes
    it from a task of its own): the GPU changes hands first, the books follow.
    """
    loop = asyncio.get_running_loop()
    loop.call_soon(loop.call_soon, step)


async def books_written() -> None:
    """Wait until the books that ``_after_handover`` had been given before this call are written."""
    written = asyncio.get_running_loop().create_future()
    _after_handover(functools.partial(written.set_result, None))
    await written


# ---- making room: the decision, a pure function of a snapshot ---------------------------------------


@dataclass(frozen=True)
class ConsumerView:
    """One consumer as the eviction planner sees it: its config and what the broker knows of it now."""

    config: ConsumerConfig
    resident: bool | None
    #: Its resident record may be acted on without a reading (nothing since could have changed it).
    trusted: bool = False
    #: Jobs and holds of it holding the GPU lock.
    jobs: int = 0
    last_used: float | None = None
    #: MiB its processes held at the last reading (None: not measured), and the most ever seen.
    used_mib: int | None = None
    peak_mib: int | None = None

    @staticmethod
    def of(config: ConsumerConfig, state: ConsumerState, jobs: int) -> ConsumerView:
        return ConsumerView(
            config,
            state.resident,
            state.trusted,
            jobs,
            state.last_used,
            state.used_mib,
            state.peak_mib,
        )

    @property
    def size_mib(self) -> int:
        """What it takes when loaded: its declared vram_resident_mib, or more if it was seen holding more."""
        return max(self.config.vram_resident_mib, self.peak_mib or 0)

    @property
    def holds_mib(self) -> int:
        """What unloading it is expected to free: what it was measured holding, else its size."""
        return self.used_mib if self.used_mib is not None else self.size_mib


@dataclass(frozen=True)
class RoomSnapshot:
    """Everything the eviction decision depends on, at one moment."""

    target: str
    #: The GPU's consumers (the target among them), in config order: ties in last use go to the first.
    consumers: Mapping[str, ConsumerView]
    #: Free MiB in the latest reading.
    free_mib: int
    cushion_mib: int
    #: Consumers already unloaded (or tried) for this job, and what became of each.
    tried: Mapping[str, str] = field(default_factory=dict)
    max_evictions: int = 5
    #: Used MiB in the latest reading (None: not reported).
    used_mib: int | None = None
    #: The target's other jobs at work already (past making room): what the GPU holds may be theirs.
    target_working: int = 0
    #: The broker loads the target itself once it fits (its load): planned at its full size, no credit.
    loads_target: bool = False
    #: While a stranger is present (gpu.yield): what it must be left free besides what the target loads;
    #: and may-coexist no longer protects a consumer (that was reckoned without the stranger). 0: none.
    keep_free_mib: int = 0


@dataclass(frozen=True)
class RoomPlan:
    """What making room for the target takes: nothing (it fits), victims in order, or why none is left."""

    #: Free MiB the target needs (its size, less what its processes hold already, plus the cushion).
    need_mib: int
    free_mib: int
    #: Whom to unload, in order, until it fits as far as the figures tell (the executor unloads the first
    #: and plans again with a fresh reading). Empty when it fits, or when nothing is left to unload.
    victims: tuple[str, ...] = ()
    #: Why each other consumer is not a victim.
    why_not: Mapping[str, str] = field(default_factory=dict)
    #: max_evictions unloads were tried already.
    exhausted: bool = False
    #: Free MiB the figures expect once the victims are unloaded (``free_mib`` without victims): below
    #: ``need_mib``, the target cannot fit whatever is unloaded.
    expected_mib: int = 0

    @property
    def fits(self) -> bool:
        return self.free_mib >= self.need_mib

    @property
    def hopeless(self) -> bool:
        """It does not fit, and would not once every victim it could have were unloaded."""
        return not self.fits and self.expected_mib < self.need_mib


def plan_room(snap: RoomSnapshot) -> RoomPlan:
    """Decide what must go for the target to fit. No I/O: the same snapshot always gives the same plan.

    The rules (docs/how-it-works.md, "How eviction decides"): the target needs its size
    (``vram_resident_mib``, or the most it was measured holding if more) plus the cushion, less what its
    processes hold already. Victims are the other consumers of the GPU that are resident or of unknown
    residency, have an unload, may not coexist with the target, run no job and were not tried for this job
    yet: least recently used first (never used first, ties in config order); ``vram_managed`` ones (Ollama)
    only after every other, as the last resort; and after them the target itself when nothing measures it
    and its residency is unknown or in doubt (recorded resident, not trusted: the scheduler asked it and it
    could not tell): it may be what fills the GPU. Memory that no consumer's record or measurement accounts
    for is nobody's: a target in doubt is planned at its full size, never credited with it (a needless
    eviction is possible, an overfill is not). Only a target that another job of it is at work on already
    (past making room for its whole size: a consumer that loads itself may have loaded its model for that
    one) is credited with it (see _credit), and never when the broker loads the target itself.

    While a stranger is present (``keep_free_mib``), a target that must load anything needs that much
    free besides, and consumers that may coexist with it are victims like the others.
    """
    target = snap.consumers[snap.target]
    cushion = snap.cushion_mib
    if target.used_mib is not None:
        load = max(0, target.size_mib - target.used_mib)
        need = load + cushion
    elif target.resident is True and target.trusted:
        load = need = 0
    elif snap.target_working and not snap.loads_target:
        load = target.size_mib - _credit(snap)
        need = load + cushion
    else:
        load = target.size_mib
        need = load + cushion
    if load > 0:
        need += snap.keep_free_mib
    if snap.free_mib >= need:
        return RoomPlan(need, snap.free_mib, expected_mib=snap.free_mib)
    if len(snap.tried) >= snap.max_evictions:
        why_not = _why_not(snap)
        return RoomPlan(need, snap.free_mib, why_not=why_not, exhausted=True, expected_mib=snap.free_mib)
    victims = _least_recently_used(
        snap.consumers, lambda name, view: name != snap.target and _why_not_one(snap, name, view) is None
    )
    if (
        target.config.unload is not None
        and target.used_mib is None
        and (target.resident is None or (target.resident is True and not target.trusted))
        and target.jobs <= 1  # no other job of it is working on what it holds
        and snap.target not in snap.tried
    ):
        victims.append(snap.target)
    # Only as many as the figures say are needed (the executor plans again after each one anyway).
    charged = _charged(snap.consumers, snap.used_mib)
    enough, expected = [], snap.free_mib
    for name in victims:
        enough.append(name)
        expected += charged.get(name, snap.consumers[name].holds_mib)
        if expected >= need:
            break
    return RoomPlan(need, snap.free_mib, tuple(enough), _why_not(snap), expected_mib=expected)


def absent_to_ask(snap: RoomSnapshot) -> list[str]:
    """Whom to ask before a target is refused for want of room: the consumers recorded not resident that
    readings do not measure and that have an unload (not the target, none tried). One may have loaded its
    model behind the broker's back (a restart that preloads, a client on its own port): its memory is then
    in the reading, but its record keeps it from the plan."""
    return [
        name
        for name, view in snap.consumers.items()
        if name != snap.target and name not in snap.tried
        if view.resident is False and view.used_mib is None and view.config.unload is not None
    ]


def _least_recently_used(
    consumers: Mapping[str, ConsumerView], eligible: Callable[[str, ConsumerView], bool]
) -> list[str]:
    """The eligible consumers in the order they are unloaded: least recently used first (never used first,
    ties in config order), ``vram_managed`` ones after every other. Eviction and yielding both go by it."""
    regular: list[tuple[float, int, str]] = []
    managed: list[tuple[float, int, str]] = []
    for order, (name, view) in enumerate(consumers.items()):
        if eligible(name, view):
            last = view.last_used if view.last_used is not None else -math.inf
            (managed if view.config.vram_managed else regular).append((last, order, name))
    return [name for _, _, name in sorted(regular)] + [name for _, _, name in sorted(managed)]


def plan_yield(
    consumers: Mapping[str, ConsumerView],
    free_mib: int,
    used_mib: int | None,
    keep_free_mib: int,
    tried: Collection[str] = (),
    awaited: Collection[str] = (),
) -> tuple[str, ...]:
    """Whom to unload for a stranger, in order, until ``keep_free_mib`` is expected free (nobody when it
    is free already). No I/O: the same figures always give the same answer.

    The victims are the idle consumers: an unload route or command, resident or of unknown residency, no
    job or hold of theirs holding the lock, memory charged to them, not ``tried`` while this stranger
    stays; least recently used first, ``vram_managed`` last (``_least_recently_used``, as eviction); and
    the ``awaited`` ones (a job waits for them: unloaded, each would be loaded again for it, evicting
    another) after all the others."""
    if free_mib >= keep_free_mib:
        return ()
    charged = _charged(consumers, used_mib)

    def idle(name: str, view: ConsumerView) -> bool:
        return (
            view.config.unload is not None
            and view.resident is not False
            and view.jobs == 0
            and charged.get(name, 0) > 0
            and name not in tried
        )

    victims, expected = [], free_mib
    order = _least_recently_used(consumers, idle)
    for name in [n for n in order if n not in awaited] + [n for n in order if n in awaited]:
        victims.append(name)
        expected += charged[name]
        if expected >= keep_free_mib:
            break
    return tuple(victims)


def held_mib(reading: GpuReading, name: str, pids: Collection[int] = ()) -> int:
    """MiB a reading's processes of consumer ``name`` hold: those it attributes to it, and ``pids``."""
    owners = reading.owners
    return sum(
        p.used_mib or 0
        for p in reading.processes
        if p.pid is not None and (p.pid in pids or owners.get(p.pid) == name)
    )


def _charged(
    consumers: Mapping[str, ConsumerView], used_mib: int | None, besides: str | None = None
) -> dict[str, int]:
    """What a reading of ``used_mib`` used MiB is taken to hold of each consumer (but ``besides``). One
    measured: what its processes hold; one recorded resident: its size. One of unknown residency: at most
    what the reading's used memory leaves unaccounted for once those are counted, never its size on top of
    that (in config order; all of its size when the reading has no used figure). One not resident:
    nothing."""
    charged = {
        name: view.holds_mib
        for name, view in consumers.items()
        if name != besides and (view.used_mib is not None or view.resident is True)
    }
    left = math.inf if used_mib is None else used_mib - sum(charged.values())
    for name, view in consumers.items():
        if name != besides and name not in charged and view.resident is None:
            charged[name] = int(min(view.holds_mib, max(0, left)))
            left -= charged[name]
    return charged


def unclaimed_mib(
    consumers: Mapping[str, ConsumerView], used_mib: int | None, besides: str | None = None
) -> int:
    """*Unclaimed memory*: what a reading of ``used_mib`` used MiB shows beyond what the consumers are
    charged with (0 when the reading has no used figure): a stranger's (a game, a training run), a
    consumer's that says it holds nothing, a CUDA context nobody measures. Nobody's: never credited to a
    target in doubt. The one definition: with gpu.yield every consumer is measured by its processes (or
    holds nothing), and it is then exactly what the reading shows used beyond what the consumers'
    processes hold; a stranger is present while it exceeds gpu.yield.ignore_mib."""
    if used_mib is None:
        return 0
    return max(0, used_mib - sum(_charged(consumers, used_mib, besides).values()))


def _credit(snap: RoomSnapshot) -> int:
    """What a target that another job of it is at work on (and not measured) is taken to hold already: the
    used memory no other consumer accounts for, at most its size. That job made room for all of the target
    before it went to work, so what has shown up since is most likely what the target loaded for it; the
    reading still decides (what is not there is not credited)."""
    target = snap.consumers[snap.target]
    return min(target.size_mib, unclaimed_mib(snap.consumers, snap.used_mib, besides=snap.target))


def _why_not_one(snap: RoomSnapshot, name: str, view: ConsumerView) -> str | None:
    """Why ``name`` cannot be unloaded for the target now, or None when it can."""
    c, target = view.config, snap.target
    if c.unload is None:
        return "vram_managed" if c.vram_managed else "no unload route"
    coexists = target in c.can_coexist_with or name in snap.consumers[target].config.can_coexist_with
    if coexists and not snap.keep_free_mib:  # (beside a stranger, nothing is sure to fit beside the target)
        return f"may coexist with {target}"
    if view.jobs > 0:
        return "has jobs running"
    if name in snap.tried:
        reason = snap.tried[name]
        if view.used_mib:
            reason += f"; its processes still hold {view.used_mib} MiB"
        return reason
    if view.resident is False:
        return "not resident" + (f" (its processes hold {view.used_mib} MiB)" if view.used_mib else "")
    return None


def _why_not(snap: RoomSnapshot) -> dict[str, str]:
    return {
        name: why
        for name, view in snap.consumers.items()
        if name != snap.target and (why := _why_not_one(snap, name, view)) is not None
    }


#: The GPU processes an event, /v1/status or a refusal names: the largest this many (a reading may list
#: 20,000, each named as a local user likes); the others are counted.
STRANGERS_NAMED = 10


def room_message(
    plan: RoomPlan, snap: RoomSnapshot, processes: Sequence[GpuProcess], owners: Mapping[int, str]
) -> str:
    """insufficient_vram's message: the figures, why each consumer stayed, and who holds the GPU's memory
    (each process named with the consumer it belongs to, where the broker can tell)."""
    target = snap.consumers[snap.target]
    size = target.size_mib
    held = f", its processes hold {target.used_mib}" if target.used_mib is not None else ""
    parts = [
        f"{plan.free_mib} MiB free, {plan.need_mib} MiB needed"
        f" ({snap.target} {size}{held} + cushion {snap.cushion_mib})"
    ]
    if snap.used_mib is not None:
        parts.append(f"{unclaimed_mib(snap.consumers, snap.used_mib)} MiB used that no consumer accounts for")
    if plan.exhausted:
        parts.append(f"gave up after {snap.max_evictions} unload attempts")
    if plan.why_not:
        parts.append("not evictable: " + ", ".join(f"{n} ({why})" for n, why in plan.why_not.items()))
    named = sorted(processes, key=lambda p: -(p.used_mib or 0))[:STRANGERS_NAMED]
    procs = ", ".join(
        f"pid {p.pid} {shown_name(p.name)} {_mib(p.used_mib)} ({owners.get(p.pid or -1, 'no consumer')})"
        for p in named
    )
    if len(processes) > len(named):
        procs += f" and {len(processes) - len(named)} more"
    parts.append(f"GPU processes: {procs or 'none listed'}")
    return "; ".join(parts)


# ---- the grant order: a pure function ---------------------------------------------------------------


def effective_priority(job: Job, now: float, aging_s: float) -> int:
    """The job's priority plus one level per ``aging_s`` waited, at most PRIORITY_MAX."""
    return min(PRIORITY_MAX, job.priority + int((now - job.arrived) // aging_s))


@dataclass(frozen=True)
class Holder:
    """Who holds a GPU's lock, as the grant order sees it."""

    consumer: str
    #: A job that holds the lock alone (an admin's unload or load, an idle unload, a preload, a yield, a
    #: restore, a reservation).
    exclusive: bool
    #: How many more of its jobs may join (its max_concurrency less the jobs and holds it runs).
    room: int


#: Each client's GPU time (held seconds) over the last fair_window_s, by client (None: the jobs of no client),
#: as the grant order reads it: a snapshot.
Served = Mapping[str | None, float]


def fair_key(job: Job, served: Served | None) -> tuple[float, float, int]:
    """A job's place in the fair order: the GPU time of its client (the least served first), then its
    arrival. Without ``served`` (or with one client alone) it is the arrival order."""
    return (served.get(job.client, 0.0) if served else 0.0, job.arrived, job.id)


def next_grant(
    waiting: Iterable[Job],
    holder: Holder | None,
    now: float,
    *,
    aging_s: float,
    max_overtake_s: float,
    warm: Callable[[Job], bool],
    served: Served | None = None,
    frozen: Mapping[Job, float | None] | None = None,
) -> Job | None:
    """The job the lock goes to next (a further slot of the holder, while it holds it), or None. No I/O.
    A job whose future is settled (a cancelled waiter) is skipped, and rule 4 reads each job's
    ``overtaken_since``; unless ``waiting`` come from a snapshot (``WaitQueue.copy``): then ``frozen``
    gives each one's ``overtaken_since`` as it was, and every one of them waited, whatever the loop
    settled since.

    The rules (docs/how-it-works.md, "In what order jobs run"):
    1. Only jobs of the highest effective priority among those waiting may be granted: a job of higher
       effective priority is never passed over.
    2. Among them, the fair order (``fair_key``): the client with the least GPU time over the window
       (``served``) first, then arrival; without clients, arrival.
    3. A job that needs no swap (``warm``: its consumer holds the GPU, or is resident and may stay beside
       the holder) goes before those before it in the fair order that would need one: the first warm job
       in the fair order. An exclusive job (an admin's unload or load, the broker's own jobs, a
       reservation) never overtakes.
    4. But never past a job overtaken for ``max_overtake_s`` (0: every job counts as such): a job is
       overtaken from the moment a job after it in the fair order is granted before it; once one has been
       overtaken that long, only the jobs up to the first such job in the fair order may go (the first
       warm one among them, else the first).
    5. While a consumer holds the lock, only its own jobs join, up to its max_concurrency, by the same
       rules (its first job in the fair order, if rule 4 lets it); none joins an exclusive holder, and an
       exclusive job never joins.
    """
    if holder is not None and (holder.exclusive or holder.room <= 0):
        return None
    top, candidates = -1, []  # the jobs of the highest effective priority (computed inline: a hot path)
    live = frozen is None
    for job in waiting:
        if live and job.granted.done():
            continue
        level = min(PRIORITY_MAX, job.priority + int((now - job.arrived) // aging_s))
        if level > top:
            top, candidates = level, [job]
        elif level == top:
            candidates.append(job)
    if not candidates:
        return None
    if served:
        candidates.sort(key=lambda j: (served.get(j.client, 0.0), j.arrived, j.id))
    else:
        candidates.sort(key=_arrival)
    # Rule 4: the jobs that may go are those up to the first one overtaken for the bound, in the fair order.
    allowed = len(candidates)
    if max_overtake_s <= 0:
        allowed = 1
    else:
        for i, j in enumerate(candidates):
            since = j.overtaken_since if frozen is None else frozen[j]
            if since is not None and now - since >= max_overtake_s:
                allowed = i + 1
                break
    if holder is None:
        for job in itertools.islice(candidates, allowed):
            if not job.exclusive and warm(job):
                return job
        return candidates[0]
    for i, job in enumerate(candidates):
        if job.consumer == holder.consumer:
            return None if job.exclusive or i >= allowed else job
    return None


def _arrival(job: Job) -> tuple[float, int]:
    return (job.arrived, job.id)


def needs_no_swap(target: ConsumerConfig, resident: bool, holder: str | None) -> bool:
    """Whether a job of ``target`` needs no swap (the grant order's "warm"): its memory is elsewhere, or it
    is resident and whoever holds the lock (if anyone) is itself or may stay beside it. One definition: the
    lock grants by it, and the forecast plays the grant order forward with it."""
    if target.vram_resident_mib == 0:
        return True
    return resident and (holder is None or holder == target.name or holder in target.can_coexist_with)


# ---- the forecast: the grant order played forward, a pure function of a snapshot --------------------


@dataclass(frozen=True)
class QueueSnapshot:
    """Everything the forecast depends on, at one moment."""

    #: The waiting jobs (a copy of the lock's queue).
    waiting: WaitQueue
    #: Who holds the lock and for how long it has.
    holder: str | None
    held_s: float
    now: float
    #: The GPU's consumers as the eviction planner sees them, and their learned figures: (name, "load" |
    #: "unload" | "job") -> seconds (a figure not seen yet is absent).
    consumers: Mapping[str, ConsumerView]
    timings: Mapping[tuple[str, str], float]
    #: Free MiB in the newest reading (None: none yet).
    free_mib: int | None
    cushion_mib: int
    max_evictions: int
    aging_s: float
    max_overtake_s: float
    #: Fair share's figures, to play forward: a copy of the lock's GPU time (``GpuTime.copy``) of the waiting
    #: jobs' clients and the holder's, the client of each slot the holder's non-exclusive jobs hold (each
    #: charged until the holder's end, as the lock charges it at their release), and the window. None where
    #: the waiting jobs are of one client (or none): no grant reads it then, as none does in ``dispatch``.
    use: GpuTime | None
    holding: tuple[str | None, ...]
    fair_window_s: float


def queue_snapshot(lock: GpuLock, rooms: RoomMaker, config: Config) -> QueueSnapshot:
    """A GPU's queue, lock and consumers now, as the forecast plays them forward."""
    views = rooms.views()
    states = rooms.states
    names = set(views) | {j.consumer for j in lock.waiting}
    timings = {
        (name, what): seconds
        for name in names
        if name in states
        for what in TIMED
        if (seconds := states[name].timing(what)) is not None
    }
    now = lock.clock()
    sched = config.scheduler
    holding = tuple(j.client for j in lock.taken if j.charged)  # (as dispatch and release count them)
    clients = lock.waiting.clients()
    return QueueSnapshot(
        lock.waiting.copy(),
        lock.holder,
        now - lock.held_since,
        now,
        views,
        timings,
        rooms.gpu.last_free_mib(),
        config.gpu.cushion_mib,
        sched.max_evictions,
        sched.aging_s,
        sched.max_overtake_s,
        lock.use.copy(clients | set(holding)) if len(clients) > 1 else None,
        holding,
        sched.fair_window_s,
    )


def expected_waits(
    snap: QueueSnapshot, until: Job | str | None = None, count: int | None = None
) -> list[tuple[Job, float]]:
    """The waiting jobs in the order they are expected to be granted, each with its expected wait in seconds
    (``eta_s``), from the learned figures (a figure not seen yet counts as 0, so an eta is then a lower
    bound). No I/O: the same snapshot always gives the same forecast.

    It plays the grant order forward (``next_grant``, with ``needs_no_swap``: the lock's own "warm"): the
    holder's remaining time (at least RUNNING_FLOOR_S), then job after job. A job that needs a swap pays
    what ``plan_room`` would unload for it on the GPU as played so far (its memory: the newest reading's
    free MiB, none when there is no reading yet) and its own load when it is not resident. Fair share is
    played as the lock counts it (``GpuTime``, on a copy of the snapshot's): the holder's remaining time goes
    to the client of each of its non-exclusive slots, each job played adds what it takes (from its grant,
    its swap included) to its client's, and each grant reads every client's GPU time over the window as it
    will be then (the window slides as the play goes). It stops once ``until`` (a job, or a client's name:
    its first job) has its place, or after ``count`` jobs.
    """
    waiting = snap.waiting.copy()  # (taken out one by one as they are granted)
    views = {name: replace(view, jobs=0) for name, view in snap.consumers.items()}
    free = snap.free_mib or 0
    t = 0.0
    current = snap.holder
    # (A copy: the snapshot's own stays as it is, to be played again; none where no grant reads it.)
    use, window = None if snap.use is None else snap.use.copy(), snap.fair_window_s
    if current is not None:  # what it still takes (at least RUNNING_FLOOR_S); its consumer is loaded
        t = max(RUNNING_FLOOR_S, snap.timings.get((current, "job"), 0.0) - snap.held_s)
        if current in views:
            views[current] = replace(views[current], resident=True, trusted=True)
        for client in snap.holding if use is not None else ():  # its slots are released then
            use.released(client, snap.now + t, window)

    def warm(job: Job) -> bool:  # (the consumer's config as it is now, as the lock reads it)
        view = views.get(job.consumer)
        if view is None:
            return needs_no_swap(job.target, False, current)
        return needs_no_swap(view.config, view.resident is True, current)

    out: list[tuple[Job, float]] = []
    while waiting:
        now = snap.now + t
        candidates = waiting.candidates(warm, None)
        clients = {j.client for j in candidates}
        # (As dispatch reads it: one client, or none, the fair order is the arrival order.)
        served = use.served(clients, now, window) if use is not None and len(clients) > 1 else None
        job = next_grant(
            candidates,
            None,
            now,
            aging_s=snap.aging_s,
            max_overtake_s=snap.max_overtake_s,
            warm=warm,
            served=served,
            frozen=waiting.frozen,
        )
        if job is None:
            break
        waiting.remove(job)
        out.append((job, round(t, 3)))
        if (until is not None and (job is until or job.client == until)) or len(out) == count:
            break
        granted_at = t
        name = job.consumer
        target = views.get(name) or ConsumerView(job.target, None)
        if not warm(job):  # a swap: what the planner would unload for it goes, then it loads
            views[name] = target
            room = RoomSnapshot(name, views, free, snap.cushion_mib, max_evictions=snap.max_evictions)
            gone = plan_room(room).victims
            t += sum(snap.timings.get((n, "unload"), 0.0) for n in gone)
            free += sum(views[n].holds_mib for n in gone)
            for n in gone:
                views[n] = replace(views[n], resident=False, trusted=True, used_mib=None)
            if target.resident is not True:
                t += snap.timings.get((name, "load"), 0.0)
                free -= target.size_mib
        views[name] = replace(target, resident=True, trusted=True, last_used=snap.now + t)
        t += snap.timings.get((name, "job"), 0.0)
        if use is not None and job.charged:  # its slot, from its grant to its release
            use.granted(job.client, snap.now + granted_at, window)
            use.released(job.client, snap.now + t, window)
        current = name
    return out


def queue_entries(snap: QueueSnapshot) -> list[dict[str, Any]]:
    """The waiting jobs as /v1/status lists them: in the expected grant order, each with its effective
    priority, its wait so far and its expected wait (``expected_waits``), at the snapshot's moment. No I/O:
    it may run off the loop (it reads the jobs, changes nothing)."""
    now = snap.now
    return [
        {
            "job": j.id,
            "consumer": j.consumer,
            "kind": j.kind,
            "client": j.client,
            "priority": effective_priority(j, now, snap.aging_s),
            "waited_s": round(now - j.arrived, 3),
            "eta_s": eta,
        }
        for j, eta in expected_waits(snap)
    ]


# ---- the lock -------------------------------------------------------------------------------------


class Lane:
    """The waiting jobs of one base priority and one client, in arrival order, which is their fair order
    too (one client: one GPU time), and the order of their effective priorities (aging adds the same to
    all of them): whom a grant overtakes in a lane is always a first part of it. Jobs that left stay in
    the lists until they reach the front, or until they are most of them (the queue's membership says who
    waits)."""

    __slots__ = ("buckets", "gone", "head", "jobs", "marked")

    def __init__(self) -> None:
        #: Every job, in arrival order; those before ``head`` have left, those before ``marked`` have left
        #: or were overtaken (``WaitQueue.overtaken``).
        self.jobs: list[Job] = []
        self.head = 0
        self.marked = 0
        #: About how many of ``jobs[head:]`` have left: behind one that waits (for up to queue_timeout_s),
        #: callers that queue and leave would pile up without end; once they are most, they are dropped.
        self.gone = 0
        #: The same jobs per consumer and exclusiveness: jobs of one bucket need a swap or none alike (the
        #: lock reads the consumer's config as it is now: ``GpuLock.warm``), so a bucket's first waiting job
        #: is the only one of it a grant can pick.
        self.buckets: dict[tuple[str, bool], deque[Job]] = {}

    def copy(self) -> Lane:
        other = Lane()
        other.jobs = self.jobs[self.head :]
        other.marked = max(0, self.marked - self.head)
        other.gone = self.gone
        other.buckets = {key: deque(jobs) for key, jobs in self.buckets.items() if jobs}
        return other


class WaitQueue:
    """Waiting jobs, in a lane per base priority and client (``Lane``), each lane in a bucket per consumer.

    Whoever ``next_grant`` picks is the first job of some lane, its first job that needs no swap, or the
    holder's first; each of those is the first job of a bucket. So a grant looks at the buckets' first jobs
    (``candidates``: as many as priorities x clients x consumers, however many jobs wait), takes the one
    granted off its bucket's front, and marks whom it overtook (``overtaken``) from where the last mark
    stopped: a grant costs the same with 10 or 10,000 jobs waiting.
    """

    def __init__(self) -> None:
        #: Per base priority: client -> its lane.
        self._levels: list[dict[str | None, Lane]] = [{} for _ in range(PRIORITY_MAX + 1)]
        #: Who waits, in arrival order, and the bucket each is in (a cancelled waiter counts until it takes
        #: itself out).
        self._members: dict[Job, tuple[str, bool]] = {}
        #: Jobs waiting per client.
        self._clients: dict[str | None, int] = {}
        #: A copy's (``copy``): each member's ``overtaken_since`` as it was then. In a copy, who waits is what
        #: its members say, not the jobs' futures, which the loop goes on settling.
        self.frozen: dict[Job, float | None] | None = None

    def append(self, job: Job) -> None:
        lane = self._levels[job.priority].get(job.client)
        if lane is None:
            lane = self._levels[job.priority][job.client] = Lane()
        lane.jobs.append(job)
        key = (job.consumer, job.exclusive)
        bucket = lane.buckets.get(key)
        if bucket is None:
            bucket = lane.buckets[key] = deque()
        bucket.append(job)
        self._members[job] = key
        self._clients[job.client] = self._clients.get(job.client, 0) + 1

    def remove(self, job: Job) -> None:
        key = self._members.pop(job)
        left = self._clients[job.client] - 1
        if left:
            self._clients[job.client] = left
        else:
            del self._clients[job.client]
        lane = self._levels[job.priority][job.client]
        members = self._members
        bucket = lane.buckets[key]
        while bucket and bucket[0] not in members:
            bucket.popleft()
        jobs = lane.jobs
        lane.gone += 1
        while lane.head < len(jobs) and jobs[lane.head] not in members:
            lane.head += 1
            lane.gone = max(0, lane.gone - 1)
        if lane.head == len(jobs):  # empty: kept for the next job (lanes and buckets are few)
            jobs.clear()
            lane.head = lane.marked = lane.gone = 0
            return
        if lane.gone > 64 and 2 * lane.gone > len(jobs) - lane.head:  # (most left, behind one that waits)
            lane.marked = sum(j in members for j in jobs[lane.head : lane.marked])
            lane.jobs = [j for j in jobs[lane.head :] if j in members]
            lane.head = lane.gone = 0
            lane.buckets = {key: deque(j for j in b if j in members) for key, b in lane.buckets.items()}
        elif lane.head > 64 and 2 * lane.head > len(jobs):  # (the front's departed, dropped now and then)
            del jobs[: lane.head]
            lane.marked = max(0, lane.marked - lane.head)
            lane.head = 0

    def __len__(self) -> int:
        return len(self._members)

    def of_client(self, client: str | None) -> int:
        """How many jobs of ``client`` wait."""
        return self._clients.get(client, 0)

    def clients(self) -> set[str | None]:
        """The clients of the waiting jobs."""
        return set(self._clients)

    def prune(self) -> None:
        """Drop the lanes and buckets no job waits in. They are kept between jobs (few, and each grant looks
        at them), but those of a client or consumer a reload removed would stay for good: after a reload
        they all go, and the next job of each makes its own again."""
        for level in self._levels:
            for client, lane in list(level.items()):
                lane.buckets = {key: bucket for key, bucket in lane.buckets.items() if bucket}
                if not lane.buckets:  # (no member left in it: remove() cleared its list)
                    del level[client]

    def awaited(self) -> frozenset[str]:
        """The consumers a waiting job wants loaded: every job's but those that only unload (an admin's,
        an idle unload, a reservation, a yield)."""
        return frozenset(j.consumer for j in self._members if j.kind not in UNLOAD_KINDS)

    def __contains__(self, job: Job) -> bool:
        return job in self._members

    def __iter__(self) -> Iterator[Job]:
        return iter(self._members)

    def copy(self) -> WaitQueue:
        """The jobs that wait now, in a queue of their own, to play the grant order forward without
        granting (``expected_waits``): a snapshot that no later grant, arrival, cancellation or overtaking
        changes (``frozen``), so it may play off the loop. (A cancelled waiter still taking itself out is not
        in it.)"""
        other = WaitQueue()
        other._levels = [{client: lane.copy() for client, lane in level.items()} for level in self._levels]
        if self.frozen is None:
            members, frozen = {}, {}
            for job, key in self._members.items():
                if not job.granted.done():
                    members[job], frozen[job] = key, job.overtaken_since
        else:
            members, frozen = dict(self._members), dict(self.frozen)
        other._members, other.frozen = members, frozen
        if len(members) == len(self._members):
            other._clients = dict(self._clients)
        else:
            other._clients = dict(Counter(job.client for job in members))
            for level in other._levels:  # (a bucket's first job is a member, as remove() keeps them)
                for lane in level.values():
                    for bucket in lane.buckets.values():
                        while bucket and bucket[0] not in members:
                            bucket.popleft()
        return other

    def candidates(self, warm: Callable[[Job], bool], holder: str | None) -> list[Job]:
        """Per lane: its first waiting job, its first one that needs no swap, the holder's first."""
        found: list[Job] = []
        members, live = self._members, self.frozen is None
        for level in self._levels:
            for lane in level.values():
                first = warm_one = mine = None
                for bucket in lane.buckets.values():
                    if not bucket:
                        continue
                    job = bucket[0]  # (a member: remove() takes the departed off the front)
                    if live and job.granted.done():  # a cancelled waiter, still taking itself out
                        job = next((j for j in bucket if j in members and not j.granted.done()), None)
                        if job is None:
                            continue
                    if first is None or _arrival(job) < _arrival(first):
                        first = job
                    if job.consumer == holder and (mine is None or _arrival(job) < _arrival(mine)):
                        mine = job
                    if (
                        not job.exclusive
                        and (warm_one is None or _arrival(job) < _arrival(warm_one))
                        and warm(job)
                    ):
                        warm_one = job
                found += {j: None for j in (first, mine, warm_one) if j is not None}
        return found

    def overtaken(self, granted: Job, now: float, aging_s: float, served: Served | None) -> None:
        """Mark the waiting jobs that ``granted`` went before (of its effective priority, and before it in
        the fair order, ``fair_key``): their bound (max_overtake_s) runs from ``now``, unless it ran
        already. In each lane they are a first part of it, and a part marked once stays so: each mark
        starts where the last one stopped."""
        level = effective_priority(granted, now, aging_s)
        key = fair_key(granted, served)
        members = self._members
        for lanes in self._levels:
            for lane in lanes.values():
                jobs, i = lane.jobs, max(lane.head, lane.marked)
                while i < len(jobs):
                    j = jobs[i]
                    if j in members and not j.granted.done():
                        if fair_key(j, served) >= key or effective_priority(j, now, aging_s) != level:
                            break
                        if j.overtaken_since is None:
                            j.overtaken_since = now
                    i += 1
                lane.marked = i


class GpuTime:
    """The GPU time (held seconds, from a grant to its slot's release, holds included) of each client on one
    GPU, over a sliding window: what fair share reads. Jobs of one client that run at once count each their
    own time; exclusive jobs (admin operations, idle unloads, preloads, reservations) count for nobody.

    Per client, the running total as a function of time is kept as its breakpoints (time, total, slots
    held from then on), one per grant and per release: the seconds within a window are the total now less
    the total at the window's start, each read in constant time (breakpoints older than the window go).
    """

    def __init__(self) -> None:
        #: client -> deque of (t, seconds held by then, slots held from t on).
        self._books: dict[str | None, deque[tuple[float, float, int]]] = {}

    def __repr__(self) -> str:
        return f"<GpuTime clients:{len(self._books)}>"

    def copy(self, clients: Iterable[str | None] | None = None) -> GpuTime:
        """The books of ``clients`` (None: of all), in a GpuTime of their own that no later grant or release
        changes (nor this one its): what the forecast plays forward, maybe off the loop (``QueueSnapshot``).
        A client without a book reads 0 in the copy as here."""
        other = GpuTime()
        books = self._books
        names = books if clients is None else [c for c in clients if c in books]
        other._books = {client: deque(books[client]) for client in names}
        return other

    def _step(self, client: str | None, now: float, slots: int, window_s: float) -> None:
        book = self._books.setdefault(client, deque())
        if book:
            t, total, held = book[-1]
            book.append((now, total + held * (now - t), held + slots))
            _forget_before(book, now - window_s)
            if len(book) > BOOK_MAX:
                self._books[client] = _coarsened(book, window_s / BOOK_GRAINS)
        else:
            book.append((now, 0.0, slots))

    def forget(self, kept: Collection[str | None]) -> None:
        """Drop the books of the clients not ``kept`` (a reload removed them; the slots they still hold are
        charged to nobody: ``Job.charged``)."""
        for client in [c for c in self._books if c not in kept]:
            del self._books[client]

    def restart(self, client: str | None, now: float, holding: Iterable[str | None]) -> None:
        """After a bug in ``client``'s book, which may then count a slot wrong for good (its time reading 0,
        or growing while it holds none): it starts anew, from the slots it holds now (``holding``: the client
        of each slot that counts), so that their releases pair up with them."""
        self._books[client] = deque([(now, 0.0, sum(1 for c in holding if c == client))])

    def granted(self, client: str | None, now: float, window_s: float) -> None:
        """A job of ``client`` took a slot."""
        self._step(client, now, 1, window_s)

    def released(self, client: str | None, now: float, window_s: float) -> None:
        """A job (or hold) of ``client`` gave its slot back."""
        self._step(client, now, -1, window_s)

    def served(self, clients: Iterable[str | None], now: float, window_s: float) -> dict[str | None, float]:
        """Each of ``clients``' GPU time within the last ``window_s`` seconds (the grant order's snapshot)."""
        return {client: self.seconds(client, now, window_s) for client in clients}

    def seconds(self, client: str | None, now: float, window_s: float) -> float:
        """``client``'s GPU time within the last ``window_s`` seconds."""
        book = self._books.get(client)
        if not book:
            return 0.0
        start = now - window_s
        _forget_before(book, start)
        t0, total0, held0 = book[0]
        at_start = total0 + held0 * (start - t0) if t0 <= start else total0
        t, total, held = book[-1]
        return max(0.0, total + held * (now - t) - at_start)


#: A client's book keeps its breakpoints exact up to this many (two per job within the window: 4,096 jobs);
#: past it, those closer than fair_window_s / BOOK_GRAINS go (``_coarsened``), so that a long window and a
#: busy client (a week, a job a second: 1.2 million) hold neither memory nor each forecast's copy.
BOOK_MAX = 8192
BOOK_GRAINS = 2048


def _coarsened(book: deque[tuple[float, float, int]], grain: float) -> deque[tuple[float, float, int]]:
    """The book without the breakpoints that lie, with the next one, within ``grain`` of the last kept:
    every kept one still carries its exact total, and a total read between two kept ones (where a window
    starts) is off by at most the slots held times ``grain`` (a span that lost breakpoints is shorter than
    a grain). A kept one and the one two after it lie a grain apart at least: at most 2 * BOOK_GRAINS + 2
    of a window's stay."""
    kept = [book[0]]
    for point, after in itertools.pairwise(list(book)[1:]):
        if after[0] - kept[-1][0] >= grain:
            kept.append(point)
    kept.append(book[-1])
    return deque(kept)


def _forget_before(book: deque[tuple[float, float, int]], start: float) -> None:
    """Drop the breakpoints before ``start`` but the last one (it tells the total at ``start``)."""
    while len(book) > 1 and book[1][0] <= start:
        book.popleft()


#: From this many waiting jobs on, a turn's ``queued`` events are played off the loop, in a worker thread,
#: from a snapshot (as /v1/status plays the queue): the forecast walks the whole queue, about 10 us a job
#: here, so at 2,000 jobs it would hold the event loop 20 ms at each turn of a burst.
FORECAST_OFF_LOOP = 256


class QueuedEvents:
    """Each waiting job's ``queued`` event, with its expected wait: the jobs queued in one turn of the loop
    are announced together after it, from one forecast, so a burst of arrivals plays the queue forward once
    per turn, not once per job. While FORECAST_OFF_LOOP jobs or more wait, that forecast plays in a worker
    thread from a snapshot of the turn's end (one at a time: the jobs queued meanwhile go with the next).

    A job's ``queued`` event always comes first: the lock calls ``before`` before it grants a job or takes
    one off the queue. While the queue is short, that announces every job still to come, from one forecast;
    while it is long, that job alone, without the forecast (eta_s 0 for a job granted, null for one that
    leaves: nobody played the queue for it), so no grant waits for a play of the whole queue."""

    def __init__(
        self,
        recorder: Recorder,
        forecast: Callable[[], list[tuple[Job, float]]],
        waiting: Sized,
        play: Callable[[], asyncio.Task[list[tuple[Job, float]]]] | None = None,
    ) -> None:
        self.recorder = recorder
        self.forecast = forecast
        self.waiting = waiting
        #: Starts the forecast in a worker thread, from a snapshot of now, as a task its owner cancels on
        #: close (None: always on the loop).
        self.start_play = play
        #: Jobs queued in this turn of the loop (or while a play was under way), whose event is still to come.
        self.pending: dict[Job, None] = {}
        #: Jobs whose forecast plays in a worker thread now (``play``), their event still to come.
        self.playing: dict[Job, None] = {}
        self.play: asyncio.Task[list[tuple[Job, float]]] | None = None

    def add(self, job: Job) -> None:
        """``job`` was queued: announced at the end of this turn of the loop, or from the play after it."""
        self.pending[job] = None
        if len(self.pending) == 1 and self.play is None:
            asyncio.get_running_loop().call_soon(self._turn)

    def before(self, job: Job, *, granted: bool) -> None:
        """``job`` is about to be granted (``granted``) or to leave the queue: its ``queued`` event goes out
        now, if it has not yet."""
        if job not in self.pending and job not in self.playing:
            return
        if len(self.waiting) < FORECAST_OFF_LOOP:
            self.announce(job if granted else None)
            return
        self.pending.pop(job, None)
        self.playing.pop(job, None)
        self._publish([job], {job: 0.0} if granted else {})

    def announce(self, granted: Job | None = None) -> None:
        """Publish the ``queued`` event of every job not announced yet, each with its expected wait from one
        forecast on the loop; ``granted``, about to be granted, waits 0 (alone, it needs no forecast)."""
        jobs = [*self.playing, *self.pending]
        self.playing, self.pending = {}, {}  # (a play under way finds none of them when it is done)
        if not jobs:
            return
        etas: dict[Job, float] = {}
        if jobs != [granted]:
            try:
                etas = dict(self.forecast())
            except Exception as e:  # a bug: the events go out (eta_s null), the grant goes ahead
                self.recorder.internal_error("forecast for queued events crashed", e)
        if granted is not None:
            etas[granted] = 0.0
        self._publish(jobs, etas)

    def _publish(self, jobs: Iterable[Job], etas: Mapping[Job, float]) -> None:
        for job in jobs:
            queued = {"priority": job.priority, "request_id": job.request_id, "eta_s": etas.get(job)}
            self.recorder.job_event("queued", job, **queued)

    def _turn(self) -> None:
        """The turn of the loop that queued the jobs is over (or the last play is done): announce them, or
        start a play for them while the queue is long (a callback of the loop's: a bug is logged and
        counted, never lost)."""
        try:
            if not self.pending or self.play is not None:  # (the play under way takes them up when done)
                return
            if self.start_play is None or len(self.waiting) < FORECAST_OFF_LOOP:
                self.announce()
                return
            play = self.start_play()
            play.add_done_callback(self._played)
            self.play = play
            self.playing.update(self.pending)
            self.pending = {}
        except Exception as e:  # a bug: the events go out now (eta_s null), none is left waiting for a turn
            self.recorder.internal_error("queued events crashed", e)
            if self.play is None:
                jobs, self.pending = list(self.pending), {}
                self._publish(jobs, {})

    def _played(self, play: asyncio.Task[list[tuple[Job, float]]]) -> None:
        """A play is done: the events of its jobs still to come (those announced meanwhile went out then),
        with its forecast (eta_s null if it failed or was cancelled, at shutdown); then the next play (at
        shutdown, none: those queued meanwhile are announced at once)."""
        self.play = None
        jobs, self.playing = list(self.playing), {}
        etas: dict[Job, float] = {}
        try:
            if not play.cancelled():
                if (e := play.exception()) is not None:
                    self.recorder.internal_error("forecast for queued events crashed", e)
                else:
                    etas = dict(play.result())
            self._publish(jobs, etas)
            if play.cancelled():
                self.announce()
        except Exception as e:
            self.recorder.internal_error("queued events crashed", e)
        if not play.cancelled():
            self._turn()


def retry_after(eta: float | None) -> int:
    """Retry-After for a refused job: the seconds until the job it names is expected to run, at least 1."""
    return max(1, math.ceil(eta)) if eta is not None else 1


class ClientEtas:
    """A waiting job's expected wait (``eta``), but a client's (its first waiting job's: the Retry-After of
    its ``client_queue_full``) played forward at most once per CLIENT_ETA_S, and counted down in between: a
    script that retries in a loop would otherwise play the whole queue forward, on the event loop, at each
    refusal."""

    def __init__(self, eta: Callable[[Job | str | None], float | None], clock: Callable[[], float]) -> None:
        self.eta, self.clock = eta, clock
        #: client -> (when its eta was played, that eta).
        self._played: dict[str, tuple[float, float | None]] = {}

    def __call__(self, job: Job | str | None) -> float | None:
        if not isinstance(job, str):
            return self.eta(job)
        now = self.clock()
        played = self._played.get(job)
        if played is None or not 0 <= now - played[0] < CLIENT_ETA_S:
            played = self._played[job] = (now, self.eta(job))
        at, eta = played
        return None if eta is None else max(0.0, eta - (now - at))


def admission_refusal(
    job: Job, waiting: WaitQueue, config: Config, eta: Callable[[Job | str | None], float | None]
) -> BrokerError | None:
    """Whether a GPU's queue turns ``job`` away at its door. A client with ``max_queued`` has a room of its
    own that size: it is told ``client_queue_full`` when that is full, and its jobs never take the others'
    room. ``max_queue`` bounds everyone else's (the admin's, callers without a token, clients without
    ``max_queued``). The Retry-After of a refusal is the wait expected for the client's first waiting job (of
    a full queue: for the first one)."""
    clients = config.auth.clients
    client = clients.get(job.client) if job.client is not None else None
    if client is not None and client.max_queued is not None:
        mine = waiting.of_client(client.name)
        if mine < client.max_queued:
            return None
        message = f"client {client.name} has {mine} jobs waiting already (its max_queued)"
        wait = retry_after(eta(client.name))
        return BrokerError("client_queue_full", message, job.consumer, retry_after=wait)
    own = sum(waiting.of_client(c.name) for c in clients.values() if c.max_queued is not None)
    shared = len(waiting) - own
    if shared >= config.scheduler.max_queue:
        message = f"{shared} jobs are waiting already"
        return BrokerError("queue_full", message, job.consumer, retry_after=retry_after(eta(None)))
    return None


class GpuLock:
    """One GPU's lock, the scheduler's core: admission to its queue, grants by ``next_grant``, release.

    The one record of each consumer's job count: only the holder has jobs here (its slots: jobs and holds;
    of those, the holds, and the ones at work, past making room); everyone else asks the lock. Waiters are
    futures, as in asyncio's own Lock; a waiter cancelled while being woken passes its grant on (its end
    releases it). It keeps each client's GPU time on this GPU (``use``), which fair share reads.
    ``resident`` tells whether a consumer is resident (for ``needs_no_swap``), ``eta`` a waiting job's
    expected wait (None: the first one's; a client's name: its first job's), ``forecast`` every waiting
    job's (for the ``queued`` events: ``QueuedEvents``); ``on_grant`` hears of each grant before its waiter
    wakes."""

    def __init__(
        self,
        shared: Shared,
        index: int,
        clock: Callable[[], float],
        recorder: Recorder,
        *,
        resident: Callable[[str], bool],
        eta: Callable[[Job | str | None], float | None],
        forecast: Callable[[], list[tuple[Job, float]]],
        on_grant: Callable[[Job], None],
        play: Callable[[], asyncio.Task[list[tuple[Job, float]]]] | None = None,
    ) -> None:
        self.shared = shared
        self.index = index
        self.clock = clock
        self.recorder = recorder
        self.resident = resident
        self.eta = eta
        self.on_grant = on_grant
        self.waiting = WaitQueue()
        self.queued = QueuedEvents(recorder, forecast, self.waiting, play)
        #: The consumer holding the lock, its slots taken (jobs and holds), of those the holds, and the ones
        #: at work (past making room, holds too: a join's plan credits their work).
        self.holder: str | None = None
        self.slots = 0
        self.holds = 0
        self.working = 0
        #: The jobs holding the slots (at work, making room, or in a hold), in the order they were granted.
        self.taken: dict[Job, None] = {}
        #: Each client's GPU time on this GPU, for fair share (and /v1/status).
        self.use = GpuTime()
        #: The holder is an admin operation (or an idle unload, a preload): it holds the lock alone.
        self.exclusive = False
        self.held_since = 0.0
        #: Shutting down: nothing is queued any more.
        self.closing = False
        #: Set while nobody holds the lock.
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def config(self) -> Config:
        return self.shared.config

    def __repr__(self) -> str:
        held = f"held by {self.holder} x{self.slots}" if self.holder else "free"
        return f"<GpuLock [{held}, waiters:{len(self.waiting)}]>"

    def jobs_of(self, name: str) -> int:
        """Jobs and holds of ``name`` holding this lock."""
        return self.slots if name == self.holder else 0

    def working_of(self, name: str) -> int:
        """Jobs and holds of ``name`` at work under this lock (past making room)."""
        return self.working if name == self.holder else 0

    def warm(self, job: Job) -> bool:
        """Whether a job needs no swap now (``needs_no_swap``, with the holder and the consumer's config as
        they are: alike for every job of a consumer, whenever it was queued)."""
        target = self.config.consumers.get(job.consumer, job.target)
        return needs_no_swap(target, self.resident(job.consumer), self.holder)

    async def wait(self, job: Job) -> None:
        """Admit ``job`` to the queue and wait for its grant. Refused at once: shutting_down, queue_full;
        later: queue_timeout, or no_consumer, shutting_down, gpu_reserved (``refuse``). Returned, it holds a
        slot. Raised (a refusal, a cancellation, a bug), it waits no more; one granted meanwhile (a waiter
        cancelled while being woken) holds its slot until its end gives it back (``Scheduler.ended_by``,
        which its caller runs), and that release passes the grant on."""
        if self.closing:
            raise BrokerError("shutting_down", "the broker is shutting down", job.consumer)
        if (refusal := admission_refusal(job, self.waiting, self.config, self.eta)) is not None:
            raise refusal
        self.waiting.append(job)
        timer = None
        try:
            self.queued.add(job)
            self.dispatch()
            if job.granted.done():  # at once (the common case: no timer to start and cancel)
                job.granted.result()
                return
            timeout_s = self.config.scheduler.queue_timeout_s
            timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, job, timeout_s)
            await job.granted
        except BaseException:
            if job in self.waiting:
                self.take_out(job)
                self.dispatch()  # a job that left may have been what kept a join of the holder out
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, job: Job, waited: float) -> None:
        """The queue timer of a job ran out after ``waited`` (the queue_timeout_s it was queued with: a
        reload since does not change it): answer it with queue_timeout unless it was granted. Its
        Retry-After is the wait still expected for it."""
        if job.state != "queued" or job.granted.done():
            return
        error = BrokerError(
            "queue_timeout",
            f"waited {waited:g} s for the GPU",
            job.consumer,
            retry_after=retry_after(self.eta(job)),
        )
        self.refuse(job, error)
        self.dispatch()

    def _holder(self) -> Holder | None:
        if self.holder is None:
            return None
        c = self.config.consumers.get(self.holder)
        room = (c.max_concurrency if c is not None else 0) - self.slots
        return Holder(self.holder, self.exclusive, room)

    def dispatch(self) -> bool:
        """Grant the lock (or further slots of the holder) as ``next_grant`` says; whether anyone got it."""
        granted = False
        sched = self.config.scheduler
        while self.waiting:
            now = self.clock()
            # A waiter whose task was cancelled has a cancelled future; it stays queued (and counted)
            # until its task runs again and takes itself out.
            candidates = self.waiting.candidates(self.warm, self.holder)
            clients = {j.client for j in candidates}
            # (One client, or none: the fair order is the arrival order.)
            served = self.use.served(clients, now, sched.fair_window_s) if len(clients) > 1 else None
            job = next_grant(
                candidates,
                self._holder(),
                now,
                aging_s=sched.aging_s,
                max_overtake_s=sched.max_overtake_s,
                warm=self.warm,
                served=served,
            )
            if job is None:
                return granted
            self.queued.before(job, granted=True)
            self.waiting.remove(job)
            if self.holder is None:
                self.held_since = now
            self.holder, self.exclusive = job.consumer, job.exclusive
            self.slots += 1
            self.taken[job] = None
            self.idle.clear()
            job.state, job.started = "running", now
            try:  # (the books, after the count: a bug here is logged and counted, the grant stands)
                if job.charged:
                    self.use.granted(job.client, now, sched.fair_window_s)
                if len(candidates) > 1 and min(candidates, key=lambda j: fair_key(j, served)) is not job:
                    self.waiting.overtaken(job, now, sched.aging_s, served)
            except Exception as e:
                self.recorder.internal_error(
                    "grant bookkeeping crashed", consumer=job.consumer, job=job.id, error=describe(e)
                )
                self.use.restart(job.client, now, [j.client for j in self.taken if j.charged])
            self.on_grant(job)
            job.granted.set_result(None)
            granted = True
        return granted

    def started(self, job: Job) -> None:
        """A granted job made room and loaded (or needed neither): it goes to work on its consumer."""
        job.working, job.working_at = True, self.clock()
        self.working += 1

    def hold(self) -> None:
        """A job answered and keeps its slot in a hold (ComfyUI's render): ``release(job, held=True)``."""
        self.holds += 1

    def release(self, job: Job, *, held: bool = False) -> bool:
        """A job (or its hold: ``held``) gives its slot back, the last frees the lock; whether one got it."""
        assert job.consumer == self.holder, (job, self.holder)
        self.slots -= 1
        self.holds -= held
        self.working -= job.working
        self.taken.pop(job, None)
        if self.slots == 0:
            self.holder, self.exclusive = None, False
            self.idle.set()
        if not job.exclusive and job.started is not None:
            try:  # (the books, after the count: a bug here still frees the slot, and grants it)
                now = self.clock()
                if job.charged:
                    self.use.released(job.client, now, self.config.scheduler.fair_window_s)
                self.recorder.gpu_time(job, now - job.started)
            except Exception as e:
                self.recorder.internal_error(
                    "release bookkeeping crashed", consumer=job.consumer, job=job.id, error=describe(e)
                )
                self.use.restart(job.client, self.clock(), [j.client for j in self.taken if j.charged])
        return self.dispatch()

    def forget(self, clients: Collection[str]) -> None:
        """After a reload: the wait queue's empty lanes and buckets go, and what it keeps of each client not
        in ``clients`` (removed): its GPU time, and its jobs under way (waiting or holding a slot) are its no
        more: their time and end count for nobody (one added again under that name starts at zero). (The
        reload closes the connections of a removed client's jobs, so a waiting one leaves the queue.)"""
        for job in itertools.chain(self.taken, self.waiting):
            if job.client is not None and job.client not in clients:
                job.client_removed = True
        self.waiting.prune()
        self.use.forget({None, *clients})

    def take_out(self, job: Job) -> None:
        """Take a waiting job off the queue without a grant (its queued event first, as ever)."""
        self.queued.before(job, granted=False)
        self.waiting.remove(job)

    def refuse(self, job: Job, error: BrokerError) -> None:
        """Answer a waiting job with ``error`` (queue_timeout, no_consumer, shutting_down, gpu_reserved)."""
        self.take_out(job)
        job.granted.set_exception(error)

    def shut_down(self) -> None:
        """Queue nothing more, and answer every queued job with shutting_down."""
        self.closing = True
        for job in [j for j in self.waiting if not j.granted.done()]:
            self.refuse(job, BrokerError("shutting_down", "the broker is shutting down", job.consumer))


class UnloadOps(Protocol):
    """What the scheduler needs from consumers: ``Consumers`` in production, a recording fake in tests."""

    states: dict[str, ConsumerState]

    async def unload(self, name: str) -> None: ...

    async def load(self, name: str) -> None: ...

    async def probe_now(self, name: str) -> None: ...

    def owners(self) -> Mapping[int, str]: ...

    def gone(self, name: str, reason: str) -> None: ...


# ---- strangers: memory in use that no consumer claims ------------------------------------------------

#: gpu_in_use's Retry-After, at least (or gpu.yield.poll_s, if longer): a stranger (a game) stays for as
#: long as it likes, and the broker sees it gone within poll_s; a refusal is cheap, a retry every few
#: seconds for hours is not.
GPU_IN_USE_RETRY_S = 10


def describe_processes(processes: Sequence[GpuProcess]) -> str:
    """``pid 4242 /usr/bin/game 6144 MiB, ...`` (the largest STRANGERS_NAMED), or what a list without them
    means: a game is a graphics process, which the compute process list does not show."""
    named = sorted(processes, key=lambda p: -(p.used_mib or 0))[:STRANGERS_NAMED]
    text = ", ".join(f"pid {p.pid} {shown_name(p.name)} {_mib(p.used_mib)}" for p in named)
    more = len(processes) - len(named)
    if more > 0:
        text += f" and {more} more"
    return text or "no process listed: a graphics process (a game) is not in the list"


class Strangers:
    """What one GPU's readings show in use that no consumer claims (``unclaimed_mib``), and whether a
    stranger is present (gpu.yield: unclaimed memory beyond ``ignore_mib``), since when, and the processes of
    the list that no consumer claims. Told of every whole reading (after the consumers were measured from
    it); a stranger appearing or gone is recorded (the ``stranger`` event)."""

    def __init__(
        self,
        shared: Shared,
        index: int,
        recorder: Recorder,
        clock: Callable[[], float],
        *,
        views: Callable[[], Mapping[str, ConsumerView]],
    ) -> None:
        self.shared = shared
        self.index = index
        self.recorder = recorder
        self.clock = clock
        #: This GPU's consumers as the planner sees them (their measured memory from the same reading).
        self.views = views
        #: From the newest whole reading: unclaimed MiB (None: no reading with a used figure yet), free MiB,
        #: and the processes no consumer claims.
        self.unclaimed_mib: int | None = None
        self.free_mib: int | None = None
        self.processes: tuple[GpuProcess, ...] = ()
        #: A stranger is present (only with gpu.yield), since (monotonic).
        self.present = False
        self.since: float | None = None
        #: Since when no stranger has been present (monotonic; None: one is, or no reading yet).
        self.absent_since: float | None = None
        self._started = -math.inf

    def __repr__(self) -> str:
        state = f"present since {self.since}" if self.present else "none"
        return f"<Strangers gpu={self.index} {state} unclaimed={self.unclaimed_mib}>"

    def seen(self, reading: GpuReading) -> None:
        """A whole reading of this GPU (a reader's listener): its unclaimed memory, and a stranger appearing
        or gone. A reading that started before the newest one seen is ignored.

        Memory that moved while the process list was read (``moved_mib``) leaves the unclaimed figure in
        doubt by that much: the reading's own line (the lower, ``bracketed``) may miss what a consumer in
        the list freed meanwhile (a yield's victim), the other line may hold what one allocated. A stranger
        appears only by the lower figure and is gone only by the higher one: a doubt changes nothing. The
        figure kept (shown, and in events) is the one that decided.

        A reading without a used figure (nvidia-smi's ``[N/A]``, ``[GPU requires reset]``) says nothing of
        the unclaimed memory: like a reading that failed, it leaves the presence as it was."""
        if reading.index not in (self.index, None) or reading.started < self._started:
            return
        self._started = reading.started
        owners = reading.owners
        views = self.views()
        self.free_mib = reading.free_mib
        self.processes = tuple(p for p in reading.processes if p.pid is None or p.pid not in owners)
        if reading.used_mib is None:
            self.unclaimed_mib = None
            return
        low = unclaimed_mib(views, reading.used_mib)
        high = unclaimed_mib(views, reading.used_mib + reading.moved_mib) if reading.moved_mib else low
        y = self.shared.config.gpu.yield_
        figure = high if self.present else low
        present = y is not None and figure > y.ignore_mib
        self.unclaimed_mib = figure
        now = self.clock()
        if present and not self.present:
            self.present, self.since, self.absent_since = True, now, None
            self.recorder.record("stranger_appeared", **self.fields())
        elif not present and self.present:
            self._gone(now)
        elif not present and self.absent_since is None:
            self.absent_since = now  # (the first reading: none since then)

    def yield_off(self) -> None:
        """gpu.yield is off (a reload turned it off): no stranger is present any more, whatever memory the
        last reading showed unclaimed (it is then only memory that is not free)."""
        if self.present and self.shared.config.gpu.yield_ is None:
            self._gone(self.clock())

    def _gone(self, now: float) -> None:
        self.present, self.since, self.absent_since = False, None, now
        self.recorder.record("stranger_gone", **self.fields())

    def fields(self) -> dict[str, Any]:
        """What events and log lines say of it: unclaimed and free MiB, the processes no consumer claims."""
        named = sorted(self.processes, key=lambda p: -(p.used_mib or 0))[:STRANGERS_NAMED]
        return {
            "unclaimed_mib": self.unclaimed_mib,
            "free_mib": self.free_mib,
            "processes": [{"pid": p.pid, "name": shown_name(p.name), "used_mib": p.used_mib} for p in named],
            "more_processes": len(self.processes) - len(named),
        }

    def describe(self) -> dict[str, Any] | None:
        """``gpu.strangers`` in /v1/status (null without gpu.yield)."""
        if self.shared.config.gpu.yield_ is None:
            return None
        fields = self.fields()
        return {
            "present": self.present,
            "since": None if self.since is None else _iso(self.shared.wall.at(self.since)),
            "processes": fields["processes"],
            "more_processes": fields["more_processes"],
        }

    def keep_free_mib(self) -> int:
        """What a stranger present now must be left free (gpu.yield.keep_free_mib); 0 when none is."""
        y = self.shared.config.gpu.yield_
        return y.keep_free_mib if y is not None and self.present else 0

    def refuses(self, target: ConsumerConfig, reading: GpuReading | None) -> BrokerError | None:
        """gpu_in_use when a stranger is present and a job of ``target`` could not fit beside it even once
        every consumer that may be unloaded is (whoever works now is taken to be idle by then): as
        ``plan_room`` decides, from ``reading`` (the GPU's newest; no reading of its own). None when it may
        fit, when no stranger is present, or when the target needs no room (it is known to be resident, or
        its memory is elsewhere)."""
        keep = self.keep_free_mib()
        if not keep or target.vram_resident_mib == 0 or reading is None or reading.free_mib is None:
            return None
        views = {name: replace(view, jobs=0) for name, view in self.views().items()}
        view = views.get(target.name)
        if view is None or (view.resident is True and view.trusted):  # (known to be resident)
            return None
        cfg = self.shared.config
        snap = RoomSnapshot(
            target.name,
            views,
            reading.free_mib,
            cfg.gpu.cushion_mib,
            max_evictions=cfg.scheduler.max_evictions,
            used_mib=reading.used_mib,
            keep_free_mib=keep,
        )
        plan = plan_room(snap)
        return self.refusal(target.name, plan, snap.cushion_mib) if plan.hopeless else None

    def refusal(self, target: str, plan: RoomPlan, cushion_mib: int) -> BrokerError:
        """gpu_in_use for ``target``: the unclaimed MiB and the strangers' processes, what it needs, at most
        what could be made free; Retry-After GPU_IN_USE_RETRY_S (or poll_s, if longer)."""
        y = self.shared.config.gpu.yield_
        # (A target with nothing to load, its model in its processes already, needs the cushion alone.)
        keep = y.keep_free_mib if y is not None and plan.need_mib > cushion_mib else 0
        load = max(0, plan.need_mib - cushion_mib - keep)
        kept = f" + {keep} kept free for it" if keep else ""
        message = (
            f"GPU {self.index} is in use by something else: {self.unclaimed_mib} MiB no consumer claims"
            f" ({describe_processes(self.processes)}); {target} needs {plan.need_mib} MiB free ({load}"
            f" + cushion {cushion_mib}{kept}), at most {plan.expected_mib} MiB can be made free"
        )
        wait = max(GPU_IN_USE_RETRY_S, math.ceil(y.poll_s) if y is not None else 0)
        return BrokerError("gpu_in_use", message, target, retry_after=wait)


# ---- making room: carrying the plan out -------------------------------------------------------------


def reload_fate(job: Job, now: ConsumerConfig | None, index: int) -> ConsumerConfig | BrokerError:
    """What a reload makes of a job waiting on GPU ``index``, its consumer's config now being ``now``: the
    target it goes to (at a new URL, a new service, the config in force from now on; at its URL, the config
    it was admitted with), or no_consumer, where that consumer is gone, moved to another GPU, or at its new
    URL no longer serves the job's kind. (A reservation's job is no consumer's: it stays as it is.)"""
    if job.kind == RESERVATION:
        return job.target
    if now is None or now.gpu != index:
        why = "was removed from the config" if now is None else f"was moved to GPU {now.gpu}"
        return BrokerError("no_consumer", f"{job.consumer} {why}", job.consumer)
    if now.url != job.target.url and job.kind in job.target.paths and job.kind not in now.paths:
        why = f"{job.consumer} no longer serves kind {job.kind!r} at its new url"
        return BrokerError("no_consumer", why, job.consumer)
    return now if now.url != job.target.url else job.target


def made_ready_anew(
    job: Job, target: ConsumerConfig, now: ConsumerConfig | None, index: int
) -> ConsumerConfig | BrokerError | None:
    """After a pass of ``RoomMaker.ready`` for ``target``, the job's consumer being ``now``: as a queued job
    (``reload_fate``; its request is not under way), the new service a reload put in its place, to make
    the job ready anew for, or its refusal (its consumer removed, or at its new URL no longer serving its
    kind); or None: it goes on as it is (the same service; an admin or internal operation, whose call was
    that service's; a job whose caller left)."""
    if job.left or job.exclusive:
        return None
    fate = reload_fate(job, now, index)
    return None if fate is target else fate


def loads_first(target: ConsumerConfig, state: ConsumerState, warm: bool) -> bool:
    """Whether the broker loads a job's target itself once it fits: it has a load and is known not to be
    resident, or an admin load asks (``warm``), or it is a service started by command whose health fails
    (stopped, even when an unload command failed half-way and left its residency unknown)."""
    stopped = target.started_by_command and state.resident is None and state.healthy is False
    return target.load is not None and (state.resident is False or warm or stopped)


def in_doubt(target: ConsumerConfig, state: ConsumerState) -> bool:
    """Recorded resident, but something may have changed that since, or of unknown residency (a failed
    unload or load, a restart), and no reading measures it: the target is asked before any room is
    planned for it (a service started by command that is seen not running is not: it is stopped)."""
    stopped = target.started_by_command and state.stopped  # (refused: not one that was slow)
    measured = target.processes is not None and state.measurable
    return state.resident is not False and not state.trusted and not measured and not stopped


class RoomMaker:
    """Making room on one GPU for a granted job, as ``plan_room`` decides: the GPU readings, the victims'
    unloads, waiting for their memory to come free, then the target's load; a target in doubt is asked
    first. Serialised (``lock``): two jobs never evict at once. A failure raises BrokerError."""

    def __init__(
        self,
        shared: Shared,
        index: int,
        gpu: Any,
        ops: UnloadOps,
        recorder: Recorder,
        *,
        jobs_of: Callable[[str], int],
        working_of: Callable[[str], int],
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
        strangers: Strangers | None = None,
    ) -> None:
        self.shared = shared
        self.index = index
        self.gpu = gpu
        self.ops = ops
        self.states = ops.states
        self.recorder = recorder
        self.jobs_of = jobs_of
        self.working_of = working_of
        self.clock = clock
        self.sleep = sleep
        #: What the GPU's readings show that no consumer claims: a stranger present changes what fits.
        self.strangers = strangers
        #: Held while room is made (or an admin, idle or reservation unload runs): one at a time per GPU.
        self.lock = asyncio.Lock()
        #: When each unload under way started (its time is learned when its memory showed up free).
        self._unload_started: dict[str, float] = {}

    @property
    def config(self) -> Config:
        return self.shared.config

    def needs_no_room(self, job: Job) -> bool:
        """Resident by a record nothing has put in doubt, or its memory is elsewhere (a remote broker):
        no GPU reading, no eviction."""
        return self.states[job.consumer].known_resident() or job.target.vram_resident_mib == 0

    async def ready(self, job: Job, *, warm: bool = False) -> None:
        """Make the GPU ready for a granted job: room made for its target, and the target loaded. ``warm``
        (an admin load) also loads a target of unknown residency. A job whose caller left gets nothing more
        unloaded or loaded for it. A reload that gives its consumer a new URL meanwhile (a new service)
        sends a job with a request to make there, as it does a waiting one (``reload_fate``): it is made
        ready anew, for that one, or refused as it (``made_ready_anew``). An admin or internal operation is
        not sent on: its call, made by name, went to the service in force when it was made."""
        tried: dict[str, str] = {}  # victim -> how it went: one max_evictions, whichever service it was for
        async with self.lock:
            while True:
                target, failed = job.target, None
                try:
                    await self._ready(job, warm, tried)
                except BrokerError as e:  # (the old service's failure: the new one is tried all the same)
                    failed = e
                fate = made_ready_anew(job, target, self.config.consumers.get(job.consumer), self.index)
                if isinstance(fate, ConsumerConfig):
                    job.target, job.cold = fate, False
                    continue
                if fate is not None:  # (removed meanwhile, or its new URL no longer serves its kind)
                    raise fate
                if failed is not None:
                    raise failed
                return

    async def _ready(self, job: Job, warm: bool, tried: dict[str, str]) -> None:
        """One pass of ``ready`` for the job's target as it is now."""
        state = self.states[job.consumer]
        if self.needs_no_room(job) or job.left:
            return
        if job.target.started_by_command and state.failing() is not None:
            # Let in while the broker started it, and that start failed: it runs and fails its health.
            # One more probe decides, as at the door (Broker.check_reachable): no second start.
            await self.ops.probe_now(job.consumer)
            if (error := state.failing()) is not None:
                raise error
        if job.target.started_by_command and (why := state.start_failed_since(job.arrived)):
            # Let in to wait for a start under way, which failed, and it is still not running: refused
            # as that start was, not started once more for each job that waited (each would hold the
            # GPU for the load's timeout_s). A job that comes after the failure tries again.
            raise BrokerError("load_failed", f"{why} (the start this job waited for)", job.consumer)
        if in_doubt(job.target, state):
            await self._ask(job)
            if self.needs_no_room(job) or job.left:
                return
        await self._make_room(job, warm, tried)
        if job.left:
            return
        if loads_first(job.target, self.states[job.consumer], warm):
            await self.load(job)
        elif job.target.load is None and state.resident is not True:
            job.cold = True  # it loads itself on this request: its time tells its load

    async def _ask(self, job: Job) -> None:
        """Ask a target in doubt: one health probe with its residency report (health's ``loaded``, its
        residency query or for_each listing), within health.timeout_s, shared with any probe under way. A
        fresh "resident" makes its record trusted, a fresh "not resident" records it so; a consumer that
        cannot tell, or does not answer, stays in doubt (then it is planned at its full size)."""
        state = self.states[job.consumer]
        await self.ops.probe_now(job.consumer)
        self.recorder.record(
            "residency_asked", consumer=job.consumer, answer=state.residency_answer(), job=job.id
        )

    def views(self) -> dict[str, ConsumerView]:
        """This GPU's consumers as the planner sees them now, in config order."""
        return {
            name: ConsumerView.of(c, self.states[name], self.jobs_of(name))
            for name, c in self.config.consumers.items()
            if c.gpu == self.index and name in self.states
        }

    def snapshot(
        self, job: Job, reading: GpuReading, tried: Mapping[str, str], *, loads: bool = False
    ) -> RoomSnapshot:
        """The snapshot plan_room decides from: this GPU's consumers as the broker knows them now."""
        target = job.target
        consumers = self.views()
        if target.name not in consumers:  # a reload removed or moved it meanwhile: decide with the old
            state = self.states[target.name]
            consumers[target.name] = ConsumerView.of(target, state, self.jobs_of(target.name))
        if reading.free_mib is None:
            raise BrokerError("gpu_unavailable", "nvidia-smi reports no free memory figure", job.consumer)
        cfg = self.config
        return RoomSnapshot(
            target.name,
            consumers,
            reading.free_mib,
            cfg.gpu.cushion_mib,
            dict(tried),
            cfg.scheduler.max_evictions,
            reading.used_mib,
            self.working_of(target.name),
            loads,
            self.strangers.keep_free_mib() if self.strangers is not None else 0,
        )

    async def read(self, job: Job, *, whole: bool = False) -> GpuReading:
        """A reading of its own, started now: the GPU line alone to decide, with the process list where a
        consumer of this GPU is measured by its processes (``processes``) or to explain a refusal."""
        measures = any(c.processes is not None for c in self.config.consumers.values() if c.gpu == self.index)
        try:
            if whole or measures:
                return await self.gpu.read(own=True)
            return await self.gpu.read_memory()
        except GpuError as e:
            raise BrokerError("gpu_unavailable", f"cannot read the GPU: {e}", job.consumer) from e

    async def _make_room(self, job: Job, warm: bool, tried: dict[str, str]) -> None:
        """While the plan says the target does not fit, unload its first victim and wait for the memory."""
        asked = False
        reading = await self.read(job)
        while True:
            loads = loads_first(job.target, self.states[job.consumer], warm)
            snap = self.snapshot(job, reading, tried, loads=loads)
            plan = plan_room(snap)
            if plan.fits or job.left:  # (nobody waits for it any more: unload nothing more for it)
                return
            # Nobody left to unload but the target itself: those recorded absent are asked first.
            last_resort = all(victim == job.consumer for victim in plan.victims)
            if last_resort and not asked and (absent := absent_to_ask(snap)):
                asked = True  # (once a job: a probe each, at once)
                await asyncio.gather(*(self.ops.probe_now(name) for name in absent))
                # Planned anew, from a new reading: while they answered, anything may have changed (the
                # target itself, found not resident, is no victim any more).
                reading = await self.read(job)
                continue
            # Beside a stranger every consumer is measured: a plan that cannot fit whatever it unloads
            # unloads nothing (gpu_in_use at once, not after needless evictions).
            if not plan.victims or (snap.keep_free_mib and plan.hopeless):
                whole = await self.read(job, whole=True)  # the processes, for the message
                snap = self.snapshot(job, whole, tried)
                plan = plan_room(snap)
                if plan.fits:  # (memory came free since the reading it was refused on: the newest decides)
                    return
                if snap.keep_free_mib and self.strangers is not None:  # (it never waits for a stranger)
                    raise self.strangers.refusal(job.consumer, plan, snap.cushion_mib)
                message = room_message(plan, snap, whole.processes, self.ops.owners())
                raise BrokerError("insufficient_vram", message, job.consumer)
            victim = plan.victims[0]
            state = self.states[victim]  # (the service it unloads: a reload meanwhile may make another)
            size, pids = snap.consumers[victim].holds_mib, state.pids
            try:
                await self.unload(job, victim)
            except BrokerError:
                tried[victim] = "unload failed"
                continue
            reading, freed = await self._wait_for_memory(
                job, victim, state, size, pids, reading.free_mib or 0, plan.need_mib
            )
            waited = self.config.scheduler.vram_wait_s
            tried[victim] = "unloaded" if freed else f"unloaded, memory not freed within {waited:g} s"

    def unloading(self, name: str) -> bool:
        """An unload of ``name`` is under way on this GPU, whatever service the name is now: its call, an
        admin, idle or reservation unload from its reading before that (a reload may not move it to another
        GPU then), an eviction or a yield until its memory came free."""
        return name in self._unload_started

    async def unload(
        self,
        job: Job,
        victim: str,
        *,
        by: str | None = None,
        fields: Mapping[str, Any] | None = None,
        answered: Callable[[], None] | None = None,
    ) -> None:
        """Unload one consumer through its route or command: for ``job``'s room (``by`` None: an eviction,
        whose memory _wait_for_memory then waits for), or ``by`` an admin, idleness, a reservation or a
        stranger (``yield``: its memory is waited for too: ``yield_to``). unload_failed (recorded) when it
        fails, its cause the consumer's error. ``fields``: more for its records. ``answered`` is called once
        its call answered (before any wait for its memory, which a shutdown may cut).

        While the call is under way the victim's residency is unknown, and it stays so unless the call
        succeeds (a failed or interrupted unload may or may not have freed anything). An admin, idle or
        reservation unload then waits for its memory, as an eviction does (a service frees it after its
        answer: ComfyUI's worker, Ollama's runner), from a reading before the call: the next job must not
        find it gone from the records and its memory still in use; one of unknown residency too, unless the
        reading left too little unaccounted for to hold its model. Without a reading (one failed), its
        residency stays unknown.
        """
        state = self.states[victim]
        why: dict[str, Any] = {"for_consumer": job.consumer} if by is None else {"by": by}
        why |= fields or {}
        waits = by is not None and by != "yield"
        before: GpuReading | None = None
        if waits:
            self._unload_started[victim] = self.clock()  # (from its reading on: ``unloading``)
            try:
                before = await self.read(job)
            except BrokerError as e:
                log.warning(logfmt(msg="unload: no reading before it", consumer=victim, error=str(e)))
            except BaseException:
                self._unload_started.pop(victim, None)
                raise
            # The service its call goes to: a reload during the reading may have made it another.
            state = self.states.get(victim, state)
            # (What it is charged with, but never more than the reading shows in use.)
            size = 0 if before is None else _charged(self.views(), before.used_mib).get(victim, 0)
            size = min(size, before.used_mib) if before is not None and before.used_mib is not None else size
            pids = state.pids
        was = state.resident
        self.recorder.record("evicting" if by is None else "unloading", consumer=victim, **why, job=job.id)
        state.unloading()
        self._unload_started[victim] = self.clock()
        try:
            await self.ops.unload(victim)
        except BaseException as e:  # it may or may not have freed anything
            state.unload_failed()
            self._unload_started.pop(victim, None)
            if isinstance(e, BrokerError):  # (the consumer's failure: its answer, its command, no answer)
                self.recorder.record("unload_failed", consumer=victim, **why, job=job.id, error=str(e))
                raise BrokerError("unload_failed", f"{victim} {e}", victim) from e
            raise  # (cut: the broker is closing; or a bug: its job ends as scheduler_error, counted once)
        if answered is not None:
            answered()
        if not waits:
            return
        c = self.config.consumers.get(victim)
        measured = c is not None and c.processes is not None and state.measurable
        # One of unknown residency held at most what the reading left unaccounted for, one measured what
        # its processes held: too little for its model (under NOTHING_FREED_SHARE of it, as an eviction
        # judges: an idle ComfyUI's CUDA context, which /free never frees), it held none of it. (One measured
        # holding more than its record says was loaded behind the broker's back: it is waited for.)
        could = c is not None and size >= NOTHING_FREED_SHARE * c.vram_resident_mib
        held = was is True or (could and (was is None or measured))
        if held and before is not None and before.free_mib is not None:
            try:
                await self._wait_for_memory(job, victim, state, size, pids, before.free_mib, math.inf, by=by)
                return
            except BrokerError as e:  # (a reading failed: it was unloaded; its residency is left unknown)
                log.warning(logfmt(msg="unload: no reading after it", consumer=victim, error=str(e)))
        elif was is False or (was is None and before is not None):  # (it held no model: it holds none)
            state.unloaded()
        else:  # (no reading to wait from: unknown, the safe side)
            state.unconfirmed()
        self._unload_started.pop(victim, None)
        self.recorder.record(f"unloaded_{by}", consumer=victim, by=by, job=job.id)

    async def yield_to(
        self,
        job: Job,
        victim: str,
        reading: GpuReading,
        keep_free_mib: int,
        answered: Callable[[], None],
    ) -> bool:
        """Unload an idle consumer for a stranger (``reading``: the one that chose it) and wait, as an
        eviction does, until its memory came free (or ``keep_free_mib`` is free): the next decision is
        made from that reading. Then, if it did, ``yielded`` is recorded. ``answered`` is called once its
        unload answered (before the wait, which a shutdown may cut). Whether its memory came free."""
        assert self.strangers is not None
        size = _charged(self.views(), reading.used_mib).get(victim, 0)
        state = self.states[victim]  # (the service it unloads: a reload meanwhile may make another)
        pids = state.pids
        await self.unload(job, victim, by="yield", fields=self.strangers.fields(), answered=answered)
        before = reading.free_mib or 0
        _, freed = await self._wait_for_memory(
            job, victim, state, size, pids, before, keep_free_mib, by="yield"
        )
        return freed

    async def _wait_for_memory(
        self,
        job: Job,
        victim: str,
        state: ConsumerState,
        size: int,
        pids: frozenset[int],
        before: int,
        need: int,
        *,
        by: str | None = None,
    ) -> tuple[GpuReading, bool]:
        """After an eviction (or an unload ``by`` a yield, an admin, idleness or a reservation): poll until
        the target fits (``need`` MiB free), the victim's memory (``size`` MiB) came free, or
        ``vram_wait_s`` passed; the last reading, and whether the memory came free: what shows up as
        free, or for a victim measured by its processes, what they no longer hold (``pids``: its processes
        before the unload, counted whether or not a reading still tells whose they are: a process that
        exits has no name any more before its memory goes; a game that takes memory the moment it comes
        free leaves the free figure where it was). The victim is
        then not resident, or unknown if some but too little came free (a measured one whose processes
        still hold it: its next reading tells), in ``state``: the victim's as its unload began (a reload
        meanwhile may have made it another service, which the wait leaves alone)."""
        freed = False
        wait_s = self.config.scheduler.vram_wait_s
        deadline = self.clock() + wait_s
        enough_freed = FREED_SHARE * size
        took: float | None = None
        try:
            while True:
                started = self.clock()
                reading = await self.read(job)
                c = self.config.consumers.get(victim)
                # (Measured, this reading is whole, and told its state whether it shows the victim's memory:
                # one whose memory a process did not show is judged by the free memory alone.)
                measured = c is not None and c.processes is not None and state.measurable
                free = reading.free_mib if reading.free_mib is not None else before
                released = max(free - before, size - held_mib(reading, victim, pids) if measured else 0)
                if free >= need or released >= enough_freed:
                    state.unloaded()
                    freed = True
                    took = self.clock() - self._unload_started.pop(victim)
                    break
                if self.clock() >= deadline:
                    # Nothing came free: unmeasured, it most likely held nothing (its residency was a guess).
                    # Some did, or its processes still hold it: it may still be freeing the rest.
                    if not measured and released < NOTHING_FREED_SHARE * size:
                        state.unloaded()
                    else:
                        state.unconfirmed()
                    self.recorder.record("memory_not_freed", consumer=victim, free_mib=free, waited_s=wait_s)
                    break
                # A reading starts every VRAM_POLL_S (not VRAM_POLL_S after the last one ended).
                await self.sleep(max(0.0, VRAM_POLL_S - (self.clock() - started)))
        except BaseException:
            # A reading failed, the wait was cut (the broker closing), or a bug: its memory may or may not
            # have come free; what the broker does to it is over (a probe may tell again).
            state.unconfirmed()
            self._unload_started.pop(victim, None)
            raise
        self._unload_started.pop(victim, None)  # (not freed in time: no figure to learn)
        if by is None:
            job.evictions += 1
            self.recorder.record(
                "evicted", consumer=victim, for_consumer=job.consumer, free_mib=reading.free_mib
            )
        elif freed or by != "yield":  # (a yield that freed nothing is not one: its job fails)
            fields = self.strangers.fields() if by == "yield" and self.strangers is not None else {}
            self.recorder.record(f"unloaded_{by}", consumer=victim, by=by, job=job.id, **fields)
        if took is not None:
            self.recorder.learned(state, "unload", took, job.id)
        return reading, freed

    async def load(self, job: Job) -> None:
        """Load the target through its route or command; residency is unknown until that succeeds."""
        name = job.consumer
        state = self.states[name]
        self.recorder.record("loading", consumer=name, job=job.id)
        state.loading()
        started = self.clock()
        try:
            await self.ops.load(name)
        except BrokerError as e:  # (the consumer's failure)
            state.load_failed(f"{name} {e}")
            self.recorder.record("load_failed", consumer=name, job=job.id, error=str(e))
            raise BrokerError("load_failed", f"{name} {e}", name) from e
        except BaseException as e:  # cut, or a bug (its job ends as scheduler_error, counted once)
            state.load_failed(f"{name}: its load was cut ({describe(e)})")
            raise
        state.loaded()
        took = self.clock() - started
        self.recorder.record("loaded", consumer=name, job=job.id)
        self.recorder.learned(state, "load", took, job.id)


# ---- holds: the GPU kept after an answer until the consumer's work is done --------------------------


class NoHold(Exception):
    """A hold whose client left found no work to wait for: the answer, which it read itself, broke off, did
    not come, was not 2xx, or names nothing to poll. Its hold ends at once (``hold_ended``, ``none``)."""


class Holds:
    """The holds of one GPU's jobs: after its answer, a job (ComfyUI's render) keeps its slot in a task the
    scheduler owns, until the consumer says the work is done, the hold's timeout, or the consumer is seen
    gone (abandoned); then the consumer's last use, the job's log line and metrics, and its slot."""

    def __init__(
        self,
        recorder: Recorder,
        ops: UnloadOps,
        clock: Callable[[], float],
        *,
        own: Callable[[asyncio.Task[Any]], asyncio.Task[Any]],
        release: Callable[[Job], object],
    ) -> None:
        self.recorder = recorder
        self.ops = ops
        self.states = ops.states
        self.clock = clock
        self.own = own
        #: Gives the job's slot back (its hold's), once the hold is over.
        self.release = release
        #: The holds running now, and why one was abandoned (set before it is cancelled).
        self.tasks: dict[Job, asyncio.Task[None]] = {}
        self._abandoned: dict[Job, str] = {}

    def start(self, job: Job, hold: Callable[[], Awaitable[None]], timeout_s: float) -> None:
        """Keep the ended job's slot while ``hold`` runs, at most ``timeout_s``. A bug as it starts is logged
        and counted: before its task exists, the slot goes at once; after, the task's end gives it back."""
        started = self.clock()
        try:
            task = asyncio.get_running_loop().create_task(self._hold(job, hold, timeout_s, started))
            self.tasks[job] = task
            # A hold cancelled before it ever ran (abandoned, the broker closing) runs no finally of its own.
            task.add_done_callback(lambda _: self._over(job, started, never_ran=True))
            self.own(task)
        except Exception as e:
            self.recorder.internal_error(
                "hold start crashed", consumer=job.consumer, job=job.id, error=describe(e)
            )
            if job not in self.tasks:
                self.release(job)

    def current(self, job: Job) -> bool:
        """Whether the job's consumer is still the service it ran on (``same_service``)."""
        return same_service(self.recorder.shared.config, job.target)

    def abandon(self, name: str, reason: str) -> None:
        """The consumer was seen down: its work died with it, so its holds end now (hold_abandoned). A hold
        on the service it was before a reload gave it another URL is not its work."""
        for job, task in list(self.tasks.items()):
            if job.consumer == name and job not in self._abandoned and self.current(job):
                self._abandoned[job] = reason
                task.cancel()  # a task cancelled before its first step ends through _over's callback

    async def _hold(
        self, job: Job, hold: Callable[[], Awaitable[None]], timeout_s: float, started: float
    ) -> None:
        """Keep the job's slot while ``hold`` runs (at most ``timeout_s``), unless the consumer is seen down
        meanwhile; then write the job's log line."""
        fields: dict[str, Any] = {"consumer": job.consumer, "job": job.id, "kind": job.kind}
        ended = None  # (the clock read once at its end: its event, its line and its histogram say the same)
        try:
            await asyncio.wait_for(hold(), timeout_s)
            ended = self.clock()
            self.recorder.record("hold_released", **fields, hold_s=round(ended - started, 3))
        except NoHold as e:
            ended = self.clock()
            self.recorder.record("hold_none", **fields, hold_s=round(ended - started, 3), reason=str(e))
        except asyncio.TimeoutError:
            ended = self.clock()
            self.recorder.record(
                "hold_timed_out", **fields, hold_s=round(ended - started, 3), timeout_s=timeout_s
            )
        except ConsumerGone as e:
            ended = self.clock()
            self._abandoned.setdefault(job, e.reason)
            if self.current(job):
                self.ops.gone(job.consumer, e.reason)  # its other holds end too
            self._record_abandoned(job, fields, started, ended)
        except asyncio.CancelledError:
            ended = self.clock()
            if job not in self._abandoned:
                # Cut short: the broker is closing (its drain timed out).
                self.recorder.record("hold_cut", **fields, hold_s=round(ended - started, 3))
                raise
            self._record_abandoned(job, fields, started, ended)
        except Exception as e:
            ended = self.clock()
            self.recorder.internal_error("hold crashed", consumer=job.consumer, job=job.id, error=describe(e))
            self.recorder.record("hold_cut", **fields, hold_s=round(ended - started, 3), error=describe(e))
        finally:
            self._over(job, started, ended)

    def _over(self, job: Job, started: float, ended: float | None = None, *, never_ran: bool = False) -> None:
        """The hold ended at ``ended`` (once: from its own finally, or, cancelled before it ever ran, from
        its task's end, now): the job's last use, log line and metrics, then its slot."""
        if self.tasks.pop(job, None) is None:
            return
        try:
            if ended is None:
                ended = self.clock()
            if never_ran:
                fields = {"consumer": job.consumer, "job": job.id, "kind": job.kind}
                if job in self._abandoned:
                    self._record_abandoned(job, fields, started, ended)
                else:
                    self.recorder.record("hold_cut", **fields, hold_s=round(ended - started, 3))
            elif not self.current(job):
                self.recorder.not_recorded(job)
            elif job.outcome == "completed" and job not in self._abandoned:
                self.recorder.job_took(job, self.states[job.consumer], ended)
            if self.current(job):
                # The consumer worked until now: for idle unloads and the LRU order, this is its last use.
                self.states[job.consumer].used()
            held = ended - started
            self.recorder.metrics.observe("mgpumanager_hold_seconds", held, consumer=job.consumer)
            self.recorder.job_line(job, hold_ms=round(held * 1000))
        except Exception as e:  # a bug in the books: the slot still goes
            self.recorder.internal_error("hold end crashed", consumer=job.consumer, error=describe(e))
        finally:
            self._abandoned.pop(job, None)
            self.release(job)

    def _record_abandoned(self, job: Job, fields: dict[str, Any], started: float, ended: float) -> None:
        reason = self._abandoned[job]
        self.recorder.record("hold_abandoned", **fields, hold_s=round(ended - started, 3), reason=reason)


# ---- reservations: the GPU given to something else for a while --------------------------------------


@dataclass(eq=False)
class Reservation:
    """A GPU given to something else for a while (a game, a training run): its lock held by a job of
    RESERVATION's, after every consumer on it was asked to unload."""

    job: Job
    reason: str
    #: When it ends on its own (monotonic: its timer's; ``WallClock`` gives it to people).
    until: float
    #: The consumers it unloaded, and why the others were not.
    unloaded: list[str] = field(default_factory=list)
    not_unloaded: dict[str, str] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None
    #: Its end loads again what it unloaded (``restore``: ``reserve --no-restore`` says not): those of the
    #: consumers it unloaded that were resident (``to_restore``).
    restore: bool = True
    to_restore: list[str] = field(default_factory=list)
    #: Its length as last asked for; whether a ``reserved`` event said it; why it ended (None: in force).
    for_s: float = 0.0
    announced: bool = False
    ended: str | None = None
    #: Its unloads are under way (its end is told to the listeners once they are done).
    unloading: bool = False

    def describe(self, now: float, wall: WallClock) -> dict[str, Any]:
        """What /v1/status, the reserve answer and `ps` show of it."""
        return {
            "reason": self.reason,
            "until": _iso(wall.at(self.until)),
            "left_s": round(max(0.0, self.until - now), 1),
            "unloaded": list(self.unloaded),
            "not_unloaded": dict(self.not_unloaded),
            "restore": self.restore,
        }


class Reservations:
    """One GPU's reservation (``reserve``): the one in force, held by a job of RESERVATION's with its timer,
    and those asked for that still wait for the lock (a release cancels them). A reservation outlives the
    request that made it (its end is a timer's or a release's), so its job is acquired and released here,
    not held in a lease."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        #: The GPU given to something else, or None; the reservations asked for that wait for the lock (or
        #: were granted it and have not begun): a release cancels them.
        self.reservation: Reservation | None = None
        self._waiting: set[Job] = set()
        #: The one in force when the broker began to shut down: still in force for the state file (a
        #: restart holds the GPU again), though this broker gave its lock back.
        self.kept: Reservation | None = None
        #: Told of each reservation's end but at shutdown (what it unloaded is restored from there).
        self.ended: list[Callable[[Reservation], None]] = []

    def refusal(self, consumer: str | None) -> BrokerError:
        """gpu_reserved, with the time left."""
        res = self.reservation
        assert res is not None
        s = self.scheduler
        left = max(0.0, res.until - s.clock())
        message = f"GPU {s.index} is reserved ({res.reason}) for {left:.0f} s more"
        return BrokerError("gpu_reserved", message, consumer, retry_after=max(1, math.ceil(left)))

    def _job(self) -> Job:
        """A job of RESERVATION's (no consumer's) for this GPU's lock."""
        s = self.scheduler
        target = ConsumerConfig(
            name=RESERVATION, url="", health=Route("GET", "/"), paths={}, vram_resident_mib=0, gpu=s.index
        )
        if RESERVATION not in s.states:
            s.states[RESERVATION] = ConsumerState(RESERVATION, s.clock)
        return s.new_job(target, RESERVATION, PRIORITY_MAX, exclusive=True)

    async def reserve(self, for_s: float, reason: str, *, restore: bool = True) -> Reservation:
        """Give the GPU to something else for ``for_s`` seconds: wait for the lock like an admin operation,
        answer the jobs still waiting with gpu_reserved, ask every consumer on the GPU that has an unload
        to unload (vram_managed ones too), then hold the lock until ``for_s`` passed or ``release``; then
        what it unloaded is loaded again (``restore``). Asked again while reserved: the reservation now
        ends ``for_s`` from now, for the new reason (and ``restore``)."""
        if self.reservation is not None:
            return self._extend(self.reservation, for_s, reason, restore)
        s = self.scheduler
        job = self._job()
        self._waiting.add(job)
        try:
            await s.wait_for_grant(job)
        finally:
            cancelled = job not in self._waiting  # by a release while it waited (cancel_waiting)
            self._waiting.discard(job)
        if cancelled:
            if job.state == "running":  # granted before the release: the GPU goes back at once
                job.release("cancelled", code="reservation_released")
            else:
                s.end(job, "cancelled", "reservation_released")
            message = f"GPU {s.index} was released before this reservation began: nothing was unloaded"
            raise BrokerError("reservation_released", message)
        if job.state != "running":  # answered by a reservation made while it waited: it extends that one
            s.end(job, "completed")
            if self.reservation is None:  # (which ended meanwhile)
                return await self.reserve(for_s, reason, restore=restore)
            return self._extend(self.reservation, for_s, reason, restore)
        if self.reservation is not None:  # another request reserved it meanwhile: this one extends it
            job.release()
            return self._extend(self.reservation, for_s, reason, restore)
        res = Reservation(job, reason, s.clock() + for_s, restore=restore, for_s=for_s)
        self.reservation = res
        try:
            # Its time runs from now: expired while it still unloads, it unloads nothing more.
            res.timer = asyncio.get_running_loop().call_later(for_s, self.release, "expired")
            for waiting in [j for j in s.lock.waiting if not j.granted.done()]:
                if waiting.kind == RESERVATION:  # asked for while this one waited: it extends this one
                    s.lock.take_out(waiting)
                    waiting.granted.set_result(None)
                else:
                    s.lock.refuse(waiting, self.refusal(waiting.consumer))
            # The broker's from here on, like a hold: a client that leaves does not cut the unloads short.
            start = s.own(asyncio.ensure_future(self._start(res)))
        except Exception as e:  # a bug before its unloads began: no reservation, the GPU is free again
            self.reservation = None
            if res.timer is not None:
                res.timer.cancel()
            raise s.ended_by(job, e) from e
        await asyncio.shield(start)
        if res.ended in ("released", "expired"):  # while it unloaded: the GPU is not reserved (at a
            # shutdown it is: kept for the next start)
            unloaded = f"unloaded {', '.join(res.unloaded)}" if res.unloaded else "nothing was unloaded"
            message = f"GPU {s.index}'s reservation ended ({res.ended}) while it still unloaded: {unloaded}"
            raise BrokerError("reservation_released", message)
        return res

    async def _start(self, res: Reservation) -> None:
        await self._unloads(res)
        if self.reservation is res:  # (not released or expired while it unloaded)
            self._announce(res, lists=True)

    def _announce(self, res: Reservation, *, lists: bool = False, **more: Any) -> None:
        """The ``reserved`` event of a reservation in force: once its unloads are done, when it is extended,
        resumed after a restart, or ended before its unloads were (never a ``reservation_ended`` alone).
        ``lists``: with what it unloaded and why not the others, as they are now (the event is serialised
        later)."""
        if lists:
            more.update(unloaded=list(res.unloaded), not_unloaded=dict(res.not_unloaded))
        s = self.scheduler
        until = _iso(s.shared.wall.at(res.until))
        s.recorder.record(
            "reserved",
            consumer=RESERVATION,
            reason=res.reason,
            for_s=res.for_s,
            until=until,
            job=res.job.id,
            **more,
        )
        res.announced = True

    def _extend(self, res: Reservation, for_s: float, reason: str, restore: bool) -> Reservation:
        s = self.scheduler
        res.reason, res.until, res.for_s = reason, s.clock() + for_s, for_s
        res.restore = restore
        if res.timer is not None:
            res.timer.cancel()
        res.timer = asyncio.get_running_loop().call_later(for_s, self.release, "expired")
        self._announce(res)
        return res

    async def _unloads(self, res: Reservation) -> None:
        """``_unload_all``; a bug there leaves the reservation standing, with what it unloaded."""
        res.unloading = True
        try:
            await self._unload_all(res)
        except Exception as e:
            self.scheduler.recorder.internal_error("reservation's unloads crashed", error=describe(e))
            res.not_unloaded.setdefault("(the rest)", f"internal error: {describe(e)}")
        finally:
            res.unloading = False
            if res.ended in ("released", "expired"):  # ended meanwhile: its end told now, the unload done
                self._tell_ended(res)

    async def _unload_all(self, res: Reservation) -> None:
        """Ask each consumer of the GPU that has an unload to unload, known resident or not (the broker's
        record may be stale; unloading what holds nothing costs nothing), but those it unloaded already (a
        reservation resumed after a restart); say why the others stay. The consumers are those on the GPU
        as each turn comes (a reload meanwhile may move one away, or one here), each asked once."""
        s = self.scheduler
        asked: set[str] = set()
        async with s.rooms.lock:
            if any(c.processes is not None for c in s.config.consumers.values() if c.gpu == s.index):
                try:  # what the measured ones hold decides what its end restores: a reading says
                    await s.rooms.read(res.job)
                except BrokerError as e:
                    log.warning(
                        logfmt(msg="reservation: residency from the records", gpu=s.index, error=str(e))
                    )
            while self.reservation is res:  # (released or expired meanwhile: the GPU is given back)
                todo = [
                    (name, c)
                    for name, c in s.config.consumers.items()
                    if c.gpu == s.index and name not in res.unloaded and name not in asked
                ]
                if not todo:
                    break
                name, c = todo[0]
                asked.add(name)
                if c.unload is None:
                    res.not_unloaded[name] = "no unload route"
                    continue
                if s.states[name].resident is None:  # (resumed before the first health round, say): asked
                    await s.rooms.ops.probe_now(name)
                    if self.reservation is not res:  # (released while it answered)
                        break
                    if s.config.consumers.get(name) is not c:  # (a reload meanwhile: its config decides)
                        asked.discard(name)
                        continue
                resident = s.states[name].resident is True  # (what it held is what its end restores)

                def answered(name: str = name, resident: bool = resident) -> None:
                    res.unloaded.append(name)  # (from its answer on: a wait for its memory may be cut)
                    if resident:
                        res.to_restore.append(name)

                try:
                    await s.rooms.unload(res.job, name, by="reservation", answered=answered)
                except BrokerError as e:
                    res.not_unloaded[name] = f"unload failed: {e.__cause__}"

    def cancel_waiting(self) -> bool:
        """DELETE /v1/reserve while reservations wait for the lock: each is cancelled (its POST answered
        reservation_released), before it unloaded anything; whether there was one."""
        s = self.scheduler
        pending, self._waiting = self._waiting, set()
        for job in pending:
            if job in s.lock.waiting:
                s.lock.take_out(job)
            if not job.granted.done():
                job.granted.set_result(None)  # it wakes, finds itself cancelled and ends (see reserve)
        if pending:
            s.lock.dispatch()  # (an exclusive waiter of priority 4 may have kept a join out)
        return bool(pending)

    def release(self, why: str = "released") -> bool:
        """End the reservation (``released`` by DELETE /v1/reserve, ``expired``, or at ``shutdown``: then it
        is ``kept`` for the state file, and nothing is restored); whether there was one. Jobs are admitted
        again at once, and what it unloaded is restored (``ended``)."""
        res = self.reservation
        if res is None:
            return False
        self.reservation, res.ended = None, why
        try:
            if res.timer is not None:
                res.timer.cancel()
            if not res.announced:  # ended while it unloaded: said first, with what it unloaded so far
                self._announce(res, lists=True)
            self.scheduler.recorder.record(
                "reservation_ended", consumer=RESERVATION, why=why, job=res.job.id, reason=res.reason
            )
            if why == "shutdown":
                self.kept = res
            elif not res.unloading:
                self._tell_ended(res)
        except Exception as e:  # a bug in the books: the GPU is given back all the same
            self.scheduler.recorder.internal_error("reservation's end crashed", error=describe(e))
        res.job.release()
        return True

    def _tell_ended(self, res: Reservation) -> None:
        """Tell the ``ended`` listeners (what to restore): at its end, or, where an unload of its was under
        way then, once that unload has answered (a consumer counts as unloaded from its answer on)."""
        try:
            for listener in self.ended:
                listener(res)
        except Exception as e:
            self.scheduler.recorder.internal_error("reservation's end crashed", error=describe(e))

    def resume(
        self, left_s: float, reason: str, restore: bool, unloaded: Sequence[str], to_restore: Sequence[str]
    ) -> Reservation:
        """A reservation read from the state file, still in force for ``left_s``: it holds the GPU again at
        once (before any job is admitted), and asks what it had not unloaded yet to unload (a restart may
        have cut its unloads short), as the broker's own work; what it had unloaded is not asked again (the
        broker's clients could load nothing while it was down: they go through it)."""
        s = self.scheduler
        assert self.reservation is None and s.lock.holder is None and not s.lock.waiting
        job = self._job()
        s.lock.waiting.append(job)
        s.lock.dispatch()  # (the lock is free and nothing else waits: granted at once)
        left = max(0.0, left_s)
        res = Reservation(job, reason, s.clock() + left, restore=restore, for_s=round(left, 1))
        res.unloaded, res.to_restore = list(unloaded), list(to_restore)
        self.reservation = res
        res.timer = asyncio.get_running_loop().call_later(left, self.release, "expired")
        self._announce(res, resumed=True)
        s.own(asyncio.ensure_future(self._unloads(res)))
        return res


# ---- a job's lease, and the scheduler that hands leases out -----------------------------------------


class JobLease:
    """A job as its caller holds it: ``async with scheduler.job(consumer, kind) as job`` admits it, waits for
    the GPU's lock, makes room and loads (or runs ``step``: the whole work of an admin or internal job),
    and gives the granted job. Its exit ends the job exactly once, on every path: at once when nothing ended
    it (completed), or as the exception says (``Scheduler.ended_by``: a BrokerError failed with its code, a
    cancellation or a client that left cancelled, anything else failed as scheduler_error, counted and
    logged). Inside the block the caller ends it itself the moment the consumer's answer has been read
    whole (``job.release``: idempotent), so the GPU goes to the next job before the client gets the last
    bytes; the exit then does nothing more."""

    def __init__(
        self,
        scheduler: Scheduler,
        consumer: str,
        kind: str,
        *,
        request_id: str | None = None,
        exclusive: bool = False,
        priority: int | None = None,
        step: Callable[[Job], Awaitable[None]] | None = None,
        client: str | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.consumer, self.kind, self.request_id = consumer, kind, request_id
        self.exclusive, self.priority, self.step = exclusive, priority, step
        self.client = client
        self.job: Job | None = None

    async def __aenter__(self) -> Job:
        s = self.scheduler
        job = self.job = s.admit(
            self.consumer, self.kind, self.request_id, self.exclusive, self.priority, self.client
        )
        job.caller = asyncio.current_task()
        await s.wait_for_grant(job)
        try:
            await self._prepare(job)
            if self.step is None:  # it goes to work on its consumer now
                s.lock.started(job)
                s.recorder.job_event("started", job)
        except BaseException as e:
            error = s.ended_by(job, e)
            if error is e:
                raise
            raise error from e
        return job

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        job = self.job
        if job is None or job.state != "running":  # ended already (by its answer)
            return
        if exc is None:
            job.release()
            return
        error = self.scheduler.ended_by(job, exc)
        if error is not exc:
            raise error from exc

    async def _prepare(self, job: Job) -> None:
        """Make room and load (or run ``step``) as the scheduler's own task: a caller that goes away (the
        client left) does not cut it; an unload or load runs to its end or its own timeout, then the job
        ends as cancelled, the consumer's state being what the step really did."""
        s = self.scheduler
        if self.step is None and s.rooms.needs_no_room(job):  # (the common case: no task, no lock)
            return
        task = s.own(asyncio.ensure_future(s.rooms.ready(job) if self.step is None else self.step(job)))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # the caller left: the step under way runs on, and the job ends with it
                job.left = True
                task.add_done_callback(functools.partial(self._ended_after, job))
            raise

    def _ended_after(self, job: Job, task: asyncio.Task[Any]) -> None:
        """The step a job's caller left during is done: the job ends as cancelled (a crash is still one)."""
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, BrokerError):
            self.scheduler.recorder.internal_error(
                "scheduler crashed", exc, consumer=job.consumer, job=job.id
            )
        job.release("cancelled")


class Scheduler:
    """One GPU's scheduler: its lock (the queue and the grants), its room maker, its holds and its
    reservation, composed; it hands out job leases (``job``).

    The clock, the GPU reader and the consumer calls are injected, so the whole decision logic runs in tests
    without sockets. Invariant: whatever raises while a job is queued, granted, making room, running or
    held, the job ends (once) and its slot is freed.
    """

    def __init__(
        self,
        shared: Shared,
        gpu: Any,
        ops: UnloadOps,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        events: Events | None = None,
        metrics: Metrics | None = None,
        index: int | None = None,
        jobs_of: Callable[[str], int] | None = None,
    ):
        self.shared = shared
        #: The GPU this scheduler owns (gpu.index unless given): only consumers on it are its business.
        self.index = shared.config.gpu.index if index is None else index
        self.gpu = gpu
        self.ops = ops
        self.states = ops.states
        self.clock = clock
        self.events = events or Events()
        self.metrics = metrics or Metrics()
        self.recorder = Recorder(self.index, self.events, self.metrics, shared)
        self.lock = GpuLock(
            shared,
            self.index,
            clock,
            self.recorder,
            resident=lambda name: name in self.states and self.states[name].resident is True,
            eta=ClientEtas(self.eta, clock),
            forecast=lambda: self.forecast(),  # noqa: PLW0108 (whatever self.forecast is then)
            on_grant=self._on_grant,
            play=self._play_off_loop,
        )
        #: A consumer's jobs and holds holding a GPU lock: this one's, or (the broker's) every GPU's, for a
        #: consumer a reload moved.
        self.jobs_of = jobs_of or self.lock.jobs_of
        #: Memory the readings show that no consumer claims, and the stranger it may be (gpu.yield).
        views = lambda: self.rooms.views()  # noqa: E731, PLW0108 (the room maker comes next)
        self.strangers = Strangers(shared, self.index, self.recorder, clock, views=views)
        self.rooms = RoomMaker(
            shared,
            self.index,
            gpu,
            ops,
            self.recorder,
            jobs_of=self.jobs_of,
            working_of=self.lock.working_of,
            clock=clock,
            sleep=sleep,
            strangers=self.strangers,
        )
        #: Work the scheduler owns (holds, steps whose caller left, a reservation's unloads): cancelled on
        #: close.
        self.tasks: set[asyncio.Task[Any]] = set()
        self.holding = Holds(
            self.recorder, ops, clock, own=self.own, release=functools.partial(self.release_slot, held=True)
        )
        self.reservations = Reservations(self)

    def __repr__(self) -> str:
        return f"<Scheduler gpu={self.index} {self.lock!r}>"

    @property
    def config(self) -> Config:
        return self.shared.config

    @property
    def stats(self) -> Stats:
        return self.recorder.stats

    # ---- the lock's state, for people and tests (the lock owns it) ---------------------------------

    @property
    def holder(self) -> str | None:
        return self.lock.holder

    @property
    def slots(self) -> int:
        return self.lock.slots

    @property
    def holds(self) -> int:
        return self.lock.holds

    @property
    def exclusive(self) -> bool:
        return self.lock.exclusive

    @property
    def running(self) -> int:
        return self.lock.slots - self.lock.holds

    @property
    def reservation(self) -> Reservation | None:
        return self.reservations.reservation

    def queue(self) -> list[Job]:
        """Waiting jobs, highest effective priority first, then by arrival (``forecast`` gives the order
        with overtaking and the expected waits)."""
        now, aging_s = self.clock(), self.config.scheduler.aging_s
        return sorted(
            self.lock.waiting, key=lambda j: (-effective_priority(j, now, aging_s), j.arrived, j.id)
        )

    # ---- jobs: admission, the lease, the end ---------------------------------------------------------

    def job(
        self,
        consumer: str,
        kind: str,
        *,
        request_id: str | None = None,
        exclusive: bool = False,
        priority: int | None = None,
        step: Callable[[Job], Awaitable[None]] | None = None,
        client: str | None = None,
    ) -> JobLease:
        """A job's lease: ``async with scheduler.job(consumer, kind) as job`` (see JobLease); ``client``:
        the auth.clients client it runs for."""
        return JobLease(
            self,
            consumer,
            kind,
            request_id=request_id,
            exclusive=exclusive,
            priority=priority,
            step=step,
            client=client,
        )

    async def unload_now(self, name: str) -> Job:
        """Admin: unload a consumer through its route, holding the lock alone so no job races it."""

        async def unload(job: Job) -> None:
            async with self.rooms.lock:
                await self.rooms.unload(job, name, by="admin")

        async with self.job(name, "unload", exclusive=True, step=unload) as job:
            return job

    async def load_now(self, name: str) -> Job:
        """Admin: make room for a consumer and load it (warm-up), holding the lock alone."""
        step = functools.partial(self.rooms.ready, warm=True)
        async with self.job(name, "load", exclusive=True, step=step) as job:
            return job

    def admit(
        self,
        consumer: str,
        kind: str,
        request_id: str | None = None,
        exclusive: bool = False,
        priority: int | None = None,
        client: str | None = None,
    ) -> Job:
        """A new job for a configured consumer of this GPU, while the GPU is not reserved; counted from
        here on. A client's priority, where it has one, replaces the consumer's."""
        target = self.config.consumers.get(consumer)
        if target is None:  # removed by a reload since the request was routed
            raise BrokerError("no_consumer", f"{consumer} is no longer configured", consumer)
        if target.gpu != self.index:  # moved to another GPU by a reload meanwhile
            raise BrokerError("no_consumer", f"{consumer} runs on GPU {target.gpu} now", consumer)
        spec = None
        if client is not None:
            spec = self.config.auth.clients.get(client)
            if spec is None:  # removed by a reload since its request was let in (its connection closes)
                raise BrokerError("unauthorized", f"client {client} is no longer configured", consumer)
        if self.reservations.reservation is not None:
            raise self.reservations.refusal(consumer)
        refusal = None if exclusive else self.strangers.refuses(target, self.gpu.last_reading())
        if refusal is not None:
            raise refusal  # (as gpu_reserved: before it is a job, so it is not counted)
        if priority is None:
            own = spec.priority if spec is not None else None  # (the client's)
            priority = PRIORITY_MAX if exclusive else own if own is not None else target.priority
        return self.new_job(target, kind, priority, exclusive=exclusive, request_id=request_id, client=client)

    def new_job(
        self,
        target: ConsumerConfig,
        kind: str,
        priority: int,
        *,
        exclusive: bool = False,
        request_id: str | None = None,
        client: str | None = None,
    ) -> Job:
        self.recorder.job_admitted()
        return Job(
            id=next(self.shared.job_ids),
            target=target,
            kind=kind,
            priority=priority,
            arrived=self.clock(),
            granted=asyncio.get_running_loop().create_future(),
            exclusive=exclusive,
            request_id=request_id,
            client=client,
            scheduler=self,
        )

    async def wait_for_grant(self, job: Job) -> None:
        """Queue the job and wait for the lock (``GpuLock.wait``); raised, the job has ended."""
        try:
            await self.lock.wait(job)
        except BaseException as e:
            error = self.ended_by(job, e)
            if error is e:
                raise
            raise error from e

    def _on_grant(self, job: Job) -> None:
        """The lock went to ``job`` (before it wakes): the others' doubt, its event. A bug here is logged
        and counted; the grant stands (the lock counted it, so its release balances)."""
        try:
            if self.lock.slots == 1 and job.kind not in UNLOAD_KINDS:
                self._touch_others(job)
            # (Its wait ended at the grant's moment, job.started, as its line and histogram say.)
            self.recorder.job_event("granted", job, waited_s=round(job.started - job.arrived, 3))
        except Exception as e:
            self.recorder.internal_error(
                "grant bookkeeping crashed", consumer=job.consumer, error=describe(e)
            )

    def _touch_others(self, job: Job) -> None:
        """A consumer is granted the GPU: it may load, so the others' resident records need a reading now."""
        for name, c in self.config.consumers.items():
            if name != job.consumer and c.gpu == self.index and name in self.states:
                self.states[name].touched(f"{job.consumer} was granted the GPU")

    def ended_by(self, job: Job, exc: BaseException) -> BaseException:
        """End ``job`` once, as the exception that stopped it says: cancelled (its caller left, or the
        client did), failed with a BrokerError's code (queue_full: rejected), or, a bug, failed as
        scheduler_error, counted and logged with its traceback; its slot, if it holds one, goes. A job whose
        step its caller left ends when that step does (``JobLease._ended_after``). What its caller is to
        get: ``exc``, or for a bug scheduler_error."""
        if job.state == "ended" or job.left:
            return exc
        error = exc
        if isinstance(exc, (asyncio.CancelledError, ConnectionResetError)):
            outcome, code = "cancelled", None
        elif isinstance(exc, BrokerError):
            outcome = "rejected" if exc.code in ("queue_full", "client_queue_full") else "failed"
            code = exc.code
        else:
            self.recorder.internal_error("scheduler crashed", exc, consumer=job.consumer, job=job.id)
            outcome, code = "failed", "scheduler_error"
            error = BrokerError("scheduler_error", f"internal error: {describe(exc)}", job.consumer)
        if job.state == "running":
            job.release(outcome, code=code)
        else:
            self.end(job, outcome, code)
        return error

    def finish(
        self,
        job: Job,
        outcome: str,
        code: str | None,
        status: int | None,
        success: bool,
        hold: Callable[[], Awaitable[None]] | None,
        hold_timeout_s: float,
    ) -> bool:
        """``Job.release``: end a running job. Whether another job was granted the slot.

        ``success``: the consumer answered 2xx and took the work: it is resident and was used now, unless
        the job was a mount call outside its paths (that may have done anything: its record needs a
        reading, if it reached the consumer). ``hold`` keeps the job's slot (``Holds``) until it returns or
        ``hold_timeout_s``; the job counts as one (for its run time) until then.
        """
        state = self.states[job.consumer]
        # (Else its outcome is the old service's; a reservation's job runs for no service: nothing to check.)
        recorded = job.kind == RESERVATION or same_service(self.config, job.target)
        try:
            if not recorded:
                self.recorder.not_recorded(job)
            elif job.kind == MOUNT_KIND and job.working:
                state.touched("a mount call outside its paths")
            elif success:
                state.served()
                path = job.target.paths.get(job.kind)
                own = path and own_route(job.target, path.method, path.path.partition("?")[0])
                if own:
                    state.touched(f"its {job.kind} path is also its {own} route")  # (Ollama's generate)
        except Exception as e:  # a bug in the books: the job still ends, its slot still goes
            self.recorder.internal_error(
                "job end crashed", consumer=job.consumer, job=job.id, error=describe(e)
            )
            hold = None
        if hold is None:
            # The slot first: the job granted next is woken before this one's event and log line.
            granted = self.release_slot(job)
            self.end(job, outcome, code, status)
            if success and recorded:
                self.recorder.job_took(job, state, self.clock())
            return granted
        try:
            self.end(job, outcome, code, status, log_now=False)
        except Exception as e:  # a bug in its books: as above, no hold starts and the slot goes at once
            self.recorder.internal_error(
                "job end crashed", consumer=job.consumer, job=job.id, error=describe(e)
            )
            return self.release_slot(job)
        self.lock.hold()
        self.holding.start(job, hold, hold_timeout_s)
        return False

    def release_slot(self, job: Job, *, held: bool = False) -> bool:
        """A job or hold gives its slot back; the last one frees the lock. Whether another job got it.
        (The lock counts it back before it grants: a crash in a grant that follows leaves no count.)"""
        try:
            return self.lock.release(job, held=held)
        except Exception as e:  # a bug in a grant: the slot is free; the next release or arrival retries
            self.recorder.internal_error(
                "grant crashed", consumer=job.consumer, job=job.id, error=describe(e)
            )
            return False

    def end(
        self,
        job: Job,
        outcome: str,
        code: str | None = None,
        status: int | None = None,
        *,
        log_now: bool = True,
    ) -> None:
        """End the job once: its outcome counts now, its metrics, event and log line (unless a hold follows:
        then the line waits for the hold's end, to carry its length) once the GPU changed hands. ``status``:
        the consumer's HTTP status, when not recorded already."""
        assert job.state != "ended", job
        job.state, job.ended = "ended", self.clock()
        job.caller = None  # (nothing of it is cut any more: its task, done, is not kept with it)
        job.outcome, job.code = outcome, code
        if status is not None:
            job.http = status
        self.recorder.job_ended(job, log_now)

    def own(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Work the scheduler owns until it ends or the scheduler closes."""
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def forget(self) -> None:
        """After a reload: jobs waiting for a consumer gone (or on another GPU now) get no_consumer. One whose
        consumer got another URL (a new service) goes to the new one: its target is the config in force
        from now on, unless that no longer serves its kind (no_consumer). The wait queue's empty lanes and
        buckets go, and the GPU time and job count of each client removed (its jobs under way count for
        nobody from then on)."""
        for job in [j for j in self.lock.waiting if not j.granted.done()]:
            fate = reload_fate(job, self.config.consumers.get(job.consumer), self.index)
            if isinstance(fate, BrokerError):
                self.lock.refuse(job, fate)
            else:
                job.target = fate
        # What is kept per client or consumer between jobs goes with the ones the reload removed.
        clients = self.config.auth.clients
        self.lock.forget(clients)
        self.recorder.forget_clients(clients)
        self.lock.dispatch()

    async def close(self) -> None:
        """Cancel the work the scheduler owns (holds, steps whose caller left)."""
        await cancel_until_done(list(self.tasks), f"shutting down: GPU {self.index}'s holds and steps")

    # ---- what comes next: the queue in grant order, with the waits to expect -----------------------

    def forecast(self, until: Job | str | None = None, count: int | None = None) -> list[tuple[Job, float]]:
        """The waiting jobs in the order they are expected to be granted, each with its expected wait
        (``expected_waits``, from a snapshot of now); it stops once ``until`` has its place, or after
        ``count`` jobs."""
        return expected_waits(queue_snapshot(self.lock, self.rooms, self.config), until, count)

    def _play_off_loop(self) -> asyncio.Task[list[tuple[Job, float]]]:
        """``forecast`` in a worker thread, from a snapshot of now, as work this scheduler owns."""
        snap = queue_snapshot(self.lock, self.rooms, self.config)
        return self.own(asyncio.ensure_future(asyncio.to_thread(expected_waits, snap)))

    def eta(self, job: Job | str | None) -> float | None:
        """The expected wait of a waiting ``job`` (None: of the first one to be granted; a client's name: of
        that client's first one)."""
        if job is None:
            return next((eta for _, eta in self.forecast(count=1)), None)
        if isinstance(job, str):
            return next((eta for j, eta in self.forecast(until=job) if j.client == job), None)
        return next((eta for j, eta in self.forecast(until=job) if j is job), None)


def client_use(s: Scheduler, name: str) -> dict[str, Any]:
    """A client's jobs and GPU time on one GPU, for status: waiting, holding slots, ended, held seconds over
    the fair window."""
    lock, now = s.lock, s.clock()
    return {
        "queued": lock.waiting.of_client(name),
        "running": sum(j.client == name and not j.client_removed for j in lock.taken),
        "jobs_total": s.recorder.client_jobs.get(name, 0),
        "gpu_s_window": lock.use.seconds(name, now, s.config.scheduler.fair_window_s),
    }


# ---- internal jobs: idle unloads and preloads -------------------------------------------------------


#: Why a restore may fail and still wait for the next round: the GPU or its queue is not free now, or its
#: reading failed (whether it fits is not known); or the broker goes (the state file keeps it).
RESTORE_LATER = frozenset({"gpu_reserved", "queue_full", "shutting_down", "no_consumer", "gpu_unavailable"})


class InternalJobs:
    """The broker's own jobs on its consumers, on every GPU: idle unloads (a resident consumer unused for its
    ``idle_unload_s``), preloads (a ``preload`` consumer loaded when it fits, never evicting), yields (an
    idle consumer unloaded for a stranger, ``gpu.yield``) and restores (what was unloaded for strangers or
    by a reservation, loaded again when it fits, never evicting). Each is an exclusive job through its GPU's
    lock, of the lowest priority (so a job that arrives goes first, unless it aged past them) but for
    yields, which go first like an admin unload; its step decides again once granted; one is pending per
    (kind, consumer)."""

    def __init__(
        self,
        shared: Shared,
        schedulers: Mapping[int, Scheduler],
        *,
        spawn: Callable[[Awaitable[Any], str], object] | None = None,
    ) -> None:
        self.shared = shared
        #: The GPUs' schedulers (the broker's, which a reload may add to).
        self.schedulers = schedulers
        #: Starts background work its owner (the broker) keeps until it ends or the broker closes.
        self.spawn = spawn or (lambda coro, name: asyncio.ensure_future(coro))
        #: (kind, consumer) of each internal job queued or running: never two of a kind for one consumer.
        self.pending: set[tuple[str, str]] = set()
        #: Per GPU: the consumers unloaded for a stranger, or by a reservation that ended, that wait to be
        #: loaded again (``restore_all``), in the order they were added.
        self.to_restore: dict[int, list[str]] = {}

    @property
    def config(self) -> Config:
        return self.shared.config

    def scheduler_for(self, name: str) -> Scheduler:
        c = self.config.consumers.get(name)
        return self.schedulers[c.gpu if c is not None else self.config.gpu.index]

    def idle_deadline(self, name: str) -> float | None:
        """When a resident consumer with ``idle_unload_s`` becomes due for its idle unload (None: never)."""
        c = self.config.consumers.get(name)
        state = self.scheduler_for(name).states.get(name)
        if (
            c is None
            or state is None
            or not c.idle_unload_s
            or c.unload is None
            or state.resident is not True
        ):
            return None
        since = state.idle_since()
        return None if since is None else since + c.idle_unload_s

    def _busy_with(self, name: str) -> str | None:
        """Why ``name`` is not idle: a job or hold of it holds a lock, or one waits for it."""
        lock = self.scheduler_for(name).lock
        own = 1 if lock.holder == name and lock.exclusive else 0  # the idle unload asking
        if sum(s.lock.jobs_of(name) for s in self.schedulers.values()) > own:  # (a reload may have moved it)
            return "has jobs running"
        if any(j.consumer == name for j in lock.waiting):
            return "a job waits for it"
        return None

    def idle_due(self, name: str) -> bool:
        due = self.idle_deadline(name)
        return due is not None and self.scheduler_for(name).clock() >= due and self._busy_with(name) is None

    async def idle_unload(self, name: str) -> Job | None:
        """Unload a consumer unused for its ``idle_unload_s``: jobs waiting go first (unless it aged past
        them); checked again once granted. None when it is not due (or one is pending)."""
        if not self.idle_due(name):
            return None
        return await self._run("idle_unload", name, self._unload_if_idle)

    async def preload(self, name: str) -> Job | None:
        """Load a consumer if it fits as things are, never evicting. None when one is pending already."""
        return await self._run("preload", name, self._load_if_fits)

    async def yield_unload(self, name: str, tried: Collection[str] = ()) -> Job | None:
        """Unload an idle consumer for a stranger (``plan_yield`` chose it, ``tried`` left out): like an admin
        unload, of the highest priority; once granted it decides again from a fresh reading. None when one
        is pending."""
        step = functools.partial(self._unload_for_stranger, tried=frozenset(tried))
        return await self._run("yield", name, step, priority=PRIORITY_MAX)

    def restore_later(self, index: int, names: Iterable[str]) -> None:
        """Consumers of GPU ``index`` to load again once ``restore_all`` runs (those with a load)."""
        pending = self.to_restore.setdefault(index, [])
        for name in names:
            c = self.config.consumers.get(name)
            if c is not None and c.load is not None and name not in pending:
                pending.append(name)

    def not_to_restore(self, index: int, name: str) -> None:
        """A newer decision unloaded ``name`` on GPU ``index`` (an admin's, or an idle unload after a job
        loaded it again since it yielded): it no longer waits to be restored."""
        pending = self.to_restore.get(index, [])
        if name in pending:
            pending.remove(name)

    async def restore_all(self, index: int, may: Callable[[], bool]) -> None:
        """Load again, one at a time, what waits to be restored on GPU ``index``, while ``may()`` says so: the
        most recently used first, each a ``restore`` job of the lowest priority (a job that arrives goes
        first) that loads it only if it fits (never evicting). One whose restore failed is given up; one
        refused at the queue's door (a reservation, a full queue), or whose GPU could not be read (whether
        it fits is not known), waits for the next round."""
        pending = self.to_restore.setdefault(index, [])
        states = self.schedulers[index].states

        def last_use(name: str) -> float:
            state = states.get(name)
            return state.last_used if state is not None and state.last_used is not None else -math.inf

        while pending and may():
            name = max(pending, key=last_use)
            c = self.config.consumers.get(name)
            if c is None or c.gpu != index or c.load is None:
                pending.remove(name)
                continue
            try:
                job = await self._run("restore", name, functools.partial(self._restore_if_fits, may=may))
            except BrokerError as e:
                if e.code in RESTORE_LATER:
                    # (It stays, for later: the GPU or its queue is not free now, or could not be read; or
                    # the broker goes.)
                    log.info(logfmt(msg="restore put off", consumer=name, code=e.code, error=e.message))
                    return
                log.warning(logfmt(msg="restore failed", consumer=name, code=e.code, error=e.message))
                if name in pending:
                    pending.remove(name)
                continue
            if job is None or name in pending:
                return  # one is pending already, or it waits for later (a stranger came back)

    async def _run(
        self, kind: str, name: str, step: Callable[[Job], Awaitable[None]], *, priority: int = 0
    ) -> Job | None:
        if (kind, name) in self.pending:
            return None
        self.pending.add((kind, name))
        try:
            lease = self.scheduler_for(name).job(name, kind, exclusive=True, priority=priority, step=step)
            async with lease as job:
                return job
        finally:
            self.pending.discard((kind, name))

    async def _unload_if_idle(self, job: Job) -> None:
        name, rooms = job.consumer, self.scheduler_for(job.consumer).rooms
        async with rooms.lock:
            # While it waited, a job may have come, used the consumer or be waiting for it.
            if not self.idle_due(name):
                why = self._busy_with(name) or "no longer idle or resident"
                rooms.recorder.record("idle_unload_skipped", consumer=name, reason=why, job=job.id)
                return
            await rooms.unload(job, name, by="idle")
            self.not_to_restore(rooms.index, name)  # (used since it yielded, then idle: it stays unloaded)

    async def _load_if_fits(self, job: Job) -> None:
        async with self.scheduler_for(job.consumer).rooms.lock:
            await self._fits_then_load(job, "preload")

    async def _fits_then_load(self, job: Job, kind: str) -> bool:
        """Load the job's consumer (under its GPU's room lock) if it is not resident and fits as things are,
        evicting nothing (``{kind}_skipped`` recorded when it does not fit, or, for a restore, when its
        reading shows a stranger: it waits for it to go, fitting beside it or not); whether it was loaded."""
        name, s = job.consumer, self.scheduler_for(job.consumer)
        rooms = s.rooms
        if rooms.states[name].resident is True:
            log.info(logfmt(msg=f"{kind}: already resident", consumer=name, job=job.id))
            return False
        # (A consumer whose memory is elsewhere fits whatever this GPU holds.)
        if job.target.vram_resident_mib:
            plan = plan_room(rooms.snapshot(job, await rooms.read(job), {}))
            if kind == "restore" and s.strangers.present:  # (come after the last poll: its reading tells)
                rooms.recorder.record(
                    "restore_skipped", consumer=name, job=job.id, reason="a stranger is present"
                )
                return False
            if not plan.fits:
                rooms.recorder.record(
                    f"{kind}_skipped",
                    consumer=name,
                    job=job.id,
                    free_mib=plan.free_mib,
                    need_mib=plan.need_mib,
                )
                return False
        await rooms.load(job)
        return True

    async def _unload_for_stranger(self, job: Job, *, tried: frozenset[str]) -> None:
        """A yield's step, once granted: with a fresh reading, unload the consumer if a stranger is still
        present, free memory is still below keep_free_mib and ``plan_yield`` still picks it first (``tried``
        left out); then it waits to be restored (if it was resident and has a load). unload_failed when its
        memory did not come free."""
        name, s = job.consumer, self.scheduler_for(job.consumer)
        rooms = s.rooms
        async with rooms.lock:
            reading = await rooms.read(job, whole=True)  # (the strangers' record is told of it)
            y = self.config.gpu.yield_
            why = None
            if y is None:
                why = "gpu.yield is off"
            elif not s.strangers.present:
                why = "no stranger any more"
            elif reading.free_mib is None:
                why = "the GPU reports no free memory figure"
            else:
                # (This yield holds the lock alone, in the consumer's name: its slot is no job of it.)
                views = {n: replace(v, jobs=0) if n == name else v for n, v in rooms.views().items()}
                victims = plan_yield(
                    views,
                    reading.free_mib,
                    reading.used_mib,
                    y.keep_free_mib,
                    tried,
                    s.lock.waiting.awaited(),
                )
                if not victims:
                    why = f"{reading.free_mib} MiB free"
                elif victims[0] != name:
                    why = f"{victims[0]} goes first"
            if why is not None or y is None:
                rooms.recorder.record("yield_skipped", consumer=name, job=job.id, reason=why)
                return
            resident = rooms.states[name].resident is True
            # It waits to be restored once its unload answered: a shutdown that cuts the wait for its
            # memory leaves it in the state file, for the restarted broker to load again.
            later = functools.partial(self.restore_later, s.index, [name] if resident else [])
            freed = await rooms.yield_to(job, name, reading, y.keep_free_mib, later)
            if not freed:  # (not asked again while this stranger stays: its unload frees nothing)
                waited = self.config.scheduler.vram_wait_s
                raise BrokerError(
                    "unload_failed", f"{name}'s memory did not come free within {waited:g} s", name
                )

    async def _restore_if_fits(self, job: Job, *, may: Callable[[], bool]) -> None:
        """A restore's step, once granted: a stranger present, or one gone less than restore_after_s ago
        (``may``, asked again: a stranger may have come and gone while it waited), keeps it for later; else
        it is loaded if it is not resident and fits (``restored``), and then no longer waits: neither when
        it did not fit, nor when its load failed, unless a reading found a stranger back, its own before the
        load or one taken when the load failed (then it waits for that one to go, as if the poll had seen
        it: a game that came back during the load is what made it fail). A load cut by the broker's shutdown
        leaves it waiting (the state file keeps it for the restarted broker)."""
        name, s = job.consumer, self.scheduler_for(job.consumer)
        async with s.rooms.lock:
            if s.strangers.present or not may():
                why = (
                    "a stranger is present"
                    if s.strangers.present
                    else "a stranger left within restore_after_s"
                )
                s.recorder.record("restore_skipped", consumer=name, job=job.id, reason=why)
                return
            pending = self.to_restore.get(s.index, [])
            if name not in pending:  # (unloaded since, by an admin or as idle: the newer decision stands)
                why = "it no longer waits to be restored"
                s.recorder.record("restore_skipped", consumer=name, job=job.id, reason=why)
                return
            try:
                loaded = await self._fits_then_load(job, "restore")
            except Exception as e:
                later = isinstance(e, BrokerError) and e.code in RESTORE_LATER  # (a reading that failed)
                if isinstance(e, BrokerError) and not later:
                    with contextlib.suppress(BrokerError):  # (the strangers' record is told of it)
                        await s.rooms.read(job, whole=True)
                    if s.strangers.present:
                        why = f"its load failed beside a stranger that came back: {e.message}"
                        s.recorder.record("restore_skipped", consumer=name, job=job.id, reason=why)
                        return
                if name in pending and not later:  # (failed: given up)
                    pending.remove(name)
                raise
            if loaded:
                s.recorder.record("restored", consumer=name, job=job.id)
            if (loaded or not s.strangers.present) and name in pending:
                pending.remove(name)

    def start_preloads(self, index: int | None = None, *, but: Collection[str] = ()) -> None:
        """Preload (in the background) every ``preload`` consumer (of GPU ``index``, else of every GPU; but
        those named in ``but``) that is not known to be resident. A reserved GPU's wait for its reservation's
        end, which starts them."""
        for name, c in self.config.consumers.items():
            s = self.scheduler_for(name)
            if (
                c.preload
                and index in (None, c.gpu)
                and name not in but
                and s.reservation is None
                and s.states[name].resident is not True
            ):
                self.spawn(self._logged("preload", name), f"preload {name}")

    async def _logged(self, kind: str, name: str) -> None:
        """An idle unload or a preload in the background: its failure (recorded by the scheduler) is logged
        once more with what it was."""
        try:
            await (self.preload(name) if kind == "preload" else self.idle_unload(name))
        except BrokerError as e:
            log.warning(logfmt(msg=f"{kind} failed", consumer=name, code=e.code, error=e.message))
        except Exception as e:  # a bug outside the scheduler's guarded steps
            self.shared.internal_error(f"{kind} crashed", consumer=name, error=describe(e))

    async def run_idle_unloads(self) -> None:
        """Unload consumers resident and unused for their ``idle_unload_s``; owned by the broker.

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
                self.shared.internal_error("idle unload round crashed", error=describe(e))
            await asyncio.sleep(max(0.01, wake - time.monotonic()))

    def _ask_for_idle_unloads(self, now: float) -> float:
        """Queue an idle unload for every consumer that is due; the earliest deadline still to come."""
        wake = math.inf
        for name in self.config.consumers:
            due = self.idle_deadline(name)
            if due is None:
                continue
            if self.scheduler_for(name).reservation is not None:  # (asked once the reservation ended)
                continue
            if due <= now and self.idle_due(name):
                # One idle unload per consumer is kept pending; a second ask returns at once.
                self.spawn(self._logged("idle_unload", name), f"idle unload {name}")
            elif due > now:
                wake = min(wake, due)
        return wake


# ---- yielding: the GPU given to strangers, and taken back ---------------------------------------------


class Yielding:
    """The GPUs yield to strangers (gpu.yield) and take back afterwards. Every ``poll_s`` each GPU's latest
    reading is looked at, read anew only when it is older than poll_s (one /v1/status took serves); while a
    stranger is present (``Strangers``), the jobs waiting that could not fit beside it are answered
    gpu_in_use, and while free memory is below ``keep_free_mib`` the idle consumers ``plan_yield`` picks are
    unloaded one by one (``InternalJobs``' yields, each decided again from a fresh reading). Once no stranger
    has been present for ``restore_after_s`` (at once without gpu.yield), and the GPU is not reserved, what
    waits to be restored (unloaded for strangers, or by a reservation that ended) is loaded again
    (``InternalJobs.restore_all``). This class decides when; InternalJobs does the work."""

    def __init__(
        self,
        shared: Shared,
        schedulers: Mapping[int, Scheduler],
        readers: Mapping[int, Any],
        internal: InternalJobs,
        *,
        spawn: Callable[[Awaitable[Any], str], asyncio.Task[Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = shared
        self.schedulers = schedulers
        self.readers = readers
        self.internal = internal
        self.spawn = spawn
        self.clock = clock
        #: Set to run a round now (a yield or a restore ended, a reservation ended).
        self.wake = asyncio.Event()
        #: Per GPU: the yield under way, the restores under way, and the consumers whose yield failed while
        #: the stranger present now stays (not asked again until it goes).
        self._yielding: dict[int, asyncio.Task[Any]] = {}
        self._restoring: dict[int, asyncio.Task[Any]] = {}
        self._failed: dict[int, set[str]] = {}

    @property
    def config(self) -> Config:
        return self.shared.config

    async def run(self) -> None:
        """A round of each GPU every gpu.yield.poll_s (IDLE_CHECK_S without gpu.yield), or at once when
        woken; owned by the broker. Each GPU's round is a task of its own, waited for at most one poll: a
        GPU whose reading hangs (up to query_timeout_s: one fallen off the bus) holds up no other's rounds,
        and gets its next round once its last has ended. Each round's bug is counted."""
        rounds: dict[int, asyncio.Task[None]] = {}

        def ended() -> None:
            for index, task in list(rounds.items()):
                if task.done():
                    del rounds[index]
                    if not task.cancelled() and task.exception() is not None:
                        self.shared.internal_error("yield round crashed", task.exception(), gpu=index)

        try:
            while True:
                self.wake.clear()
                ended()
                y = self.config.gpu.yield_
                poll = y.poll_s if y is not None else IDLE_CHECK_S
                started = []
                for index in sorted(self.schedulers):
                    if index not in rounds:
                        rounds[index] = asyncio.ensure_future(self.round(index))
                        started.append(rounds[index])
                if started:
                    await asyncio.wait(started, timeout=poll)
                ended()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), poll)
        finally:
            await cancel_until_done(list(rounds.values()), "shutting down: yield rounds")

    async def round(self, index: int) -> None:
        """One GPU: read it (unless a reading started less than poll_s ago), refuse what cannot fit beside a
        stranger, ask for a yield, start restores when due."""
        y = self.config.gpu.yield_
        s = self.schedulers[index]
        if y is None:
            s.strangers.yield_off()  # (a reload turned it off: no stranger keeps restores waiting)
        else:
            try:
                reading = await self.readers[index].read(max_age=y.poll_s)  # (its listeners tell Strangers)
            except GpuError:
                reading = None  # (shown in /v1/status; the last presence stands until a reading succeeds)
            if not s.strangers.present:
                self._failed.pop(index, None)
            elif reading is not None and s.reservation is None:
                self.refuse_beside_strangers(s)
                self._yield(index, reading, y)
        self._restore(index)

    @staticmethod
    def refuse_beside_strangers(s: Scheduler) -> int:
        """Answer gpu_in_use, at once, the jobs waiting on ``s``'s GPU that could not fit beside a stranger
        present now (``Strangers.refuses``): none waits for a stranger to leave. How many."""
        refusals: dict[str, BrokerError | None] = {}
        refused = 0
        for job in [j for j in s.lock.waiting if not j.granted.done() and not j.exclusive]:
            if job.consumer not in refusals:
                refusals[job.consumer] = s.strangers.refuses(job.target, s.gpu.last_reading())
            error = refusals[job.consumer]
            if error is not None:
                s.lock.refuse(job, error)  # (it ends failed, gpu_in_use: counted and logged)
                refused += 1
        if refused:
            s.lock.dispatch()
        return refused

    def _yield(self, index: int, reading: GpuReading, y: YieldConfig) -> None:
        """Ask for the first victim's yield, unless one is under way on this GPU."""
        if reading.free_mib is None or not self._done(self._yielding.get(index)):
            return
        tried = self._failed.setdefault(index, set())
        s = self.schedulers[index]
        awaited = s.lock.waiting.awaited()
        victims = plan_yield(
            s.rooms.views(), reading.free_mib, reading.used_mib, y.keep_free_mib, tried, awaited
        )
        if victims:
            self._yielding[index] = self.spawn(self._yield_one(index, victims[0]), f"yield {victims[0]}")

    async def _yield_one(self, index: int, name: str) -> None:
        try:
            await self.internal.yield_unload(name, self._failed.get(index, set()))
        except BrokerError as e:
            # Not asked again while this stranger stays: one whose unload failed or freed nothing (or hit a
            # bug); one whose yield was only refused (gpu_reserved, shutting_down, no_consumer: the GPU or the
            # consumer was not there to unload) is asked again when the next round finds it needed.
            if e.code in ("unload_failed", "scheduler_error"):
                self._failed.setdefault(index, set()).add(name)
            log.warning(logfmt(msg="yield failed", consumer=name, code=e.code, error=e.message))
        except Exception as e:  # a bug outside the scheduler's guarded steps
            self._failed.setdefault(index, set()).add(name)
            self.shared.internal_error("yield crashed", consumer=name, error=describe(e))
        finally:
            self.wake.set()  # the next decision at once, from the readings the yield took

    def _restore(self, index: int) -> None:
        """Start the restores on this GPU when they are due, unless they run already."""
        if (
            self.internal.to_restore.get(index)
            and self._done(self._restoring.get(index))
            and self._may(index)
        ):
            task = self.spawn(self._restore_all(index), f"restores on GPU {index}")
            self._restoring[index] = task

    def _may(self, index: int) -> bool:
        """Whether what waits to be restored on this GPU may be loaded now: it is not reserved, and no
        stranger has been present for restore_after_s (with gpu.yield)."""
        s = self.schedulers[index]
        if s.reservation is not None:
            return False
        y = self.config.gpu.yield_
        if y is None:
            return True
        st = s.strangers
        return (
            not st.present
            and st.absent_since is not None
            and self.clock() - st.absent_since >= y.restore_after_s
        )

    async def _restore_all(self, index: int) -> None:
        try:
            await self.internal.restore_all(index, lambda: self._may(index))
        except Exception as e:  # a bug outside the scheduler's guarded steps
            self.shared.internal_error("restores crashed", gpu=index, error=describe(e))

    def reservation_ended(self, index: int, res: Reservation) -> None:
        """A reservation's end (but at shutdown): what it unloaded waits to be restored (``restore``), and the
        GPU's ``preload`` consumers get the preloads its reservation kept from them (but, without
        ``restore``, those it unloaded: its end leaves them unloaded, and those it found resident no longer
        wait for an older yield's restore either: its unload is the newer decision)."""
        if res.restore:
            self.internal.restore_later(index, res.to_restore)
            self.wake.set()
        else:
            for name in res.to_restore:
                self.internal.not_to_restore(index, name)
        self.internal.start_preloads(index, but=() if res.restore else res.unloaded)

    @staticmethod
    def _done(task: asyncio.Task[Any] | None) -> bool:
        return task is None or task.done()


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
    """``headers`` without those in ``drop`` (lower case; hop-by-hop ones among them) and those that
    ``Connection`` names."""
    if "Connection" in headers:
        values = headers.getall("Connection")  # type: ignore[attr-defined]
        drop = drop | {token.strip().lower() for value in values for token in value.split(",")}
    return CIMultiDict([(key, value) for key, value in headers.items() if key.lower() not in drop])


#: What the consumer never gets of the client's headers: hop-by-hop ones, Host, Content-Length and Expect
#: (the broker holds the whole body already), and what a proxy sets itself; with tokens, the bearer token.
_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "content-length",
    "expect",
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
}
_NOT_FORWARDED_WITH_AUTH = _NOT_FORWARDED | {"authorization"}


def request_headers(
    request: web.Request, *, strip_auth: bool, consumer: ConsumerConfig | None = None
) -> CIMultiDict[str]:
    """The client's headers as the consumer gets them.

    Without hop-by-hop ones, Host, Content-Length and Expect (the broker holds the whole body already),
    nor the broker's own bearer token; with X-Forwarded-For (appended to) and X-Forwarded-Proto. A page of
    the broker's own origin is presented to ``consumer`` as one of the consumer's (see consumer_origin).
    """
    headers = _pass_headers(request.headers, _NOT_FORWARDED_WITH_AUTH if strip_auth else _NOT_FORWARDED)
    if consumer is not None and (origin := consumer_origin(request, consumer)) is not None:
        headers["Origin"] = origin
    headers.popall("X-Forwarded-For", None)
    before = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    remote = request.remote or "unknown"
    headers["X-Forwarded-For"] = f"{before}, {remote}" if before else remote
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Request-ID"] = request[REQUEST_ID]
    return headers


def consumer_origin(request: web.Request, consumer: ConsumerConfig) -> str | None:
    """The consumer's own origin (its URL's scheme://host:port) when the request comes from a page of the
    broker's origin (its Origin names the host and port the browser asked, its Host) and that Host is one
    of the broker's own names (``own_host``), else None.

    A consumer's same-origin check (ComfyUI compares Origin with the Host it gets, the consumer URL's) then
    passes for pages the broker served, through a mount or a consumer's port, as a reverse proxy that
    forwards Host would make it; a page of any other origin keeps its Origin and meets the check unchanged.
    So does a page of a name that was made to point at the broker (DNS rebinding: its Origin always equals
    its Host, evil.example's).
    """
    origin, host = request.headers.get("Origin"), request.headers.get("Host")
    if not origin or not host or not same_origin(origin, host) or not own_host(request, host):
        return None
    url = urlsplit(consumer.url)
    return f"{url.scheme}://{url.netloc.rpartition('@')[2]}"


def same_origin(origin: str, host: str) -> bool:
    """Whether a page's Origin names the host and port its request asked for (its Host)."""
    try:
        return urlsplit(origin).netloc.lower() == host.lower()
    except ValueError:  # "http://[": no origin the broker served
        return False


def own_host(request: web.Request, host: str) -> bool:
    """Whether a request's Host names the broker itself: a loopback address, localhost or 0.0.0.0/[::]
    (which connect to loopback), the address the client connected to, a listen address, the machine's host
    name or FQDN, or one of ``http.hosts``."""
    try:
        name = host_key(urlsplit("//" + host).hostname or "")
    except ValueError:
        return False
    if not name:
        return False
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        if is_localhost(name):
            return True
    else:
        if address.is_loopback or address.is_unspecified:  # (0.0.0.0 and [::] connect to loopback)
            return True
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if isinstance(sockname, tuple) and host_key(str(sockname[0]).partition("%")[0]) == name:
            return True
    cfg = request.app[BROKER].config
    listens = [cfg.listen_host] + [c.listen[0] for c in cfg.consumers.values() if c.listen]
    return name in machine_names() or name in {host_key(h) for h in (*listens, *cfg.http.hosts)}


#: What no header may hold, aiohttp's writer refusing it (RFC 9110, section 5.5): control characters but tab.
_UNSENDABLE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def response_headers(upstream: aiohttp.ClientResponse, consumer: str) -> CIMultiDict[str]:
    """The consumer's headers as the client gets them: without hop-by-hop ones, and without one that holds a
    control character (aiohttp would refuse to write the answer's head, and the client get nothing: it
    gets the answer, and the log names what was left out)."""
    headers = _pass_headers(upstream.headers, HOP_BY_HOP)
    bad = [k for k, v in headers.items() if _UNSENDABLE_RE.search(k) or _UNSENDABLE_RE.search(v)]
    if bad:
        log.warning(logfmt(msg="consumer header left out: a control character", consumer=consumer, names=bad))
        headers = CIMultiDict((k, v) for k, v in headers.items() if k not in bad)
    return headers


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
        )
    except aiohttp.ConnectionTimeoutError as e:  # before the answer began: unreachable, not slow
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


class UpstreamBroke(BrokerError):
    """The consumer failed after its answer began (consumer_unreachable, consumer_timeout); the client's
    connection has been cut, so no error can be answered any more."""


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
    headers = response_headers(upstream, consumer.name)
    reason = upstream.reason if not _UNSENDABLE_RE.search(upstream.reason or "") else None  # (the usual one)
    if upstream.content.is_eof() and upstream.content_length is not None and request.method != "HEAD":
        # The whole answer came with its headers (a small one): headers and body go out in one write. Only
        # one framed by its length: a chunked one (a stream that ended before it was read) stays chunked.
        body = await upstream.content.read()
        if capture is not None:
            keep_head(capture, body)
        if answered is not None:
            await _hand_over(answered)
        whole = web.Response(status=upstream.status, reason=reason, headers=headers, body=body)
        await whole.prepare(request)
        await _send(request, whole.write_eof, _head_size(headers) + len(body), consumer)
        return whole
    resp = web.StreamResponse(status=upstream.status, reason=reason, headers=headers)
    await resp.prepare(request)
    transport = request.transport
    head = _head_size(headers)  # (aiohttp sends the head with the first chunk)
    while True:
        try:
            chunk = await upstream.content.readany()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            if transport is not None:
                transport.abort()
            code = "consumer_timeout" if isinstance(e, asyncio.TimeoutError) else "consumer_unreachable"
            raise UpstreamBroke(
                code, f"upstream {consumer.name} failed mid-answer: {describe(e)}", consumer.name
            ) from e
        if capture is not None:
            keep_head(capture, chunk)
        whole = not chunk or upstream.content.at_eof()
        if whole and answered is not None:
            await _hand_over(answered)
        if not chunk:
            break
        await _send(
            request, functools.partial(resp.write, chunk), head + len(chunk) + CHUNK_FRAMING, consumer
        )
        head = 0
        if whole:
            break
    await _send(request, resp.write_eof, head + CHUNK_FRAMING, consumer)
    return resp


#: What aiohttp adds to an answer's head beyond the consumer's headers (its status line, Date, Server,
#: Content-Length or Transfer-Encoding, the X-Request-ID), at most; and to each chunk (its size line).
HEAD_EXTRA = 512
CHUNK_FRAMING = 16


def _head_size(headers: Mapping[str, str]) -> int:
    """At most what an answer's head with ``headers`` takes on the wire."""
    return HEAD_EXTRA + sum(len(k) + len(v) + 4 for k, v in headers.items())


async def _send(
    request: web.Request, write: Callable[[], Awaitable[None]], size: int, consumer: ConsumerConfig
) -> None:
    """``write()`` to the client, ``size`` bytes at most on the wire: at once when they keep the transport
    under its high-water mark (the write cannot stall then), else bounded as ``_to_client`` bounds it.
    (The write is made only here: whatever this raises first, no coroutine is left unawaited.)"""
    transport = request.transport
    try:
        if transport is not None and _fits_unpaused(transport, size):
            await write()
        else:
            await _to_client(request, write(), consumer)
    except ConnectionResetError:
        raise
    except ConnectionError as e:  # (aiohttp's "Connection lost": the client reset it while a write waited)
        raise ConnectionResetError(f"the client left: {describe(e)}") from e


def _fits_unpaused(transport: asyncio.BaseTransport, size: int) -> bool:
    """Whether ``size`` more bytes keep the transport's buffer under its high-water mark: then aiohttp's
    write cannot wait for the client (it waits only while the transport is paused). A large chunk on an
    empty buffer can still fill the client's socket and pause it."""
    # (uvloop's transports are not asyncio.WriteTransport instances, but have the same methods.)
    high = transport.get_write_buffer_limits()[1]  # type: ignore[attr-defined]
    return transport.get_write_buffer_size() + size <= high  # type: ignore[attr-defined]


#: What a client must take of an answer in each of its consumer's ``timeout_s`` (all that waits, if less):
#: one that trickles a window's worth a minute would hold the GPU for days with a large answer.
CLIENT_MIN_TAKEN = 64 * 1024


async def _to_client(request: web.Request, write: Awaitable[None], consumer: ConsumerConfig) -> None:
    """A write to a client that may stall: a client that takes less than CLIENT_MIN_TAKEN of what waits for
    it (or all of it, if less waits) in the consumer's ``timeout_s`` is cut off (ConnectionResetError): it
    holds the GPU while it reads. One that reads steadily is not, however large the write."""
    transport = request.transport

    def waiting() -> int:
        """What the client has yet to take: the transport's buffer, and what the kernel holds unsent (the
        transport's buffer alone moves only when the kernel has room for a third of its own, seconds apart
        for a slow reader)."""
        if transport is None:
            return 0
        held = transport.get_write_buffer_size()  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                held += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        return held

    task = asyncio.ensure_future(write)
    # (A client that resets as its handler is cancelled ends the write with "Connection lost".)
    task.add_done_callback(error_read)
    try:
        await asyncio.sleep(0)  # (the write puts its bytes in the buffer, then waits for the client)
        before = waiting()
        while True:
            done, _ = await asyncio.wait((task,), timeout=consumer.timeout_s)
            if done:
                return task.result()
            left = waiting()
            if before - left < min(before, CLIENT_MIN_TAKEN):  # it took (next to) nothing for timeout_s
                break
            before = left
    finally:
        if not task.done():
            task.cancel()
    if transport is not None:
        transport.abort()
    log.warning(logfmt(msg="client stopped reading", consumer=consumer.name, timeout_s=consumer.timeout_s))
    raise ConnectionResetError("client stopped reading")


async def _hand_over(answered: Callable[[], bool]) -> None:
    """The consumer's answer is whole: end the job; if that granted a waiting job, let it go first.

    Two turns of the loop: it wakes in the first and its request goes out in the second (aiohttp sends it
    from a task of its own), before this client gets its last bytes. Nobody waiting: no detour.
    """
    if answered():
        await asyncio.sleep(0)
        await asyncio.sleep(0)


def keep_head(capture: bytearray, chunk: bytes | bytearray) -> None:
    """Add ``chunk`` to the capture of a hold's answer, which keeps its first HOLD_ANSWER_LIMIT + 1 bytes
    and no more: one that long is over the limit (it starts no hold). Always the answer's head: a chunk
    with no room is cut, never skipped for a later one (which could leave well-formed JSON with a hole)."""
    if len(capture) <= HOLD_ANSWER_LIMIT:
        capture += chunk[: HOLD_ANSWER_LIMIT + 1 - len(capture)]


def hold_poller(
    session: aiohttp.ClientSession, consumer: ConsumerConfig, hold: Hold, answer: bytes, recorder: Recorder
) -> Callable[[], Awaitable[None]] | None:
    """A coroutine function that returns once ``hold.path`` answers a non-empty JSON object or list (or a
    2xx answer over HOLD_ANSWER_LIMIT, read no further), and raises ConsumerGone once the consumer refuses
    (or resets) the poll: the work died with it.

    None (logged) when the consumer's answer cannot fill the path's placeholders (of one over
    HOLD_ANSWER_LIMIT, the fields whole in its head: ComfyUI names its prompt first, and what follows,
    ``node_errors``, echoes what the client sent).
    """
    names = PLACEHOLDER.findall(hold.path)
    if names and len(answer) > HOLD_ANSWER_LIMIT:  # (its head only was kept)
        data: Any = head_fields(answer)
        if any(n not in data for n in names):
            log.warning(logfmt(msg="no hold: answer over HOLD_ANSWER_LIMIT", consumer=consumer.name))
            return None
    else:
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
    url = hold_url(consumer, hold, {name: str(data[name]) for name in names})  # type: ignore[index]

    async def poll() -> None:
        errors = 0
        while True:
            try:
                if await hold_done(session, consumer, hold, url):
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                if (gone := gone_reason(e, refused_only=True)) is not None:
                    raise ConsumerGone(f"hold poll: {gone}") from e
                # The first failure of a hold is worth a warning; a slow consumer may fail many more.
                level = logging.WARNING if errors == 0 else logging.DEBUG
                errors += 1
                recorder.record("hold_poll_failed", level, consumer=consumer.name, error=describe(e))
            await asyncio.sleep(hold.poll_s)

    return poll


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def head_fields(head: bytes) -> dict[str, Any]:
    """The top-level fields of a JSON object that come whole in ``head``, the start of a longer answer (a
    value is whole once the comma after it came)."""
    text, decode = head.decode("utf-8", "ignore"), json.JSONDecoder().raw_decode
    fields: dict[str, Any] = {}
    i = _JSON_SPACE.match(text).end()  # type: ignore[union-attr]
    if not text.startswith("{", i):
        return fields
    try:
        while True:
            key, i = decode(text, _JSON_SPACE.match(text, i + 1).end())  # type: ignore[union-attr]
            i = _JSON_SPACE.match(text, i).end()  # type: ignore[union-attr]
            if not isinstance(key, str) or not text.startswith(":", i):
                return fields
            value, i = decode(text, _JSON_SPACE.match(text, i + 1).end())  # type: ignore[union-attr]
            i = _JSON_SPACE.match(text, i).end()  # type: ignore[union-attr]
            if not text.startswith(",", i):  # (the last, or one cut at the head's end: not known whole)
                return fields
            fields[key] = value
    except (ValueError, RecursionError):
        return fields


def hold_url(consumer: ConsumerConfig, hold: Hold, fill: Mapping[str, str]) -> URL:
    """The URL a hold polls: its path with each placeholder filled (percent-encoded whole; a lone surrogate
    as Python's UTF-8 writes it, so that no id stops the poll)."""
    path = PLACEHOLDER.sub(lambda m: quote(fill[m.group(1)], safe="", errors="surrogatepass"), hold.path)
    return URL(consumer.url + path, encoded=True)


async def hold_done(session: aiohttp.ClientSession, consumer: ConsumerConfig, hold: Hold, url: URL) -> bool:
    """One poll of a hold: whether ``url`` answers 2xx with a non-empty JSON object or list (or more than
    HOLD_ANSWER_LIMIT, read no further: so long an answer is no empty one, and a finished ComfyUI workflow
    can be long). A failure to ask raises (aiohttp.ClientError, asyncio.TimeoutError)."""
    timeout = aiohttp.ClientTimeout(total=min(consumer.timeout_s, hold.timeout_s))
    async with session.request(hold.method, url, timeout=timeout, allow_redirects=False) as resp:
        body = bytearray()  # at most HOLD_ANSWER_LIMIT + 1: a consumer may send for ever
        while len(body) <= HOLD_ANSWER_LIMIT and (
            chunk := await resp.content.read(HOLD_ANSWER_LIMIT + 1 - len(body))
        ):
            body += chunk
        if not 200 <= resp.status < 300:
            return False
        if len(body) > HOLD_ANSWER_LIMIT:
            return True
        result = parse_json(body)
        return isinstance(result, (dict, list)) and bool(result)


#: The longest value a client may choose for a hold's placeholder (ComfyUI makes its prompt ids 36 long).
HOLD_ID_MAX = 256


async def check_chosen_ids(
    session: aiohttp.ClientSession,
    consumer: ConsumerConfig,
    hold: Hold,
    request: web.Request,
    body: bytes | bytearray,
) -> None:
    """A consumer may take the client's own id for the work (ComfyUI takes a ``prompt_id`` from the body)
    and echo it, and the hold polls what it echoes. So an id the client chose (a top-level field of its JSON
    body named like a placeholder of the hold's path, read as the consumer reads it: in the charset its
    Content-Type names, else UTF-8) is refused (bad_request) when it is longer than HOLD_ID_MAX (the echo
    could pass HOLD_ANSWER_LIMIT: no hold) or names work the consumer has finished already (asked once, now
    that the job holds the GPU): either way the hold would end at once and the GPU go on while the work
    runs. A compressed body, which the broker cannot read so, is refused where the path has placeholders."""
    names = PLACEHOLDER.findall(hold.path)
    if not names or not body:
        return
    encodings = request.headers.getall("Content-Encoding", ())  # (aiohttp decompresses by the last)
    if any(value.strip().lower() != "identity" for value in encodings):
        raise BrokerError(
            "bad_request",
            f"a compressed body (Content-Encoding) to {request.path} is refused: the broker reads its ids",
            consumer.name,
        )
    try:
        data = json.loads(body.decode(request.charset or "utf-8"))
    except (LookupError, ValueError, RecursionError):  # (nor can the consumer read it: nothing is chosen)
        return
    if not isinstance(data, dict) or not (chosen := {n: str(data[n]) for n in names if n in data}):
        return
    for name, value in chosen.items():
        if len(value) > HOLD_ID_MAX:
            raise BrokerError("bad_request", f"{name} is longer than {HOLD_ID_MAX} characters", consumer.name)
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise BrokerError("bad_request", f"{name} holds a lone surrogate", consumer.name)
    if chosen.keys() != set(names):  # (the others come from the answer: nothing to ask before it)
        return
    url = hold_url(consumer, hold, chosen)
    try:
        done = await hold_done(session, consumer, hold, url)
    except asyncio.TimeoutError:
        raise BrokerError(
            "consumer_timeout", f"upstream {consumer.name} did not answer {url.path} in time", consumer.name
        ) from None
    except aiohttp.ClientError as e:
        raise BrokerError(failure_code(e), f"upstream {consumer.name} {describe(e)}", consumer.name) from e
    if done:
        what = ", ".join(f"{name} {value!r}" for name, value in chosen.items())
        raise BrokerError(
            "bad_request",
            f"{what} names work {consumer.name} has finished already ({hold.method} {url.path} answers it):"
            " its hold would end at once, the GPU given up while the work runs; send a new one, or none",
            consumer.name,
        )


def hold_after_rest(
    session: aiohttp.ClientSession,
    consumer: ConsumerConfig,
    hold: Hold,
    upstream: aiohttp.ClientResponse,
    captured: bytearray,
    recorder: Recorder,
) -> Callable[[], Awaitable[None]]:
    """The hold after a 2xx answer whose client left before it ended: it reads the rest of the answer itself
    (for the hold's placeholders), gives the connection back, then polls as ``hold_poller``. NoHold where
    the answer breaks off or names nothing to poll."""

    async def read_rest_then_poll() -> None:
        try:
            while chunk := await upstream.content.readany():
                keep_head(captured, chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise NoHold(f"its answer broke off: {describe(e)}") from e
        finally:
            close_upstream(upstream)
        poll = hold_poller(session, consumer, hold, bytes(captured), recorder)
        if poll is None:
            raise NoHold("its answer names no work to wait for")
        await poll()

    return read_rest_then_poll


def hold_after_answer(
    session: aiohttp.ClientSession,
    consumer: ConsumerConfig,
    hold: Hold,
    opening: asyncio.Future[aiohttp.ClientResponse],
    recorder: Recorder,
) -> Callable[[], Awaitable[None]]:
    """The hold of a job on a hold path whose client left before the answer began: the consumer may have
    taken the work all the same (ComfyUI queues a prompt whatever becomes of its client, and renders it), so
    the GPU stays held while the answer comes (``opening``, within the consumer's timeout_s) and, a 2xx
    one, as ``hold_after_rest``. Another answer, or none, holds nothing more (NoHold)."""

    async def answer_then_hold() -> None:
        try:
            upstream = await opening  # (the hold cut, by its timeout or the shutdown: the request with it)
        except BrokerError as e:
            raise NoHold(f"no answer: {e.message}") from e
        if not 200 <= upstream.status < 300:
            close_upstream(upstream)
            raise NoHold(f"its answer was {upstream.status}, not 2xx")
        await hold_after_rest(session, consumer, hold, upstream, bytearray(), recorder)()

    return answer_then_hold


def close_upstream(upstream: aiohttp.ClientResponse) -> None:
    """Give the upstream connection back to the pool when its answer was read whole, else drop it."""
    if upstream.content.at_eof():
        upstream.release()
    else:
        upstream.close()


async def open_answer(
    broker: Broker,
    consumer: ConsumerConfig,
    method: str,
    path_qs: str,
    headers: Mapping[str, str],
    body: bytes | bytearray | None,
) -> aiohttp.ClientResponse:
    """``open_upstream``, and a consumer that could not be reached or sent nothing in time is marked
    unhealthy (``found_failing``)."""
    try:
        return await open_upstream(broker.session, consumer, method, path_qs, headers, body)
    except BrokerError as e:
        found_failing(broker, consumer, e)
        raise


def found_failing(broker: Broker, consumer: ConsumerConfig, error: BrokerError) -> None:
    """A call for a job, or an unscheduled one, that could not reach the consumer or got nothing in time:
    the consumer is marked unhealthy, so that the next job is refused at the door, not made room for."""
    if error.code in ("consumer_unreachable", "consumer_timeout"):
        cause = error.__cause__
        reason = describe(cause) if cause else f"no answer within {consumer.timeout_s:g} s"
        broker.consumers.job_failed(consumer.name, cause, reason, called=consumer)


def _broke(broker: Broker, consumer: ConsumerConfig, error: UpstreamBroke) -> None:
    """The consumer failed mid-answer: marked unhealthy, logged."""
    reason = f"{describe(error.__cause__)} mid-answer"
    broker.consumers.job_failed(consumer.name, error.__cause__, reason, called=consumer)
    log.warning(logfmt(msg="answer cut short", consumer=consumer.name, error=error.message))


async def forward(
    request: web.Request,
    broker: Broker,
    consumer: ConsumerConfig,
    method: str,
    path_qs: str,
    body: bytes | bytearray | None,
) -> web.StreamResponse:
    """An unscheduled call (a mount's read, /audio/): sent to the consumer now, its answer streamed back.
    A failure raises: a BrokerError before the answer began, UpstreamBroke or ConnectionResetError (the
    client left) after."""
    headers = request_headers(request, strip_auth=broker.config.auth.required, consumer=consumer)
    upstream = await open_answer(broker, consumer, method, path_qs, headers, body)
    try:
        return await relay(request, upstream, consumer)
    except UpstreamBroke as e:
        _broke(broker, consumer, e)
        raise
    finally:
        close_upstream(upstream)


async def forward_job(
    request: web.Request,
    broker: Broker,
    job: Job,
    path: JobPath,
    body: bytes | bytearray,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    """A granted job's request, sent to its consumer (at ``path``, with the query as the client encoded it),
    its answer streamed back. The job ends (``job.release``) the moment the answer has been read whole,
    with the hold its path names after a 2xx answer, so the GPU goes on before the client has the last
    bytes; a client that left before then leaves the hold to read the rest. Any other end is its lease's."""
    consumer = job.target
    query = request.raw_path.partition("?")[2]  # kept as the client encoded it, after the entry's own
    target = path.path + (("&" if "?" in path.path else "?") + query if query else "")
    assert job.scheduler is not None
    recorder = job.scheduler.recorder
    if path.hold_until is None:
        upstream = await open_answer(broker, consumer, path.method, target, headers, body)
    else:
        try:
            await check_chosen_ids(broker.session, consumer, path.hold_until, request, body)
        except BrokerError as e:
            found_failing(broker, consumer, e)
            raise
        # (A client that leaves before the answer begins leaves its hold to wait for it: hold_after_answer.)
        opening = asyncio.ensure_future(open_answer(broker, consumer, path.method, target, headers, body))
        opening.add_done_callback(error_read)
        try:
            upstream = await asyncio.shield(opening)
        except asyncio.CancelledError:
            if job.state == "running":
                rest = hold_after_answer(broker.session, consumer, path.hold_until, opening, recorder)
                job.release("cancelled", hold=rest, hold_timeout_s=path.hold_until.timeout_s)
            else:
                opening.cancel()
            raise
    job.http = upstream.status
    took = 200 <= upstream.status < 300
    hold = path.hold_until if took else None
    if path.hold_until is not None and not took:
        log.info(logfmt(msg="no hold: the answer was not 2xx", consumer=consumer.name, http=upstream.status))
    captured = bytearray()  # (a 2xx answer's, for its hold's placeholders)

    def whole() -> bool:
        poll = hold_poller(broker.session, consumer, hold, bytes(captured), recorder) if hold else None
        return job.release("completed", success=took, hold=poll, hold_timeout_s=hold.timeout_s if hold else 0)

    kept = False  # by the hold of a client that left: it reads the rest and closes it
    try:
        return await relay(request, upstream, consumer, captured if hold else None, whole)
    except UpstreamBroke as e:
        _broke(broker, consumer, e)
        raise
    except (ConnectionResetError, asyncio.CancelledError):  # the client left
        if hold is not None and job.state == "running":  # it answered 2xx and took the work: its hold
            rest = hold_after_rest(broker.session, consumer, hold, upstream, captured, recorder)
            job.release("cancelled", success=True, hold=rest, hold_timeout_s=hold.timeout_s)
            kept = True
        raise
    finally:
        if not kept:
            close_upstream(upstream)


#: RFC 3986's unreserved characters: percent-encoding one of them changes nothing (section 6.2.2.2).
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def normal_path(raw: str) -> str:
    """A request path in RFC 3986 normal form: escapes of unreserved characters decoded (``%75`` is ``u``),
    the others' hex digits in upper case; ValueError for a '%' that starts no escape.

    Guards look at this form and it is what the consumer gets: what a guard matched is what is forwarded.
    """
    if "%" not in raw:
        return raw
    if _BAD_ESCAPE.search(raw):
        raise ValueError("malformed percent-encoding")

    def one(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _ESCAPE.sub(one, raw)


@functools.lru_cache(maxsize=1024)
def guard_key(path: str) -> str:
    """How a guard that refuses or schedules compares a (normal) path with a configured one: decoded, in
    lower case, without a trailing '/'. A lenient consumer may take /API/Admin/Unload/ or
    /api%2Fadmin%2Funload for /api/admin/unload: such a request is refused or scheduled as that route is."""
    return unquote(path).lower().rstrip("/") or "/"


def audio_upstream_path(raw_path: str) -> str:
    """The consumer path for ``GET /audio/<file>``, in normal form; bad_request for anything that could leave
    /audio/."""
    path, sep, query = raw_path.partition("?")
    try:
        path = normal_path(path)
    except ValueError:
        raise BrokerError("bad_request", "audio path must name a file below /audio/") from None
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


def mount_upstream_path(raw_path: str, name: str, *, port: bool = False) -> tuple[str, str]:
    """For ``/c/{name}/{path}``: the consumer's path in normal form with the query as the client encoded it,
    and the path alone (what every guard looks at: exactly what is forwarded).

    bad_request for a path a consumer could read in another way than the broker: one that leaves
    /c/{name}/, '.' or '..' segments, empty segments (``//``; a trailing '/' is fine), ';' (path parameters),
    backslashes, control characters (``%00``), malformed escapes or escapes that are not UTF-8, all also
    when percent-encoded (``%2F`` counts as '/').
    """
    path, sep, query = raw_path.partition("?")
    raw_name, _, tail = path.removeprefix("/c/").partition("/")
    try:
        upstream = normal_path("/" + tail)
        decoded = unquote(upstream, errors="strict")
        same_name = unquote(raw_name, errors="strict") == name
    except ValueError:  # UnicodeDecodeError too
        decoded, same_name = "", False
    segments = decoded.split("/")[1:]
    if (
        not path.startswith("/c/")
        or not same_name
        or any(s in (".", "..") for s in segments)
        or "" in segments[:-1]
        or ";" in decoded
        or "\\" in decoded
        or not decoded.isprintable()
    ):
        where = f"a path on {name}'s port" if port else f"a mount path must stay below /c/{name}/, and"
        raise BrokerError(
            "bad_request",
            f"{where} must have no '.', '..' or empty segments, ';', '\\', control characters or malformed"
            " percent-encoding",
            name,
        )
    return upstream + sep + query, upstream


def mount_job_path(consumer: ConsumerConfig, method: str, path: str) -> tuple[str, JobPath]:
    """The kind and JobPath of a scheduled mount request.

    A ``paths`` entry's (with its hold) when the method is its and the path is it as ``guard_key`` compares
    (in any letter case, encoding or with a trailing '/'; the entry's query aside); else kind ``mount``, no
    hold.
    """
    key = guard_key(path)
    for kind, p in consumer.paths.items():
        if p.method == method and guard_key(p.path.partition("?")[0]) == key:  # (whatever its query)
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

    The handshake (connect and the consumer's 101) is bounded like a connect: it must answer at once. No
    compression is offered: a message the consumer sends is held as large as it was sent, never inflated.
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
                compress=0,  # no permessage-deflate: nothing the consumer sends is inflated
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WEBSOCKET_CLOSE_S),
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


class ClientWebSocket(web.WebSocketResponse):
    """The client's side of a proxied WebSocket, whose close (aiohttp's own too, when it refuses a message)
    ends within 2 x WEBSOCKET_CLOSE_S: a client that reads nothing would hold it for ever in the drain of
    the close frame (its heartbeat stops as closing begins), and the relay and its max_websockets slot with
    it. It is then cut off."""

    def __init__(self, request: web.Request, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client_request = request

    async def close(
        self, *, code: int = aiohttp.WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        try:
            async with asyncio.timeout(2 * WEBSOCKET_CLOSE_S):
                return await super().close(code=code, message=message, drain=drain)
        except TimeoutError:
            if (transport := self.client_request.transport) is not None:
                transport.abort()
            return True


class WebSocketRefused(BrokerError):
    """One side sent what the broker does not relay: a message larger than max_ws_message_mib (1009,
    payload_too_large), or a frame that breaks the protocol (1002, bad_request: a compressed one, say, which
    no one agreed to). aiohttp closed that side with ``close_code`` already; the other side is closed with it
    too."""

    def __init__(self, close_code: int, reason: str, sender: str) -> None:
        code = "payload_too_large" if close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG else "bad_request"
        super().__init__(code, reason)
        self.close_code = close_code
        self.reason = reason
        #: "client" or "consumer".
        self.sender = sender


async def _pump(
    source: WebSocketSide, sink: WebSocketSide, sender: str, conn: Connection | None = None
) -> int:
    """Copy text and binary messages from ``source`` (the ``sender``'s side) to ``sink`` until ``source``
    closes; return the code to close the other side with. WebSocketRefused when ``source`` sent what is not
    relayed; ConnectionResetError when either side broke instead. ``conn``: the client's connection, told
    of each message taken (``ClientConnections.ws_message``)."""
    async for msg in source:  # ends at CLOSE, CLOSING and CLOSED
        ClientConnections.ws_message(conn)
        if msg.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type == aiohttp.WSMsgType.ERROR:
            if isinstance(msg.data, aiohttp.WebSocketError):  # too big, or not the protocol: refused
                raise WebSocketRefused(msg.data.code, str(msg.data), sender)
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
    #: The consumer's config it was opened with: a reload that removes or replaces that service closes it.
    called: ConsumerConfig
    #: The client's connection (``ClientConnections.upgraded``), where it is one of the broker's listeners'.
    conn: Connection | None = None
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
            asyncio.create_task(
                _pump(self.client, self.upstream, "client", self.conn), name="ws client->consumer"
            ),
            asyncio.create_task(_pump(self.upstream, self.client, "consumer"), name="ws consumer->client"),
        ]
        for pump in pumps:
            pump.add_done_callback(ended.append)
        try:
            try:
                await asyncio.wait([*pumps, self.stop], return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                # The client's connection was lost (aiohttp cancels its handler): the pumps are given a
                # moment to take what already came, so that a client gone without a close frame is a side
                # that broke (1011, logged, counted), not the broker going away (1001).
                await asyncio.wait(pumps, timeout=WEBSOCKET_CLOSE_S, return_when=asyncio.FIRST_COMPLETED)
                raise
        finally:
            # Also when the handler is cancelled (the client's connection closed right after its close
            # frame): what a pump already got still decides the code.
            code, error = self._outcome(ended)
            if isinstance(error, WebSocketRefused):
                self.metrics.inc(
                    "mgpumanager_websocket_refused_total", consumer=self.consumer, sender=error.sender
                )
                log.warning(
                    logfmt(
                        msg="websocket message refused",
                        consumer=self.consumer,
                        sender=error.sender,
                        code=error.close_code,
                        error=error.reason,
                    )
                )
            elif error is not None:
                self.metrics.inc("mgpumanager_websocket_failures_total", consumer=self.consumer)
                log.warning(logfmt(msg="websocket broke", consumer=self.consumer, error=describe(error)))
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            # (aiohttp bounds each read of the consumer's close, not the whole: one that keeps sending
            # would keep it reading. The client's side is bounded by its own timeout.)
            upstream = asyncio.wait_for(self.upstream.close(code=code), 2 * WEBSOCKET_CLOSE_S)
            closed = await asyncio.gather(upstream, self.client.close(code=code), return_exceptions=True)
            for result in closed:
                if isinstance(result, Exception):
                    log.warning(logfmt(msg="websocket close failed", error=describe(result)))

    def _outcome(self, ended: list[asyncio.Task[int]]) -> tuple[int, BaseException | None]:
        """The close code for both sides, and the error when a side broke or was refused: ``stop``'s code,
        else that of the first pump that ended (a refusal's own, 1011 for a side that broke); 1001 (going
        away) when none did (the relay was cancelled)."""
        if self.stop.done():
            return self.stop.result(), None
        for pump in ended:
            if not pump.cancelled():
                error = pump.exception()
                if isinstance(error, WebSocketRefused):
                    return error.close_code, error
                return (aiohttp.WSCloseCode.INTERNAL_ERROR, error) if error else (pump.result(), None)
        return aiohttp.WSCloseCode.GOING_AWAY, None

    def revoked(self) -> None:
        """The client's credential was revoked: both sides are closed with 1008 (policy violation)."""
        if not self.stop.done():
            self.stop.set_result(aiohttp.WSCloseCode.POLICY_VIOLATION)


def going_away(sockets: Iterable[ProxiedWebSocket]) -> int:
    """End the relay of each of these WebSockets still open, closing both sides with 1001 (going away);
    how many."""
    still = [p for p in sockets if not p.stop.done()]
    for proxied in still:
        proxied.stop.set_result(aiohttp.WSCloseCode.GOING_AWAY)
    return len(still)


# =====================================================================================================
# The broker
# =====================================================================================================

# ---- the state file: what a restart keeps -----------------------------------------------------------

#: The state file's format; a file of a later one is not read (a warning, and a fresh start).
STATE_VERSION = 1
#: How often the state is compared with what was written last: it is written within a second of a change.
STATE_CHECK_S = 0.5
#: A write of the state file (or its read at start) that takes longer is given up (logged, counted): the
#: file system may hang (a network mount, a dying disk). The thread is left to end on its own.
STATE_IO_TIMEOUT_S = 5.0
#: A state file larger than this is not read (100 consumers' state is some 30 KiB).
MAX_STATE_BYTES = 1 * MiB
#: Longest list (names of consumers to restore, unloaded by a reservation) or mapping a state file may hold.
MAX_STATE_ITEMS = 1000


@dataclass(frozen=True)
class Remembered:
    """A state file's content, checked (``parse_state``): seconds are from now."""

    #: GPU -> its reservation still in force: seconds left, reason, restore, unloaded, to restore.
    reservations: Mapping[int, tuple[float, str, bool, tuple[str, ...], tuple[str, ...]]]
    #: GPU -> consumers waiting to be restored (a reservation that ended while the broker was down adds its).
    to_restore: Mapping[int, tuple[str, ...]]
    #: consumer -> last used that many seconds ago, and its recent times by kind.
    last_used: Mapping[str, float]
    timings: Mapping[str, Mapping[str, tuple[float, ...]]]


def _state_number(value: Any, where: str, high: float = 1e12) -> float:
    """A finite number from 0 to ``high`` (by default, wall-clock seconds up to the year 33658)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
        raise ValueError(f"{where}: {value!r} is no number from 0 to {high:g}")
    return float(value)


def _state_names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_STATE_ITEMS:
        raise ValueError(f"{where}: not a list of at most {MAX_STATE_ITEMS} names")
    if not all(isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS for name in value):
        raise ValueError(f"{where}: not a list of names")
    return tuple(value)


def _state_mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > MAX_STATE_ITEMS:
        raise ValueError(f"{where}: not a JSON object of at most {MAX_STATE_ITEMS} members")
    return value


def parse_state(raw: Any, now: float) -> Remembered:
    """A state file's JSON checked, as of ``now`` (wall-clock); ValueError naming the first thing wrong (the
    whole file is then set aside: a fresh start). No I/O.

    Wall-clock time may have been set back since the file was written: nothing is taken to have happened
    after ``max(now, written_at_s)``, so a reservation never gets longer than it had left when written, and
    a last use is never in the future. A reservation that ended meanwhile is over (what it unloaded waits to
    be restored, if it was to be); one with more than RESERVE_MAX_S left, or a last use after the file was
    written, is absurd."""
    top = _state_mapping(raw, "the file")
    version = top.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > STATE_VERSION:
        raise ValueError(f"written by a later mgpumanager (format {version}; this one reads {STATE_VERSION})")
    if version != STATE_VERSION:
        raise ValueError(f"version: {version!r} is no format this broker reads ({STATE_VERSION})")
    written = _state_number(top.get("written_at_s"), "written_at_s")
    ref = max(now, written)
    reservations: dict[int, tuple[float, str, bool, tuple[str, ...], tuple[str, ...]]] = {}
    to_restore: dict[int, tuple[str, ...]] = {}
    for key, raw_gpu in _state_mapping(top.get("gpus", {}), "gpus").items():
        where = f"gpus.{key}"
        if not (key.isascii() and key.isdigit() and int(key) <= NUMBER_LIMITS["gpu"]):
            raise ValueError(f"{where}: no GPU index")
        index, gpu = int(key), _state_mapping(raw_gpu, where)
        names = _state_names(gpu.get("to_restore", []), f"{where}.to_restore")
        if (res := gpu.get("reservation")) is not None:
            res = _state_mapping(res, f"{where}.reservation")
            left = _state_number(res.get("until_s"), f"{where}.reservation.until_s") - ref
            if left > RESERVE_MAX_S:
                raise ValueError(f"{where}.reservation: {left:.0f} s left, more than a reservation may last")
            reason, restore = res.get("reason"), res.get("restore")
            if not isinstance(reason, str) or len(reason) > 200 or not isinstance(restore, bool):
                raise ValueError(f"{where}.reservation: no reason (at most 200 characters) or restore flag")
            unloaded = _state_names(res.get("unloaded", []), f"{where}.reservation.unloaded")
            theirs = _state_names(res.get("to_restore", []), f"{where}.reservation.to_restore")
            if left > 0:
                reservations[index] = (left, reason, restore, unloaded, theirs)
            elif restore:
                names += tuple(n for n in theirs if n not in names)
            else:  # (what it unloaded resident stays unloaded: an older yield's restore too)
                names = tuple(n for n in names if n not in theirs)
        if names:
            to_restore[index] = names
    last_used: dict[str, float] = {}
    timings: dict[str, dict[str, tuple[float, ...]]] = {}
    for name, raw_entry in _state_mapping(top.get("consumers", {}), "consumers").items():
        where = f"consumers.{name}"
        entry = _state_mapping(raw_entry, where)
        if (used := entry.get("last_used_s")) is not None:
            used = _state_number(used, f"{where}.last_used_s")
            if used > written:
                raise ValueError(f"{where}.last_used_s: after the file was written")
            last_used[name] = min(ref - used, now)  # (seconds ago: never before 1970, a file from year 5000)
        learned = _state_mapping(entry.get("timings", {}), f"{where}.timings")
        for what, values in learned.items():
            if what not in TIMED or not isinstance(values, list) or len(values) > TIMING_SAMPLES:
                raise ValueError(
                    f"{where}.timings.{what}: no list of at most {TIMING_SAMPLES} {'/'.join(TIMED)} times"
                )
            high = NUMBER_LIMITS["duration"]
            timings.setdefault(name, {})[what] = tuple(
                _state_number(v, f"{where}.timings.{what}", high) for v in values
            )
    return Remembered(reservations, to_restore, last_used, timings)


def read_state_file(path: str) -> Any:
    """The JSON in the state file (FileNotFoundError: there is none): a regular file of at most
    MAX_STATE_BYTES; OSError or ValueError otherwise. Temporary files a crash left beside it go. Run in a
    worker thread."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    with contextlib.suppress(OSError):
        for leftover in Path(directory).glob(f".{base}.*.tmp"):
            leftover.unlink()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, MAX_STATE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"larger than {MAX_STATE_BYTES // MiB} MiB")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(str(e)) from None


def write_state_file(path: str, data: bytes) -> None:
    """``data`` as the file ``path``, whole or not at all: a temporary file beside it (mode 0600), fsync,
    rename over ``path``, fsync of the directory. Run in a worker thread."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:  # (mkstemp: mode 0600, whatever the umask)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


class StateFileHeld(BrokerError):
    """Another broker holds the state file (bad_config): one broker per state file, and per machine."""

    def __init__(self, message: str):
        super().__init__("bad_config", message)


def lock_state_file(path: str) -> int:
    """Hold ``<path>.lock`` (flock, for as long as the descriptor returned is open) with this process's pid in
    it; StateFileHeld where another process holds it, OSError where it cannot be opened or locked. Run in a
    worker thread."""
    lock_path = path + ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise StateFileHeld(f"{path} is another broker's (pid {holder}, holding {lock_path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlocked(e: OSError | asyncio.TimeoutError) -> str:
    """Why the state file's lock could not be taken (but for another broker's holding it)."""
    if isinstance(e, TimeoutError):  # (an OSError too, since Python 3.11)
        return f"not locked within {STATE_IO_TIMEOUT_S:g} s"
    return e.strerror or str(e)


def _lock_unused(locking: asyncio.Future[int]) -> None:
    if not locking.cancelled() and locking.exception() is None:
        os.close(locking.result())


class StateFile:
    """What a restart keeps, in ``state_file``: each GPU's reservation (its end in wall-clock time) and what
    waits to be restored, each consumer's learned timings and last use; never a token, and nothing that
    grows but with the config. Owned by the broker: ``collect`` gives the state as it is now; ``run`` writes
    it within a second of a change (``write``: atomically, mode 0600, in a worker thread bounded by
    STATE_IO_TIMEOUT_S; one write at a time). A failed write is logged (once until one succeeds) and
    counted, never fatal; ``read`` at start gives what the file holds, or None for a fresh start (a
    missing, unreadable, corrupt, later or absurd file: a warning). Only one broker keeps a state file: it
    holds ``<state_file>.lock`` (``claim``) from before it reads the file until after its last write; a
    broker that finds it held does not start, and one whose reload names a held file writes none."""

    def __init__(self, shared: Shared, collect: Callable[[], dict[str, Any]]) -> None:
        self.shared = shared
        self.collect = collect
        #: The state file whose lock this broker holds, and the lock's descriptor.
        self._lock: tuple[str, int] | None = None
        #: Why the lock could not be taken last (said once until it is taken; the state is written anyway).
        self._unlocked_why: str | None = None
        #: The last try to take it (its thread may outlive a timeout: no second try starts meanwhile).
        self._locking: asyncio.Future[int] | None = None
        #: What was written last (the state, without its time), and where; when (wall-clock).
        self._written: tuple[str, bytes] | None = None
        self.written_at: float | None = None
        #: Writes that failed or did not finish in time, and the last reason (None once one succeeded).
        self.failures = 0
        self.error: str | None = None
        #: The write under way (its thread may outlive a timeout: no second write starts meanwhile).
        self._inflight: asyncio.Future[None] | None = None

    @property
    def path(self) -> str | None:
        return self.shared.config.state_file

    async def claim(self) -> None:
        """Hold the lock of the state file in force, letting go of the one held before (a reload named
        another); StateFileHeld where another broker holds it, OSError or TimeoutError where it cannot be
        taken."""
        path = self.path
        if path is None or (self._lock is not None and self._lock[0] == path):
            return
        if self._locking is not None and not self._locking.done():
            raise asyncio.TimeoutError  # (the last try hangs still: one thread, not one a write)
        self._locking = locking = in_own_thread(lock_state_file, path, name="state file lock")
        try:
            fd = await asyncio.wait_for(asyncio.shield(locking), STATE_IO_TIMEOUT_S)
        except BaseException:
            locking.add_done_callback(_lock_unused)  # (a lock taken after its claim gave up is let go)
            raise
        self.release()
        self._lock, self._unlocked_why = (path, fd), None

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock[1])
            self._lock = None

    async def close(self) -> None:
        """At shutdown: the last write, where this broker holds a state file's lock or could not take it for
        a reason other than another broker (never where another broker holds it: a start refused), then
        the lock let go."""
        if self._lock is not None or self._unlocked_why is not None:
            await self.write(last=True)
        if self._inflight is None or self._inflight.done():  # (else the kernel lets go at the exit)
            self.release()

    async def read(self) -> Remembered | None:
        """The state file's content, checked; None (and why, logged) for a fresh start. Its lock is taken
        first: StateFileHeld where another broker holds it (the broker does not start)."""
        path = self.path
        if path is None:
            return None
        try:
            await self.claim()
        except (OSError, asyncio.TimeoutError) as e:  # (its writes try again)
            self._not_locked(path, e)
        try:
            reading = in_own_thread(read_state_file, path, name="state file read")
            raw = await asyncio.wait_for(reading, STATE_IO_TIMEOUT_S)
        except asyncio.TimeoutError:
            why = f"not read within {STATE_IO_TIMEOUT_S:g} s"
        except FileNotFoundError:
            log.warning(logfmt(msg="no state file yet: a fresh start", path=path))
            return None
        except (OSError, ValueError) as e:
            why = (e.strerror or str(e)) if isinstance(e, OSError) else f"not valid: {e}"
        else:
            try:
                return parse_state(raw, time.time())
            except ValueError as e:
                why = f"not valid: {e}"
        log.warning(logfmt(msg="state file set aside: a fresh start", path=path, reason=why))
        return None

    async def run(self) -> None:
        """Write the state whenever it changed, checking every STATE_CHECK_S; owned by the broker. A bug in a
        round is logged and counted, and the next round tries again."""
        while True:
            await asyncio.sleep(STATE_CHECK_S)
            try:
                await self.write()
            except Exception as e:
                self.shared.internal_error("state file round crashed", e, path=self.path)

    async def write(self, *, last: bool = False) -> bool:
        """Write the state if it changed since the last write; whether it is written. ``last`` (at shutdown)
        waits for a write under way first (bounded)."""
        path = self.path
        if path is None:
            self.release()
            return True
        if self._inflight is not None and not self._inflight.done():
            if not last:
                return False  # (a write still under way, perhaps hung: the next check tries again)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._inflight), STATE_IO_TIMEOUT_S)
            if not self._inflight.done():
                return False
        try:
            # (The file's own time is on the wall clock its times were read with, before or after a step
            # between them: so no last use in it is after it.)
            before = self.shared.wall.now()
            collected = self.collect()
            now = max(before, self.shared.wall.now())
            state = json.dumps(collected, sort_keys=True, separators=(",", ":")).encode()
        except Exception as e:
            self.shared.internal_error("collecting the state crashed", error=describe(e))
            return False
        if self._written == (path, state):
            return True
        try:
            await self.claim()
        except StateFileHeld as e:
            self._failed(path, e.message)
            return False
        except (OSError, asyncio.TimeoutError) as e:  # (written all the same: no other broker is seen)
            self._not_locked(path, e)
        head = {"version": STATE_VERSION, "written_at": _iso(now), "written_at_s": round(now, 3)}
        data = json.dumps({**head, **collected}, indent=1).encode() + b"\n"
        self._inflight = inflight = in_own_thread(write_state_file, path, data, name="state file write")
        inflight.add_done_callback(error_read)  # (its error is read below, unless a timeout came first)
        try:
            await asyncio.wait_for(asyncio.shield(inflight), STATE_IO_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._failed(path, f"not written within {STATE_IO_TIMEOUT_S:g} s")
            return False
        except OSError as e:
            self._failed(path, e.strerror or str(e))
            return False
        if self.error is not None:
            log.info(logfmt(msg="state file written again", path=path))
        self._written, self.written_at, self.error = (path, state), now, None
        return True

    def _not_locked(self, path: str, e: OSError | asyncio.TimeoutError) -> None:
        why = _unlocked(e)
        if why != self._unlocked_why:
            log.warning(logfmt(msg="state file not locked", path=path, reason=why))
        self._unlocked_why = why

    def _failed(self, path: str, why: str) -> None:
        self.failures += 1
        if why != self.error:
            log.warning(logfmt(msg="state file not written", path=path, reason=why))
        self.error = why

    def describe(self) -> dict[str, Any] | None:
        """``state_file`` in /v1/status (null without one)."""
        if self.path is None:
            return None
        written = _iso(self.written_at)
        return {"path": self.path, "written": written, "write_failures": self.failures, "error": self.error}


class Broker:
    """The composition root: it builds the broker's parts from one config (the consumers, a reader and a
    scheduler per GPU) and swaps that config on reload; what the handlers share, and the broker-wide counts.
    The HTTP app's pieces it needs (the client connections, the consumers' ports) are given to it. Made and
    closed by the app's cleanup context."""

    def __init__(
        self,
        config: Config,
        *,
        session: aiohttp.ClientSession,
        own_session: aiohttp.ClientSession,
        metrics: Metrics,
        connections: ClientConnections,
        ports: ConsumerPorts,
        source: ConfigSource | None = None,
        websockets: set[ProxiedWebSocket] | None = None,
    ) -> None:
        #: The config in force and the bugs caught: every part reads and counts there.
        self.shared = Shared(config)
        #: The consumers' traffic; the broker's own calls (probes, loads, unloads) go on ``own_session``.
        self.session = session
        self.metrics = metrics
        self.events = Events()
        self.consumers = Consumers(self.shared, own_session, events=self.events)
        self.consumers.gone_listeners.append(self._consumer_gone)
        self.consumers.busy = lambda name: self.jobs_of(name) > 0
        #: Every client connection of its listeners: timeouts, descriptors, credentials.
        self.connections = connections
        #: The consumers' own ports (``listen`` on a consumer), and the WebSockets open through mounts.
        self.ports = ports
        self.mount_websockets = set() if websockets is None else websockets
        self.notifier = Notifier()
        self.started = time.monotonic()
        #: The broker's own address as it started (a reload's new ``listen`` waits for a restart).
        self.listen = f"{config.listen_host}:{config.listen_port}"
        #: One reader and one scheduler (queue, lock, eviction) per GPU, by nvidia-smi index.
        self.gpus: dict[int, GpuReader] = {}
        self.schedulers: dict[int, Scheduler] = {}
        #: Background work the broker owns (idle unloads, preloads); cancelled and awaited on cleanup.
        self.tasks: set[asyncio.Task[Any]] = set()
        #: Set as shutdown begins: no reload applies from then on (the drain goes on under the config it
        #: began with), and no consumer port opens.
        self.stopping = False
        #: Reading and applying the config again (``source``, where it was read).
        self.reloads = Reloads(self, source)
        #: In flight now, by consumer: unscheduled calls (mounts, /audio/) and WebSockets through mounts.
        self.unscheduled: dict[str, int] = {}
        self.websockets: dict[str, int] = {}
        #: The limits found full, logged once until there is room again.
        self.full: set[tuple[str, str]] = set()
        #: Bytes held by the request bodies being read now (at most scheduler.max_bodies_mib).
        self.reading = 0
        self.add_gpus()
        #: Idle unloads, preloads, yields and restores, on every GPU; when to yield and restore.
        self.internal = InternalJobs(self.shared, self.schedulers, spawn=self.spawn)
        self.yielding = Yielding(self.shared, self.schedulers, self.gpus, self.internal, spawn=self.spawn)
        #: What a restart keeps (``state_file``).
        self.state = StateFile(self.shared, self.remembered)

    @property
    def config(self) -> Config:
        return self.shared.config

    def jobs_of(self, name: str) -> int:
        """A consumer's jobs and holds holding a GPU lock (one, but a reload may have moved it meanwhile)."""
        return sum(s.lock.jobs_of(name) for s in self.schedulers.values())

    def _consumer_gone(self, name: str, reason: str) -> None:
        """A consumer was seen gone: the holds on its work end (on whichever GPU they run)."""
        for scheduler in self.schedulers.values():
            scheduler.holding.abandon(name, reason)

    def add_gpus(self) -> list[int]:
        """A reader and a scheduler for each GPU the config uses that has none yet; their indexes."""
        added = []
        for index in gpu_indexes(self.config):
            if index not in self.schedulers:
                reader = GpuReader(self.shared, index=index)
                reader.attribute = self.consumers.processes.attribute
                reader.listeners.append(self.consumers.processes.measure)
                self.gpus[index] = reader
                scheduler = self.schedulers[index] = Scheduler(
                    self.shared,
                    reader,
                    self.consumers,
                    events=self.events,
                    metrics=self.metrics,
                    index=index,
                    jobs_of=self.jobs_of,
                )
                reader.listeners.append(
                    scheduler.strangers.seen
                )  # (after measure: the same reading's figures)
                ended = functools.partial(self._reservation_ended, index)
                scheduler.reservations.ended.append(ended)
                added.append(index)
        return added

    def _reservation_ended(self, index: int, res: Reservation) -> None:
        self.yielding.reservation_ended(index, res)

    def remembered(self) -> dict[str, Any]:
        """What the state file keeps, as it is now: per GPU its reservation (one that shutdown ended too: a
        restart holds the GPU again) and what waits to be restored; per consumer its last use and recent
        times. Wall-clock seconds, each its distance from now on the wall clock of now (``WallClock``)."""
        wall = self.shared.wall
        gpus: dict[str, Any] = {}
        for index, s in sorted(self.schedulers.items()):
            entry: dict[str, Any] = {}
            res = s.reservations.reservation or s.reservations.kept
            if res is not None:
                entry["reservation"] = {
                    "reason": res.reason,
                    "until_s": round(wall.at(res.until), 3),
                    "restore": res.restore,
                    "unloaded": list(res.unloaded),
                    "to_restore": list(res.to_restore),
                }
            if self.internal.to_restore.get(index):
                entry["to_restore"] = list(self.internal.to_restore[index])
            if entry:
                gpus[str(index)] = entry
        consumers: dict[str, Any] = {}
        for name in self.config.consumers:
            state = self.consumers.states[name]
            entry = {}
            if state.last_used is not None:  # (a wall clock just started near 1970 may put it before 0)
                entry["last_used_s"] = round(max(0.0, wall.at(state.last_used)), 3)
            samples = {what: [round(v, 3) for v in values] for what, values in state.samples().items()}
            if samples:
                entry["timings"] = samples
            if entry:
                consumers[name] = entry
        return {"gpus": gpus, "consumers": consumers}

    def resume(self, remembered: Remembered | None) -> None:
        """At start, before any job: what the state file kept. A reservation still in force holds its GPU
        again; what waits to be restored waits again; consumers get their last use and learned times.
        What names a consumer or GPU the config no longer has is left out."""
        if remembered is None:
            return
        for name, samples in remembered.timings.items():
            if name in self.consumers.states and name in self.config.consumers:
                self.consumers.states[name].remembered(None, samples)
        for name, ago in remembered.last_used.items():
            if name in self.consumers.states and name in self.config.consumers:
                self.consumers.states[name].remembered(ago, {})
        for index, names in remembered.to_restore.items():
            if index in self.schedulers:
                mine = [
                    n for n in names if n in self.config.consumers and self.config.consumers[n].gpu == index
                ]
                self.internal.restore_later(index, mine)
        for index, (left, reason, restore, unloaded, to_restore) in remembered.reservations.items():
            if index not in self.schedulers:
                log.warning(logfmt(msg="state file: a reservation of a GPU not scheduled now", gpu=index))
                continue
            self.schedulers[index].reservations.resume(left, reason, restore, unloaded, to_restore)
        log.info(
            logfmt(
                msg="state file read",
                path=self.state.path,
                reservations=len(remembered.reservations),
                to_restore=sum(map(len, remembered.to_restore.values())),
                consumers=len(set(remembered.last_used) | set(remembered.timings)),
            )
        )

    @property
    def gpu(self) -> GpuReader:
        """The default GPU's reader (gpu.index): what the single-GPU fields of /v1/status show."""
        return self.gpus[self.config.gpu.index]

    @property
    def scheduler(self) -> Scheduler:
        """The default GPU's scheduler."""
        return self.schedulers[self.config.gpu.index]

    def internal_errors(self) -> int:
        """Bugs caught anywhere (each logged with its traceback), counted once."""
        return self.shared.internal_errors

    def status_line(self) -> str:
        """One line for systemd's STATUS=: who holds each GPU, the queue, free VRAM."""
        parts = []
        for index, s in sorted(self.schedulers.items()):
            holder = f"{s.holder} holds the GPU" if s.holder else "GPU idle"
            free = self.gpus[index].last_free_mib()
            text = f"{holder}, {len(s.lock.waiting)} queued, " + (
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
                states[name] = self.consumers.new_state(name)  # (its jobs are its GPU locks' to count)
                what = "added" if before is None else "new url for" if before.url != c.url else "new GPU for"
                changes.append(f"{what} {name}")
            elif before != c:
                changes.append(f"changed {name}")
                if before.started_by_command and not c.started_by_command:
                    states[name].cannot_be_started()
        removed = set(old.consumers) - set(new.consumers)
        changes += [f"removed {name}" for name in sorted(removed)]
        if (listen := f"{new.listen_host}:{new.listen_port}") != self.listen:
            log.warning(logfmt(msg="reload: listen changes only with a restart", listen=self.listen))
            changes.append(f"listen {listen} only after a restart (now {self.listen})")
        for part in ("gpu", "scheduler", "health", "routing", "audio_proxy", "auth", "http", "state_file"):
            if getattr(new, part) != getattr(old, part):
                changes.append(f"changed {part}")
        changes += client_changes(old.auth, new.auth)
        self.shared.config = new  # the one place: every part's next decision uses it
        self.connections.configure(new)
        changes += [f"added GPU {index}" for index in self.add_gpus()]
        for scheduler in self.schedulers.values():
            scheduler.forget()
        for name in [n for n in states if n not in new.consumers and n != RESERVATION]:
            if not self.jobs_of(name) and not any(s.rooms.unloading(name) for s in self.schedulers.values()):
                self.consumers.forget(name)  # (one at work: at a later reload)
        self.yielding.wake.set()  # (its next round under the new config now: not after the old poll_s)
        return changes

    def clients(self) -> dict[str, dict[str, Any]]:
        """Each client's jobs and GPU time, on every GPU together (/v1/status's ``clients``)."""
        out = {}
        for name, c in self.config.auth.clients.items():
            use = [client_use(s, name) for _, s in sorted(self.schedulers.items())]
            total = {key: sum(u[key] for u in use) for key in ("queued", "running", "jobs_total")}
            gpu_s = round(sum(u["gpu_s_window"] for u in use), 3)
            out[name] = {**total, "gpu_s_window": gpu_s, "priority": c.priority, "max_queued": c.max_queued}
        return out

    def scheduler_for(self, name: str) -> Scheduler:
        """The scheduler (queue, lock, eviction) of the GPU that consumer ``name`` runs on."""
        c = self.config.consumers.get(name)
        return self.schedulers[c.gpu if c is not None else self.config.gpu.index]

    async def check_reachable(self, name: str) -> None:
        """consumer_unreachable (or bad_consumer_url) when the consumer is marked unhealthy (by a probe or a
        failed connection) and one more probe, right now, still finds it failing: one that is back is
        served at once, without waiting for the next health round.

        Not for one that is stopped (started by a load command, and not running: stopped by the broker, or
        before the broker started): the job starts it; nor for one the broker is starting now (a service
        started by command fails its health while it loads its model: the start waits for it; should it
        fail, the job is refused at its grant: ``RoomMaker.ready``). One started by command that runs but
        fails its health otherwise (an error status, no answer in time) is down, as any other.
        """

        def refusal() -> BrokerError | None:
            # (Looked up each time: a reload while it was probed may have made it a new service, or none.)
            c, state = self.config.consumers.get(name), self.consumers.states.get(name)
            if c is None or state is None:
                return BrokerError("no_consumer", f"{name} is no longer configured", name)
            return None if state.being_loaded and c.started_by_command else state.failing()

        if refusal() is None:
            return
        await self.consumers.probe_now(name)
        if (error := refusal()) is not None:
            raise error

    async def ensure_running(
        self, consumer: ConsumerConfig, request_id: str | None, client: str | None
    ) -> None:
        """Before an unscheduled call: a consumer that is stopped (started by a command, which the broker
        stopped or found not running) is refused with consumer_stopped, its Retry-After its learned load
        time (a job for it starts it), unless ``start_for_unscheduled``: then a job of kind ``start`` makes
        room for it and starts it first, through the GPU lock like any job."""
        name = consumer.name
        state = self.consumers.states[name]
        if not state.stopped:
            return
        if not consumer.start_for_unscheduled:
            load_s = state.timing("load")
            took = f" (its start takes {load_s:.1f} s)" if load_s is not None else ""
            raise BrokerError(
                "consumer_stopped",
                f"{name} is stopped; a job for it starts it again{took}",
                name,
                retry_after=max(1, math.ceil(load_s or 0)),
            )
        async with self.scheduler_for(name).job(name, START_KIND, request_id=request_id, client=client):
            pass  # started: the unscheduled call goes on

    def open_websockets(self) -> list[ProxiedWebSocket]:
        """The WebSockets relayed now, through mounts and consumer ports."""
        return [*self.mount_websockets, *self.ports.websockets()]

    @contextlib.contextmanager
    def unscheduled_slot(self, consumer: ConsumerConfig, *, websocket: bool = False) -> Iterator[None]:
        """Hold one of the consumer's ``max_unscheduled`` (or ``max_websockets``) slots while an unscheduled
        call (or a WebSocket) is in flight; too_many_requests at once when none is free, so that traffic
        that skips the lock can never take every connection of the broker's."""
        counts = self.websockets if websocket else self.unscheduled
        key = "max_websockets" if websocket else "max_unscheduled"
        limit, name = getattr(consumer, key), consumer.name
        if counts.get(name, 0) >= limit:
            self.metrics.inc("mgpumanager_refused_total", consumer=name, limit=key)
            if (name, key) not in self.full:
                self.full.add((name, key))
                log.warning(logfmt(msg="limit reached: refusing more", consumer=name, limit=key, value=limit))
            what = "WebSockets open" if websocket else "unscheduled calls in flight"
            message = f"{name} has {limit} {what} already (consumers.{name}.{key})"
            raise BrokerError("too_many_requests", message, name)
        counts[name] = counts.get(name, 0) + 1
        try:
            yield
        finally:
            counts[name] -= 1
            if not counts[name]:  # (kept for those in flight only: names come and go with reloads)
                del counts[name]
            self.full.discard((name, key))

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Start background work the broker owns until it ends or the broker closes."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


def move_problems(new: Config, schedulers: Mapping[int, Scheduler]) -> list[str]:
    """Why a reload may not move a consumer to another GPU now (ConfigError's problems; the reload is refused
    whole): one of its jobs runs on another GPU, or an unload of it does there (an eviction, a yield, an
    admin's, idle or reservation unload: ``RoomMaker.unloading``). Two GPUs' locks must never both let it
    work. The GPUs tell, not the config in force: one a reload removed while its job ran, added again on
    another GPU, is a move too."""
    problems = []
    for name, c in new.consumers.items():
        for index, s in sorted(schedulers.items()):
            if index == c.gpu:
                continue
            if s.lock.jobs_of(name) > 0:
                why = f"has a job running on GPU {index}"
            elif s.rooms.unloading(name):
                why = f"is being unloaded on GPU {index}"
            else:
                continue
            problems.append(f"consumers.{name}.gpu: {name} {why}; reload again once it is idle")
    return problems


def client_changes(old: AuthConfig, new: AuthConfig) -> list[str]:
    """What a reload changes of the clients, by name (never a token)."""
    changes = [f"added client {name}" for name in new.clients if name not in old.clients]
    changes += [f"removed client {name}" for name in old.clients if name not in new.clients]
    for name, c in new.clients.items():
        before = old.clients.get(name)
        if before is not None and not hmac.compare_digest(before.token.encode(), c.token.encode()):
            changes.append(f"new token for client {name}")
        elif before is not None and before != c:
            changes.append(f"changed client {name}")
    return changes


class Reloads:
    """The config read again and applied in place (SIGHUP, ``POST /v1/reload``): one reload at a time, each
    read and checked in a thread, then applied whole by the composition root (``Broker.apply``)."""

    def __init__(self, broker: Broker, source: ConfigSource | None) -> None:
        self.broker = broker
        #: Where a reload reads the config again; None for an app made from a Config alone.
        self.source = source
        #: Held while a reload reads and applies the config: one at a time.
        self.lock = asyncio.Lock()
        #: The config's read (one at a time: a hung one is not joined by another).
        self._config_read: asyncio.Future[Any] | None = None
        #: SIGHUP's reloads under way: the drain cuts one still reading and waits for none (one applying
        #: runs to its end, which the consumers' ports' closing waits for).
        self.background: set[asyncio.Task[None]] = set()

    async def reload(self, *, spare: Connection | None = None) -> list[str]:
        """Read the config again and apply it in place; ConfigError (logged) leaves the old one.

        The file is read and checked in a thread (at most CONFIG_READ_TIMEOUT_S): the event loop goes on
        serving meanwhile. Reloads run one at a time, in the order they were asked for. A token it replaces
        or removes closes every connection authenticated with it at once (``spare``, the connection that
        asked for the reload, once it is answered).

        Once read and checked, the config is applied whole: a caller that leaves meanwhile (the admin's
        client, the drain cutting a SIGHUP's reload) does not stop it half way. Once the broker is stopping,
        nothing is applied (``shutting_down``): the drain goes on under the config it began with.
        """
        if self.source is None:
            raise ConfigError(["this broker was not started from a config file"])
        self._refuse_while_stopping()
        broker = self.broker
        async with self.lock:
            broker.notifier.send(
                "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
            )
            try:
                new = await self._read_config(self.source)
                await self._check_loops(new)
                if problems := move_problems(new, broker.schedulers):
                    raise ConfigError(problems)  # (last: no job may start between this check and ``apply``)
            except ConfigError as e:
                for problem in e.problems:
                    log.error(logfmt(msg="reload refused", problem=f"{self.source.path}: {problem}"))
                broker.events.publish("reload", ok=False, problems=e.problems)
                raise
            except asyncio.CancelledError:  # (its caller left, or the drain cut a SIGHUP's)
                log.info(logfmt(msg="reload cut: nothing of it applied"))
                raise
            finally:
                broker.notifier.send("READY=1")  # (dropped once stopping: the notifier tells no READY then)
            self._refuse_while_stopping()  # (a read that ended during the drain)
            # Applied in the turn of the move check (``apply`` awaits nothing): no job is granted between.
            changes = broker.apply(new)
            return await to_its_end(self._apply(new, spare, changes))

    def _refuse_while_stopping(self) -> None:
        if self.broker.stopping:
            log.info(logfmt(msg="reload ignored: the broker is stopping"))
            raise BrokerError("shutting_down", "the broker is shutting down: the config it began with stays")

    async def _apply(self, new: Config, spare: Connection | None, changes: list[str]) -> list[str]:
        """The rest of a reload, once the broker's parts have the new config (``changes``): the tokens'
        connections, the consumers' ports, the log line, the event and the preloads."""
        broker = self.broker
        revoked, tokenless = broker.connections.revoke(valid_credentials(new.auth), spare=spare)
        if revoked:
            changes.append(f"closed {_plural(revoked, 'connection')} authenticated with a revoked token")
        if tokenless:
            changes.append(
                f"closed {_plural(tokenless, 'connection')} let in without a token (one is required now)"
            )
        # (Unscheduled, they would relay on to a service the broker no longer has, in its max_websockets.)
        stale = [p for p in broker.open_websockets() if not same_service(new, p.called)]
        if closed := going_away(stale):
            changes.append(f"closed {_plural(closed, 'WebSocket')} to a removed or replaced service")
        changes += await broker.ports.sync(broker, strict=False)
        log.info(logfmt(msg="reload", changes="; ".join(changes) or "none"))
        warn_missing_programs(new)
        broker.events.publish("reload", ok=True, changes=changes)
        if not broker.stopping:  # (an apply the drain began meanwhile loads nothing more)
            broker.internal.start_preloads()
        return changes

    def in_background(self) -> None:
        """A reload for SIGHUP (``reload_logged``), owned until it ends or the broker closes."""
        task = asyncio.ensure_future(self.reload_logged())
        task.set_name("reload")
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def reload_logged(self) -> None:
        """A reload for SIGHUP: a refused config is logged (by ``reload``), nobody is answered; a bug is
        logged and counted as POST /v1/reload's would be, never left in the task for asyncio to find."""
        try:
            await self.reload()
        except BrokerError:  # (a refused config, or the broker stopping: logged by ``reload``)
            pass
        except Exception:
            self.broker.shared.internal_error("internal error", during="reload")

    async def _read_config(self, source: ConfigSource) -> Config:
        """``source.load()`` in a thread, bounded by CONFIG_READ_TIMEOUT_S (a file on a hung network mount:
        the thread is left to end on its own, its result unused). One at a time: while a read that timed
        out still hangs, a reload is refused at once (each started one more thread that never ends)."""
        if self._config_read is not None and not self._config_read.done():
            raise ConfigError(["the last read of it has not ended yet (a hung mount?)"])
        self._config_read = reading = in_own_thread(source.load, name="config read")
        reading.add_done_callback(error_read)  # (if it ends late)
        try:
            return await asyncio.wait_for(asyncio.shield(reading), CONFIG_READ_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ConfigError([f"not read within {CONFIG_READ_TIMEOUT_S:g} s"]) from None

    async def _check_loops(self, new: Config) -> None:
        """A consumer URL that leads back to a port really listened on is a loop (ConfigError; the reload is
        refused whole): the broker's own as it listens now, whatever the new ``listen`` says (that one waits
        for a restart; the loader checked the URLs against it, so the config also starts), and each
        consumer's port that stays open, as bound (port 0: the free one it got). Names are resolved in a
        thread, as the loader's are."""
        listeners: list[tuple[tuple[str, int], str]] = []
        for listener, bound in self.broker.connections.listening.values():
            if listener != "listen":  # a consumer's port: it stays open if its listen does not change
                c, opened = new.consumers.get(listener), self.broker.ports.open.get(listener)
                if c is None or opened is None or c.listen != opened[0]:
                    continue
            key = "listen" if listener == "listen" else f"consumers.{listener}.listen"
            listeners += [(address, key) for address in bound]
        if not listeners:
            return
        urls = {name: c.url for name, c in new.consumers.items()}
        found = await asyncio.to_thread(loop_problems, urls, listeners)
        if found:
            now = " (the port listened on now: a new listen takes effect at a restart)"
            raise ConfigError([f"consumers.{name}.url: {why}{now}" for name, why in sorted(found.items())])


# =====================================================================================================
# The HTTP app
# =====================================================================================================


def listen_backlog(limit: int) -> int:
    """A listening socket's backlog under the descriptor limit ``limit``: the connects the kernel holds until
    the broker accepts them (one beyond it has its SYN dropped, and its client sends it again a second or
    more later: a burst of 2,000 connects overflowed aiohttp's 128 now and then), and about how many
    connections one turn of the loop may accept before the broker sees the first, which the descriptor
    reserve covers: a 32nd of the limit, between LISTEN_BACKLOG_MIN and LISTEN_BACKLOG_MAX."""
    return max(LISTEN_BACKLOG_MIN, min(LISTEN_BACKLOG_MAX, limit // 32))


def descriptor_reserve(config: Config, limit: int) -> int:
    """The file descriptors kept for the broker's own work, out of reach of client connections, under the
    descriptor limit ``limit``: what its config lets it hold at once (per consumer its jobs, unscheduled
    calls and WebSockets, each one connection to the consumer, and FD_RESERVE_PER_CONSUMER more; per GPU its
    readings and commands), the connections one turn of the loop may accept (``listen_backlog``), and a
    base."""
    consumers = sum(
        c.max_concurrency + c.max_unscheduled + c.max_websockets + FD_RESERVE_PER_CONSUMER
        for c in config.consumers.values()
    )
    gpus = FD_RESERVE_PER_GPU * len(gpu_indexes(config))
    return FD_RESERVE_BASE + listen_backlog(limit) + consumers + gpus


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE now (unlimited counts as a million)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if 0 <= soft < 1 << 20 else 1 << 20


def raise_descriptor_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's soft default is 1024, which a few hundred idle
    connections took; the unit sets LimitNOFILE=65536), and log both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    was = soft
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning(logfmt(msg="cannot raise the descriptor limit", soft=soft, hard=hard, error=str(e)))
    raised = {"raised_from": was} if was != soft else {}
    log.info(logfmt(msg="descriptors", soft=soft, hard=hard, **raised))


#: What a connection let in without a token (none was needed) is registered under: a reload that makes a
#: token required revokes it, as it revokes a token it replaces.
NO_TOKEN = "no-token"


def valid_credentials(auth: AuthConfig) -> frozenset[str]:
    """The credentials ``auth`` accepts: the admin's token's and each client's; none (NO_TOKEN) where no
    token is required."""
    found = {caller.credential for _, caller in auth.callers if caller.credential is not None}
    return frozenset(found if auth.required else {*found, NO_TOKEN})


@dataclass(eq=False)
class Connection:
    """One client connection of one of the broker's listeners, as ClientConnections watches it."""

    #: aiohttp's protocol for it (``request.protocol``) and its transport.
    protocol: asyncio.BaseProtocol
    transport: asyncio.Transport
    #: Requests of it being handled now, and how many it sent.
    busy: int = 0
    requests: int = 0
    #: It began another request head after an answer (which must then arrive within header_timeout_s).
    head_begun: bool = False
    #: Bytes it sent since its last request began to be handled (or since it opened; or since that request's
    #: body arrived whole; or, a WebSocket, since the relay last took a message of it): ``head_too_large``
    #: and ``ws_room`` say how many it may.
    head_bytes: int = 0
    #: The body of its current (or last) request, as aiohttp reads it, and how much of it aiohttp had read
    #: before the request began to be handled; whether it has arrived whole.
    body: aiohttp.StreamReader | None = None
    body_base: int = 0
    body_done: bool = False
    #: It became a WebSocket (``upgraded``): what it sends now are frames, not the next request's head;
    #: ``head_bytes`` then counts what it sent since the relay last took a message of it, ``ws_room`` at most.
    upgraded: bool = False
    ws_room: int = 0
    #: The deadline watched while it is not busy.
    timer: asyncio.TimerHandle | None = None
    #: The credential its current (or last) request was let in with (a set: none, or one).
    credentials: set[str] = field(default_factory=set)
    #: How to end it politely when its credential is revoked (a WebSocket's close frame); else it is cut.
    closer: Callable[[], None] | None = None
    #: Its credential was revoked: it is closed once its answer is sent (the reload's own).
    revoked: bool = False
    #: It is gone (either side closed it).
    lost: bool = False
    #: The body of its request being read now (``read_body``, through ``waits_on_client``): ended with the
    #: error, should its chunked encoding break (``_Watched.data_received``).
    reading: aiohttp.StreamReader | None = None
    #: Its request was refused before its body arrived whole (``refused_unread``): no further request comes
    #: on it, what it still sends is that body (aiohttp reads and drops it, then closes), no head is due.
    refused: bool = False


def queued_parse_error(protocol: asyncio.BaseProtocol) -> HttpProcessingError | None:
    """The error aiohttp's C parser met in the middle of a request body, where there is one. That parser
    queues its 400 for after the request under way and never ends that request's body (its Python parser
    ends it with the error), so the handler would wait out body_timeout_s and answer 408. It is found in
    aiohttp's own queue (a private one: where it has none, the handler answers 408; a test guards it)."""
    queued = getattr(protocol, "_messages", None)
    exc = getattr(queued[-1][0], "exc", None) if queued else None
    return exc if isinstance(exc, HttpProcessingError) else None


class _Watched(asyncio.Protocol):
    """aiohttp's protocol for one client connection, wrapped so that ClientConnections sees it open, get
    bytes and close (under asyncio and uvloop alike: it is a plain protocol to either)."""

    def __init__(self, connections: ClientConnections, inner: asyncio.Protocol) -> None:
        self.connections = connections
        self.inner = inner
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = self.connections.opened(self.inner, transport)  # type: ignore[arg-type]
        self.inner.connection_made(transport)
        self.connections.make_room()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and not conn.upgraded:
            if not conn.busy and not conn.refused and conn.requests and not conn.head_begun:
                self.connections.head_begun(conn)
            if self.connections.head_too_large(conn, len(data)):
                self.connections.close(conn, "head_too_large")  # (nothing more of it is parsed)
                return
        elif conn is not None and not AIOHTTP_BOUNDS_STREAMS:  # (a WebSocket's frames)
            conn.head_bytes += len(data)
            if conn.head_bytes > conn.ws_room:
                self.connections.close(conn, "websocket_too_large")
                return
        self.inner.data_received(data)
        body = conn.reading if conn is not None else None
        if body is not None and not body.is_eof() and (broken := queued_parse_error(self.inner)) is not None:
            body.set_exception(broken)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.connections.lost(self.conn)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _CountingConnector(aiohttp.TCPConnector):
    """aiohttp's connector, telling ``exhausted`` of a connection that failed for want of a descriptor.
    (Where the connection is made: a trace would do it too, but makes every request send its signals.)"""

    def __init__(self, exhausted: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._exhausted = exhausted

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        try:
            return await super().connect(req, traces, timeout)
        except OSError as e:  # (aiohttp's ClientConnectorError is one, with its errno)
            if out_of_descriptors(e):
                self._exhausted(f"{req.method} {req.url.origin()}")
            raise


class ClientConnections:
    """Every client connection of the broker's listeners (its own port and the consumers' ports), and the
    file descriptors they hold.

    A connection that has not sent a whole request head within http.header_timeout_s of its opening (or of
    its first byte after an answer), or sends more than MAX_HEAD_BYTES before its request is handled (or
    than ``head_too_large`` allows while it is), is closed, and so is one idle http.keepalive_s after its
    last answer; a connection whose request is being handled (a job, an event stream, a WebSocket) is
    never timed out here.
    Client connections may hold what RLIMIT_NOFILE allows less a reserve for the broker's own work
    (descriptor_reserve): one more closes the longest-idle connection first, and so does the broker's own
    work finding no descriptor. Idle here is also a request that waits on its client (an event stream, a body
    still arriving), since it began; a connection whose job or WebSocket runs is never closed for this (the
    new one itself is, when every other is such). It also knows the credential
    each connection was authenticated with, so that a reload that revokes one closes its connections.
    Every close is counted by reason (mgpumanager_connections_closed_total) and summed up in the log.
    """

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.metrics = metrics
        #: By aiohttp's protocol for each (what a request knows as ``request.protocol``).
        self.open: dict[asyncio.BaseProtocol, Connection] = {}
        #: What may be closed when descriptors run short, the longest idle first: the connections without a
        #: request being handled, and those whose request waits on its client (``waits_on_client``).
        self.idle: dict[Connection, None] = {}
        #: credential -> the open connections authenticated with it.
        self.by_credential: dict[str, set[Connection]] = {}
        #: Each listener started and not stopped (a ListenerSite) -> its name ("listen", or the consumer's)
        #: and the addresses its sockets are bound to: the ports really listened on (port 0 bound to a free
        #: one; a new ``listen`` waits for a restart), which a reload's loop check compares URLs with.
        self.listening: dict[object, tuple[str, list[tuple[str, int]]]] = {}
        #: Closes since start, by reason; those not summed up in the log yet.
        self.closed: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._log_due: asyncio.TimerHandle | None = None
        #: Descriptors ran short, or the broker's own work found none, since the last summary (the first of
        #: an episode is logged at once).
        self._short = self._exhausted = False
        self.limit = self.reserve = self.allowed = 0
        self.configure(config)

    def __repr__(self) -> str:
        return f"<ClientConnections open:{len(self.open)} idle:{len(self.idle)} allowed:{self.allowed}>"

    def configure(self, config: Config) -> None:
        """Take a config's timeouts and the reserve it needs (at start and on each reload)."""
        self.http = config.http
        limit = descriptor_limit()
        reserve = descriptor_reserve(config, limit)
        if (limit, reserve) == (self.limit, self.reserve):
            return
        self.limit, self.reserve = limit, reserve
        self.allowed = max(limit - reserve, limit // 4)
        few = limit - reserve < limit // 4
        hint = {"hint": "raise LimitNOFILE: the broker's own work may need most of them"} if few else {}
        line = logfmt(
            msg="client connections", allowed=self.allowed, descriptors=limit, reserve=reserve, **hint
        )
        log.log(logging.WARNING if few else logging.INFO, line)
        self.make_room()  # (a reload may keep more for the broker's own work)

    def protocol(self, server: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """A new connection's protocol: aiohttp's (``server()``), watched."""
        return _Watched(self, server())

    # ---- what the connections do -------------------------------------------------------------------

    def opened(self, protocol: asyncio.BaseProtocol, transport: asyncio.Transport) -> Connection:
        """A connection was accepted: its request head is due within header_timeout_s."""
        conn = Connection(protocol, transport)
        self.open[protocol] = conn
        self.idle[conn] = None
        self._watch(conn, self.http.header_timeout_s, "header_timeout")
        return conn

    def make_room(self) -> None:
        """Beyond what client connections may hold, close the longest-idle ones."""
        while len(self.open) > self.allowed and self.idle:
            self.close(next(iter(self.idle)), "descriptors")

    def head_begun(self, conn: Connection) -> None:
        """Bytes of another request after an answer: its head is due within header_timeout_s."""
        conn.head_begun = True
        self._watch(conn, self.http.header_timeout_s, "header_timeout")

    def started(self, request: web.BaseRequest) -> Connection | None:
        """A request's head arrived whole and it is being handled: no deadline while it is."""
        conn = self.open.get(request.protocol)
        if conn is None:
            return None  # (a server of another kind: aiohttp's test servers)
        conn.busy += 1
        conn.requests += 1
        conn.head_begun, conn.head_bytes, conn.upgraded = False, 0, False
        conn.body, conn.body_base, conn.body_done = request.content, request.content.total_bytes, False
        self.idle.pop(conn, None)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        return conn

    def head_too_large(self, conn: Connection, size: int) -> bool:
        """``size`` more bytes of the connection arrived (counted in ``head_bytes``): more than it may send?

        Before its request is handled: MAX_HEAD_BYTES (its head). While it is (and after, while aiohttp
        reads and drops a refused body), what it sends is its body, its chunked framing and its trailers:
        MAX_HEAD_BYTES besides twice the body's bytes (where aiohttp does not bound trailers itself:
        ``AIOHTTP_BOUNDS_STREAMS``); then the heads of requests it pipelines behind the one handled:
        MAX_PIPELINED_BYTES. The aiohttp of requirements.txt bounds these itself (128 header lines, trailers
        too; 32 requests queued, then it stops reading); Debian 13's aiohttp 3.11 held every
        trailer, every request and header line sent behind a request being handled, and everything sent
        after a head asking to upgrade that was not upgraded (an event stream's): gigabytes."""
        body = conn.body
        if body is not None and not conn.body_done and body.is_eof():
            conn.body_done, conn.head_bytes = True, 0  # (what follows: the next request's head)
        conn.head_bytes += size
        if body is None or conn.body_done:
            return conn.head_bytes > (MAX_PIPELINED_BYTES if conn.busy else MAX_HEAD_BYTES)
        # (Its trailers: counted by an aiohttp that bounds them, not by the broker.)
        return not AIOHTTP_BOUNDS_STREAMS and conn.head_bytes > MAX_HEAD_BYTES + 2 * (
            body.total_bytes - conn.body_base
        )

    def upgraded(self, request: web.BaseRequest, max_message: int) -> Connection | None:
        """The request's connection becomes a WebSocket: what it sends from now on is no request head. Between
        two messages the relay takes of it (``ws_message``), it may send ``max_message`` bytes and
        MAX_HEAD_BYTES (frame heads, control frames, what aiohttp read ahead); more is cut
        (websocket_too_large), where aiohttp does not bound frames itself (``AIOHTTP_BOUNDS_STREAMS``: a
        client that pings for hours without a message would be cut). aiohttp 3.14 refuses a frame whose length
        says it is too large, and stops reading with 64 KiB of messages queued; Debian 13's aiohttp 3.11 read
        a frame whole before it looked at its length (a client that said 1 TiB was held as long as it sent),
        and counted an empty message as nothing (empty frames to a consumer that read none: 32 MiB of them
        held as 685 MiB)."""
        conn = self.open.get(request.protocol)
        if conn is not None:
            conn.upgraded, conn.ws_room, conn.head_bytes = True, max_message + MAX_HEAD_BYTES, 0
        return conn

    @staticmethod
    def ws_message(conn: Connection | None) -> None:
        """The relay took a message of the connection's WebSocket (``upgraded``)."""
        if conn is not None:
            conn.head_bytes = 0

    def refused_unread(self, request: web.BaseRequest) -> None:
        """Its request was refused before its body arrived whole (an Expect answered, a body too large or
        too slow), its answer saying ``Connection: close``: it ends once the client closes or aiohttp's
        lingering (reading and dropping the rest, 10 s at most) is over, not at a head's deadline (none is
        due), nor at keepalive_s. Closed at once at shutdown (``close_refused``)."""
        conn = self.open.get(request.protocol)
        if conn is None:
            return
        conn.refused = True
        conn.body, conn.body_base, conn.body_done = request.content, request.content.total_bytes, False
        conn.head_bytes = 0  # (what it still sends is that body: head_too_large counts it so)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def close_refused(self) -> None:
        """At shutdown: the refused connections still lingering go now (they would hold the stop for
        aiohttp's grace); their answers were sent."""
        for conn in [conn for conn in self.open.values() if conn.refused]:
            conn.transport.close()

    def ended(self, conn: Connection | None) -> None:
        """Its request was handled: idle, it may stay keepalive_s."""
        if conn is None:
            return
        conn.busy -= 1
        if conn.busy or conn.protocol not in self.open:
            return
        conn.closer = None
        self.idle[conn] = None  # the most recently idle, last
        if not conn.refused:
            self._watch(conn, self.http.keepalive_s, "keepalive")

    def authenticated(self, conn: Connection | None, key: str) -> None:
        """Its request was let in with credential ``key``. Its earlier requests have ended (a connection
        serves one at a time), and what they were let in with is over: a reload that revokes one of those
        closes no job this one lets in (a proxy's connection carries several clients' requests in turn)."""
        if conn is not None and conn.credentials != {key} and conn.protocol in self.open:
            self._drop_credentials(conn)
            conn.credentials = {key}
            self.by_credential.setdefault(key, set()).add(conn)

    def waits_on_client(
        self, request: web.BaseRequest, waits: bool = True, *, body: aiohttp.StreamReader | None = None
    ) -> None:
        """The request waits on its client (an event stream; a body still arriving: ``body``, which its
        connection ends should its chunked encoding break), or no longer does: while it does, its
        connection counts as idle since then when descriptors run short."""
        conn = self.open.get(request.protocol)
        if conn is None or not conn.busy:
            return
        conn.reading = body if waits else None
        self.idle.pop(conn, None)
        if waits:
            self.idle[conn] = None

    def closer(self, request: web.BaseRequest, close: Callable[[], None]) -> None:
        """How to end the request's connection politely if its credential is revoked."""
        conn = self.open.get(request.protocol)
        if conn is not None:
            conn.closer = close

    def of(self, request: web.BaseRequest) -> Connection | None:
        return self.open.get(request.protocol)

    def lost(self, conn: Connection) -> None:
        """It closed (either side)."""
        conn.lost = True
        if self.open.get(conn.protocol) is conn:
            del self.open[conn.protocol]
            self._forget(conn)

    # ---- closing -----------------------------------------------------------------------------------

    def revoke(self, valid: frozenset[str], *, spare: Connection | None) -> tuple[int, int]:
        """Close every connection authenticated with a credential not in ``valid`` (a reload replaced or
        removed its token, or requires one where none was: NO_TOKEN), WebSockets with a close frame (1008),
        at once; ``spare`` (the reload's own) once its answer is sent. How many showed a token, and how many
        none."""
        doomed = {conn for key, conns in self.by_credential.items() if key not in valid for conn in conns}
        tokenless = {conn for conn in self.by_credential.get(NO_TOKEN, ()) if NO_TOKEN not in valid}
        for conn in doomed:
            conn.revoked = True
            if conn is not spare:
                self.close(conn, "token_revoked")
        if spare is not None and spare in doomed:
            self._count("token_revoked")  # closed after its answer
            self._forget(spare)  # (busy: a later revocation finds nothing of it to close)
        if doomed:
            log.warning(
                logfmt(
                    msg="token revoked: closing its connections",
                    connections=len(doomed),
                    **({"without_token": len(tokenless)} if tokenless else {}),
                )
            )
        return len(doomed - tokenless), len(tokenless)

    def close(self, conn: Connection, reason: str) -> None:
        """Close a connection now, counted under ``reason``."""
        if self.open.get(conn.protocol) is not conn:
            return
        del self.open[conn.protocol]
        self._forget(conn)
        self._count(reason)
        if reason == "descriptors" and not self._short:
            self._short = True
            log.warning(
                logfmt(
                    msg="descriptors short: closing the longest-idle client connections",
                    allowed=self.allowed,
                    descriptors=self.limit,
                    reserve=self.reserve,
                )
            )
        loop = asyncio.get_running_loop()
        if reason == "keepalive":
            # Its last answer may still be on its way (a large one to a slow reader): it goes out whole
            # before the connection closes; one that is not taken within keepalive_s more is cut.
            conn.transport.close()
            loop.call_later(self.http.keepalive_s, self._cut, conn)
        elif conn.closer is not None and reason == "token_revoked":
            conn.closer()
            loop.call_later(REVOKE_GRACE_S, self._cut, conn)
        else:
            conn.transport.abort()

    @staticmethod
    def _cut(conn: Connection) -> None:
        """Abort a connection asked to close that has not gone yet (asyncio's own transports raise on an
        abort after their end: a traceback in the journal for each keep-alive connection that closed)."""
        if not conn.lost:
            conn.transport.abort()

    def descriptors_exhausted(self, what: str) -> None:
        """The broker's own work found no descriptor free: counted, logged (once an episode, then in the
        summary), and FD_SHED_BATCH idle client connections closed so that its next try finds one."""
        self.metrics.inc("mgpumanager_descriptors_exhausted_total")
        if not self._exhausted:
            self._exhausted = True
            log.warning(
                logfmt(
                    msg="out of file descriptors", what=what, clients=len(self.open), descriptors=self.limit
                )
            )
        self._count("exhausted", closed=False)
        for conn in list(itertools.islice(self.idle, FD_SHED_BATCH)):
            self.close(conn, "descriptors")

    def connector(self) -> aiohttp.TCPConnector:
        """For the broker's client sessions (no pool limit): a connection to a consumer that failed for want
        of a descriptor is the broker's shortage (see descriptors_exhausted), whoever made it."""
        return _CountingConnector(self.descriptors_exhausted, limit=0)

    def close_all(self) -> None:
        """On shutdown: stop watching (aiohttp closes the connections themselves); the last summary."""
        for conn in self.open.values():
            if conn.timer is not None:
                conn.timer.cancel()
        if self._log_due is not None:
            self._log_due.cancel()
            self._log_closed()

    def _watch(self, conn: Connection, delay: float, reason: str) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer = asyncio.get_running_loop().call_later(delay, self._expire, conn, reason)

    def _expire(self, conn: Connection, reason: str) -> None:
        conn.timer = None
        if conn.busy or self.open.get(conn.protocol) is not conn:
            return
        self.close(conn, reason)

    def _forget(self, conn: Connection) -> None:
        """Drop what is known of a connection: its deadline, its place among the idle, its credentials."""
        self.idle.pop(conn, None)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._drop_credentials(conn)

    def _drop_credentials(self, conn: Connection) -> None:
        for key in conn.credentials:
            conns = self.by_credential.get(key)
            if conns is not None:
                conns.discard(conn)
                if not conns:
                    del self.by_credential[key]
        conn.credentials = set()

    def _count(self, reason: str, *, closed: bool = True) -> None:
        """Count a close (or, not ``closed``, an exhaustion) and sum them up in the log CLOSED_LOG_S on."""
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        if closed:
            self.closed[reason] = self.closed.get(reason, 0) + 1
            self.metrics.inc("mgpumanager_connections_closed_total", reason=reason)
        if self._log_due is None:
            self._log_due = asyncio.get_running_loop().call_later(CLOSED_LOG_S, self._log_closed)

    def _log_closed(self) -> None:
        """One line for the closes since the last: a warning for header timeouts and shortages, the routine
        keep-alive ends at debug level. The shortage episode ends with a quiet period."""
        self._log_due = None
        closed, self._unlogged = self._unlogged, {}
        self._short = self._short and "descriptors" in closed
        self._exhausted = self._exhausted and "exhausted" in closed
        if not closed:
            return
        worrying = not closed.keys() <= {"keepalive", "token_revoked"}
        level = logging.WARNING if worrying else logging.INFO if "token_revoked" in closed else logging.DEBUG
        log.log(level, logfmt(msg="client connections closed", **closed, open=len(self.open)))


class ListenerSite(web.BaseSite):
    """A TCP listener of the broker's (its own port, a consumer's) whose client connections
    ClientConnections watches: aiohttp's TCPSite, with each connection's protocol wrapped."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, connections: ClientConnections, listener: str
    ) -> None:
        super().__init__(runner, backlog=listen_backlog(descriptor_limit()))
        self.app_runner = runner
        self.host, self.requested_port = host, port
        self.connections, self.listener = connections, listener

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def port(self) -> int:
        """The port bound (the one asked for until it listens)."""
        sockets = self._server.sockets if self._server is not None else None  # type: ignore[attr-defined]
        return sockets[0].getsockname()[1] if sockets else self.requested_port

    async def start(self) -> None:
        await super().start()
        server = self.app_runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            functools.partial(self.connections.protocol, server),
            self.host,
            self.requested_port,
            backlog=self._backlog,
        )
        bound = [s.getsockname()[:2] for s in self._server.sockets]  # type: ignore[attr-defined]
        self.connections.listening[self] = (self.listener, bound)

    async def stop(self) -> None:
        self.connections.listening.pop(self, None)
        await super().stop()


#: What a consumer's answer head may hold: a header line, a header (aiohttp's 8190 bytes each turned a
#: big Set-Cookie into 502 consumer_unreachable, and the consumer into an unhealthy one), and headers
#: (where aiohttp can be told: its default is 128); 16 MiB a head at the most.
ANSWER_HEAD_LIMITS: dict[str, int] = {"max_line_size": 64 * 1024, "max_field_size": 64 * 1024} | (
    {"max_headers": 256}
    if "max_headers" in inspect.signature(aiohttp.ClientSession.__init__).parameters
    else {}
)


def make_runner(app: web.Application) -> web.AppRunner:
    """How each of the broker's apps is run: handlers cancelled when their client leaves, no access log,
    SHUTDOWN_GRACE_S for what is still answering at shutdown, request bodies as they came."""
    return web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        auto_decompress=False,  # (a gzip body goes on as it came, with its Content-Encoding)
    )


class ListenError(BrokerError):
    """A port the config names cannot be listened on (bad_config)."""

    def __init__(self, message: str):
        super().__init__("bad_config", message)


class ConsumerPorts:
    """The consumers' own ports (``listen``): a small app and runner each, serving the consumer's API at the
    root path through the broker it shares with the main app."""

    def __init__(self) -> None:
        #: name -> (its ``listen`` as configured, the runner serving it, its site).
        self.open: dict[str, tuple[tuple[str, int], web.AppRunner, ListenerSite]] = {}
        self._lock = asyncio.Lock()
        #: Closing them all, once shutdown's drain is over (``start_closing``).
        self._closing: asyncio.Future[None] | None = None

    def websockets(self) -> list[ProxiedWebSocket]:
        """The WebSockets open through every consumer's port (each port's app keeps its own)."""
        return [p for _, runner, _ in self.open.values() for p in runner.app[WEBSOCKETS]]

    def address(self, name: str) -> str | None:
        """HOST:PORT where consumer ``name``'s port listens (the port bound, when 0 was asked), or None."""
        entry = self.open.get(name)
        if entry is None or not entry[1].addresses:
            return None
        (host, _), runner, _ = entry
        return f"[{host}]:{runner.addresses[0][1]}" if ":" in host else f"{host}:{runner.addresses[0][1]}"

    async def sync(self, broker: Broker, *, strict: bool) -> list[str]:
        """Listen on each consumer's ``listen`` and on nothing else, closing ports removed or moved first;
        what changed. A port that cannot listen raises ListenError when ``strict`` (start-up), else it is
        logged and reported (a reload)."""
        changes = []
        async with self._lock:
            wanted = {name: c.listen for name, c in broker.config.consumers.items() if c.listen is not None}
            for name in list(self.open):
                if wanted.get(name) != self.open[name][0]:
                    address = self.address(name)
                    await self._close(name)
                    changes.append(f"{name} no longer listens on {address}")
                    log.info(logfmt(msg="consumer port closed", consumer=name, listen=address))
            for name, (host, port) in wanted.items():
                if name in self.open or broker.stopping:  # (none opens while the broker stops)
                    continue
                try:
                    await self._open(broker, name, host, port)
                except OSError as e:
                    message = f"cannot listen on {host}:{port} for {name}: {e.strerror or e}"
                    if strict:
                        raise ListenError(message) from e
                    log.error(
                        logfmt(msg="cannot listen", consumer=name, listen=f"{host}:{port}", error=str(e))
                    )
                    changes.append(message)
                    continue
                changes.append(f"{name} listens on {self.address(name)}")
                log.info(logfmt(msg="listening", consumer=name, listen=self.address(name)))
        return changes

    async def _open(self, broker: Broker, name: str, host: str, port: int) -> None:
        app = web.Application(middlewares=[front_door])
        app[BROKER], app[PORT_CONSUMER], app[PUBLIC_PATHS] = broker, name, frozenset()
        app[WEBSOCKETS] = set()  # its own: closed with the port
        app.on_response_prepare.append(_answer_prepared)
        app.router.add_route("*", "/{path:[\\s\\S]*}", handle_consumer_port, expect_handler=expect_body)
        runner = make_runner(app)
        await runner.setup()
        site = ListenerSite(runner, host, port, broker.connections, name)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.open[name] = ((host, port), runner, site)
        if broker.stopping:  # (shutdown began while it opened: its ``stop_listening`` did not see it)
            with contextlib.suppress(RuntimeError):
                await site.stop()

    async def stop_listening(self) -> None:
        """Refuse new connections on every consumer port (shutting down); open ones are served on."""
        for _, _, site in self.open.values():
            with contextlib.suppress(RuntimeError):  # stopped already
                await site.stop()

    def start_closing(self) -> None:
        """Close every consumer's port, together (after a sync under way): open answers get
        SHUTDOWN_GRACE_S, every port's at the same time (one port after another, two would take a full
        drain past the unit's TimeoutStopSec); ``close`` waits for it."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close_all())

    async def close(self) -> None:
        """Close every consumer's port (``start_closing``, if shutdown has not begun it) and wait for it."""
        self.start_closing()
        assert self._closing is not None
        await self._closing

    async def _close_all(self) -> None:
        async with self._lock:
            closed = await asyncio.gather(*map(self._close, list(self.open)), return_exceptions=True)
        for outcome in closed:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _close(self, name: str) -> None:
        """Close a port: its WebSockets at once (going away: they never end by themselves, and cut at the
        end of the grace their relay left the consumer's side open), its other answers get the grace."""
        runner = self.open.pop(name)[1]
        going_away(runner.app[WEBSOCKETS])
        await runner.cleanup()


CONFIG = web.AppKey("config", Config)
SOURCE: web.AppKey[ConfigSource | None] = web.AppKey("source")
BROKER = web.AppKey("broker", Broker)
#: On a consumer's own port's app: that consumer's name.
PORT_CONSUMER = web.AppKey("port_consumer", str)
#: Paths served without the bearer token: the main app's BROKER_PUBLIC_PATHS; none on a consumer's port (its
#: / is the consumer's).
PUBLIC_PATHS = web.AppKey("public_paths", frozenset)
#: The broker's own paths that need no token: its health, its static page and the page's icon.
BROKER_PUBLIC_PATHS = frozenset({"/healthz", "/", "/favicon.ico"})
#: HTTP statuses aiohttp raises on its own, beside 404 and 405 (no_route) -> our error codes.
HTTP_ERROR_CODES = {413: "payload_too_large"}


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


#: The request's X-Request-ID (the client's, or one made up): logged, forwarded and returned.
REQUEST_ID: Any = (
    web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "mgpumanager.request_id"
)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
#: Who the request came from, as its token says (``check_token``).
CALLER: Any = web.RequestKey("caller", Caller) if hasattr(web, "RequestKey") else "mgpumanager.caller"
#: A request that showed no token, where none was needed (registered under NO_TOKEN).
ANYONE = Caller(None, False, NO_TOKEN)
#: A request on a public path (/healthz, the dashboard page): never registered, so a reload that requires a
#: token leaves its connection open.
PUBLIC = Caller(None, False)
#: Set once the request's answer began (its head was prepared): from then on no other answer can be sent.
ANSWER_BEGAN: Any = (
    web.RequestKey("answer_began", bool) if hasattr(web, "RequestKey") else "mgpumanager.answer_began"
)


@web.middleware
async def front_door(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request, once: its request id, the bearer token, its connection's state (busy while it is
    handled; the credential it came with), and the one path from an error to a response (every error the
    broker makes has the same JSON shape). One middleware, not three: each costs every job a little."""
    connections = request.app[BROKER].connections
    conn = connections.started(request)
    try:
        return await _front_door(request, handler, conn)
    finally:
        connections.ended(conn)


async def _front_door(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    conn: Connection | None,
) -> web.StreamResponse:
    request_id(request)
    try:
        check_target(request)
        caller = request[CALLER] = check_token(request)
        if caller.credential is not None:
            request.app[BROKER].connections.authenticated(conn, caller.credential)
        return await handler(request)
    except BrokerError as e:
        if request.get(ANSWER_BEGAN):  # (UpstreamBroke: cut already)
            return cut(request, e.status)
        response = error_response(e)
        if not request.content.is_eof():  # (refused before its body arrived whole: what comes is that body)
            response.force_close()
            request.app[BROKER].connections.refused_unread(request)
        return response
    except ConnectionResetError:
        # The client left (or was cut off) while its answer was written: nobody is there to answer. What is
        # returned is never sent; it is nginx's "client closed request", for whatever logs it.
        return web.Response(status=499)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if request.get(ANSWER_BEGAN):
            return cut(request, e.status)
        if e.status in (404, 405):  # (aiohttp's router: a target no route can take, as the last route's)
            allowed = [m.strip() for m in e.headers.get("Allow", "").split(",") if m.strip()]
            return error_response(no_route(request, allowed))
        return error_response(BrokerError(HTTP_ERROR_CODES.get(e.status, "bad_request"), e.reason))
    except Exception as e:
        request.app[BROKER].shared.internal_error("internal error", path=request.path)
        if request.get(ANSWER_BEGAN):
            return cut(request, 500)
        return error_response(BrokerError("scheduler_error", f"internal error: {describe(e)}"))


def request_id(request: web.BaseRequest) -> str:
    """The request's X-Request-ID: the client's (if sane), else one made up, once per request (an Expect
    header is answered before the front door, with the same one)."""
    found = request.get(REQUEST_ID)
    if found is None:
        given = request.headers.get("X-Request-ID", "")
        found = request[REQUEST_ID] = given if _REQUEST_ID_RE.match(given) else os.urandom(16).hex()
    return found


def cut(request: web.Request, status: int) -> web.Response:
    """A failure after the answer began cannot become an error response (aiohttp would write it inside the
    answer under way, and end it as if whole): the client's connection is cut, so it sees a truncated
    answer. What is returned is never sent (its status is the failure's, for whatever logs it)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=status)


def error_response(error: BrokerError) -> web.Response:
    """The one error shape: ``{error, message, consumer, retryable}``, its status, and ``Retry-After`` on a
    429 or 503."""
    headers = {"Retry-After": str(error.retry_after)} if error.status in (429, 503) else {}
    return web.json_response(error.body(), status=error.status, headers=headers | error.headers)


def check_target(request: web.Request) -> None:
    """A request target with a fragment is refused: no client sends one (RFC 9112 3.2), aiohttp routes without
    it while the raw target keeps it, and forwarding would drop it, so guards and consumer would disagree."""
    if "#" in request.raw_path:
        raise BrokerError("bad_request", "a request target must not carry a fragment ('#')")


def origin_form(request: web.BaseRequest) -> str:
    """The request's target as the client encoded it, in origin form (``/path?query``): an absolute-form
    target (``http://host:port/path?query``, which a server must accept: RFC 9112 3.2.2) less its scheme
    and authority. (aiohttp routes by its path; ``raw_path`` keeps the whole target.)"""
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    rest = raw.partition("://")[2]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    return "/" + rest[cut:].removeprefix("/")


def check_token(request: web.Request) -> Caller:
    """With auth.token or auth.clients set, every route but /healthz (and the static page at /, and its
    icon) needs a bearer token: the admin's or a client's, each compared in constant time (all of them,
    whichever matches). Who presents it (ANYONE when no token was needed, PUBLIC on a public path)."""
    auth = request.app[BROKER].config.auth
    if request.path in request.app.get(PUBLIC_PATHS, BROKER_PUBLIC_PATHS):
        return PUBLIC
    if not auth.required:
        return ANYONE
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    found = None
    for token, caller in auth.callers:
        if hmac.compare_digest(given_bytes, token) and found is None:
            found = caller
    if scheme.lower() != "bearer" or found is None:
        challenge = {"WWW-Authenticate": 'Bearer realm="mgpumanager"'}
        raise BrokerError(
            "unauthorized", "a valid Authorization: Bearer token is required", headers=challenge
        )
    return found


def client_of(request: web.Request) -> str | None:
    """The client (auth.clients) a request came from; None: the admin, or anyone where no token is needed."""
    return request.get(CALLER, ANYONE).client


def require_admin(request: web.Request) -> None:
    """Admin routes: with tokens, the admin's (a client's is forbidden); without, only clients on loopback,
    and of those no web page (the broker's own origin neither: a consumer's page is at it, through its
    mount; the dashboard calls none of them).

    Loopback is not enough where a browser runs: any page it shows may send a request to 127.0.0.1 that
    needs no preflight (a form's POST), and a name made to point at 127.0.0.1 makes a page's requests its
    own (DNS rebinding). A browser names the page in Origin on every POST and DELETE, and the name it asked
    in Host; a script sends no Origin. (With a token, a page cannot send it: the Authorization header needs
    a preflight, which the broker never allows.)"""
    auth = request.app[BROKER].config.auth
    if auth.required:
        caller = request.get(CALLER, ANYONE)
        if not caller.admin:
            raise BrokerError(
                "forbidden",
                f"{request.method} {request.path} is an admin route: it needs the admin's token (auth.token),"
                f" and this is {caller.who}'s, which runs jobs and reads status, events and metrics only",
            )
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
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host is not None and not own_host(request, host):
        raise BrokerError(
            "forbidden",
            f"admin routes answer only requests for the broker's own names unless auth.token is set: {host!r}"
            " is not one (a name made to point at this machine?)",
        )
    if origin is not None:  # (its own origin too: a consumer's page, through its mount, is at the broker's)
        raise BrokerError(
            "forbidden",
            f"admin routes refuse requests from web pages unless auth.token is set: {origin!r}",
        )


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
        broker.internal.not_to_restore(scheduler.index, name)
    else:
        job = await scheduler.load_now(name)
    state = broker.consumers.states.get(name)  # (None: a reload removed it meanwhile)
    body = {
        "consumer": name,
        "action": action,
        "loaded": None if state is None else state.resident,
        "evictions": job.evictions,
    }
    return web.json_response(body)


async def handle_reload(request: web.Request) -> web.Response:
    """POST /v1/reload: re-read the config; a bad one is refused whole and the old one stays."""
    require_admin(request)
    broker = request.app[BROKER]
    conn = broker.connections.of(request)
    try:
        changes = await broker.reloads.reload(spare=conn)
    except ConfigError as e:
        raise BrokerError("bad_config", "config refused, the old one stays: " + "; ".join(e.problems)) from e
    response = web.json_response({"reloaded": True, "changes": changes})
    if conn is not None and conn.revoked:
        response.force_close()  # it came with the token the reload replaced: the answer is its last
    return response


#: The longest a reservation may be asked for at once (a week; asking again extends it).
RESERVE_MAX_S = 7 * 24 * 3600.0
#: What a POST /v1/reserve body may hold.
RESERVE_KEYS = frozenset({"for_s", "reason", "gpu", "restore"})


def _reserved_gpu(broker: Broker, value: Any) -> int:
    """The GPU a reserve or release names (``gpu``: an integer), else the default one; bad_request for
    anything else (0.9 is no GPU, not GPU 0)."""
    if value is None:
        return broker.config.gpu.index
    if isinstance(value, bool) or not isinstance(value, int) or value not in broker.schedulers:
        known = ", ".join(map(str, sorted(broker.schedulers)))
        raise BrokerError("bad_request", f"no GPU {value!r} is scheduled here (GPUs: {known})")
    return value


async def handle_reserve(request: web.Request) -> web.Response:
    """POST /v1/reserve {"for_s": 3600, "reason": "gaming", "gpu": 0, "restore": true}: give a GPU to
    something else for a while (``restore``: its end loads again what it unloaded). Answered once every
    consumer on it was asked to unload, with what was unloaded and what not."""
    require_admin(request)
    broker = request.app[BROKER]
    body = parse_json(await read_body(request, broker, RESERVATION)) if request.body_exists else {}
    if not isinstance(body, dict):
        raise BrokerError("bad_request", 'the body must be a JSON object: {"for_s": 3600, "reason": "..."}')
    unknown = sorted(set(body) - RESERVE_KEYS)
    if unknown:  # a typo ("gpus": 1) would reserve another GPU than meant, or restore what was not to be
        taken = ", ".join(sorted(RESERVE_KEYS))
        raise BrokerError("bad_request", f"unknown key {unknown[0]!r}: a reservation takes {taken}")
    for_s, reason = body.get("for_s"), body.get("reason", "reserved")
    if isinstance(for_s, bool) or not isinstance(for_s, (int, float)) or not 0 < for_s <= RESERVE_MAX_S:
        raise BrokerError("bad_request", f"for_s must be a number of seconds, 0 < for_s <= {RESERVE_MAX_S:g}")
    if not isinstance(reason, str) or len(reason) > 200:
        raise BrokerError("bad_request", "reason must be a string of at most 200 characters")
    restore = body.get("restore", True)
    if not isinstance(restore, bool):
        raise BrokerError("bad_request", "restore must be true or false")
    index = _reserved_gpu(broker, body.get("gpu"))
    scheduler = broker.schedulers[index]
    res = await scheduler.reservations.reserve(float(for_s), reason or "reserved", restore=restore)
    return web.json_response({"gpu": index, **res.describe(scheduler.clock(), scheduler.shared.wall)})


async def handle_release(request: web.Request) -> web.Response:
    """DELETE /v1/reserve[?gpu=N]: end that GPU's reservation (every reserved GPU's, without ``gpu``), and
    cancel those still waiting for the lock (``cancelled``: the GPUs where one waited)."""
    require_admin(request)
    broker = request.app[BROKER]
    named: Any = request.query.get("gpu")
    if named is not None and named.isascii() and named.isdigit():  # ASCII digits alone: not ' 0' or '0_0'
        named = int(named)
    indexes = [_reserved_gpu(broker, named)] if named is not None else sorted(broker.schedulers)
    ended = [i for i in indexes if broker.schedulers[i].reservations.release("released")]
    cancelled = [i for i in indexes if broker.schedulers[i].reservations.cancel_waiting()]
    released = sorted({*ended, *cancelled})
    gpu = indexes[0] if len(indexes) == 1 else (released[0] if len(released) == 1 else None)
    answer = {"gpu": gpu, "released": bool(released), "gpus": released, "cancelled": cancelled}
    return web.json_response(answer)


async def read_body(request: web.Request, broker: Broker, consumer: str) -> bytearray:
    """The whole request body, read before the job is queued, so a slow upload never holds the GPU.

    One buffer, grown as bytes arrive (an announced Content-Length reserves nothing; a large body is still
    held once, never joined from pieces). The body must arrive within ``body_timeout_s`` (request_timeout),
    and all bodies being read at once may hold at most ``max_bodies_mib`` (too_many_requests).
    """
    cfg = broker.config.scheduler
    limit, budget = cfg.max_body_mib * MiB, cfg.max_bodies_mib * MiB
    length = request.content_length
    if length is not None and length > limit:
        message = f"request body of {length} bytes exceeds max_body_mib {cfg.max_body_mib}"
        raise BrokerError("payload_too_large", message, consumer)
    body = bytearray()

    def take(chunk: bytes) -> None:
        if len(body) + len(chunk) > limit:
            message = f"request body exceeds max_body_mib {cfg.max_body_mib}"
            raise BrokerError("payload_too_large", message, consumer)
        if broker.reading + len(chunk) > budget:
            broker.metrics.inc("mgpumanager_refused_total", consumer=consumer, limit="max_bodies_mib")
            log.warning(logfmt(msg="limit reached: body refused", consumer=consumer, limit="max_bodies_mib"))
            message = f"the bodies being read hold {cfg.max_bodies_mib} MiB already (max_bodies_mib)"
            raise BrokerError("too_many_requests", message, consumer)
        broker.reading += len(chunk)
        body.extend(chunk)

    async def fill() -> None:
        async for chunk in request.content.iter_any():
            take(chunk)

    try:
        if request.content.is_eof():
            if chunk := request.content.read_nowait():  # it came whole with its head (a small job's)
                take(chunk)
        else:
            # (It may go when descriptors run short; a broken chunk ends its body: _Watched.)
            broker.connections.waits_on_client(request, body=request.content)
            if not request.content.is_eof() and (broken := queued_parse_error(request.protocol)) is not None:
                request.content.set_exception(broken)
            await asyncio.wait_for(fill(), cfg.body_timeout_s)
    except asyncio.TimeoutError:
        raise BrokerError(
            "request_timeout", f"the request body did not arrive within body_timeout_s {cfg.body_timeout_s:g}"
        ) from None
    except (ConnectionResetError, HttpProcessingError, web.RequestPayloadError) as e:
        # The client left mid-body, or its chunked encoding broke: its fault, not a bug of the broker's. (How
        # a broken chunk comes depends on aiohttp's parser: its Python one wraps it in a RequestPayloadError.
        # Its message may quote the client's bytes: only its kind is said.)
        broken = e.__cause__ if isinstance(e, web.RequestPayloadError) and e.__cause__ is not None else e
        why = (
            "the client closed its connection"
            if isinstance(e, ConnectionResetError)
            else type(broken).__name__
        )
        raise BrokerError("bad_request", f"the request body did not arrive whole: {why}") from None
    finally:
        broker.reading -= len(body)
        broker.connections.waits_on_client(request, False)
    if length is not None and len(body) != length:
        raise BrokerError("bad_request", "request body ended before its Content-Length")
    return body


def refuse_early(request: web.Request) -> None:
    """What the request's route refuses whatever its body, as its handler's first checks do (it makes them
    too): asked before a ``100 Continue``, so that no client uploads a body to be refused after it."""
    handler, config = request.match_info.handler, request.app[BROKER].config
    if handler in (handle_reload, handle_reserve, handle_release, handle_admin_consumer):
        require_admin(request)
    elif handler is handle_job:
        route(config, request.match_info["kind"])
    elif handler in (handle_mount, handle_consumer_port):
        consumer, _, upstream_path = consumer_api_target(request, config)
        _refuse_own_routes(consumer, request.method, upstream_path)


async def expect_body(request: web.Request) -> web.StreamResponse | None:
    """An ``Expect`` header, on every route (aiohttp asks this before the front door): what would be refused
    anyway (a body over max_body_mib, a fragment, a missing token, a path or method with no route, what the
    route refuses whatever the body: ``refuse_early``) is answered before any ``100 Continue``, so the
    client never sends the body; an expectation other than ``100-continue`` is refused in the error shape
    (expectation_failed); the rest gets ``100 Continue`` as aiohttp would send it."""
    broker = request.app[BROKER]
    limit = broker.config.scheduler.max_body_mib
    expect = request.headers.get("Expect", "")
    request_id(request)  # (a refusal here is an answer too: it carries it)
    try:
        check_target(request)
        request[CALLER] = check_token(request)  # (whom ``refuse_early``'s require_admin asks after)
        if request.match_info.handler is handle_unrouted:  # (refused whatever the body)
            raise no_route(request, await allowed_methods(request))
        length = request.content_length
        if length is not None and length > limit * MiB:
            raise BrokerError(
                "payload_too_large", f"request body of {length} bytes exceeds max_body_mib {limit}"
            )
        if request.version == aiohttp.HttpVersion11 and expect.lower() != "100-continue":
            shown = json.dumps(expect[:100])  # (quoted: what the client sent, however odd)
            raise BrokerError("expectation_failed", f"unknown Expect: {shown} (only 100-continue is known)")
        refuse_early(request)
    except BrokerError as e:
        # No further request on this connection. A staged close (RFC 9112 9.6): the answer and a FIN go out,
        # and what the client still sends (a body it did not wait to send, as RFC 9110 10.1.1 lets it) is
        # read and dropped by aiohttp's lingering (10 s at most) until the client closes. (Closing at once,
        # with those bytes unread, made the kernel reset the connection, which destroyed the answer.)
        response = error_response(e)
        response.force_close()
        with contextlib.suppress(ConnectionResetError):  # (the client left already: nobody to answer)
            await response.prepare(request)
            await response.write_eof()
        request.app[BROKER].connections.refused_unread(request)
        if request.transport is not None and request.transport.can_write_eof():
            request.transport.write_eof()
        return response
    if request.version == aiohttp.HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # (as aiohttp's own handler: the answer has not begun)
    return None


async def handle_job(request: web.Request) -> web.StreamResponse:
    """POST /v1/{kind}: a GPU job for the consumer that routing.{kind} names."""
    broker = request.app[BROKER]
    kind = request.match_info["kind"]
    first = route(broker.config, kind)  # refuse early what cannot be served ...
    body = await read_body(request, broker, first)
    name = route(broker.config, kind)  # ... and route for real after the body: a reload may have come
    await broker.check_reachable(name)
    consumer = broker.config.consumers.get(name)
    if consumer is None or kind not in consumer.paths:  # a reload came while it was probed
        raise BrokerError("no_consumer", f"{name} no longer serves kind {kind!r}", name)
    lease = broker.scheduler_for(name).job(
        name, kind, request_id=request[REQUEST_ID], client=client_of(request)
    )
    async with lease as job:
        # (For the service it goes to: a reload while it waited may have sent it to another URL.)
        headers = request_headers(request, strip_auth=broker.config.auth.required, consumer=job.target)
        return await forward_job(request, broker, job, job.target.paths[kind], body, headers)


def configured(config: Config, name: str) -> ConsumerConfig:
    """Consumer ``name`` as the config has it now, or no_consumer (a reload removed it meanwhile)."""
    consumer = config.consumers.get(name)
    if consumer is None:
        raise BrokerError("no_consumer", f"{name} is no longer configured", name)
    return consumer


def route(config: Config, kind: str) -> str:
    """The consumer routed for ``kind``, or no_consumer."""
    name = config.routing.get(kind)
    if name is None or name not in config.consumers:
        raise BrokerError("no_consumer", f"no consumer is routed for kind {kind!r}")
    return name


async def allowed_methods(request: web.Request) -> list[str]:
    """The methods the routes at the request's path answer, the catch-alls (any method) aside: what a 405's
    ``Allow`` names, as aiohttp's own router would."""
    allowed: set[str] = set()
    for res in request.app.router.resources():
        allowed |= (await res.resolve(request))[1]
    return sorted(allowed - {"*"})


def no_route(request: web.BaseRequest, allowed: list[str]) -> BrokerError:
    """``not_found``, or ``method_not_allowed`` with ``Allow`` where other methods are ``allowed`` there."""
    if not allowed:
        return BrokerError("not_found", f"no route for {request.method} {request.path}")
    message = f"{request.method} is not allowed on {request.path}"
    return BrokerError("method_not_allowed", message, headers={"Allow": ", ".join(allowed)})


async def handle_unrouted(request: web.Request) -> web.StreamResponse:
    """Any other path or method, last of the routes (``GET /v1/tts`` too). (A route of its own, so that an
    Expect header is answered by expect_body there too: refused before any 100 Continue.)"""
    raise no_route(request, await allowed_methods(request))


async def handle_audio(request: web.Request) -> web.StreamResponse:
    """GET /audio/{file}: proxied to the audio_proxy consumer, unscheduled."""
    broker = request.app[BROKER]
    name = broker.config.audio_proxy
    if name is None:
        raise BrokerError("no_consumer", "no audio_proxy consumer is configured")
    path = audio_upstream_path(origin_form(request))
    await broker.check_reachable(name)
    consumer = configured(broker.config, name)  # (a reload while it was probed)
    await broker.ensure_running(consumer, request[REQUEST_ID], client_of(request))
    consumer = configured(broker.config, name)  # (a reload while it was started: a new url, say)
    with broker.unscheduled_slot(consumer):
        return await forward(request, broker, consumer, request.method, path, None)


def mounted(config: Config, name: str) -> ConsumerConfig:
    """The consumer mounted at ``/c/{name}/``, or no_consumer."""
    consumer = config.consumers.get(name)
    if consumer is None:
        raise BrokerError("no_consumer", f"no consumer named {name!r}")
    return consumer


async def handle_mount(request: web.Request) -> web.StreamResponse:
    """Any method on /c/{name}/{path}: the consumer's own API, its GPU work scheduled like /v1 jobs.

    GET, HEAD, OPTIONS and the consumer's ``unscheduled`` calls are forwarded at once; WebSocket upgrades
    are proxied both ways, unscheduled; every other request is a job of that consumer.
    """
    broker = request.app[BROKER]
    return await serve_consumer_api(request, broker, *consumer_api_target(request, broker.config))


async def handle_consumer_port(request: web.Request) -> web.StreamResponse:
    """Any method on any path of a consumer's own port (``listen``): its API at the root path, served
    exactly as its mount ``/c/{name}/`` serves it (the same path rules, scheduling, holds and refusals)."""
    broker = request.app[BROKER]
    return await serve_consumer_api(request, broker, *consumer_api_target(request, broker.config))


def consumer_api_target(request: web.Request, config: Config) -> tuple[ConsumerConfig, str, str]:
    """The consumer whose API a mount or a consumer's port serves, and the request's upstream path with the
    query as the client encoded it, and alone (``mount_upstream_path``); no_consumer, or bad_request."""
    if PORT_CONSUMER in request.app:  # (the mount's path rules, applied as if it came through the mount)
        name = request.app[PORT_CONSUMER]
        consumer = configured(config, name)
        return consumer, *mount_upstream_path(f"/c/{name}{origin_form(request)}", name, port=True)
    consumer = mounted(config, request.match_info["name"])
    return consumer, *mount_upstream_path(origin_form(request), consumer.name)


async def serve_consumer_api(
    request: web.Request, broker: Broker, consumer: ConsumerConfig, path_qs: str, upstream_path: str
) -> web.StreamResponse:
    """A request for a consumer's own API, at its upstream path with the query as the client encoded it,
    and that path alone as every guard matches it and it is forwarded: what a mount and a consumer's port
    do alike."""
    name = consumer.name
    method = request.method
    _refuse_own_routes(consumer, method, upstream_path)
    if method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
        if mount_job_path(consumer, method, upstream_path)[0] != MOUNT_KIND:
            # (A WebSocket is unscheduled; the GPU work at one of its paths must take the lock.)
            raise BrokerError(
                "bad_request",
                f"GET {upstream_path} is GPU work of {name} (one of its paths): no WebSocket there",
                name,
            )
        return await proxy_websocket(request, broker, consumer, path_qs)
    body = await read_body(request, broker, name) if request.body_exists else b""
    await broker.check_reachable(name)
    consumer = configured(broker.config, name)  # (a reload while the body was read or it was probed)
    kind, _ = mount_job_path(consumer, method, upstream_path)
    # (A HEAD to a GET job path is that GPU work to the service, which runs the GET for it: a job too, of
    # kind mount, forwarded as the HEAD it is.)
    read = method in UNSCHEDULED_METHODS and (
        method != "HEAD" or mount_job_path(consumer, get_of(method), upstream_path)[0] == MOUNT_KIND
    )
    if kind == MOUNT_KIND and (read or any(u.matches(method, upstream_path) for u in consumer.unscheduled)):
        await broker.ensure_running(consumer, request[REQUEST_ID], client_of(request))
        consumer = configured(broker.config, name)  # (a reload while it was started: a new url, say)
        with broker.unscheduled_slot(consumer):
            return await forward(request, broker, consumer, method, path_qs, body or None)
    lease = broker.scheduler_for(name).job(
        name, kind, request_id=request[REQUEST_ID], client=client_of(request)
    )
    async with lease as job:
        # The config it was admitted with; or, when a reload gave the consumer another URL before its
        # request was made, the new one's, which must take this request as the old one did (its own routes
        # refused, the same kind), and gets the headers of its own origin.
        headers = request_headers(request, strip_auth=broker.config.auth.required, consumer=job.target)
        found, path = mount_job_path(job.target, method, upstream_path)
        if job.target is not consumer:
            _refuse_own_routes(job.target, method, upstream_path)
            if found != job.kind:
                why = f"takes {method} {upstream_path} otherwise at its new url (a reload): send it again"
                raise BrokerError("no_consumer", f"{name} {why}", name)
        # The path the guards matched goes to the consumer (not the entry's spelling), with the query.
        return await forward_job(request, broker, job, replace(path, path=upstream_path), body, headers)


def _refuse_own_routes(consumer: ConsumerConfig, method: str, path: str) -> None:
    """The consumer's unload and load routes are the broker's to call: through the mount they would
    change residency behind its back. forbidden, pointing at the admin routes; unless the request is also
    one of its ``paths`` (Ollama's POST /api/generate, its for_each unload when it carries keep_alive 0):
    then it is that kind's job, after which its residency is in doubt (``Scheduler.finish``); a HEAD to
    such a GET path, a job of kind mount."""
    action = own_route(consumer, method, path)
    if action is not None and mount_job_path(consumer, get_of(method), path)[0] == MOUNT_KIND:
        raise BrokerError(
            "forbidden",
            f"{method} {path} is {consumer.name}'s {action} route: use POST /v1/consumers/"
            f"{consumer.name}/{action}, which goes through the GPU lock",
            consumer.name,
        )


def get_of(method: str) -> str:
    """The method a server runs for ``method``: HEAD is GET to most (aiohttp's add_get, Starlette, Flask
    run the GET handler and drop the body), so a guard on a GET route holds for a HEAD to it."""
    return "GET" if method == "HEAD" else method


def own_route(consumer: ConsumerConfig, method: str, path: str) -> str | None:
    """Which of the consumer's own routes a request is ("unload", "load") or None: its method (a HEAD is
    the GET: ``get_of``), and its path as ``guard_key`` compares (any letter case, encoding, a trailing
    '/'). Whatever the query: a route
    configured with one (vLLM's /sleep?level=1) is the route with any other or none (/sleep?level=2 frees
    memory too). A for_each route's ``{field}`` stands for any text, '/' included (speaches takes
    DELETE /api/ps/Systran/faster-whisper-small, which the broker itself sends as one encoded segment)."""
    key = guard_key(path)
    for action, route in (("unload", consumer.unload), ("load", consumer.load)):
        if (
            isinstance(route, Route)
            and route.method in (method, get_of(method))
            and _route_pattern(route.path, route.for_each is not None).fullmatch(key)
        ):
            return action
    return None


@functools.lru_cache(maxsize=256)
def _route_pattern(path: str, placeholders: bool) -> re.Pattern[str]:
    """A configured route's path as guard_key reads a request's (without its query), as a pattern."""
    key = guard_key(path.partition("?")[0])
    if not placeholders:
        return re.compile(re.escape(key))
    parts = PLACEHOLDER.split(key)  # text, field name, text, ...
    return re.compile("".join(".+" if i % 2 else re.escape(part) for i, part in enumerate(parts)))


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
    await broker.check_reachable(consumer.name)
    await broker.ensure_running(consumer, request[REQUEST_ID], client_of(request))
    with broker.unscheduled_slot(consumer, websocket=True):
        return await _proxy_websocket(request, broker, consumer, path_qs)


async def _proxy_websocket(
    request: web.Request, broker: Broker, consumer: ConsumerConfig, path_qs: str
) -> web.StreamResponse:
    """The WebSocket's both sides, from the consumer's handshake to the end of the relay."""
    metrics = broker.scheduler_for(consumer.name).metrics
    headers = request_headers(request, strip_auth=broker.config.auth.required, consumer=consumer)
    # A message is held whole once it arrived: as large as max_ws_message_mib at most, either way. (aiohttp
    # refuses a message of max_msg_size bytes itself: one of exactly the limit passes.)
    max_size = broker.config.scheduler.max_ws_message_mib * MiB + 1
    try:
        upstream = await open_websocket(
            broker.session, consumer, path_qs, headers, websocket_protocols(request), max_size
        )
    except BrokerError as e:
        metrics.inc("mgpumanager_websocket_failures_total", consumer=consumer.name)
        log.warning(logfmt(msg="websocket refused", consumer=consumer.name, error=e.message))
        if e.code == "consumer_unreachable" and not isinstance(e.__cause__, aiohttp.WSServerHandshakeError):
            reason = describe(e.__cause__ or e)
            broker.consumers.job_failed(consumer.name, e.__cause__, reason, called=consumer)
        raise
    try:
        client = ClientWebSocket(
            request,
            protocols=[upstream.protocol] if upstream.protocol else (),
            max_msg_size=max_size,
            heartbeat=WEBSOCKET_HEARTBEAT_S,
            timeout=WEBSOCKET_CLOSE_S,
            # No permessage-deflate with clients: a 60 KB message would inflate to 60 MiB in the broker's
            # memory. A client that compresses anyway breaks the protocol (closed, 1002).
            compress=False,
        )
        conn = broker.connections.upgraded(request, max_size)
        await client.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    metrics.inc("mgpumanager_websockets_total", consumer=consumer.name)
    proxied = ProxiedWebSocket(client, upstream, consumer.name, metrics, consumer, conn)
    broker.connections.closer(request, proxied.revoked)
    sockets = request.app[WEBSOCKETS]
    sockets.add(proxied)
    # (Overtaken in its handshake: a reload removed or replaced its consumer or closed its port; shutdown.)
    port = request.app.get(PORT_CONSUMER)
    entry = broker.ports.open.get(port) if port is not None else None
    port_closed = port is not None and (entry is None or entry[1].app is not request.app)
    if not same_service(broker.config, consumer) or port_closed or broker.stopping:
        going_away([proxied])
    try:
        await proxied.relay()
    finally:
        sockets.discard(proxied)
    return client


async def _stop_listening(app: web.Application) -> None:
    """On shutdown, first: no reload applies from now on, and the consumers' ports stop accepting
    connections, as the broker's own port does."""
    broker = app[BROKER]
    broker.stopping = True
    broker.connections.close_refused()
    await broker.ports.stop_listening()


async def _close_consumer_ports(app: web.Application) -> None:
    """On shutdown, once the drain is over: the consumers' ports close while the broker's own port gives
    what is still answering its grace, so that both graces run at once."""
    app[BROKER].connections.close_refused()  # (refused during the drain)
    app[BROKER].ports.start_closing()


async def _close_websockets(app: web.Application) -> None:
    """On shutdown: close the open WebSockets of mounts and consumer ports (going away), so that none keeps
    the broker up."""
    closed = going_away(app[BROKER].open_websockets())
    if closed:
        log.info(logfmt(msg="shutting down: closing websockets", websockets=closed))


@dataclass(frozen=True)
class StatusProcesses:
    """A reading's process list in /v1/status, written out by ``status_text`` (off the event loop: it may
    list 20,000 processes)."""

    reading: GpuReading

    def rows(self) -> list[dict[str, Any]]:
        """Each process with the consumer it belongs to (null: nobody claims it)."""
        owners = self.reading.owners
        return [
            {"pid": p.pid, "name": p.name, "used_mib": p.used_mib, "consumer": owners.get(p.pid or -1)}
            for p in self.reading.processes
        ]


def status_text(body: dict[str, Any]) -> str:
    """/v1/status's body as sent; run in a worker thread (it holds the GPUs' process lists)."""

    def expand(value: Any) -> Any:
        if isinstance(value, StatusProcesses):
            return value.rows()
        raise TypeError(f"{type(value).__name__} is not JSON")

    return json.dumps(body, indent=2, default=expand) + "\n"


async def _gpu_status(reader: GpuReader) -> dict[str, Any]:
    """One GPU for /v1/status, read at most once per STATUS_MAX_AGE_S however often it is asked; its
    processes each with the consumer it belongs to, as attributed with that reading."""
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
            "processes": StatusProcesses(r),
            "read_at": _iso(r.read_at),
            "reader": reader.reader,
            "error": None,
        }
    except GpuError as e:
        gpu = dict.fromkeys(
            ("name", "uuid", "total_mib", "used_mib", "free_mib", "utilization_pct", "temperature_c")
        )
        gpu.update(index=reader.index, processes=[], read_at=None, reader=reader.reader, error=str(e))
        return gpu


def scheduler_status(s: Scheduler) -> tuple[dict[str, Any], QueueSnapshot]:
    """A GPU's holder, stats and reservation as /v1/status shows them, and the copy of its queue to play
    forward for the queue's entries (``queue_entries``, a pure function: run off the loop), of one moment."""
    snap = queue_snapshot(s.lock, s.rooms, s.config)
    now = snap.now
    lock = s.lock
    res = s.reservations.reservation
    return {
        "holder": None
        if lock.holder is None
        else {
            "consumer": lock.holder,
            "jobs": s.running,
            "holds": lock.holds,
            "held_s": round(now - lock.held_since, 3),
            # Each slot taken: its job, and the client it runs for.
            "slots": [
                {"job": j.id, "kind": j.kind, "client": j.client, "hold": j.state == "ended"}
                for j in lock.taken
            ],
        },
        "stats": {**s.stats.__dict__, "running": s.running, "queued": len(lock.waiting)},
        "reservation": None if res is None else res.describe(now, s.shared.wall),
    }, snap


async def handle_status(request: web.Request) -> web.Response:
    """GET /v1/status: a live snapshot. ``gpu`` and ``scheduler`` are the default GPU's (gpu.index);
    ``gpus`` lists every GPU with its own reading, consumers and scheduler."""
    broker = request.app[BROKER]
    indexes: list[int] = []
    while indexes != sorted(broker.schedulers):  # (a reload that added a GPU meanwhile: read it too)
        indexes = sorted(broker.schedulers)
        readings = await asyncio.gather(*(_gpu_status(broker.gpus[i]) for i in indexes))
        parts = [scheduler_status(broker.schedulers[i]) for i in indexes]
        # The forecast plays the whole queue (10,000 jobs at most): off the loop, from the copy of now.
        queues = [await asyncio.to_thread(queue_entries, snap) for _, snap in parts]
    # The rest after the last wait, from the config in force now (a reload meanwhile may have removed a
    # consumer, and what the broker knew of it with it, or moved one to a GPU it added).
    cfg = broker.config
    gpus = []
    internal_errors = broker.internal_errors()
    for index, reading, (scheduler, _), queue in zip(indexes, readings, parts, queues, strict=True):
        s = broker.schedulers[index]
        scheduler["queue"] = queue
        scheduler["stats"]["internal_errors"] = internal_errors
        names = [name for name, c in cfg.consumers.items() if c.gpu == index]
        reservation = scheduler.pop("reservation")
        # (From the same reading: its listeners told the strangers' record before it was answered.)
        reading["unclaimed_mib"] = s.strangers.unclaimed_mib if reading["error"] is None else None
        reading["strangers"] = s.strangers.describe()
        gpus.append({**reading, "consumers": names, "reservation": reservation, "scheduler": scheduler})
    default = gpus[indexes.index(cfg.gpu.index)]
    consumers = {}
    for name, c in cfg.consumers.items():
        state = broker.consumers.states[name]
        consumers[name] = {
            "url": c.url,
            "kinds": list(c.paths),
            "healthy": state.healthy,
            "stopped": state.stopped,
            "loaded": state.resident,
            "vram_used_mib": state.used_mib,
            "vram_peak_mib": state.peak_mib,
            "last_probe": _iso(state.last_probe),
            "last_error": state.last_error,
            "last_used": None if state.last_used is None else _iso(broker.shared.wall.at(state.last_used)),
            "vram_resident_mib": c.vram_resident_mib,
            "vram_managed": c.vram_managed,
            "priority": c.priority,
            "can_coexist_with": sorted(c.can_coexist_with),
            "gpu": c.gpu,
            "timings": state.timings(),
            "preset": c.preset,
            "listen": broker.ports.address(name),
        }
    body = {
        "version": VERSION,
        "uptime_s": round(time.monotonic() - broker.started, 1),
        "gpu": {k: v for k, v in default.items() if k not in ("consumers", "scheduler")},
        "consumers": consumers,
        "scheduler": default["scheduler"],
        "gpus": gpus,
        "internal_errors": internal_errors,
        "state_file": broker.state.describe(),
        "clients": broker.clients(),
    }
    # Everything above is a snapshot of its own (and readings are immutable): the thread reads nothing
    # that changes meanwhile.
    text = await asyncio.to_thread(status_text, body)
    return web.Response(text=text, content_type="application/json")


async def _answer_prepared(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer's head, as it is prepared: it carries the request id, and the answer has begun."""
    request[ANSWER_BEGAN] = True
    if REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[REQUEST_ID]


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus' text format 0.0.4."""
    broker = request.app[BROKER]
    gauges: list[tuple[str, Labels, float]] = [
        ("mgpumanager_info", (("version", VERSION),), 1),
        ("mgpumanager_internal_errors_total", (), broker.internal_errors()),
        ("mgpumanager_client_connections", (), len(broker.connections.open)),
        ("mgpumanager_client_connections_limit", (), broker.connections.allowed),
        ("mgpumanager_state_write_failures_total", (), broker.state.failures),
        ("mgpumanager_event_subscribers_dropped_total", (), broker.events.dropped),
        ("mgpumanager_sd_notify_failures_total", (), broker.notifier.errors),
    ]
    for index, s in sorted(broker.schedulers.items()):
        snap = queue_snapshot(s.lock, s.rooms, s.config)
        gauges.append(("mgpumanager_queue_length", (("gpu", str(index)),), len(snap.waiting)))
        # The forecast plays the whole queue (10,000 jobs at most): off the loop, from the copy of now, as
        # /v1/status's (on the loop, 10,000 jobs held everything the broker serves for half a second).
        etas = [eta for _, eta in await asyncio.to_thread(expected_waits, snap)] if len(snap.waiting) else []
        gauges.append(("mgpumanager_queue_eta_seconds", (("gpu", str(index)),), max(etas, default=0.0)))
        gauges.append(("mgpumanager_running_jobs", (("gpu", str(index)),), s.running))
        gauges.append(("mgpumanager_gpu_reserved", (("gpu", str(index)),), int(s.reservation is not None)))
    indexes = sorted(broker.gpus)
    readings = await asyncio.gather(
        *(broker.gpus[i].read(max_age=STATUS_MAX_AGE_S) for i in indexes), return_exceptions=True
    )
    for index, r in zip(indexes, readings, strict=True):
        gpu: Labels = (("gpu", str(index)),)
        gauges.append(("mgpumanager_gpu_readings_total", gpu, broker.gpus[index].queries))
        gauges.append(("mgpumanager_gpu_reading_failures_total", gpu, broker.gpus[index].failures))
        if isinstance(r, GpuError):
            gauges.append(("mgpumanager_gpu_up", gpu, 0))
            continue
        if isinstance(r, BaseException):
            raise r
        gauges.append(("mgpumanager_gpu_up", gpu, 1))
        unclaimed = broker.schedulers[index].strangers.unclaimed_mib  # (of this reading: see handle_status)
        if unclaimed is not None:
            gauges.append(("mgpumanager_unclaimed_mib", gpu, unclaimed))
        for metric, mib in (("total", r.total_mib), ("used", r.used_mib), ("free", r.free_mib)):
            if mib is not None:
                gauges.append((f"mgpumanager_gpu_memory_{metric}_bytes", gpu, mib * MiB))
        if r.utilization_pct is not None:
            gauges.append(("mgpumanager_gpu_utilization_ratio", gpu, r.utilization_pct / 100))
    # After the readings: a consumer's measured memory is that of the reading just taken.
    for name in broker.config.consumers:
        state = broker.consumers.states[name]
        for metric, value in (
            ("healthy", state.healthy),
            ("stopped", state.stopped),
            ("resident", state.resident),
        ):
            gauges.append(
                (
                    f"mgpumanager_consumer_{metric}",
                    (("consumer", name),),
                    math.nan if value is None else value,
                )
            )
        for metric, mib in (("used", state.used_mib), ("peak", state.peak_mib)):
            if mib is not None:
                gauges.append((f"mgpumanager_consumer_vram_{metric}_bytes", (("consumer", name),), mib * MiB))
    body = broker.metrics.render(gauges).encode()
    headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Cache-Control": "no-store"}
    return web.Response(body=body, headers=headers)


def _since(request: web.Request) -> float | None:
    """The ``since`` query parameter of /v1/events: seconds of the past to replay (None: none asked)."""
    raw = request.query.get("since")
    if raw is None:
        return None
    try:
        since = float(raw)
    except ValueError:
        since = math.nan
    if not since >= 0 or math.isinf(since):
        raise BrokerError("bad_request", f"since must be a number of seconds, 0 or more, not {raw!r}")
    return since


async def handle_events(request: web.Request) -> web.StreamResponse:
    """GET /v1/events: server-sent events, one JSON object each, a heartbeat comment every 15 s.

    ``?since=SECONDS`` first replays the ring's events of the last SECONDS (at most EVENT_RING_S), then a
    ``: replayed N`` comment, then goes live: the past and the subscription are taken in one step.
    """
    broker = request.app[BROKER]
    events = broker.events
    since = _since(request)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    if request.method == "HEAD":  # the stream's head alone: a HEAD answer has no body to stream into
        await resp.prepare(request)
        await resp.write_eof()
        return resp
    broker.connections.waits_on_client(request)  # a reader, not a job: may go when descriptors run short
    queue, past = events.follow(since)
    try:
        await resp.prepare(request)
        await _to_reader(request, resp, b": mgpumanager events\n\n")
        if since is not None:
            piece = bytearray()
            for frame in past:
                if len(piece) + len(frame) > EVENT_REPLAY_PIECE:
                    await _to_reader(request, resp, bytes(piece))
                    queue.caught_up_at = events.clock()  # (it reads on: the replay is no falling behind)
                    piece.clear()
                piece += frame
            await _to_reader(request, resp, bytes(piece + f": replayed {len(past)}\n\n".encode()))
            queue.caught_up_at = events.clock()
            del past
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                queue.caught_up_at = events.clock()  # (nothing came: nothing to catch up with)
                await _to_reader(request, resp, b": heartbeat\n\n")
                continue
            taken = [first, *queue.take_all(events.clock())]  # (a burst: taken at once, written in pieces)
            piece = bytearray()
            for frame in taken:
                if frame is None:
                    break
                if piece and len(piece) + len(frame) > EVENT_REPLAY_PIECE:
                    await _to_reader(request, resp, bytes(piece))
                    piece.clear()
                piece += frame
            if piece:
                await _to_reader(request, resp, bytes(piece))
            if taken[-1] is None:
                break  # it fell behind: the client reconnects and reads /v1/status again
    except ConnectionResetError:
        pass  # the client left, or was cut off
    finally:
        events.unsubscribe(queue)
    return resp


async def _to_reader(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    """A write to an event stream's reader: one that accepts nothing for EVENT_STALL_S is cut off
    (ConnectionResetError), so a reader that never reads holds the broker's memory for so long at most."""
    transport = request.transport
    # (The head, small, goes with the first write; each chunk carries its framing.)
    if transport is not None and _fits_unpaused(transport, HEAD_EXTRA + CHUNK_FRAMING + len(data)):
        await resp.write(data)  # under the transport's high-water mark: this write cannot stall
        return
    try:
        await asyncio.wait_for(resp.write(data), EVENT_STALL_S)
    except asyncio.TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        log.warning(logfmt(msg="event reader stopped reading", timeout_s=EVENT_STALL_S))
        raise ConnectionResetError("event reader stopped reading") from None


async def handle_dashboard(request: web.Request) -> web.Response:
    """GET /: the live page. Static: what it shows comes from /v1/status and /v1/events."""
    return web.Response(text=DASHBOARD_HTML, content_type="text/html", headers={"Cache-Control": "no-cache"})


#: The broker's icon, a 16x16 PNG (a green dot, the dashboard's "ok"): browsers ask /favicon.ico of the
#: broker's root for its page and for every page served through a mount (ComfyUI's), which got a 404.
FAVICON_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000100000001008060000001ff3ff610000002b4944415478da63601894c0"
    "7e67c07f6c986c8d441b449101c46ac669c8a801543060e0d3015592f28000004eb11a74500ef7b50000000049454e44"
    "ae426082"
)


async def handle_favicon(request: web.Request) -> web.Response:
    """GET /favicon.ico: the broker's icon, public (a browser sends no token for it), cached for a day."""
    headers = {"Cache-Control": "public, max-age=86400"}
    return web.Response(body=FAVICON_PNG, content_type="image/png", headers=headers)


async def idle_within(s: Scheduler, timeout_s: float) -> bool:
    """Wait until no job or hold holds ``s``'s lock and the work it owns has ended (a released reservation's
    unloads go on), at most ``timeout_s``; whether it got there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        await asyncio.wait_for(s.lock.idle.wait(), timeout_s)
    except asyncio.TimeoutError:
        return False
    while pending := [t for t in s.tasks if not t.done()]:
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.wait(pending, timeout=left)
    return True


async def cut_what_runs(s: Scheduler) -> None:
    """Once the drain's wait is over, what still holds ``s``'s GPU, and the work it owns, are cut: each
    running job's request (the job ends cancelled; its client's connection closes), the holds, steps whose
    caller left, and a released reservation's unloads under way (a restart resumes it: it asks first)."""
    callers = [job.caller for job in s.lock.taken if job.state == "running" and job.caller is not None]
    what = f"shutting down: GPU {s.index}'s jobs, holds and steps"
    await cancel_until_done([*callers, *s.tasks], what)
    await cancel_until_done(list(s.tasks), what)  # (the hold a cut job started, its prompt sent)


async def _drain(app: web.Application) -> None:
    """On shutdown: refuse new jobs, answer queued ones, let running jobs, holds and the schedulers' own work
    finish (bounded), then cut what still runs."""
    broker = app[BROKER]
    for reload in broker.reloads.background:  # (cut if reading; one applying ends on its own, unwaited)
        reload.cancel()
    # Idle unloads and preloads first: nothing new starts (one running is cut short).
    await cancel_until_done(broker.tasks, "shutting down: background work")
    schedulers = list(broker.schedulers.values())
    for s in schedulers:
        s.reservations.release("shutdown")  # (kept in the state file: a restart holds the GPU again)
        s.lock.shut_down()
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
    idle = await asyncio.gather(*(idle_within(s, timeout) for s in schedulers))
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
    await asyncio.gather(*(cut_what_runs(s) for s in schedulers))
    # The event streams end last, with every end the drain saw: the refused jobs end in their tasks' next
    # turn, and their books (their end events) follow, as those of what finished meanwhile or was cut.
    await asyncio.sleep(0)
    await books_written()
    broker.events.close()


async def handle_healthz(request: web.Request) -> web.Response:
    """GET /healthz: the broker itself is up; touches no consumer and no GPU."""
    return web.Response(text="ok\n")


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Own every resource: the client session, the GPU reader, the health task, the scheduler's holds."""
    config = app[CONFIG]
    # No pool limit, so nothing ever waits for a free connection: what bounds the connections is each
    # consumer's max_concurrency (jobs), max_unscheduled and max_websockets.
    metrics = Metrics()
    connections = ClientConnections(config, metrics)
    # (A connection to a consumer refused for want of a descriptor is the broker's shortage: the connector
    # tells.)
    session = aiohttp.ClientSession(
        connector=connections.connector(),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIP_AUTO_HEADERS,  # (a WebSocket's handshake too: ws_connect takes no such flag)
        **ANSWER_HEAD_LIMITS,
    )
    # The broker's own calls (health probes, loads, unloads) on a session of their own: however busy the
    # consumers' traffic, a probe never queues behind it. Few: a probe per consumer per round, one load or
    # unload per GPU at a time.
    own = aiohttp.ClientSession(
        connector=connections.connector(),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        **ANSWER_HEAD_LIMITS,
    )
    broker = Broker(
        config,
        session=session,
        own_session=own,
        metrics=metrics,
        connections=connections,
        ports=ConsumerPorts(),
        source=app[SOURCE],
        websockets=app[WEBSOCKETS],
    )
    consumers = broker.consumers
    app[BROKER] = broker
    health: asyncio.Task[None] | None = None
    machine_names()  # looked up once, before serving (bounded): the Origin check compares Hosts with them
    try:
        # What the last run kept: a reservation in force holds its GPU again before any job comes.
        broker.resume(await broker.state.read())
        # The first health round completes before serving (bounded by health.timeout_s), so the first
        # jobs already know who is up and who reports itself loaded.
        await consumers.probe_all()
        await broker.ports.sync(broker, strict=True)
        health = asyncio.create_task(consumers.run_health(), name="health")
        broker.spawn(broker.internal.run_idle_unloads(), "idle unloads")
        broker.spawn(broker.yielding.run(), "yielding")
        broker.spawn(broker.state.run(), "state file")
        broker.internal.start_preloads()  # in the background: serving is not delayed
        yield
    finally:
        await broker.ports.close()  # (after a reload's apply under way, which ends then)
        await cancel_until_done(list(broker.reloads.background), "shutting down: reloads")
        if health is not None:
            await cancel_until_done([health], "shutting down: health rounds")
        await consumers.close()
        await cancel_until_done(list(broker.tasks), "shutting down: background work")
        for scheduler in broker.schedulers.values():
            await scheduler.close()
        for reader in broker.gpus.values():
            await reader.close()
        await broker.state.close()  # (a reservation shutdown ended is kept: a restart resumes it)
        await session.close()
        await own.close()
        connections.close_all()


def create_app(config: Config, source: ConfigSource | None = None) -> web.Application:
    """The production app; tests build theirs with this same factory. ``source`` enables reloads."""
    app = web.Application(middlewares=[front_door])
    app[CONFIG] = config
    app[SOURCE] = source
    app[WEBSOCKETS] = set()
    app.cleanup_ctx.append(_broker_ctx)
    app.on_shutdown.append(_stop_listening)
    app.on_shutdown.append(_close_websockets)
    app.on_shutdown.append(_drain)
    app.on_shutdown.append(_close_consumer_ports)
    app.on_response_prepare.append(_answer_prepared)
    # Every route answers an Expect header through expect_body (aiohttp's own would answer plain text).
    router, expect = app.router, {"expect_handler": expect_body}
    router.add_get("/", handle_dashboard, **expect)
    router.add_get("/healthz", handle_healthz, **expect)
    router.add_get("/favicon.ico", handle_favicon, **expect)
    router.add_get("/metrics", handle_metrics, **expect)
    router.add_get("/v1/status", handle_status, **expect)
    router.add_get("/v1/events", handle_events, **expect)
    router.add_post("/v1/reload", handle_reload, **expect)
    router.add_post("/v1/reserve", handle_reserve, **expect)
    router.add_delete("/v1/reserve", handle_release, **expect)
    router.add_post("/v1/consumers/{name}/{action:unload|load}", handle_admin_consumer, **expect)
    # A job is a POST to a kind; a reserved kind is a route of its own (or will be), never a job's.
    not_reserved = "".join(f"(?!{k}\\Z)" for k in sorted(RESERVED_KINDS))
    router.add_post(f"/v1/{{kind:{not_reserved}[^/]+}}", handle_job, **expect)
    router.add_get("/audio/{path:.+}", handle_audio, **expect)
    router.add_route("*", "/c/{name}", handle_mount, **expect)
    router.add_route("*", "/c/{name}/{path:.*}", handle_mount, **expect)
    router.add_route("*", "/{path:[\\s\\S]*}", handle_unrouted, **expect)  # ([\s\S]: a decoded %0A too)
    return app


#: The dashboard: one self-contained page (no file, no network beyond this broker). It reads /v1/status
#: and follows /v1/events; with auth.token set it asks for the token once and keeps it in the tab.
DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mgpumanager</title>
<style>
:root { --bg:#111418; --card:#1b2027; --fg:#e6e9ee; --dim:#8b95a3; --ok:#3fb950; --bad:#f85149;
        --free:#2b323c; --unknown:#5a6370; --label:6.5rem;
        --stranger:repeating-linear-gradient(135deg, #c2562a 0 5px, #7a3119 5px 10px); }
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
#queue-table td, #queue-table th { padding:.3rem .25rem; }
.ok { color:var(--ok); } .bad { color:var(--bad); } .dim { color:var(--dim); }
#holder { font-size:1.1rem; } .resv { color:#ffa198; font-size:.9rem; }
#stats { display:grid; grid-template-columns:repeat(auto-fill, minmax(110px,1fr)); gap:.4rem; }
#stats div { background:#232a33; border-radius:5px; padding:.35rem .5rem; }
#stats b { display:block; font-size:1.2rem; }
#log { font:12px/1.5 ui-monospace, monospace; max-height:14rem; overflow:auto; color:var(--dim);
       white-space:pre-wrap; }
#error { color:var(--bad); padding:0 1rem; }
#tl-zoom { float:right; margin-top:-.2rem; }
#tl-zoom button { background:#232a33; color:var(--fg); border:1px solid #2a313b; border-radius:4px;
                  font:inherit; font-size:.8rem; padding:.15rem .55rem; margin-left:.25rem; cursor:pointer; }
#tl-zoom button.on { background:#1f6feb; border-color:#1f6feb; }
.tl-gpu + .tl-gpu { margin-top:.7rem; }
.tl-rows { position:relative; }
.tl-row { position:relative; z-index:1; display:flex; height:22px; pointer-events:none; }
.tl-row + .tl-row { border-top:1px solid #262d36; }
.tl-label { flex:0 0 var(--label); font-size:.8rem; line-height:22px; color:var(--dim); overflow:hidden;
            text-overflow:ellipsis; white-space:nowrap; padding-right:.4rem; }
.tl-track { flex:1; position:relative; }
.tl-span { position:absolute; top:3px; bottom:3px; min-width:3px; border-radius:2px; pointer-events:auto;
           cursor:pointer; }
.tl-wait { top:10px; bottom:10px; opacity:.55; }
.tl-hold { background-image:repeating-linear-gradient(135deg, rgba(0,0,0,.5) 0 3px, transparent 3px 6px); }
.tl-unload, .tl-load { top:auto; bottom:1px; height:6px; border-radius:1px; }
.tl-unload { background:#f0883e; } .tl-load { background:#56d364; }
.tl-bad { box-shadow:0 0 0 2px var(--bad); }
.tl-stranger { background:var(--stranger); opacity:.8; }
.tl-q { position:absolute; bottom:1px; top:auto; border-radius:0; background:#6e7681; min-width:1px; }
.tl-over { position:absolute; z-index:0; top:0; bottom:0; left:var(--label); right:0; }
.tl-resv { position:absolute; top:0; bottom:0; min-width:3px; background:rgba(248,81,73,.14);
           border:1px dashed rgba(248,81,73,.75); cursor:pointer; font-size:.7rem; color:#ffa198;
           overflow:hidden; white-space:nowrap; padding:0 3px; }
.tl-axis { position:relative; height:1.1rem; margin-left:var(--label); font-size:.7rem; color:var(--dim); }
.tl-axis span { position:absolute; top:.1rem; transform:translateX(-50%); white-space:nowrap; }
.tl-head { font-size:.85rem; margin-bottom:.2rem; }
#tl-legend i.stripe { background-image:repeating-linear-gradient(135deg, rgba(0,0,0,.5) 0 2px,
                      transparent 2px 4px); }
#tip { position:fixed; z-index:10; max-width:22rem; background:#0d1117; border:1px solid #3d444d;
       border-radius:6px; padding:.4rem .6rem; font-size:.8rem; white-space:pre-line; pointer-events:none;
       box-shadow:0 4px 14px rgba(0,0,0,.5); }
@media (max-width:500px) { :root { --label:4.5rem; } main { padding:0 .5rem .5rem; } }
</style></head>
<body>
<header><h1>mgpumanager</h1><span id="gpu-name"></span><span id="updated"></span></header>
<div id="error"></div>
<main>
<section class="wide"><h2>GPU memory</h2><div id="gpus"></div></section>
<section class="wide"><div id="tl-zoom"></div><h2>Timeline</h2><div id="timeline"></div>
<div class="legend" id="tl-legend"><span><i style="background:#58a6ff"></i>job</span>
<span><i class="stripe" style="background-color:#58a6ff"></i>held after answering</span>
<span><i style="background:#58a6ff;opacity:.55;height:.25em"></i>waiting</span>
<span><i style="background:#f0883e;height:.4em"></i>unload</span>
<span><i style="background:#56d364;height:.4em"></i>load</span>
<span><i style="background:rgba(248,81,73,.3);border:1px dashed #f85149"></i>reserved</span>
<span><i style="background:var(--stranger)"></i>stranger (memory no consumer claims)</span>
<span><i style="background:#6e7681"></i>queue depth</span></div></section>
<section><h2>Holder</h2><div id="holder">-</div><h2 style="margin-top:.8rem">Queue</h2>
<table id="queue-table"><thead id="queue-head"></thead>
<tbody id="queue"></tbody></table></section>
<section><h2>Counters</h2><div id="stats"></div></section>
<section class="wide"><h2>Consumers</h2><table><thead><tr><th>name</th><th>health</th><th>resident</th>
<th>kinds</th><th>VRAM</th><th>last use</th></tr></thead><tbody id="consumers"></tbody></table></section>
<section class="wide"><h2>Events</h2><div id="log"></div></section>
</main>
<div id="tip" hidden></div>
<script>
"use strict";
const COLORS = ["#58a6ff", "#bc8cff", "#3fb950", "#d29922", "#f778ba", "#39c5cf", "#ff7b72", "#a5d6ff"];
const $ = (id) => document.getElementById(id);
const ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"};
const esc = (v) => String(v ?? "").replace(/[&<>"]/g, (c) => ENTITIES[c]);
let token = sessionStorage.getItem("mgpumanager-token") || "";
const auth = () => (token ? {Authorization: "Bearer " + token} : {});
// What the timeline draws from: the events of the last 15 minutes (the broker replays them on connect),
// the last status (which consumer is on which GPU), and the broker's clock against this one.
const SPAN_S = 900;
let events = [], logLines = [], status = null, skew = 0, windowS = SPAN_S, tips = [];

function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, (Date.now() + skew - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s ago";
  return s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
}
function yesno(v, yes, no) {
  if (v === null || v === undefined) return '<span class="dim">unknown</span>';
  return v ? '<span class="ok">' + yes + "</span>" : '<span class="bad">' + no + "</span>";
}
async function get(path, signal) {
  const sent = token;
  const resp = await fetch(path, {headers: auth(), cache: "no-store", signal});
  if (resp.status === 401) {
    // One prompt for all: a request sent before the token was given tries that token, never asks again.
    if (token === sent) askToken();
    if (token !== sent) return get(path, signal);  // (a token given meanwhile, or now: tried)
    throw new Error("unauthorized");
  }
  // The broker's Date (to the second) against this device's clock: only a real difference counts.
  const date = Date.parse(resp.headers.get("Date") || "");
  if (Number.isFinite(date)) { const d = date + 500 - Date.now(); skew = Math.abs(d) > 1500 ? d : 0; }
  return resp;
}
let declined = false;
function askToken() {
  if (declined) return;  // cancelled: asked again on the next load of the page, not every second
  const given = prompt("This broker needs its bearer token (auth.token):");
  if (given) { token = given.trim(); sessionStorage.setItem("mgpumanager-token", token); }
  else declined = true;
}
const isNum = (v) => typeof v === "number";
const colorOf = (st, name) => {
  const i = st ? Object.keys(st.consumers).indexOf(name) : -1;
  return i < 0 ? "var(--unknown)" : COLORS[i % COLORS.length];
};
const gpusOf = (st) => st.gpus || [Object.assign({scheduler: st.scheduler}, st.gpu)];

function memoryParts(st, gpu) {
  // Measured memory (vram_used_mib) where the broker has it, else the declared size of resident ones.
  const parts = [];
  let attributed = 0;
  Object.keys(st.consumers).forEach((name, i) => {
    const c = st.consumers[name];
    if ((c.gpu ?? gpu.index) !== gpu.index) return;
    const measured = isNum(c.vram_used_mib);
    const mib = measured ? c.vram_used_mib : c.loaded ? c.vram_resident_mib : 0;
    if (!mib) return;
    parts.push({label: name, mib, measured, color: COLORS[i % COLORS.length]});
    attributed += mib;
  });
  // Memory no consumer claims (a game's, a training run's): its own segment, a stranger's while present.
  const unclaimed = isNum(gpu.unclaimed_mib) ? gpu.unclaimed_mib : 0;
  if (unclaimed > 0) {
    const s = gpu.strangers, present = !!(s && s.present);
    const procs = !s ? [] : s.processes.map((p) => "pid " + p.pid + " " + oneLine(p.name) + " " + p.used_mib +
      " MiB");
    if (s && s.more_processes > 0) procs.push("and " + s.more_processes + " more");
    parts.push({label: present ? "stranger" : "unclaimed", mib: unclaimed, color: "var(--stranger)",
                stranger: present, title: procs.length ? procs.join(", ") : "no process listed"});
  }
  if (gpu.free_mib !== null) {
    const other = Math.max(0, gpu.total_mib - gpu.free_mib - attributed - unclaimed);
    parts.push({label: "other / unknown", mib: other, color: "var(--unknown)"});
    parts.push({label: "free", mib: gpu.free_mib, color: "var(--free)"});
  }
  return parts;
}
function gpuHtml(st, gpu, titled) {
  // A reading can be a second older than the residency it is drawn with: scale so the bar never overflows.
  const parts = memoryParts(st, gpu);
  const total = Math.max(gpu.total_mib || 1, parts.reduce((sum, p) => sum + p.mib, 0));
  const how = (p) => (p.title ? ": " + p.title : p.measured === undefined ? "" : p.measured ? " (measured)"
    : " (declared)");
  return '<div class="gpu">' + (titled ? "<h3>GPU " + gpu.index + " " + esc(gpu.name || "") + "</h3>" : "") +
    '<div class="bar">' + parts.map((p) => '<div data-part="' + esc(p.label) + '" title="' + esc(p.label) +
    " " + p.mib + " MiB" + esc(how(p)) + '" style="width:' + (100 * p.mib / total).toFixed(2) +
    "%;background:" + p.color + '"></div>').join("") +
    '</div><div class="legend">' + parts.map((p) => '<span title="' + esc(how(p).trim()) +
    '"><i style="background:' + p.color + '"></i>' + esc(p.label) + " " + p.mib + " MiB</span>").join("") +
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
  const clients = [...new Set((h?.slots || []).map((s) => s.client).filter((c) => c !== null))].sort();
  return !h ? '<span class="dim">idle</span>' : "<b>" + esc(h.consumer) + "</b> " + h.jobs + " job(s)" +
    (h.holds ? ", " + h.holds + " hold(s)" : "") + (clients.length ? " for " + esc(clients.join(", ")) : "") +
    ' <span class="dim">for ' + h.held_s.toFixed(1) + " s</span>";
}
function reservationHtml(r) {
  if (!r) return "";
  const left = isNum(r.left_s) ? ", " + secs(r.left_s) + " left" : "";
  const not = Object.keys(r.not_unloaded || {});
  return '<div class="resv">reserved: ' + esc(r.reason || "no reason given") + esc(left) +
    (not.length ? '<br><span class="dim">not unloaded: ' + esc(not.join(", ")) + "</span>" : "") + "</div>";
}
function renderScheduler(gpus, internalErrors, clients) {
  // One GPU: as it always was. Several: each GPU's holder, one queue tagged by GPU, the counters summed.
  // With clients (auth.clients), the queue names each job's client (none: the admin's, the broker's own).
  const several = gpus.length > 1, tag = (i) => (several ? '<span class="dim">GPU ' + i + "</span> " : "");
  $("holder").innerHTML = gpus.map((g) => tag(g.index) + holderHtml(g.scheduler.holder) +
    reservationHtml(g.reservation)).join("<br>");
  const byClient = Object.keys(clients || {}).length > 0;
  $("queue-head").innerHTML = "<tr><th>consumer</th>" + (byClient ? "<th>client</th>" : "") +
    "<th>kind</th><th>prio</th><th>waiting</th></tr>";
  const queue = gpus.flatMap((g) => g.scheduler.queue.map((q) => Object.assign({gpu: g.index}, q)));
  const clientCell = (q) => (!byClient ? "" : "<td>" + (q.client === null || q.client === undefined
    ? '<span class="dim">-</span>' : esc(q.client)) + "</td>");
  $("queue").innerHTML = queue.map((q) => "<tr><td>" + tag(q.gpu) + esc(q.consumer) + "</td>" +
    clientCell(q) + "<td>" + esc(q.kind) + "</td><td>" + q.priority + "</td><td>" + q.waited_s.toFixed(1) +
    " s</td></tr>").join("") ||
    '<tr><td colspan="' + (byClient ? 5 : 4) + '" class="dim">empty</td></tr>';
  const stats = {};  // each GPU's counters summed; internal_errors is the broker's one figure
  gpus.forEach((g) => Object.entries(g.scheduler.stats).filter(([k]) => k !== "internal_errors")
    .forEach(([k, v]) => { stats[k] = (stats[k] || 0) + v; }));
  stats.internal_errors = internalErrors;
  $("stats").innerHTML = Object.entries(stats).map(([k, v]) =>
    '<div id="stat-' + k + '"><b>' + v + "</b>" + k.replaceAll("_", " ") + "</div>").join("");
}
function renderConsumers(consumers, several) {
  $("consumers").innerHTML = Object.entries(consumers).map(([name, c]) =>
    '<tr data-consumer="' + esc(name) + '"><td><b>' + esc(name) + "</b>" +
    (several ? ' <span class="dim">GPU ' + c.gpu + "</span>" : "") +
    (c.vram_managed ? ' <span class="dim">(manages its VRAM)</span>' : "") +
    "</td><td>" + (c.stopped ? '<span class="dim">stopped</span>' : yesno(c.healthy, "healthy", "down")) +
    (c.last_error ? '<br><span class="dim">' + esc(c.last_error) + "</span>" : "") +
    "</td><td>" + yesno(c.loaded, "resident", "unloaded") + "</td><td>" + esc(c.kinds.join(", ")) +
    "</td><td>" + (isNum(c.vram_used_mib) ? c.vram_used_mib + " MiB used, " : "") + c.vram_resident_mib +
    (isNum(c.vram_used_mib) ? " declared" : " MiB") + "</td><td>" + ago(c.last_used) + "</td></tr>").join("");
}
// /v1/status is asked one at a time and at most once a second, however fast events come (a status of
// thousands of queued jobs is megabytes: a page asking 150 ms after each event, its last answer not yet in,
// slowed the broker's jobs threefold); a wish meanwhile is one more read once it is due. A read gives up
// after 10 s (a connection that died without a word would hold the next for good), and the second is
// counted by a clock the wall clock's steps do not move.
let asking = false, wanted = false, lastAsked = -Infinity;
function refresh() {
  wanted = true;
  if (asking) return;
  const wait = lastAsked + 1000 - performance.now();
  asking = true;
  if (wait > 0) { setTimeout(() => { asking = false; refresh(); }, wait); return; }
  wanted = false; lastAsked = performance.now();
  readStatus().finally(() => { asking = false; if (wanted) refresh(); });
}
async function readStatus() {
  try {
    const resp = await get("/v1/status", AbortSignal.timeout(10000));
    const st = await resp.json();
    // (An error of the broker's, JSON too: shown, never drawn as a status.)
    if (!resp.ok) throw new Error(resp.status + " " + (st.error || "") + ": " + (st.message || ""));
    const gpus = gpusOf(st);
    status = st;
    renderGpus(st, gpus); renderScheduler(gpus, st.internal_errors, st.clients);
    renderConsumers(st.consumers, gpus.length > 1);
  } catch (e) { $("error").textContent = "status: " + e.message; }
  drawTimeline();
}

// ---- the timeline: spans built from the events, drawn as percentages of the window ----
function secs(s) {
  if (s >= 5400) return (s / 3600).toFixed(1) + " h";
  if (s >= 120) return Math.round(s / 60) + " min";
  return (s < 10 ? s.toFixed(2) : s < 100 ? s.toFixed(1) : Math.round(s)) + " s";
}
const clock = (t) => new Date(t).toTimeString().slice(0, 8);
const ENDS = {finished: "completed", failed: "failed", cancelled: "cancelled", rejected: "rejected"};
const JOB_EVENTS = new Set(["queued", "granted", "started", "hold_ended", ...Object.keys(ENDS)]);

function buildTimeline(evs, st) {
  // Jobs by GPU and id (ids are per GPU), unloads and loads, reservations, and each GPU's queue depth.
  const defaultGpu = st ? st.gpu.index : 0;
  const gpuOf = (name) => (st && st.consumers[name] && isNum(st.consumers[name].gpu)
    ? st.consumers[name].gpu : defaultGpu);
  const jobs = new Map(), ops = [], resv = [], strangers = [], queues = {}, lanes = {}, open = {};
  const unfinished = new Set(), running = {};  // ops under way; the running job of each GPU:consumer
  const lane = (gpu, name) => { (lanes[gpu] = lanes[gpu] || new Set()).add(name); };
  const start = (op) => {
    ops.push(op); unfinished.add(op); open[op.consumer] = op; lane(op.gpu, op.consumer);
  };
  const close = (op, t, ok) => {
    op.to = t; op.ok = ok; unfinished.delete(op);
    if (open[op.consumer] === op) delete open[op.consumer];
  };
  const depth = (gpu, t, d) => {
    const q = queues[gpu] = queues[gpu] || {n: 0, steps: []};
    q.n = Math.max(0, q.n + d); q.steps.push([t, q.n]);
  };
  for (const ev of evs) {
    const t = Date.parse(ev.ts), name = ev.event;
    if (JOB_EVENTS.has(name) && ev.job !== undefined) {  // one of a job's own events (ids are per GPU)
      const gpu = isNum(ev.gpu) ? ev.gpu : gpuOf(ev.consumer), key = gpu + ":" + ev.job;
      let j = jobs.get(key);
      if (!j) { j = {key, gpu, job: ev.job, consumer: ev.consumer, kind: ev.kind}; jobs.set(key, j); }
      lane(gpu, ev.consumer);
      if (name === "queued") {
        j.queued = t; j.request_id = ev.request_id; j.waiting = true; depth(gpu, t, 1);
      } else if (name === "granted") {
        j.granted = t; j.waited_s = ev.waited_s; running[gpu + ":" + ev.consumer] = j.job;
        if (j.waiting) { j.waiting = false; depth(gpu, t, -1); }
      } else if (ENDS[name]) {
        j.end = t; j.outcome = ENDS[name]; j.code = ev.code; j.http = ev.http;
        if (j.waiting) { j.waiting = false; depth(gpu, t, -1); }
        // What the job was still doing ends with it: an admin or idle unload as the job did, the rest failed.
        for (const op of unfinished) {
          if (op.gpu === gpu && op.job === ev.job) {
            close(op, t, op.type === "unload" && op.by !== undefined && name === "finished");
          }
        }
      } else if (name === "hold_ended") {
        j.holdEnd = t; j.holdS = ev.hold_s; j.holdOutcome = ev.outcome;
      }
      continue;
    }
    if (name === "evicting" || name === "unloading") {
      const gpu = isNum(ev.gpu) ? ev.gpu : gpuOf(ev.consumer);
      for (const op of unfinished) {  // the job moved on to another victim: the last one's unload failed
        if (op.type === "unload" && op.gpu === gpu && op.job === ev.job) close(op, t, false);
      }
      start({type: "unload", consumer: ev.consumer, gpu, job: ev.job, from: t, forConsumer: ev.for_consumer,
             by: ev.by});
    } else if (name === "evicted" || name === "unloaded" || name === "yielded") {
      const op = open[ev.consumer];
      if (op && op.type === "unload") { op.freeMib = ev.free_mib; close(op, t, true); }
    } else if (name === "loading") {
      // (The job holding the lock for it: its failure ends the load.)
      const gpu = isNum(ev.gpu) ? ev.gpu : gpuOf(ev.consumer);
      start({type: "load", consumer: ev.consumer, gpu, job: running[gpu + ":" + ev.consumer], from: t});
    } else if (name === "loaded") {
      const op = open[ev.consumer];
      if (op && op.type === "load") close(op, t, true);
    } else if (name === "reserved") {
      const gpu = isNum(ev.gpu) ? ev.gpu : defaultGpu;
      // (Extended, it began before the events where they hold neither an earlier band nor its grant.)
      const before = !resv.some((b) => b.gpu === gpu) &&
        (jobs.get(gpu + ":" + ev.job) || {}).granted === undefined;
      for (const r of resv) if (r.gpu === gpu && r.to === undefined) r.to = t;
      const until = Date.parse(ev.until || "");
      resv.push({gpu, from: before ? -Infinity : t,
                 until: Number.isFinite(until) ? until : t + (ev.for_s || 0) * 1000,
                 reason: ev.reason, forS: ev.for_s});
    } else if (name === "reservation_ended") {
      const gpu = isNum(ev.gpu) ? ev.gpu : defaultGpu;
      const r = resv.find((b) => b.gpu === gpu && b.to === undefined);
      if (r) { r.to = t; r.why = ev.why; }
      // (Without a band open, it began before the events: drawn from the left edge to its end.)
      else resv.push({gpu, from: -Infinity, until: t, to: t, why: ev.why, reason: ev.reason});
    } else if (name === "stranger") {  // memory no consumer claims, beyond gpu.yield.ignore_mib
      const gpu = isNum(ev.gpu) ? ev.gpu : defaultGpu;
      const x = strangers.find((b) => b.gpu === gpu && b.to === undefined);
      if (x) x.to = t;
      else if (!ev.present) {  // (it came before the events)
        strangers.push({gpu, from: -Infinity, to: t, mib: ev.unclaimed_mib, processes: ev.processes || [],
                        more: ev.more_processes || 0});
      }
      if (ev.present) {
        strangers.push({gpu, from: t, mib: ev.unclaimed_mib, processes: ev.processes || [],
                        more: ev.more_processes || 0});
      }
    }
  }
  if (st) {
    // What began before the oldest event kept (a reservation of two hours, a game of one: the ring keeps
    // 15 minutes) is drawn from the status, from the left edge or from when it came.
    for (const g of gpusOf(st)) {
      const r = g.reservation, x = g.strangers;
      // (Only where the events say nothing of it: they come before the next status, and a reservation is
      // in the status from its grant, its `reserved` event after its unloads.)
      const told = resv.some((b) => b.gpu === g.index) ||
        [...jobs.values()].some((j) => j.gpu === g.index && j.kind === "reservation");
      if (r && !told) {
        resv.push({gpu: g.index, from: -Infinity, until: Date.parse(r.until || ""), reason: r.reason});
      }
      if (x && x.present && !strangers.some((b) => b.gpu === g.index)) {
        const since = Date.parse(x.since || "");
        strangers.push({gpu: g.index, from: Number.isFinite(since) ? since : -Infinity, mib: g.unclaimed_mib,
                        processes: x.processes || [], more: x.more_processes || 0});
      }
    }
  }
  // A hold has no event at its start: the status says which holder holds, and the latest answers are it.
  if (st) {
    for (const g of gpusOf(st)) {
      const h = g.scheduler.holder;
      if (!h || !h.holds) continue;
      [...jobs.values()].filter((j) => j.gpu === g.index && j.consumer === h.consumer &&
        j.outcome === "completed" && j.holdEnd === undefined)
        .sort((a, b) => b.end - a.end).slice(0, h.holds).forEach((j) => { j.holding = true; });
    }
  }
  return {jobs, ops, resv, strangers, queues, lanes};
}

function jobTip(j, now, several) {
  const lines = [j.consumer + " " + j.kind + ", job " + j.job + (several ? " on GPU " + j.gpu : "")];
  if (j.request_id) lines.push("request id " + j.request_id);
  const times = [];
  const s = (a, b) => secs(((b ?? now) - a) / 1000);
  if (j.queued !== undefined) {
    const given = j.granted !== undefined && isNum(j.waited_s);
    const waited = given ? secs(j.waited_s) : s(j.queued, j.granted ?? j.end);
    times.push((j.granted === undefined && j.end === undefined ? "waiting for " : "waited ") + waited);
  }
  if (j.granted !== undefined) {
    times.push((j.end === undefined ? "running for " : "ran ") + s(j.granted, j.end));
  }
  if (j.holdEnd !== undefined) times.push("held " + (isNum(j.holdS) ? secs(j.holdS) : s(j.end, j.holdEnd)));
  else if (j.holding) times.push("holding for " + s(j.end));
  if (times.length) lines.push(times.join(", "));
  const outcome = !j.outcome ? (j.granted !== undefined ? "running" : "queued")
    : j.outcome + (j.code ? ": " + j.code : "") + (j.http ? " (HTTP " + j.http + ")" : "");
  lines.push(outcome + (j.holdOutcome && j.holdOutcome !== "released" ? "; hold " + j.holdOutcome : ""));
  const start = j.queued ?? j.granted, stop = j.holdEnd ?? (j.holding ? undefined : j.end);
  if (start !== undefined) lines.push(clock(start) + " to " + (stop === undefined ? "now" : clock(stop)));
  return lines.join("\\n");
}
function opTip(op, now) {
  const took = secs(((op.to ?? now) - op.from) / 1000);
  if (op.type === "load") {
    return op.consumer + (op.to === undefined ? " loading for " + took : op.ok ? " loaded in " + took
      : " load failed after " + took) + "\\n" + clock(op.from);
  }
  const why = op.forConsumer ? " for " + op.forConsumer + " (job " + op.job + ")"
    : " (" + (op.by || "admin") + ")";
  const what = op.to === undefined ? " unloading" + why + " for " + took
    : op.ok ? " unloaded" + why + " in " + took : " unload" + why + " failed after " + took;
  return op.consumer + what + (isNum(op.freeMib) ? "\\n" + op.freeMib + " MiB free after" : "") +
    "\\n" + clock(op.from);
}
// Text from outside (a process's name, a reservation's reason) on one line of a tooltip: its breaks escaped.
function oneLine(text) {
  return JSON.stringify(String(text)).slice(1, -1)
    .replace(/[\\u0085\\u2028\\u2029]/g, (c) => "\\\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}
function strangerTip(x, several) {
  const procs = x.processes.map((p) => "pid " + p.pid + " " + oneLine(p.name) + " " + p.used_mib + " MiB");
  if (x.more > 0) procs.push("and " + x.more + " more");
  return "stranger" + (several ? " on GPU " + x.gpu : "") + ": " + x.mib + " MiB no consumer claims" +
    "\\n" + (procs.length ? procs.join("\\n") : "no process listed (a graphics process: a game?)") +
    "\\nfrom " + (Number.isFinite(x.from) ? clock(x.from) : "before the events this page has") +
    (x.to === undefined ? ", still there" : " to " + clock(x.to));
}
function resvTip(r, several) {
  return (several ? "GPU " + r.gpu + " reserved" : "reserved") + ": " +
    oneLine(r.reason || "no reason given") +
    "\\nfrom " + (Number.isFinite(r.from) ? clock(r.from) : "before the events this page has") +
    (isNum(r.forS) ? " for " + secs(r.forS) : "") +
    " (until " + clock(r.until) + ")" +
    "\\n" + (r.to === undefined ? "still reserved" : "ended at " + clock(r.to) + (r.why ? ": " + r.why : ""));
}

function axisHtml(from, now) {
  // Ticks at round times, at least 64 px apart however narrow the screen.
  const perS = Math.max(100, $("timeline").clientWidth - 110) / windowS;
  const step = [15, 30, 60, 120, 180, 300, 600].find((s) => s * perS >= 64) || 600, ms = step * 1000;
  let html = "";
  for (let t = Math.ceil(from / ms) * ms; t < now; t += ms) {
    const at = 100 * (t - from) / (now - from);
    if (at < 5 || at > 92) continue;  // no room beside the edge, or beside "now"
    const label = step < 60 ? clock(t) : clock(t).slice(0, 5);
    html += '<span style="left:' + at.toFixed(2) + '%">' + label + "</span>";
  }
  return html + '<span style="left:auto;right:0;transform:none">now</span>';
}
function drawTimeline() {
  if (!$("tip").hidden) return;  // the span being looked at stays where it is until the tip goes
  const now = Date.now() + skew, from = now - windowS * 1000;
  const model = buildTimeline(events, status);
  const gpus = status ? gpusOf(status).map((g) => g.index) : [];
  Object.keys(model.lanes).map(Number).forEach((g) => { if (!gpus.includes(g)) gpus.push(g); });
  const several = gpus.length > 1;
  tips = [];
  const pos = (a, b) => {  // left and width in % of the window, or null when outside it
    const l = Math.max(0, (a - from) / (now - from) * 100);
    const r = Math.min(100, ((b ?? now) - from) / (now - from) * 100);
    return r < 0 || l > 100 || r < l ? null : 'left:' + l.toFixed(3) + "%;width:" + (r - l).toFixed(3) + "%;";
  };
  const span = (cls, a, b, tip, data, style) => {
    const where = pos(a, b);
    if (!where) return "";
    tips.push(tip);
    return '<div class="tl-span ' + cls + '" data-tip="' + (tips.length - 1) + '" ' + data +
      ' style="' + where + (style || "") + '"></div>';
  };
  let html = "";
  for (const g of gpus) {
    const onGpu = (n) => (status.consumers[n].gpu ?? status.gpu.index) === g;
    const names = status ? Object.keys(status.consumers).filter(onGpu) : [];
    for (const n of [...(model.lanes[g] || [])].sort()) if (!names.includes(n)) names.push(n);
    const rows = {};
    names.forEach((n) => { rows[n] = ""; });
    for (const j of model.jobs.values()) {
      if (j.gpu !== g) continue;
      const color = colorOf(status, j.consumer);
      const data = 'data-job="' + j.job + '" data-kind="' + esc(j.kind) + '"';
      const tip = jobTip(j, now, several), bad = j.outcome && j.outcome !== "completed" ? " tl-bad" : "";
      const stillWaiting = j.granted === undefined && j.end === undefined;
      const waitEnd = j.granted ?? j.end;
      if (j.queued !== undefined && (stillWaiting || waitEnd - j.queued >= windowS)) {  // 1/1000 of it
        rows[j.consumer] += span("tl-wait", j.queued, waitEnd, tip, data + ' data-state="wait"',
          "background:" + color);
      }
      if (j.granted !== undefined) {
        rows[j.consumer] += span("tl-run" + bad, j.granted, j.end, tip,
          data + ' data-state="run" data-outcome="' + esc(j.outcome || "") + '"', "background:" + color);
      }
      if (j.end !== undefined && (j.holdEnd !== undefined || j.holding)) {
        rows[j.consumer] += span("tl-hold" + (j.holdOutcome && j.holdOutcome !== "released" ? " tl-bad" : ""),
          j.end, j.holdEnd, tip, data + ' data-state="hold" data-outcome="' + esc(j.holdOutcome || "") + '"',
          "background-color:" + color);
      }
    }
    for (const op of model.ops) {
      if (op.gpu !== g) continue;
      const data = 'data-state="' + op.type + '" data-ok="' + (op.ok === undefined ? "" : op.ok) + '"' +
        (op.job !== undefined ? ' data-job="' + op.job + '"' : "");
      const cls = "tl-" + op.type + (op.ok === false ? " tl-bad" : "");
      rows[op.consumer] += span(cls, op.from, op.to, opTip(op, now), data);
    }
    const q = model.queues[g] || {steps: []};
    let qHtml = "", top = 1;
    q.steps.forEach(([, d]) => { top = Math.max(top, d); });
    q.steps.forEach(([t, d], i) => {
      const next = i + 1 < q.steps.length ? q.steps[i + 1][0] : undefined;
      if (d <= 0 || next - t < windowS) return;  // shorter than 1/1000 of the window: nobody really waited
      const height = "height:" + Math.max(15, 100 * d / top).toFixed(0) + "%";
      qHtml += span("tl-q", t, next, d + " waiting" + (several ? " on GPU " + g : "") + "\\n" + clock(t),
        'data-state="queue" data-depth="' + d + '"', height);
    });
    let over = "";
    for (const r of model.resv) {
      if (r.gpu !== g) continue;
      const where = pos(r.from, r.to);
      if (!where) continue;
      tips.push(resvTip(r, several));
      over += '<div class="tl-resv" data-tip="' + (tips.length - 1) + '" data-reason="' +
        esc(r.reason || "") + '" data-why="' + esc(r.why || "") + '" data-open="' + (r.to === undefined) +
        '" style="' + where + '">' +
        "reserved: " + esc(r.reason || "") + "</div>";
    }
    let sHtml = "";
    for (const x of model.strangers) {
      if (x.gpu !== g) continue;
      sHtml += span("tl-stranger", x.from, x.to, strangerTip(x, several),
        'data-state="stranger" data-mib="' + x.mib + '" data-open="' + (x.to === undefined) + '"');
    }
    const yielding = status && gpusOf(status).some((s) => s.index === g && s.strangers);
    const row = (attr, label, inner) => '<div class="tl-row" ' + attr + '><div class="tl-label" title="' +
      esc(label) + '">' + esc(label) + '</div><div class="tl-track">' + inner + "</div></div>";
    html += '<div class="tl-gpu" data-gpu="' + g + '">' +
      (several ? '<div class="tl-head">GPU ' + g + "</div>" : "") +
      '<div class="tl-rows"><div class="tl-over">' + over + "</div>" +
      row('data-lane="queue"', "queue", qHtml) +
      (yielding || sHtml ? row('data-lane="strangers"', "strangers", sHtml) : "") +
      names.map((n) => row('data-consumer="' + esc(n) + '"', n, rows[n])).join("") + "</div></div>";
  }
  $("timeline").innerHTML = html + '<div class="tl-axis">' + axisHtml(from, now) + "</div>";
}
function zoomHtml() {
  $("tl-zoom").innerHTML = [[900, "15 min"], [300, "5 min"], [60, "1 min"]].map(([s, label]) =>
    '<button data-s="' + s + '"' + (s === windowS ? ' class="on"' : "") + ">" + label + "</button>").join("");
}
$("tl-zoom").addEventListener("click", (e) => {
  const s = Number(e.target.dataset && e.target.dataset.s);
  if (s) { windowS = s; zoomHtml(); drawTimeline(); }
});
function showTip(e) {
  // Hover with a mouse, tap on a phone: the span's job (or unload, load, reservation, queue) next to it.
  const el = e.target.closest && e.target.closest("[data-tip]");
  const tip = $("tip");
  if (!el || !$("timeline").contains(el)) {
    if (!tip.hidden) { tip.hidden = true; drawTimeline(); }
    return;
  }
  tip.textContent = tips[Number(el.dataset.tip)];
  tip.hidden = false;
  const x = e.clientX ?? el.getBoundingClientRect().left, y = e.clientY ?? el.getBoundingClientRect().top;
  tip.style.left = Math.max(4, Math.min(x + 12, innerWidth - tip.offsetWidth - 4)) + "px";
  const below = y + 16 + tip.offsetHeight < innerHeight;
  tip.style.top = (below ? y + 16 : Math.max(4, y - tip.offsetHeight - 8)) + "px";
}
// A mouse shows it on hover; a finger taps (a tap anywhere else hides it; touch makes no hover).
$("timeline").addEventListener("pointerover", (e) => { if (e.pointerType === "mouse") showTip(e); });
$("timeline").addEventListener("pointerleave", (e) => {
  if (e.pointerType === "mouse" && !$("tip").hidden) { $("tip").hidden = true; drawTimeline(); }
});
document.addEventListener("click", showTip);

let pending = null;
function soon() {
  if (!pending) pending = setTimeout(() => { pending = null; renderLog(); refresh(); }, 150);
}
function logEvent(ev) {
  const fields = Object.entries(ev).filter(([k, v]) => k !== "event" && k !== "ts" && v !== null)
    .map(([k, v]) => k + "=" + (typeof v === "object" || /[\\s"=\\\\]/.test(v) ? JSON.stringify(v) : v));
  const t = Date.parse(ev.ts);  // the viewer's local time, as the timeline and `events` show it
  const when = Number.isFinite(t) ? clock(t) + "." + ev.ts.slice(20, 23) : "?";
  logLines.push(when + " " + ev.event + " " + fields.join(" "));
  if (logLines.length > 400) logLines = logLines.slice(-200);
}
function renderLog() { $("log").textContent = logLines.slice(-200).reverse().join("\\n"); }
async function follow() {
  try {
    // The last 15 minutes first (replayed by the broker), then live: on every (re)connect, from scratch.
    const resp = await get("/v1/events?since=" + SPAN_S);
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    events = []; logLines = [];
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
        if (data) { const ev = JSON.parse(data); events.push(ev); logEvent(ev); soon(); }
      }
      const oldest = new Date(Date.now() + skew - (SPAN_S + 300) * 1000).toISOString();
      if (events.length > 20000 || (events.length && events[0].ts < oldest)) {
        events = events.filter((ev) => ev.ts >= oldest).slice(-20000);
      }
    }
  } catch (e) { $("error").textContent = "events: " + e.message; }
  setTimeout(follow, 1000);
}
zoomHtml(); refresh(); follow(); setInterval(refresh, 2000); setInterval(drawTimeline, 1000);
</script>
</body></html>
"""


# =====================================================================================================
# Running the broker
# =====================================================================================================


#: Python log levels -> syslog priorities, for journald's ``<N>`` prefix.
SYSLOG_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def stderr_is_journal() -> bool:
    """Whether stderr is journald's stream: the device and inode JOURNAL_STREAM names are stderr's (as
    systemd.exec says to check: the variable is inherited by whatever a service starts, a shell too)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # (no stderr, or one without a descriptor)
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


class LogfmtFormatter(logging.Formatter):
    """logfmt lines; under journald (stderr_is_journal) the ``<N>`` priority prefix, not a timestamp."""

    def __init__(self, journal: bool):
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.startswith("msg="):  # a library's record (asyncio's, aiohttp's): one logfmt line too
            message = logfmt(msg=message, logger=record.name)
        text = f"level={record.levelname.lower()} {message}"
        if record.exc_info:
            text += " traceback=" + json.dumps(self.formatException(record.exc_info))
        if self.journal:
            return f"<{SYSLOG_PRIORITIES.get(record.levelno, 6)}>{text}"
        return f"ts={_iso(record.created)} {text}"


#: aiohttp's parse errors whose message is the client's bytes themselves.
_CLIENTS_BYTES = (InvalidURLError, PayloadEncodingError)


class OneLineBadRequests(logging.Filter):
    """aiohttp logs an unparsable request with a traceback, as an "Unhandled exception" too where a body
    broke after the handler answered it (aiohttp reads the rest of a body to keep the connection); one
    logfmt line says it (and cannot flood)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
            exc = exc.__cause__
        if not isinstance(exc, HttpProcessingError):
            return True
        # Only aiohttp's own words, never the client's bytes, which may carry a token: what comes before a
        # colon (where aiohttp quotes the offending line), unless it quotes some of it there too; the kind
        # alone where the message is the client's bytes themselves (a path, a chunk's size line, with
        # aiohttp's pure-Python parser).
        reason = str(exc.message).split(":", 1)[0]
        if isinstance(exc, _CLIENTS_BYTES) or "'" in reason or '"' in reason:
            reason = type(exc).__name__
        record.msg, record.args, record.exc_info = logfmt(msg="bad http request", error=reason), (), None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


#: Collections of the garbage collector's middle generation between two full ones (Python's default: 10).
#: A full one frees only cycles that outlived two collections (reference counting frees the rest at once).
GC_FULL_AFTER = 100


async def serve(config: Config, source: ConfigSource) -> int:
    """Run the broker until SIGTERM or SIGINT; SIGHUP reloads. Speaks systemd's notify protocol."""
    app = create_app(config, source)
    runner = make_runner(app)
    try:
        await runner.setup()  # the first health round runs here, and the consumers' ports open
    except ListenError as e:
        log.error(logfmt(msg="cannot listen", error=str(e)))
        return 1
    except StateFileHeld as e:
        log.error(logfmt(msg="another broker runs: not starting", error=e.message))
        return 1
    # What start-up made (modules, config, app: most of the objects there are) stays for good: a full
    # collection, which a reading of 20,000 processes sets off, walks only what came after (it holds the
    # event loop that long: 36 ms against 16 ms for such readings here).
    gc.freeze()
    # A full collection walks every object the broker holds, about 70 per waiting request (68 ms with
    # 2,000 waiting here), and Python starts one after every 10 collections of the middle generation, which
    # a burst of 2,000 requests makes twice in a second: after GC_FULL_AFTER of them, ten times rarer.
    # (An incremental collector, whose third threshold is 0, has no full passes to space out.)
    young, middle, full = gc.get_threshold()
    if full:
        gc.set_threshold(young, middle, GC_FULL_AFTER)
    frozen = gc.get_freeze_count()
    log.info(
        logfmt(msg="start-up objects frozen", objects=frozen, full_gc_after=gc.get_threshold()[2] or None)
    )
    broker = app[BROKER]
    notifier = broker.notifier
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    watchdog: asyncio.Task[None] | None = None

    def reload() -> None:
        broker.reloads.in_background()  # a refused config is logged; the old one stays

    try:
        try:
            await ListenerSite(
                runner, config.listen_host, config.listen_port, broker.connections, "listen"
            ).start()
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

        def status_soon(_: Event) -> None:
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
        # A reload now would apply a config to what shutdown is closing: a SIGHUP is only logged (without
        # a handler it would end the process at once, cutting the drain).
        loop.add_signal_handler(
            signal.SIGHUP, lambda: log.info(logfmt(msg="reload ignored: the broker is stopping"))
        )
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
    parser = command_line()
    args = parser.parse_args(argv)
    if args.verb is not None:
        return run_verb(args)
    if any(getattr(args, flag[2:].replace("-", "_")) is not None for flag, _ in VERB_FLAGS):
        parser.error("--url, --token-file and --timeout go with a VERB (the broker itself takes --listen)")

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journal=stderr_is_journal()))
    # A record without what no line shows (the caller's file and line, found by walking the stack; its
    # thread and process): a line per job, made cheaper. (_srcfile = None is logging's own switch for it.)
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=args.log_level or "INFO", handlers=[handler], force=True)
    logging.getLogger("aiohttp.server").addFilter(OneLineBadRequests())

    overrides: dict[str, Any] = {}
    if args.listen is not None:
        overrides["listen"] = args.listen
    if args.nvidia_smi is not None:
        overrides["gpu.nvidia_smi"] = args.nvidia_smi
    config_path = args.config or "consumers.yaml"
    source = ConfigSource(Path(config_path), overrides)
    try:
        config = source.load()
    except ConfigError as e:
        for problem in e.problems:
            if args.check:
                print(f"{config_path}: {problem}", file=sys.stderr)
            else:  # the broker: a log line (an error, so `journalctl -p warning` says why it is down)
                log.error(logfmt(msg="bad config: not starting", problem=f"{config_path}: {problem}"))
        return 2
    if args.check:
        print(summary(config))
        return 0
    log.info(logfmt(msg="starting", version=VERSION, listen=f"{config.listen_host}:{config.listen_port}"))
    warn_missing_programs(config)
    if (old := old_aiohttp()) is not None:
        log.warning(logfmt(msg="aiohttp too old", problem=old))
    raise_descriptor_limit()
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
