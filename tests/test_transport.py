"""The socket settings the node puts on its associations (dicom_node.transport): without them a
pynetdicom requestor stalls on Nagle's algorithm and every C-STORE waits out a 1 ms poll
(bench/routing.py measures the difference; here only that they are applied)."""

from __future__ import annotations

import socket

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.local_stack import free_port, start_storescp, stop_process
from dicom_node.transport import tune


def test_an_association_opened_with_the_tune_handler_has_tcp_nodelay_and_the_fast_poll(tmp_path) -> None:
    port = free_port()
    storescp = start_storescp(tmp_path, port, "PEER")
    try:
        ae = AE(ae_title="MR2CT")
        ae.add_requested_context(Verification)
        # storescp serves one association at a time: one after the other
        plain = ae.associate("127.0.0.1", port, ae_title="PEER")
        assert plain.is_established
        try:  # pynetdicom's own defaults, which is why the node sets them
            assert plain.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            assert plain.dul._run_loop_delay == 0.001
        finally:
            plain.release()
        tuned = ae.associate("127.0.0.1", port, ae_title="PEER", evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: tune(e.assoc, 0.0002))])
        assert tuned.is_established
        try:
            assert tuned.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert tuned.dul._run_loop_delay == 0.0002
            assert tuned.send_c_echo().Status == 0x0000
        finally:
            tuned.release()
    finally:
        stop_process(storescp)
