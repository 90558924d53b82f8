"""Celery 5 on kombu's Azure Storage Queues transport, as a user would set it up.

    celery -A bench.celery_app worker --pool prefork --concurrency N   (BENCH_BROKER, BENCH_QUEUE in the environment)

Settings: results ignored (no backend), and the broadcast features that would
each poll queues of their own on this transport turned off (remote control,
events, and on the command line mingle, gossip, heartbeat): fewer requests
than Celery's defaults, so this favours Celery. Everything else is Celery's
default (prefetch multiplier 4, early acknowledgement).

Note kombu's transport deletes a message as it receives it (`_get`), before
the task runs, whatever acks_late says: a worker killed with tasks in hand
loses them. bench/chaos.py --tool celery shows it.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from celery import Celery
from celery.signals import after_setup_logger

from bench.workloads import run

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "memory://"))
app.conf.update(
    task_ignore_result=True,
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    task_default_queue=os.environ.get("BENCH_QUEUE", "celery"),
    worker_hijack_root_logger=True,
)


@after_setup_logger.connect
def _quiet_azure(**_: object) -> None:
    logging.getLogger("azure").setLevel(logging.WARNING)  # otherwise every HTTP request is logged at INFO


@app.task(name="bench.work")
def work(workload: str, body: str) -> None:
    run(workload, body)


def broker_url(connection_string: str) -> str:
    """kombu's URL form (azurestoragequeues://<key>@<account url>) of an Azurite/Storage connection string."""
    parts = dict(p.split("=", 1) for p in connection_string.split(";") if p)
    return f"azurestoragequeues://{parts['AccountKey']}@{parts['QueueEndpoint'].rstrip('/')}"


def send_tasks(connection_string: str, queue: str, workload: str, bodies: list[str], threads: int = 8) -> None:
    """One task per body, as a Celery user sends them (apply_async), from a few threads with a connection each."""
    url = broker_url(connection_string)

    def send_share(share: list[str]) -> None:
        with app.connection_for_write(url) as connection, connection.Producer() as producer:
            for body in share:
                work.apply_async(args=[workload, body], queue=queue, producer=producer)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send_share, [bodies[i::threads] for i in range(threads)]))
