"""Counts every HTTP request this process and its forks send; with BENCH_PROFILE, profiles forked children.

Imported by Python at start-up when bench/counting is on PYTHONPATH (common.counted).
Each request appends one byte (the method's initial) to the file named by
BENCH_REQUESTS, so the file's size is the number of requests, across every
process of a tool, retries included. Counted at http.client's putrequest, which
every client here goes through (requests via urllib3, the lean queue path, the
floor loop). One O_APPEND write per request costs a few microseconds against
the millisecond a request takes.

BENCH_PROFILE=<dir> (bench/cpu.py --profile): every process forked from this one
(spot-supervisor's workers) runs cProfile on each of its threads and writes
<dir>/<pid>.prof as it exits (workers leave by os._exit, so that is where).
"""

import os

_path = os.environ.get("BENCH_REQUESTS")
if _path:
    import http.client

    _fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _putrequest = http.client.HTTPConnection.putrequest

    def _counted_putrequest(self, method, url, *args, **kwargs):  # type: ignore[no-untyped-def]
        os.write(_fd, method[:1].encode())
        return _putrequest(self, method, url, *args, **kwargs)

    http.client.HTTPConnection.putrequest = _counted_putrequest

_profile_dir = os.environ.get("BENCH_PROFILE")
if _profile_dir:
    import cProfile
    import threading
    import time

    _profiles = []
    _in_child = []
    _run = threading.Thread.run
    _real_exit = os._exit

    def _profiled_run(self):  # type: ignore[no-untyped-def]
        if not _in_child:
            return _run(self)
        profile = cProfile.Profile(time.thread_time)
        _profiles.append(profile)
        profile.enable()
        try:
            return _run(self)
        finally:
            profile.disable()

    def _start_in_child():  # type: ignore[no-untyped-def]
        _in_child.append(True)
        profile = cProfile.Profile(time.thread_time)
        _profiles.append(profile)
        profile.enable()

    def _dump_and_exit(code):  # type: ignore[no-untyped-def]
        import marshal

        merged = {}
        for profile in list(_profiles):
            profile.snapshot_stats()  # of a thread still running too: no disable() from another thread
            for func, (cc, nc, tt, ct, callers) in profile.stats.items():
                old = merged.get(func)
                merged[func] = (cc, nc, tt, ct, callers) if old is None else \
                    (old[0] + cc, old[1] + nc, old[2] + tt, old[3] + ct, {**old[4], **callers})
        with open(os.path.join(_profile_dir, f"{os.getpid()}.prof"), "wb") as fh:
            marshal.dump(merged, fh)
        _real_exit(code)

    def _arm_exit():  # type: ignore[no-untyped-def]
        os._exit = _dump_and_exit

    threading.Thread.run = _profiled_run
    os.register_at_fork(after_in_child=lambda: (_start_in_child(), _arm_exit()))
