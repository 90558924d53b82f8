"""Attacks on the lean queue path (worker.queue.lean, worker.queue.transport) from the queue endpoint's side:
answers the service never sends (huge, deep, wide, wrong types, entities, garbage, smuggled, never coming).
Each must end as an error the worker already handles (DecodeError, ServiceResponseError, HttpResponseError),
quickly and with bounded memory, never as a message the worker would act on."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from azure.core.exceptions import DecodeError, HttpResponseError, ResourceNotFoundError, ServiceResponseError
from azure.storage.queue import QueueClient

from testsupport.hostile.lean import HostileQueue, http_answer, message_xml, messages_xml
from worker.queue.lean import LeanQueueClient
from worker.queue.transport import MAX_ANSWER_BYTES


@pytest.fixture
def hostile() -> Iterator[HostileQueue]:
    with HostileQueue() as server:
        yield server


def client_of(server: HostileQueue, read_timeout_s: float = 5.0) -> LeanQueueClient:
    return LeanQueueClient(QueueClient.from_connection_string(server.connection_string, "victim"), 2.0, read_timeout_s)


def receive(client: LeanQueueClient, n: int = 32) -> list[object]:
    return list(next(client.receive_messages(messages_per_page=n, visibility_timeout=30, retry_total=0).by_page()))


def test_a_well_formed_answer_is_read(hostile: HostileQueue) -> None:
    hostile.answer = http_answer(200, messages_xml(message_xml(text="&lt;b&gt; &amp; &#233;")))
    [message] = receive(client_of(hostile))
    assert message.content == "<b> & é" and message.dequeue_count == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("body", [
    b"<!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;&lol;&lol;\">]><QueueMessagesList>&lol2;</QueueMessagesList>",
    b"<?xml version='1.0'?><!DOCTYPE x SYSTEM \"file:///etc/passwd\"><QueueMessagesList/>",
    b"not xml at all",
    b"<QueueMessagesList><QueueMessage>",  # truncated
    b"<Other><QueueMessage/></Other>",
    messages_xml(message_xml(dequeue_count="many")),
    messages_xml(message_xml(dequeue_count="1" * 5000)),
    messages_xml(message_xml(inserted="yesterday")),
    messages_xml(message_xml(inserted="Wed, 03 Foo 2026 20:19:35 GMT")),
    messages_xml(message_xml(receipt="")),
    messages_xml(message_xml(text="<script>run()</script>")),  # markup where text belongs
    messages_xml(message_xml(message_id="a"), message_xml(message_id="b")),  # more than asked for (1)
    messages_xml("<a>" * 200_000 + "</a>" * 200_000),  # deep
    messages_xml("<QueueMessage/>" * 100_000),  # wide
], ids=["entities", "external-dtd", "not-xml", "truncated", "wrong-root", "count-text", "count-huge", "date-text",
        "date-month", "no-receipt", "markup-in-text", "too-many", "deep", "wide"])
def test_answers_the_service_never_sends_are_refused(hostile: HostileQueue, body: bytes) -> None:
    hostile.answer = http_answer(200, body)
    started = time.monotonic()
    with pytest.raises(DecodeError):
        receive(client_of(hostile), n=1)
    assert time.monotonic() - started < 5


def test_a_huge_answer_is_not_read_whole(hostile: HostileQueue) -> None:
    hostile.answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_ANSWER_BYTES * 8) + b"<" * 1000
    with pytest.raises(ServiceResponseError, match="bytes"):
        receive(client_of(hostile))


def test_a_huge_answer_without_a_length_is_cut_off(hostile: HostileQueue) -> None:
    hostile.answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * (MAX_ANSWER_BYTES + 10)
    with pytest.raises(ServiceResponseError, match="more than"):
        receive(client_of(hostile))


def test_an_answer_that_never_comes_times_out(hostile: HostileQueue) -> None:
    hostile.answer = None
    started = time.monotonic()
    with pytest.raises(ServiceResponseError):
        receive(client_of(hostile, read_timeout_s=1.0))
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("garbage", [b"\x00\xff garbage \x13\x37\r\n\r\n", b"HTTP/1.1 2OO OK\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 100_000 + b"\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n"])
def test_garbage_is_a_failed_call(hostile: HostileQueue, garbage: bytes) -> None:
    hostile.answer = garbage
    with pytest.raises(ServiceResponseError):
        receive(client_of(hostile))


def test_an_error_answer_with_a_hostile_body_keeps_a_bounded_message(hostile: HostileQueue) -> None:
    hostile.answer = http_answer(404, b"<Error><Code>" + b"A" * 1_000_000 + b"</Code><Message>" + b"m" * 5000 + b"</Message></Error>")
    with pytest.raises(ResourceNotFoundError) as lost:
        client_of(hostile).delete_message("id-1", "receipt")
    assert lost.value.status_code == 404 and len(str(lost.value)) < 2000


def test_an_error_code_header_wins_and_is_what_the_worker_reads(hostile: HostileQueue) -> None:
    hostile.answer = http_answer(400, b"<Error><Code>Other</Code></Error>", {"x-ms-error-code": "PopReceiptMismatch"})
    from worker.queue.client import is_lease_lost

    with pytest.raises(HttpResponseError) as mismatch:
        client_of(hostile).delete_message("id-1", "receipt")
    assert mismatch.value.error_code == "PopReceiptMismatch" and is_lease_lost(mismatch.value)  # type: ignore[attr-defined]


def test_a_smuggled_second_answer_is_never_read_as_the_next_call_s(hostile: HostileQueue) -> None:
    """An answer followed by bytes it did not announce: the connection is not reused for the next call."""
    smuggled = http_answer(200, messages_xml(message_xml(message_id="smuggled")))
    hostile.answer = http_answer(204) + smuggled
    client = client_of(hostile)
    client.delete_message("id-1", "receipt")
    time.sleep(0.2)  # the smuggled bytes have arrived
    hostile.answer = http_answer(200, messages_xml())
    assert receive(client) == []


def test_an_id_with_path_characters_stays_in_its_path_segment(hostile: HostileQueue) -> None:
    hostile.answer = http_answer(204)
    client_of(hostile).delete_message("../../other-queue/messages/x?popreceipt=y", "r")
    assert hostile.requests == 1
    assert "%2F" in hostile.last_target and "/other-queue/" not in hostile.last_target


def test_a_chunked_answer_after_a_100_continue_is_read(hostile: HostileQueue) -> None:
    """Header parsing is the lean path's own (transport.LeanResponse): chunked bodies and 1xx answers still work."""
    body = messages_xml(message_xml(text="chunked"))
    hostile.answer = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-ENCODING: chunked\r\n\r\n"
                      + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    client = client_of(hostile)
    [message] = receive(client)
    assert message.content == "chunked"  # type: ignore[attr-defined]
    assert receive(client)[0].content == "chunked"  # type: ignore[attr-defined]  # and the connection is reusable


def test_a_put_answer_with_several_messages_is_refused(hostile: HostileQueue) -> None:
    hostile.answer = http_answer(201, messages_xml(message_xml(message_id="a"), message_xml(message_id="b")))
    with pytest.raises(DecodeError):
        client_of(hostile).send_message("one", retry_total=0)
