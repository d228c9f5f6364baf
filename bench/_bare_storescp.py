"""The peer the node is measured against: a bare pynetdicom storescp that writes the received
bytes and fsyncs each file (no validation, no database, no rename).

With ``--poll-ms`` it uses the node's transport settings (``dicom_node.transport.tune``:
TCP_NODELAY and that reader poll interval, dicom_poll_ms), so the bench can tell the transport
from the rest. With ``--rename`` it follows the node's durability protocol instead (temporary
name, fsync, rename, fsync of the folder), so the bench can tell the protocol's cost from the
node's own bookkeeping (validation, database).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dicom_node.transport import tune  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rename", action="store_true", help="temporary name, fsync, rename, fsync the folder")
    parser.add_argument("--poll-ms", type=float, default=None, help="the node's transport settings: TCP_NODELAY and this reader poll interval (pynetdicom's: 1 ms)")
    args = parser.parse_args()
    folder: Path = args.folder
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        path = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        target = folder / f".{path.name}.tmp" if args.rename else path
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, event.encoded_dataset(include_meta=True))
            os.fsync(fd)
        finally:
            os.close(fd)
        if args.rename:
            os.replace(target, path)
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return 0x0000

    def on_connection(event: evt.Event) -> None:
        if args.poll_ms is not None:
            tune(event.assoc, args.poll_ms / 1000)

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(MRImageStorage)
    print("listening", flush=True)
    ae.start_server(("127.0.0.1", args.port), evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_connection)])


if __name__ == "__main__":
    main()
