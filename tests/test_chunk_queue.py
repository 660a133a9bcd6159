"""The worker's queue between a streaming tool and its RPC: a message lingers for more chunks to join it,
but the end of a stream cuts the wait short, so a call ends as soon as its final chunk is there."""

from __future__ import annotations

import threading

from dspex_nb.worker.calls import _DONE, ChunkQueue


def test_the_end_of_a_stream_cuts_a_lingering_message_short() -> None:
    queue, ended = ChunkQueue(2**20), threading.Event()
    queue.put(b"[1]", ended)
    taken: list[list[bytes]] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take(10, 2**20, timeout=5, linger=120)),
                             daemon=True)
    taker.start()
    final = threading.Timer(0.3, lambda: (queue.put(b"[2]", ended), queue.put(_DONE, ended)))  # the tool ends
    final.start()
    taker.join(30)  # a linger of 120 s would still be waiting
    final.join()
    assert not taker.is_alive(), "the message waited out its linger after the stream had ended"
    assert taken == [[b"[1]", b"[2]", _DONE]]
