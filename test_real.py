"""make test-real: mgpumanager in front of real servers (ComfyUI, whisper.cpp, llama.cpp), on the CPU.

* ``python test_real.py install`` builds or installs the servers into a cache outside the repository
  (``MGPU_REAL_CACHE``, default ``~/.cache/mgpumanager-real``); a second run reuses what is there.
* ``pytest test_real.py`` runs the scenarios (not part of ``make test``: pyproject's testpaths): the broker
  as a subprocess on its own config (the presets comfyui, whisper-cpp and llama-cpp, each consumer measured
  by its processes), the servers as real processes started and stopped like systemd units by
  ``python test_real.py start|stop NAME BED`` (the broker's command eviction runs the same), and mgpusim's
  nvidia-smi stand-in reading a state file that a watcher keeps in step with the servers: each holds its
  declared memory while its process is alive, ComfyUI its CUDA context while it runs and its models' memory
  from a prompt's start until it unloads them (seen by a one-file custom node, the probe, in the ComfyUI it
  runs).

What the run leaves (logs of every server and of the broker, the stand-in's state, screenshots) is in
``real-run/`` (``MGPU_REAL_OUT``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import mgpumanager
import mgpusim

# ---- Where things are ----

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared" / "real"
CACHE = Path(os.environ.get("MGPU_REAL_CACHE") or Path.home() / ".cache" / "mgpumanager-real")
OUT = Path(os.environ.get("MGPU_REAL_OUT") or HERE / "real-run")
WHISPER_SRC = Path(os.environ.get("WHISPER_CPP_SRC") or SHARED / "whisper.cpp-233fe1fc.tar.gz")
COMFYUI_SRC = Path(os.environ.get("COMFYUI_SRC") or SHARED / "ComfyUI-v0.8.0.tar.gz")
#: llama.cpp comes inside this source distribution (vendor/llama.cpp); its gguf-py writes the model.
LLAMA_SDIST = "llama-cpp-python==0.3.36"
#: The CPU runs of ComfyUI need torchvision; this pair installs from PyPI (or a local mirror).
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
TORCH_NAMES = {"torch", "torchvision", "torchaudio"}  #: lines left out of ComfyUI's requirements.txt

WHISPER_DIR = CACHE / "whisper.cpp"
WHISPER_SERVER = WHISPER_DIR / "build" / "bin" / "whisper-server"
WHISPER_MODEL = WHISPER_DIR / "models" / "for-tests-ggml-tiny.bin"  # weightless: answers {"text": ""}
JFK_WAV = WHISPER_DIR / "samples" / "jfk.wav"
LLAMA_DIR = CACHE / "llama.cpp"
LLAMA_SERVER = LLAMA_DIR / "build" / "bin" / "llama-server"
GGUF = CACHE / "tiny.gguf"
COMFY_DIR = CACHE / "ComfyUI"
COMFY_VENV = CACHE / "comfyui-venv"
COMFY_PY = COMFY_VENV / "bin" / "python"

# ---- install ----

#: A llama model with random weights (2 layers, 64 wide) and a byte-fallback vocabulary, by gguf-py.
GGUF_SCRIPT = """
import sys
import gguf
import numpy as np

rng = np.random.default_rng(0)
n_embd, n_head, n_layer, n_ff = 64, 4, 2, 128
tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
tokens += ["\\u2581" + w for w in "the a sky is blue why hello world GPU broker".split()]
w = gguf.GGUFWriter(sys.argv[1], "llama")
w.add_name("mgpumanager-real-tiny")
w.add_context_length(2048)
w.add_embedding_length(n_embd)
w.add_block_count(n_layer)
w.add_feed_forward_length(n_ff)
w.add_head_count(n_head)
w.add_head_count_kv(n_head)
w.add_rope_dimension_count(n_embd // n_head)
w.add_layer_norm_rms_eps(1e-5)
w.add_file_type(0)
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores([0.0] * len(tokens))
w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
w.add_unk_token_id(0)
w.add_bos_token_id(1)
w.add_eos_token_id(2)
def t(*shape):
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)
w.add_tensor("token_embd.weight", t(len(tokens), n_embd))
w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
w.add_tensor("output.weight", t(len(tokens), n_embd))
shapes = {"attn_q": (n_embd, n_embd), "attn_k": (n_embd, n_embd), "attn_v": (n_embd, n_embd),
          "attn_output": (n_embd, n_embd), "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd),
          "ffn_down": (n_embd, n_ff)}
for i in range(n_layer):
    for name, shape in shapes.items():
        w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
    w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"""


def run_step(argv: list[Any], log: Path, **kw: Any) -> None:
    """Run one build command, its output appended to `log`; exit with the log's tail if it fails."""
    with log.open("ab") as f:
        f.write(f"\n$ {' '.join(map(str, argv))}\n".encode())
        f.flush()
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False, **kw).returncode
    if code != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise SystemExit(f"install: {argv[0]} ... failed (exit {code}); the end of {log}:\n{tail}")


def unpack(src: Path, dest: Path, sub: str = "") -> None:
    """Copy a source tree (a directory, or a tarball with one top folder) to `dest`; `sub` picks a folder."""
    tmp = dest.with_name(dest.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src / sub, tmp, ignore=shutil.ignore_patterns(".git", "build"))
    else:
        with tarfile.open(src) as tar:
            members = tar.getmembers()
            top = f"{members[0].name.split('/')[0]}/{sub}".rstrip("/")
            chosen = [m for m in members if m.name == top or m.name.startswith(top + "/")]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=chosen, **safe)
        shutil.move(tmp / top, dest.with_name(dest.name + ".moved"))
        shutil.rmtree(tmp)
        tmp = dest.with_name(dest.name + ".moved")
    tmp.rename(dest)


def cmake_build(src: Path, target: str, flags: list[str], log: Path) -> None:
    """Configure (Release) and build one target with at most two jobs."""
    run_step(["cmake", "-S", src, "-B", src / "build", "-DCMAKE_BUILD_TYPE=Release", *flags], log)
    run_step(["cmake", "--build", src / "build", "-j2", "--target", target], log)


def install_comfyui(log: Path) -> None:
    """ComfyUI's source, a venv with PyTorch and its requirements (without its torch lines), plus requests."""
    if not COMFY_DIR.exists():
        unpack(COMFYUI_SRC, COMFY_DIR)
    run_step([sys.executable, "-m", "venv", "--clear", COMFY_VENV], log)
    pip = [COMFY_PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run_step([*pip, *TORCH], log)
    lines = (COMFY_DIR / "requirements.txt").read_text().splitlines()
    torch_free = [line for line in lines if line.split("=")[0].split(">")[0].strip() not in TORCH_NAMES]
    reqs = CACHE / "comfyui-requirements.txt"
    reqs.write_text("\n".join([*torch_free, "requests"]) + "\n")  # requests: imported, not listed
    run_step([*pip, "-r", reqs, *TORCH], log)  # TORCH again: nothing may move it
    (COMFY_VENV / ".installed").touch()


def install_whisper(log: Path) -> None:
    """whisper.cpp's whisper-server, built from its source."""
    if not WHISPER_DIR.exists():
        unpack(WHISPER_SRC, WHISPER_DIR)
    cmake_build(WHISPER_DIR, "whisper-server", ["-DWHISPER_BUILD_TESTS=OFF"], log)


def install_llama(log: Path) -> None:
    """llama.cpp's llama-server, built from the vendor/llama.cpp of llama-cpp-python's sdist (no curl)."""
    if not LLAMA_DIR.exists():
        dl = CACHE / "download"
        shutil.rmtree(dl, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
        run_step([*pip, "--no-deps", "--no-binary", ":all:", "-d", dl, LLAMA_SDIST], log)
        (sdist,) = dl.glob("llama_cpp_python-*.tar.gz")
        unpack(sdist, LLAMA_DIR, sub="vendor/llama.cpp")
        shutil.rmtree(dl)
    flags = ["-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]
    cmake_build(
        LLAMA_DIR, "llama-server", [*flags, "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], log
    )


def install_gguf(log: Path) -> None:
    """The tiny random-weight model, written by llama.cpp's gguf-py with the ComfyUI venv's numpy."""
    tmp = GGUF.with_suffix(".tmp")
    env = {**os.environ, "PYTHONPATH": str(LLAMA_DIR / "gguf-py")}
    run_step([COMFY_PY, "-c", GGUF_SCRIPT, tmp], log, env=env)
    tmp.rename(GGUF)


#: (name, what it makes, the step): a step runs only when what it makes is missing.
STEPS: list[tuple[str, Path, Callable[[Path], None]]] = [
    ("comfyui", COMFY_VENV / ".installed", install_comfyui),
    ("whisper-server", WHISPER_SERVER, install_whisper),
    ("llama-server", LLAMA_SERVER, install_llama),
    ("tiny.gguf", GGUF, install_gguf),
]


#: The sources that are not on PyPI: (what, its variable, where it is looked for, what it unpacks to).
SOURCES = [
    ("ComfyUI v0.8.0", "COMFYUI_SRC", COMFYUI_SRC, COMFY_DIR),
    ("whisper.cpp 233fe1fc", "WHISPER_CPP_SRC", WHISPER_SRC, WHISPER_DIR),
]


def missing_sources() -> list[str]:
    """A line for each source that a step needs (its unpacked tree is not in the cache yet) and that is
    not there."""
    return [
        f"{what}'s source is missing: {path} does not exist. Set {variable} to a tarball of it or a folder"
        f" that holds it (with a clone of this repository alone, ../shared/real is not there)."
        for what, variable, path, unpacked in SOURCES
        if not unpacked.exists() and not path.exists()
    ]


def install() -> int:
    """Install or build what is missing from the cache, timing each step; first, say which sources are
    missing, all of them, before building anything (exit 2)."""
    if missing := missing_sources():
        for line in missing:
            print(f"install: {line}", file=sys.stderr)
        return 2
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for name, product, step in STEPS:
        if product.exists():
            print(f"install: {name}: reused ({product})", flush=True)
            continue
        print(f"install: {name}: building (log: {CACHE / (name + '.log')}) ...", flush=True)
        t0 = time.monotonic()
        step(CACHE / f"{name}.log")
        print(f"install: {name}: done in {time.monotonic() - t0:.0f} s", flush=True)
    print(f"install: all in {time.monotonic() - started:.0f} s, cache {CACHE}", flush=True)
    return 0


# ---- start and stop: the servers as services ----
# BED/NAME.json says how to run NAME ({"argv", "cwd", "env"}); BED/NAME.pid is its pid while it runs.


def start_service(name: str, bed: Path) -> int:
    """Like `systemctl start`: start NAME detached (its output to BED/NAME.log) and return; a no-op if it
    runs."""
    pidfile = bed / f"{name}.pid"
    if mgpusim.read_pidfile(pidfile) is not None:
        return 0
    spec = json.loads((bed / f"{name}.json").read_text())
    with (bed / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            spec["argv"],
            cwd=spec["cwd"],
            env={**os.environ, **spec["env"]},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    pidfile.write_text(f"{proc.pid}\n")
    return 0


def stop_service(name: str, bed: Path) -> int:
    """Like `systemctl stop`: SIGTERM and wait until it is gone (mgpusim's stop)."""
    return mgpusim.stop(argparse.Namespace(pidfile=str(bed / f"{name}.pid"), timeout=20.0))


def main(argv: list[str]) -> int:
    """`install`, or `start|stop NAME BED`."""
    if argv == ["install"]:
        return install()
    if len(argv) == 3 and argv[0] in ("start", "stop"):
        action = start_service if argv[0] == "start" else stop_service
        return action(argv[1], Path(argv[2]))
    print("usage: test_real.py install | start NAME BED | stop NAME BED", file=sys.stderr)
    return 2


# ---- The bed ----

pytestmark = pytest.mark.timeout(300)

#: What each server holds on the simulated GPU while it runs (ComfyUI: while a prompt's models are loaded,
#: its CUDA context otherwise). 16384 MiB less 480 reserved: ComfyUI fits alone; whisper and llama fit
#: together, not beside ComfyUI with its models loaded.
VRAM_MIB = {"comfyui": 13000, "whisper": 3000, "llama": 3000}
COMFY_CONTEXT_MIB = mgpusim.ComfySim.default_context_mib  #: 610 MiB, as an idle ComfyUI keeps on an H100
GPU_TOTAL_MIB, GPU_RESERVED_MIB = 16384, 480
#: The comfyui preset's hold_until poll interval (0.5 s).
POLL_S = mgpumanager.PRESETS["comfyui"]["paths"]["image"]["hold_until"]["poll_s"]
IDLE_WAIT_S = 90  #: the longest the bed waits for the broker to be idle: longer than any render here
#: How nvidia-smi (its stand-in) names each server's process: the first word of its command line, as the
#: real tool does; the broker's `processes.name` patterns for them.
PROCESS_NAMES = {
    "comfyui": f"{COMFY_VENV}/bin/python*",
    "whisper": "*/whisper-server",
    "llama": "*/llama-server",
}

#: A ComfyUI custom node that writes "<time> loaded" when a prompt starts executing and "<time> unloaded"
#: after ComfyUI's prompt worker has unloaded its models (what /free's flags make it do).
PROBE = '''"""mgpumanager's test bed: notes when ComfyUI starts a prompt and when it unloads its models."""
import os
import time

import comfy.model_management
import execution


def note(event):
    with open(os.environ["MGPU_BED_PROBE"], "a") as f:
        f.write(f"{time.time():.3f} {event}\\n")


_unload_all_models = comfy.model_management.unload_all_models
_execute = execution.PromptExecutor.execute


def unload_all_models(*args, **kwargs):
    result = _unload_all_models(*args, **kwargs)
    note("unloaded")
    return result


def execute(self, *args, **kwargs):
    note("loaded")
    return _execute(self, *args, **kwargs)


comfy.model_management.unload_all_models = unload_all_models
execution.PromptExecutor.execute = execute
NODE_CLASS_MAPPINGS = {}
'''


def free_port() -> int:
    """A port nothing listens on now (outside the kernel's range for outgoing connections)."""
    return mgpusim.free_ports(1)[0]


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET url and parse its JSON (blocking; for the bed's own threads and waits)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call check() every 0.1 s until it returns something true (exceptions count as false)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if value := check():
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def epoch_ms(event: dict[str, Any]) -> float:
    """A broker event's timestamp, in milliseconds since the epoch."""
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp() * 1000


class Bed:
    """The servers, the watcher that keeps the GPU stand-in in step with them, the broker and its events."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gpu = mgpusim.SimGPU(root / "gpu.json", total_mib=GPU_TOTAL_MIB, reserved_mib=GPU_RESERVED_MIB)
        self.ports = {
            name: free_port() for name in ("broker", "comfyui", "whisper", "llama", "comfyui_listen")
        }
        self.url = f"http://127.0.0.1:{self.ports['broker']}"
        self.comfy_url = f"http://127.0.0.1:{self.ports['comfyui']}"
        self.comfy_cors: bool | None = None
        self.events: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self.subscribed = threading.Event()
        self.threads: list[threading.Thread] = []
        self.broker: subprocess.Popen[bytes] | None = None
        self._write_specs()
        (root / "broker.yaml").write_text(self.broker_config())

    # -- the servers

    def _write_specs(self) -> None:
        """How each server runs (see start_service); ComfyUI's flags are written by comfy()."""
        p = self.ports
        whisper = [WHISPER_SERVER, "-m", WHISPER_MODEL, "--host", "127.0.0.1", "--port", p["whisper"]]
        llama = [LLAMA_SERVER, "-m", GGUF, "--host", "127.0.0.1", "--port", p["llama"], "-c", "512"]
        for name, argv in (("whisper", whisper), ("llama", llama)):
            spec = {"argv": [str(a) for a in argv], "cwd": str(self.root), "env": {}}
            (self.root / f"{name}.json").write_text(json.dumps(spec))
        (self.root / "comfy-base" / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (self.root / "comfy-base" / "custom_nodes" / "mgpu_bed_probe.py").write_text(PROBE)

    def service(self, action: str, name: str) -> None:
        """Start or stop a server the way the broker's commands do."""
        argv = [sys.executable, str(HERE / "test_real.py"), action, name, str(self.root)]
        subprocess.run(argv, check=True, timeout=60)

    def pid(self, name: str) -> int | None:
        """The server's pid while it runs."""
        return mgpusim.read_pidfile(self.root / f"{name}.pid")

    def start(self, name: str) -> None:
        """Start whisper or llama and wait until it answers /health."""
        self.service("start", name)
        wait_until(lambda: get_json(f"http://127.0.0.1:{self.ports[name]}/health"), 60, f"{name} healthy")

    def comfy(self, *, cors: bool) -> None:
        """ComfyUI running (restarted if its flags differ): --cpu, and --enable-cors-header if `cors`."""
        if self.pid("comfyui") is not None and self.comfy_cors == cors:
            return
        self.service("stop", "comfyui")
        argv = [COMFY_PY, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", self.ports["comfyui"]]
        argv += ["--base-directory", self.root / "comfy-base", "--disable-auto-launch"]
        argv += ["--database-url", "sqlite:///:memory:"] + (["--enable-cors-header"] if cors else [])
        env = {"MGPU_BED_PROBE": str(self.probe_file)}
        spec = {"argv": [str(a) for a in argv], "cwd": str(COMFY_DIR), "env": env}
        (self.root / "comfyui.json").write_text(json.dumps(spec))
        self.comfy_cors = cors
        self.start_comfy()

    def start_comfy(self) -> None:
        """Start ComfyUI as comfy() last wrote it, and wait until the broker sees it healthy."""
        self.probe_file.unlink(missing_ok=True)  # a fresh ComfyUI has nothing loaded
        self.service("start", "comfyui")
        wait_until(lambda: get_json(self.comfy_url + "/system_stats"), 180, "ComfyUI answering")
        self.wait_healthy("comfyui")

    @property
    def probe_file(self) -> Path:
        return self.root / "comfyui.probe"

    def probe(self) -> list[str]:
        """What the probe noted, oldest first ("loaded", "unloaded")."""
        with contextlib.suppress(FileNotFoundError):
            return [line.split()[1] for line in self.probe_file.read_text().splitlines()]
        return []

    # -- the GPU stand-in

    def watch(self) -> None:
        """Keep the state file's processes in step with the servers, every 0.1 s."""
        last: list[dict[str, Any]] = []
        while not self.stopping.wait(0.1):
            procs = []
            for name, declared in VRAM_MIB.items():
                pid = self.pid(name)
                if pid is None:
                    continue
                idle = name == "comfyui" and self.probe()[-1:] != ["loaded"]
                mib = COMFY_CONTEXT_MIB if idle else declared
                with contextlib.suppress(OSError):  # it exited since
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    exe = cmdline.split(b"\0")[0].decode(errors="replace")
                    procs.append({"pid": pid, "name": exe, "used_mib": mib, "gpu_uuid": mgpusim.gpu_uuid(0)})
            if procs != last:
                with self.gpu.edit() as state:
                    state["processes"] = procs
                last = procs

    def used(self) -> dict[str, int]:
        """MiB per server as the stand-in reports them now."""
        names = {str(self.pid(n)): n for n in VRAM_MIB}
        return {names.get(str(p["pid"]), str(p["pid"])): p["used_mib"] for p in self.gpu.read()["processes"]}

    # -- the broker

    def broker_config(self) -> str:
        """The broker's config: consumers.yaml's presets for ComfyUI and whisper, llama-server's beside
        them; each consumer measured by its processes; whisper and llama stopped and started by commands."""
        p = self.ports
        smi = [sys.executable, str(HERE / "mgpusim.py"), "nvidia-smi", "--state", str(self.root / "gpu.json")]

        def service(action: str, name: str) -> str:
            return json.dumps([sys.executable, str(HERE / "test_real.py"), action, name, str(self.root)])

        def processes(name: str) -> str:
            return f"processes: {{name: {json.dumps(PROCESS_NAMES[name])}}}"

        return f"""\
# Written by test_real.py: the broker in front of real servers on ports picked at random.
listen: 127.0.0.1:{p["broker"]}
gpu: {{nvidia_smi: {json.dumps(smi)}, reader: nvidia-smi, index: 0, cushion_mib: 256,
      query_timeout_s: 5}}
scheduler: {{queue_timeout_s: 120, vram_wait_s: 10}}
health: {{interval_s: 1, timeout_s: 2}}
routing: {{stt: whisper, llm: llama, chat: llama, image: comfyui}}
consumers:
  comfyui:
    preset: comfyui
    url: http://127.0.0.1:{p["comfyui"]}
    listen: 127.0.0.1:{p["comfyui_listen"]}
    vram_resident_mib: {VRAM_MIB["comfyui"]}
    {processes("comfyui")}
  whisper:
    preset: whisper-cpp
    url: http://127.0.0.1:{p["whisper"]}
    vram_resident_mib: {VRAM_MIB["whisper"]}
    {processes("whisper")}
    can_coexist_with: [llama]
    unload: {{command: {service("stop", "whisper")}, timeout_s: 30}}
    load: {{command: {service("start", "whisper")}, timeout_s: 60}}
  llama:
    preset: llama-cpp
    url: http://127.0.0.1:{p["llama"]}
    vram_resident_mib: {VRAM_MIB["llama"]}
    {processes("llama")}
    unload: {{command: {service("stop", "llama")}, timeout_s: 30}}
    load: {{command: {service("start", "llama")}, timeout_s: 60}}
"""

    def start_broker(self) -> None:
        """The broker as a subprocess (its log in broker.log), and a reader of its event stream."""
        argv = [sys.executable, str(HERE / "mgpumanager.py"), "--config", str(self.root / "broker.yaml")]
        with (self.root / "broker.log").open("ab") as log:
            self.broker = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_until(lambda: get_json(self.url + "/v1/status"), 60, "the broker answering")
        self.spawn(self.read_events)
        assert self.subscribed.wait(10), "the broker's event stream never answered"

    def read_events(self) -> None:
        """Append every event of /v1/events to self.events until the broker goes away."""
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["broker"], timeout=60)
        try:
            conn.request("GET", "/v1/events")
            resp = conn.getresponse()
            self.subscribed.set()
            while not self.stopping.is_set() and (line := resp.readline()):
                if line.startswith(b"data: "):
                    self.events.append(json.loads(line[6:]))
        except OSError as e:
            if not self.stopping.is_set():
                print(f"bed: event stream ended: {e!r}", file=sys.stderr)
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        """The broker's /v1/status."""
        return get_json(self.url + "/v1/status")

    def wait_healthy(self, name: str) -> None:
        """Until the broker's probe has seen the consumer healthy."""
        wait_until(
            lambda: self.status()["consumers"][name]["healthy"], 30, f"the broker seeing {name} healthy"
        )

    def wait_idle(self, timeout: float = IDLE_WAIT_S) -> None:
        """Until no job holds or waits for the GPU."""

        def idle() -> bool:
            sched = self.status()["scheduler"]
            return sched["holder"] is None and not sched["queue"]

        wait_until(idle, timeout, "the broker idle")

    def spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        """Stop the broker, the servers and the threads."""
        self.stopping.set()
        if self.broker is not None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                self.broker.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()
        for name in VRAM_MIB:
            self.service("stop", name)
        for thread in self.threads:
            thread.join(timeout=5)

    # -- what happened

    def since(self, mark: int, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """The events after `mark` (an index into self.events) with that name and those fields."""
        return [
            e
            for e in self.events[mark:]
            if (event is None or e["event"] == event) and all(e.get(k) == v for k, v in fields.items())
        ]

    async def wait_event(self, mark: int, event: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        """The first such event after `mark`, waiting for it."""
        deadline = time.monotonic() + timeout
        while not (found := self.since(mark, event, **fields)):
            assert time.monotonic() < deadline, f"no {event} event {fields} within {timeout:g} s"
            await asyncio.sleep(0.05)
        return found[0]

    def log_lines(self, *words: str) -> list[str]:
        """The broker's log lines containing every one of `words`."""
        text = (self.root / "broker.log").read_text(errors="replace")
        return [line for line in text.splitlines() if all(w in line for w in words)]


@pytest.fixture(scope="session")
def bed() -> Iterator[Bed]:
    """The servers and the broker, for the whole run (installed by `python test_real.py install`)."""
    missing = [str(product) for _, product, _ in STEPS if not product.exists()]
    if missing:
        pytest.fail(f"not installed (run `python test_real.py install` or `make test-real`): {missing}")
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    b = Bed(OUT)
    try:
        b.spawn(b.watch)
        b.start("whisper")
        b.start("llama")
        b.start_broker()
        yield b
    finally:
        b.close()


@pytest.fixture
def mark(bed: Bed) -> int:
    """Each scenario starts with the broker idle; its events are those after this index."""
    bed.wait_idle()
    return len(bed.events)


@pytest.fixture
async def client() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


_colors = itertools.count(random.randrange(1 << 20))


def workflow(images: int = 1, size: int = 512) -> dict[str, Any]:
    """EmptyImage -> SaveImage: no weights. A new colour each time (ComfyUI caches identical prompts).
    Saving a batch of 2048x2048 PNGs takes about 0.3 s an image on this machine's CPU."""
    empty = {"width": size, "height": size, "batch_size": images, "color": next(_colors) % (1 << 24)}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bed"}},
    }


async def render(bed: Bed, client: aiohttp.ClientSession, wf: dict[str, Any]) -> str:
    """POST /v1/image; the prompt_id (the render goes on; the broker holds the GPU until it is done)."""
    async with client.post(bed.url + "/v1/image", json={"prompt": wf}) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return body["prompt_id"]


async def comfy_running(bed: Bed, client: aiohttp.ClientSession, prompt_id: str) -> None:
    """Until ComfyUI's own /queue shows the prompt running."""
    deadline = time.monotonic() + 30
    while True:
        async with client.get(bed.comfy_url + "/queue") as resp:
            running = [item[1] for item in (await resp.json())["queue_running"]]
        if prompt_id in running:
            return
        assert time.monotonic() < deadline, "the render never showed in ComfyUI's queue_running"
        await asyncio.sleep(0.05)


async def history(bed: Bed, client: aiohttp.ClientSession, prompt_id: str, timeout: float = 60) -> Any:
    """ComfyUI's /history entry of a prompt, once it is done."""
    deadline = time.monotonic() + timeout
    while True:
        async with client.get(f"{bed.comfy_url}/history/{prompt_id}") as resp:
            entry = await resp.json()
        if entry:
            return entry[prompt_id]
        assert time.monotonic() < deadline, f"prompt {prompt_id} not done within {timeout:g} s"
        await asyncio.sleep(0.1)


def finished_ms(entry: dict[str, Any]) -> float:
    """When ComfyUI says the prompt finished (epoch ms)."""
    messages = dict((kind, data) for kind, data in entry["status"]["messages"])
    return messages["execution_success"]["timestamp"]


async def transcribe(bed: Bed, client: aiohttp.ClientSession) -> dict[str, Any]:
    """POST /v1/stt with whisper.cpp's sample, multipart as whisper-server wants it."""
    form = aiohttp.FormData()
    form.add_field("file", JFK_WAV.read_bytes(), filename="jfk.wav", content_type="audio/wav")
    form.add_field("response_format", "json")
    async with client.post(bed.url + "/v1/stt", data=form) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == 200, body
    return body


# ---- Scenarios ----


def measured(bed: Bed, name: str) -> int | None:
    """The MiB the broker measured the consumer's processes holding at its last reading."""
    return bed.status()["consumers"][name]["vram_used_mib"]


async def test_a_held_render_keeps_a_whisper_job_out(bed, mark, client):
    bed.comfy(cors=False)
    prompt_id = await render(bed, client, workflow(images=8, size=2048))
    await comfy_running(bed, client, prompt_id)
    stt = asyncio.ensure_future(transcribe(bed, client))  # queued while the render runs
    queued = await bed.wait_event(mark, "queued", consumer="whisper")
    assert (await stt)["text"] == ""  # the weightless model hears nothing
    done = finished_ms(await history(bed, client, prompt_id))
    granted = bed.since(mark, "granted", consumer="whisper")[0]
    assert epoch_ms(queued) < done < epoch_ms(granted), (queued, done, granted)
    hold = bed.log_lines("msg=job", "consumer=comfyui", "kind=image")[-1]
    assert "hold_ms=" in hold and "hold_ms= " not in hold, hold


async def test_a_prompt_id_of_a_finished_render_is_refused_and_a_new_one_holds(bed, mark, client):
    """ComfyUI takes a client's own prompt_id, and /history keeps that id's entry until a new render of it
    ends: a hold on it would end at its first poll, the GPU given up mid-render. The broker refuses such an
    id before ComfyUI gets the prompt, and holds the GPU for a new one as for ComfyUI's own."""
    bed.comfy(cors=False)
    mine = f"bed-{random.getrandbits(64):016x}"
    async with client.post(bed.url + "/v1/image", json={"prompt": workflow(), "prompt_id": mine}) as resp:
        assert resp.status == 200 and (await resp.json())["prompt_id"] == mine
    await history(bed, client, mine)
    async with client.post(bed.url + "/v1/image", json={"prompt": workflow(), "prompt_id": mine}) as resp:
        body = await resp.json()
        assert resp.status == 400 and body["error"] == "bad_request" and mine in body["message"], body
    async with client.get(bed.comfy_url + "/queue") as resp:
        queue = await resp.json()
        assert queue["queue_running"] == [] and queue["queue_pending"] == []  # ComfyUI never got it
    fresh = f"bed-{random.getrandbits(64):016x}"
    wf = workflow(images=8, size=2048)
    async with client.post(bed.url + "/v1/image", json={"prompt": wf, "prompt_id": fresh}) as resp:
        assert resp.status == 200 and (await resp.json())["prompt_id"] == fresh
    await comfy_running(bed, client, fresh)
    stt = asyncio.ensure_future(transcribe(bed, client))  # queued while the render runs
    queued = await bed.wait_event(mark, "queued", consumer="whisper")
    await stt
    done = finished_ms(await history(bed, client, fresh))
    granted = bed.since(mark, "granted", consumer="whisper")[0]
    assert epoch_ms(queued) < done < epoch_ms(granted), (queued, done, granted)


async def test_eviction_through_comfyuis_real_free(bed, mark, client):
    bed.comfy(cors=False)
    await history(bed, client, await render(bed, client, workflow()))
    assert bed.probe()[-1] == "loaded"
    wait_until(lambda: bed.used().get("comfyui") == VRAM_MIB["comfyui"], 10, "ComfyUI's memory shown")
    # The broker measures it: the comfyui `processes` pattern names ComfyUI's python in nvidia-smi's list.
    wait_until(lambda: measured(bed, "comfyui") == VRAM_MIB["comfyui"], 10, "the broker measuring ComfyUI")
    await transcribe(bed, client)  # whisper does not fit beside ComfyUI: the broker posts /free
    evicting = bed.since(mark, "evicting", consumer="comfyui")
    evicted = bed.since(mark, "evicted", consumer="comfyui", for_consumer="whisper")
    assert evicting and evicted, bed.since(mark)
    # ComfyUI's prompt worker took /free's flags and unloaded its models (the probe saw it do so); its
    # process keeps its CUDA context, which the broker measures and does not count as resident.
    assert bed.probe()[-1] == "unloaded"
    assert bed.used()["comfyui"] == COMFY_CONTEXT_MIB
    wait_until(lambda: measured(bed, "comfyui") == COMFY_CONTEXT_MIB, 10, "the broker measuring the context")
    # (/v1/status reads the GPU at most once a second: whisper-server, started for the job, shows soon.)
    wait_until(
        lambda: str(WHISPER_SERVER) in {p["name"] for p in bed.status()["gpu"]["processes"]},
        10,
        "whisper-server in the GPU's process list",
    )
    status = bed.status()
    assert status["consumers"]["comfyui"]["loaded"] is False
    assert status["consumers"]["comfyui"]["vram_peak_mib"] == VRAM_MIB["comfyui"]
    owners = {p["name"]: p["consumer"] for p in status["gpu"]["processes"]}
    assert owners[str(COMFY_PY)] == "comfyui" and owners[str(WHISPER_SERVER)] == "whisper", owners


async def test_command_eviction_and_start_of_whisper_and_llama(bed, mark, client):
    bed.comfy(cors=False)
    bed.start("whisper")
    bed.start("llama")
    if bed.status()["consumers"]["comfyui"]["loaded"] is not False:
        async with client.post(bed.url + "/v1/consumers/comfyui/unload") as resp:
            assert resp.status == 200, await resp.text()
    wait_until(
        lambda: all(bed.status()["consumers"][n]["loaded"] for n in ("whisper", "llama")),
        30,
        "the broker seeing whisper and llama resident",
    )
    old = {n: bed.pid(n) for n in ("whisper", "llama")}
    mark = len(bed.events)  # from here on
    # ComfyUI's 13000 MiB do not fit beside either: both are stopped by their commands.
    await history(bed, client, await render(bed, client, workflow()))
    assert {e["consumer"] for e in bed.since(mark, "evicted", for_consumer="comfyui")} == {"whisper", "llama"}
    assert bed.pid("whisper") is None and bed.pid("llama") is None
    assert bed.log_lines("msg=command", "consumer=whisper", "action=unload", "exit=0")
    # A whisper job starts whisper-server again (after ComfyUI's /free), then an llm job (the llama-cpp
    # preset's /v1/completions) llama-server.
    await transcribe(bed, client)
    assert bed.since(mark, "loaded", consumer="whisper")
    async with client.post(bed.url + "/v1/llm", json={"prompt": "why is the sky", "max_tokens": 8}) as resp:
        answer = await resp.json()
        assert resp.status == 200, answer
    assert answer["object"] == "text_completion" and isinstance(answer["choices"][0]["text"], str)
    assert bed.since(mark, "loaded", consumer="llama")
    new = {n: bed.pid(n) for n in ("whisper", "llama")}
    assert all(new[n] is not None and new[n] != old[n] for n in new), (old, new)
    both = {"whisper": VRAM_MIB["whisper"], "llama": VRAM_MIB["llama"], "comfyui": COMFY_CONTEXT_MIB}
    wait_until(lambda: bed.used() == both, 10, f"the stand-in showing {both}")


async def test_streaming_through_v1_chat(bed, mark, client):
    payload = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16, "stream": True}
    reads = []
    async with client.post(bed.url + "/v1/chat", json=payload) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Length" not in resp.headers
        async for chunk in resp.content.iter_any():
            reads.append(chunk)
    events = [line[6:] for line in b"".join(reads).decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    await bed.wait_event(mark, "finished", consumer="llama", kind="chat")


async def test_the_openai_client_through_the_mount(bed, mark):
    openai = pytest.importorskip("openai")
    async with openai.AsyncOpenAI(
        base_url=bed.url + "/c/llama/v1", api_key="unused", timeout=60, max_retries=0
    ) as oai:
        models = [m.id async for m in oai.models.list()]
        assert models == [str(GGUF)]
        stream = await oai.chat.completions.create(
            model=models[0], messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 2
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # The mount's POST equals llama's chat path (the llama-cpp preset's): a GPU job of kind chat.
    await bed.wait_event(mark, "finished", consumer="llama", kind="chat")


#: Loads the workflow into the page's graph and queues it as the Run button does; notes the renders its
#: WebSocket reports done.
PAGE_PROMPT = """(async () => {
  window.bedDone = [];
  app.api.addEventListener("execution_success", (e) => window.bedDone.push(e.detail.prompt_id));
  await app.loadApiJson(%s, "bed");
  await app.queuePrompt(0, 1);
  return true;
})()"""
PAGE_READY = "window.app && app.graph && app.api && app.api.socket && app.api.socket.readyState === 1"
PAGE_REFUSED = "performance.getEntriesByType('resource').some(r => r.responseStatus === 403)"
#: What the page loaded, for the failure message of a page that never became the app.
PAGE_RESOURCES = (
    "JSON.stringify(performance.getEntriesByType('resource')"
    ".map(r => [r.name.split('/').slice(-2).join('/'), r.responseStatus]).slice(0, 12))"
)


async def ui_scenario(bed: Bed, mark: int, page: str, shot: str) -> None:
    """ComfyUI's page at `page` in headless Chromium: it loads, a prompt queued from it is held like
    /v1/image, its WebSocket reports the render; a screenshot goes to real-run/<shot>."""
    # The suite's DevTools driver (it skips without chromium); imported here, not for the start/stop commands.
    from test_mgpumanager import Browser  # noqa: PLC0415

    home = bed.root / f"chromium-{Path(shot).stem}"
    home.mkdir()
    # No templates dialog over the screenshot: set what a first visit sets (through the mount, unscheduled).
    done = urllib.request.Request(bed.url + "/c/comfyui/api/settings/Comfy.TutorialCompleted", b"true")
    await asyncio.to_thread(urllib.request.urlopen, done, timeout=10)
    async with Browser(home) as browser:
        await browser.call("Page.navigate", url=page)
        state = await browser.wait_for(f"({PAGE_READY}) ? 'ready' : ({PAGE_REFUSED}) && 'refused'", 60)
        if state != "ready":
            await browser.screenshot(OUT / shot)
            loaded = await browser.evaluate(PAGE_RESOURCES)
            raise AssertionError(f"ComfyUI's UI did not load at {page}; its resources: {loaded}")
        result = await browser.call(
            "Runtime.evaluate", expression=PAGE_PROMPT % json.dumps(workflow()), awaitPromise=True
        )
        assert "exceptionDetails" not in result, result
        prompt_id = await browser.wait_for("window.bedDone.length > 0 && window.bedDone[0]", timeout=60)
        await asyncio.sleep(1)  # for the screenshot only: the saved image drawn in its node
        await browser.screenshot(OUT / shot)
    granted = await bed.wait_event(mark, "granted", consumer="comfyui", kind="image_ui")
    assert granted
    assert (await asyncio.to_thread(get_json, f"{bed.comfy_url}/history/{prompt_id}"))[prompt_id]
    # The hold ends once /api/history/<id> is filled: the job line carries its length.
    await asyncio.to_thread(bed.wait_idle)
    assert [line for line in bed.log_lines("msg=job", "kind=image_ui") if "hold_ms= " not in line]


async def test_comfyuis_ui_with_default_flags_through_the_mount(bed, mark):
    """ComfyUI as it starts by default: the broker presents a page of its own origin to ComfyUI as
    ComfyUI's own, so its origin check passes."""
    bed.comfy(cors=False)
    await ui_scenario(bed, mark, bed.url + "/c/comfyui/", "comfyui-mount-default-flags.png")
    # A page of another origin still meets ComfyUI's check: the broker does not weaken it.
    foreign = urllib.request.Request(
        bed.url + "/c/comfyui/api/system_stats", headers={"Origin": "http://elsewhere.example:8080"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, foreign, timeout=10)
    assert refused.value.code == 403


async def test_comfyuis_ui_through_its_own_port(bed, mark):
    """The comfyui consumer's `listen` port: ComfyUI's whole API at the root, with its default flags."""
    bed.comfy(cors=False)
    await ui_scenario(bed, mark, f"http://127.0.0.1:{bed.ports['comfyui_listen']}/", "comfyui-port.png")


async def test_comfyuis_ui_through_the_mount_with_cors_header_in_chromium(bed, mark):
    """With --enable-cors-header, ComfyUI's CORS middleware replaces its origin check: works as well."""
    bed.comfy(cors=True)
    await ui_scenario(bed, mark, bed.url + "/c/comfyui/", "comfyui-mount-cors.png")


async def test_comfyui_killed_mid_render_releases_the_gpu(bed, mark, client):
    bed.comfy(cors=False)
    prompt_id = await render(bed, client, workflow(images=24, size=2048))
    await comfy_running(bed, client, prompt_id)
    stt = asyncio.ensure_future(transcribe(bed, client))
    try:
        await bed.wait_event(mark, "queued", consumer="whisper")
        killed = len(bed.events)  # (bed.comfy may have restarted ComfyUI before: that was seen down too)
        os.kill(bed.pid("comfyui"), signal.SIGKILL)
        bed.probe_file.unlink(missing_ok=True)
        bed.service("start", "comfyui")  # at once, as systemd's Restart= does: it takes seconds to listen
        # Seen down by the hold's poll of /history or by a health probe, whichever comes first.
        down = await bed.wait_event(killed, "health", consumer="comfyui", healthy=False, timeout=30)
        # Within a few poll intervals of ComfyUI seen down, the hold is given up and whisper runs.
        ended = await bed.wait_event(killed, "hold_ended", consumer="comfyui", timeout=10 * POLL_S + 5)
        granted = await bed.wait_event(killed, "granted", consumer="whisper", timeout=10 * POLL_S + 5)
        assert ended["outcome"] == "abandoned" and "connection refused" in ended["reason"], ended
        assert epoch_ms(down) <= epoch_ms(ended) <= epoch_ms(granted)
        assert epoch_ms(granted) - epoch_ms(down) <= 10 * POLL_S * 1000
        assert (await stt)["text"] == ""
    finally:
        await asyncio.wait([stt], timeout=60)  # whatever failed, the next run starts idle
    assert bed.log_lines('msg="hold abandoned"', "consumer=comfyui")
    assert bed.status()["scheduler"]["stats"]["hold_abandoned"] >= 1
    # The restarted ComfyUI has forgotten the render: its history of it stays empty.
    wait_until(lambda: get_json(bed.comfy_url + "/system_stats"), 180, "ComfyUI answering again")
    assert get_json(f"{bed.comfy_url}/history/{prompt_id}") == {}
    bed.wait_healthy("comfyui")


# ---- mgpusim against the real servers: the same requests, the same answers ----


@contextlib.asynccontextmanager
async def simulated(bed: Bed, factory: Callable[..., mgpusim.SimConsumer], **kw: Any) -> Any:
    """One of mgpusim's simulated services, in-process on port 0 on a GPU of its own: its URL."""
    from aiohttp.test_utils import TestServer  # noqa: PLC0415 (only these tests serve in-process)

    gpu = mgpusim.SimGPU(bed.root / "sim-gpu.json", total_mib=GPU_TOTAL_MIB, reserved_mib=GPU_RESERVED_MIB)
    sim = factory("sim", gpu, **kw)
    server = TestServer(sim.app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def answer(client: aiohttp.ClientSession, method: str, url: str, body: bytes | None) -> tuple[Any, ...]:
    """(status, content type or None, body: parsed if JSON) of one request."""
    async with client.request(method, url, data=body) as resp:
        data = await resp.read()
        kind = resp.headers.get("Content-Type", "").split(";")[0] or None
        return resp.status, kind, json.loads(data) if kind == "application/json" else data.decode()


#: Render messages a ComfyUI client acts on (ComfyUI sends progress ones besides, which the sim does not).
RENDER_MESSAGES = {"execution_start", "execution_cached", "executing", "execution_success", "execution_error"}


async def comfy_render_seen(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """A render named by client "a" while clients "a" and "b" listen: what each heard, what /queue listed
    while it ran and its /history entry (shapes only)."""
    ws = {c: await client.ws_connect(f"{url}/ws?clientId={c}") for c in "ab"}
    heard: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for c in "ab":
        heard[c].append(await ws[c].receive_json(timeout=10))  # its status, with its sid
    async with client.post(url + "/prompt", json={"prompt": workflow(4, 2048), "client_id": "a"}) as resp:
        prompt_id = (await resp.json())["prompt_id"]
    running: list[Any] = []
    while not running:
        async with client.get(url + "/queue") as resp:
            running = (await resp.json())["queue_running"]
        await asyncio.sleep(0.02)
    while not heard["a"] or heard["a"][-1] != {
        "type": "executing",
        "data": {"node": None, "prompt_id": prompt_id},
    }:
        heard["a"].append(await ws["a"].receive_json(timeout=30))

    def emptied(message: dict[str, Any]) -> bool:
        return message["type"] == "status" and message["data"]["status"]["exec_info"]["queue_remaining"] == 0

    while not any(emptied(m) for m in heard["b"][1:]):  # the queue empty again, after the render
        heard["b"].append(await ws["b"].receive_json(timeout=30))
    for c in "ab":
        await ws[c].close()
    async with client.get(f"{url}/history/{prompt_id}") as resp:
        entry = (await resp.json())[prompt_id]

    def render(messages: list[dict[str, Any]]) -> list[str]:
        kinds = [m["type"] for m in messages if m["type"] in RENDER_MESSAGES]
        return [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]  # one executing per node

    return {
        "a": render(heard["a"]),
        "b": render(heard["b"]),
        "b status": {m["type"] for m in heard["b"]} & {"status"},
        "sid": [m["data"].get("sid") for m in (heard["a"][0], heard["b"][0])],
        "queue item": [type(v).__name__ for v in running[0]],
        "extra_data": sorted(running[0][3]),
        "entry": sorted(entry),
        "entry prompt": entry["prompt"] == running[0],
        "messages": [kind for kind, _ in entry["status"]["messages"]],
        "outputs": {node: sorted(out) for node, out in entry["outputs"].items()},
    }


async def test_comfysim_answers_like_the_real_comfyui(bed, mark, client):
    bed.comfy(cors=False)
    requests = [
        ("POST", "/free", b""),  # 500: ComfyUI reads a JSON body it does not get
        ("POST", "/free", b"[]"),
        ("POST", "/api/free", b"{}"),  # 200, an empty body without a content type; nothing happens
        ("GET", "/history/0", None),
        ("GET", "/api/queue", None),
    ]
    async with simulated(bed, mgpusim.ComfySim, work_s=1.0) as sim_url:
        for method, path, body in requests:
            real = await answer(client, method, bed.comfy_url + path, body)
            assert await answer(client, method, sim_url + path, body) == real, (method, path)
        real_render = await comfy_render_seen(client, bed.comfy_url)
        assert await comfy_render_seen(client, sim_url) == real_render
    assert real_render["a"][0] == "execution_start" and real_render["b"] == []  # what the sim plays


async def test_whispersim_answers_like_the_real_whisper_server(bed, mark, client):
    bed.start("whisper")
    requests = [
        ("GET", "/health", None),
        ("GET", "/nope", None),  # its error handler: 404 "File Not Found (<path>)", text/plain
        ("POST", "/health", b""),
        ("GET", "/inference", None),
    ]
    async with simulated(bed, mgpusim.WhisperSim, loaded=True) as sim_url:
        for method, path, body in requests:
            real = await answer(client, method, f"http://127.0.0.1:{bed.ports['whisper']}{path}", body)
            assert await answer(client, method, sim_url + path, body) == real, (method, path)


async def test_llama_sims_answer_like_the_real_llama_server_and_its_router(bed, mark, client):
    bed.start("llama")
    llama = functools.partial(mgpusim.ServiceSim, service="llama-cpp", loaded=True)
    async with simulated(bed, llama) as sim_url:
        for path in ("/health", "/nope"):
            real = await answer(client, "GET", f"http://127.0.0.1:{bed.ports['llama']}{path}", None)
            assert await answer(client, "GET", sim_url + path, None) == real, path
    # The router (llama-server without a model): its models are the .gguf files of --models-dir.
    models = bed.root / "router-models"
    models.mkdir(exist_ok=True)
    (models / "tiny.gguf").unlink(missing_ok=True)
    (models / "tiny.gguf").symlink_to(GGUF)
    port = free_port()
    argv = [LLAMA_SERVER, "--models-dir", models, "--host", "127.0.0.1", "--port", port, "-c", "512"]
    with (bed.root / "router.log").open("ab") as log:
        router = await asyncio.create_subprocess_exec(
            *map(str, argv), stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
    real_url = f"http://127.0.0.1:{port}"
    router_sim = functools.partial(
        mgpusim.ServiceSim, service="llama-cpp-router", models=("tiny",), load_s=1, release_s=0.5
    )
    ok = {"application/json": {"success": True}}

    async def both(sim_url: str, method: str, path: str, body: Any = b"") -> Any:
        """The same request to the real router and to the sim: the same answer (a 500: the same kind)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        real = await answer(client, method, real_url + path, data)
        sim = await answer(client, method, sim_url + path, data)
        if real[0] == 500:  # its JSON parser's message: compare what kind of error it is
            real, sim = ((a[0], a[2]["error"]["type"]) for a in (real, sim))
        assert sim == real, (method, path, body)
        return real[0] if real[0] != 200 else {real[1]: real[2]}

    async def status(url: str, want: str | None = None) -> str:
        """The router's word for tiny (waiting until it is ``want``)."""
        deadline = time.monotonic() + 30
        while True:
            async with client.get(url + "/models") as resp:
                value = {m["id"]: m["status"]["value"] for m in (await resp.json())["data"]}["tiny"]
            if want is None or value == want:
                return value
            assert time.monotonic() < deadline, f"tiny not {want} at {url} within 30 s"
            await asyncio.sleep(0.1)

    try:
        await asyncio.to_thread(
            wait_until, lambda: get_json(real_url + "/health"), 30, "the router answering"
        )
        async with simulated(bed, router_sim) as sim_url:
            assert await both(sim_url, "POST", "/models/unload", {"model": "tiny"}) == 400  # not running
            assert await both(sim_url, "POST", "/models/unload", {"model": "nope"}) == 400  # not found
            assert await both(sim_url, "POST", "/models/load", {"model": "nope"}) == 404
            assert await both(sim_url, "POST", "/models/unload") == 500  # no JSON body
            assert await both(sim_url, "POST", "/models/load", {"model": "tiny"}) == ok
            assert await status(real_url) == await status(sim_url) == "loading"  # answered before it loads
            assert await both(sim_url, "POST", "/models/load", {"model": "tiny"}) == 400  # already running
            assert await status(real_url, "loaded") == await status(sim_url, "loaded")
            assert await both(sim_url, "POST", "/models/unload", {"model": "tiny"}) == ok
            # Its instance exits after the answer (listed loaded until then): both get there.
            assert await status(real_url, "unloaded") == await status(sim_url, "unloaded")
    finally:
        router.terminate()
        await asyncio.wait_for(router.wait(), 30)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
