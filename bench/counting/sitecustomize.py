"""Counts every HTTP request azure-core sends from this process and its forks.

Imported by Python at start-up when bench/counting is on PYTHONPATH (common.counted).
Each request appends one byte (the method's initial) to the file named by
BENCH_REQUESTS, so the file's size is the number of requests, across every
process of a tool, retries included. One O_APPEND write per request costs a few
microseconds against the millisecond a request takes.
"""

import os

_path = os.environ.get("BENCH_REQUESTS")
if _path:
    from azure.core.pipeline.transport import RequestsTransport

    _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _send = RequestsTransport.send

    def _counted_send(self, request, **kwargs):  # type: ignore[no-untyped-def]
        os.write(_fd, request.method[:1].encode())
        return _send(self, request, **kwargs)

    RequestsTransport.send = _counted_send
