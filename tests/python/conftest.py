"""Fixtures that run the real wisp server binary for the tritonclient end-to-end tests.

Each server gets its own copy of the model repository (so no test can corrupt
the checked-in one), free loopback ports, a bounded readiness wait, and a
graceful-shutdown check at teardown: SIGTERM must make it exit 0 within 30 s.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.http as httpclient

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
MODELS = ("simple", "simple_string", "simple_identity")

READY_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0
CLIENT_TIMEOUT_S = 10.0


def wisp_bin() -> Path:
    path = Path(os.environ.get("WISP_BIN", REPO_ROOT / "target" / "debug" / "wisp"))
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"wisp server binary not found at {path} (set WISP_BIN to override). "
            "Build it by running the README test command: scripts/test.sh",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_model_repository(dest: Path) -> Path:
    missing = [m for m in MODELS if not (MODEL_REPOSITORY / m / "1" / "model.wasm").is_file()]
    if missing:
        pytest.fail(
            f"model.wasm missing for {missing} under {MODEL_REPOSITORY}; "
            "run scripts/build-plugins.sh first",
            pytrace=False,
        )
    target = dest / "model_repository"
    # Weights are linked, not copied: the server only reads them.
    shutil.copytree(MODEL_REPOSITORY, target, copy_function=_link_large)
    return target


def _link_large(src, dst):
    if src.endswith(".safetensors"):
        os.symlink(os.path.abspath(src), dst)
    else:
        shutil.copy2(src, dst)


class WispServer:
    def __init__(self, proc: subprocess.Popen, http_port: int, metrics_port: int, log_path: Path,
                 grpc_port: int):
        self.proc = proc
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.log_path = log_path

    @property
    def url(self) -> str:
        """host:port, as tritonclient.http wants it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC port, as tritonclient.grpc wants it."""
        return f"127.0.0.1:{self.grpc_port}"

    def grpc_client(self):
        import tritonclient.grpc as grpcclient
        return grpcclient.InferenceServerClient(url=self.grpc_url)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<could not read server log: {e}>"

    def client(self, concurrency: int = 1) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(
            url=self.url,
            concurrency=concurrency,
            connection_timeout=CLIENT_TIMEOUT_S,
            network_timeout=CLIENT_TIMEOUT_S,
        )


def _wait_ready(server: WispServer, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{server.url}/v2/health/ready"
    last = "no answer yet"
    while time.monotonic() < deadline:
        rc = server.proc.poll()
        if rc is not None:
            pytest.fail(
                f"wisp exited with code {rc} before becoming ready.\n--- server output ---\n{server.log()}",
                pytrace=False,
            )
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = repr(e)
        time.sleep(0.1)
    pytest.fail(
        f"wisp was not ready within {timeout:.0f} s (last: {last}).\n"
        f"--- server output ---\n{server.log()}",
        pytrace=False,
    )


@contextlib.contextmanager
def run_wisp(workdir: Path, mode: str = "none", load_models=(), repository: Path = None, extra_args=(),
             env=None, ready_timeout: float = READY_TIMEOUT_S):
    """Starts wisp on a private copy of the model repository (or on `repository`), with
    `env` added to the environment; stops it with SIGTERM and asserts a graceful exit
    (code 0 within 30 s)."""
    binary = wisp_bin()
    if repository is None:
        repository = copy_model_repository(workdir)
    http_port, metrics_port, grpc_port = free_port(), free_port(), free_port()
    while len({http_port, metrics_port, grpc_port}) < 3:
        metrics_port, grpc_port = free_port(), free_port()
    cmd = [
        str(binary), "serve",
        "--model-repository", str(repository),
        "--http-address", "127.0.0.1",
        "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
        "--grpc-port", str(grpc_port),
        "--model-control-mode", mode,
    ]
    for name in load_models:
        cmd += ["--load-model", name]
    cmd += list(extra_args)
    log_path = workdir / "wisp.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    server = WispServer(proc, http_port, metrics_port, log_path, grpc_port)
    try:
        _wait_ready(server, ready_timeout)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        raise
    try:
        yield server
    finally:
        _stop_gracefully(server)


def _stop_gracefully(server: WispServer) -> None:
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(
                f"wisp did not exit within {SHUTDOWN_TIMEOUT_S:.0f} s of SIGTERM.\n"
                f"--- server output ---\n{server.log()}",
                pytrace=False,
            )
    else:
        rc = proc.returncode
    assert rc == 0, (
        f"wisp exited with code {rc} after SIGTERM (expected a graceful exit, code 0; "
        f"a code already set means it died during the tests).\n--- server output ---\n{server.log()}"
    )


@pytest.fixture(scope="module")
def wisp_server(tmp_path_factory):
    """A server in --model-control-mode none: every model loaded at startup; clients may
    register system shared memory."""
    with run_wisp(tmp_path_factory.mktemp("wisp-none"), mode="none",
                  extra_args=["--allow-client-shm", "true"]) as server:
        yield server


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory):
    """A server in --model-control-mode explicit that loads only `simple` at startup."""
    with run_wisp(tmp_path_factory.mktemp("wisp-explicit"), mode="explicit", load_models=["simple"]) as server:
        yield server


@pytest.fixture(scope="module")
def client(wisp_server):
    c = wisp_server.client(concurrency=4)
    yield c
    c.close()


@pytest.fixture(scope="module")
def explicit_client(explicit_server):
    c = explicit_server.client()
    yield c
    c.close()
