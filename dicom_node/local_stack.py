"""Start Orthanc and the node as plain processes on loopback (demo, tests, benches).

Every process gets ``TCP_NODELAY=1`` (dcmtk and Orthanc stall ~40 ms per
instance on loopback without it) and is stopped by ``stop()``, which the
context managers always call.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from dicom_node.orthanc_store import OUTCOME_FLAG, ROUTED_FLAG
from dicom_node.systemd import STARTED

REPO_ORTHANC_CONFIG = Path(__file__).resolve().parent.parent / "orthanc" / "orthanc.json"


# Ports for the servers this module starts are handed out below Linux's ephemeral range
# (32768-60999), so that no outgoing connection (storescu, an HTTP client) takes one between
# free_port() and the server's bind, and each process counts up from a block of its own, so that
# two processes starting servers at once never pick the same free port: MR2CT_PORT_BLOCK names
# the block (the test suite's conftest gives each pytest-xdist worker its own), else the pid picks.
_PORT_LOW, _PORT_HIGH, _PORT_BLOCKS = 20000, 32768, 16
_port_lock = threading.Lock()
_next_port: int | None = None


def _first_port() -> int:
    block = os.environ.get("MR2CT_PORT_BLOCK", "")
    index = int(block) if block.isdigit() else os.getpid()
    return _PORT_LOW + (index % _PORT_BLOCKS) * ((_PORT_HIGH - _PORT_LOW) // _PORT_BLOCKS)


def free_port() -> int:
    """A loopback TCP port nobody listens on now, not handed out before by this process."""
    global _next_port
    with _port_lock:
        port = _first_port() if _next_port is None else _next_port
        for _ in range(_PORT_HIGH - _PORT_LOW):
            candidate, port = port, _PORT_LOW + (port + 1 - _PORT_LOW) % (_PORT_HIGH - _PORT_LOW)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", candidate))
                except OSError:
                    continue
            _next_port = port
            return candidate
    raise RuntimeError(f"no free loopback port in {_PORT_LOW}-{_PORT_HIGH - 1}")


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def nodelay_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env.update(extra or {})
    return env


def exit_on_sigterm() -> None:
    """SIGTERM (``timeout``, ``kill``, a cancelled CI job) raises SystemExit in the main thread, so
    the ``finally`` blocks and ``with`` blocks of a script that started servers stop them: without
    it Python dies at once and leaves its Orthanc, nodes and storescps running."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def wait_listening(proc: subprocess.Popen[Any], port: int, timeout: float = 30.0) -> None:
    """Return once ``proc`` listens on the loopback ``port``; raise if it exits first or never listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        if port_in_use(port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port} within {timeout:.0f} s")


def start_storescp(folder: Path, port: int, ae_title: str, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """dcmtk's storescp writing what it receives into ``folder`` (TCP_NODELAY=1), returned once it
    listens. It serves one association at a time. Stop it with ``stop_process``."""
    binary = shutil.which("storescp")
    if binary is None:
        raise RuntimeError("dcmtk's storescp is not installed; run deploy/local/install.sh")
    proc = subprocess.Popen([binary, "-aet", ae_title, "-od", str(folder), str(port)], env=nodelay_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(proc, port, timeout)
    except RuntimeError:
        stop_process(proc)
        raise
    return proc


ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
ROUTED_METADATA = {ROUTED_FLAG: 1024}  # the plugin's per-series state (orthanc/plugin.py), a user-defined metadata
OUTCOME_METADATA = {OUTCOME_FLAG: 1025}  # where the series stands in the node (dicom_node.outcomes), with or without the plugin


def orthanc_config(*, storage: Path, http_port: int, dicom_port: int, aet: str, users: dict[str, str],
                   modalities: dict[str, list[Any]], python_plugin: bool, stable_age: int | None = None,
                   postgres_index: dict[str, Any] | None = None) -> dict[str, Any]:
    """The project's Orthanc configuration (``orthanc/orthanc.json``) for one Orthanc: what the
    demo and the tests start, and what ``mr2ct orthanc-config`` writes for a permanent one. Raises
    RuntimeError naming the Debian package when a plugin it needs is not installed."""
    config = json.loads(REPO_ORTHANC_CONFIG.read_text())
    config.update(StorageDirectory=str(storage), IndexDirectory=str(storage), HttpPort=http_port, DicomPort=dicom_port,
                  DicomAet=aet, RegisteredUsers=dict(users), DicomModalities=dict(modalities))
    plugins = [p for p in config.get("Plugins", []) if Path(p).exists()]
    config["UserMetadata"] = dict(OUTCOME_METADATA)
    if python_plugin:
        library = ORTHANC_PLUGINS / "libOrthancPython.so"
        if not library.exists():
            raise RuntimeError("orthanc-python is not installed; run deploy/local/install.sh")
        plugins.append(str(library))
        config["PythonScript"] = str(REPO_ORTHANC_CONFIG.parent / "plugin.py")
        config["UserMetadata"].update(ROUTED_METADATA)
    if stable_age is not None:
        config["StableAge"] = stable_age
    if postgres_index is not None:
        library = ORTHANC_PLUGINS / "libOrthancPostgreSQLIndex.so"
        if not library.exists():
            raise RuntimeError("orthanc-postgresql is not installed; run deploy/local/install.sh")
        plugins.append(str(library))
        config["PostgreSQL"] = {"EnableIndex": True, "EnableStorage": False, "Lock": False, "Password": "", **postgres_index}
    config["Plugins"] = plugins
    return config


class OrthancServer:
    """Orthanc with the project's config, its own fresh storage folder, loopback ports; or, with
    ``config_file``, with that file as it is (one `mr2ct orthanc-config` wrote), its first user's login."""

    def __init__(self, workdir: Path, http_port: int = 8042, dicom_port: int = 4242, aet: str = "ORTHANC",
                 modalities: dict[str, list[Any]] | None = None, python_plugin: bool = False, stable_age: int | None = None,
                 extra_env: dict[str, str] | None = None, postgres_index: dict[str, Any] | None = None,
                 config_file: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.http_port, self.dicom_port, self.aet = http_port, dicom_port, aet
        self.username = "mr2ct"
        self.password = secrets.token_urlsafe(16)
        self.modalities = modalities or {}
        self.python_plugin, self.stable_age, self.extra_env = python_plugin, stable_age, extra_env or {}
        self.postgres_index = postgres_index  # {"Host", "Port", "Database", "Username"}: Orthanc's index in PostgreSQL
        self.config_file = config_file
        if config_file is not None:
            given = json.loads(Path(config_file).read_text())
            self.http_port, self.dicom_port, self.aet = given["HttpPort"], given["DicomPort"], given["DicomAet"]
            self.username, self.password = next(iter(given["RegisteredUsers"].items()))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    def write_config(self) -> Path:
        if self.config_file is not None:
            return Path(self.config_file)
        storage = self.workdir / "storage"
        if storage.exists():  # a fresh folder every start (a killed Orthanc's index once failed to reopen)
            shutil.rmtree(storage)
        storage.mkdir(parents=True)
        config = orthanc_config(storage=storage, http_port=self.http_port, dicom_port=self.dicom_port, aet=self.aet,
                                users={self.username: self.password}, modalities=self.modalities, python_plugin=self.python_plugin,
                                stable_age=self.stable_age, postgres_index=self.postgres_index)
        path = self.workdir / "orthanc-generated.json"
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(binary).exists():
            raise RuntimeError("Orthanc is not installed; run deploy/local/install.sh")
        for port in (self.http_port, self.dicom_port):
            if port_in_use(port):
                raise RuntimeError(f"port {port} on 127.0.0.1 is already in use; stop what holds it or choose another port")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen([binary, str(config)], stdout=self.log_file, stderr=subprocess.STDOUT, env=nodelay_env(self.extra_env),
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # closes its log
                raise RuntimeError(f"Orthanc exited with {code}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/system", auth=self.auth, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if getattr(self, "log_file", None):
            self.log_file.close()

    def get(self, path: str, **kwargs: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", auth=self.auth, timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def __enter__(self) -> "OrthancServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


NODE_STARTED = STARTED.encode()  # the node's line once start() is done: its SCP, worker and API all up


class NodeServer:
    """``mr2ct serve`` as a child process, configured through MR2CT_* variables."""

    def __init__(self, workdir: Path, env: dict[str, str], port: int, role: str = "all") -> None:
        self.workdir = Path(workdir)
        self.env, self.port, self.role = env, port, role
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mr2ct.log"

    def start(self, timeout: float = 120.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.role in ("all", "scp") and port_in_use(self.port):
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is already in use; stop what holds it or choose another port")
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--role", self.role], stdout=self.log_file, stderr=subprocess.STDOUT,
            env=nodelay_env(self.env), cwd=self.workdir, start_new_session=True,
        )
        start_offset = self.log_path.stat().st_size
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mr2ct serve exited with {self.proc.returncode}; see {self.log_path}")
            # Readiness from the node's own log line, not a probe connection (which would
            # occupy an association slot until pynetdicom times it out).
            with open(self.log_path, "rb") as fh:
                fh.seek(start_offset)
                if NODE_STARTED in fh.read():
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mr2ct serve did not start within {timeout:.0f} s (port {self.port}); see {self.log_path}")

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)
        self.proc = None
        if getattr(self, "log_file", None):
            self.log_file.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "NodeServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def storescu(files_or_dir: Path | list[Path], port: int, called_ae: str, calling_ae: str = "STORESCU", timeout: float = 300,
             propose: str | None = None, extra_args: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Send a folder, a file, or files in the order given, with dcmtk's storescu, TCP_NODELAY=1.

    ``propose``: a storescu proposal option (``-xr`` RLE, ``-xs`` JPEG lossless, ...) so that
    compressed files go as they are instead of storescu failing to convert them.
    """
    binary = shutil.which("storescu")
    if binary is None:
        raise RuntimeError("dcmtk's storescu is not installed; run deploy/local/install.sh")
    args = [binary, "-aet", calling_ae, "-aec", called_ae]
    if propose:
        args += [propose]
    args += extra_args or []
    files = [str(f) for f in files_or_dir] if isinstance(files_or_dir, list) else [str(files_or_dir)]
    if len(files) == 1 and Path(files[0]).is_dir():
        args += ["+sd"]
    args += ["127.0.0.1", str(port), *files]
    return subprocess.run(args, capture_output=True, text=True, env=nodelay_env(), timeout=timeout)


def echoscu(port: int, called_ae: str, calling_ae: str = "ECHOSCU", timeout: float = 30, extra_args: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("echoscu")
    if binary is None:
        raise RuntimeError("dcmtk's echoscu is not installed; run deploy/local/install.sh")
    args = [binary, "-aet", calling_ae, "-aec", called_ae, *(extra_args or []), "127.0.0.1", str(port)]
    return subprocess.run(args, capture_output=True, text=True, env=nodelay_env(), timeout=timeout)


class PostgresServer:
    """A throw-away PostgreSQL (Debian's binaries) with its own data folder on a loopback port."""

    def __init__(self, workdir: Path | None, port: int) -> None:
        # Root cannot run PostgreSQL, and the postgres user must be able to reach the folder:
        # as root, the server gets a fresh folder of its own under the system temp directory.
        self.own_folder = os.geteuid() == 0 or workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="mr2ct-pg-")) if self.own_folder else Path(workdir)  # type: ignore[arg-type]
        self.port = port
        self.data = self.workdir / "pgdata"
        self.log_path = self.workdir / "postgres.log"
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not versions:
            raise RuntimeError("PostgreSQL is not installed; run deploy/local/install.sh")
        self.bin = versions[-1].parent

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://mr2ct@127.0.0.1:{self.port}/mr2ct"

    def _as_owner(self, *args: str) -> list[str]:
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
            shutil.chown(self.data, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "mr2ct", "-A", "trust", "--no-sync", "-E", "UTF8")
        self.resume()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mr2ct", "mr2ct")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mr2ct", "orthanc")

    def _run(self, *args: str) -> None:
        # The server's own output goes to its log (-l): a pipe it inherited would hold this call open.
        subprocess.run(self._as_owner(*args), check=True, capture_output=True, text=True, timeout=120)

    def halt(self) -> None:
        """Stop the server and keep its data (a restart, a failover: what the node must ride out)."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run(self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
                           capture_output=True, timeout=60)

    def resume(self) -> None:
        """Start the server on its data folder (after ``start`` made it, or ``halt`` stopped it)."""
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c max_connections=100"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log_path), "-w", "start")

    def stop(self) -> None:
        self.halt()
        if self.own_folder:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
