"""Fixtures that start real processes (Orthanc, mr2ct serve) on loopback and always stop them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.local_stack import NodeServer, OrthancServer, free_port

# pytest-xdist's workers (gw0, gw1, ...) start servers at the same moment: each hands out ports
# from its own block (dicom_node.local_stack.free_port), and so do the processes its tests start.
if os.environ.get("PYTEST_XDIST_WORKER", "")[2:].isdigit():
    os.environ["MR2CT_PORT_BLOCK"] = os.environ["PYTEST_XDIST_WORKER"][2:]

NODE_AE = "MR2CT_TEST"
SCANNER_AE = "TEST_SCANNER"


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed: run deploy/local/install.sh (the README's test command does)")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    _require("Orthanc")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), http_port=free_port(), dicom_port=free_port())
    with server:
        yield server


def node_env(workdir: Path, port: int, orthanc: OrthancServer, views: str = "none") -> dict[str, str]:
    """A node's settings for a test. ``views``: its test_time_augmentation. Nodes run one forward
    per slice ("none") unless a test asks for more: what most of them test is DICOM flow, not
    pixels, and on a CPU without bf16 (fp32 only) the card's 32 views run ~1.3 slices/s on 2 cores,
    which made a load test's 1,000 slices outlast its wait. The end-to-end module asks for 8
    (NODE_VIEWS); the card's own views ("model") are resolved in test_registry."""
    return {
        "MR2CT_TEST_TIME_AUGMENTATION": views,
        "MR2CT_AE_TITLE": NODE_AE,
        "MR2CT_DICOM_PORT": str(port),
        "MR2CT_ALLOWED_AES": f"{SCANNER_AE},ECHOSCU",
        "MR2CT_SPOOL_DIR": str(workdir / "spool"),
        "MR2CT_DATABASE_URL": f"sqlite:///{workdir / 'mr2ct.db'}",
        "MR2CT_ORTHANC_URL": orthanc.url,
        "MR2CT_ORTHANC_USERNAME": orthanc.username,
        "MR2CT_ORTHANC_PASSWORD": orthanc.password,
        "MR2CT_STABLE_SECONDS": "1.5",
        "MR2CT_DEVICE": "auto",
        "MR2CT_SPOOL_MIN_FREE_MB": "10",
        "MR2CT_API_PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Iterator[NodeServer]:
    """One node per test module; a module sets NODE_VIEWS to run other views than one forward."""
    workdir = tmp_path_factory.mktemp("node")
    port = free_port()
    env = node_env(workdir, port, orthanc, views=getattr(request.module, "NODE_VIEWS", "none"))
    server = NodeServer(workdir, env, port)
    server.database_url = env["MR2CT_DATABASE_URL"]  # type: ignore[attr-defined]
    with server:
        yield server


@pytest.fixture
def node_factory(tmp_path: Path, orthanc: OrthancServer) -> Iterator[Callable[..., NodeServer]]:
    """Start nodes with extra MR2CT_* settings; every one is stopped at the end of the test."""
    started: list[NodeServer] = []

    def make(workdir: Path | None = None, port: int | None = None, **settings: str) -> NodeServer:
        workdir = workdir or tmp_path / f"node{len(started)}"
        port = port or free_port()
        env = node_env(workdir, port, orthanc)
        env.update({f"MR2CT_{k.upper()}": v for k, v in settings.items()})
        server = NodeServer(workdir, env, port)
        server.database_url = env["MR2CT_DATABASE_URL"]  # type: ignore[attr-defined]
        started.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
