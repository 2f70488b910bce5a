"""mgpusim: a simulated NVIDIA GPU and simulated GPU-inference services, for testing mgpumanager.

One file, three parts:

* ``SimGPU`` keeps a fake GPU (or several) in a small JSON state file: its memory, and the processes
  holding some of it.  ``TorchVRAM`` has the same allocate/release interface but holds real GPU memory
  through PyTorch, for runs on a machine with a real GPU.
* ``python3 mgpusim.py nvidia-smi --state FILE [nvidia-smi arguments]`` answers ``--query-gpu`` and
  ``--query-compute-apps`` queries from that file, in exactly the output format of the real tool (see
  fixtures/nvidia-smi/), so the broker can be pointed at it instead of nvidia-smi. Its NVML twin is a
  stand-in for libnvidia-ml.so.1 (fixtures/nvml/stub.c, compiled by ``build_nvml_stub``) that answers
  from the same file, named by $MGPUSIM_STATE: the broker's NVML reader (``gpu.reader: nvml``) sees the
  same GPU. NVML gives pids only: a reader takes each process's name from /proc/<pid>/cmdline, as
  nvidia-smi does, so a simulated process with a made-up pid shows without a name there.
* ``SimConsumer`` and its subclasses ``MvoiceSim``, ``OllamaSim``, ``ComfySim`` and ``WhisperSim`` are
  aiohttp apps that imitate the services the broker fronts: they take VRAM when they load, give it back
  when told to unload, record every request with its timing, and have fault switches. ``ServiceSim`` plays
  the other services mgpumanager's presets name (vLLM, SGLang, A1111, tabbyAPI, llama.cpp, speaches,
  LocalAI) from a table of their routes. ComfySim, WhisperSim and the llama.cpp ones answer as the real
  servers did in ``make test-real``, which sends the same requests to both.  Tests run them
  in-process (``aiohttp.test_utils.TestServer(sim.app)``); ``python3 mgpusim.py consumers ...`` runs
  them as one process.  ``mgpusim.py start --pidfile F ...`` and ``mgpusim.py stop --pidfile F`` start
  such a process detached and stop it again, the way ``systemctl start/stop`` treat a service (for the
  broker's command eviction); the process gives its simulated VRAM back when it exits.

Besides, ``mgpusim.py game`` is a graphics process (a game) that takes simulated memory until SIGTERM, and
``mgpusim.py demo`` (``make demo``) runs a broker and simulated consumers end to end.

The nvidia-smi mode runs as a subprocess on every GPU reading, so it must start fast: it is answered
before asyncio and aiohttp are imported (see "Fast path" below).
"""

# Most imports come after the nvidia-smi fast path, on purpose (annotations are not evaluated, so the
# names they use may be imported there):
# ruff: noqa: E402

from __future__ import annotations

import os
import sys
import time

# json.loads' own C scanner (CPython's), without the json package: importing that (re, enum and more with it)
# was half of the nvidia-smi stand-in's CPU, and make test starts the stand-in some 2,800 times.
from _json import make_scanner

# ---- GPU state file ----
# {"gpus": [{"index": 0, "uuid": "GPU-...", "name": "NVIDIA SIM 16GB", "total_mib": 16384,
#            "reserved_mib": 480, "utilization_pct": 0, "temperature_c": 35, "power_w": 60.5,
#            "pstate": "P0"}],
#  "processes": [{"pid": 41001, "name": "/opt/mvoice/.venv/bin/python3", "owner": "mvoice",
#                  "used_mib": 2800, "gpu_uuid": "GPU-..."},
#                 {"pid": 41002, "name": "/usr/games/game", "owner": "game", "used_mib": 8192,
#                  "gpu_uuid": "GPU-...", "graphics": true, "wants_mib": 12288}],
#  "faults": {"smi": "hang" | "fail" | "garbage", "smi_delay_s": 0.2, "smi_gate": "/tmp/.../gate",
#             "nvml": {"call": "nvmlDeviceGetMemoryInfo_v2" | [names], "error": 15} | {"hang": true}},
#  "ooms": [{"owner": "comfyui", "wanted_mib": 13610, "free_mib": 9000}]}
# memory.used = the GPU's processes' used_mib summed (null: unknown, nvidia-smi's [N/A], counted 0);
# memory.free = total - reserved - used (at least 0). A "graphics" process (a game) counts in memory.used
# but is not in --query-compute-apps' list (nor NVML's compute processes), as with the real tool.
# A process with "wants_mib" (a greedy game) takes free memory towards it in every write, so memory freed
# in a write is never seen free while it wants more.
# "ooms" records every allocation that did not fit (a real service gets CUDA out-of-memory there).

UUID_PREFIX = "GPU-5157a3c0-0000-4000-8000-"
PROCESS_PREFIX = "mgpusim-"


class JsonRules:
    """What json.loads decodes with (floats, ints, NaN and the infinities), for its C scanner."""

    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int, parse_constant = float, int, float


SCAN_JSON = make_scanner(JsonRules())
JSON_SPACE = " \t\n\r"


def loads(text: str) -> Any:
    """json.loads(text), by its C scanner (ValueError if it is not JSON)."""
    start = len(text) - len(text.lstrip(JSON_SPACE))
    try:
        value, end = SCAN_JSON(text, start)
    except StopIteration as e:
        raise ValueError(f"not JSON at character {e.value}") from None
    if text[end:].strip(JSON_SPACE):
        raise ValueError(f"extra data at character {end}")
    return value


def read_state(path: Path | str) -> dict[str, Any]:
    """Read a state file; writers replace it atomically, so reading needs no lock."""
    with open(path, encoding="utf-8") as f:
        return loads(f.read())


def used_mib_on(state: dict[str, Any], gpu: dict[str, Any]) -> int:
    """memory.used of one GPU: the sum of its processes' memory."""
    return sum(p["used_mib"] or 0 for p in state["processes"] if p["gpu_uuid"] == gpu["uuid"])


def free_mib_on(state: dict[str, Any], gpu: dict[str, Any]) -> int:
    """memory.free of one GPU: total - reserved - used, never below 0."""
    return max(0, gpu["total_mib"] - gpu["reserved_mib"] - used_mib_on(state, gpu))


def feed_greedy(state: dict[str, Any]) -> None:
    """Each process that wants more (``wants_mib``: a game streaming its textures in as fast as it can)
    takes the free memory of its GPU towards what it wants."""
    for p in state["processes"]:
        if p.get("wants_mib") is None:
            continue
        gpu = next(g for g in state["gpus"] if g["uuid"] == p["gpu_uuid"])
        held = p["used_mib"] or 0
        p["used_mib"] = held + max(0, min(p["wants_mib"] - held, free_mib_on(state, gpu)))


# ---- nvidia-smi ----

# Field -> unit, as --format=csv shows it ("" for none).
GPU_FIELDS = {
    "index": "",
    "uuid": "",
    "name": "",
    "memory.total": "MiB",
    "memory.used": "MiB",
    "memory.free": "MiB",
    "memory.reserved": "MiB",
    "utilization.gpu": "%",
    "temperature.gpu": "",
    "power.draw": "W",
    "pstate": "",
}
APP_FIELDS = {"pid": "", "process_name": "", "used_memory": "MiB", "gpu_uuid": ""}
HEADER_NAMES = {"used_memory": "used_gpu_memory"}  # where the csv header differs from the field name

NO_DEVICES = "No devices were found\n"
INVALID_ARGS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\n\n"
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n\n"
)
FAIL_TEXT = "Unable to determine the device handle for GPU0000:00:06.0: Unknown Error\n"
VERSION_TEXT = (
    "NVIDIA-SMI version  : 580.159.04\n"
    "NVML version        : 580.159\n"
    "DRIVER version      : 580.159.04\n"
    "CUDA Version        : 13.0\n"
)
SMI_OPTIONS = {"-i": "ids", "--id": "ids", "--query-gpu": "query_gpu", "--query-compute-apps": "query_apps"}


class SmiExit(Exception):
    """Ends an nvidia-smi answer early: `text` goes to stdout, `code` is the exit status."""

    def __init__(self, text: str, code: int) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


class SmiArgs:
    """The parsed nvidia-smi command line."""

    def __init__(self) -> None:
        self.state: str | None = os.environ.get("MGPUSIM_STATE")
        self.ids: list[str] | None = None
        self.query_gpu: list[str] | None = None
        self.query_apps: list[str] | None = None
        self.header = True
        self.units = True
        self.version = False


def parse_smi_args(argv: list[str]) -> SmiArgs:
    """Parse nvidia-smi arguments by hand: both `--opt=value` and `--opt value` are accepted."""
    args = SmiArgs()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--version":
            args.version = True
            continue
        key, has_value, value = arg.partition("=")
        if key not in (*SMI_OPTIONS, "--format", "--state"):
            raise SmiExit(INVALID_ARGS, 2)
        if not has_value:
            if i >= len(argv):
                raise SmiExit(INVALID_ARGS, 2)
            value = argv[i]
            i += 1
        if key == "--state":
            args.state = value
        elif key == "--format":
            parts = [p.strip() for p in value.split(",")]
            if "csv" not in parts or not set(parts) <= {"csv", "noheader", "nounits"}:
                raise SmiExit(INVALID_ARGS, 2)
            args.header = "noheader" not in parts
            args.units = "nounits" not in parts
        else:
            setattr(args, SMI_OPTIONS[key], [v.strip() for v in value.split(",") if v.strip()])
    return args


def apply_smi_faults(faults: dict[str, Any]) -> None:
    """Act out the nvidia-smi faults set in the state file."""
    if faults.get("smi") == "hang":
        while True:
            time.sleep(3600)
    if faults.get("smi") == "fail":
        raise SmiExit(FAIL_TEXT, 15)
    if faults.get("smi") == "garbage":
        raise SmiExit("\x00\x01garbage output\n", 0)
    if faults.get("smi_delay_s"):
        time.sleep(float(faults["smi_delay_s"]))
    while faults.get("smi_gate") and os.path.exists(faults["smi_gate"]):  # held until a test removes it
        time.sleep(0.01)


def check_fields(fields: list[str], known: dict[str, str]) -> None:
    """Reject the first unknown field exactly as nvidia-smi does."""
    for field in fields:
        if field not in known:
            raise SmiExit(f'Field "{field}" is not a valid field to query.\n\n', 2)


def select_gpus(state: dict[str, Any], ids: list[str] | None) -> list[dict[str, Any]]:
    """The GPUs named by -i (index or uuid), or all of them."""
    if ids is None:
        return list(state["gpus"])
    chosen = []
    for wanted in ids:
        match = [g for g in state["gpus"] if wanted in (str(g["index"]), g["uuid"])]
        if not match:
            raise SmiExit(NO_DEVICES, 6)
        chosen.extend(match)
    return chosen


def gpu_value(state: dict[str, Any], gpu: dict[str, Any], field: str) -> str:
    """One --query-gpu value, without its unit."""
    values = {
        "index": gpu["index"],
        "uuid": gpu["uuid"],
        "name": gpu["name"],
        "memory.total": gpu["total_mib"],
        "memory.used": used_mib_on(state, gpu),
        "memory.free": free_mib_on(state, gpu),
        "memory.reserved": gpu["reserved_mib"],
        "utilization.gpu": gpu.get("utilization_pct", 0),
        "temperature.gpu": gpu.get("temperature_c", 35),
        "power.draw": f"{float(gpu.get('power_w', 60.5)):.2f}",
        "pstate": gpu.get("pstate", "P0"),
    }
    return str(values[field])


def app_value(proc: dict[str, Any], field: str) -> str:
    """One --query-compute-apps value, without its unit (a process's memory unknown: ``[N/A]``)."""
    values = {
        "pid": proc["pid"],
        "process_name": proc["name"],
        "used_memory": "[N/A]" if proc["used_mib"] is None else proc["used_mib"],
        "gpu_uuid": proc["gpu_uuid"],
    }
    return str(values[field])


def format_csv(fields: list[str], units: dict[str, str], rows: list[list[str]], args: SmiArgs) -> str:
    """Lay out rows as nvidia-smi's csv: values joined by ", ", an optional header, optional units."""
    lines = []
    if args.header:
        names = [HEADER_NAMES.get(f, f) + (f" [{units[f]}]" if units[f] else "") for f in fields]
        lines.append(", ".join(names))
    for row in rows:
        if args.units:
            row_with_units = [
                f"{v} {units[f]}" if units[f] and v != "[N/A]" else v
                for f, v in zip(fields, row, strict=True)
            ]
            lines.append(", ".join(row_with_units))
        else:
            lines.append(", ".join(row))
    return "".join(line + "\n" for line in lines)


def answer_smi(argv: list[str]) -> str:
    """What nvidia-smi would print for these arguments (SmiExit for an error or a fault)."""
    args = parse_smi_args(argv)
    if args.version:
        return VERSION_TEXT
    if args.state is None:
        raise SmiExit("mgpusim nvidia-smi: --state FILE (or $MGPUSIM_STATE) is required\n", 2)
    try:
        state = read_state(args.state)
    except (OSError, ValueError):
        raise SmiExit(NO_DRIVER, 9) from None
    apply_smi_faults(state.get("faults") or {})
    if (args.query_gpu is None) == (args.query_apps is None):
        raise SmiExit(INVALID_ARGS, 2)
    if args.query_gpu is not None:
        check_fields(args.query_gpu, GPU_FIELDS)
        gpus = select_gpus(state, args.ids)
        rows = [[gpu_value(state, gpu, f) for f in args.query_gpu] for gpu in gpus]
        return format_csv(args.query_gpu, GPU_FIELDS, rows, args)
    fields = args.query_apps or []
    check_fields(fields, APP_FIELDS)
    procs = [p for p in state["processes"] if not p.get("graphics")]  # (compute processes only)
    if args.ids is not None:
        uuids = {g["uuid"] for g in select_gpus(state, args.ids)}
        procs = [p for p in procs if p["gpu_uuid"] in uuids]
    rows = [[app_value(proc, f) for f in fields] for proc in procs]
    return format_csv(fields, APP_FIELDS, rows, args)


def smi_main(argv: list[str]) -> int:
    """`mgpusim.py nvidia-smi ...`: print the answer to stdout and return the exit status."""
    try:
        text, code = answer_smi(argv), 0
    except SmiExit as e:
        text, code = e.text, e.code
    sys.stdout.buffer.write(text.encode())
    sys.stdout.buffer.flush()
    return code


# ---- Fast path ----
# Everything above needs only the standard library: answer nvidia-smi before importing the rest.
if __name__ == "__main__" and sys.argv[1:2] == ["nvidia-smi"]:
    sys.exit(smi_main(sys.argv[2:]))

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import io
import ipaddress
import json
import random
import re
import select
import shlex
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
import wave
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web

# ---- GPU state: SimGPU and TorchVRAM ----


def gpu_uuid(index: int) -> str:
    """The fake, stable uuid of simulated GPU number `index`."""
    return f"{UUID_PREFIX}{index:012d}"


def fake_pid(owner: str) -> int:
    """A fake pid for an owner, the same in every process."""
    return 40000 + zlib.crc32(owner.encode()) % 20000


class SimOOM(Exception):
    """An allocation that does not fit: what a real service meets as CUDA out-of-memory."""


class SimGPU:
    """Simulated GPUs kept in a JSON state file that `mgpusim.py nvidia-smi` reads.

    Every read-modify-write holds an exclusive flock on `<path>.lock` and replaces the file atomically.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        total_mib: int = 16384,
        reserved_mib: int = 480,
        gpus: int = 1,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        self.lock_path = Path(f"{self.path}.lock")
        if create:
            state = {
                "gpus": [self._new_gpu(i, total_mib, reserved_mib) for i in range(gpus)],
                "processes": [],
                "faults": {},
            }
            with self._locked():
                self._write(state)

    @staticmethod
    def _new_gpu(index: int, total_mib: int, reserved_mib: int) -> dict[str, Any]:
        """A fresh, idle GPU entry."""
        return {
            "index": index,
            "uuid": gpu_uuid(index),
            "name": f"NVIDIA SIM {round(total_mib / 1024)}GB",
            "total_mib": total_mib,
            "reserved_mib": reserved_mib,
            "utilization_pct": 0,
            "temperature_c": 35,
            "power_w": 60.5,
            "pstate": "P0",
        }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive lock on the sidecar lock file."""
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, state: dict[str, Any]) -> None:
        """Write the state to a temporary file in the same directory, then rename it over the old one; a
        greedy process has taken what it could first (``feed_greedy``)."""
        feed_greedy(state)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under the lock: `with sim_gpu.edit() as state: state["gpus"][0][...] = ...`."""
        with self._locked():
            state = read_state(self.path)
            yield state
            self._write(state)

    def read(self) -> dict[str, Any]:
        """The whole state, as stored."""
        return read_state(self.path)

    @staticmethod
    def _gpu(state: dict[str, Any], index: int) -> dict[str, Any]:
        """The GPU entry with that index (ValueError if there is none)."""
        for gpu in state["gpus"]:
            if gpu["index"] == index:
                return gpu
        raise ValueError(f"no simulated GPU with index {index}")

    def allocate(
        self,
        owner: str,
        mib: int,
        gpu: int = 0,
        *,
        process: str | None = None,
        pid: int | None = None,
        graphics: bool = False,
    ) -> None:
        """Make the owner's process hold `mib` MiB on GPU `gpu` (replacing what it held before); it is
        listed as `process` (default `mgpusim-<owner>`; "": no name, as a process that exits shows a moment
        before its memory goes) with `pid` (default a fixed one for the owner), in the compute process list
        unless it is a `graphics` one (a game).

        SimOOM, recorded in the state's "ooms", when that does not fit beside what the others hold."""
        # (The record is written before SimOOM leaves ``edit()``, which writes only when its block ends.)
        with self.edit() as state:
            entry = self._gpu(state, gpu)
            uuid = entry["uuid"]
            mine = [p for p in state["processes"] if p.get("owner", p["name"]) == owner]
            others = used_mib_on(state, entry) - sum(p["used_mib"] for p in mine if p["gpu_uuid"] == uuid)
            free = entry["total_mib"] - entry["reserved_mib"] - others
            if mib > free:
                state.setdefault("ooms", []).append(
                    {"owner": owner, "wanted_mib": int(mib), "free_mib": free}
                )
                self._write(state)  # (under edit's lock still)
                raise SimOOM(f"CUDA out of memory: {owner} wanted {mib} MiB, {free} MiB free")
            name = PROCESS_PREFIX + owner if process is None else process  # ("": one that lost its name)
            wanted = pid if pid is not None else fake_pid(name)
            if mine and mine[0]["pid"] == wanted:
                mine[0].update(used_mib=int(mib), gpu_uuid=uuid, name=name)
                return
            state["processes"] = [p for p in state["processes"] if p not in mine]
            taken = {p["pid"] for p in state["processes"]}
            while wanted in taken:
                wanted += 1
            entry = {"pid": wanted, "name": name, "owner": owner, "used_mib": int(mib), "gpu_uuid": uuid}
            if graphics:
                entry["graphics"] = True
            state["processes"].append(entry)

    def grow(self, owner: str, mib: int, step_mib: int, gpu: int = 0, *, process: str | None = None) -> int:
        """A graphics process (a game) takes up to `step_mib` more, towards `mib`, as far as free memory
        allows (what does not fit is not taken, and is no out-of-memory: a game streams its textures in as
        room allows); what it holds now."""
        with self.edit() as state:
            entry = self._gpu(state, gpu)
            mine = [p for p in state["processes"] if p.get("owner") == owner]
            held = sum(p["used_mib"] or 0 for p in mine)
            free = free_mib_on(state, entry)
            take = max(0, min(step_mib, mib - held, free))
            if not take:
                return held
            if mine:
                mine[0]["used_mib"] = held + take
            else:
                name = process or PROCESS_PREFIX + owner
                state["processes"].append(
                    {
                        "pid": fake_pid(name),
                        "name": name,
                        "owner": owner,
                        "used_mib": take,
                        "gpu_uuid": entry["uuid"],
                        "graphics": True,
                    }
                )
            return held + take

    def greedy(self, owner: str, mib: int, gpu: int = 0, *, process: str | None = None) -> None:
        """A greedy graphics process (a game): it takes free memory towards `mib` now, and in every later
        write that frees some (the one that frees it), so no reading sees that memory free while it
        wants more."""
        with self.edit() as state:
            uuid = self._gpu(state, gpu)["uuid"]
            name = process or PROCESS_PREFIX + owner
            state["processes"] = [p for p in state["processes"] if p.get("owner", p["name"]) != owner]
            entry = {"pid": fake_pid(name), "name": name, "owner": owner, "used_mib": 0, "gpu_uuid": uuid}
            state["processes"].append(entry | {"graphics": True, "wants_mib": int(mib)})

    def release(self, owner: str) -> None:
        """Remove the owner's process entry (its memory becomes free)."""
        with self.edit() as state:
            state["processes"] = [p for p in state["processes"] if p.get("owner", p["name"]) != owner]

    def used_mib(self, owner: str) -> int:
        """MiB the owner holds now (0 if none)."""
        return sum(p["used_mib"] for p in self.read()["processes"] if p.get("owner", p["name"]) == owner)

    def ooms(self) -> list[dict[str, Any]]:
        """Every allocation that did not fit so far (a real GPU would have run out of memory)."""
        return list(self.read().get("ooms", []))

    def free_mib(self, gpu: int = 0) -> int:
        """memory.free of GPU `gpu`, as nvidia-smi would report it."""
        state = self.read()
        return free_mib_on(state, self._gpu(state, gpu))

    def total_mib(self, gpu: int = 0) -> int:
        """memory.total of GPU `gpu`."""
        return self._gpu(self.read(), gpu)["total_mib"]

    def set_fault(self, name: str | None, *, smi_delay_s: float = 0.0, smi_gate: str | None = None) -> None:
        """Set the nvidia-smi fault ("hang", "fail", "garbage" or None), an answer delay, and a gate: a file
        while which exists each answer waits."""
        with self.edit() as state:
            faults = {k: v for k, v in (state.get("faults") or {}).items() if k == "nvml"}
            if name:
                faults["smi"] = name
            if smi_delay_s:
                faults["smi_delay_s"] = smi_delay_s
            if smi_gate:
                faults["smi_gate"] = smi_gate
            state["faults"] = faults

    def set_nvml_fault(
        self, call: str | Sequence[str] | None = None, *, error: int | None = None, hang: bool = False
    ) -> None:
        """Set the NVML stub's fault: NVML function ``call`` (each of them, given several; every one when
        None) returns ``error`` (an nvmlReturn_t), or blocks while ``hang`` is set; neither: no fault."""
        fault: dict[str, Any] = {}
        if call is not None:
            fault["call"] = call if isinstance(call, str) else list(call)
        if error is not None:
            fault["error"] = error
        if hang:
            fault["hang"] = True
        with self.edit() as state:
            faults = state.setdefault("faults", {})
            faults.pop("nvml", None)
            if error is not None or hang:
                faults["nvml"] = fault


NVML_STUB_SOURCE = Path(__file__).resolve().with_name("fixtures") / "nvml" / "stub.c"


def build_nvml_stub(directory: Path | str) -> Path:
    """Compile the NVML stand-in into ``directory``/libnvidia-ml.so.1 with ``cc`` (FileNotFoundError
    without one): put the directory on LD_LIBRARY_PATH of a process and $MGPUSIM_STATE in its environment,
    and nvidia-ml-py finds it as it would the driver's library."""
    compiler = shutil.which("cc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc) to build the NVML stub with")
    target = Path(directory) / "libnvidia-ml.so.1"
    argv = [compiler, "-shared", "-fPIC", "-O2", "-o", str(target), str(NVML_STUB_SOURCE), "-lpthread"]
    subprocess.run(argv, check=True, capture_output=True, timeout=120)
    return target


class TorchVRAM:
    """Holds real GPU memory through PyTorch, with SimGPU's allocate/release/used_mib interface."""

    def __init__(self) -> None:
        import torch  # noqa: PLC0415 (only this code path needs torch)

        self._torch = torch
        self._held: dict[str, tuple[int, Any]] = {}  # owner -> (MiB, tensor)

    def allocate(
        self, owner: str, mib: int, gpu: int = 0, *, process: str | None = None, pid: int | None = None
    ) -> None:
        """Hold `mib` MiB on cuda:`gpu` for the owner (dropping what it held before). The real driver
        names the process and raises out-of-memory itself."""
        self.release(owner)
        tensor = self._torch.empty(mib * 2**20, dtype=self._torch.uint8, device=f"cuda:{gpu}")
        self._held[owner] = (mib, tensor)

    def release(self, owner: str) -> None:
        """Drop the owner's tensor and give the memory back to the driver."""
        if self._held.pop(owner, None) is not None:
            self._torch.cuda.empty_cache()

    def used_mib(self, owner: str) -> int:
        """MiB the owner holds now (0 if none)."""
        held = self._held.get(owner)
        return held[0] if held else 0

    def free_mib(self, gpu: int = 0) -> int:
        """Free memory of the real GPU, as the driver reports it."""
        return self._torch.cuda.mem_get_info(gpu)[0] // 2**20

    def total_mib(self, gpu: int = 0) -> int:
        """Total memory of the real GPU."""
        return self._torch.cuda.mem_get_info(gpu)[1] // 2**20


# ---- Simulated consumers: common part ----


@dataclasses.dataclass
class Record:
    """One HTTP request a simulated consumer received; times are time.monotonic()."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    start: float
    end: float | None = None
    #: The client's (host, port): the same port on two requests means one reused connection.
    peer: tuple[str, int] | None = None


#: Where the recording middleware leaves a request's Record for its handler.
RECORD: Any = web.RequestKey("record", Record) if hasattr(web, "RequestKey") else "mgpusim.record"


def error_response(status: int) -> web.Response:
    """The answer of a simulated failure."""
    return web.json_response({"error": "simulated"}, status=status)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or {} if it has none (400 if it is not JSON)."""
    body = await request.read()
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "invalid JSON"}', content_type="application/json") from None
    return data if isinstance(data, dict) else {}


class SimConsumer:
    """Base of the simulated services: VRAM bookkeeping, request recording and fault switches.

    Subclasses add their routes in `add_routes`; inference handlers call `inference_fault()` and then
    run inside `gpu_work(record)`.  Faults (set in `faults`): "status", "hang", "unload_status",
    "unload_hang", "unload_no_release", "load_status", "load_hang", "health_status"; MvoiceSim's
    "health_loaded" (what its health reports as ``loaded``, whatever it holds).
    """

    health_path = "/health"
    default_vram_mib = 1000
    #: What nvidia-smi calls its process (real services: their interpreter's or binary's path).
    process_name = "/usr/bin/python3"
    #: The CUDA context its process keeps while it runs, model loaded or not (0: none).
    default_context_mib = 0
    #: What its process does with its model as it starts (``consumers``, so ``start`` too): "" nothing (a
    #: request loads it), "before_listening" (loads it, then binds its port: whisper-server), or
    #: "while_listening" (binds its port and loads it, every route answering 503 meanwhile: llama-server).
    loads_at_start = ""

    def __init__(
        self,
        name: str,
        vram: SimGPU | TorchVRAM,
        *,
        vram_mib: int | None = None,
        gpu: int = 0,
        load_s: float = 0.0,
        work_s: float = 0.0,
        release_s: float = 0.0,
        loaded: bool = False,
        context_mib: int | None = None,
    ) -> None:
        self.name = name
        self.vram = vram
        self.vram_mib = self.default_vram_mib if vram_mib is None else vram_mib
        self.context_mib = self.default_context_mib if context_mib is None else context_mib
        #: Bumped at every restart: the process gets a new pid.
        self.generation = 0
        self.gpu = gpu
        self.load_s = load_s
        self.work_s = work_s
        self.release_s = release_s
        self.loaded = loaded
        self.faults: dict[str, Any] = {}
        self.records: list[Record] = []
        self.work: list[Record] = []
        self.probes = 0
        self.active = 0
        self.max_active = 0
        self.loads = 0
        self.unloads = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._release_task: asyncio.Task[None] | None = None
        self._load_lock = asyncio.Lock()
        #: What an unload frees release_s later is freed only once this is free too (a test holds it).
        self._release_lock = asyncio.Lock()
        self._shutting_down = asyncio.Event()
        self.hold_memory()
        self.app = self.make_app()

    def make_app(self) -> web.Application:
        """A fresh aiohttp app for the service (a restarted service is served by a new one)."""
        # Large bodies (a long recording to transcribe) are fine, as for the real services.
        app = web.Application(middlewares=[self._recorder()], client_max_size=256 * 2**20)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        self.add_routes(app.router)
        return app

    @property
    def pid(self) -> int:
        """Its process's pid as nvidia-smi lists it (a new one after each restart)."""
        return fake_pid(f"{self.name}#{self.generation}")

    def hold_memory(self) -> None:
        """Make its process hold what it holds now: the CUDA context, and the model when loaded.
        SimOOM when that does not fit."""
        mib = self.context_mib + self.model_mib()
        if mib == 0:
            self.vram.release(self.name)
        else:
            self.vram.allocate(self.name, mib, self.gpu, process=self.process_name, pid=self.pid)

    def model_mib(self) -> int:
        """What its model takes now (beside the context)."""
        return self.vram_mib if self.loaded else 0

    def restart(self) -> None:
        """The service restarts behind the broker's back: a new process (new pid, its CUDA context only,
        no model), and whatever it knew of requests is gone. Serve ``make_app()`` again to bring it back."""
        self.generation += 1
        self.loaded = False
        if self._release_task is not None:
            self._release_task.cancel()
            self._release_task = None
        self._shutting_down = asyncio.Event()
        for task in list(self._tasks):  # what it was doing dies with the process
            task.cancel()
        self.hold_memory()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Add the service's routes (subclasses)."""
        raise NotImplementedError

    # -- recording --

    def _recorder(self) -> Any:
        """The middleware that records requests and counts health probes."""

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == self.health_path:
                self.probes += 1
                if self.faults.get("health_status"):
                    return error_response(self.faults["health_status"])
                return await handler(request)
            headers = {str(k): v for k, v in request.headers.items()}
            body = await request.read()
            rec = Record(
                request.method,
                request.path,
                request.raw_path.partition("?")[2],
                headers,
                body,
                time.monotonic(),
                peer=request.transport.get_extra_info("peername") if request.transport else None,
            )
            self.records.append(rec)
            request[RECORD] = rec
            try:
                return await handler(request)
            finally:
                rec.end = time.monotonic()

        return record

    @contextlib.contextmanager
    def gpu_work(self, record: Record) -> Iterator[None]:
        """Count the block as GPU work: add `record` to `work`, keep `active` and `max_active`."""
        self.work.append(record)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            yield
        finally:
            self.active -= 1

    async def run_work(self, request: web.Request) -> None:
        """The GPU part of an inference request: load if needed (cold start), then work for work_s."""
        with self.gpu_work(request[RECORD]):
            await self.do_load()
            await asyncio.sleep(self.work_s)

    # -- faults --

    async def hang(self) -> NoReturn:
        """Never answer; when the app shuts down, fail with 503 so the server can stop at once."""
        await self._shutting_down.wait()
        raise web.HTTPServiceUnavailable()

    async def inference_fault(self) -> web.Response | None:
        """Apply the "status" and "hang" switches to an inference request."""
        if self.faults.get("status"):
            return error_response(self.faults["status"])
        if self.faults.get("hang"):
            await self.hang()
        return None

    async def admin_fault(self, action: str) -> web.Response | None:
        """Apply the "<action>_status" and "<action>_hang" switches; action is "load" or "unload"."""
        if self.faults.get(f"{action}_status"):
            return error_response(self.faults[f"{action}_status"])
        if self.faults.get(f"{action}_hang"):
            await self.hang()
        return None

    # -- VRAM --

    async def do_load(self) -> None:
        """Load the model: after load_s, hold vram_mib on the GPU."""
        async with self._load_lock:
            if self.loaded:
                return
            await asyncio.sleep(self.load_s)
            if self._release_task is not None:
                self._release_task.cancel()
                self._release_task = None
            self.loaded = True
            try:
                self.hold_memory()
            except SimOOM:
                self.loaded = False
                raise
            self.loads += 1

    async def do_unload(self) -> None:
        """Unload the model and return at once; the memory is freed after release_s."""
        if not self.loaded:
            return
        self.loaded = False
        self.unloads += 1
        if self.faults.get("unload_no_release"):
            return
        if self.release_s <= 0:
            self.hold_memory()
        else:
            self._release_task = self.spawn(self._release_later())

    async def _release_later(self) -> None:
        """Free the memory release_s after an unload (its CUDA context stays)."""
        await asyncio.sleep(self.release_s)
        async with self._release_lock:
            pass
        self.hold_memory()
        self._release_task = None

    # -- tasks and shutdown --

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        """Start a background task that the consumer owns and cancels on cleanup."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_shutdown(self, app: web.Application) -> None:
        """Let hung requests fail, so that the server does not wait for them; close open WebSockets."""
        self._shutting_down.set()
        for ws in list(getattr(self, "sockets", ())):
            await ws.close(code=1001)

    async def _on_cleanup(self, app: web.Application) -> None:
        """Cancel the background tasks (pending releases, renders)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- mvoice ----


def make_wav(text: str) -> bytes:
    """A valid WAV of silence, 16 kHz mono 16-bit, 20 ms per character of text (at least 0.1 s)."""
    frames = int(16000 * max(0.1, 0.02 * len(text)))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * frames)
    return buf.getvalue()


class MvoiceSim(SimConsumer):
    """mvoice (TTS/STT): synthesize, transcribe, explicit load/unload, audio files."""

    default_vram_mib = 2800
    process_name = "/opt/mvoice/.venv/bin/python3"

    def __init__(
        self, name: str, vram: SimGPU | TorchVRAM, *, audio_dir: Path | str | None = None, **kw: Any
    ) -> None:
        if audio_dir is None:  # a directory of our own, removed with this object
            audio_dir = tempfile.mkdtemp(prefix="mgpusim-audio-")
            weakref.finalize(self, shutil.rmtree, audio_dir, ignore_errors=True)
        self.audio_dir = Path(audio_dir)
        self._audio_count = 0
        super().__init__(name, vram, **kw)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """mvoice's routes."""
        router.add_get("/health", self.health)
        router.add_post("/api/synthesize", self.synthesize)
        router.add_post("/api/transcribe", self.transcribe)
        router.add_post("/api/admin/unload", self.admin_unload)
        router.add_post("/api/admin/load", self.admin_load)
        router.add_get("/audio/{name}", self.audio)
        router.add_get("/api/admin/secret", self.secret)
        router.add_post("/api/admin/shutdown", self.secret)

    async def health(self, request: web.Request) -> web.Response:
        """GET /health, with its residency as ``loaded`` (the "health_loaded" fault: that value instead, as a
        service that lies about itself, or whose report lags, would say)."""
        return web.json_response({"status": "ok", "loaded": self.faults.get("health_loaded", self.loaded)})

    def save_audio(self, wav: bytes) -> str:
        """Write a WAV into the audio dir; return its file name."""
        self._audio_count += 1
        name = f"sim-{self._audio_count:04d}-{uuid.uuid4().hex[:8]}.wav"
        (self.audio_dir / name).write_bytes(wav)
        return name

    async def synthesize(self, request: web.Request) -> web.Response:
        """POST /api/synthesize {"text": ...} -> audio/wav, also saved under /audio/."""
        if (fault := await self.inference_fault()) is not None:
            return fault
        text = str((await read_json(request)).get("text", ""))
        await self.run_work(request)
        wav = make_wav(text)
        name = self.save_audio(wav)
        return web.Response(body=wav, content_type="audio/wav", headers={"X-Audio-Path": f"/audio/{name}"})

    async def transcribe(self, request: web.Request) -> web.Response:
        """POST /api/transcribe (audio body) -> a fixed transcript."""
        if (fault := await self.inference_fault()) is not None:
            return fault
        body = await request.read()
        await self.run_work(request)
        return web.json_response({"text": "simulated transcript", "bytes": len(body)})

    async def admin_unload(self, request: web.Request) -> web.Response:
        """POST /api/admin/unload."""
        if (fault := await self.admin_fault("unload")) is not None:
            return fault
        await self.do_unload()
        return web.json_response({"loaded": self.loaded})

    async def admin_load(self, request: web.Request) -> web.Response:
        """POST /api/admin/load."""
        if (fault := await self.admin_fault("load")) is not None:
            return fault
        await self.do_load()
        return web.json_response({"loaded": self.loaded})

    async def audio(self, request: web.Request) -> web.StreamResponse:
        """GET /audio/{name}: a file of the audio dir."""
        name = request.match_info["name"]
        path = self.audio_dir / name
        if name.startswith(".") or "/" in name or "\\" in name or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def secret(self, request: web.Request) -> web.Response:
        """GET /api/admin/secret, POST /api/admin/shutdown: exist only to be recorded."""
        return web.json_response({"secret": True})


# ---- ollama ----


def go_duration_s(value: Any, default: float) -> float:
    """Ollama's keep_alive in seconds: a number of seconds or a Go duration ("5m", "1h30m", "0"); negative
    is for ever (inf); absent or unreadable, ``default``."""
    if isinstance(value, str):
        text = value.strip()
        with contextlib.suppress(ValueError):
            value = float(text)
        if isinstance(value, str):
            units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
            parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", text.lstrip("-"))
            if not parts or "".join(n + u for n, u in parts) != text.lstrip("-"):
                return default
            value = sum(float(n) * units[u] for n, u in parts) * (-1 if text.startswith("-") else 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float("inf") if value < 0 else float(value)


class OllamaSim(SimConsumer):
    """ollama: its own API (/api/generate, /api/chat, /api/tags, /api/show, /api/ps) and the
    OpenAI-compatible one it serves beside it (/v1/chat/completions, /v1/models).

    A request loads its model (each model holds vram_mib), which stays loaded for its keep_alive after the
    answer (the request's, else ``keep_alive_s``: Ollama's default 5 minutes), as /api/ps lists it with its
    size_vram and expires_at. An empty prompt loads the model; with keep_alive 0 it unloads it (what
    ``ollama stop`` sends). Answers are streamed (ndjson, or server-sent events for /v1) one token every
    line_interval_s, or sent as one object; the shapes are those the ``ollama`` and ``openai`` Python
    clients parse. ``loaded=True`` starts with ``model`` loaded, never expiring.
    """

    health_path = "/"
    default_vram_mib = 5000
    process_name = "/usr/local/bin/ollama"
    model = "sim:latest"

    def __init__(
        self,
        name: str,
        vram: SimGPU | TorchVRAM,
        *,
        lines: int = 5,
        line_interval_s: float = 0.01,
        keep_alive_s: float = 300.0,
        **kw: Any,
    ) -> None:
        self.lines = lines
        self.line_interval_s = line_interval_s
        self.keep_alive_s = keep_alive_s
        self.line_times: list[list[float]] = []
        #: The loaded models: name -> when it expires (time.time(); inf: never, or in use now).
        self.models: dict[str, float] = {}
        self._expiries: dict[str, asyncio.Task[None]] = {}
        self._in_use: dict[str, int] = {}
        super().__init__(name, vram, **kw)
        if self.loaded:
            self.models[self.model] = float("inf")
            self.hold_memory()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """ollama's routes."""
        router.add_get("/", self.root)
        router.add_post("/api/generate", self.generate)
        router.add_post("/api/chat", self.chat)
        router.add_get("/api/tags", self.tags)
        router.add_post("/api/show", self.show)
        router.add_get("/api/ps", self.ps)
        router.add_post("/v1/chat/completions", self.chat_completions)
        router.add_get("/v1/models", self.models_v1)

    # -- models in memory --

    def model_mib(self) -> int:
        """Each loaded model holds vram_mib."""
        return self.vram_mib * len(self.models)

    def restart(self) -> None:
        """Ollama restarted: no model loaded any more."""
        self.models.clear()
        self._expiries.clear()
        self._in_use.clear()
        super().restart()

    async def load_model(self, model: str) -> None:
        """Load ``model`` beside the others (after load_s); it does not expire while in use."""
        self._cancel_expiry(model)
        async with self._load_lock:
            if model not in self.models:
                await asyncio.sleep(self.load_s)
                if self._release_task is not None:
                    self._release_task.cancel()
                    self._release_task = None
                self.models[model] = float("inf")
                self.loaded = True
                while True:
                    try:
                        self.hold_memory()
                        break
                    except SimOOM:
                        # Ollama's own LRU: models not in use go, the one expiring first first.
                        idle = [m for m in self.models if m != model and not self._in_use.get(m)]
                        if not idle:
                            del self.models[model]
                            self.loaded = bool(self.models)
                            raise
                        await self.unload_model(min(idle, key=lambda m: self.models[m]))
                self.loads += 1
        self.models[model] = float("inf")

    def keep(self, model: str, keep_alive: Any) -> None:
        """After a request: ``model`` stays loaded for its keep_alive (0: unloaded now), counted from the
        end of the last request using it."""
        seconds = go_duration_s(keep_alive, self.keep_alive_s)
        if model not in self.models or self._in_use.get(model) or seconds == float("inf"):
            return
        self._cancel_expiry(model)
        self.models[model] = time.time() + seconds
        self._expiries[model] = self.spawn(self._expire(model, seconds))

    async def _expire(self, model: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._expiries.pop(model, None)
        await self.unload_model(model)

    def _cancel_expiry(self, model: str) -> None:
        task = self._expiries.pop(model, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def unload_model(self, model: str) -> None:
        """Unload ``model``; the last one's memory is freed as do_unload frees it (release_s, faults)."""
        if model not in self.models:
            return
        self._cancel_expiry(model)
        del self.models[model]
        if self.models:
            self.unloads += 1
            self.hold_memory()
        else:
            await self.do_unload()

    async def ps(self, request: web.Request) -> web.Response:
        """GET /api/ps: the loaded models, longest left to live first, as api.ProcessResponse."""
        size = self.vram_mib * 2**20
        listed = []
        for model, expires in sorted(self.models.items(), key=lambda item: -item[1]):
            at = datetime.fromtimestamp(min(expires, 2**33), timezone.utc).astimezone()
            entry = {
                "name": model,
                "model": model,
                "size": size,
                "digest": "0" * 64,
                "details": self.details(),
            }
            listed.append(entry | {"expires_at": at.isoformat(), "size_vram": size, "context_length": 4096})
        return web.json_response({"models": listed})

    async def root(self, request: web.Request) -> web.Response:
        """GET / (ollama's health check)."""
        return web.Response(text="Ollama is running")

    @staticmethod
    def now() -> str:
        return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")

    @classmethod
    def chunk(cls, model: str, response: str, done: bool, **extra: Any) -> dict[str, Any]:
        """One generate answer object."""
        return {"model": model, "created_at": cls.now(), "response": response, "done": done, **extra}

    @staticmethod
    def ndjson(obj: dict[str, Any]) -> bytes:
        """One ndjson line, compact like ollama's."""
        return (json.dumps(obj, separators=(",", ":")) + "\n").encode()

    def tokens(self) -> list[str]:
        return [f"tok{i} " for i in range(self.lines)]

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """POST /api/generate {"model", "prompt", "stream" (default true), "keep_alive"}."""
        if (fault := await self.inference_fault()) is not None:
            return fault
        data = await read_json(request)
        model = str(data.get("model", "sim"))
        if not data.get("prompt"):  # ollama's way to load (or, with keep_alive 0, unload) a model
            return await self.load_or_unload(model, data.get("keep_alive"), self.chunk(model, "", True))
        tokens = self.tokens()
        final = self.chunk(model, "", True, done_reason="stop", eval_count=self.lines)
        # Each line is made when it is written: its created_at is when it left, as with ollama.
        lines = [functools.partial(lambda t: self.ndjson(self.chunk(model, t, False)), t) for t in tokens]
        lines.append(lambda: self.ndjson(final | {"created_at": self.now()}))
        whole = self.chunk(model, "".join(tokens), True, done_reason="stop", eval_count=self.lines)
        return await self.infer(request, data, lines, "application/x-ndjson", whole)

    async def load_or_unload(self, model: str, keep_alive: Any, answer: dict[str, Any]) -> web.Response:
        """A request without a prompt (or messages): load ``model``, or unload it with keep_alive 0."""
        if go_duration_s(keep_alive, self.keep_alive_s) == 0:
            if (fault := await self.admin_fault("unload")) is not None:
                return fault
            await self.unload_model(model)
            return web.json_response(answer | {"done_reason": "unload"})
        await self.load_model(model)
        self.keep(model, keep_alive)
        return web.json_response(answer | {"done_reason": "load"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /api/chat {"model", "messages", "stream" (default true)}: the reply as message chunks."""
        if (fault := await self.inference_fault()) is not None:
            return fault
        data = await read_json(request)
        model = str(data.get("model", "sim"))

        def line(content: str, done: bool, **extra: Any) -> dict[str, Any]:
            message = {"role": "assistant", "content": content}
            return {"model": model, "created_at": self.now(), "message": message, "done": done, **extra}

        if not data.get("messages"):  # as /api/generate without a prompt
            return await self.load_or_unload(model, data.get("keep_alive"), line("", True))
        tokens = self.tokens()
        final = {"done_reason": "stop", "eval_count": self.lines}
        lines = [functools.partial(lambda t: self.ndjson(line(t, False)), t) for t in tokens]
        lines.append(lambda: self.ndjson(line("", True, **final)))
        whole = line("".join(tokens), True, **final)
        return await self.infer(request, data, lines, "application/x-ndjson", whole)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions (OpenAI's API): one chat.completion, or chat.completion.chunk events
        as server-sent events ending with ``data: [DONE]``."""
        if (fault := await self.inference_fault()) is not None:
            return fault
        data = await read_json(request)
        model = str(data.get("model", "sim"))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "created": int(time.time()), "model": model}
        head["system_fingerprint"] = "fp_ollama"

        def event(delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            chunk = head | {"object": "chat.completion.chunk", "choices": [choice]}
            return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

        tokens = self.tokens()
        lines = [functools.partial(event, {"role": "assistant", "content": t}, None) for t in tokens]
        lines += [
            functools.partial(event, {"role": "assistant", "content": ""}, "stop"),
            lambda: b"data: [DONE]\n\n",
        ]
        message = {"role": "assistant", "content": "".join(tokens)}
        usage = {"prompt_tokens": 1, "completion_tokens": self.lines, "total_tokens": self.lines + 1}
        whole = head | {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage,
        }
        data["stream"] = bool(data.get("stream", False))  # OpenAI's default: one answer
        return await self.infer(request, data, lines, "text/event-stream", whole)

    async def infer(
        self,
        request: web.Request,
        data: dict[str, Any],
        lines: list[Callable[[], bytes]],
        content_type: str,
        whole: dict[str, Any],
    ) -> web.StreamResponse:
        """The GPU part of every inference route: load the request's model, work, then stream ``lines`` or
        answer ``whole`` (``data["stream"]``, default true); the model then stays for its keep_alive."""
        model = str(data.get("model", "sim"))
        with self.gpu_work(request[RECORD]):
            self._in_use[model] = self._in_use.get(model, 0) + 1
            try:
                await self.load_model(model)
                await asyncio.sleep(self.work_s)
                if not data.get("stream", True):
                    await asyncio.sleep(self.lines * self.line_interval_s)
                    return web.json_response(whole)
                return await self.stream(request, lines, content_type)
            finally:
                self._in_use[model] -= 1
                self.keep(model, data.get("keep_alive"))

    async def stream(
        self, request: web.Request, lines: list[Callable[[], bytes]], content_type: str
    ) -> web.StreamResponse:
        """Write the lines, each made as it is written: the token lines one every line_interval_s, what
        follows them at once."""
        times: list[float] = []
        self.line_times.append(times)
        resp = web.StreamResponse()
        resp.content_type = content_type
        await resp.prepare(request)
        for i, line in enumerate(lines):
            await resp.write(line())
            times.append(time.monotonic())
            if i < self.lines:
                await asyncio.sleep(self.line_interval_s)
        await resp.write_eof()
        return resp

    def details(self) -> dict[str, Any]:
        return {"format": "gguf", "family": "sim", "parameter_size": "1B", "quantization_level": "Q4_0"}

    async def tags(self, request: web.Request) -> web.Response:
        """GET /api/tags: the one simulated model."""
        model = {"name": self.model, "model": self.model, "modified_at": self.now(), "size": 1 << 30}
        model |= {"digest": "0" * 64, "details": self.details()}
        return web.json_response({"models": [model]})

    async def show(self, request: web.Request) -> web.Response:
        """POST /api/show: a little model information (no GPU work)."""
        body = {"modelfile": "# simulated", "parameters": "", "details": self.details()}
        body |= {"model_info": {"general.architecture": "sim"}, "capabilities": ["completion"]}
        return web.json_response(body)

    async def models_v1(self, request: web.Request) -> web.Response:
        """GET /v1/models (OpenAI's API)."""
        model = {"id": self.model, "object": "model", "created": int(time.time()), "owned_by": "library"}
        return web.json_response({"object": "list", "data": [model]})


# ---- ComfyUI ----


#: ComfyUI's answer to a request its handler failed on (aiohttp's, for the exception ``await
#: request.json()`` raises on a body that is no JSON, or ``.get`` on JSON that is no object).
COMFY_TROUBLE = "500 Internal Server Error\n\nServer got itself in trouble"
#: The node types that make a prompt's outputs (ComfyUI's OUTPUT_NODE classes the sim knows).
COMFY_OUTPUT_NODES = frozenset({"SaveImage", "PreviewImage"})


class ComfySim(SimConsumer):
    """ComfyUI: POST /prompt queues a render and answers at once; its prompt worker renders one prompt at a
    time, in the order queued; /history tells when one is done.

    GET /ws?clientId=... is its WebSocket: a ``status`` message on connect, and to every socket whenever
    the queue changes. A render's own messages (``execution_start``, ``execution_cached``, ``executing``
    node "1", ``execution_success`` or ``execution_error``, ``executing`` node null: done) go only to the
    socket whose clientId the prompt named in ``client_id``, and nowhere when it named none, as ComfyUI
    sends them. What a client sends comes back unchanged (text as text, binary as binary); the text
    ``close <code>`` makes the sim close the socket with that code. ``ws_closes`` records the close codes
    the sim saw from its peers.

    Every route is served under /api too, as ComfyUI serves them. GET / is a page whose module script
    (assets/app.js) queues a prompt through api/prompt and opens ws, recording what happened in
    ``window.comfysim``. Like ComfyUI with its default flags, a request whose Origin names another host
    than its Host is refused with 403 when that Host is a loopback address (``refused_origins`` lists
    their paths).

    Like the real one (v0.8.0, as seen in ``make test-real``): its Python process keeps its CUDA context
    (610 MiB, as measured on an H100 in fixtures/nvidia-smi/) after ``/free``; ``/free`` needs a JSON
    object (500 without one), answers an empty 200 without a content type, and unloads between prompts (a
    ``/free`` during a render takes effect when it ends; both its flags in one body race, see ``free``);
    ``/queue`` lists ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``; a ``/history`` entry
    carries ``prompt`` (that list), ``outputs``, ``status`` (its messages with timestamps) and ``meta``; a
    restart forgets every prompt (``/history/{id}`` stays ``{}``).
    """

    health_path = "/system_stats"
    default_vram_mib = 13000
    default_context_mib = 610
    process_name = "/opt/ComfyUI/.venv/bin/python3"

    def __init__(self, name: str, vram: SimGPU | TorchVRAM, **kw: Any) -> None:
        self.number = 0
        #: prompt_id -> its queue entry [number, prompt_id, prompt, extra_data, outputs_to_execute], while
        #: it waits or renders; ``running`` is the one rendering.
        self.queued: dict[str, list[Any]] = {}
        self.running: str | None = None
        #: prompt_id -> its /history entry, once done.
        self.entries: dict[str, dict[str, Any]] = {}
        self.finished: set[str] = set()
        self.failed: set[str] = set()
        self.saved = 0  #: images "saved" so far (their file names count up, as ComfyUI's do)
        #: The flags /free set that its prompt worker has not read yet (ComfyUI's PromptQueue.flags).
        self.flags: dict[str, bool] = {}
        self.sockets: set[web.WebSocketResponse] = set()
        #: clientId -> its socket (a new socket with the same clientId replaces the old one, as in ComfyUI).
        self.clients: dict[str, web.WebSocketResponse] = {}
        self.ws_closes: list[int | None] = []
        self.refused_origins: list[str] = []
        self._worker = asyncio.Lock()
        #: Cleared, a render goes on past its work_s until it is set again: a hold that ends when a test says.
        self.may_finish = asyncio.Event()
        self.may_finish.set()
        super().__init__(name, vram, **kw)

    def make_app(self) -> web.Application:
        """ComfyUI's app, with its origin check."""
        app = super().make_app()
        app.middlewares.append(self._origin_check)
        return app

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """ComfyUI's routes, each under /api too."""
        for prefix in ("", "/api"):
            router.add_get(prefix + "/system_stats", self.system_stats)
            router.add_post(prefix + "/prompt", self.prompt)
            router.add_get(prefix + "/history", self.all_history)
            router.add_get(prefix + "/history/{prompt_id}", self.history)
            router.add_get(prefix + "/queue", self.queue)
            router.add_post(prefix + "/free", self.free)
            router.add_post(prefix + "/interrupt", self.interrupt)
            router.add_get(prefix + "/ws", self.ws)
        router.add_get("/", self.page)
        router.add_get("/assets/app.js", self.script)

    @web.middleware
    async def _origin_check(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """ComfyUI's check without --enable-cors-header: Origin's host (and port, when both name one) must
        be the Host's when the Host is a loopback address, else 403; OPTIONS is answered by the check."""
        host, origin = request.headers.get("Host", ""), request.headers.get("Origin", "")
        if host and origin:
            asked, came = urllib.parse.urlsplit("//" + host.lower()), urllib.parse.urlsplit(origin.lower())
            both_ports = asked.port is not None and came.port is not None
            same = (asked.netloc == came.netloc) if both_ports else (asked.hostname == came.hostname)
            if not same and asked.hostname and came.hostname and is_loopback(asked.hostname):
                self.refused_origins.append(request.path)
                return web.Response(status=403)
        if request.method == "OPTIONS":
            return web.Response()
        return await handler(request)

    async def page(self, request: web.Request) -> web.Response:
        """GET /: the web UI's page, which loads its code as a module script (relative URL)."""
        return web.Response(text=COMFY_PAGE, content_type="text/html")

    async def script(self, request: web.Request) -> web.Response:
        """GET /assets/app.js: the page's module script."""
        return web.Response(text=COMFY_SCRIPT, content_type="application/javascript")

    async def system_stats(self, request: web.Request) -> web.Response:
        """GET /system_stats (ComfyUI's health check)."""
        total = self.vram.total_mib(self.gpu) * 2**20
        free = self.vram.free_mib(self.gpu) * 2**20
        device = {"name": f"cuda:{self.gpu} NVIDIA SIM", "type": "cuda", "index": self.gpu}
        device |= {"vram_total": total, "vram_free": free, "torch_vram_total": total, "torch_vram_free": free}
        system = {"os": "posix", "comfyui_version": "0.0.0-sim", "python_version": sys.version.split()[0]}
        return web.json_response({"system": system, "devices": [device]})

    async def prompt(self, request: web.Request) -> web.Response:
        """POST /prompt: queue the render and answer at once (the sim takes any prompt, even {}). A client's
        own ``prompt_id`` is taken, as ComfyUI takes it (server.py: ``str(json_data.get("prompt_id",
        uuid.uuid4()))``), and its /history entry stays the last render's until this one ends."""
        if (fault := await self.inference_fault()) is not None:
            return fault
        data = await read_json(request)
        prompt = data.get("prompt") if isinstance(data.get("prompt"), dict) else {}
        prompt_id = str(data.get("prompt_id", uuid.uuid4()))
        number = self.number
        self.number += 1
        extra = dict(data["extra_data"]) if isinstance(data.get("extra_data"), dict) else {}
        if "client_id" in data:
            extra["client_id"] = data["client_id"]
        extra["create_time"] = int(time.time() * 1000)
        outputs = [n for n, node in prompt.items() if (node or {}).get("class_type") in COMFY_OUTPUT_NODES]
        self.queued[prompt_id] = [number, prompt_id, prompt, extra, outputs]
        self.spawn(self._render(prompt_id, dataclasses.replace(request[RECORD])))
        await self.queue_updated()
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def _render(self, prompt_id: str, record: Record) -> None:
        """The prompt worker's turn for one prompt: GPU work from the POST until work_s after the model is
        loaded. A model that does not fit fails the prompt (its history says so), as CUDA out-of-memory
        does in ComfyUI. After each prompt the worker unloads if a /free came meanwhile."""
        item = self.queued[prompt_id]
        client = item[3].get("client_id")
        messages: list[list[Any]] = []

        async def tell(kind: str, data: dict[str, Any]) -> None:
            """Send a message of the render to the socket of the client the prompt named (if it did)."""
            if client is not None:
                await self.send(kind, data, str(client))

        async def note(kind: str, data: dict[str, Any]) -> None:
            """A message of the render's status: kept for its history, and told to its client."""
            data = {**data, "prompt_id": prompt_id, "timestamp": int(time.time() * 1000)}
            messages.append([kind, data])
            await tell(kind, data)

        try:
            async with self._worker:
                self.running = prompt_id
                with self.gpu_work(record):
                    await note("execution_start", {})
                    await note("execution_cached", {"nodes": []})
                    await tell("executing", {"node": "1", "display_node": "1", "prompt_id": prompt_id})
                    try:
                        await self.do_load()
                        await asyncio.sleep(self.work_s)
                        await self.may_finish.wait()
                        ok = True
                    except SimOOM:
                        ok = False
                if ok:
                    await note("execution_success", {})
                    self.finished.add(prompt_id)
                else:
                    error = {"node_id": "1", "exception_type": "torch.OutOfMemoryError"}
                    await note("execution_error", error | {"exception_message": "Allocation on device"})
                    self.failed.add(prompt_id)
                self.entries[prompt_id] = self.history_entry(item, ok, messages)
                del self.queued[prompt_id]
                self.running = None
                await self.queue_updated()
                await tell("executing", {"node": None, "prompt_id": prompt_id})
                await self.read_flags()
        finally:
            record.end = time.monotonic()
            self.queued.pop(prompt_id, None)
            if self.running == prompt_id:
                self.running = None

    def history_entry(self, item: list[Any], ok: bool, messages: list[list[Any]]) -> dict[str, Any]:
        """A /history entry as ComfyUI writes it: the queue entry, the outputs of its output nodes (an image
        each), the status with the render's messages, and what the outputs' nodes were."""
        outputs, meta = {}, {}
        for node in item[4] if ok else ():
            self.saved += 1
            image = {"filename": f"ComfyUI_{self.saved:05}_.png", "subfolder": "", "type": "output"}
            outputs[node] = {"images": [image]}
            meta[node] = {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
        status = {"status_str": "success" if ok else "error", "completed": ok, "messages": messages}
        return {"prompt": item, "outputs": outputs, "status": status, "meta": meta}

    async def send(self, kind: str, data: dict[str, Any], client: str | None = None) -> None:
        """Send a ComfyUI message to one client's socket (``client``: none if it has none open now), or to
        every socket (None)."""
        if client is None:
            targets = list(self.sockets)
        else:
            targets = [self.clients[client]] if client in self.clients else []
        for ws in targets:
            with contextlib.suppress(ConnectionError):  # a socket closing meanwhile misses it
                await ws.send_json({"type": kind, "data": data})

    async def queue_updated(self) -> None:
        """The queue changed: a ``status`` message to every socket."""
        await self.send("status", {"status": {"exec_info": {"queue_remaining": len(self.queued)}}})

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        """GET /ws?clientId=...: progress messages out, what the client sends echoed back."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId") or uuid.uuid4().hex
        self.sockets.add(ws)
        self.clients[sid] = ws
        try:
            status = {"status": {"exec_info": {"queue_remaining": len(self.queued)}}, "sid": sid}
            await ws.send_json({"type": "status", "data": status})
            async for msg in ws:
                if msg.type == web.WSMsgType.TEXT and msg.data.startswith("close "):
                    await ws.close(code=int(msg.data.split()[1]))
                elif msg.type == web.WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == web.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            self.sockets.discard(ws)
            if self.clients.get(sid) is ws:
                del self.clients[sid]
            self.ws_closes.append(ws.close_code)
        return ws

    async def history(self, request: web.Request) -> web.Response:
        """GET /history/{prompt_id}: {} until that render has finished (or failed); {} for ever for a
        prompt it forgot in a restart."""
        prompt_id = request.match_info["prompt_id"]
        if prompt_id not in self.entries:
            return web.json_response({})
        return web.json_response({prompt_id: self.entries[prompt_id]})

    def restart(self) -> None:
        """ComfyUI restarted: its queue and history are gone with the process."""
        super().restart()
        self.flags.clear()
        self.queued.clear()
        self.running = None
        self.entries.clear()
        self.finished.clear()
        self.failed.clear()
        self._worker = asyncio.Lock()

    async def all_history(self, request: web.Request) -> web.Response:
        """GET /history: every render done."""
        return web.json_response(self.entries)

    async def interrupt(self, request: web.Request) -> web.Response:
        """POST /interrupt: answered at once (the sim's renders run to their end)."""
        return web.Response()

    async def queue(self, request: web.Request) -> web.Response:
        """GET /queue: the render in progress and those waiting, as queue entries."""
        running = [item for prompt_id, item in self.queued.items() if prompt_id == self.running]
        pending = [item for prompt_id, item in self.queued.items() if prompt_id != self.running]
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def free(self, request: web.Request) -> web.Response:
        """POST /free {"free_memory": true} (or "unload_models"): answers at once, and its prompt worker
        unloads the models when no render runs, at once or after the one running. Without a JSON object:
        500, as ComfyUI answers.

        ComfyUI 0.8.0 (server.py's post_free, main.py's prompt_worker, execution.py's PromptQueue) sets
        each flag the body names, one after the other, each with a wake-up of its worker; the worker reads
        (and clears) all the flags after each prompt, or when woken idle: ``unload_models`` (which
        ``free_memory`` implies) unloads the models. With both flags, an idle worker may wake between the
        two (4 of 10 tries in front of the real one) and, busy unloading, miss the second wake-up:
        ``free_memory`` then stays set until the next prompt, whose model is dropped as soon as it is done
        (a wasted load). The sim always plays that race; either flag alone never races."""
        try:
            data = json.loads(await request.read())
        except ValueError:
            data = None
        if not isinstance(data, dict):
            return web.Response(status=500, text=COMFY_TROUBLE)
        flags = [flag for flag in ("unload_models", "free_memory") if data.get(flag)]
        if flags and (fault := await self.admin_fault("unload")) is not None:
            return fault
        for i, flag in enumerate(flags):
            self.flags[flag] = True
            if i == 0 and self.running is None:  # the idle worker wakes now, before the next flag is set
                await self.read_flags()
        return web.Response(status=200)

    async def read_flags(self) -> None:
        """The prompt worker reads and clears the flags (after each prompt, or woken idle): with
        ``unload_models``, or ``free_memory``, which implies it, it unloads the models."""
        flags, self.flags = self.flags, {}
        if flags.get("unload_models", flags.get("free_memory", False)):
            await self.do_unload()


def is_loopback(host: str) -> bool:
    """A loopback address or localhost (ComfyUI resolves names; the sim knows these)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


#: ComfySim's web UI: a page and its module script, which records in window.comfysim what its prompt and
#: its WebSocket got.
COMFY_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ComfySim</title>
<script type="module" src="assets/app.js"></script></head>
<body><p id="state">the module script did not run</p></body></html>
"""
COMFY_SCRIPT = """const sim = {messages: []};
window.comfysim = sim;
document.getElementById("state").textContent = "running";
const base = new URL(".", location.href);
const socket = new WebSocket(new URL("ws?clientId=page", base).href.replace(/^http/, "ws"));
socket.onopen = () => { sim.ws = "open"; };
socket.onerror = () => { sim.ws = "error"; };
socket.onmessage = (ev) => { sim.messages.push(JSON.parse(ev.data).type); };
const body = JSON.stringify({prompt: {}, client_id: "page"});
const resp = await fetch(new URL("api/prompt", base), {method: "POST", body,
                         headers: {"Content-Type": "application/json"}});
const answer = resp.ok ? await resp.json() : null;
sim.prompt_id = answer ? answer.prompt_id : null;
sim.prompt = resp.status;  // last: the page has everything once it is set
"""


# ---- whisper ----


class WhisperSim(SimConsumer):
    """whisper.cpp's whisper-server: POST /inference (multipart audio) -> a transcript.

    Like the real one (233fe1fc, as seen in ``make test-real``): its process loads its model before it
    binds its port (run by ``consumers`` or ``start``, it refuses connections for load_s, then answers with
    its model loaded; in-process, a test may still serve it unloaded, and its first job loads it). Its
    error handler rewrites every answer whose status is neither 400 nor 500 to ``404 File Not Found
    (<path>)`` and a 400's body to ``Invalid request``, both text/plain: an unknown route or method is a
    404, and so is its health route's 503 during a model swap (the "health_status" fault plays that).
    """

    default_vram_mib = 1500
    process_name = "/usr/local/bin/whisper-server"
    loads_at_start = "before_listening"

    def make_app(self) -> web.Application:
        """whisper-server's app: its error handler around everything (faults included)."""
        app = super().make_app()
        app.middlewares.insert(0, self._error_handler)
        return app

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """whisper's routes."""
        router.add_get("/health", self.health)
        router.add_post("/inference", self.inference)

    @web.middleware
    async def _error_handler(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """cpp-httplib's error handler as whisper-server sets it: 400 says "Invalid request", 500 stays,
        every other error status becomes 404 "File Not Found (<path>)"."""
        try:
            resp = await handler(request)
            status = resp.status
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp, status = None, e.status
        if status < 400 or (status == 500 and resp is not None):
            assert resp is not None
            return resp
        if status == 400:
            return web.Response(status=400, body=b"Invalid request", content_type="text/plain")
        if status == 500:
            return web.Response(status=500, body=b"500 Internal Server Error", content_type="text/plain")
        text = f"File Not Found ({request.path})".encode()
        return web.Response(status=404, body=text, content_type="text/plain")

    async def health(self, request: web.Request) -> web.Response:
        """GET /health."""
        return web.json_response({"status": "ok"})

    async def inference(self, request: web.Request) -> web.Response:
        """POST /inference (multipart audio) -> {"text": ...} after work_s."""
        if (fault := await self.inference_fault()) is not None:
            return fault
        await self.run_work(request)
        return web.json_response({"text": "simulated transcript"})


# ---- the other services mgpumanager's presets name ----

OPENAI_LLM = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
#: service -> its health path, its GPU-work paths (POST), and its other routes (method, path, handler).
SERVICES: dict[str, dict[str, Any]] = {
    "vllm": {
        "health": "/health",
        "work": OPENAI_LLM,
        "routes": [
            ("POST", "/sleep", "sleep"),
            ("POST", "/wake_up", "wake"),
            ("GET", "/is_sleeping", "sleeping"),
        ],
    },
    "sglang": {
        "health": "/v1/models",
        "work": OPENAI_LLM,
        "routes": [
            ("POST", "/release_memory_occupation", "sleep"),
            ("POST", "/resume_memory_occupation", "wake"),
        ],
    },
    "a1111": {
        "health": "/sdapi/v1/progress",
        "work": ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"),
        "routes": [
            ("POST", "/sdapi/v1/unload-checkpoint", "sleep"),
            ("POST", "/sdapi/v1/reload-checkpoint", "wake"),
        ],
    },
    "tabbyapi": {
        "health": "/health",
        "work": OPENAI_LLM,
        "routes": [("POST", "/v1/model/unload", "sleep"), ("GET", "/v1/model", "current")],
    },
    "llama-cpp": {
        "health": "/health",
        "work": OPENAI_LLM,
        "routes": [("GET", "/props", "sleeping"), ("GET", "/v1/models", "model_list")],
    },
    "llama-cpp-router": {
        "health": "/health",
        "work": OPENAI_LLM,
        "routes": [
            ("GET", "/models", "listed"),
            ("POST", "/models/unload", "unload"),
            ("POST", "/models/load", "load"),
        ],
    },
    "speaches": {
        "health": "/health",
        "work": ("/v1/audio/transcriptions", "/v1/audio/speech"),
        "routes": [
            ("GET", "/api/ps", "listed"),
            ("DELETE", "/api/ps/{model:.+}", "unload"),
            ("POST", "/api/ps/{model:.+}", "load"),
        ],
    },
    "localai": {
        "health": "/readyz",
        "work": (*OPENAI_LLM, "/v1/audio/transcriptions", "/v1/audio/speech", "/v1/images/generations"),
        "routes": [("GET", "/system", "listed"), ("POST", "/backend/shutdown", "unload")],
    },
}
#: Services that hold several models, each loaded by the first request naming it.
MULTI_MODEL = frozenset({"llama-cpp-router", "speaches", "localai"})
#: Services that answer GPU work only while their model is in memory (they do not wake on a request).
NO_WAKE = frozenset({"vllm", "sglang", "tabbyapi"})
#: llama.cpp's llama-server, with one model or as a router: its own error answers (llama_error).
LLAMA_SERVER = frozenset({"llama-cpp", "llama-cpp-router"})


def llama_error(status: int, message: str, kind: str) -> web.Response:
    """An error as llama-server answers it: {"error": {"code", "message", "type"}}, JSON."""
    return web.json_response({"error": {"code": status, "message": message, "type": kind}}, status=status)


class ServiceSim(SimConsumer):
    """One of the services of SERVICES, by that table: its health route; GPU work on its work paths (which
    loads the request's ``model``, or the one model); its unload, load, residency and listing routes,
    answering what the real service answers (read in its source), errors included. Multi-model services hold
    vram_mib per loaded model; ``models`` lists the model ids a router knows besides those requested.

    llama.cpp's llama-server as seen in ``make test-real``: with one model, its process listens at once and
    answers every route, /health included, ``503 {"error": {"message": "Loading model", ...}}`` until its
    model is loaded (``start_loading``; run by ``consumers`` or ``start`` it does so); asleep
    (``--sleep-idle-seconds``) a request wakes it and waits. As a router it answers at once; its
    ``/models/load`` answers before the model is loaded (listed ``loading`` until it is), loading a model
    that runs answers 400 "model is already running", unloading one that does not 400 "model is not
    running", an unknown model 400 "model is not found" to an unload and 404 "File Not Found" to a load,
    a body that is no JSON 500; its ``/models/unload`` answers before the model's instance has exited
    (listed ``loaded`` until it has: release_s). An unknown route is a 404 "File Not Found", in JSON.
    """

    def __init__(
        self, name: str, vram: SimGPU | TorchVRAM, *, service: str, models: tuple[str, ...] = (), **kw: Any
    ) -> None:
        self.service = service
        self.spec = SERVICES[service]
        self.health_path = self.spec["health"]
        self.catalog = set(models)
        #: Multi-model services: the models in memory, in load order.
        self.models: dict[str, None] = {}
        #: Multi-model services: how many loads of each model are under way (a router lists it loading).
        self.loading: dict[str, int] = {}
        #: A router's loads that its /models/load started (an unload stops them).
        self._router_loads: dict[str, asyncio.Task[None]] = {}
        #: llama-server loading its model as its process starts: every route answers 503.
        self.starting = False
        self.loads_at_start = "while_listening" if service == "llama-cpp" else ""
        super().__init__(name, vram, **kw)
        if self.loaded and service in MULTI_MODEL:
            self.models["sim-model"] = None
            self.hold_memory()

    def make_app(self) -> web.Application:
        """The service's app; llama-server's with its own answers while loading and to unknown routes."""
        app = super().make_app()
        if self.service in LLAMA_SERVER:
            app.middlewares.append(self._llama_server)
        return app

    @web.middleware
    async def _llama_server(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """llama-server: 503 "Loading model" on every route while it loads at start; its JSON 404."""
        if self.starting:
            message = {"message": "Loading model", "type": "unavailable_error", "code": 503}
            return web.json_response({"error": message}, status=503)
        try:
            return await handler(request)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            message = {"message": "File Not Found", "type": "not_found_error", "code": 404}
            return web.json_response({"error": message}, status=404)

    def start_loading(self) -> None:
        """Its process has started and listens: llama-server loads its model (load_s), answering 503 on
        every route until it is loaded."""
        self.starting = True
        self.spawn(self._load_at_start())

    async def _load_at_start(self) -> None:
        try:
            await self.do_load()
        except SimOOM:  # llama-server exits when its model cannot be loaded; the sim stays, unloaded
            print(f"mgpusim: {self.name}: its model does not fit on the GPU", file=sys.stderr)
        finally:
            self.starting = False

    def restart(self) -> None:
        """The service restarts: its models are gone with the process."""
        self.models.clear()
        self.loading.clear()
        self._router_loads.clear()  # their tasks die with the process (super().restart cancels them)
        self.starting = False
        super().restart()

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """The service's routes, from SERVICES."""
        router.add_get(self.spec["health"], self.health)
        for path in self.spec["work"]:
            router.add_post(path, self.work_route)
        for method, path, handler in self.spec["routes"]:
            router.add_route(method, path, getattr(self, handler))

    async def health(self, request: web.Request) -> web.Response:
        """The health route: LocalAI's /readyz answers no content, the others a little JSON."""
        if self.service == "localai":
            return web.Response(status=200)
        return web.json_response({"status": "ok"})

    async def work_route(self, request: web.Request) -> web.Response:
        """GPU work: loads the model named in the request (multi-model), or needs the one model loaded."""
        if (fault := await self.inference_fault()) is not None:
            return fault
        data = await request.read()
        model = "sim-model"
        with contextlib.suppress(ValueError, AttributeError):
            model = str(json.loads(data).get("model") or model)
        if self.service in NO_WAKE and not self.loaded:
            return web.json_response({"error": {"message": "No models are currently loaded."}}, status=503)
        with self.gpu_work(request[RECORD]):
            if self.service in MULTI_MODEL:
                await self.load_model(model)
            else:
                await self.do_load()
            await asyncio.sleep(self.work_s)
        return web.json_response({"object": "sim.result", "model": model, "path": request.path})

    def model_mib(self) -> int:
        """A several-model service: each loaded model holds vram_mib."""
        if self.service in MULTI_MODEL:
            return self.vram_mib * len(self.models)
        return super().model_mib()

    async def load_model(self, model: str) -> None:
        """Load ``model`` beside the others; each holds vram_mib."""
        self.loading[model] = self.loading.get(model, 0) + 1
        try:
            async with self._load_lock:
                if model in self.models:
                    return
                await asyncio.sleep(self.load_s)
                self.models[model] = None
                self.catalog.add(model)
                self.loaded = True
                self.hold_memory()
                self.loads += 1
        finally:
            if (left := self.loading.get(model, 1) - 1) > 0:
                self.loading[model] = left
            else:
                self.loading.pop(model, None)

    async def unload_model(self, model: str) -> None:
        """Unload ``model``; the last one's memory goes as do_unload frees it."""
        del self.models[model]
        if self.models:
            self.unloads += 1
            self.hold_memory()
        else:
            await self.do_unload()

    # -- one model --

    async def sleep(self, request: web.Request) -> web.Response:
        """vLLM's /sleep?level=N, SGLang's /release_memory_occupation (a JSON body), A1111's
        unload-checkpoint, tabbyAPI's /v1/model/unload (503 without a model)."""
        if self.service == "vllm" and not request.query.get("level", "1").isdigit():
            return web.json_response({"detail": "level must be a number"}, status=400)
        if self.service == "sglang" and not isinstance(await read_json(request), dict):
            return web.json_response({"detail": "a JSON body is required"}, status=422)
        if self.service == "tabbyapi" and not self.loaded:
            return web.json_response({"detail": "No models are currently loaded."}, status=503)
        if (fault := await self.admin_fault("unload")) is not None:
            return fault
        await self.do_unload()
        return web.json_response({}) if self.service == "a1111" else web.Response(status=200)

    async def wake(self, request: web.Request) -> web.Response:
        """vLLM's /wake_up, SGLang's /resume_memory_occupation, A1111's reload-checkpoint."""
        if (fault := await self.admin_fault("load")) is not None:
            return fault
        await self.do_load()
        return web.json_response({}) if self.service == "a1111" else web.Response(status=200)

    async def sleeping(self, request: web.Request) -> web.Response:
        """vLLM's /is_sleeping, llama.cpp's /props (is_sleeping beside the rest of its properties); the fault
        "state_status" answers that status instead."""
        if self.faults.get("state_status"):
            return error_response(self.faults["state_status"])
        if self.service == "llama-cpp":
            return web.json_response(
                {"total_slots": 1, "model_path": "sim.gguf", "is_sleeping": not self.loaded}
            )
        return web.json_response({"is_sleeping": not self.loaded})

    async def current(self, request: web.Request) -> web.Response:
        """tabbyAPI's GET /v1/model: the loaded model's card, or 503."""
        if not self.loaded:
            return web.json_response({"detail": "No models are currently loaded."}, status=503)
        return web.json_response({"id": "sim-model", "object": "model", "owned_by": "tabbyAPI"})

    async def model_list(self, request: web.Request) -> web.Response:
        """llama-server's GET /v1/models (what the OpenAI client's models.list asks): its one model."""
        model = {"id": "sim-model", "object": "model", "owned_by": "llamacpp"}
        return web.json_response({"object": "list", "data": [model]})

    # -- several models --

    async def listed(self, request: web.Request) -> web.Response:
        """The list of models: llama.cpp router's /models (every known model with status.value), speaches'
        /api/ps (the ids loaded), LocalAI's /system (loaded_models)."""
        if self.service == "llama-cpp-router":
            data = [
                {
                    "id": m,
                    "object": "model",
                    "owned_by": "llamacpp",
                    "status": {"value": self.model_status(m)},
                }
                for m in sorted(self.catalog | set(self.models))
            ]
            return web.json_response({"data": data, "object": "list"})
        if self.service == "speaches":
            return web.json_response({"models": list(self.models)})
        loaded = [{"id": m, "backend": "llama-cpp"} for m in self.models]
        return web.json_response({"backends": ["llama-cpp"], "loaded_models": loaded})

    def model_status(self, model: str) -> str:
        """A router's word for a model: loaded, loading or unloaded."""
        if model in self.models:
            return "loaded"
        return "loading" if model in self.loading or model in self._router_loads else "unloaded"

    async def router_body(self, request: web.Request) -> str | web.Response:
        """The model a router's /models/load or /models/unload names, or its 500 for a body that is no
        JSON (its parser's message)."""
        try:
            data = json.loads(await request.read())
        except ValueError:
            message = "[json.exception.parse_error.101] parse error at line 1, column 1"
            return llama_error(500, message, "server_error")
        return str(data.get("model") or "") if isinstance(data, dict) else ""

    async def unload(self, request: web.Request) -> web.Response:
        """llama.cpp router's /models/unload, speaches' DELETE /api/ps/{id}, LocalAI's /backend/shutdown."""
        if self.service == "llama-cpp-router":
            return await self.router_unload(request)
        model = request.match_info.get("model") or str((await read_json(request)).get("model") or "")
        if (fault := await self.admin_fault("unload")) is not None:
            return fault
        if self.service == "localai" and not model:
            return web.json_response({"error": "model is required"}, status=400)
        if model not in self.models:
            return web.json_response({"error": {"message": f"model {model} is not running"}}, status=404)
        await self.unload_model(model)
        if self.service == "speaches":
            return web.json_response({"message": f"Model {model} unloaded."})
        return web.json_response({"message": "model stopped"})

    async def router_unload(self, request: web.Request) -> web.Response:
        """llama.cpp router's POST /models/unload {"model": id}: answers at once; a model still loading is
        stopped at once, a loaded one's instance exits release_s later (listed loaded, holding its memory,
        until then)."""
        model = await self.router_body(request)
        if isinstance(model, web.Response):
            return model
        if (fault := await self.admin_fault("unload")) is not None:
            return fault
        if model not in self.catalog | set(self.models):
            return llama_error(400, "model is not found", "invalid_request_error")
        if self.model_status(model) == "unloaded":
            return llama_error(400, "model is not running", "invalid_request_error")
        if (task := self._router_loads.pop(model, None)) is not None:  # stopped while it loads
            task.cancel()
            await asyncio.wait([task])
        if model in self.loading:  # a load a request started ends first
            async with self._load_lock:
                pass
        if model in self.models and self.release_s > 0:  # its instance exits after the answer
            self.spawn(self._router_stop(model))
        elif model in self.models:
            await self.unload_model(model)
        return web.json_response({"success": True})

    async def _router_stop(self, model: str) -> None:
        """A router's model instance exiting release_s after its unload: listed loaded until then."""
        await asyncio.sleep(self.release_s)
        async with self._release_lock:
            pass
        if model in self.models:
            del self.models[model]
            self.loaded = bool(self.models)
            self.unloads += 1
            self.hold_memory()

    async def load(self, request: web.Request) -> web.Response:
        """llama.cpp router's /models/load {"model"}, speaches' POST /api/ps/{id}."""
        if self.service == "llama-cpp-router":
            return await self.router_load(request)
        model = request.match_info.get("model") or str((await read_json(request)).get("model") or "")
        if (fault := await self.admin_fault("load")) is not None:
            return fault
        if model in self.models:
            return web.json_response({"error": {"message": "model is already running"}}, status=409)
        await self.load_model(model)
        return web.json_response({"success": True}, status=201)

    async def router_load(self, request: web.Request) -> web.Response:
        """llama.cpp router's POST /models/load {"model": id}: answers at once, the model loads meanwhile."""
        model = await self.router_body(request)
        if isinstance(model, web.Response):
            return model
        if (fault := await self.admin_fault("load")) is not None:
            return fault
        if model not in self.catalog | set(self.models):
            return llama_error(404, "File Not Found", "not_found_error")  # its 404 handler's words
        if self.model_status(model) != "unloaded":
            return llama_error(400, "model is already running", "invalid_request_error")
        self._router_loads[model] = self.spawn(self._router_load(model))  # listed as loading from now on
        return web.json_response({"success": True})

    async def _router_load(self, model: str) -> None:
        try:
            await self.load_model(model)
        finally:
            if self._router_loads.get(model) is asyncio.current_task():
                del self._router_loads[model]


# ---- consumers command ----

KINDS: dict[str, Callable[..., SimConsumer]] = {
    "mvoice": MvoiceSim,
    "ollama": OllamaSim,
    "comfyui": ComfySim,
    "whisper": WhisperSim,
} | {service: functools.partial(ServiceSim, service=service) for service in SERVICES}
SPEC_OPTIONS: dict[str, Any] = {
    "load_s": float,
    "work_s": float,
    "release_s": float,
    "line_interval_s": float,
    "keep_alive_s": float,
    "vram_mib": int,
    "lines": int,
    "gpu": int,
}
OLLAMA_ONLY = {"lines", "line_interval_s", "keep_alive_s"}


@dataclasses.dataclass
class ConsumerSpec:
    """One `name=kind:port[,opt=value...]` argument of the consumers command."""

    name: str
    kind: str
    port: int
    options: dict[str, Any]


def parse_spec(text: str) -> ConsumerSpec:
    """Parse `name=kind:port[,opt=value...]`, e.g. `mvoice=mvoice:8765,vram_mib=2800,loaded=true`."""
    name, _, rest = text.partition("=")
    head, *opts = rest.split(",")
    kind, _, port = head.partition(":")
    if not name or kind not in KINDS or not port.isdigit():
        raise argparse.ArgumentTypeError(f"bad spec {text!r}: want name=KIND:PORT[,opt=value...]")
    options: dict[str, Any] = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        try:
            if key == "loaded" and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                options[key] = value.lower() in ("true", "1", "yes")
            elif key in SPEC_OPTIONS and (kind == "ollama" or key not in OLLAMA_ONLY):
                options[key] = SPEC_OPTIONS[key](value)
            else:
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad option {opt!r} in {text!r}") from None
    return ConsumerSpec(name, kind, int(port), options)


async def run_consumers(args: argparse.Namespace) -> int:
    """Start every consumer, print the READY lines, run until SIGTERM or SIGINT."""
    specs: list[ConsumerSpec] = args.specs
    if len({s.name for s in specs}) != len(specs):
        raise SystemExit("consumers: two consumers have the same name")
    vram: SimGPU | TorchVRAM
    if args.vram == "torch":
        try:
            vram = TorchVRAM()
        except ImportError as e:
            raise SystemExit(f"consumers: --vram torch needs PyTorch ({e})") from e
    elif args.state is None:
        raise SystemExit("consumers: --state FILE is required with --vram state")
    elif args.attach:
        vram = SimGPU(args.state, create=False)
    else:
        gpus = args.gpus or 1 + max((s.options.get("gpu", 0) for s in specs), default=0)
        vram = SimGPU(args.state, total_mib=args.gpu_total_mib, reserved_mib=args.reserved_mib, gpus=gpus)
    sims = [KINDS[s.kind](s.name, vram, **s.options) for s in specs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    ready = []
    try:
        for spec, sim in zip(specs, sims, strict=True):
            runner = web.AppRunner(sim.app, access_log=None, shutdown_timeout=2.0)
            await runner.setup()
            runners.append(runner)
            if sim.loads_at_start == "before_listening":
                await sim.do_load()  # connections are refused meanwhile, as whisper-server's are
            try:
                await web.TCPSite(runner, args.host, spec.port).start()
            except OSError as e:
                raise SystemExit(
                    f"consumers: {spec.name} cannot listen on {args.host}:{spec.port}: {e}"
                ) from e
            if sim.loads_at_start == "while_listening":
                sim.start_loading()
            ready.append(f"READY {spec.name} http://{args.host}:{runner.addresses[0][1]}\n")
        sys.stdout.write("".join(ready) + "READY all\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        for sim in sims:
            sim.vram.release(sim.name)
    return 0


def consumers(args: argparse.Namespace) -> int:
    """`mgpusim.py consumers ...`."""
    if args.attach and not (args.state and Path(args.state).exists()):
        raise SystemExit(f"consumers: --attach needs an existing --state file, not {args.state!r}")
    return asyncio.run(run_consumers(args))


# ---- start and stop: a consumer as a service ----


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited orphan waiting for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def read_pidfile(path: Path) -> int | None:
    """The pid in a pidfile if that process still runs, else None."""
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def start(args: argparse.Namespace) -> int:
    """`mgpusim.py start`: like `systemctl start` of a Type=simple unit, it returns once the process is
    started, not once it serves (the broker waits for its health route). Already running: nothing to do."""
    pidfile = Path(args.pidfile)
    if (pid := read_pidfile(pidfile)) is not None:
        print(f"start: already running (pid {pid})", file=sys.stderr)
        return 0
    argv = [sys.executable, str(Path(__file__).resolve()), "consumers", "--attach", "--state", args.state]
    argv += ["--host", args.host, *args.specs]
    log = open(args.log, "ab") if args.log else subprocess.DEVNULL  # noqa: SIM115 (handed to the child)
    try:
        # A session of its own: not in the caller's process group, so killing the caller spares it.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    finally:
        if args.log:
            log.close()  # type: ignore[union-attr]
    pidfile.write_text(f"{proc.pid}\n")
    return 0


def stop(args: argparse.Namespace) -> int:
    """`mgpusim.py stop`: SIGTERM, then wait until the process is gone (exit 1 past --timeout)."""
    pidfile = Path(args.pidfile)
    pid = read_pidfile(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while alive(pid):
        if time.monotonic() > deadline:
            print(f"stop: pid {pid} still running {args.timeout:g} s after SIGTERM", file=sys.stderr)
            return 1
        time.sleep(0.02)
    pidfile.unlink(missing_ok=True)
    return 0


# ---- a game ----


def game(args: argparse.Namespace) -> int:
    """`mgpusim.py game --state F --mib 8192`: a graphics process (a game) on the simulated GPU. It takes
    memory towards --mib, --step-mib at a time every --step-s, as far as free memory allows (`SimGPU.grow`),
    holds it until SIGTERM or SIGINT, and gives it back as it exits. It prints `GAME <MiB>` each time what
    it holds changes. Not in nvidia-smi's compute process list: its memory is only seen as used."""
    vram = SimGPU(args.state, create=False)
    signal.signal(signal.SIGTERM, interrupt)
    held = 0
    try:
        while True:
            now = vram.grow(args.owner, args.mib, args.step_mib, args.gpu, process=args.process)
            if now != held:
                held = now
                print(f"GAME {held}", flush=True)
            time.sleep(args.step_s)
    except KeyboardInterrupt:
        pass
    finally:
        vram.release(args.owner)
    return 0


# ---- demo ----

DEMO_DIR = Path("demo-run")
BROKER_LOG = DEMO_DIR / "broker.log"
HERE = Path(__file__).resolve()
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never via a proxy
JSON_HEADER = {"Content-Type": "application/json"}
TTS_BODY = {"text": "Hallo from mgpumanager"}
LLM_BODY = {"model": "demo", "prompt": "why is the sky blue"}
STATUS_AGE_S = 1.0  # mgpumanager's STATUS_MAX_AGE_S
DEMO_CONSUMERS = {
    "mvoice": "vram_mib=2800,loaded=true,work_s=0.3,release_s=0.3",
    "comfyui": "vram_mib=13000,work_s=2,load_s=0.5,release_s=0.3",
    "ollama": "vram_mib=8000,lines=8,line_interval_s=0.05",
    "whisper": "vram_mib=1500",
}
DEMO_CONFIG = string.Template("""\
# Written by `mgpusim.py demo`: consumers.yaml's shape, pointed at simulated services (ports picked
# at random) and a simulated 16 GiB GPU that `mgpusim.py nvidia-smi` reads from gpu.json.
listen: 127.0.0.1:$broker
gpu:
  reader: nvidia-smi            # the simulated GPU is read through its nvidia-smi stand-in
  nvidia_smi: $smi
  index: 0
  cushion_mib: 256              # head-room kept free on top of a consumer's vram_resident_mib
  query_timeout_s: 5
  # Memory no consumer's processes hold (a game) is a stranger's: idle services make room for it, and
  # come back restore_after_s after it left. (Short times for the demo; mrock's are in consumers.yaml.)
  yield: {keep_free_mib: 3072, ignore_mib: 512, restore_after_s: 1, poll_s: 0.5}
state_file: $statefile          # reservations, what waits to be restored, timings, last use: kept on restart
scheduler: {max_queue: 64, queue_timeout_s: 60, max_evictions: 5, vram_wait_s: 10, aging_s: 60}
health: {interval_s: 1, timeout_s: 2}
routing: {tts: mvoice, stt: mvoice, llm: ollama, image: comfyui}
audio_proxy: mvoice             # GET /audio/* goes to mvoice, unscheduled
consumers:
  mvoice:                       # TTS and STT; reports its residency in /health's "loaded"
    url: http://127.0.0.1:$mvoice
    health: {method: GET, path: /health}
    paths:
      tts: {method: POST, path: /api/synthesize}
      stt: {method: POST, path: /api/transcribe}
    vram_resident_mib: 2800
    unload: {method: POST, path: /api/admin/unload}
    load: {method: POST, path: /api/admin/load}
    can_coexist_with: [ollama, whisper]
    priority: 3
    processes: {name: "*/mvoice/*"}    # (gpu.yield measures every consumer)
  comfyui:                      # /prompt answers at once; the job holds the GPU until /history/<id> is set
    preset: comfyui
    url: http://127.0.0.1:$comfyui
    vram_resident_mib: 13000
    processes: {name: "*/ComfyUI/*"}   # its memory measured in nvidia-smi's process list
  ollama:                       # runs its own model LRU; asked to let go (/api/ps, keep_alive 0) only last
    preset: ollama
    url: http://127.0.0.1:$ollama
    vram_resident_mib: 8000
    processes: {name: "*/ollama*"}
  whisper:                      # no unload route: never evicted
    url: http://127.0.0.1:$whisper
    health: {method: GET, path: /health}
    paths:
      stt: {method: POST, path: /inference}
    vram_resident_mib: 1500
    processes: {name: "*/whisper-server"}
""")


class DemoError(Exception):
    """A demo step failed; the message says what was expected."""


def check(ok: bool, claim: str) -> None:
    """Fail the demo unless `claim` holds."""
    if not ok:
        raise DemoError(f"expected {claim}")


#: The kernel's range for outgoing connections' own ports, where it is not readable (Linux's default).
EPHEMERAL_PORTS = (32768, 60999)


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' own ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return EPHEMERAL_PORTS


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 now, for servers that bind them later, outside the kernel's
    range for outgoing connections: a port from there (bind port 0) can be taken in between by any
    connection made meanwhile (a broker's first health probes run before it listens; a CI run once failed
    with "address already in use"). Picked at random, so two test processes picking at once rarely meet."""
    low, high = ephemeral_ports()
    below, above = range(10000, max(10000, low)), range(max(10000, high + 1), 65536)
    ports: list[int] = []
    for _ in range(100 * n + 1000):  # (bounded: a loopback where nothing binds fails, not hangs)
        if len(ports) == n:
            return ports
        if below or above:
            i = random.randrange(len(below) + len(above))
            port = below[i] if i < len(below) else above[i - len(below)]
        else:  # (no port outside the range: the kernel's choice)
            port = 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            port = s.getsockname()[1]
        if port not in ports:
            ports.append(port)
    if len(ports) == n:
        return ports
    raise OSError(f"no {n} free ports on 127.0.0.1")


def http(url: str, body: Any = None, timeout: float = 15.0) -> tuple[Any, bytes]:
    """GET `url`, or POST `body` as JSON; anything but 200 is a DemoError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, JSON_HEADER if data else {})
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            return resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        raise DemoError(f"{url} answered {e.code}: {e.read()[:300].decode(errors='replace')}") from None


def wait_for_line(proc: subprocess.Popen[bytes], line: bytes, timeout_s: float) -> None:
    """Read the process's stdout until `line` (DemoError if it exits or `timeout_s` passes first)."""
    assert proc.stdout is not None
    deadline, seen = time.monotonic() + timeout_s, b""
    while line not in seen.splitlines():
        left = deadline - time.monotonic()
        if proc.poll() is not None or left <= 0:
            raise DemoError(f"no {line.decode()!r} from the consumers within {timeout_s:g} s")
        if select.select([proc.stdout], [], [], min(left, 0.2))[0]:
            seen += os.read(proc.stdout.fileno(), 4096)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def log_msg(line: str) -> str:
    """The msg field of a logfmt line."""
    match = re.search(r'\bmsg=("[^"]*"|\S+)', line)
    return match.group(1).strip('"') if match else ""


def interrupt(signum: int, frame: Any) -> NoReturn:
    """SIGTERM behaves like Ctrl-C."""
    raise KeyboardInterrupt


class DemoRun:
    """The demo's child processes and the scripted steps against the broker."""

    def __init__(self) -> None:
        broker, *ports = free_ports(1 + len(DEMO_CONSUMERS))
        self.base = f"http://127.0.0.1:{broker}"
        self.ports = dict(zip(DEMO_CONSUMERS, ports, strict=True))
        self.ollama = f"http://127.0.0.1:{self.ports['ollama']}"  # the simulated Ollama itself
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log_pos = 0
        self.audio_path = "/audio/..."
        self.state = DEMO_DIR / "gpu.json"
        self.game: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start a child in a session of its own (Ctrl-C reaches only the demo, which stops it)."""
        self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kw))
        return self.procs[-1]

    def start(self) -> None:
        """Run directory, consumers, config, broker: everything up and answering."""
        shutil.rmtree(DEMO_DIR, ignore_errors=True)
        DEMO_DIR.mkdir()
        state = DEMO_DIR / "gpu.json"
        specs = [f"{name}={name}:{self.ports[name]},{opts}" for name, opts in DEMO_CONSUMERS.items()]
        argv = [sys.executable, str(HERE), "consumers", "--state", str(state), "--gpu-total-mib", "16384"]
        with open(DEMO_DIR / "consumers.log", "wb") as err:
            cons = self.spawn([*argv, "--reserved-mib", "480", *specs], stdout=subprocess.PIPE, stderr=err)
        wait_for_line(cons, b"READY all", 15)
        smi = shlex.join([sys.executable, str(HERE), "nvidia-smi", "--state", str(state.resolve())])
        config = DEMO_DIR / "demo.yaml"
        self.state = state
        statefile = json.dumps(str((DEMO_DIR / "state.json").resolve()))
        config.write_text(
            DEMO_CONFIG.substitute(
                broker=self.base.rsplit(":", 1)[1], smi=json.dumps(smi), statefile=statefile, **self.ports
            )
        )
        manager = [sys.executable, str(HERE.with_name("mgpumanager.py")), "--config", str(config)]
        checked = subprocess.run(
            [*manager, "--check"], check=False, capture_output=True, text=True, timeout=15
        )
        if checked.returncode != 0:
            raise DemoError(f"mgpumanager --check rejected {config}:\n{checked.stdout}{checked.stderr}")
        with open(BROKER_LOG, "wb") as log:
            broker = self.spawn(manager, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError, DemoError):
                http(self.base + "/healthz", timeout=1)
                return
            check(broker.poll() is None, f"the broker to keep running (it exited with {broker.returncode})")
            check(time.monotonic() < deadline, "GET /healthz to answer 200 within 15 s")
            time.sleep(0.1)

    def curl(self, path: str, body: Any = None, out: str = "") -> str:
        """The curl command line of a request to the broker."""
        post = f"-X POST {self.base}{path} -H 'Content-Type: application/json' -d '{json.dumps(body)}'"
        return f"curl -s {post if body is not None else self.base + path}" + (f" -o {out}" if out else "")

    def step(self, title: str, path: str, body: Any = None, out: str = "") -> tuple[Any, bytes]:
        """Print a step and its curl command, make that request, save the answer to `out` if given."""
        print(f"\n{title}\n  $ {self.curl(path, body, out)}")
        headers, data = http(self.base + path, body)
        if out:
            Path(out).write_bytes(data)
        return headers, data

    def new_log(self, *msgs: str) -> list[str]:
        """Print the new broker.log lines with one of these msgs (since the last call); return their msgs.
        Without msgs: skip what is new."""
        text = BROKER_LOG.read_text(errors="replace")
        end = text.rfind("\n") + 1
        lines = [line for line in text[self.log_pos : end].splitlines() if log_msg(line) in msgs]
        self.log_pos = end
        for line in lines:
            print("    log: " + re.sub(r"^ts=\S+ ", "", line))
        return [log_msg(line) for line in lines]

    def status(self) -> dict[str, Any]:
        """GET /v1/status, parsed."""
        return json.loads(http(self.base + "/v1/status")[1])

    def wait_idle(self, timeout_s: float = 30) -> None:
        """Until no job or hold holds the GPU (a render goes on after its answer)."""
        deadline = time.monotonic() + timeout_s
        while self.status()["scheduler"]["holder"] is not None:
            check(time.monotonic() < deadline, f"the GPU to be free within {timeout_s:g} s")
            time.sleep(0.1)

    def residency(self, evictions: int, loaded: dict[str, bool]) -> None:
        """Print and check the status's eviction count and consumers' `loaded`."""
        st = self.status()
        now = {name: st["consumers"][name]["loaded"] for name in loaded}
        got = st["scheduler"]["stats"]["evictions"]
        print(f"    /v1/status: evictions={got}, " + ", ".join(f"{n} loaded={v}" for n, v in now.items()))
        check(got == evictions and now == loaded, f"evictions={evictions} and {loaded} in /v1/status")

    def script(self) -> None:
        """The scripted tour; every claim it prints is checked."""
        print(f"mgpumanager listens on {self.base}, in front of simulated mvoice, comfyui, ollama and")
        print(f"whisper on a simulated 16 GiB GPU (15904 MiB usable). Files: {DEMO_DIR}/")
        self.residency(0, {"mvoice": True})

        title = "1. Speech: mvoice is resident, so the job runs at once."
        headers, wav = self.step(title, "/v1/tts", TTS_BODY, f"{DEMO_DIR}/hello.wav")
        self.audio_path = headers.get("X-Audio-Path", "")
        print(f"    HTTP 200, {len(wav)} bytes of WAV, X-Audio-Path: {self.audio_path}")
        check(wav[:4] == b"RIFF" and self.audio_path.startswith("/audio/"), "a WAV and an X-Audio-Path")
        title = "   The same file through the broker (proxied to mvoice, not scheduled):"
        again = self.step(title, self.audio_path, out=f"{DEMO_DIR}/fetched.wav")[1]
        check(again == wav, "GET /audio/... to return the bytes of hello.wav")
        print("    HTTP 200, the same bytes as hello.wav")

        title = "2. An image: comfyui's 13000 MiB (+256 cushion) do not fit beside mvoice's 2800."
        prompt_id = json.loads(self.step(title, "/v1/image", {"prompt": {}})[1])["prompt_id"]
        print(f"    prompt_id: {prompt_id}; the render goes on and holds the GPU until it ends.")
        print("    Before forwarding the job, the broker unloaded mvoice:")
        check(self.new_log("evicting", "evicted") == ["evicting", "evicted"], "mvoice evicted in broker.log")
        self.residency(1, {"mvoice": False})

        title = "3. Speech again: it waits for the render, then comfyui is evicted and mvoice loaded."
        started = time.monotonic()
        wav = self.step(title, "/v1/tts", TTS_BODY, f"{DEMO_DIR}/again.wav")[1]
        print(f"    HTTP 200, {len(wav)} bytes after {time.monotonic() - started:.1f} s")
        msgs = self.new_log("hold released", "evicting", "evicted", "loading", "loaded")
        want = ["hold released", "evicting", "evicted", "loading", "loaded"]
        check(msgs == want, f"broker.log to show {want}, not {msgs}")
        self.residency(2, {"mvoice": True, "comfyui": False})

        print("\n4. A streamed LLM answer: ollama fits beside mvoice, and keeps its model afterwards.")
        print(f"  $ {self.curl('/v1/llm', LLM_BODY)}\n    ", end="", flush=True)
        started, lines = time.monotonic(), []
        req = urllib.request.Request(self.base + "/v1/llm", json.dumps(LLM_BODY).encode(), JSON_HEADER)
        with OPENER.open(req, timeout=15) as resp:
            for line in resp:  # each NDJSON line as soon as it arrives
                lines.append(json.loads(line))
                print(lines[-1]["response"] or "[done]", end="", flush=True)
        print(f"\n    {len(lines)} NDJSON lines in {time.monotonic() - started:.2f} s, as ollama sent them")
        check(len(lines) == 9 and lines[-1]["done"], "8 tokens and a final done line")
        models = [m["name"] for m in json.loads(http(self.ollama + "/api/ps")[1])["models"]]
        print(f"    ollama's /api/ps afterwards: {', '.join(models)} (kept for its keep_alive, 5 minutes)")
        check(models == ["demo"], "ollama to keep the model loaded")

        title = "5. An image while ollama keeps its model: mvoice goes first, then ollama is asked to let go."
        self.step(title, "/v1/image", {"prompt": {}})
        self.wait_idle()
        msgs = self.new_log("evicting", "evicted", "hold released")
        want = ["evicting", "evicted", "evicting", "evicted", "hold released"]
        check(msgs == want, f"broker.log to show {want}, not {msgs}")
        models = json.loads(http(self.ollama + "/api/ps")[1])["models"]
        print(f"    ollama's /api/ps now lists {len(models)} models; the render finished.")
        check(models == [], "ollama to have let its model go")

        time.sleep(STATUS_AGE_S)  # /v1/status reads the GPU at most once a second
        st = json.loads(self.step("6. What the broker knows now:", "/v1/status")[1])
        gpu, stats = st["gpu"], st["scheduler"]["stats"]
        print(f"    GPU {gpu['name']}: {gpu['used_mib']} MiB used, {gpu['free_mib']} MiB free")
        for name, c in st["consumers"].items():
            print(f"    {name:<8} healthy={c['healthy']!s:<5} loaded={c['loaded']}")
        print(
            "    stats: " + " ".join(f"{k}={stats[k]}" for k in ("jobs", "completed", "failed", "evictions"))
        )
        for name in ("comfyui", "ollama"):
            c = st["consumers"][name]
            print(f"    {name}: {c['vram_used_mib']} MiB measured in nvidia-smi's process list")
        context, whisper = ComfySim.default_context_mib, 1500  # a running whisper-server holds its model
        check(
            gpu["used_mib"] == 13000 + context + whisper,
            f"comfyui's 13000 MiB, its {context} MiB CUDA context and whisper's {whisper} MiB",
        )
        check(all(c["healthy"] for c in st["consumers"].values()), "four healthy consumers")
        check(stats["completed"] == 5 and stats["failed"] == 0, "5 jobs completed, none failed")

        title = "7. Ollama's own API through its mount (a client only changes its base URL):"
        chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": False}
        answer = json.loads(self.step(title, "/c/ollama/api/chat", chat)[1])
        print(f"    {answer['message']['content'].strip()!r}: a GPU job like /v1/llm (same queue and lock)")
        models = json.loads(
            self.step("   A read through the mount is not scheduled:", "/c/ollama/api/tags")[1]
        )
        print(f"    models: {', '.join(m['name'] for m in models['models'])}")
        stats = json.loads(http(self.base + "/v1/status")[1])["scheduler"]["stats"]
        check(stats["jobs"] == 6, "the chat counted as the sixth job, the model list as none")
        self.stranger()

    def stranger(self) -> None:
        """A game arrives, the services make room for it, a job is refused meanwhile, the game ends, and
        what was unloaded for it comes back (gpu.yield)."""
        title = "8. Speech again: mvoice is loaded beside ollama (they may coexist)."
        self.step(title, "/v1/tts", TTS_BODY, f"{DEMO_DIR}/before-game.wav")
        self.new_log()
        loaded = {n: c["loaded"] for n, c in self.status()["consumers"].items()}
        print(f"    resident now: {', '.join(n for n, v in loaded.items() if v)}")
        check(loaded["mvoice"] and loaded["ollama"], "mvoice and ollama resident before the game")

        print("\n9. A game starts and wants 8 GiB. It is a graphics process: nvidia-smi's compute list does")
        print("   not show it, but its memory shows as used that no consumer's processes hold. The broker")
        print("   unloads idle services (least recently used first, ollama last) to keep 3072 MiB free:")
        argv = [sys.executable, str(HERE), "game", "--state", str(self.state), "--mib", "8192"]
        print(f"  $ python3 mgpusim.py game --state {self.state} --mib 8192 &")
        self.game = self.spawn(argv, stdout=subprocess.DEVNULL)
        vram = SimGPU(self.state, create=False)
        deadline = time.monotonic() + 30
        while vram.used_mib("game") < 8192:
            check(time.monotonic() < deadline, "the game to get its 8192 MiB within 30 s")
            time.sleep(0.1)
        yields: list[str] = []
        while True:  # (the game may take the memory before the broker's reading shows it)
            yields += [m for m in self.new_log("stranger appeared", "yielded") if m == "yielded"]
            if len(yields) >= 2:
                break
            check(time.monotonic() < deadline, "mvoice and ollama yielded within 30 s")
            time.sleep(0.1)
        while (st := self.status())["gpu"]["unclaimed_mib"] != 8192:  # (a status reading is up to 1 s old)
            check(time.monotonic() < deadline, "/v1/status to show the game's 8192 MiB within 30 s")
            time.sleep(0.2)
        gpu = st["gpu"]
        print(f"    the game holds 8192 MiB; /v1/status: unclaimed_mib={gpu['unclaimed_mib']},")
        strangers = gpu["strangers"]
        print(f"    strangers.present={strangers['present']}, processes={strangers['processes']}")
        loaded = {n: c["loaded"] for n, c in st["consumers"].items()}
        check(gpu["unclaimed_mib"] == 8192 and gpu["strangers"]["present"], "the game seen as a stranger")
        check(len(yields) == 2 and not loaded["mvoice"] and not loaded["ollama"], "mvoice and ollama yielded")

        title = "10. Speech while the game plays: mvoice (2800 + 256 MiB) would leave less than 3072 free."
        print(f"\n{title}\n  $ {self.curl('/v1/tts', TTS_BODY)}")
        req = urllib.request.Request(self.base + "/v1/tts", json.dumps(TTS_BODY).encode(), JSON_HEADER)
        try:
            with OPENER.open(req, timeout=15) as resp:
                raise DemoError(f"/v1/tts answered {resp.status}, not 503 gpu_in_use")
        except urllib.error.HTTPError as e:
            answer, retry = json.loads(e.read()), e.headers.get("Retry-After")
        print(f"    HTTP 503, Retry-After: {retry}: {answer['error']}: {answer['message']}")
        check(answer["error"] == "gpu_in_use" and retry is not None, "503 gpu_in_use with a Retry-After")

        print("\n11. The game ends. With no stranger for restore_after_s (1 s), mvoice is loaded again")
        print("    (ollama has no load route: it loads with its next job).")
        stop_process(self.game)
        self.procs.remove(self.game)
        deadline = time.monotonic() + 30
        while not self.status()["consumers"]["mvoice"]["loaded"]:
            check(time.monotonic() < deadline, "mvoice to be restored within 30 s")
            time.sleep(0.2)
        msgs = self.new_log("stranger gone", "restored")
        check(msgs == ["stranger gone", "restored"], f"the stranger gone, then mvoice restored, not {msgs}")
        wav = self.step("    Speech works again:", "/v1/tts", TTS_BODY, f"{DEMO_DIR}/after-game.wav")[1]
        print(f"    HTTP 200, {len(wav)} bytes")

    def box(self) -> None:
        """The curl commands to try by hand."""
        lines = [
            f"mgpumanager is running on {self.base}; try:",
            self.curl("/v1/tts", {"text": "Hallo"}, "hello.wav"),
            self.curl("/v1/image", {"prompt": {}}),
            self.curl("/v1/llm", {"model": "demo", "prompt": "hi"}),
            self.curl("/v1/status"),
            self.curl(self.audio_path, out="fetched.wav"),
            f"Broker log: {BROKER_LOG}.  Ctrl-C to stop.",
        ]
        width = max(map(len, lines))
        rule = "+" + "-" * (width + 2) + "+"
        print("\n" + "\n".join([rule, *(f"| {line:<{width}} |" for line in lines), rule]), flush=True)

    def wait(self) -> None:
        """Until Ctrl-C or SIGTERM; a child exiting meanwhile is a failure."""
        while all(p.poll() is None for p in self.procs):
            time.sleep(0.5)
        raise DemoError("the broker and the consumers to keep running, but one exited")


def demo(args: argparse.Namespace) -> int:
    """`mgpusim.py demo [--once]`: a broker and simulated consumers, end to end."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    run, scripted, failed = DemoRun(), False, False
    try:
        run.start()
        run.script()
        scripted = True
        if not args.once:
            run.box()
            run.wait()
    except KeyboardInterrupt:
        print("\ndemo: stopping" if scripted else "\ndemo: interrupted", file=sys.stderr)
    except Exception as e:
        failed = True
        print(f"\ndemo FAILED: {e if isinstance(e, DemoError) else repr(e)}", file=sys.stderr)
        if BROKER_LOG.exists():
            tail = BROKER_LOG.read_text(errors="replace").splitlines()[-20:]
            print(f"last lines of {BROKER_LOG}:\n" + "\n".join(tail), file=sys.stderr)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in reversed(run.procs):
            stop_process(proc)
    return 0 if scripted and not failed else 1


# ---- command line ----


def build_parser() -> argparse.ArgumentParser:
    """The parser of the consumers and demo commands (nvidia-smi arguments are parsed by hand)."""
    parser = argparse.ArgumentParser(prog="mgpusim.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("nvidia-smi", help="answer nvidia-smi queries from --state FILE", add_help=False)
    cons = sub.add_parser("consumers", help="run simulated consumers until SIGTERM")
    cons.add_argument("--state", help="GPU state file to create (not with --vram torch)")
    cons.add_argument("--vram", choices=("state", "torch"), default="state")
    cons.add_argument("--gpu-total-mib", type=int, default=16384)
    cons.add_argument("--reserved-mib", type=int, default=480)
    cons.add_argument("--gpus", type=int, default=0, help="number of GPUs (default: enough for the specs)")
    cons.add_argument("--host", default="127.0.0.1")
    cons.add_argument(
        "--attach", action="store_true", help="use the existing --state file (do not create it)"
    )
    cons.add_argument(
        "specs", nargs="+", type=parse_spec, metavar="SPEC", help="name=KIND:PORT[,opt=value...]"
    )
    cons.set_defaults(func=consumers)
    sta = sub.add_parser("start", help="start `consumers --attach` detached, like systemctl start")
    sta.add_argument("--pidfile", required=True)
    sta.add_argument("--state", required=True, help="existing GPU state file")
    sta.add_argument("--log", help="where its output goes (default: nowhere)")
    sta.add_argument("--host", default="127.0.0.1")
    sta.add_argument("specs", nargs="+", metavar="SPEC", help="name=KIND:PORT[,opt=value...]")
    sta.set_defaults(func=start)
    sto = sub.add_parser(
        "stop", help="SIGTERM what start started and wait for it to exit, like systemctl stop"
    )
    sto.add_argument("--pidfile", required=True)
    sto.add_argument("--timeout", type=float, default=10.0)
    sto.set_defaults(func=stop)
    gam = sub.add_parser("game", help="a game: a graphics process taking GPU memory until SIGTERM")
    gam.add_argument("--state", required=True, help="existing GPU state file")
    gam.add_argument("--mib", type=int, default=8192, help="what it takes in all, as room allows")
    gam.add_argument("--step-mib", type=int, default=512)
    gam.add_argument("--step-s", type=float, default=0.05)
    gam.add_argument("--gpu", type=int, default=0)
    gam.add_argument("--owner", default="game")
    gam.add_argument("--process", default="/usr/games/supertuxkart")
    gam.set_defaults(func=game)
    dem = sub.add_parser("demo", help="an end-to-end demonstration")
    dem.add_argument("--once", action="store_true")
    dem.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to nvidia-smi, consumers or demo."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["nvidia-smi"]:
        return smi_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
