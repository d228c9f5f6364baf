"""The peer the node is measured against: a bare pynetdicom storescp that writes the received
bytes and fsyncs each file (no validation, no database, no rename)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        path = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, event.encoded_dataset(include_meta=True))
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.add_supported_context(MRImageStorage)
    print("listening", flush=True)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
