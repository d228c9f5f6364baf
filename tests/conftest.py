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

# Seconds each test file took (2-core AMD EPYC, 2026-12-07, `--durations=0`, one worker's time).
# The README's test command runs whole files on three workers (`--dist loadfile`) and hands them out
# longest first (`--no-loadscope-reorder` and the sort below), so that the last file a worker takes
# is a short one: xdist's own order goes by how many tests a file has, which hands out the 8-sender
# load test (3 tests, 2.5 minutes) near the end. With two workers the two orders measured the same
# (24 min 15 s and 18 s); with three the CPU was busy until the last minute. A file not listed goes
# after these in its own order; a stale figure only changes the order, never what runs.
FILE_SECONDS = {
    "test_training.py": 673, "test_node.py": 421, "test_orthanc_plugin.py": 293, "test_faults.py": 234,
    "test_dashboard.py": 181, "test_pull.py": 155, "test_load_and_fuzz.py": 155, "test_api.py": 141,
    "test_config_check.py": 122, "test_forward_commitment.py": 103, "test_pairs.py": 94,
    "test_delivery.py": 91, "test_registry.py": 90, "test_geometry.py": 85, "test_audit_export.py": 79,
    "test_scale_out.py": 75, "test_qa.py": 70, "test_synthesis.py": 69, "test_end_to_end.py": 69,
    "test_concurrent_senders.py": 63, "test_retention.py": 56, "test_finetune_search.py": 51,
    "test_contrast.py": 45, "test_transfer_syntaxes.py": 42, "test_commitment.py": 39,
    "test_pull_pairs.py": 37, "test_follow_model.py": 37, "test_outcomes.py": 29, "test_demo.py": 27,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: a file's own order stays


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
